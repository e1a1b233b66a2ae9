/* The planner: unit costs against the real stage, the dynamic program
 * against brute force, plans by hand, and the printed table. */
#include "core/core.h"
#include "nn/spec.h"
#include "run/market_plan.h"
#include "train/plan.h"
#include "train/schedule.h"
#include "train/stage.h"
#include "train/tp_group.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define HAVE_ALLOC_COUNT 1
size_t __sanitizer_get_current_allocated_bytes(void);
static double allocated_bytes(void)
{
    return (double)__sanitizer_get_current_allocated_bytes();
}
#elif defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
#define HAVE_ALLOC_COUNT 1
#include <malloc.h>
static double allocated_bytes(void)
{
    struct mallinfo2 mi = mallinfo2();
    return (double)mi.uordblks + (double)mi.hblkhd; /* heap + mmap'd chunks */
}
#else
#define HAVE_ALLOC_COUNT 0
#endif

static const ar_optim_config adamw = {.kind = AR_OPT_ADAMW, .beta1 = 0.9f, .beta2 = 0.999f,
                                      .eps = 1e-8f, .weight_decay = 0.1f};

static ar_model_spec gpt5m(void)
{
    ar_model_spec s;
    cr_assert_eq(ar_spec_load("configs/gpt-5m.json", &s), AR_OK, "%s", ar_last_error());
    s.vocab_size = 65;
    return s;
}

static ar_model_spec small_gpt(int n_layer)
{
    ar_model_spec s;
    memset(&s, 0, sizeof s);
    s.type = AR_MODEL_GPT;
    s.vocab_size = 65;
    s.block_size = 32;
    s.n_layer = n_layer;
    s.n_head = 4;
    s.n_embd = 64;
    return s;
}

static ar_device dev(const char *name, double gflops, double mem, double bw)
{
    ar_device d;
    memset(&d, 0, sizeof d);
    snprintf(d.name, sizeof d.name, "%s", name);
    d.gflops = gflops;
    d.mem_bytes = mem;
    d.bandwidth = bw;
    return d;
}

/* The plan's stages are contiguous, cover every unit and use devices in order. */
static void expect_well_formed(const ar_plan *p, int nunits, int ndev)
{
    cr_assert(p->nstages >= 1 && p->nstages <= ndev, "%d stages", p->nstages);
    int next = 0;
    for (int s = 0; s < p->nstages; s++) {
        cr_assert_eq(p->first[s], next, "stage %d starts at %d, want %d", s, p->first[s], next);
        cr_assert_gt(p->last[s], p->first[s]);
        cr_assert(p->device[s] >= 0 && p->device[s] < ndev);
        if (s > 0)
            cr_assert_gt(p->device[s], p->device[s - 1], "devices out of order");
        next = p->last[s];
    }
    cr_assert_eq(next, nunits, "plan covers units up to %d of %d", next, nunits);
}

static double max_time(const ar_plan *p)
{
    double m = 0;
    for (int s = 0; s < p->nstages; s++)
        m = fmax(m, p->stage_time[s]);
    return m;
}

/* ---- unit costs ------------------------------------------------------------------ */

Test(plan, gpt_flops_are_six_n_tokens_plus_attention)
{
    ar_model_spec s = gpt5m();
    int n = ar_spec_units(&s), B = 4;
    cr_assert_eq(n, 8);
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&s, B, c), AR_OK, "%s", ar_last_error());
    double total = 0;
    for (int u = 0; u < n; u++)
        total += c[u].flops;
    double T = s.block_size, C = s.n_embd, tokens = B * T;
    double attention = 3.0 * 4.0 * B * T * T * C * s.n_layer; /* QK^T and AV, fwd + bwd */
    double six_n_t = 6.0 * (double)ar_spec_param_count(&s) * tokens;
    double matmul = total - attention;
    cr_assert(fabs(matmul / six_n_t - 1.0) < 0.10, "matmul FLOPs %.4g vs 6NT %.4g", matmul, six_n_t);
    /* the per-unit shape: the lookup is free, blocks are equal, the head is the logits */
    cr_assert_eq(c[0].flops, 0.0);
    for (int u = 2; u <= s.n_layer; u++)
        cr_assert_eq(c[u].flops, c[1].flops);
    cr_assert(fabs(c[n - 1].flops - 6.0 * tokens * C * s.vocab_size) < 1.0);
    /* outputs: activations to the next stage, logits out of the head */
    cr_assert_eq(c[0].out_bytes, tokens * C * 4);
    cr_assert_eq(c[3].out_bytes, tokens * C * 4);
    cr_assert_eq(c[n - 1].out_bytes, tokens * s.vocab_size * 4);
    /* parameters add up to the model's */
    double params = 0;
    for (int u = 0; u < n; u++)
        params += c[u].param_bytes;
    cr_assert_eq(params, 4.0 * (double)ar_spec_param_count(&s));
}

Test(plan, mlp_flops_are_six_n_rows)
{
    ar_model_spec s;
    cr_assert_eq(ar_spec_load("configs/mlp-fashion.json", &s), AR_OK, "%s", ar_last_error());
    int n = ar_spec_units(&s), B = 32;
    ar_unit_cost c[AR_MAX_HIDDEN + 1];
    cr_assert_eq(ar_plan_unit_costs(&s, B, c), AR_OK, "%s", ar_last_error());
    double total = 0;
    for (int u = 0; u < n; u++)
        total += c[u].flops;
    double six_n_b = 6.0 * (double)ar_spec_param_count(&s) * B;
    cr_assert(fabs(total / six_n_b - 1.0) < 0.01, "%.4g vs %.4g", total, six_n_b);
}

Test(plan, costs_reject_bad_input)
{
    ar_model_spec s = gpt5m();
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&s, 0, c), AR_EINVAL);
    s.vocab_size = 0;
    cr_assert_eq(ar_plan_unit_costs(&s, 4, c), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "vocab_size"));
}

/* Bytes a real stage of units [first,last) holds: measured by the allocator
 * when it can tell, otherwise added up from the stage's fields. */
static double real_stage_bytes(const ar_model_spec *spec, int first, int last, int B, int slots)
{
    ar_stage st;
#if HAVE_ALLOC_COUNT
    double before = allocated_bytes();
    cr_assert_eq(ar_stage_create(&st, spec, first, last, B, slots, 7, &adamw), AR_OK, "%s",
                 ar_last_error());
    double bytes = allocated_bytes() - before;
#else
    cr_assert_eq(ar_stage_create(&st, spec, first, last, B, slots, 7, &adamw), AR_OK, "%s",
                 ar_last_error());
    size_t widest = ar_stage_in_width(&st);
    for (int i = 0; i < st.nlayers; i++) {
        widest = st.layers[i]->in_floats_per_row > widest ? st.layers[i]->in_floats_per_row : widest;
        widest = st.layers[i]->out_floats_per_row > widest ? st.layers[i]->out_floats_per_row : widest;
    }
    double floats = 4.0 * (double)st.param_floats + (double)st.nslots * (double)st.slot_floats +
                    (double)st.nslots * (double)st.probs_floats + (double)st.scratch_floats +
                    2.0 * B * st.T * (double)widest;
    if (st.has_tied_copy)
        floats += (double)st.tied_copy.numel;
    for (int i = 0; i < st.nlayers; i++)
        if (st.layers[i]->tied)
            floats += (double)st.layers[i]->tied->numel; /* its gradient buffer */
    double bytes = 4.0 * floats;
#endif
    ar_stage_destroy(&st);
    return bytes;
}

static void expect_memory_matches(const ar_model_spec *spec, int first, int last, int B, int slots)
{
    int n = ar_spec_units(spec);
    ar_unit_cost c[AR_MAX_LAYERS + 2];
    cr_assert_eq(ar_plan_unit_costs(spec, B, c), AR_OK, "%s", ar_last_error());
    double predicted = ar_plan_stage_mem(c, n, first, last, slots);
    double real = real_stage_bytes(spec, first, last, B, slots);
    cr_assert(fabs(predicted / real - 1.0) < 0.05, "units [%d,%d) with %d slots: predicted %.0f, real %.0f bytes",
              first, last, slots, predicted, real);
}

