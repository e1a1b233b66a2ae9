/* The leader's tensor-parallel GPT block (see tp_block.h). */
#include "train/tp_block.h"

#include "core/core.h"
#include "ops/ops.h"
#include "train/tp_group.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* how long the leader waits for a rank before calling it lost */
#define RANK_TIMEOUT_S 300.0

enum { P_LN1_W, P_LN1_B, P_APROJ_B, P_LN2_W, P_LN2_B, P_MPROJ_B };

/* dropout sites, as in gpt.c, so a group draws the same masks as one device */
enum { DROP_ATTN = 2, DROP_MLP = 3 };

typedef struct {
    ar_layer base;
    ar_link **ranks;
    int nranks;
} tp_block;

/* saved: out | ln1 | m1 | r1 | res1 | ln2 | m2 | r2 (N = B*T rows) */
static size_t saved_floats(const ar_layer *l, int B, int T)
{
    size_t N = (size_t)B * T, C = l->spec->n_embd;
    return 4 * N * C + 4 * N;
}

static size_t scratch_floats(const ar_layer *l, int B, int T)
{
    return 2 * (size_t)B * T * l->spec->n_embd;
}

static void add_bias(float *x, const float *b, int N, int C)
{
    for (int i = 0; i < N; i++)
        for (int j = 0; j < C; j++)
            x[(size_t)i * C + j] += b[j];
}

static void bias_grad(float *db, const float *d, int N, int C)
{
    for (int i = 0; i < N; i++)
        for (int j = 0; j < C; j++)
            db[j] += d[(size_t)i * C + j];
}

/* Send x to every rank for op, then sum the partial outputs into out. */
static int group_call(tp_block *t, int op, const ar_pass *p, const float *x, float *out)
{
    int C = t->base.spec->n_embd, block = t->base.unit - 1;
    size_t n = (size_t)p->B * p->T * C;
    memset(out, 0, n * sizeof(float));
    int rc = ar_tp_group_scatter(t->ranks, t->nranks, op, block, p->slot, p->B, p->T, C, x);
    if (rc == AR_OK)
        rc = ar_tp_group_gather_sum(t->ranks, t->nranks, n, out, RANK_TIMEOUT_S);
    return rc;
}

static int forward(ar_layer *l, const ar_pass *p, const void *in, float *saved)
{
    tp_block *t = (tp_block *)l;
    const ar_model_spec *s = l->spec;
    int C = s->n_embd, N = p->B * p->T;
    size_t NC = (size_t)N * C;
    const float *x = in;
    float *out = saved, *ln1 = out + NC, *res1 = ln1 + NC, *ln2 = res1 + NC, *m1 = ln2 + NC,
          *r1 = m1 + N, *m2 = r1 + N, *r2 = m2 + N;
    ar_param *w = l->params;
    int rc;
    ar_layernorm_forward(ln1, m1, r1, x, w[P_LN1_W].data, w[P_LN1_B].data, N, C);
    /* res1 holds the attention sum first, then x + dropout(it) */
    if ((rc = group_call(t, AR_TP_ATTN_FWD, p, ln1, res1)) != AR_OK)
        return rc;
    add_bias(res1, w[P_APROJ_B].data, N, C);
    if (p->train && s->dropout > 0)
        ar_dropout_forward(res1, res1, (long)NC, s->dropout, ar_hash3(p->drop_seed, (uint64_t)l->unit, DROP_ATTN));
    ar_residual_forward(res1, x, res1, (long)NC);
    ar_layernorm_forward(ln2, m2, r2, res1, w[P_LN2_W].data, w[P_LN2_B].data, N, C);
    if ((rc = group_call(t, AR_TP_MLP_FWD, p, ln2, out)) != AR_OK)
        return rc;
    add_bias(out, w[P_MPROJ_B].data, N, C);
    if (p->train && s->dropout > 0)
        ar_dropout_forward(out, out, (long)NC, s->dropout, ar_hash3(p->drop_seed, (uint64_t)l->unit, DROP_MLP));
    ar_residual_forward(out, res1, out, (long)NC);
    return AR_OK;
}

