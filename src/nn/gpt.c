/* GPT-2 style transformer units: the embedding, a pre-LayerNorm block, and
 * the head (final LayerNorm + logits through the tied token embedding).
 * Names and layouts match tests/ref/refmodels.py, so weights move between
 * PyTorch and Arceus unchanged. */
#include "core/core.h"
#include "core/profile.h"
#include "nn/layer.h"
#include "ops/ops.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

enum { GPT_EMBED, GPT_BLOCK, GPT_HEAD };

/* Sites of dropout inside the model, mixed into the dropout seed. */
enum { DROP_EMBED = 1, DROP_ATTN = 2, DROP_MLP = 3 };

static uint64_t drop_seed(const ar_pass *p, int unit, int site)
{
    return ar_hash3(p->drop_seed, (uint64_t)unit, (uint64_t)site);
}

/* Apply dropout to x in place when training with p > 0. */
static void dropout_inplace(float *x, long n, const ar_pass *p, float rate, uint64_t seed)
{
    if (p->train && rate > 0.0f)
        ar_dropout_forward(x, x, n, rate, seed);
}

/* ---- embedding: tokens (B,T) -> x (B,T,C) ------------------------------ */

static size_t embed_saved(const ar_layer *l, int B, int T)
{
    return (size_t)B * T * l->spec->n_embd;
}

static size_t embed_scratch(const ar_layer *l, int B, int T)
{
    return (size_t)B * T * l->spec->n_embd;
}

static int embed_forward(ar_layer *l, const ar_pass *p, const void *in, float *saved)
{
    int C = l->spec->n_embd;
    long n = (long)p->B * p->T * C;
    AR_PROF_CALL("embedding", AR_PROF_FWD, 0,
                 ar_embedding_forward(saved, in, l->params[0].data, l->params[1].data, p->B, p->T, C));
    dropout_inplace(saved, n, p, l->spec->dropout, drop_seed(p, l->unit, DROP_EMBED));
    return AR_OK;
}

static int embed_backward(ar_layer *l, const ar_pass *p, const void *in, const float *saved,
                          const float *dout, float *din)
{
    int C = l->spec->n_embd;
    long n = (long)p->B * p->T * C;
    const float *d = dout;
    if (p->train && l->spec->dropout > 0.0f) {
        memset(p->scratch, 0, n * sizeof(float));
        ar_dropout_backward(p->scratch, dout, n, l->spec->dropout, drop_seed(p, l->unit, DROP_EMBED));
        d = p->scratch;
    }
    AR_PROF_CALL("embedding", AR_PROF_BWD, 0,
                 ar_embedding_backward(l->params[0].grad, l->params[1].grad, d, in, p->B, p->T, C));
    return AR_OK;
}

/* ---- block: x (B,T,C) -> x + attn(ln1(x)) -> + mlp(ln2(.)) ------------- */

/* Offsets of the saved tensors of a block, in floats. The branches' outputs
 * (attention projection, MLP projection) are not kept: the products add
 * them to the residual stream as they finish, and no backward reads them. */
typedef struct {
    size_t out, ln1, ln1_mean, ln1_rstd, qkv, att, atty, res1, ln2, ln2_mean, ln2_rstd, fc, fc_gelu,
        total;
} block_layout;

static block_layout block_offsets(const ar_model_spec *s, int B, int T)
{
    size_t BT = (size_t)B * T, C = s->n_embd, NH = s->n_head;
    block_layout o;
    size_t at = 0;
    o.out = at, at += BT * C;
    o.ln1 = at, at += BT * C;
    o.ln1_mean = at, at += BT;
    o.ln1_rstd = at, at += BT;
    o.qkv = at, at += 3 * BT * C;
    o.att = at, at += (size_t)B * NH * T * T;
    o.atty = at, at += BT * C;
    o.res1 = at, at += BT * C;
    o.ln2 = at, at += BT * C;
    o.ln2_mean = at, at += BT;
    o.ln2_rstd = at, at += BT;
    o.fc = at, at += 4 * BT * C;
    o.fc_gelu = at, at += 4 * BT * C;
    o.total = at;
    return o;
}

