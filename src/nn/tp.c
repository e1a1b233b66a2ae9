/* Tensor-parallel shards of a GPT block (see tp.h). */
#include "nn/tp.h"

#include "core/core.h"
#include "ops/ops.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

int ar_tp_split(int n, int parts, const double *weights, ar_range *out)
{
    if (parts < 1 || n < parts)
        return ar_fail(AR_EINVAL, "cannot split %d items into %d non-empty parts", n, parts);
    double total = 0;
    for (int i = 0; i < parts; i++) {
        double w = weights ? weights[i] : 1.0;
        if (!(w > 0))
            return ar_fail(AR_EINVAL, "split weight %d is not positive", i);
        total += w;
    }
    /* every part gets one item, the rest goes by largest remainder */
    int count[64], given = 0;
    double rem[64];
    if (parts > 64)
        return ar_fail(AR_EINVAL, "at most 64 parts");
    for (int i = 0; i < parts; i++) {
        double share = (double)(n - parts) * (weights ? weights[i] : 1.0) / total;
        count[i] = 1 + (int)floor(share);
        rem[i] = share - floor(share);
        given += count[i];
    }
    while (given < n) {
        int best = 0;
        for (int i = 1; i < parts; i++)
            if (rem[i] > rem[best])
                best = i;
        count[best]++;
        rem[best] = -1;
        given++;
    }
    int at = 0;
    for (int i = 0; i < parts; i++) {
        out[i].begin = at;
        at += count[i];
        out[i].end = at;
    }
    return AR_OK;
}

static int range_len(ar_range r)
{
    return r.end - r.begin;
}

int ar_block_shard_init(ar_block_shard *s, const ar_model_spec *spec, int layer, ar_range heads,
                        ar_range hidden)
{
    memset(s, 0, sizeof *s);
    int C = spec->n_embd, NH = spec->n_head, HS = C / NH;
    if (spec->type != AR_MODEL_GPT || layer < 0 || layer >= spec->n_layer)
        return ar_fail(AR_EINVAL, "no block %d in this model", layer);
    if (heads.begin < 0 || heads.end > NH || heads.begin >= heads.end)
        return ar_fail(AR_EINVAL, "heads %d-%d outside 0-%d", heads.begin, heads.end - 1, NH - 1);
    if (hidden.begin < 0 || hidden.end > 4 * C || hidden.begin >= hidden.end)
        return ar_fail(AR_EINVAL, "hidden units %d-%d outside 0-%d", hidden.begin, hidden.end - 1,
                       4 * C - 1);
    s->spec = spec;
    s->layer = layer;
    s->heads = heads;
    s->hidden = hidden;
    s->in = s->out = C;
    s->activation = AR_ACT_GELU;
    long Cr = (long)range_len(heads) * HS, Hr = range_len(hidden);
    const float std = 0.02f, proj_std = std / sqrtf(2.0f * (float)spec->n_layer);
    char name[64];
#define DECL(idx, suffix, rows, cols, decay, init, scale)                                          \
    snprintf(name, sizeof name, "h.%d.%s", layer, suffix);                                         \
    ar_param_declare(&s->params[idx], name, rows, cols, decay, init, scale)
    DECL(AR_SHARD_QKV_W, "attn.c_attn.weight", 3 * Cr, C, 1, AR_INIT_NORMAL, std);
    DECL(AR_SHARD_QKV_B, "attn.c_attn.bias", 3 * Cr, 0, 0, AR_INIT_ZEROS, 0);
    DECL(AR_SHARD_APROJ_W, "attn.c_proj.weight", C, Cr, 1, AR_INIT_NORMAL, proj_std);
    DECL(AR_SHARD_FC_W, "mlp.c_fc.weight", Hr, C, 1, AR_INIT_NORMAL, std);
    DECL(AR_SHARD_FC_B, "mlp.c_fc.bias", Hr, 0, 0, AR_INIT_ZEROS, 0);
    DECL(AR_SHARD_MPROJ_W, "mlp.c_proj.weight", C, Hr, 1, AR_INIT_NORMAL, proj_std);
#undef DECL
    return AR_OK;
}

