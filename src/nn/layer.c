/* Layer construction dispatch and parameter declaration. */
#include "nn/layer.h"

#include "core/core.h"

#include <stdio.h>
#include <string.h>

void ar_param_declare(ar_param *p, const char *name, int64_t rows, int64_t cols, int decay,
                      int init, float init_scale)
{
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = cols > 0 ? 2 : 1;
    p->shape[0] = rows;
    p->shape[1] = cols > 0 ? cols : 0;
    p->numel = (long)(rows * (cols > 0 ? cols : 1));
    p->decay = decay;
    p->init = init;
    p->init_scale = init_scale;
}

int ar_layer_create(const ar_model_spec *spec, int unit, ar_layer **out)
{
    *out = NULL;
    if (unit < 0 || unit >= ar_spec_units(spec))
        return ar_fail(AR_EINVAL, "layer %d out of range: the model has %d layers", unit,
                       ar_spec_units(spec));
    switch (spec->type) {
    case AR_MODEL_GPT: return ar_gpt_layer_create(spec, unit, out);
    case AR_MODEL_MLP: return ar_mlp_layer_create(spec, unit, out);
    default: return ar_fail(AR_EINVAL, "unknown model type %d", spec->type);
    }
}

void ar_layer_destroy(ar_layer *l)
{
    if (l && l->vt->destroy)
        l->vt->destroy(l);
    else
        ar_free(l);
}
