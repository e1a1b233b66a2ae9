/* Stage: parameters, activations and the forward/backward of a unit range. */
#include "train/stage.h"

#include "core/core.h"
#include "core/digest.h"
#include "core/profile.h"
#include "ops/ops.h"
#include "train/tp_block.h"
#include "train/tp_group.h"

#include <math.h>
#include <string.h>

static uint64_t name_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ULL;
    return h;
}

/* Each parameter draws from its own stream keyed by its name, so a model is
 * initialised identically however it is split across stages. */
static void init_param(ar_param *p, uint64_t seed)
{
    ar_rng rng;
    ar_rng_seed(&rng, ar_hash3(seed, name_hash(p->name), 0x1417));
    switch (p->init) {
    case AR_INIT_ZEROS: memset(p->data, 0, p->numel * sizeof(float)); break;
    case AR_INIT_ONES:
        for (long i = 0; i < p->numel; i++)
            p->data[i] = 1.0f;
        break;
    case AR_INIT_NORMAL:
        for (long i = 0; i < p->numel; i++)
            p->data[i] = p->init_scale * ar_rng_normal(&rng);
        break;
    case AR_INIT_UNIFORM_FANIN: {
        /* PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) */
        float bound = 1.0f / sqrtf(p->init_scale);
        for (long i = 0; i < p->numel; i++)
            p->data[i] = bound * (2.0f * ar_rng_uniform(&rng) - 1.0f);
        break;
    }
    }
}

static size_t max_size(size_t a, size_t b)
{
    return a > b ? a : b;
}

int ar_stage_is_first(const ar_stage *s)
{
    return s->first == 0;
}

int ar_stage_is_last(const ar_stage *s)
{
    return s->last == ar_spec_units(&s->spec);
}

size_t ar_stage_in_width(const ar_stage *s)
{
    size_t w = s->layers[0]->in_floats_per_row;
    return w ? w : 1; /* tokens: one int32 per row */
}

size_t ar_stage_out_width(const ar_stage *s)
{
    return s->layers[s->nlayers - 1]->out_floats_per_row;
}

int ar_stage_create(ar_stage *s, const ar_model_spec *spec, int first, int last, int max_B,
                    int nslots, uint64_t seed, const ar_optim_config *optim)
{
    return ar_stage_create_tp(s, spec, first, last, max_B, nslots, seed, optim, NULL, 0);
}