Test(plan, unit_memory_matches_a_real_stage)
{
    ar_model_spec s = gpt5m();
    int n = ar_spec_units(&s);
    for (int u = 0; u < n; u++)
        expect_memory_matches(&s, u, u + 1, 2, 3);
    /* stages of several units, the whole model (the tied copy is not needed) */
    expect_memory_matches(&s, 0, n, 2, 2);
    expect_memory_matches(&s, 2, 5, 2, 4);
    expect_memory_matches(&s, 4, n, 1, 1);
    expect_memory_matches(&s, 0, 3, 3, 2);

    ar_model_spec m;
    cr_assert_eq(ar_spec_load("configs/mlp-fashion.json", &m), AR_OK, "%s", ar_last_error());
    for (int u = 0; u < ar_spec_units(&m); u++)
        expect_memory_matches(&m, u, u + 1, 64, 2);
    expect_memory_matches(&m, 0, ar_spec_units(&m), 64, 3);
}

Test(plan, slots_follow_the_schedule)
{
    ar_action acts[64];
    for (int S = 1; S <= 4; S++)
        for (int M = 1; M <= 6; M++)
            for (int st = 0; st < S; st++) {
                cr_assert_eq(ar_plan_slots(AR_SCHED_GPIPE, S, st, M),
                             ar_schedule_build(AR_SCHED_GPIPE, S, st, M, acts));
                cr_assert_eq(ar_plan_slots(AR_SCHED_1F1B, S, st, M),
                             ar_schedule_build(AR_SCHED_1F1B, S, st, M, acts));
            }
}

/* ---- the automatic plan ---------------------------------------------------------------- */

Test(plan, three_equal_devices_split_evenly)
{
    ar_model_spec s = gpt5m();
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&s, 4, c), AR_OK, "%s", ar_last_error());
    ar_device d[3] = {dev("a", 10, 1e11, 1e9), dev("b", 10, 1e11, 1e9), dev("c", 10, 1e11, 1e9)};
    ar_plan p;
    cr_assert_eq(ar_plan_auto(c, 8, d, 3, 4, AR_SCHED_GPIPE, &p), AR_OK, "%s", ar_last_error());
    expect_well_formed(&p, 8, 3);
    cr_assert_eq(p.nstages, 3);
    for (int st = 0; st < 3; st++) {
        int blocks = 0;
        for (int u = p.first[st]; u < p.last[st]; u++)
            blocks += u >= 1 && u <= s.n_layer;
        cr_assert_eq(blocks, 2, "stage %d holds %d blocks", st, blocks);
        cr_assert_eq(p.device[st], st);
        cr_assert_gt(p.stage_time[st], 0.0);
        cr_assert_gt(p.stage_mem[st], 0.0);
    }
    cr_assert(fabs(p.bubble - 2.0 / 6.0) < 1e-12);
    cr_assert_eq(p.micro_batches, 4);
}

Test(plan, a_twice_faster_device_gets_twice_the_work)
{
    ar_model_spec s = small_gpt(12);
    int n = ar_spec_units(&s);
    ar_unit_cost c[14];
    cr_assert_eq(ar_plan_unit_costs(&s, 4, c), AR_OK, "%s", ar_last_error());
    ar_device d[2] = {dev("slow", 10, 1e11, 1e12), dev("fast", 20, 1e11, 1e12)};
    ar_plan p;
    cr_assert_eq(ar_plan_auto(c, n, d, 2, 8, AR_SCHED_1F1B, &p), AR_OK, "%s", ar_last_error());
    expect_well_formed(&p, n, 2);
    cr_assert_eq(p.nstages, 2);
    double total = 0, fast = 0;
    for (int st = 0; st < 2; st++)
        for (int u = p.first[st]; u < p.last[st]; u++) {
            total += c[u].flops;
            if (p.device[st] == 1)
                fast += c[u].flops;
        }
    double share = fast / total;
    cr_assert(fabs(share / (2.0 / 3.0) - 1.0) < 0.15, "the fast device does %.3f of the work", share);
}

/* Run f with stderr going to a buffer; returns what was written (malloc'd). */
static char *capture_stderr(int (*f)(void *), void *arg, int *rc)
{
    fflush(stderr);
    FILE *tmp = tmpfile();
    cr_assert_not_null(tmp);
    int saved = dup(2);
    cr_assert(saved >= 0);
    dup2(fileno(tmp), 2);
    *rc = f(arg);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    fseek(tmp, 0, SEEK_END);
    long len = ftell(tmp);
    rewind(tmp);
    char *buf = calloc((size_t)len + 1, 1);
    cr_assert_not_null(buf);
    if (len > 0)
        cr_assert_eq(fread(buf, 1, (size_t)len, tmp), (size_t)len);
    fclose(tmp);
    return buf;
}

typedef struct {
    const ar_unit_cost *c;
    int n;
    const ar_device *d;
    int nd;
    ar_plan *p;
} auto_args;

static int run_auto(void *arg)
{
    auto_args *a = arg;
    return ar_plan_auto(a->c, a->n, a->d, a->nd, 4, AR_SCHED_GPIPE, a->p);
}

Test(plan, a_device_too_small_for_any_layer_is_left_out)
{
    ar_model_spec s = gpt5m();
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&s, 4, c), AR_OK, "%s", ar_last_error());
    ar_device d[3] = {dev("big-one", 10, 1e11, 1e9), dev("tiny-box", 50, 1e5, 1e9),
                      dev("big-two", 10, 1e11, 1e9)};
    ar_plan p;
    auto_args a = {c, 8, d, 3, &p};
    int rc;
    char *err = capture_stderr(run_auto, &a, &rc);
    cr_assert_eq(rc, AR_OK, "%s", ar_last_error());
    expect_well_formed(&p, 8, 3);
    cr_assert_eq(p.nstages, 2);
    for (int st = 0; st < p.nstages; st++)
        cr_assert_neq(p.device[st], 1, "the tiny device got stage %d", st);
    cr_assert_not_null(strstr(err, "tiny-box"), "no warning names the device: \"%s\"", err);
    cr_assert_not_null(strstr(err, "warning"), "%s", err);
    free(err);
}

Test(plan, infeasible_plans_say_what_does_not_fit)
{
    ar_model_spec s = gpt5m();
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&s, 4, c), AR_OK, "%s", ar_last_error());
    ar_device d[2] = {dev("little", 10, 2e6, 1e9), dev("smaller", 10, 1e6, 1e9)};
    ar_plan p;
    cr_assert_eq(ar_plan_auto(c, 8, d, 2, 4, AR_SCHED_GPIPE, &p), AR_ELIMIT);
    const char *msg = ar_last_error();
    cr_assert_not_null(strstr(msg, "layer"), "%s", msg);
    cr_assert_not_null(strstr(msg, "needs"), "%s", msg);
    cr_assert_not_null(strstr(msg, "little"), "message does not name the largest device: %s", msg);

    /* every layer fits somewhere, but not all of them together */
    double biggest = 0;
    for (int u = 0; u < 8; u++)
        biggest = fmax(biggest, ar_plan_stage_mem(c, 8, u, u + 1, 4));
    ar_device one = dev("only", 10, biggest * 1.01, 1e9);
    cr_assert_eq(ar_plan_auto(c, 8, &one, 1, 4, AR_SCHED_GPIPE, &p), AR_ELIMIT);
    cr_assert_not_null(strstr(ar_last_error(), "no split"), "%s", ar_last_error());
}