static size_t block_saved(const ar_layer *l, int B, int T)
{
    return block_offsets(l->spec, B, T).total;
}

static size_t block_scratch(const ar_layer *l, int B, int T)
{
    size_t BT = (size_t)B * T, C = l->spec->n_embd;
    /* dres1, a branch's dropout gradient, dfc, datty, dqkv, dln1 + attention scratch */
    return BT * C * (1 + 1 + 4 + 1 + 3 + 1) + (size_t)B * l->spec->n_head * T * T;
}

/* parameter indices of a block */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, APROJ_W, APROJ_B, LN2_W, LN2_B, FC_W, FC_B, MPROJ_W, MPROJ_B };

/* FLOPs of a linear layer's forward (its backward does twice as many) */
static double lin_flops(int N, int IN, int OUT)
{
    return 2.0 * N * IN * OUT;
}

/* The block in five passes over its rows, each a product with the work that
 * follows it in the product's epilogue:
 *   ln1 = LN(x);  qkv = ln1 Wqkv^T + b;  atty = attention(qkv);
 *   res1 = x + drop(atty Wap^T + b), and ln2 = LN(res1), in one;
 *   fc = ln2 Wfc^T + b, and gelu(fc), in one;
 *   out = res1 + drop(gelu(fc) Wm^T + b), in one. */
static int block_forward(ar_layer *l, const ar_pass *p, const void *in, float *saved)
{
    const ar_model_spec *s = l->spec;
    int B = p->B, T = p->T, C = s->n_embd, NH = s->n_head, HS = C / NH;
    int N = B * T;
    const float *x = in;
    ar_param *w = l->params;
    block_layout o = block_offsets(s, B, T);
    float drop = p->train ? s->dropout : 0.0f;
    /* the attention's arithmetic as the MFU formula counts it (all T x T) */
    double att_flops = 4.0 * B * NH * T * T * HS;
    int rc;

    AR_PROF_CALL("ln_1", AR_PROF_FWD, 0,
                 ar_layernorm_forward(saved + o.ln1, saved + o.ln1_mean, saved + o.ln1_rstd, x,
                                      w[LN1_W].data, w[LN1_B].data, N, C));
    AR_PROF_CALL("attn.c_attn", AR_PROF_FWD, lin_flops(N, C, 3 * C),
                 ar_linear_forward(saved + o.qkv, saved + o.ln1, w[ATTN_W].data, w[ATTN_B].data, N,
                                   C, 3 * C));
    AR_PROF_CALL("attention", AR_PROF_FWD, att_flops,
                 rc = ar_attention_forward(saved + o.atty, saved + o.att, saved + o.qkv, B, T, NH, HS));
    if (rc != AR_OK)
        return rc;
    AR_PROF_CALL("attn.c_proj + residual + ln_2", AR_PROF_FWD, lin_flops(N, C, C),
                 rc = ar_linear_residual_forward(saved + o.res1, x, saved + o.atty, w[APROJ_W].data,
                                                 w[APROJ_B].data, N, C, C, drop,
                                                 drop_seed(p, l->unit, DROP_ATTN), saved + o.ln2,
                                                 saved + o.ln2_mean, saved + o.ln2_rstd, w[LN2_W].data,
                                                 w[LN2_B].data));
    if (rc != AR_OK)
        return rc;
    AR_PROF_CALL("mlp.c_fc + gelu", AR_PROF_FWD, lin_flops(N, C, 4 * C),
                 rc = ar_linear_gelu_forward(saved + o.fc, saved + o.fc_gelu, saved + o.ln2, w[FC_W].data,
                                             w[FC_B].data, N, C, 4 * C));
    if (rc != AR_OK)
        return rc;
    AR_PROF_CALL("mlp.c_proj + residual", AR_PROF_FWD, lin_flops(N, 4 * C, C),
                 rc = ar_linear_residual_forward(saved + o.out, saved + o.res1, saved + o.fc_gelu,
                                                 w[MPROJ_W].data, w[MPROJ_B].data, N, 4 * C, C, drop,
                                                 drop_seed(p, l->unit, DROP_MLP), NULL, NULL, NULL, NULL,
                                                 NULL));
    return rc;
}