int ar_stage_create_tp(ar_stage *s, const ar_model_spec *spec, int first, int last, int max_B,
                       int nslots, uint64_t seed, const ar_optim_config *optim, ar_link **ranks,
                       int nranks)
{
    memset(s, 0, sizeof *s);
    s->tp_ranks = ranks;
    s->tp_nranks = ranks ? nranks : 0;
    s->spec = *spec;
    int units = ar_spec_units(spec);
    if (first < 0 || last > units || first >= last)
        return ar_fail(AR_EINVAL, "layer range %d-%d is not inside the model's 0-%d", first,
                       last - 1, units - 1);
    if (max_B < 1 || nslots < 1)
        return ar_fail(AR_EINVAL, "micro-batch size and slots must be positive");
    s->first = first;
    s->last = last;
    s->max_B = max_B;
    s->nslots = nslots;
    s->T = spec->type == AR_MODEL_GPT ? spec->block_size : 1;
    s->seed = seed;
    s->optim = *optim;
    int rc;

    s->nlayers = last - first;
    s->layers = ar_calloc((size_t)s->nlayers, sizeof *s->layers);
    if (!s->layers)
        return AR_ENOMEM;
    int nparams = 0;
    for (int i = 0; i < s->nlayers; i++) {
        /* layers keep a pointer to the spec: point them at our copy */
        int unit = first + i;
        if (s->tp_nranks > 0 && spec->type == AR_MODEL_GPT && unit >= 1 && unit <= spec->n_layer)
            rc = ar_tp_block_create(&s->spec, unit, s->tp_ranks, s->tp_nranks, &s->layers[i]);
        else if (s->tp_nranks > 0 && spec->type == AR_MODEL_MLP && (i % 2 == 1 || i + 1 < s->nlayers))
            /* pairs from the stage's first layer; an odd last one stays whole */
            rc = ar_tp_mlp_create(&s->spec, unit, i % 2 == 0, s->tp_ranks, s->tp_nranks, &s->layers[i]);
        else
            rc = ar_layer_create(&s->spec, unit, &s->layers[i]);
        if (rc != AR_OK)
            goto fail;
        nparams += s->layers[i]->nparams;
    }

    /* parameters: one contiguous buffer each for data, grad, m, v */
    s->params = ar_calloc((size_t)(nparams ? nparams : 1), sizeof *s->params);
    if (!s->params) {
        rc = AR_ENOMEM;
        goto fail;
    }
    long total = 0;
    for (int i = 0; i < s->nlayers; i++)
        for (int j = 0; j < s->layers[i]->nparams; j++) {
            s->params[s->nparams++] = &s->layers[i]->params[j];
            total += s->layers[i]->params[j].numel;
        }
    s->param_floats = total;
    s->mem_params = ar_calloc((size_t)total, sizeof(float));
    s->mem_grads = ar_calloc((size_t)total, sizeof(float));
    s->mem_m = ar_calloc((size_t)total, sizeof(float));
    s->mem_v = ar_calloc((size_t)total, sizeof(float));
    if (!s->mem_params || !s->mem_grads || !s->mem_m || !s->mem_v) {
        rc = AR_ENOMEM;
        goto fail;
    }
    long at = 0;
    for (int i = 0; i < s->nparams; i++) {
        ar_param *p = s->params[i];
        p->data = s->mem_params + at;
        p->grad = s->mem_grads + at;
        p->m = s->mem_m + at;
        p->v = s->mem_v + at;
        at += p->numel;
        init_param(p, seed);
    }
    s->adamw_segs = ar_calloc((size_t)(s->nparams ? s->nparams : 1), sizeof *s->adamw_segs);
    if (!s->adamw_segs) {
        rc = AR_ENOMEM;
        goto fail;
    }
    for (int i = 0; i < s->nparams; i++) {
        ar_param *p = s->params[i];
        s->adamw_segs[i] = (ar_adamw_segment){p->data, p->grad, p->m, p->v, p->numel, p->decay};
    }

    /* tied weights (the GPT head reads the embedding's wte) */
    for (int i = 0; i < s->nlayers; i++) {
        ar_layer *l = s->layers[i];
        if (!l->tied_name)
            continue;
        if (s->tied_grads) {
            rc = ar_fail(AR_EINTERNAL, "more than one tied weight in a stage");
            goto fail;
        }
        l->tied = ar_stage_find_param(s, l->tied_name);
        if (!l->tied) {
            /* the owner is unit 0, in an earlier stage: keep a copy here,
             * initialised the same way (each parameter has its own stream) */
            ar_layer *owner;
            if ((rc = ar_layer_create(&s->spec, 0, &owner)) != AR_OK)
                goto fail;
            for (int j = 0; j < owner->nparams; j++)
                if (strcmp(owner->params[j].name, l->tied_name) == 0)
                    s->tied_copy = owner->params[j];
            ar_layer_destroy(owner);
            if (s->tied_copy.numel == 0) {
                rc = ar_fail(AR_EINTERNAL, "no unit 0 parameter named %s", l->tied_name);
                goto fail;
            }
            s->tied_copy.data = ar_calloc((size_t)s->tied_copy.numel, sizeof(float));
            if (!s->tied_copy.data) {
                rc = AR_ENOMEM;
                goto fail;
            }
            init_param(&s->tied_copy, seed);
            s->has_tied_copy = 1;
            l->tied = &s->tied_copy;
        }
        s->tied_grads = ar_calloc((size_t)l->tied->numel, sizeof(float));
        if (!s->tied_grads) {
            rc = AR_ENOMEM;
            goto fail;
        }
        l->tied_grad = s->tied_grads;
    }
    /* a GPT split so that the head is in a later stage */
    if (spec->type == AR_MODEL_GPT && last < units) {
        s->expects_tied = 1;
        s->tied_owner = ar_stage_find_param(s, "wte.weight");
    }

    /* micro-batch slots: [input | layer 0 saved | layer 1 saved | ...] */
    int T = s->T;
    s->layer_offset = ar_calloc((size_t)s->nlayers, sizeof *s->layer_offset);
    if (!s->layer_offset) {
        rc = AR_ENOMEM;
        goto fail;
    }
    s->input_floats = (size_t)max_B * T * ar_stage_in_width(s);
    size_t off = (s->input_floats + 15) & ~(size_t)15;
    size_t widest = ar_stage_in_width(s);
    for (int i = 0; i < s->nlayers; i++) {
        ar_layer *l = s->layers[i];
        s->layer_offset[i] = off;
        off += (l->vt->saved_floats(l, max_B, T) + 15) & ~(size_t)15;
        s->scratch_floats = max_size(s->scratch_floats, l->vt->scratch_floats(l, max_B, T));
        widest = max_size(widest, l->out_floats_per_row);
        widest = max_size(widest, l->in_floats_per_row);
    }
    s->slot_floats = off;
    s->slots = ar_calloc((size_t)nslots, sizeof *s->slots);
    if (!s->slots) {
        rc = AR_ENOMEM;
        goto fail;
    }
    for (int i = 0; i < nslots; i++)
        if (!(s->slots[i] = ar_calloc(s->slot_floats, sizeof(float)))) {
            rc = AR_ENOMEM;
            goto fail;
        }
    s->scratch = ar_calloc(s->scratch_floats, sizeof(float));
    s->grad_in = ar_calloc((size_t)max_B * T * widest, sizeof(float));
    s->grad_out = ar_calloc((size_t)max_B * T * widest, sizeof(float));
    if (!s->scratch || !s->grad_in || !s->grad_out) {
        rc = AR_ENOMEM;
        goto fail;
    }
    if (ar_stage_is_last(s)) {
        /* softmax probabilities then per-row losses, per slot */
        size_t rows = (size_t)max_B * T;
        s->probs_floats = rows * ar_stage_out_width(s) + rows;
        s->probs = ar_calloc((size_t)nslots * s->probs_floats, sizeof(float));
        if (!s->probs) {
            rc = AR_ENOMEM;
            goto fail;
        }
    }
    return AR_OK;
fail:
    ar_stage_destroy(s);
    return rc;
}