Test(plan, auto_rejects_bad_arguments)
{
    ar_unit_cost c[2] = {{.flops = 1}, {.flops = 1}};
    ar_device d = dev("x", 0, 0, 0);
    ar_plan p;
    cr_assert_eq(ar_plan_auto(c, 2, &d, 1, 4, AR_SCHED_GPIPE, &p), AR_EINVAL);
    d.gflops = 1;
    cr_assert_eq(ar_plan_auto(c, 2, &d, 1, 0, AR_SCHED_GPIPE, &p), AR_EINVAL);
    cr_assert_eq(ar_plan_auto(c, 2, &d, 0, 4, AR_SCHED_GPIPE, &p), AR_EINVAL);
    cr_assert_eq(ar_plan_auto(c, 2, &d, 1, 4, 7, &p), AR_EINVAL);
    /* unknown memory is not checked */
    cr_assert_eq(ar_plan_auto(c, 2, &d, 1, 4, AR_SCHED_1F1B, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.nstages, 1);
}

/* ---- optimality against brute force --------------------------------------------------- */

typedef struct {
    double best;   /* smallest slowest-stage time */
    int stages;    /* fewest stages reaching it */
    double total;  /* smallest total time among those */
} brute_result;

/* A stage takes the longer of its compute and its link's transfers each way
 * (sends overlap compute). */
static double stage_seconds(const ar_unit_cost *c, int n, int a, int b, const ar_device *d, int M)
{
    double f = 0;
    for (int u = a; u < b; u++)
        f += c[u].flops;
    double bw = d->bandwidth > 0 ? d->bandwidth : AR_PLAN_DEFAULT_BANDWIDTH;
    double t = f / (d->gflops * 1e9);
    if (b < n) {
        double down, up;
        ar_plan_link_mb_bytes(c, b, M, AR_COMPRESS_NONE, &down, &up);
        t = fmax(t, fmax(down, up) / bw);
    }
    return t;
}

/* Every ordered choice of S devices and every composition of the units into S
 * parts. */
static void brute(const ar_unit_cost *c, int n, const ar_device *d, int nd, int M, int sched,
                  brute_result *r)
{
    r->best = INFINITY;
    r->stages = 0;
    r->total = INFINITY;
    for (unsigned mask = 1; mask < (1u << nd); mask++) {
        int devs[8], S = 0;
        for (int k = 0; k < nd; k++)
            if (mask & (1u << k))
                devs[S++] = k;
        if (S > n)
            continue;
        /* cuts: S-1 distinct points in 1..n-1, as a bitmask over n-1 positions */
        for (unsigned cuts = 0; cuts < (1u << (n - 1)); cuts++) {
            if (__builtin_popcount(cuts) != S - 1)
                continue;
            double mx = 0, sum = 0;
            int a = 0, st = 0, ok = 1;
            for (int b = 1; b <= n && ok; b++) {
                if (b < n && !(cuts & (1u << (b - 1))))
                    continue;
                const ar_device *dv = &d[devs[st]];
                double mem = ar_plan_stage_mem(c, n, a, b, ar_plan_slots(sched, S, st, M));
                if (dv->mem_bytes > 0 && mem > dv->mem_bytes)
                    ok = 0;
                double t = stage_seconds(c, n, a, b, dv, M);
                mx = fmax(mx, t);
                sum += t;
                a = b;
                st++;
            }
            if (!ok)
                continue;
            double tol = 1e-9 * fmax(mx, r->best == INFINITY ? 0 : r->best);
            if (mx < r->best - tol) {
                r->best = mx, r->stages = S, r->total = sum;
            } else if (fabs(mx - r->best) <= tol) {
                if (S < r->stages || (S == r->stages && sum < r->total))
                    r->stages = S, r->total = sum;
            }
        }
    }
}

Test(plan, the_dynamic_program_matches_brute_force)
{
    ar_rng rng;
    ar_rng_seed(&rng, 2024);
    int checked = 0, infeasible = 0;
    for (int trial = 0; trial < 600; trial++) {
        int n = 1 + (int)ar_rng_below(&rng, 8);
        int nd = 1 + (int)ar_rng_below(&rng, 4);
        int M = 1 + (int)ar_rng_below(&rng, 4);
        int sched = (int)ar_rng_below(&rng, 2) ? AR_SCHED_1F1B : AR_SCHED_GPIPE;
        int ties = trial % 2; /* small integers make equal bottlenecks common */
        ar_unit_cost c[8];
        for (int u = 0; u < n; u++) {
            memset(&c[u], 0, sizeof c[u]);
            c[u].flops = ties ? 1e9 * (double)(1 + ar_rng_below(&rng, 4))
                              : 1e9 * (0.1 + ar_rng_uniform(&rng));
            c[u].state_bytes = 1e6 * ar_rng_uniform(&rng);
            c[u].param_bytes = c[u].state_bytes / 4;
            c[u].tied_bytes = ar_rng_below(&rng, 4) == 0 ? 3e5 : 0;
            c[u].out_bytes = ties ? 0 : 1e5 * ar_rng_uniform(&rng);
            c[u].act_bytes = c[u].out_bytes + 5e5 * ar_rng_uniform(&rng);
            c[u].work_bytes = 2e5 * ar_rng_uniform(&rng);
        }
        ar_device d[4];
        for (int k = 0; k < nd; k++) {
            char name[16];
            snprintf(name, sizeof name, "dev%d", k);
            d[k] = dev(name, ties ? (double)(1 + ar_rng_below(&rng, 2)) : 0.5 + 2 * ar_rng_uniform(&rng),
                       ar_rng_below(&rng, 5) == 0 ? 0 : 1e6 + 4e6 * ar_rng_uniform(&rng),
                       ar_rng_below(&rng, 3) == 0 ? 0 : 1e8 * (1 + ar_rng_uniform(&rng)));
        }
        brute_result r;
        brute(c, n, d, nd, M, sched, &r);
        ar_plan p;
        ar_log_set_level(AR_LOG_ERROR); /* skipped devices are expected here */
        int rc = ar_plan_auto(c, n, d, nd, M, sched, &p);
        ar_log_set_level(AR_LOG_INFO);
        if (r.best == INFINITY) {
            cr_assert_eq(rc, AR_ELIMIT, "trial %d: brute force finds no plan, the planner returns %d",
                         trial, rc);
            infeasible++;
            continue;
        }
        cr_assert_eq(rc, AR_OK, "trial %d: %s", trial, ar_last_error());
        expect_well_formed(&p, n, nd);
        double got = max_time(&p), sum = 0;
        for (int st = 0; st < p.nstages; st++)
            sum += p.stage_time[st];
        cr_assert(fabs(got - r.best) <= 1e-9 * r.best, "trial %d: slowest stage %.12g, optimum %.12g",
                  trial, got, r.best);
        cr_assert_eq(p.nstages, r.stages, "trial %d: %d stages, the fewest reaching the optimum is %d",
                     trial, p.nstages, r.stages);
        cr_assert(sum <= r.total * (1 + 1e-9), "trial %d: total %.12g, best %.12g", trial, sum,
                  r.total);
        for (int st = 0; st < p.nstages; st++) {
            const ar_device *dv = &d[p.device[st]];
            cr_assert(dv->mem_bytes == 0 || p.stage_mem[st] <= dv->mem_bytes);
        }
        checked++;
    }
    cr_assert_gt(checked, 300);
    cr_assert_gt(infeasible, 0);
}

/* Every composition of the units into exactly nd stages, stage k on device k:
 * the best slowest stage and, among splits reaching it, the smallest total. */
static void brute_each(const ar_unit_cost *c, int n, const ar_device *d, int nd, int M, int sched,
                       brute_result *r)
{
    r->best = INFINITY;
    r->stages = nd;
    r->total = INFINITY;
    for (unsigned cuts = 0; cuts < (1u << (n - 1)); cuts++) {
        if (__builtin_popcount(cuts) != nd - 1)
            continue;
        double mx = 0, sum = 0;
        int a = 0, st = 0, ok = 1;
        for (int b = 1; b <= n && ok; b++) {
            if (b < n && !(cuts & (1u << (b - 1))))
                continue;
            double mem = ar_plan_stage_mem(c, n, a, b, ar_plan_slots(sched, nd, st, M));
            if (d[st].mem_bytes > 0 && mem > d[st].mem_bytes)
                ok = 0;
            double t = stage_seconds(c, n, a, b, &d[st], M);
            mx = fmax(mx, t);
            sum += t;
            a = b;
            st++;
        }
        if (!ok)
            continue;
        double tol = 1e-9 * fmax(mx, r->best == INFINITY ? 0 : r->best);
        if (mx < r->best - tol || (fabs(mx - r->best) <= tol && sum < r->total))
            r->best = fmin(mx, r->best), r->total = sum;
    }
}

/* A market lease: one stage on each of its providers, in order. */
Test(plan, one_stage_per_device_matches_brute_force)
{
    ar_rng rng;
    ar_rng_seed(&rng, 77);
    int checked = 0, infeasible = 0;
    for (int trial = 0; trial < 600; trial++) {
        int n = 1 + (int)ar_rng_below(&rng, 8);
        int nd = 1 + (int)ar_rng_below(&rng, (uint64_t)(n < 4 ? n : 4));
        int M = 1 + (int)ar_rng_below(&rng, 4);
        int sched = (int)ar_rng_below(&rng, 2) ? AR_SCHED_1F1B : AR_SCHED_GPIPE;
        ar_unit_cost c[8];
        for (int u = 0; u < n; u++) {
            memset(&c[u], 0, sizeof c[u]);
            c[u].flops = 1e9 * (0.1 + ar_rng_uniform(&rng));
            c[u].state_bytes = 1e6 * ar_rng_uniform(&rng);
            c[u].out_bytes = 1e5 * ar_rng_uniform(&rng);
            c[u].act_bytes = c[u].out_bytes + 5e5 * ar_rng_uniform(&rng);
            c[u].work_bytes = 2e5 * ar_rng_uniform(&rng);
        }
        ar_device d[4];
        for (int k = 0; k < nd; k++)
            d[k] = dev("d", 0.5 + 2 * ar_rng_uniform(&rng), ar_rng_below(&rng, 5) == 0 ? 0 : 1e6 + 4e6 * ar_rng_uniform(&rng),
                       0);
        brute_result r;
        brute_each(c, n, d, nd, M, sched, &r);
        ar_plan p;
        int rc = ar_plan_each(c, n, d, nd, M, sched, &p);
        if (r.best == INFINITY) {
            cr_assert_eq(rc, AR_ELIMIT, "trial %d: %d", trial, rc);
            infeasible++;
            continue;
        }
        cr_assert_eq(rc, AR_OK, "trial %d: %s", trial, ar_last_error());
        expect_well_formed(&p, n, nd);
        cr_assert_eq(p.nstages, nd);
        double sum = 0;
        for (int st = 0; st < nd; st++) {
            cr_assert_eq(p.device[st], st);
            sum += p.stage_time[st];
        }
        cr_assert(fabs(max_time(&p) - r.best) <= 1e-9 * r.best, "trial %d: %.12g, optimum %.12g", trial,
                  max_time(&p), r.best);
        cr_assert(sum <= r.total * (1 + 1e-9), "trial %d: total %.12g, best %.12g", trial, sum, r.total);
        checked++;
    }
    cr_assert_gt(checked, 300);
    cr_assert_gt(infeasible, 0);
    /* more devices than units */
    ar_unit_cost c[2] = {{.flops = 1e9}, {.flops = 1e9}};
    ar_device d[3] = {dev("a", 1, 0, 0), dev("b", 1, 0, 0), dev("c", 1, 0, 0)};
    ar_plan p;
    cr_assert_eq(ar_plan_each(c, 2, d, 3, 1, AR_SCHED_GPIPE, &p), AR_EINVAL);
    /* a stage's FLOPs per step: its units', times the micro-batches */
    int64_t f = 0;
    cr_assert_eq(ar_plan_stage_flops(c, 2, 0, 2, 3, &f), AR_OK);
    cr_assert_eq(f, 6000000000LL);
    cr_assert_eq(ar_plan_stage_flops(c, 2, 1, 1, 3, &f), AR_EINVAL);
    c[0].flops = 1e30;
    cr_assert_eq(ar_plan_stage_flops(c, 2, 0, 1, 1, &f), AR_ELIMIT);
}

/* ---- tensor-parallel groups ----------------------------------------------------------- */

Test(plan, a_block_splits_into_attention_mlp_and_the_leaders_rest)
{
    ar_model_spec s = gpt5m();
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&s, 4, c), AR_OK, "%s", ar_last_error());
    for (int u = 0; u < 8; u++) {
        int block = u >= 1 && u <= s.n_layer;
        cr_assert_eq(c[u].tp.heads, block ? s.n_head : 0, "unit %d", u);
        if (!block)
            continue;
        cr_assert_eq(c[u].tp.hidden, 4 * s.n_embd);
        cr_assert(fabs(c[u].tp.attn_flops + c[u].tp.mlp_flops - c[u].flops) <= 1e-9 * c[u].flops);
        cr_assert(fabs(c[u].tp.attn_state + c[u].tp.mlp_state + c[u].tp.leader_state - c[u].state_bytes) < 1);
        /* LayerNorms and two projection biases: 6 C values, with gradient and moments */
        cr_assert_eq(c[u].tp.leader_state, 4.0 * 6 * s.n_embd * 4);
        /* a message carries B T C floats and a header of a few bytes */
        double payload = 4.0 * 128 * s.n_embd * 4;
        cr_assert(c[u].tp.msg_bytes > payload && c[u].tp.msg_bytes < payload + 40, "%g", c[u].tp.msg_bytes);
        cr_assert(c[u].tp.reply_bytes > payload && c[u].tp.reply_bytes < payload + 40);
    }
}