int ar_mlp_shard_init(ar_block_shard *s, const ar_model_spec *spec, int unit, ar_range hidden)
{
    memset(s, 0, sizeof *s);
    if (spec->type != AR_MODEL_MLP || unit < 0 || unit + 1 > spec->n_hidden)
        return ar_fail(AR_EINVAL, "linear layers %d and %d are not a hidden layer and the next", unit, unit + 1);
    int IN = unit == 0 ? spec->inputs : spec->hidden[unit - 1], H = spec->hidden[unit];
    int OUT = unit + 1 < spec->n_hidden ? spec->hidden[unit + 1] : spec->classes;
    if (hidden.begin < 0 || hidden.end > H || hidden.begin >= hidden.end)
        return ar_fail(AR_EINVAL, "hidden units %d-%d outside 0-%d", hidden.begin, hidden.end - 1, H - 1);
    s->spec = spec;
    s->layer = unit;
    s->hidden = hidden;
    s->first_param = AR_SHARD_FC_W;
    s->in = IN;
    s->out = OUT;
    s->activation = spec->activation;
    long Hr = range_len(hidden);
    char name[64];
    /* as mlp.c declares them: the slices keep the whole tensors' names */
    snprintf(name, sizeof name, "fc.%d.weight", unit);
    ar_param_declare(&s->params[AR_SHARD_FC_W], name, Hr, IN, 1, AR_INIT_UNIFORM_FANIN, (float)IN);
    snprintf(name, sizeof name, "fc.%d.bias", unit);
    ar_param_declare(&s->params[AR_SHARD_FC_B], name, Hr, 0, 0, AR_INIT_UNIFORM_FANIN, (float)IN);
    snprintf(name, sizeof name, "fc.%d.weight", unit + 1);
    ar_param_declare(&s->params[AR_SHARD_MPROJ_W], name, OUT, Hr, 1, AR_INIT_UNIFORM_FANIN, (float)H);
    return AR_OK;
}

static float *buffer_of(const ar_param *p, int which)
{
    switch (which) {
    case 0: return p->data;
    case 1: return p->grad;
    case 2: return p->m;
    default: return p->v;
    }
}

/* The slice map, used in both directions: rows of a (rows, cols) matrix,
 * or a column block of every row. */
static void copy_rows(float *dst, const float *src, long cols, long nrows, int to_full, long full_row0,
                      long shard_row0)
{
    for (long r = 0; r < nrows; r++) {
        const float *from = to_full ? src + (shard_row0 + r) * cols : src + (full_row0 + r) * cols;
        float *to = to_full ? dst + (full_row0 + r) * cols : dst + (shard_row0 + r) * cols;
        memcpy(to, from, (size_t)cols * sizeof(float));
    }
}

static void copy_cols(float *dst, const float *src, long rows, long full_cols, long col0, long ncols,
                      int to_full)
{
    for (long r = 0; r < rows; r++) {
        if (to_full)
            memcpy(dst + r * full_cols + col0, src + r * ncols, (size_t)ncols * sizeof(float));
        else
            memcpy(dst + r * ncols, src + r * full_cols + col0, (size_t)ncols * sizeof(float));
    }
}

/* fc weight rows, bias slice, projection columns: the MLP half of a GPT
 * block, and all of an MLP shard */
static void transfer_mlp(ar_block_shard *s, ar_param *fc_w, ar_param *fc_b, ar_param *proj_w, int which,
                         int to_full)
{
    long Hr = range_len(s->hidden), u0 = s->hidden.begin, full_hidden = proj_w->shape[1];
    float *sfc = buffer_of(&s->params[AR_SHARD_FC_W], which), *ffc = buffer_of(fc_w, which);
    float *sfb = buffer_of(&s->params[AR_SHARD_FC_B], which), *ffb = buffer_of(fc_b, which);
    float *smp = buffer_of(&s->params[AR_SHARD_MPROJ_W], which), *fmp = buffer_of(proj_w, which);
    if (to_full) {
        copy_rows(ffc, sfc, s->in, Hr, 1, u0, 0);
        memcpy(ffb + u0, sfb, (size_t)Hr * sizeof(float));
        copy_cols(fmp, smp, s->out, full_hidden, u0, Hr, 1);
    } else {
        copy_rows(sfc, ffc, s->in, Hr, 0, u0, 0);
        memcpy(sfb, ffb + u0, (size_t)Hr * sizeof(float));
        copy_cols(smp, fmp, s->out, full_hidden, u0, Hr, 0);
    }
}

