/* Audits by replay: an honest in-process pipeline passes every audit of
 * every stage and step; a stage playing each cheat of the test build
 * (ARCEUS_FAULT) fails its audits while its honest neighbours pass. */
#include <criterion/criterion.h>

#include "core/core.h"
#include "nn/spec.h"
#include "train/audit.h"
#include "train/local.h"
#include "train/pipeline.h"
#include "train/schedule.h"

#include <stdlib.h>
#include <string.h>

#define BATCH 8
#define NMB 2
#define NS 3
#define STEPS 5

static const ar_optim_config adamw = {.kind = AR_OPT_ADAMW, .beta1 = 0.9f, .beta2 = 0.999f,
                                      .eps = 1e-8f, .weight_decay = 0.01f};

static ar_model_spec small_mlp(void)
{
    ar_model_spec s;
    memset(&s, 0, sizeof s);
    s.type = AR_MODEL_MLP;
    s.inputs = 20;
    s.n_hidden = 2;
    s.hidden[0] = 16;
    s.hidden[1] = 12;
    s.classes = 5;
    s.activation = AR_ACT_RELU;
    return s;
}

/* Train STEPS steps on 3 stages, auditing every stage at every step but the
 * last (its state after is committed by the next step); failures[s] counts
 * each stage's failed audits, passes[s] its passed ones. */
static void run(const char *fault, int failures[NS], int passes[NS])
{
    if (fault)
        setenv("ARCEUS_FAULT", fault, 1);
    else
        unsetenv("ARCEUS_FAULT");
    ar_model_spec spec = small_mlp();
    ar_local_pipeline p;
    cr_assert_eq(ar_local_create(&p, &spec, NS, BATCH / NMB, NMB, AR_SCHED_1F1B, 42, &adamw), AR_OK, "%s",
                 ar_last_error());
    cr_assert_eq(ar_local_keep_for_audits(&p), AR_OK);
    cr_assert_eq(ar_local_start(&p, AR_SCHED_1F1B, 42, 1), AR_OK, "%s", ar_last_error());
    ar_stage verifier[NS];
    for (int s = 0; s < NS; s++)
        cr_assert_eq(ar_stage_create(&verifier[s], &spec, p.stages[s].first, p.stages[s].last, BATCH / NMB, 1, 7,
                                     &adamw),
                     AR_OK, "%s", ar_last_error());
    ar_step_digests dg[STEPS][NS];
    float x[BATCH * 20];
    int32_t y[BATCH];
    for (int s = 0; s < NS; s++)
        failures[s] = passes[s] = 0;
    for (int step = 0; step < STEPS; step++) {
        ar_rng r;
        ar_rng_seed(&r, 1000 + (uint64_t)step);
        for (int i = 0; i < BATCH * 20; i++)
            x[i] = ar_rng_normal(&r);
        for (int i = 0; i < BATCH; i++)
            y[i] = (int32_t)ar_rng_below(&r, 5);
        ar_batch_desc b = {.step = step, .M = NMB, .B = BATCH, .dtype = AR_DT_F32, .inputs = x,
                           .row_elems = 20, .targets = y, .row_targets = 1};
        ar_step_result res;
        cr_assert_eq(ar_chain_train_step(p.head, &b, 30.0, &res), AR_OK, "%s", ar_last_error());
        cr_assert_eq(res.nstages, NS);
        for (int s = 0; s < NS; s++) {
            cr_assert(res.has_digests[s]);
            dg[step][s] = res.digests[s];
        }
        /* the state after step-1 is known now: audit step-1 (still kept) */
        for (int s = 0; step > 0 && s < NS; s++) {
            ar_audit_material m;
            cr_assert_eq(ar_audit_keep_get(&p.keeps[s], step - 1, &m), AR_OK, "%s", ar_last_error());
            int rc = ar_audit_stage(&verifier[s], &m, 42, dg[step - 1], NS, s, dg[step][s].d[AR_DIGEST_STATE]);
            cr_assert(rc == AR_OK || rc == AR_EPROTO, "stage %d step %d: %s", s, step - 1, ar_last_error());
            if (rc == AR_OK)
                passes[s]++;
            else
                failures[s]++;
            ar_audit_material_free(&m);
        }
        cr_assert_eq(ar_chain_apply(p.head, step, 1e-2f, 1.0f), AR_OK, "%s", ar_last_error());
    }
    cr_assert_eq(ar_chain_sync(p.head, 30.0), AR_OK, "%s", ar_last_error());
    for (int s = 0; s < NS; s++)
        ar_stage_destroy(&verifier[s]);
    ar_local_destroy(&p);
    unsetenv("ARCEUS_FAULT");
}

