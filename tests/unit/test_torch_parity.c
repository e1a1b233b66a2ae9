/* Numerics against PyTorch on the same weights and data.
 * tests/ref/make_refs.py writes, for gpt_tiny and the MLP, the spec, the
 * initial weights, a batch with its logits, loss and every gradient, and ten
 * AdamW steps (clipping + warm-up/cosine schedule) with their losses. */
#include <criterion/criterion.h>

#include "core/core.h"
#include "nn/safetensors.h"
#include "train/checkpoint.h"
#include "run/driver.h"
#include "train/local.h"
#include "train/pipeline.h"
#include "train/stage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *ref_dir(void)
{
    const char *d = getenv("AR_REF_DIR");
    return d ? d : "build/ref";
}

static void ref_path(char *buf, size_t n, const char *model, const char *suffix)
{
    snprintf(buf, n, "%s/%s.%s", ref_dir(), model, suffix);
}

typedef struct {
    ar_model_spec spec;
    ar_st_file io;
    char weights[1024];
    const ar_st_tensor *inputs, *targets;
    int B, T;
    double meta_lr, meta_min_lr, meta_wd, meta_clip, meta_b1, meta_b2, meta_eps;
    long meta_warmup, meta_total;
} reference;

static double meta_num(const ar_st_file *f, const char *key)
{
    const char *v = ar_st_meta(f, key);
    cr_assert(v, "reference metadata lacks %s", key);
    return atof(v);
}

static void load_reference(reference *r, const char *model)
{
    char path[1024];
    ref_path(path, sizeof path, model, "spec.json");
    cr_assert_eq(ar_spec_load(path, &r->spec), AR_OK, "%s (run `make ref`)", ar_last_error());
    ref_path(path, sizeof path, model, "io.safetensors");
    cr_assert_eq(ar_st_load(path, &r->io), AR_OK, "%s", ar_last_error());
    ref_path(r->weights, sizeof r->weights, model, "weights.safetensors");
    r->inputs = ar_st_find(&r->io, "inputs");
    r->targets = ar_st_find(&r->io, "targets");
    cr_assert(r->inputs && r->targets);
    r->B = (int)r->inputs->shape[0];
    r->T = r->spec.type == AR_MODEL_GPT ? r->spec.block_size : 1;
    r->meta_lr = meta_num(&r->io, "max_lr");
    r->meta_min_lr = meta_num(&r->io, "min_lr");
    r->meta_wd = meta_num(&r->io, "weight_decay");
    r->meta_clip = meta_num(&r->io, "clip");
    r->meta_b1 = meta_num(&r->io, "beta1");
    r->meta_b2 = meta_num(&r->io, "beta2");
    r->meta_eps = meta_num(&r->io, "eps");
    r->meta_warmup = (long)meta_num(&r->io, "warmup");
    r->meta_total = (long)meta_num(&r->io, "total");
}

static ar_optim_config optim_of(const reference *r)
{
    return (ar_optim_config){.kind = AR_OPT_ADAMW, .beta1 = (float)r->meta_b1,
                             .beta2 = (float)r->meta_b2, .eps = (float)r->meta_eps,
                             .weight_decay = (float)r->meta_wd};
}

static void check_close(const char *what, const float *got, const float *want, long n, double tol)
{
    double worst = 0;
    long at = 0;
    for (long i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= worst)) {
            worst = d;
            at = i;
        }
    }
    cr_log_info("%s: max |diff| vs torch %.3g (tolerance %.1g)", what, worst, tol);
    cr_expect(worst <= tol, "%s: max |diff| %.3g at [%ld] (%.7g vs torch %.7g) > %.1g", what, worst,
              at, got[at], want[at], tol);
}

/* Forward, loss and every parameter gradient on one batch. */
static void check_one_batch(const char *model)
{
    reference r;
    load_reference(&r, model);
    ar_optim_config oc = optim_of(&r);
    ar_stage st;
    cr_assert_eq(ar_stage_create(&st, &r.spec, 0, ar_spec_units(&r.spec), r.B, 1, 1, &oc), AR_OK,
                 "%s", ar_last_error());
    ar_stage *sp = &st;
    cr_assert_eq(ar_load_weights_file(r.weights, &sp, 1, ""), AR_OK, "%s", ar_last_error());

    const float *logits;
    cr_assert_eq(ar_stage_forward(&st, 0, r.B, r.inputs->data, 1, 0, &logits), AR_OK, "%s",
                 ar_last_error());
    const ar_st_tensor *want_logits = ar_st_find(&r.io, "logits");
    check_close("logits", logits, want_logits->data, (long)(want_logits->nbytes / 4), 1e-4);

    double loss;
    cr_assert_eq(ar_stage_loss(&st, 0, r.B, r.targets->data, &loss, NULL), AR_OK);
    double want_loss = ((const float *)ar_st_find(&r.io, "loss")->data)[0];
    cr_log_info("loss %.8f, torch %.8f, relative diff %.2g", loss, want_loss, fabs(loss - want_loss) / fabs(want_loss));
    cr_expect(fabs(loss - want_loss) <= 1e-5 * fabs(want_loss), "loss %.8f vs torch %.8f", loss,
              want_loss);

    ar_stage_zero_grad(&st);
    const float *din;
    cr_assert_eq(ar_stage_backward(&st, 0, r.B, r.targets->data, NULL, 1.0f / (r.B * r.T), 0, &din),
                 AR_OK, "%s", ar_last_error());
    ar_stage_fold_tied(&st);
    for (int i = 0; i < st.nparams; i++) {
        char name[160];
        snprintf(name, sizeof name, "grad.%s", st.params[i]->name);
        const ar_st_tensor *g = ar_st_find(&r.io, name);
        cr_assert(g, "reference lacks %s", name);
        cr_assert_eq(g->nbytes, (size_t)st.params[i]->numel * 4, "%s size", name);
        check_close(name, st.params[i]->grad, g->data, st.params[i]->numel, 1e-4);
    }
    ar_stage_destroy(&st);
    ar_st_free(&r.io);
}