/* full block parameter order, as in gpt.c */
enum { F_ATTN_W = 2, F_ATTN_B = 3, F_APROJ_W = 4, F_FC_W = 8, F_FC_B = 9, F_MPROJ_W = 10 };

static void transfer(ar_block_shard *s, ar_layer *full, int which, int to_full)
{
    int C = s->spec->n_embd, HS = C / s->spec->n_head;
    long Cr = (long)range_len(s->heads) * HS;
    long h0 = (long)s->heads.begin * HS;
    for (int part = 0; part < 3; part++) { /* q, k, v */
        float *sw = buffer_of(&s->params[AR_SHARD_QKV_W], which);
        float *fw = buffer_of(&full->params[F_ATTN_W], which);
        float *sb = buffer_of(&s->params[AR_SHARD_QKV_B], which);
        float *fb = buffer_of(&full->params[F_ATTN_B], which);
        if (to_full) {
            copy_rows(fw, sw, C, Cr, 1, part * C + h0, part * Cr);
            memcpy(fb + part * C + h0, sb + part * Cr, (size_t)Cr * sizeof(float));
        } else {
            copy_rows(sw, fw, C, Cr, 0, part * C + h0, part * Cr);
            memcpy(sb + part * Cr, fb + part * C + h0, (size_t)Cr * sizeof(float));
        }
    }
    float *sp = buffer_of(&s->params[AR_SHARD_APROJ_W], which);
    float *fp = buffer_of(&full->params[F_APROJ_W], which);
    if (to_full)
        copy_cols(fp, sp, C, C, h0, Cr, 1);
    else
        copy_cols(sp, fp, C, C, h0, Cr, 0);
    transfer_mlp(s, &full->params[F_FC_W], &full->params[F_FC_B], &full->params[F_MPROJ_W], which, to_full);
}

void ar_mlp_shard_from_full(ar_block_shard *s, const ar_layer *first, const ar_layer *second, int which)
{
    ar_layer *a = (ar_layer *)first, *b = (ar_layer *)second;
    transfer_mlp(s, &a->params[0], &a->params[1], &b->params[0], which, 0);
}

void ar_mlp_shard_to_full(const ar_block_shard *s, ar_layer *first, ar_layer *second, int which)
{
    transfer_mlp((ar_block_shard *)s, &first->params[0], &first->params[1], &second->params[0], which, 1);
}

void ar_block_shard_from_full(ar_block_shard *s, const ar_layer *full, int which)
{
    transfer(s, (ar_layer *)full, which, 0);
}

void ar_block_shard_to_full(const ar_block_shard *s, ar_layer *full, int which)
{
    transfer((ar_block_shard *)s, full, which, 1);
}

/* ---- the arithmetic ------------------------------------------------------ */

static void dims(const ar_block_shard *s, int *C, int *NHr, int *HS, int *Cr, int *Hr)
{
    *Hr = range_len(s->hidden);
    if (s->first_param != 0) { /* an MLP shard: no attention */
        *C = *NHr = *HS = *Cr = 0;
        return;
    }
    *C = s->spec->n_embd;
    *HS = *C / s->spec->n_head;
    *NHr = range_len(s->heads);
    *Cr = *NHr * *HS;
}

/* attention saved: qkv (N,3Cr) | att (B,NHr,T,T) | atty (N,Cr) */
size_t ar_shard_attn_saved(const ar_block_shard *s, int B, int T)
{
    int C, NHr, HS, Cr, Hr;
    dims(s, &C, &NHr, &HS, &Cr, &Hr);
    size_t N = (size_t)B * T;
    return N * 3 * Cr + (size_t)B * NHr * T * T + N * Cr;
}

/* MLP saved: fc (N,Hr) | gelu (N,Hr) */
size_t ar_shard_mlp_saved(const ar_block_shard *s, int B, int T)
{
    return 2 * (size_t)B * T * range_len(s->hidden);
}

size_t ar_shard_scratch(const ar_block_shard *s, int B, int T)
{
    int C, NHr, HS, Cr, Hr;
    dims(s, &C, &NHr, &HS, &Cr, &Hr);
    size_t N = (size_t)B * T;
    size_t attn = N * Cr + N * 3 * Cr + (size_t)B * NHr * T * T;
    size_t mlp = 2 * N * Hr;
    return attn > mlp ? attn : mlp;
}