void ar_stage_destroy(ar_stage *s)
{
    if (s->layers)
        for (int i = 0; i < s->nlayers; i++)
            ar_layer_destroy(s->layers[i]);
    ar_free(s->layers);
    ar_free(s->params);
    ar_free(s->adamw_segs);
    ar_free(s->mem_params);
    ar_free(s->mem_grads);
    ar_free(s->mem_m);
    ar_free(s->mem_v);
    ar_free(s->tied_grads);
    ar_free(s->tied_copy.data);
    if (s->slots)
        for (int i = 0; i < s->nslots; i++)
            ar_free(s->slots[i]);
    ar_free(s->slots);
    ar_free(s->layer_offset);
    ar_free(s->probs);
    ar_free(s->scratch);
    ar_free(s->grad_in);
    ar_free(s->grad_out);
    memset(s, 0, sizeof *s);
}

static int check_call(const ar_stage *s, int slot, int B)
{
    if (slot < 0 || slot >= s->nslots)
        return ar_fail(AR_EINVAL, "micro-batch slot %d out of range [0, %d)", slot, s->nslots);
    if (B < 1 || B > s->max_B)
        return ar_fail(AR_EINVAL, "micro-batch of %d rows, the stage holds 1..%d", B, s->max_B);
    return AR_OK;
}

