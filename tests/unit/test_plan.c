/* The planner: unit costs against the real stage, the dynamic program
 * against brute force, plans by hand, and the printed table. */
#include "core/core.h"
#include "nn/spec.h"
#include "train/market_plan.h"
#include "train/plan.h"
#include "train/schedule.h"
#include "train/stage.h"

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

static double stage_seconds(const ar_unit_cost *c, int n, int a, int b, const ar_device *d)
{
    double f = 0;
    for (int u = a; u < b; u++)
        f += c[u].flops;
    double bw = d->bandwidth > 0 ? d->bandwidth : AR_PLAN_DEFAULT_BANDWIDTH;
    return f / (d->gflops * 1e9) + (b < n ? c[b - 1].out_bytes / bw : 0.0);
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
                double t = stage_seconds(c, n, a, b, dv);
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
    cr_assert(fabs(p.stage_time[0] - (f0 / 10e9 + c[3].out_bytes / 2e9)) < 1e-12);
    cr_assert(fabs(p.stage_time[1] - f1 / 5e9) < 1e-12, "the last stage sends nothing");
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

Test(plan, probes_measure_something)
{
    double g = ar_probe_sgemm_gflops(0.05);
    cr_assert(g > 0 && isfinite(g), "%g GFLOP/s", g);
#ifdef __linux__
    cr_assert_gt(ar_free_memory_bytes(), 1e6);
#endif
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