/* Bytes a real rank holding `heads` and `hidden` of blocks [fb, fb+nb) allocates. */
static double real_rank_bytes(const ar_model_spec *spec, int fb, int nb, ar_range heads, ar_range hidden,
                              int B, int slots)
{
    ar_range hr[8], ur[8];
    for (int b = 0; b < nb; b++)
        hr[b] = heads, ur[b] = hidden;
    ar_tp_rank r;
    double before = allocated_bytes();
    cr_assert_eq(ar_tp_rank_create(&r, spec, fb, nb, hr, ur, B, slots, 7, &adamw), AR_OK, "%s",
                 ar_last_error());
    double bytes = allocated_bytes() - before;
    ar_tp_rank_destroy(&r);
    return bytes;
}

Test(plan, a_members_memory_matches_a_real_rank)
{
#if HAVE_ALLOC_COUNT
    ar_model_spec s = gpt5m();
    ar_unit_cost c[8];
    int B = 2, slots = 3;
    cr_assert_eq(ar_plan_unit_costs(&s, B, c), AR_OK, "%s", ar_last_error());
    ar_device d[3] = {dev("a", 10, 0, 0), dev("b", 10, 0, 0), dev("c", 20, 0, 0)};
    int members[3] = {0, 1, 2};
    ar_group_cost gc;
    /* blocks 1-3 (units 2-4) over three devices, split by speed: heads 1+1+2 */
    cr_assert_eq(ar_plan_group_cost(c, 8, 2, 5, d, members, 3, 1, slots, 4, &gc), AR_OK, "%s", ar_last_error());
    ar_range heads[3], hidden[3];
    double w[3] = {10, 10, 20};
    cr_assert_eq(ar_tp_split(s.n_head, 3, w, heads), AR_OK);
    cr_assert_eq(ar_tp_split(4 * s.n_embd, 3, w, hidden), AR_OK);
    for (int k = 1; k < 3; k++) {
        double real = real_rank_bytes(&s, 1, 3, heads[k], hidden[k], B, slots);
        cr_assert(fabs(gc.mem[k] / real - 1) < 0.05, "member %d: predicted %.0f, real %.0f bytes", k,
                  gc.mem[k], real);
    }
    /* the faster member does twice the work in the same time */
    cr_assert(fabs(gc.compute[2] / gc.compute[1] - 1) < 1e-9, "%g %g", gc.compute[1], gc.compute[2]);
#endif
}

