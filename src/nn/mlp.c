/* MLP units: a linear layer followed by its activation (none after the last,
 * which produces the logits). */
#include "core/core.h"
#include "core/profile.h"
#include "nn/layer.h"
#include "ops/ops.h"

#include <stdio.h>
#include <string.h>

static int unit_in(const ar_model_spec *s, int unit)
{
    return unit == 0 ? s->inputs : s->hidden[unit - 1];
}

static int unit_out(const ar_model_spec *s, int unit)
{
    return unit < s->n_hidden ? s->hidden[unit] : s->classes;
}

static int is_last(const ar_layer *l)
{
    return l->unit == l->spec->n_hidden;
}

/* saved: out (B,OUT), then pre-activation (B,OUT) for hidden layers */
static size_t mlp_saved(const ar_layer *l, int B, int T)
{
    size_t n = (size_t)B * unit_out(l->spec, l->unit);
    return is_last(l) ? n : 2 * n;
}

static size_t mlp_scratch(const ar_layer *l, int B, int T)
{
    return 2 * (size_t)B * unit_out(l->spec, l->unit);
}

static int mlp_forward(ar_layer *l, const ar_pass *p, const void *in, float *saved)
{
    const ar_model_spec *s = l->spec;
    int IN = unit_in(s, l->unit), OUT = unit_out(s, l->unit), B = p->B;
    long n = (long)B * OUT;
    double flops = 2.0 * B * IN * OUT;
    if (is_last(l)) {
        AR_PROF_CALL("linear", AR_PROF_FWD, flops,
                     ar_linear_forward(saved, in, l->params[0].data, l->params[1].data, B, IN, OUT));
        return AR_OK;
    }
    float *pre = saved + n;
    AR_PROF_CALL("linear", AR_PROF_FWD, flops,
                 ar_linear_forward(pre, in, l->params[0].data, l->params[1].data, B, IN, OUT));
    if (s->activation == AR_ACT_GELU)
        AR_PROF_CALL("gelu", AR_PROF_FWD, 0, ar_gelu_forward(saved, pre, n));
    else
        AR_PROF_CALL("relu", AR_PROF_FWD, 0, ar_relu_forward(saved, pre, n));
    if (p->train && s->dropout > 0.0f)
        ar_dropout_forward(saved, saved, n, s->dropout, ar_hash3(p->drop_seed, l->unit, 1));
    return AR_OK;
}

static int mlp_backward(ar_layer *l, const ar_pass *p, const void *in, const float *saved,
                        const float *dout, float *din)
{
    const ar_model_spec *s = l->spec;
    int IN = unit_in(s, l->unit), OUT = unit_out(s, l->unit), B = p->B;
    long n = (long)B * OUT;
    const float *dpre = dout;
    if (!is_last(l)) {
        float *dact = p->scratch, *dpre_buf = p->scratch + n;
        memset(p->scratch, 0, 2 * n * sizeof(float));
        const float *d = dout;
        if (p->train && s->dropout > 0.0f) {
            ar_dropout_backward(dact, dout, n, s->dropout, ar_hash3(p->drop_seed, l->unit, 1));
            d = dact;
        }
        /* both derivatives are read from the pre-activation (for ReLU,
         * pre > 0 is the same test as out > 0, and it is not touched by dropout) */
        if (s->activation == AR_ACT_GELU)
            AR_PROF_CALL("gelu", AR_PROF_BWD, 0, ar_gelu_backward(dpre_buf, saved + n, d, n));
        else
            AR_PROF_CALL("relu", AR_PROF_BWD, 0, ar_relu_backward(dpre_buf, saved + n, d, n));
        dpre = dpre_buf;
    }
    AR_PROF_CALL("linear", AR_PROF_BWD, (din ? 4.0 : 2.0) * B * IN * OUT,
                 ar_linear_backward(din, l->params[0].grad, l->params[1].grad, dpre, in,
                                    l->params[0].data, B, IN, OUT));
    return AR_OK;
}

static const ar_layer_vt mlp_vt = {"linear", mlp_saved, mlp_scratch, mlp_forward, mlp_backward,
                                   NULL};

int ar_mlp_layer_create(const ar_model_spec *s, int unit, ar_layer **out)
{
    ar_layer *l = ar_calloc(1, sizeof *l);
    if (!l)
        return AR_ENOMEM;
    l->vt = &mlp_vt;
    l->spec = s;
    l->unit = unit;
    int IN = unit_in(s, unit), OUT = unit_out(s, unit);
    char name[64];
    snprintf(name, sizeof name, "fc.%d.weight", unit);
    ar_param_declare(&l->params[0], name, OUT, IN, 1, AR_INIT_UNIFORM_FANIN, (float)IN);
    snprintf(name, sizeof name, "fc.%d.bias", unit);
    ar_param_declare(&l->params[1], name, OUT, 0, 0, AR_INIT_UNIFORM_FANIN, (float)IN);
    l->nparams = 2;
    l->in_floats_per_row = (size_t)IN;
    l->out_floats_per_row = (size_t)OUT;
    *out = l;
    return AR_OK;
}