Test(audit, honest_pipeline_passes_every_audit)
{
    int fail[NS], pass[NS];
    run(NULL, fail, pass);
    for (int s = 0; s < NS; s++) {
        cr_assert_eq(fail[s], 0, "stage %d failed %d audits: %s", s, fail[s], ar_last_error());
        cr_assert_eq(pass[s], STEPS - 1);
    }
}

/* A one-stage GPT holds both ends of its tied embedding: the replay folds
 * the head's gradient into it as the stage does, and every audit passes. */
Test(audit, one_stage_gpt_with_its_tied_weight_passes)
{
    static const char *GPT = "{\"type\": \"gpt\", \"vocab_size\": 11, \"block_size\": 4, \"n_layer\": 1, "
                             "\"n_head\": 2, \"n_embd\": 8, \"dropout\": 0.0}";
    ar_model_spec spec;
    cr_assert_eq(ar_spec_parse(GPT, strlen(GPT), "test", &spec), AR_OK, "%s", ar_last_error());
    ar_local_pipeline p;
    cr_assert_eq(ar_local_create(&p, &spec, 1, 2, 2, AR_SCHED_1F1B, 42, &adamw), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_local_keep_for_audits(&p), AR_OK);
    cr_assert_eq(ar_local_start(&p, AR_SCHED_1F1B, 42, 1), AR_OK, "%s", ar_last_error());
    ar_stage v;
    cr_assert_eq(ar_stage_create(&v, &spec, p.stages[0].first, p.stages[0].last, 2, 1, 7, &adamw), AR_OK);
    int32_t x[4 * 4], y[4 * 4];
    ar_step_digests prev = {0};
    for (int step = 0; step < 4; step++) {
        for (int i = 0; i < 16; i++) {
            x[i] = (i * 3 + step) % 11;
            y[i] = (i * 5 + step + 1) % 11;
        }
        ar_batch_desc b = {.step = step, .M = 2, .B = 4, .dtype = AR_DT_I32, .inputs = x, .row_elems = 4,
                           .targets = y, .row_targets = 4};
        ar_step_result res;
        cr_assert_eq(ar_chain_train_step(p.head, &b, 30.0, &res), AR_OK, "%s", ar_last_error());
        if (step > 0) {
            ar_audit_material m;
            cr_assert_eq(ar_audit_keep_get(&p.keeps[0], step - 1, &m), AR_OK, "%s", ar_last_error());
            cr_assert_eq(ar_audit_stage(&v, &m, 42, &prev, 1, 0, res.digests[0].d[AR_DIGEST_STATE]), AR_OK,
                         "step %d: %s", step - 1, ar_last_error());
            ar_audit_material_free(&m);
        }
        prev = res.digests[0];
        cr_assert_eq(ar_chain_apply(p.head, step, 1e-2f, 1.0f), AR_OK, "%s", ar_last_error());
    }
    cr_assert_eq(ar_chain_sync(p.head, 30.0), AR_OK, "%s", ar_last_error());
    ar_stage_destroy(&v);
    ar_local_destroy(&p);
}

/* Three: the driver audits step k when step k+1's results are in, and
 * stage 0 may have begun step k+2 by then (the batch goes a step ahead). */
Test(audit, keep_holds_the_last_three_steps_only)
{
    ar_model_spec spec = small_mlp();
    ar_stage st;
    cr_assert_eq(ar_stage_create(&st, &spec, 0, 3, 4, 1, 7, &adamw), AR_OK);
    ar_audit_keep k;
    cr_assert_eq(ar_audit_keep_init(&k), AR_OK);
    for (int step = 0; step < 4; step++)
        cr_assert_eq(ar_audit_keep_begin(&k, &st, step, 1), AR_OK);
    ar_audit_material m;
    cr_assert_eq(ar_audit_keep_get(&k, 0, &m), AR_ENOTFOUND);
    for (int step = 1; step < 3; step++) {
        cr_assert_eq(ar_audit_keep_get(&k, step, &m), AR_OK);
        ar_audit_material_free(&m);
    }
    cr_assert_eq(ar_audit_keep_get(&k, 3, &m), AR_OK);
    /* no STEP came: nothing to replay */
    ar_step_digests d;
    uint8_t after[32];
    cr_assert_eq(ar_audit_replay(&st, &m, 42, &d, after), AR_EINVAL);
    ar_audit_material_free(&m);
    ar_audit_keep_destroy(&k);
    ar_stage_destroy(&st);
}

#ifdef ARCEUS_FAULTS
/* The cheat on the middle stage: its audits fail, its neighbours' pass. */
static void caught(const char *fault, int min_failures)
{
    int fail[NS], pass[NS];
    run(fault, fail, pass);
    cr_assert_geq(fail[1], min_failures, "%s: stage 1 failed %d audits", fault, fail[1]);
    cr_assert_eq(fail[0], 0, "%s: honest stage 0 failed %d audits", fault, fail[0]);
    cr_assert_eq(fail[2], 0, "%s: honest stage 2 failed %d audits", fault, fail[2]);
}