Test(plan, an_mlp_members_memory_matches_a_real_rank)
{
#if HAVE_ALLOC_COUNT
    ar_model_spec s;
    memset(&s, 0, sizeof s);
    s.type = AR_MODEL_MLP;
    s.inputs = 784;
    s.n_hidden = 3;
    s.hidden[0] = 48, s.hidden[1] = 32, s.hidden[2] = 16;
    s.classes = 10;
    s.activation = AR_ACT_RELU;
    ar_unit_cost c[4];
    int B = 16, slots = 2;
    cr_assert_eq(ar_plan_unit_costs(&s, B, c), AR_OK, "%s", ar_last_error());
    ar_device d[2] = {dev("a", 10, 0, 0), dev("b", 10, 0, 0)};
    int members[2] = {0, 1};
    ar_group_cost gc;
    /* pairs (0,1) and (2,3): 48 units as 24+24, 16 as 8+8 */
    cr_assert_eq(ar_plan_group_cost(c, 4, 0, 4, d, members, 2, 0, slots, 4, &gc), AR_OK, "%s", ar_last_error());
    ar_range heads[2] = {{0, 1}, {0, 1}}, hidden[2] = {{24, 48}, {8, 16}};
    ar_tp_rank r;
    double before = allocated_bytes();
    cr_assert_eq(ar_tp_rank_create(&r, &s, 0, 2, heads, hidden, B, slots, 7, &adamw), AR_OK, "%s", ar_last_error());
    double real = allocated_bytes() - before;
    ar_tp_rank_destroy(&r);
    cr_assert(fabs(gc.mem[1] / real - 1) < 0.05, "predicted %.0f, real %.0f bytes", gc.mem[1], real);
    /* 4 micro-batches; per pair 4 messages: its input (784, then 32 wide)
     * and output (32, then 10) out and back, B rows of 4-byte floats */
    double payload = 4.0 * 2 * B * (784 + 32 + 32 + 10) * 4;
    cr_assert(gc.bytes > payload && gc.bytes < payload * 1.02, "%g vs %g", gc.bytes, payload);
    /* an odd last layer stays with the leader: units 1-3 are one pair and one whole layer */
    ar_group_cost odd;
    cr_assert_eq(ar_plan_group_cost(c, 4, 1, 4, d, members, 2, 0, slots, 4, &odd), AR_OK, "%s", ar_last_error());
    cr_assert(fabs(odd.compute[0] - (c[1].flops + c[2].flops) / 2 / 10e9) < 1e-12);
    cr_assert_gt(odd.time, odd.compute[0] + c[3].flops / 10e9);
#endif
}

Test(plan, group_bytes_count_every_message_of_a_step)
{
    ar_model_spec s = gpt5m();
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&s, 2, c), AR_OK, "%s", ar_last_error());
    ar_device d[3] = {dev("a", 10, 0, 1e9), dev("b", 10, 0, 1e8), dev("c", 10, 0, 0)};
    int members[3] = {0, 1, 2};
    ar_group_cost g2, g3;
    cr_assert_eq(ar_plan_group_cost(c, 8, 0, 8, d, members, 2, 0, 1, 8, &g2), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_plan_group_cost(c, 8, 0, 8, d, members, 3, 0, 1, 8, &g3), AR_OK, "%s", ar_last_error());
    /* 8 micro-batches x 6 blocks x 4 requests and 4 replies of B T C floats */
    double payload = 8.0 * 6 * 8 * (2.0 * 128 * 256 * 4);
    cr_assert(g2.bytes > payload && g2.bytes < payload * 1.001, "%g vs %g", g2.bytes, payload);
    cr_assert(fabs(g3.bytes - 2 * g2.bytes) < 1e-6 * g2.bytes, "two members move twice as much");
    /* at b's 100 MB/s, then c's default; and 8 messages per block and
     * micro-batch, 4 per step, each costing AR_PLAN_MESSAGE_S */
    double latency = (8.0 * 6 * 8 + 4) * AR_PLAN_MESSAGE_S / 8;
    cr_assert(fabs(g2.transfer - g2.bytes / 8 / 1e8 - latency) < 1e-12);
    cr_assert(fabs(g3.transfer - g2.bytes / 8 / 1e8 - g2.bytes / 8 / AR_PLAN_DEFAULT_BANDWIDTH - 2 * latency) < 1e-12);
    cr_assert(g2.time > g2.compute[0] + g2.transfer);

    /* not splittable: no block, or more members than heads */
    cr_assert_eq(ar_plan_group_cost(c, 8, 7, 8, d, members, 2, 0, 1, 8, &g2), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "no transformer block"), "%s", ar_last_error());
    ar_device many[5] = {d[0], d[0], d[0], d[0], d[0]};
    int five[5] = {0, 1, 2, 3, 4};
    cr_assert_eq(ar_plan_group_cost(c, 8, 0, 8, many, five, 5, 0, 1, 8, &g2), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "4 attention heads"), "%s", ar_last_error());
}

static ar_model_spec wide_gpt(int n_layer)
{
    ar_model_spec s = small_gpt(n_layer);
    s.n_head = 8;
    s.n_embd = 512;
    s.block_size = 64;
    return s;
}

static char *plan_text(const ar_plan *p, const ar_device *d, const ar_unit_cost *c, const ar_model_spec *s)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    cr_assert_not_null(f);
    ar_plan_print(f, p, d, c, s);
    fclose(f);
    if (getenv("AR_PLAN_SHOW"))
        fputs(text, stdout);
    return text;
}