/* Ten optimizer steps through the real pipeline path (driver side of the
 * chain protocol, stage threads, in-process links), with micro-batches. */
static void check_ten_steps(const char *model, int S, int M)
{
    reference r;
    load_reference(&r, model);
    ar_optim_config oc = optim_of(&r);
    ar_local_pipeline p;
    cr_assert_eq(ar_local_create(&p, &r.spec, S, r.B / M, M, 1, 1, &oc), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_load_weights_file(r.weights, p.stage_ptrs, p.S, ""), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_local_start(&p, 1, 1, 1), AR_OK, "%s", ar_last_error());

    const ar_st_tensor *xs = ar_st_find(&r.io, "steps.inputs"), *ys = ar_st_find(&r.io, "steps.targets");
    const float *want = ar_st_find(&r.io, "steps.losses")->data;
    const float *want_norm = ar_st_find(&r.io, "steps.grad_norms")->data;
    int steps = (int)xs->shape[0];
    size_t row_elems = r.spec.type == AR_MODEL_GPT ? (size_t)r.T : (size_t)r.spec.inputs;
    size_t in_step = (size_t)r.B * row_elems, tg_step = (size_t)r.B * r.T;
    for (int s = 0; s < steps; s++) {
        ar_batch_desc b = {.step = s, .M = M, .B = r.B,
                           .dtype = r.spec.type == AR_MODEL_GPT ? 1 : 0,
                           .inputs = (const char *)xs->data + s * in_step * 4,
                           .row_elems = row_elems,
                           .targets = (const int32_t *)ys->data + s * tg_step,
                           .row_targets = (size_t)r.T};
        ar_step_result res;
        cr_assert_eq(ar_chain_train_step(p.head, &b, 60, &res), AR_OK, "%s", ar_last_error());
        double sumsq = 0;
        for (int i = 0; i < res.nunits; i++)
            sumsq += res.unit_sumsq[i];
        double norm = sqrt(sumsq);
        cr_log_info("step %d: loss %.7f, torch %.7f, |diff| %.2g", s, res.loss, want[s], fabs(res.loss - want[s]));
        cr_expect(fabs(res.loss - want[s]) <= 1e-4, "step %d: loss %.7f vs torch %.7f", s, res.loss, want[s]);
        cr_expect(fabs(norm - want_norm[s]) <= 1e-4 * (1 + want_norm[s]), "step %d: grad norm %.7f vs torch %.7f", s, norm, want_norm[s]);
        float scale = norm > r.meta_clip ? (float)(r.meta_clip / (norm + 1e-6)) : 1.0f;
        float lr = ar_lr_at(s, (float)r.meta_lr, (float)r.meta_min_lr, r.meta_warmup, r.meta_total);
        float want_lr = ((const float *)ar_st_find(&r.io, "steps.lrs")->data)[s];
        cr_expect(fabsf(lr - want_lr) <= 1e-9f + 1e-6f * want_lr, "step %d: lr %g vs torch %g", s, lr, want_lr);
        cr_assert_eq(ar_chain_apply(p.head, s, lr, scale), AR_OK);
    }
    cr_assert_eq(ar_chain_sync(p.head, 60), AR_OK, "%s", ar_last_error());
    for (int k = 0; k < p.S; k++)
        for (int i = 0; i < p.stages[k].nparams; i++) {
            ar_param *prm = p.stages[k].params[i];
            char name[160];
            snprintf(name, sizeof name, "final.%s", prm->name);
            const ar_st_tensor *w = ar_st_find(&r.io, name);
            cr_assert(w, "reference lacks %s", name);
            check_close(name, prm->data, w->data, prm->numel, 1e-4);
        }
    ar_local_destroy(&p);
    ar_st_free(&r.io);
}

Test(torch_parity, gpt_tiny_forward_backward) { check_one_batch("gpt_tiny"); }
Test(torch_parity, mlp_forward_backward) { check_one_batch("mlp"); }
Test(torch_parity, gpt_tiny_ten_adamw_steps) { check_ten_steps("gpt_tiny", 1, 2); }
Test(torch_parity, mlp_ten_adamw_steps_two_stages) { check_ten_steps("mlp", 2, 4); }