static int backward(ar_layer *l, const ar_pass *p, const void *in, const float *saved,
                    const float *dout, float *din)
{
    tp_block *t = (tp_block *)l;
    const ar_model_spec *s = l->spec;
    int C = s->n_embd, N = p->B * p->T;
    size_t NC = (size_t)N * C;
    const float *x = in;
    const float *ln1 = saved + NC, *res1 = ln1 + NC, *ln2 = res1 + NC, *m1 = ln2 + NC, *r1 = m1 + N,
                *m2 = r1 + N, *r2 = m2 + N;
    if (p->scratch_floats < 2 * NC)
        return ar_fail(AR_EINTERNAL, "tensor-parallel block needs %zu scratch floats", 2 * NC);
    float *dres1 = p->scratch, *dbranch = dres1 + NC;
    ar_param *w = l->params;
    int rc;
    /* out = res1 + dropout(mlp + b) */
    memcpy(dres1, dout, NC * sizeof(float));
    memset(dbranch, 0, NC * sizeof(float));
    if (p->train && s->dropout > 0)
        ar_dropout_backward(dbranch, dout, (long)NC, s->dropout, ar_hash3(p->drop_seed, (uint64_t)l->unit, DROP_MLP));
    else
        memcpy(dbranch, dout, NC * sizeof(float));
    bias_grad(w[P_MPROJ_B].grad, dbranch, N, C);
    /* the ranks' partial dln2 are summed into dbranch once it has been sent */
    if ((rc = ar_tp_group_scatter(t->ranks, t->nranks, AR_TP_MLP_BWD, l->unit - 1, p->slot, p->B, p->T,
                                  C, dbranch)) != AR_OK)
        return rc;
    memset(dbranch, 0, NC * sizeof(float));
    if ((rc = ar_tp_group_gather_sum(t->ranks, t->nranks, NC, dbranch, RANK_TIMEOUT_S)) != AR_OK)
        return rc;
    ar_layernorm_backward(dres1, w[P_LN2_W].grad, w[P_LN2_B].grad, dbranch, res1, w[P_LN2_W].data, m2,
                          r2, N, C);
    /* res1 = x + dropout(attn + b) */
    for (size_t i = 0; i < NC; i++)
        din[i] += dres1[i];
    memset(dbranch, 0, NC * sizeof(float));
    if (p->train && s->dropout > 0)
        ar_dropout_backward(dbranch, dres1, (long)NC, s->dropout, ar_hash3(p->drop_seed, (uint64_t)l->unit, DROP_ATTN));
    else
        memcpy(dbranch, dres1, NC * sizeof(float));
    bias_grad(w[P_APROJ_B].grad, dbranch, N, C);
    if ((rc = ar_tp_group_scatter(t->ranks, t->nranks, AR_TP_ATTN_BWD, l->unit - 1, p->slot, p->B, p->T,
                                  C, dbranch)) != AR_OK)
        return rc;
    memset(dres1, 0, NC * sizeof(float));
    if ((rc = ar_tp_group_gather_sum(t->ranks, t->nranks, NC, dres1, RANK_TIMEOUT_S)) != AR_OK)
        return rc;
    ar_layernorm_backward(din, w[P_LN1_W].grad, w[P_LN1_B].grad, dres1, x, w[P_LN1_W].data, m1, r1, N, C);
    return AR_OK;
}

static const ar_layer_vt tp_block_vt = {"tensor-parallel block", saved_floats, scratch_floats, forward,
                                        backward, NULL};

int ar_tp_block_create(const ar_model_spec *spec, int unit, ar_link **ranks, int nranks, ar_layer **out)
{
    *out = NULL;
    if (spec->type != AR_MODEL_GPT || unit < 1 || unit > spec->n_layer)
        return ar_fail(AR_EINVAL, "unit %d is not a GPT block", unit);
    if (nranks < 1)
        return ar_fail(AR_EINVAL, "a tensor-parallel block needs at least one rank");
    tp_block *t = ar_calloc(1, sizeof *t);
    if (!t)
        return AR_ENOMEM;
    ar_layer *l = &t->base;
    l->vt = &tp_block_vt;
    l->spec = spec;
    l->unit = unit;
    l->tp_shard = 1;
    long C = spec->n_embd;
    char name[64];
    int i = unit - 1;
#define DECL(idx, suffix, init)                                                                     \
    snprintf(name, sizeof name, "h.%d.%s", i, suffix);                                             \
    ar_param_declare(&l->params[idx], name, C, 0, 0, init, 0)
    DECL(P_LN1_W, "ln_1.weight", AR_INIT_ONES);
    DECL(P_LN1_B, "ln_1.bias", AR_INIT_ZEROS);
    DECL(P_APROJ_B, "attn.c_proj.bias", AR_INIT_ZEROS);
    DECL(P_LN2_W, "ln_2.weight", AR_INIT_ONES);
    DECL(P_LN2_B, "ln_2.bias", AR_INIT_ZEROS);
    DECL(P_MPROJ_B, "mlp.c_proj.bias", AR_INIT_ZEROS);
#undef DECL
    l->nparams = 6;
    l->in_floats_per_row = l->out_floats_per_row = (size_t)C;
    t->ranks = ranks;
    t->nranks = nranks;
    *out = l;
    return AR_OK;
}