int ar_stage_forward(ar_stage *s, int slot, int B, const void *input, int train,
                     uint64_t drop_seed, const float **out)
{
    int rc = check_call(s, slot, B);
    if (rc != AR_OK)
        return rc;
    float *mem = s->slots[slot];
    size_t in_count = (size_t)B * s->T * ar_stage_in_width(s);
    if (s->layers[0]->in_floats_per_row == 0) {
        /* tokens: validate before they index the embedding table */
        const int32_t *tok = input;
        for (size_t i = 0; i < in_count; i++)
            if (tok[i] < 0 || tok[i] >= s->spec.vocab_size)
                return ar_fail(AR_EINVAL, "token %d at position %zu is outside the vocabulary [0, %d)",
                               tok[i], i, s->spec.vocab_size);
    }
    memcpy(mem, input, in_count * sizeof(float)); /* int32 and float are both 4 bytes */
    ar_pass pass = {.B = B, .T = s->T, .slot = slot, .train = train, .drop_seed = drop_seed};
    const void *in = mem;
    for (int i = 0; i < s->nlayers; i++) {
        float *saved = mem + s->layer_offset[i];
        if ((rc = s->layers[i]->vt->forward(s->layers[i], &pass, in, saved)) != AR_OK)
            return rc;
        in = saved;
    }
    *out = in;
    return AR_OK;
}

int ar_stage_loss(ar_stage *s, int slot, int B, const int32_t *targets, double *loss,
                  long *correct)
{
    int rc = check_call(s, slot, B);
    if (rc != AR_OK)
        return rc;
    if (!ar_stage_is_last(s))
        return ar_fail(AR_EINTERNAL, "loss asked of a stage that does not hold the last layer");
    int V = (int)ar_stage_out_width(s);
    int N = B * s->T;
    for (int i = 0; i < N; i++)
        if (targets[i] < 0 || targets[i] >= V)
            return ar_fail(AR_EINVAL, "target %d at position %d is outside [0, %d)", targets[i], i, V);
    const float *logits = s->slots[slot] + s->layer_offset[s->nlayers - 1];
    float *probs = s->probs + (size_t)slot * s->probs_floats;
    float *losses = probs + (size_t)s->max_B * s->T * V;
    AR_PROF_CALL("cross-entropy", AR_PROF_FWD, 0,
                 *loss = ar_xent_forward(losses, probs, logits, targets, N, V));
    if (correct) {
        long c = 0;
        for (int i = 0; i < N; i++) {
            const float *row = logits + (size_t)i * V;
            int best = 0;
            for (int j = 1; j < V; j++)
                if (row[j] > row[best])
                    best = j;
            c += best == targets[i];
        }
        *correct = c;
    }
    return AR_OK;
}

int ar_stage_backward(ar_stage *s, int slot, int B, const int32_t *targets, const float *dout,
                      float loss_scale, uint64_t drop_seed, const float **din)
{
    int rc = check_call(s, slot, B);
    if (rc != AR_OK)
        return rc;
    float *mem = s->slots[slot];
    int T = s->T;
    size_t rows = (size_t)B * T;
    float *bufs[2] = {s->grad_in, s->grad_out};
    int next = 0;
    const float *dcur = dout;
    if (ar_stage_is_last(s)) {
        int V = (int)ar_stage_out_width(s);
        float *dlogits = bufs[next];
        next ^= 1;
        AR_PROF_CALL("cross-entropy", AR_PROF_BWD, 0, {
            memset(dlogits, 0, rows * V * sizeof(float));
            ar_xent_backward(dlogits, s->probs + (size_t)slot * s->probs_floats, targets, loss_scale,
                             (int)rows, V);
        });
        dcur = dlogits;
    } else if (!dout) {
        return ar_fail(AR_EINTERNAL, "backward of a middle stage without an output gradient");
    }
    ar_pass pass = {.B = B, .T = T, .slot = slot, .train = 1, .drop_seed = drop_seed, .scratch = s->scratch,
                    .scratch_floats = s->scratch_floats};
    for (int i = s->nlayers - 1; i >= 0; i--) {
        ar_layer *l = s->layers[i];
        const void *in = i == 0 ? (const void *)mem : mem + s->layer_offset[i - 1];
        float *dx = NULL;
        /* the first unit of the model needs no input gradient */
        if (!(i == 0 && ar_stage_is_first(s))) {
            dx = bufs[next];
            next ^= 1;
            size_t w = l->in_floats_per_row;
            AR_PROF_CALL("input gradient zeroing", AR_PROF_BWD, 0, memset(dx, 0, rows * w * sizeof(float)));
        }
        if ((rc = l->vt->backward(l, &pass, in, mem + s->layer_offset[i], dcur, dx)) != AR_OK)
            return rc;
        dcur = dx;
    }
    *din = dcur;
    return AR_OK;
}