Test(audit, skipped_update_is_caught) { caught("skip-update@1", STEPS - 1); }
Test(audit, noisy_outputs_are_caught) { caught("noise@1", STEPS - 1); }
Test(audit, zero_gradients_are_caught) { caught("zero-grad@1", STEPS - 1); }
/* the first step has nothing stale to send */
Test(audit, stale_activations_are_caught) { caught("stale@1", STEPS - 2); }
#endif

/* The material as bytes (the Worker's Audit RPC): it round-trips bitwise,
 * and untrusted bytes are refused unless every count and size holds. */
Test(audit, material_bytes_round_trip_and_bad_bytes_are_refused)
{
    ar_model_spec spec = small_mlp();
    ar_stage st;
    cr_assert_eq(ar_stage_create(&st, &spec, 0, 1, 4, 1, 7, &adamw), AR_OK, "%s", ar_last_error());
    ar_audit_keep k;
    cr_assert_eq(ar_audit_keep_init(&k), AR_OK);
    float x[4 * 20];
    int32_t y[4] = {0, 1, 2, 3};
    float g[4 * 16];
    for (int i = 0; i < 80; i++)
        x[i] = (float)i / 80.0f;
    for (int i = 0; i < 64; i++)
        g[i] = (float)i / -64.0f;
    cr_assert_eq(ar_audit_keep_begin(&k, &st, 3, 2), AR_OK);
    for (int mb = 0; mb < 2; mb++) {
        cr_assert_eq(ar_audit_keep_act(&k, mb, 4, x, sizeof x, y, 4), AR_OK);
        cr_assert_eq(ar_audit_keep_grad(&k, mb, g, sizeof g, 0.5 + mb), AR_OK);
    }
    ar_audit_keep_update(&k, 3, 1e-3f, 0.5f);
    ar_audit_material m, back;
    cr_assert_eq(ar_audit_keep_get(&k, 3, &m), AR_OK);
    void *buf;
    size_t n;
    cr_assert_eq(ar_audit_material_encode(&m, &buf, &n), AR_OK);
    cr_assert_eq(ar_audit_material_decode(buf, n, st.param_floats, 2, 4, "test", &back), AR_OK, "%s",
                 ar_last_error());
    cr_assert_eq(back.step, 3);
    cr_assert_eq(back.M, 2);
    cr_assert(back.has_update && back.lr == 1e-3f && back.scale == 0.5f);
    cr_assert(memcmp(back.params, st.mem_params, sizeof(float) * (size_t)st.param_floats) == 0);
    cr_assert_eq(back.mb[1].loss, 1.5);
    cr_assert(memcmp(back.mb[1].grad, g, sizeof g) == 0 && memcmp(back.mb[0].act, x, sizeof x) == 0);
    ar_audit_material_free(&back);
    /* another stage's size, more micro-batches or rows than the run has */
    cr_assert_eq(ar_audit_material_decode(buf, n, st.param_floats + 1, 2, 4, "test", &back), AR_EPROTO);
    cr_assert_eq(ar_audit_material_decode(buf, n, st.param_floats, 1, 4, "test", &back), AR_EPROTO);
    cr_assert_eq(ar_audit_material_decode(buf, n, st.param_floats, 2, 3, "test", &back), AR_EPROTO);
    /* every truncation, a byte too many, and sizes that lie */
    for (size_t cut = 0; cut < n; cut += 1 + cut / 8)
        cr_assert_eq(ar_audit_material_decode(buf, cut, st.param_floats, 2, 4, "test", &back), AR_EPROTO, "cut %zu",
                     cut);
    uint8_t *more = malloc(n + 1);
    memcpy(more, buf, n);
    more[n] = 0;
    cr_assert_eq(ar_audit_material_decode(more, n + 1, st.param_floats, 2, 4, "test", &back), AR_EPROTO);
    size_t mb0 = 48 + 12 * (size_t)st.param_floats; /* the first micro-batch's header */
    uint64_t huge = UINT64_MAX / 2;
    memcpy(more + mb0 + 4, &huge, 8); /* its ACT bytes */
    cr_assert_eq(ar_audit_material_decode(more, n, st.param_floats, 2, 4, "test", &back), AR_EPROTO);
    free(more);
    /* the replay checks the shapes the bytes could not: a stage of other units */
    ar_stage other;
    cr_assert_eq(ar_stage_create(&other, &spec, 1, 2, 4, 1, 7, &adamw), AR_OK);
    ar_step_digests d;
    uint8_t after[32];
    cr_assert_neq(ar_audit_replay(&other, &m, 7, &d, after), AR_OK);
    ar_stage_destroy(&other);
    free(buf);
    ar_audit_material_free(&m);
    ar_audit_keep_destroy(&k);
    ar_stage_destroy(&st);
}