/* The backward, the same way round: each input gradient is a product whose
 * epilogue does the GELU's or the LayerNorm's backward (and the residual
 * that passes by); the weight gradients are products of their own. Every
 * scratch tensor is written whole before it is read: nothing to zero. */
static int block_backward(ar_layer *l, const ar_pass *p, const void *in, const float *saved,
                          const float *dout, float *din)
{
    const ar_model_spec *s = l->spec;
    int B = p->B, T = p->T, C = s->n_embd, NH = s->n_head, HS = C / NH;
    int N = B * T;
    long n = (long)N * C;
    const float *x = in;
    ar_param *w = l->params;
    block_layout o = block_offsets(s, B, T);
    double att_flops = 8.0 * B * NH * T * T * HS;
    int dropping = p->train && s->dropout > 0.0f;
    int rc;

    size_t need = block_scratch(l, B, T);
    if (need > p->scratch_floats)
        return ar_fail(AR_EINTERNAL, "block backward needs %zu scratch floats, has %zu", need,
                       p->scratch_floats);
    float *dres1 = p->scratch, *dbranch = dres1 + n, *dfc = dbranch + n, *datty = dfc + 4 * n,
          *dqkv = datty + n, *dln1 = dqkv + 3 * n, *datt_scratch = dln1 + n;

    /* out = res1 + dropout(mlpproj): the branch's gradient */
    const float *dm = dout;
    if (dropping) {
        memset(dbranch, 0, n * sizeof(float));
        ar_dropout_backward(dbranch, dout, n, s->dropout, drop_seed(p, l->unit, DROP_MLP));
        dm = dbranch;
    }
    AR_PROF_CALL("mlp.c_proj weight", AR_PROF_BWD, lin_flops(N, 4 * C, C),
                 ar_linear_backward(NULL, w[MPROJ_W].grad, w[MPROJ_B].grad, dm, saved + o.fc_gelu,
                                    w[MPROJ_W].data, N, 4 * C, C));
    AR_PROF_CALL("mlp.c_proj input + gelu", AR_PROF_BWD, lin_flops(N, 4 * C, C),
                 rc = ar_linear_backward_gelu(dfc, w[FC_B].grad, dm, w[MPROJ_W].data, saved + o.fc, N,
                                              4 * C, C));
    if (rc != AR_OK)
        return rc;
    AR_PROF_CALL("mlp.c_fc weight", AR_PROF_BWD, lin_flops(N, C, 4 * C),
                 ar_linear_backward(NULL, w[FC_W].grad, NULL, dfc, saved + o.ln2, w[FC_W].data, N, C,
                                    4 * C));
    /* dres1 = dout + LN2'(dfc Wfc) */
    AR_PROF_CALL("mlp.c_fc input + ln_2", AR_PROF_BWD, lin_flops(N, C, 4 * C),
                 rc = ar_linear_backward_layernorm(dres1, 0, dout, w[LN2_W].grad, w[LN2_B].grad, NULL,
                                                   dfc, w[FC_W].data, saved + o.res1, w[LN2_W].data,
                                                   saved + o.ln2_mean, saved + o.ln2_rstd, N, C, 4 * C));
    if (rc != AR_OK)
        return rc;

    /* res1 = x + dropout(attproj) */
    const float *da = dres1;
    if (dropping) {
        memset(dbranch, 0, n * sizeof(float));
        ar_dropout_backward(dbranch, dres1, n, s->dropout, drop_seed(p, l->unit, DROP_ATTN));
        da = dbranch;
    }
    AR_PROF_CALL("attn.c_proj weight", AR_PROF_BWD, lin_flops(N, C, C),
                 ar_linear_backward(NULL, w[APROJ_W].grad, w[APROJ_B].grad, da, saved + o.atty,
                                    w[APROJ_W].data, N, C, C));
    AR_PROF_CALL("attn.c_proj input", AR_PROF_BWD, lin_flops(N, C, C),
                 ar_linear_backward_input(datty, 0, da, w[APROJ_W].data, N, C, C));
    AR_PROF_CALL("attention", AR_PROF_BWD, att_flops,
                 rc = ar_attention_backward_ex(dqkv, 0, datt_scratch, datty, saved + o.qkv,
                                               saved + o.att, B, T, NH, HS));
    if (rc != AR_OK)
        return rc;
    AR_PROF_CALL("attn.c_attn weight", AR_PROF_BWD, lin_flops(N, C, 3 * C),
                 ar_linear_backward(NULL, w[ATTN_W].grad, w[ATTN_B].grad, dqkv, saved + o.ln1,
                                    w[ATTN_W].data, N, C, 3 * C));
    /* din += dres1 + LN1'(dqkv Wqkv) */
    AR_PROF_CALL("attn.c_attn input + ln_1", AR_PROF_BWD, lin_flops(N, C, 3 * C),
                 rc = ar_linear_backward_layernorm(din, 1, dres1, w[LN1_W].grad, w[LN1_B].grad, dln1,
                                                   dqkv, w[ATTN_W].data, x, w[LN1_W].data,
                                                   saved + o.ln1_mean, saved + o.ln1_rstd, N, C, 3 * C));
    return rc;
}