void ar_stage_zero_grad(ar_stage *s)
{
    AR_PROF_CALL("zero gradients", AR_PROF_UPDATE, 0,
                 memset(s->mem_grads, 0, (size_t)s->param_floats * sizeof(float)));
    for (int i = 0; i < s->nlayers; i++)
        if (s->layers[i]->tied_grad)
            memset(s->layers[i]->tied_grad, 0, s->layers[i]->tied->numel * sizeof(float));
}

void ar_stage_fold_tied(ar_stage *s)
{
    for (int i = 0; i < s->nlayers; i++) {
        ar_layer *l = s->layers[i];
        /* a copy's gradient goes to its owner's stage instead (TIED frame) */
        if (!l->tied_grad || l->tied == &s->tied_copy)
            continue;
        for (long j = 0; j < l->tied->numel; j++)
            l->tied->grad[j] += l->tied_grad[j];
    }
}

/* The ranks' gradient sums of squares, per block, added to the units. */
static int add_rank_sumsq(const ar_stage *s, double *out)
{
    int rc = ar_tp_group_scatter(s->tp_ranks, s->tp_nranks, AR_TP_NORM, 0, 0, 0, s->T,
                                 s->spec.n_embd, NULL);
    for (int r = 0; rc == AR_OK && r < s->tp_nranks; r++) {
        ar_frame f;
        if ((rc = ar_link_recv(s->tp_ranks[r], &f, 300)) != AR_OK)
            return ar_fail(rc == AR_ECLOSED ? AR_EIO : rc, "tensor-parallel rank %d (%s) lost: %s", r + 1,
                           s->tp_ranks[r]->name, ar_last_error());
        /* the ranks' shards, in order: the layers that own one */
        int nshards = 0;
        for (int i = 0; i < s->nlayers; i++)
            nshards += s->layers[i]->tp_shard;
        if (f.kind != AR_FRAME_TP || f.dtype != AR_DT_F64 || f.nbytes != (size_t)nshards * sizeof(double)) {
            rc = ar_fail(AR_EPROTO, "tensor-parallel rank %d (%s) sent a malformed gradient norm", r + 1,
                         s->tp_ranks[r]->name);
        } else {
            const double *v = f.data;
            int b = 0;
            for (int i = 0; i < s->nlayers; i++)
                if (s->layers[i]->tp_shard)
                    out[i] += v[b++];
        }
        ar_frame_free(&f);
    }
    return rc;
}