int ar_shard_attn_forward(ar_block_shard *s, int B, int T, const float *ln, float *saved,
                          float *partial)
{
    int C, NHr, HS, Cr, Hr;
    dims(s, &C, &NHr, &HS, &Cr, &Hr);
    int N = B * T;
    float *qkv = saved, *att = qkv + (size_t)N * 3 * Cr, *atty = att + (size_t)B * NHr * T * T;
    ar_param *p = s->params;
    ar_linear_forward(qkv, ln, p[AR_SHARD_QKV_W].data, p[AR_SHARD_QKV_B].data, N, C, 3 * Cr);
    int rc = ar_attention_forward(atty, att, qkv, B, T, NHr, HS);
    if (rc != AR_OK)
        return rc;
    ar_linear_forward(partial, atty, p[AR_SHARD_APROJ_W].data, NULL, N, Cr, C);
    return AR_OK;
}

int ar_shard_attn_backward(ar_block_shard *s, int B, int T, const float *ln, const float *saved,
                           const float *dpartial, float *dln, float *scratch)
{
    int C, NHr, HS, Cr, Hr;
    dims(s, &C, &NHr, &HS, &Cr, &Hr);
    int N = B * T;
    const float *qkv = saved, *att = qkv + (size_t)N * 3 * Cr,
                *atty = att + (size_t)B * NHr * T * T;
    float *datty = scratch, *dqkv = datty + (size_t)N * Cr, *att_scratch = dqkv + (size_t)N * 3 * Cr;
    memset(datty, 0, (size_t)N * 4 * Cr * sizeof(float));
    ar_param *p = s->params;
    ar_linear_backward(datty, p[AR_SHARD_APROJ_W].grad, NULL, dpartial, atty, p[AR_SHARD_APROJ_W].data,
                       N, Cr, C);
    int rc = ar_attention_backward(dqkv, att_scratch, datty, qkv, att, B, T, NHr, HS);
    if (rc != AR_OK)
        return rc;
    ar_linear_backward(dln, p[AR_SHARD_QKV_W].grad, p[AR_SHARD_QKV_B].grad, dqkv, ln,
                       p[AR_SHARD_QKV_W].data, N, C, 3 * Cr);
    return AR_OK;
}

static void activation_forward(const ar_block_shard *s, float *out, const float *pre, long n)
{
    if (s->activation == AR_ACT_GELU)
        ar_gelu_forward(out, pre, n);
    else
        ar_relu_forward(out, pre, n);
}

static void activation_backward(const ar_block_shard *s, float *dpre, const float *pre, const float *dout,
                                long n)
{
    /* both read the pre-activation (for ReLU, pre > 0 is the test out > 0) */
    if (s->activation == AR_ACT_GELU)
        ar_gelu_backward(dpre, pre, dout, n);
    else
        ar_relu_backward(dpre, pre, dout, n);
}

void ar_shard_mlp_forward(ar_block_shard *s, int B, int T, const float *ln, float *saved,
                          float *partial)
{
    int Hr = range_len(s->hidden), N = B * T;
    float *fc = saved, *g = fc + (size_t)N * Hr;
    ar_param *p = s->params;
    ar_linear_forward(fc, ln, p[AR_SHARD_FC_W].data, p[AR_SHARD_FC_B].data, N, s->in, Hr);
    activation_forward(s, g, fc, (long)N * Hr);
    ar_linear_forward(partial, g, p[AR_SHARD_MPROJ_W].data, NULL, N, Hr, s->out);
}

void ar_shard_mlp_backward(ar_block_shard *s, int B, int T, const float *ln, const float *saved,
                           const float *dpartial, float *dln, float *scratch)
{
    int Hr = range_len(s->hidden), N = B * T;
    const float *fc = saved, *g = fc + (size_t)N * Hr;
    float *dg = scratch, *dfc = dg + (size_t)N * Hr;
    memset(dg, 0, (size_t)N * 2 * Hr * sizeof(float));
    ar_param *p = s->params;
    ar_linear_backward(dg, p[AR_SHARD_MPROJ_W].grad, NULL, dpartial, g, p[AR_SHARD_MPROJ_W].data, N,
                       Hr, s->out);
    activation_backward(s, dfc, fc, dg, (long)N * Hr);
    ar_linear_backward(dln, p[AR_SHARD_FC_W].grad, p[AR_SHARD_FC_B].grad, dfc, ln,
                       p[AR_SHARD_FC_W].data, N, s->in, Hr);
}