/* ---- head: x (B,T,C) -> logits (B,T,V) = ln_f(x) wte^T ----------------- */

static size_t head_saved(const ar_layer *l, int B, int T)
{
    size_t BT = (size_t)B * T;
    return BT * l->spec->vocab_size + BT * l->spec->n_embd + 2 * BT;
}

static size_t head_scratch(const ar_layer *l, int B, int T)
{
    return (size_t)B * T * l->spec->n_embd;
}

static int head_forward(ar_layer *l, const ar_pass *p, const void *in, float *saved)
{
    int C = l->spec->n_embd, V = l->spec->vocab_size, N = p->B * p->T;
    float *logits = saved, *ln = logits + (size_t)N * V, *mean = ln + (size_t)N * C, *rstd = mean + N;
    if (!l->tied || !l->tied->data)
        return ar_fail(AR_EINTERNAL, "head: tied embedding not bound");
    AR_PROF_CALL("ln_f", AR_PROF_FWD, 0,
                 ar_layernorm_forward(ln, mean, rstd, in, l->params[0].data, l->params[1].data, N, C));
    AR_PROF_CALL("head logits", AR_PROF_FWD, lin_flops(N, C, V),
                 ar_linear_forward(logits, ln, l->tied->data, NULL, N, C, V));
    return AR_OK;
}

static int head_backward(ar_layer *l, const ar_pass *p, const void *in, const float *saved,
                         const float *dout, float *din)
{
    int C = l->spec->n_embd, V = l->spec->vocab_size, N = p->B * p->T;
    const float *ln = saved + (size_t)N * V, *mean = ln + (size_t)N * C, *rstd = mean + N;
    float *dln = p->scratch;
    memset(dln, 0, (size_t)N * C * sizeof(float));
    AR_PROF_CALL("head logits", AR_PROF_BWD, 2 * lin_flops(N, C, V),
                 ar_linear_backward(dln, l->tied_grad, NULL, dout, ln, l->tied->data, N, C, V));
    AR_PROF_CALL("ln_f", AR_PROF_BWD, 0,
                 ar_layernorm_backward(din, l->params[0].grad, l->params[1].grad, dln, in,
                                       l->params[0].data, mean, rstd, N, C));
    return AR_OK;
}