int ar_stage_grad_sumsq(const ar_stage *s, double *out)
{
    /* every gradient of the stage in one pass; each layer's sum is then its
     * parameters' sums added in order, as before */
    int count = 0;
    for (int i = 0; i < s->nlayers; i++)
        count += s->layers[i]->nparams;
    const float **x = ar_calloc((size_t)(count ? count : 1), sizeof *x);
    long *n = ar_calloc((size_t)(count ? count : 1), sizeof *n);
    double *sums = ar_calloc((size_t)(count ? count : 1), sizeof *sums);
    int rc = x && n && sums ? AR_OK : AR_ENOMEM;
    for (int i = 0, k = 0; rc == AR_OK && i < s->nlayers; i++)
        for (int j = 0; j < s->layers[i]->nparams; j++, k++) {
            x[k] = s->layers[i]->params[j].grad;
            n[k] = s->layers[i]->params[j].numel;
        }
    if (rc == AR_OK)
        AR_PROF_CALL("gradient norm", AR_PROF_UPDATE, 0, rc = ar_sum_squares_multi(x, n, count, sums));
    for (int i = 0, k = 0; rc == AR_OK && i < s->nlayers; i++) {
        double sum = 0;
        for (int j = 0; j < s->layers[i]->nparams; j++, k++)
            sum += sums[k];
        out[i] = sum;
    }
    ar_free(x);
    ar_free(n);
    ar_free(sums);
    if (rc != AR_OK)
        return rc;
    return s->tp_nranks > 0 ? add_rank_sumsq(s, out) : AR_OK;
}

int ar_stage_update(ar_stage *s, float lr, float grad_scale)
{
    s->opt_step++;
    const ar_optim_config *o = &s->optim;
    static ar_prof_site opt_site = AR_PROF_SITE("optimizer", AR_PROF_UPDATE);
    ar_prof_mark t0 = ar_prof_begin();
    if (o->kind == AR_OPT_SGD) {
        for (int i = 0; i < s->nparams; i++) {
            ar_param *p = s->params[i];
            float wd = p->decay ? o->weight_decay : 0.0f;
            ar_sgd_update(p->data, p->grad, p->m, p->numel, lr, o->beta1, wd, s->opt_step, grad_scale);
        }
    } else {
        ar_adamw_update_multi(s->adamw_segs, s->nparams, lr, o->beta1, o->beta2, o->eps, o->weight_decay,
                              s->opt_step, grad_scale);
    }
    ar_prof_end(&opt_site, t0, 0);
    if (s->tp_nranks == 0)
        return AR_OK;
    for (int r = 0; r < s->tp_nranks; r++) {
        ar_frame f = {.kind = AR_FRAME_TP};
        f.scalars[0] = AR_TP_STEP;
        f.scalars[1] = lr;
        f.scalars[2] = grad_scale;
        int rc = ar_link_send(s->tp_ranks[r], &f);
        if (rc != AR_OK)
            return ar_fail(rc, "tensor-parallel rank %d (%s): %s", r + 1, s->tp_ranks[r]->name, ar_last_error());
    }
    float none = 0;
    return ar_tp_group_gather_sum(s->tp_ranks, s->tp_nranks, 0, &none, 300);
}

int ar_stage_state_digest(const ar_stage *s, uint8_t out[32])
{
    ar_sha256 h = {0};
    int64_t t = s->opt_step;
    size_t n = (size_t)s->param_floats * sizeof(float);
    int rc = ar_sha256_begin(&h);
    if (rc == AR_OK)
        rc = ar_sha256_add(&h, &t, sizeof t);
    if (rc == AR_OK)
        rc = ar_sha256_add(&h, s->mem_params, n);
    if (rc == AR_OK)
        rc = ar_sha256_add(&h, s->mem_m, n);
    if (rc == AR_OK)
        rc = ar_sha256_add(&h, s->mem_v, n);
    if (rc == AR_OK && s->has_tied_copy)
        rc = ar_sha256_add(&h, s->tied_copy.data, (size_t)s->tied_copy.numel * sizeof(float));
    if (rc == AR_OK)
        rc = ar_sha256_end(&h, out);
    ar_sha256_free(&h);
    return rc;
}

ar_param *ar_stage_find_weight(ar_stage *s, const char *name)
{
    ar_param *p = ar_stage_find_param(s, name);
    if (!p && s->has_tied_copy && strcmp(s->tied_copy.name, name) == 0)
        p = &s->tied_copy;
    return p;
}

ar_param *ar_stage_find_param(const ar_stage *s, const char *name)
{
    for (int i = 0; i < s->nparams; i++)
        if (strcmp(s->params[i]->name, name) == 0)
            return s->params[i];
    return NULL;
}
