/* The leader's side of an MLP's pair of linear layers split over a
 * tensor-parallel group (see tp_block.h and nn/tp.h). */
#include "core/core.h"
#include "ops/ops.h"
#include "train/tp_block.h"
#include "train/tp_group.h"

#include <stdio.h>
#include <string.h>

/* how long the leader waits for a rank before calling it lost */
#define RANK_TIMEOUT_S 300.0

typedef struct {
    ar_layer base;
    ar_link **ranks;
    int nranks;
    int column; /* 1: the pair's first layer; 0: its second */
} tp_linear;

static int width_in(const ar_model_spec *s, int unit)
{
    return unit == 0 ? s->inputs : s->hidden[unit - 1];
}

static int width_out(const ar_model_spec *s, int unit)
{
    return unit < s->n_hidden ? s->hidden[unit] : s->classes;
}

static int has_activation(const ar_layer *l)
{
    return l->unit < l->spec->n_hidden;
}

/* first: out (B,H) zeros. second: out (B,OUT), then pre-activation when it has one */
static size_t saved_floats(const ar_layer *l, int B, int T)
{
    size_t n = (size_t)B * width_out(l->spec, l->unit);
    const tp_linear *t = (const tp_linear *)l;
    return !t->column && has_activation(l) ? 2 * n : n;
}

/* first: the ranks' input gradients when the stage wants none (its first
 * layer); second: the gradient before the activation */
static size_t scratch_floats(const ar_layer *l, int B, int T)
{
    const tp_linear *t = (const tp_linear *)l;
    return (size_t)B * (t->column ? width_in(l->spec, l->unit) : width_out(l->spec, l->unit));
}

static int forward(ar_layer *l, const ar_pass *p, const void *in, float *saved)
{
    tp_linear *t = (tp_linear *)l;
    const ar_model_spec *s = l->spec;
    int B = p->B, OUT = width_out(s, l->unit);
    size_t n = (size_t)B * OUT;
    if (t->column) {
        memset(saved, 0, n * sizeof(float));
        return ar_tp_group_scatter(t->ranks, t->nranks, AR_TP_MLP_FWD, l->unit, p->slot, B, 1,
                                   width_in(s, l->unit), in);
    }
    /* the pair's first unit scattered; the partial outputs are summed here */
    float *pre = has_activation(l) ? saved + n : saved;
    memset(pre, 0, n * sizeof(float));
    int rc = ar_tp_group_gather_sum(t->ranks, t->nranks, n, pre, RANK_TIMEOUT_S);
    if (rc != AR_OK)
        return rc;
    const float *b = l->params[0].data;
    for (int i = 0; i < B; i++)
        for (int j = 0; j < OUT; j++)
            pre[(size_t)i * OUT + j] += b[j];
    if (has_activation(l)) {
        if (s->activation == AR_ACT_GELU)
            ar_gelu_forward(saved, pre, (long)n);
        else
            ar_relu_forward(saved, pre, (long)n);
    }
    return AR_OK;
}

static int backward(ar_layer *l, const ar_pass *p, const void *in, const float *saved, const float *dout,
                    float *din)
{
    tp_linear *t = (tp_linear *)l;
    const ar_model_spec *s = l->spec;
    int B = p->B, OUT = width_out(s, l->unit);
    size_t n = (size_t)B * OUT;
    if (t->column) {
        /* the second layer sent the ranks its gradient: their input
         * gradients add up here (and are read and dropped when the stage
         * wants none: the model's first layer) */
        size_t nin = (size_t)B * width_in(s, l->unit);
        if (!din) {
            if (p->scratch_floats < nin)
                return ar_fail(AR_EINTERNAL, "a split linear layer needs %zu scratch floats", nin);
            din = p->scratch;
            memset(din, 0, nin * sizeof(float));
        }
        return ar_tp_group_gather_sum(t->ranks, t->nranks, nin, din, RANK_TIMEOUT_S);
    }
    const float *dpre = dout;
    if (has_activation(l)) {
        if (p->scratch_floats < n)
            return ar_fail(AR_EINTERNAL, "a split linear layer needs %zu scratch floats", n);
        float *d = p->scratch;
        memset(d, 0, n * sizeof(float));
        if (s->activation == AR_ACT_GELU)
            ar_gelu_backward(d, saved + n, dout, (long)n);
        else
            ar_relu_backward(d, saved + n, dout, (long)n);
        dpre = d;
    }
    float *db = l->params[0].grad;
    for (int i = 0; i < B; i++)
        for (int j = 0; j < OUT; j++)
            db[j] += dpre[(size_t)i * OUT + j];
    /* the ranks answer with their input gradients: the first layer sums them.
     * (din, the gradient of the hidden units, stays with the ranks) */
    return ar_tp_group_scatter(t->ranks, t->nranks, AR_TP_MLP_BWD, l->unit - 1, p->slot, B, 1, OUT, dpre);
}

static const ar_layer_vt tp_linear_vt = {"tensor-parallel linear", saved_floats, scratch_floats, forward,
                                         backward, NULL};

int ar_tp_mlp_create(const ar_model_spec *spec, int unit, int column, ar_link **ranks, int nranks,
                     ar_layer **out)
{
    *out = NULL;
    if (spec->type != AR_MODEL_MLP || unit < 0 || unit > spec->n_hidden || (column && unit == spec->n_hidden) ||
        (!column && unit == 0))
        return ar_fail(AR_EINVAL, "linear layer %d cannot be the %s half of a split pair", unit,
                       column ? "first" : "second");
    if (nranks < 1)
        return ar_fail(AR_EINVAL, "a tensor-parallel layer needs at least one rank");
    tp_linear *t = ar_calloc(1, sizeof *t);
    if (!t)
        return AR_ENOMEM;
    ar_layer *l = &t->base;
    l->vt = &tp_linear_vt;
    l->spec = spec;
    l->unit = unit;
    l->tp_shard = column;
    t->ranks = ranks;
    t->nranks = nranks;
    t->column = column;
    if (!column) {
        /* the second layer keeps its bias, with the whole model's name */
        char name[64];
        snprintf(name, sizeof name, "fc.%d.bias", unit);
        ar_param_declare(&l->params[0], name, width_out(spec, unit), 0, 0, AR_INIT_UNIFORM_FANIN,
                         (float)width_in(spec, unit));
        l->nparams = 1;
    }
    l->in_floats_per_row = (size_t)width_in(spec, unit);
    l->out_floats_per_row = (size_t)width_out(spec, unit);
    *out = l;
    return AR_OK;
}