static const ar_layer_vt embed_vt = {"embedding", embed_saved, embed_scratch, embed_forward,
                                     embed_backward, NULL};
static const ar_layer_vt block_vt = {"block", block_saved, block_scratch, block_forward,
                                     block_backward, NULL};
static const ar_layer_vt head_vt = {"head", head_saved, head_scratch, head_forward, head_backward,
                                    NULL};

int ar_gpt_layer_create(const ar_model_spec *s, int unit, ar_layer **out)
{
    ar_layer *l = ar_calloc(1, sizeof *l);
    if (!l)
        return AR_ENOMEM;
    l->spec = s;
    l->unit = unit;
    long C = s->n_embd;
    const float std = 0.02f;
    /* GPT-2 scales the projections into the residual stream by 1/sqrt(2 n_layer) */
    const float proj_std = std / sqrtf(2.0f * (float)s->n_layer);
    if (unit == 0) {
        l->vt = &embed_vt;
        ar_param_declare(&l->params[0], "wte.weight", s->vocab_size, C, 1, AR_INIT_NORMAL, std);
        ar_param_declare(&l->params[1], "wpe.weight", s->block_size, C, 1, AR_INIT_NORMAL, std);
        l->nparams = 2;
        l->in_floats_per_row = 0;
        l->out_floats_per_row = (size_t)C;
    } else if (unit <= s->n_layer) {
        l->vt = &block_vt;
        char name[64];
        int i = unit - 1;
#define DECL(idx, suffix, rows, cols, decay, init, scale)                                          \
    snprintf(name, sizeof name, "h.%d.%s", i, suffix);                                             \
    ar_param_declare(&l->params[idx], name, rows, cols, decay, init, scale)
        DECL(LN1_W, "ln_1.weight", C, 0, 0, AR_INIT_ONES, 0);
        DECL(LN1_B, "ln_1.bias", C, 0, 0, AR_INIT_ZEROS, 0);
        DECL(ATTN_W, "attn.c_attn.weight", 3 * C, C, 1, AR_INIT_NORMAL, std);
        DECL(ATTN_B, "attn.c_attn.bias", 3 * C, 0, 0, AR_INIT_ZEROS, 0);
        DECL(APROJ_W, "attn.c_proj.weight", C, C, 1, AR_INIT_NORMAL, proj_std);
        DECL(APROJ_B, "attn.c_proj.bias", C, 0, 0, AR_INIT_ZEROS, 0);
        DECL(LN2_W, "ln_2.weight", C, 0, 0, AR_INIT_ONES, 0);
        DECL(LN2_B, "ln_2.bias", C, 0, 0, AR_INIT_ZEROS, 0);
        DECL(FC_W, "mlp.c_fc.weight", 4 * C, C, 1, AR_INIT_NORMAL, std);
        DECL(FC_B, "mlp.c_fc.bias", 4 * C, 0, 0, AR_INIT_ZEROS, 0);
        DECL(MPROJ_W, "mlp.c_proj.weight", C, 4 * C, 1, AR_INIT_NORMAL, proj_std);
        DECL(MPROJ_B, "mlp.c_proj.bias", C, 0, 0, AR_INIT_ZEROS, 0);
#undef DECL
        l->nparams = 12;
        l->in_floats_per_row = l->out_floats_per_row = (size_t)C;
    } else {
        l->vt = &head_vt;
        ar_param_declare(&l->params[0], "ln_f.weight", C, 0, 0, AR_INIT_ONES, 0);
        ar_param_declare(&l->params[1], "ln_f.bias", C, 0, 0, AR_INIT_ZEROS, 0);
        l->nparams = 2;
        l->tied_name = "wte.weight";
        l->in_floats_per_row = (size_t)C;
        l->out_floats_per_row = (size_t)s->vocab_size;
    }
    *out = l;
    return AR_OK;
}