Test(plan, blocks_too_big_for_any_device_go_to_a_group)
{
    ar_model_spec s = wide_gpt(1);
    ar_unit_cost c[3];
    int B = 4, M = 4;
    cr_assert_eq(ar_plan_unit_costs(&s, B, c), AR_OK, "%s", ar_last_error());
    /* memory for the three units on a pair, with 5% to spare; not for one block alone */
    ar_device d[2] = {dev("left", 20, 0, 1e9), dev("right", 20, 0, 1e9)};
    int pair[2] = {0, 1};
    ar_group_cost gc;
    cr_assert_eq(ar_plan_group_cost(c, 3, 0, 3, d, pair, 2, 0, 1, M, &gc), AR_OK, "%s", ar_last_error());
    double mem = 1.05 * fmax(gc.mem[0], gc.mem[1]);
    cr_assert_lt(mem, ar_plan_stage_mem(c, 3, 1, 2, 1), "a block alone must not fit");
    d[0].mem_bytes = d[1].mem_bytes = mem;

    ar_plan p;
    cr_assert_eq(ar_plan_auto(c, 3, d, 2, M, AR_SCHED_1F1B, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.nstages, 1);
    cr_assert_eq(p.group_size[0], 2);
    cr_assert_eq(p.group[0][0], 0);
    cr_assert_eq(p.group[0][1], 1);
    cr_assert_eq(p.by_speed[0], 0, "equal devices split equally");
    cr_assert(p.member_mem[0][0] <= mem && p.member_mem[0][1] <= mem);
    cr_assert_gt(p.tp_bytes[0], 0.0);
    char *text = plan_text(&p, d, c, &s);
    cr_assert_not_null(strstr(text, "left+right"), "%s", text);
    cr_assert_not_null(strstr(text, "left: heads 0-3, hidden units 0-1023"), "%s", text);
    cr_assert_not_null(strstr(text, "right: heads 4-7, hidden units 1024-2047"), "%s", text);
    cr_assert_not_null(strstr(text, "MB per step"), "%s", text);
    free(text);

    /* with a tenth less memory nothing fits, and the error says so */
    d[0].mem_bytes = d[1].mem_bytes = mem * 0.9 / 1.05;
    cr_assert_eq(ar_plan_auto(c, 3, d, 2, M, AR_SCHED_1F1B, &p), AR_ELIMIT);
    cr_assert_not_null(strstr(ar_last_error(), "group"), "%s", ar_last_error());

    /* a plan by hand on one device says which does not fit, a group's which member */
    d[0].mem_bytes = d[1].mem_bytes = mem;
    cr_assert_eq(ar_plan_parse_devices("0-2@1+0", 3, d, 2, &p), AR_OK, "%s", ar_last_error());
    d[0].mem_bytes = gc.mem[1] * 0.5;
    cr_assert_eq(ar_plan_estimate(&p, c, 3, d, 2, M, AR_SCHED_1F1B), AR_ELIMIT);
    cr_assert_not_null(strstr(ar_last_error(), "device 0 (left) of its group"), "%s", ar_last_error());
}

Test(plan, a_group_is_chosen_when_its_link_is_fast_enough)
{
    /* three blocks over two devices: a pipeline's slowest stage holds two,
     * a group does half of all three, plus its transfers */
    ar_model_spec s = wide_gpt(3);
    s.n_embd = 256;
    ar_unit_cost c[5];
    int M = 4;
    cr_assert_eq(ar_plan_unit_costs(&s, 4, c), AR_OK, "%s", ar_last_error());
    ar_device d[2] = {dev("a", 10, 1e10, 1e12), dev("b", 10, 1e10, 1e12)};
    ar_plan p, group, pipe;
    cr_assert_eq(ar_plan_auto(c, 5, d, 2, M, AR_SCHED_1F1B, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.nstages, 1, "fast link: one stage on a group");
    cr_assert_eq(p.group_size[0], 2);
    cr_assert_eq(ar_plan_parse("0-2,3-4", 5, 2, &pipe), AR_OK);
    cr_assert_eq(ar_plan_estimate(&pipe, c, 5, d, 2, M, AR_SCHED_1F1B), AR_OK, "%s", ar_last_error());
    cr_assert_lt(max_time(&p), max_time(&pipe));
    /* a device that cannot join a group (a market provider, an older worker) */
    d[1].solo = 1;
    cr_assert_eq(ar_plan_auto(c, 5, d, 2, M, AR_SCHED_1F1B, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.nstages, 2, "no group with a solo device");
    d[1].solo = 0;

    /* 26 MB/s: the group's transfers (24 messages of B T C floats per
     * micro-batch, each way) cost more than the split saves */
    d[0].bandwidth = d[1].bandwidth = 2.6e7;
    cr_assert_eq(ar_plan_auto(c, 5, d, 2, M, AR_SCHED_1F1B, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.nstages, 2, "slow link: a plain pipeline");
    cr_assert(p.group_size[0] <= 1 && p.group_size[1] <= 1);
    cr_assert_eq(ar_plan_parse("0-4@0+1", 5, 2, &group), AR_OK);
    cr_assert_eq(ar_plan_estimate(&group, c, 5, d, 2, M, AR_SCHED_1F1B), AR_OK, "%s", ar_last_error());
    cr_assert_lt(max_time(&p), max_time(&group));
    cr_assert_gt(group.stage_time[0], c[1].flops * 3 / 2 / 10e9 + group.tp_bytes[0] / M / 2.6e7 * 0.999);

    /* an MLP has nothing to split: never a group */
    ar_model_spec m;
    cr_assert_eq(ar_spec_load("configs/mlp-fashion.json", &m), AR_OK, "%s", ar_last_error());
    ar_unit_cost mc[3];
    cr_assert_eq(ar_plan_unit_costs(&m, 32, mc), AR_OK, "%s", ar_last_error());
    d[0].bandwidth = d[1].bandwidth = 1e12;
    cr_assert_eq(ar_plan_auto(mc, 3, d, 2, M, AR_SCHED_1F1B, &p), AR_OK, "%s", ar_last_error());
    for (int st = 0; st < p.nstages; st++)
        cr_assert_leq(p.group_size[st], 1);
}

/* Every plan with groups of consecutive devices: each device is skipped,
 * starts a stage, or joins the stage of the device just before it; every
 * composition of the units; priced by ar_plan_estimate. */
static void brute_groups(const ar_unit_cost *c, int n, const ar_device *d, int nd, int M, int sched,
                         brute_result *r)
{
    r->best = INFINITY;
    r->stages = 0;
    r->total = INFINITY;
    int labels = 1;
    for (int k = 0; k < nd; k++)
        labels *= 3;
    for (int code = 0; code < labels; code++) {
        ar_plan p;
        memset(&p, 0, sizeof p);
        int S = 0, ok = 1, prev_used = 0;
        for (int k = 0, x = code; k < nd; k++, x /= 3) {
            int label = x % 3; /* 0 skip, 1 new stage, 2 join */
            if (label == 2 && !prev_used)
                ok = 0;
            if (label == 1) {
                p.device[S] = k;
                p.group[S][0] = k;
                p.group_size[S] = 1;
                S++;
            } else if (label == 2 && ok) {
                p.group[S - 1][p.group_size[S - 1]++] = k;
            }
            prev_used = label != 0;
        }
        if (!ok || S == 0 || S > n)
            continue;
        p.nstages = S;
        for (int st = 0; st < S; st++)
            p.by_speed[st] = 0;
        for (int st = 0; st < S; st++)
            for (int m = 1; m < p.group_size[st]; m++)
                p.by_speed[st] |= d[p.group[st][m]].gflops != d[p.group[st][0]].gflops;
        for (unsigned cuts = 0; cuts < (1u << (n - 1)); cuts++) {
            if (__builtin_popcount(cuts) != S - 1)
                continue;
            int a = 0, st = 0;
            for (int b = 1; b <= n; b++)
                if (b == n || (cuts & (1u << (b - 1)))) {
                    p.first[st] = a;
                    p.last[st] = b;
                    a = b;
                    st++;
                }
            int blockless = 0; /* a group needs a block to split (estimates price others as one device) */
            for (st = 0; st < S; st++) {
                int blocks = 0;
                for (int u = p.first[st]; u < p.last[st]; u++)
                    blocks += c[u].tp.heads > 0;
                blockless |= p.group_size[st] > 1 && blocks == 0;
            }
            if (blockless || ar_plan_estimate(&p, c, n, d, nd, M, sched) != AR_OK)
                continue; /* does not fit, or a group without a block */
            double mx = 0, sum = 0;
            for (st = 0; st < S; st++) {
                mx = fmax(mx, p.stage_time[st]);
                sum += p.stage_time[st];
            }
            double tol = 1e-9 * fmax(mx, r->best == INFINITY ? 0 : r->best);
            if (mx < r->best - tol) {
                r->best = mx, r->stages = S, r->total = sum;
            } else if (fabs(mx - r->best) <= tol) {
                if (S < r->stages || (S == r->stages && sum < r->total))
                    r->stages = S, r->total = sum;
            }
        }
    }
}

Test(plan, the_dynamic_program_with_groups_matches_brute_force)
{
    ar_rng rng;
    ar_rng_seed(&rng, 4242);
    int checked = 0, grouped = 0;
    for (int trial = 0; trial < 300; trial++) {
        int n = 1 + (int)ar_rng_below(&rng, 6);
        int nd = 1 + (int)ar_rng_below(&rng, 4);
        int M = 1 + (int)ar_rng_below(&rng, 4);
        int sched = (int)ar_rng_below(&rng, 2) ? AR_SCHED_1F1B : AR_SCHED_GPIPE;
        ar_unit_cost c[8];
        for (int u = 0; u < n; u++) {
            memset(&c[u], 0, sizeof c[u]);
            c[u].flops = 1e9 * (0.1 + ar_rng_uniform(&rng));
            c[u].state_bytes = 1e6 * ar_rng_uniform(&rng);
            c[u].param_bytes = c[u].state_bytes / 4;
            c[u].out_bytes = 1e5 * ar_rng_uniform(&rng);
            c[u].act_bytes = c[u].out_bytes + 5e5 * ar_rng_uniform(&rng);
            c[u].work_bytes = 2e5 * ar_rng_uniform(&rng);
            if (ar_rng_below(&rng, 3) == 0)
                continue; /* not splittable */
            double f = ar_rng_uniform(&rng), st = ar_rng_uniform(&rng);
            c[u].tp.heads = 2 + (int)ar_rng_below(&rng, 3);
            c[u].tp.hidden = 4 * c[u].tp.heads;
            c[u].tp.attn_flops = c[u].flops * f;
            c[u].tp.mlp_flops = c[u].flops * (1 - f);
            c[u].tp.leader_state = 0.05 * c[u].state_bytes;
            c[u].tp.attn_state = 0.95 * c[u].state_bytes * st;
            c[u].tp.mlp_state = 0.95 * c[u].state_bytes * (1 - st);
            c[u].tp.attn_act = 3e5 * ar_rng_uniform(&rng);
            c[u].tp.mlp_act = 3e5 * ar_rng_uniform(&rng);
            c[u].tp.rank_act = 2 * c[u].out_bytes;
            c[u].tp.rank_work = c[u].work_bytes;
            c[u].tp.leader_act = c[u].out_bytes * 5;
            c[u].tp.leader_work = c[u].out_bytes * 4;
            c[u].tp.msg_bytes = c[u].tp.reply_bytes = c[u].out_bytes + 20;
        }
        ar_device d[4];
        for (int k = 0; k < nd; k++) {
            char name[16];
            snprintf(name, sizeof name, "dev%d", k);
            d[k] = dev(name, 0.5 + 2 * ar_rng_uniform(&rng),
                       ar_rng_below(&rng, 4) == 0 ? 0 : 5e5 + 3e6 * ar_rng_uniform(&rng),
                       ar_rng_below(&rng, 3) == 0 ? 0 : 1e8 * (0.1 + 20 * ar_rng_uniform(&rng)));
        }
        brute_result r;
        brute_groups(c, n, d, nd, M, sched, &r);
        ar_plan p;
        ar_log_set_level(AR_LOG_ERROR);
        int rc = ar_plan_auto(c, n, d, nd, M, sched, &p);
        ar_log_set_level(AR_LOG_INFO);
        if (r.best == INFINITY) {
            cr_assert_eq(rc, AR_ELIMIT, "trial %d: brute force finds no plan, the planner returns %d", trial, rc);
            continue;
        }
        cr_assert_eq(rc, AR_OK, "trial %d: %s", trial, ar_last_error());
        double got = max_time(&p), sum = 0;
        for (int st = 0; st < p.nstages; st++) {
            sum += p.stage_time[st];
            grouped += p.group_size[st] > 1;
        }
        cr_assert(fabs(got - r.best) <= 1e-9 * r.best, "trial %d: slowest stage %.12g, optimum %.12g", trial,
                  got, r.best);
        cr_assert_eq(p.nstages, r.stages, "trial %d: %d stages, the fewest reaching the optimum is %d", trial,
                     p.nstages, r.stages);
        cr_assert(sum <= r.total * (1 + 1e-9), "trial %d: total %.12g, best %.12g", trial, sum, r.total);
        checked++;
    }
    cr_assert_gt(checked, 150);
    cr_assert_gt(grouped, 20, "only %d plans used a group", grouped);
}

/* ---- plans by hand -------------------------------------------------------------------- */

static void expect_parse_fail(const char *text, int nunits, int ndev, const char *needle)
{
    ar_plan p;
    int rc = ar_plan_parse(text, nunits, ndev, &p);
    cr_assert_eq(rc, AR_EINVAL, "\"%s\": got %d, want AR_EINVAL", text, rc);
    cr_assert_not_null(strstr(ar_last_error(), needle), "\"%s\": message \"%s\" lacks \"%s\"", text,
                       ar_last_error(), needle);
}

Test(plan, parse_good_plans)
{
    ar_plan p;
    cr_assert_eq(ar_plan_parse("0-2,3-7", 8, 2, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.nstages, 2);
    cr_assert_eq(p.first[0], 0);
    cr_assert_eq(p.last[0], 3);
    cr_assert_eq(p.first[1], 3);
    cr_assert_eq(p.last[1], 8);
    cr_assert_eq(p.device[0], 0);
    cr_assert_eq(p.device[1], 1);

    cr_assert_eq(ar_plan_parse(" 0 - 3 , 4,5-7 ", 8, 3, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.nstages, 3);
    cr_assert_eq(p.first[1], 4);
    cr_assert_eq(p.last[1], 5);
    cr_assert_eq(ar_plan_parse("0-7", 8, 1, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.nstages, 1);
}

Test(plan, parse_bad_plans)
{
    expect_parse_fail("0-2,4-7", 8, 2, "starts at layer 4, expected 3");
    expect_parse_fail("0-2,2-7", 8, 2, "starts at layer 2, expected 3");
    expect_parse_fail("1-7", 8, 1, "starts at layer 1, expected 0");
    expect_parse_fail("0-8", 8, 1, "beyond the last layer 7");
    expect_parse_fail("2-1", 8, 1, "reversed");
    expect_parse_fail("a-b", 8, 1, "expected a layer number");
    expect_parse_fail("0-a", 8, 1, "expected a layer number");
    expect_parse_fail("", 8, 1, "expected a layer number");
    expect_parse_fail("0-3,", 8, 2, "expected a layer number");
    expect_parse_fail("0-3;4-7", 8, 2, "expected ','");
    expect_parse_fail("0--3", 8, 1, "expected a layer number");
    expect_parse_fail("0-1,2-3,4-7", 8, 2, "more stages than the 2 devices");
    expect_parse_fail("0-2,3-5", 8, 2, "ends at layer 5");
    expect_parse_fail("0-99999999999", 8, 1, "too large");
}

Test(plan, parse_groups_and_their_split)
{
    ar_device devs[3] = {dev("127.0.0.1:5000", 300, 0, 0), dev("127.0.0.1:5001", 100, 0, 0),
                         dev("c", 100, 0, 0)};
    ar_plan p;
    cr_assert_eq(ar_plan_parse_devices("0-3@127.0.0.1:5000+1,4-5@c", 6, devs, 3, &p), AR_OK, "%s",
                 ar_last_error());
    cr_assert_eq(p.nstages, 2);
    cr_assert_eq(p.group_size[0], 2);
    cr_assert_eq(p.group[0][0], 0);
    cr_assert_eq(p.group[0][1], 1);
    cr_assert_eq(p.device[1], 2);
    cr_assert_eq(p.by_speed[0], 0);
    double w[AR_PLAN_MAX_GROUP];
    ar_plan_group_weights(&p, devs, 0, w);
    cr_assert(w[0] == 1 && w[1] == 1, "an equal split unless the plan says ~speed");
    cr_assert_eq(ar_plan_parse_devices("0-3@0+1~speed,4-5@2", 6, devs, 3, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.by_speed[0], 1);
    cr_assert_eq(p.by_speed[1], 0);
    ar_plan_group_weights(&p, devs, 0, w);
    cr_assert(w[0] == 300 && w[1] == 100, "weights %g %g", w[0], w[1]);

    cr_assert_eq(ar_plan_parse_devices("0-3@0+0", 6, devs, 3, &p), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "used twice"), "%s", ar_last_error());
    cr_assert_eq(ar_plan_parse_devices("0-5@0+1~fast", 6, devs, 3, &p), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "~speed"), "%s", ar_last_error());
    cr_assert_eq(ar_plan_parse_devices("0-5@0~speed", 6, devs, 3, &p), AR_EINVAL);
    cr_assert_eq(ar_plan_parse_devices("0-5@0+9", 6, devs, 3, &p), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "no device"), "%s", ar_last_error());
}

Test(plan, estimate_a_plan_by_hand)
{
    ar_model_spec s = gpt5m();
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&s, 4, c), AR_OK, "%s", ar_last_error());
    ar_device d[2] = {dev("a", 10, 1e11, 2e9), dev("b", 5, 1e11, 0)};
    ar_plan p;
    cr_assert_eq(ar_plan_parse("0-3,4-7", 8, 2, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_plan_estimate(&p, c, 8, d, 2, 6, AR_SCHED_1F1B), AR_OK, "%s", ar_last_error());
    double f0 = 0, f1 = 0;
    for (int u = 0; u < 4; u++)
        f0 += c[u].flops;
    for (int u = 4; u < 8; u++)
        f1 += c[u].flops;
    /* the longer of compute and the link's transfer (it overlaps compute) */
    double down, up;
    ar_plan_link_mb_bytes(c, 4, 6, AR_COMPRESS_NONE, &down, &up);
    cr_assert(fabs(p.stage_time[0] - fmax(f0 / 10e9, fmax(down, up) / 2e9)) < 1e-12);
    cr_assert(fabs(p.stage_time[1] - f1 / 5e9) < 1e-12, "the last stage sends nothing");
    cr_assert_gt(down, c[3].out_bytes, "a frame is its tensor and a header");
    cr_assert_lt(down, c[3].out_bytes + 5000.0);
    /* on a slow link the transfer is the stage's time */
    d[0].bandwidth = 1e5;
    cr_assert_eq(ar_plan_estimate(&p, c, 8, d, 2, 6, AR_SCHED_1F1B), AR_OK, "%s", ar_last_error());
    cr_assert(fabs(p.stage_time[0] - fmax(down, up) / 1e5) < 1e-12);
    d[0].bandwidth = 2e9;
    cr_assert_eq(ar_plan_estimate(&p, c, 8, d, 2, 6, AR_SCHED_1F1B), AR_OK, "%s", ar_last_error());
    cr_assert(fabs(p.bubble - 1.0 / 7.0) < 1e-12);
    /* 1F1B: stage 0 keeps 3 micro-batches in flight (2 + 1 to overlap transfers) */
    cr_assert_eq(p.stage_mem[0], ar_plan_stage_mem(c, 8, 0, 4, 3));
    cr_assert_eq(p.stage_mem[1], ar_plan_stage_mem(c, 8, 4, 8, 1));

    /* a stage that does not fit: still priced, and the error says which */
    d[1].mem_bytes = 1e6;
    cr_assert_eq(ar_plan_estimate(&p, c, 8, d, 2, 6, AR_SCHED_1F1B), AR_ELIMIT);
    cr_assert_not_null(strstr(ar_last_error(), "stage 1"), "%s", ar_last_error());
    cr_assert_gt(p.stage_time[1], 0.0);

    /* malformed plans */
    p.last[0] = 3;
    cr_assert_eq(ar_plan_estimate(&p, c, 8, d, 2, 6, AR_SCHED_1F1B), AR_EINVAL);
    p.last[0] = 4;
    p.device[1] = 0;
    cr_assert_eq(ar_plan_estimate(&p, c, 8, d, 2, 6, AR_SCHED_1F1B), AR_EINVAL);
}

/* ---- printing and probes ---------------------------------------------------------------- */

Test(plan, print_names_the_layers)
{
    ar_model_spec s = gpt5m();
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&s, 4, c), AR_OK, "%s", ar_last_error());
    ar_device d[3] = {dev("laptop", 40, 8e9, 1e9), dev("desktop", 80, 16e9, 1e9),
                      dev("server", 40, 8e9, 0)};
    ar_plan p;
    cr_assert_eq(ar_plan_auto(c, 8, d, 3, 4, AR_SCHED_1F1B, &p), AR_OK, "%s", ar_last_error());
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    cr_assert_not_null(f);
    ar_plan_print(f, &p, d, c, &s);
    fclose(f);
    cr_assert_not_null(strstr(text, "embedding"), "%s", text);
    cr_assert_not_null(strstr(text, "head"), "%s", text);
    cr_assert_not_null(strstr(text, "block"), "%s", text);
    cr_assert_not_null(strstr(text, "desktop"), "%s", text);
    cr_assert_not_null(strstr(text, "bubble"), "%s", text);
    if (getenv("AR_PLAN_SHOW"))
        fputs(text, stdout);
    free(text);

    /* MLP and spec-less names */
    ar_model_spec m;
    cr_assert_eq(ar_spec_load("configs/mlp-fashion.json", &m), AR_OK, "%s", ar_last_error());
    ar_unit_cost mc[3];
    cr_assert_eq(ar_plan_unit_costs(&m, 32, mc), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_plan_parse("0-1,2", 3, 3, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_plan_estimate(&p, mc, 3, d, 3, 2, AR_SCHED_GPIPE), AR_OK, "%s", ar_last_error());
    f = open_memstream(&text, &len);
    ar_plan_print(f, &p, d, mc, &m);
    ar_plan_print(f, &p, d, mc, NULL);
    fclose(f);
    cr_assert_not_null(strstr(text, "linear 0-1"), "%s", text);
    cr_assert_not_null(strstr(text, "linear 2"), "%s", text);
    cr_assert_not_null(strstr(text, "units 0-1"), "%s", text);
    free(text);
}

/* The plan as the market's dashboard gets it (train/market_plan.h): layers in
 * words, devices with their leased provider ids, and a tensor-parallel
 * group's heads and hidden units. */
Test(plan, market_plan_names_layers_providers_and_shares)
{
    ar_model_spec s = small_gpt(2); /* units: embedding, block 0, block 1, head */
    ar_device devs[3] = {dev("10.0.0.1:7000", 100, 0, 0), dev("10.0.0.2:7000", 100, 0, 0),
                         dev("10.0.0.3:7000", 100, 0, 0)};
    ar_plan p;
    cr_assert_eq(ar_plan_parse_devices("0-1@0+1,2-3@2", 4, devs, 3, &p), AR_OK, "%s", ar_last_error());
    ar_market_lease lease = {.n = 2};
    lease.providers[0].p.id = 11;
    snprintf(lease.providers[0].p.address, sizeof lease.providers[0].p.address, "10.0.0.1:7000");
    lease.providers[1].p.id = 33;
    snprintf(lease.providers[1].p.address, sizeof lease.providers[1].p.address, "10.0.0.3:7000");
    ar_market_plan_stage st[2];
    char layers[2][AR_LAYERS_TEXT_MAX], shares[2 * AR_PLAN_MAX_GROUP][AR_PLAN_SHARE_TEXT];
    ar_market_plan_fill(&p, devs, &s, &lease, st, layers, shares);

    cr_assert_str_eq(st[0].layers, "embedding, block 0");
    cr_assert_eq(st[0].first_unit, 0);
    cr_assert_eq(st[0].last_unit, 2);
    cr_assert_eq(st[0].n_members, 2);
    cr_assert_str_eq(st[0].members[0].device, "10.0.0.1:7000");
    cr_assert_eq(st[0].members[0].provider_id, 11);
    cr_assert_eq(st[0].members[1].provider_id, 0); /* not a leased provider */
    /* 4 heads and 256 hidden units, shared by two devices of one speed */
    cr_assert_eq(st[0].members[0].head_begin, 0);
    cr_assert_eq(st[0].members[0].head_end, 2);
    cr_assert_eq(st[0].members[1].head_begin, 2);
    cr_assert_eq(st[0].members[1].head_end, 4);
    cr_assert_eq(st[0].members[0].hidden_end, 128);
    cr_assert_eq(st[0].members[1].hidden_begin, 128);
    cr_assert_eq(st[0].members[1].hidden_end, 256);
    cr_assert_str_eq(st[0].members[1].share, "heads 2-3, hidden units 128-255 of each block");

    cr_assert_str_eq(st[1].layers, "block 1, head");
    cr_assert_eq(st[1].n_members, 1);
    cr_assert_eq(st[1].members[0].provider_id, 33);
    cr_assert_eq(st[1].members[0].head_end, st[1].members[0].head_begin); /* whole layers */
    cr_assert_null(st[1].members[0].share);
}
