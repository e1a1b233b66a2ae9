/* Slow links (docs/DESIGN.md, "Slow links"): compressed tensors and their
 * checks, links that compress and count, measuring a link, the warm-up that
 * covers a round trip, and the planner's choice of codec and its prediction
 * of each link's bytes against what an in-process pipeline counts. */
#include "core/core.h"
#include "nn/spec.h"
#include "train/frame.h"
#include "train/local.h"
#include "train/pipeline.h"
#include "train/plan.h"
#include "train/probe.h"
#include "train/schedule.h"

#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* A (rows, cols) float32 ACT frame of values with a spread of magnitudes
 * (some rows a thousand times larger: what a per-block scale is for). */
static ar_frame tensor_frame(int kind, int rows, int cols, uint64_t seed, float **copy)
{
    ar_rng r;
    ar_rng_seed(&r, seed);
    size_t n = (size_t)rows * (size_t)cols;
    float *x = malloc(n * sizeof *x);
    cr_assert_not_null(x);
    for (size_t i = 0; i < n; i++)
        x[i] = ar_rng_normal(&r) * ((i / (size_t)cols) % 7 == 0 ? 1000.0f : 1.0f);
    ar_frame f = {.kind = kind, .step = 5, .mb = 1, .nmb = 4, .rows = rows};
    int64_t shape[2] = {rows, cols};
    cr_assert_eq(ar_frame_set_payload(&f, AR_DT_F32, 2, shape, x), AR_OK);
    *copy = x;
    return f;
}

Test(compress, bf16_round_trip)
{
    float *x;
    ar_frame f = tensor_frame(AR_FRAME_ACT, 16, 100, 1, &x);
    cr_assert_eq(ar_frame_compress(&f, AR_COMPRESS_BF16), AR_OK);
    cr_assert_eq(f.dtype, AR_DT_BF16);
    cr_assert_eq(f.nbytes, 1600 * 2);
    cr_assert_eq(ar_frame_validate(&f, 1 << 20), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_frame_decompress(&f), AR_OK, "%s", ar_last_error());
    cr_assert_eq(f.dtype, AR_DT_F32);
    cr_assert_eq(f.nbytes, 1600 * 4);
    const float *y = f.data;
    for (int i = 0; i < 1600; i++) /* 8 significant bits, rounded: half a unit of the last */
        cr_assert_leq(fabsf(y[i] - x[i]), fabsf(x[i]) * (1.0f / 256), "element %d: %g -> %g", i, x[i], y[i]);
    ar_frame_free(&f);
    free(x);
}

Test(compress, int8_round_trip_keeps_each_block_within_half_a_step)
{
    float *x;
    ar_frame f = tensor_frame(AR_FRAME_GRAD, 10, 77, 2, &x); /* 770 values: blocks of 256, 256, 256, 2 */
    cr_assert_eq(ar_frame_compress(&f, AR_COMPRESS_INT8), AR_OK);
    cr_assert_eq(f.dtype, AR_DT_Q8);
    cr_assert_eq(f.nbytes, 770 + 4 * 4, "the values and a scale per block");
    cr_assert_eq(ar_frame_validate(&f, 1 << 20), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_frame_decompress(&f), AR_OK, "%s", ar_last_error());
    const float *y = f.data;
    for (int b = 0; b < 4; b++) {
        float m = 0;
        for (int i = b * 256; i < 770 && i < (b + 1) * 256; i++)
            m = fmaxf(m, fabsf(x[i]));
        float step = m / 127;
        for (int i = b * 256; i < 770 && i < (b + 1) * 256; i++)
            cr_assert_leq(fabsf(y[i] - x[i]), step * 0.5001f, "block %d element %d: %g -> %g", b, i, x[i], y[i]);
    }
    ar_frame_free(&f);
    free(x);
}

Test(compress, what_is_left_as_it_is)
{
    float *x;
    /* too small to be worth it */
    ar_frame f = tensor_frame(AR_FRAME_ACT, 1, AR_COMPRESS_MIN_FLOATS - 1, 3, &x);
    cr_assert_eq(ar_frame_compress(&f, AR_COMPRESS_INT8), AR_OK);
    cr_assert_eq(f.dtype, AR_DT_F32);
    ar_frame_free(&f);
    free(x);
    /* frames that must stay exact: norms, the optimizer step (tied weights), the tied gradient */
    int exact[] = {AR_FRAME_STEP, AR_FRAME_TIED, AR_FRAME_NORM, AR_FRAME_EVAL_RESULT};
    for (size_t k = 0; k < sizeof exact / sizeof exact[0]; k++) {
        f = tensor_frame(exact[k], 4, 300, 4, &x);
        cr_assert_eq(ar_frame_compress(&f, AR_COMPRESS_BF16), AR_OK);
        cr_assert_eq(f.dtype, AR_DT_F32, "a %s frame was compressed", ar_frame_kind_name(exact[k]));
        cr_assert(memcmp(f.data, x, f.nbytes) == 0);
        ar_frame_free(&f);
        free(x);
    }
    /* values that are not finite go as they are, for the receiver to see */
    for (int codec = AR_COMPRESS_BF16; codec <= AR_COMPRESS_INT8; codec++) {
        f = tensor_frame(AR_FRAME_ACT, 4, 300, 5, &x);
        ((float *)f.data)[700] = codec == AR_COMPRESS_BF16 ? INFINITY : NAN;
        cr_assert_eq(ar_frame_compress(&f, codec), AR_OK);
        cr_assert_eq(f.dtype, AR_DT_F32);
        cr_assert(isnan(((float *)f.data)[700]) || isinf(((float *)f.data)[700]));
        ar_frame_free(&f);
        free(x);
    }
    /* near FLT_MAX bf16 would round to infinity */
    f = tensor_frame(AR_FRAME_ACT, 4, 300, 6, &x);
    ((float *)f.data)[3] = 3.4028e38f;
    cr_assert_eq(ar_frame_compress(&f, AR_COMPRESS_BF16), AR_OK);
    cr_assert_eq(f.dtype, AR_DT_F32);
    ar_frame_free(&f);
    free(x);
}

/* A received compressed frame is checked before use: its size for its
 * shape, every scale, every bf16 value, and that its kind may be compressed. */
Test(compress, bad_payloads_are_refused_by_name)
{
    float *x;
    ar_frame f = tensor_frame(AR_FRAME_ACT, 4, 300, 7, &x); /* 1200 values, 5 blocks */
    cr_assert_eq(ar_frame_compress(&f, AR_COMPRESS_INT8), AR_OK);
    float *scales = f.data;
    float keep = scales[2];
    const float bad[] = {NAN, INFINITY, -1.0f};
    for (size_t i = 0; i < 3; i++) {
        scales[2] = bad[i];
        cr_assert_eq(ar_frame_validate(&f, 1 << 20), AR_OK, "the sizes are right");
        cr_assert_eq(ar_frame_check_compressed(&f), AR_EPROTO);
        cr_assert_not_null(strstr(ar_last_error(), "block 2 of 5"), "%s", ar_last_error());
        cr_assert_eq(ar_frame_decompress(&f), AR_EPROTO);
        cr_assert_eq(f.dtype, AR_DT_Q8, "a refused frame is left as it came");
    }
    scales[2] = keep;
    /* a block cut short: the payload does not hold the shape's values and scales */
    f.nbytes -= 10;
    cr_assert_eq(ar_frame_validate(&f, 1 << 20), AR_EPROTO);
    cr_assert_not_null(strstr(ar_last_error(), "cut short"), "%s", ar_last_error());
    f.nbytes += 10;
    /* scales but no values */
    f.shape[0] = 40;
    cr_assert_eq(ar_frame_validate(&f, 1 << 20), AR_EPROTO);
    f.shape[0] = 4;
    /* only activations and gradients travel compressed */
    f.kind = AR_FRAME_NORM;
    cr_assert_eq(ar_frame_validate(&f, 1 << 20), AR_EPROTO);
    cr_assert_not_null(strstr(ar_last_error(), "compressed"), "%s", ar_last_error());
    f.kind = AR_FRAME_ACT;
    cr_assert_eq(ar_frame_decompress(&f), AR_OK, "%s", ar_last_error());
    ar_frame_free(&f);
    free(x);

    /* bf16 NaN and infinity */
    f = tensor_frame(AR_FRAME_TP, 4, 300, 8, &x);
    free(x);
    cr_assert_eq(ar_frame_compress(&f, AR_COMPRESS_BF16), AR_OK);
    uint16_t *h = f.data;
    h[17] = 0x7fc0; /* NaN */
    cr_assert_eq(ar_frame_check_compressed(&f), AR_EPROTO);
    cr_assert_not_null(strstr(ar_last_error(), "element 17 is NaN"), "%s", ar_last_error());
    h[17] = 0xff80; /* -infinity */
    cr_assert_eq(ar_frame_decompress(&f), AR_EPROTO);
    cr_assert_not_null(strstr(ar_last_error(), "infinite"), "%s", ar_last_error());
    ar_frame_free(&f);
}

Test(compress, names)
{
    int c = -1;
    for (int k = AR_COMPRESS_NONE; k <= AR_COMPRESS_AUTO; k++) {
        cr_assert_eq(ar_compress_parse(ar_compress_name(k), &c), AR_OK);
        cr_assert_eq(c, k);
    }
    cr_assert_eq(ar_compress_parse("int4", &c), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "int4"));
}

/* ---- links that compress and count ---------------------------------------- */

Test(links, a_link_compresses_what_it_sends_and_counts_both_sizes)
{
    ar_link *a, *b;
    cr_assert_eq(ar_link_local_pair(&a, &b, "a", "b"), AR_OK);
    a->compress = AR_COMPRESS_INT8;
    float *x;
    ar_frame f = tensor_frame(AR_FRAME_ACT, 8, 256, 9, &x);
    size_t raw = ar_frame_wire_bytes(&f);
    cr_assert_eq(ar_link_send(a, &f), AR_OK);
    ar_frame g;
    cr_assert_eq(ar_link_recv(b, &g, 1.0), AR_OK, "%s", ar_last_error());
    cr_assert_eq(g.dtype, AR_DT_F32, "the receiver gets float32");
    cr_assert_eq(g.nbytes, 8 * 256 * 4);
    cr_assert_eq(a->raw_sent, raw);
    cr_assert_eq(b->raw_received, raw);
    cr_assert_eq(a->bytes_sent, b->bytes_received);
    cr_assert_lt((double)a->bytes_sent, raw / 3.5, "int8 moved %llu of %zu bytes",
                 (unsigned long long)a->bytes_sent, raw);
    const float *y = g.data;
    for (int i = 0; i < 8 * 256; i++)
        cr_assert_leq(fabsf(y[i] - x[i]), 1000 * 5.0f / 127, "element %d", i);
    ar_frame_free(&g);
    free(x);
    /* the other way: nothing compressed, the same bytes both ways */
    f = tensor_frame(AR_FRAME_GRAD, 8, 256, 10, &x);
    raw = ar_frame_wire_bytes(&f);
    cr_assert_eq(ar_link_send(b, &f), AR_OK);
    cr_assert_eq(ar_link_recv(a, &g, 1.0), AR_OK);
    cr_assert(memcmp(g.data, x, g.nbytes) == 0, "an uncompressed link is exact");
    cr_assert_eq(b->bytes_sent, raw);
    cr_assert_eq(b->raw_sent, raw);
    ar_frame_free(&g);
    free(x);
    ar_link_destroy(a);
    ar_link_destroy(b);
}

/* ---- measuring a link ------------------------------------------------------- */

typedef struct {
    ar_link *l;
    int answered;
} answerer;

static void *answer_main(void *arg)
{
    answerer *a = arg;
    ar_probe_rx rx = {0};
    for (;;) {
        ar_frame f;
        if (ar_link_recv(a->l, &f, 10.0) != AR_OK)
            break;
        if (ar_probe_answer(a->l, &f, &rx) == AR_OK)
            a->answered++;
        ar_frame_free(&f);
    }
    return NULL;
}

Test(probe, measures_an_in_process_link)
{
    ar_link *a, *b;
    cr_assert_eq(ar_link_local_pair(&a, &b, "here", "there"), AR_OK);
    answerer ans = {.l = b};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, answer_main, &ans), 0);
    ar_link_figures fig;
    cr_assert_eq(ar_probe_link(a, 10.0, &fig), AR_OK, "%s", ar_last_error());
    ar_link_close(a);
    pthread_join(t, NULL);
    cr_assert(fig.measured);
    cr_assert(fig.rtt_s > 0 && fig.rtt_s < 0.5, "round trip %g s", fig.rtt_s);
    /* frames move by pointer here: far faster than any network */
    cr_assert_gt(fig.down_Bps, 1e8, "down %g B/s", fig.down_Bps);
    cr_assert_gt(fig.up_Bps, 1e8, "up %g B/s", fig.up_Bps);
    cr_assert_geq(ans.answered, AR_PROBE_PINGS + 4 + 1, "%d answers", ans.answered);
    ar_link_destroy(a);
    ar_link_destroy(b);
}

Test(probe, the_answering_end_refuses_what_is_not_its_to_do)
{
    ar_link *a, *b;
    cr_assert_eq(ar_link_local_pair(&a, &b, "here", "there"), AR_OK);
    ar_probe_rx rx = {0};
    ar_frame f = {.kind = AR_FRAME_PROBE};
    f.scalars[0] = AR_PROBE_PULL; /* more than a prober asks for */
    f.scalars[1] = 1000;
    f.scalars[2] = 1 << 30;
    cr_assert_eq(ar_probe_answer(b, &f, &rx), AR_EPROTO);
    cr_assert_not_null(strstr(ar_last_error(), "PULL"), "%s", ar_last_error());
    f.scalars[0] = AR_PROBE_DATA; /* a burst's second frame first */
    f.scalars[1] = 1;
    f.scalars[2] = 4;
    cr_assert_eq(ar_probe_answer(b, &f, &rx), AR_EPROTO);
    f.scalars[0] = AR_PROBE_REPORT;
    cr_assert_eq(ar_probe_answer(b, &f, &rx), AR_EPROTO);
    ar_link_destroy(a);
    ar_link_destroy(b);
}

static ar_model_spec small_mlp(void)
{
    ar_model_spec s;
    memset(&s, 0, sizeof s);
    s.type = AR_MODEL_MLP;
    s.inputs = 300;
    s.n_hidden = 2;
    s.hidden[0] = 64;
    s.hidden[1] = 48;
    s.classes = 5;
    s.activation = AR_ACT_RELU;
    return s;
}

static ar_model_spec small_gpt(void)
{
    ar_model_spec s;
    memset(&s, 0, sizeof s);
    s.type = AR_MODEL_GPT;
    s.vocab_size = 13;
    s.block_size = 16;
    s.n_layer = 2;
    s.n_head = 2;
    s.n_embd = 32;
    return s;
}

static const ar_optim_config adamw = {.kind = AR_OPT_ADAMW, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f};

Test(probe, a_chain_measures_every_link)
{
    ar_model_spec spec = small_mlp();
    ar_local_pipeline p;
    cr_assert_eq(ar_local_create(&p, &spec, 3, 8, 2, AR_SCHED_1F1B, 1, &adamw), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_local_start(&p, AR_SCHED_1F1B, 1, 1), AR_OK, "%s", ar_last_error());
    ar_link_figures e[8];
    int n = 0;
    cr_assert_eq(ar_chain_probe(p.head, 10.0, e, 8, &n), AR_OK, "%s", ar_last_error());
    cr_assert_eq(n, 3, "the driver's link and the two between the stages");
    for (int i = 0; i < n; i++)
        cr_assert(e[i].measured && e[i].rtt_s > 0 && e[i].down_Bps > 0 && e[i].up_Bps > 0, "link %d", i);
    ar_local_destroy(&p);
}

/* ---- warm-up ------------------------------------------------------------------ */

Test(schedule, extra_warmup_keeps_more_in_flight_and_the_backwards_in_order)
{
    ar_action a[16];
    /* stage 0 of 2, M 8, 2 more: F0..F3, then F4 B0 F5 B1 F6 B2 F7 B3, B4..B7 */
    cr_assert_eq(ar_schedule_build_ex(AR_SCHED_1F1B, 2, 0, 8, 2, a), 5);
    const char *want = "F0F1F2F3F4B0F5B1F6B2F7B3B4B5B6B7";
    for (int i = 0; i < 16; i++)
        cr_assert(a[i].op == want[2 * i] && a[i].mb == want[2 * i + 1] - '0', "at %d: %c%d", i, a[i].op, a[i].mb);
    cr_assert_eq(ar_plan_slots_ex(AR_SCHED_1F1B, 2, 0, 8, 2), 5);
    /* capped at M; nothing on the last stage; GPipe has them all already */
    cr_assert_eq(ar_schedule_build_ex(AR_SCHED_1F1B, 2, 0, 4, 9, a), 4);
    cr_assert_eq(ar_plan_slots_ex(AR_SCHED_1F1B, 2, 0, 4, 9), 4);
    cr_assert_eq(ar_schedule_build_ex(AR_SCHED_1F1B, 2, 1, 8, 3, a), 1);
    cr_assert_eq(ar_plan_slots_ex(AR_SCHED_1F1B, 2, 1, 8, 3), 1);
    cr_assert_eq(ar_plan_slots_ex(AR_SCHED_GPIPE, 2, 0, 8, 3), 8);
    /* how many cover a round trip: none for a quick one */
    cr_assert_eq(ar_plan_extra_warmup(0.0002, 0.0001, 0.0001, 0.050), 0);
    cr_assert_eq(ar_plan_extra_warmup(0.0002, 0.0001, 0.0001, 0.00001), 0, "a fast link needs none");
    cr_assert_eq(ar_plan_extra_warmup(0.010, 0.005, 0.005, 0.050), 0);
    cr_assert_eq(ar_plan_extra_warmup(0.040, 0.027, 0.027, 0.050), 2);
    cr_assert_eq(ar_plan_extra_warmup(0.100, 0.100, 0.100, 0.050), 6);
}

/* ---- the planner's links -------------------------------------------------------- */

static ar_device dev(const char *name, double gflops, double mem, double bw, double rtt)
{
    ar_device d;
    memset(&d, 0, sizeof d);
    snprintf(d.name, sizeof d.name, "%s", name);
    d.gflops = gflops;
    d.mem_bytes = mem;
    d.bandwidth = bw;
    d.rtt = rtt;
    return d;
}

/* AUTO: the least lossy codec that keeps the link off the critical path. */
Test(plan_links, auto_compresses_only_as_much_as_the_link_needs)
{
    ar_model_spec spec = small_gpt();
    int n = ar_spec_units(&spec);
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&spec, 4, c), AR_OK, "%s", ar_last_error());
    double f0 = c[0].flops + c[1].flops, f1 = c[2].flops + c[3].flops;
    /* slow devices: the budgets are well above AUTO's floor */
    ar_device d[2] = {dev("a", 0.1, 0, 0, 0), dev("b", 0.1, 0, 0, 0)};
    ar_plan_opts o = {.compress = AR_COMPRESS_AUTO};
    double none_b, none_u, bf_b, bf_u, q_b, q_u;
    ar_plan_link_mb_bytes(c, 2, 4, AR_COMPRESS_NONE, &none_b, &none_u);
    ar_plan_link_mb_bytes(c, 2, 4, AR_COMPRESS_BF16, &bf_b, &bf_u);
    ar_plan_link_mb_bytes(c, 2, 4, AR_COMPRESS_INT8, &q_b, &q_u);
    cr_assert(bf_b < none_b * 0.6 && q_b < none_b * 0.35, "%g %g %g", none_b, bf_b, q_b);
    double slowest = fmax(f0, f1) / 1e8, budget = AR_PLAN_AUTO_MARGIN * slowest;
    cr_assert_gt(fmax(q_b, q_u) / (fmax(q_b, q_u) / budget * 1.01), 2 * AR_PLAN_FAST_LINK_S);
    /* bandwidths where each codec is the first that fits the budget */
    struct {
        double bw;
        int want;
    } cases[] = {{fmax(none_b, none_u) / budget * 1.01, AR_COMPRESS_NONE},
                 {fmax(bf_b, bf_u) / budget * 1.01, AR_COMPRESS_BF16},
                 {fmax(q_b, q_u) / budget * 1.01, AR_COMPRESS_INT8},
                 {fmax(q_b, q_u) / budget * 0.5, AR_COMPRESS_INT8}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        d[0].bandwidth = cases[k].bw;
        ar_plan p;
        cr_assert_eq(ar_plan_parse("0-1,2-3", n, 2, &p), AR_OK);
        cr_assert_eq(ar_plan_estimate_ex(&p, c, n, d, 2, 4, AR_SCHED_1F1B, &o), AR_OK, "%s", ar_last_error());
        cr_assert_eq(p.codec[1], cases[k].want, "at %g B/s: %s, want %s", cases[k].bw,
                     ar_compress_name(p.codec[1]), ar_compress_name(cases[k].want));
        cr_assert_eq(p.codec[0], AR_COMPRESS_NONE, "an in-process driver's link");
        /* the stage takes the longer of its compute and its link */
        cr_assert_geq(p.stage_time[0], f0 / 1e8);
        cr_assert_geq(p.stage_time[0], fmax(p.edge_down_s[1], p.edge_up_s[1]) * (1 - 1e-12));
    }
    /* an unmeasured link (bandwidth 0: in-process or unknown) is never compressed by AUTO */
    d[0].bandwidth = 0;
    ar_plan p;
    cr_assert_eq(ar_plan_parse("0-1,2-3", n, 2, &p), AR_OK);
    cr_assert_eq(ar_plan_estimate_ex(&p, c, n, d, 2, 4, AR_SCHED_1F1B, &o), AR_OK);
    cr_assert_eq(p.codec[1], AR_COMPRESS_NONE);
    /* a link that moves a micro-batch in under AUTO's floor stays exact */
    o.compress = AR_COMPRESS_AUTO;
    d[0].gflops = d[1].gflops = 1e6;
    d[0].bandwidth = fmax(none_b, none_u) / (AR_PLAN_FAST_LINK_S * 0.9);
    cr_assert_eq(ar_plan_estimate_ex(&p, c, n, d, 2, 4, AR_SCHED_1F1B, &o), AR_OK);
    cr_assert_eq(p.codec[1], AR_COMPRESS_NONE);
    /* a setting other than AUTO holds on every link */
    o.compress = AR_COMPRESS_BF16;
    d[0].bandwidth = 1e12;
    cr_assert_eq(ar_plan_estimate_ex(&p, c, n, d, 2, 4, AR_SCHED_1F1B, &o), AR_OK);
    cr_assert_eq(p.codec[1], AR_COMPRESS_BF16);
}

Test(plan_links, warmup_covers_the_round_trip_within_memory)
{
    ar_model_spec spec = small_gpt();
    int n = ar_spec_units(&spec);
    ar_unit_cost c[8];
    cr_assert_eq(ar_plan_unit_costs(&spec, 2, c), AR_OK, "%s", ar_last_error());
    ar_device d[2] = {dev("a", 1, 0, 1e7, 0), dev("b", 1, 0, 0, 0)};
    ar_plan_opts o = {.compress = AR_COMPRESS_NONE};
    ar_plan p;
    cr_assert_eq(ar_plan_parse("0-1,2-3", n, 2, &p), AR_OK);
    cr_assert_eq(ar_plan_estimate_ex(&p, c, n, d, 2, 16, AR_SCHED_1F1B, &o), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.extra_warmup[0], 0, "no round trip to cover");
    cr_assert_eq(p.slots[0], 3);
    double pace = fmax(p.stage_time[0], p.stage_time[1]);
    d[0].rtt = 3.2 * pace;
    cr_assert_eq(ar_plan_estimate_ex(&p, c, n, d, 2, 16, AR_SCHED_1F1B, &o), AR_OK, "%s", ar_last_error());
    int want = ar_plan_extra_warmup(d[0].rtt, p.edge_down_s[1], p.edge_up_s[1], pace);
    cr_assert_geq(want, 3);
    cr_assert_eq(p.extra_warmup[0], want);
    cr_assert_eq(p.slots[0], 3 + want);
    cr_assert_eq(p.extra_warmup[1], 0, "the last stage has no link to cover");
    double full = p.stage_mem[0];
    cr_assert_eq(full, ar_plan_stage_mem(c, n, 0, 2, 3 + want), "the planner counts the slots");
    /* memory for one slot fewer than it wants: the warm-up shrinks to fit */
    d[0].mem_bytes = ar_plan_stage_mem(c, n, 0, 2, 3 + want - 1);
    cr_assert_eq(ar_plan_estimate_ex(&p, c, n, d, 2, 16, AR_SCHED_1F1B, &o), AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.extra_warmup[0], want - 1);
    cr_assert_leq(p.stage_mem[0], d[0].mem_bytes);
    /* the program plans with it too */
    d[0].mem_bytes = 0;
    ar_plan q;
    cr_assert_eq(ar_plan_auto_ex(c, n, d, 2, 16, AR_SCHED_1F1B, &o, &q), AR_OK, "%s", ar_last_error());
    if (q.nstages == 2)
        cr_assert_gt(q.extra_warmup[0], 0);
}

/* What the planner predicts each link carries per step is what an
 * in-process pipeline's links count, codec by codec. */
static void predicted_bytes_match(const ar_model_spec *spec, const char *plan_text, int M, int rows, int codec)
{
    int n = ar_spec_units(spec);
    ar_unit_cost c[16];
    cr_assert_eq(ar_plan_unit_costs(spec, rows, c), AR_OK, "%s", ar_last_error());
    ar_device d[4] = {dev("a", 1, 0, 0, 0), dev("b", 1, 0, 0, 0), dev("c", 1, 0, 0, 0), dev("d", 1, 0, 0, 0)};
    ar_plan_opts o = {.compress = codec};
    ar_plan p;
    cr_assert_eq(ar_plan_parse(plan_text, n, 4, &p), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_plan_estimate_ex(&p, c, n, d, 4, M, AR_SCHED_1F1B, &o), AR_OK, "%s", ar_last_error());
    ar_local_pipeline lp;
    cr_assert_eq(ar_local_create_plan(&lp, spec, &p, d, rows, M, AR_SCHED_1F1B, 3, &adamw), AR_OK, "%s",
                 ar_last_error());
    for (int s = 0; s < p.nstages; s++)
        lp.codec[s] = p.codec[s];
    cr_assert_eq(ar_local_start(&lp, AR_SCHED_1F1B, 3, 1), AR_OK);
    int B = rows * M, gpt = spec->type == AR_MODEL_GPT, T = gpt ? spec->block_size : 1;
    size_t row_elems = gpt ? (size_t)T : (size_t)spec->inputs;
    void *x = calloc((size_t)B * row_elems, 4);
    int32_t *y = calloc((size_t)B * (size_t)T, sizeof *y);
    cr_assert(x && y);
    ar_rng r;
    ar_rng_seed(&r, 5);
    for (size_t i = 0; i < (size_t)B * row_elems; i++) {
        if (gpt)
            ((int32_t *)x)[i] = (int32_t)ar_rng_below(&r, (uint64_t)spec->vocab_size);
        else
            ((float *)x)[i] = ar_rng_normal(&r);
    }
    for (int i = 0; i < B * T; i++)
        y[i] = (int32_t)ar_rng_below(&r, (uint64_t)(gpt ? spec->vocab_size : spec->classes));
    for (int step = 0; step < 3; step++) {
        ar_batch_desc b = {.step = step, .M = M, .B = B, .dtype = gpt ? AR_DT_I32 : AR_DT_F32, .inputs = x,
                           .row_elems = row_elems, .targets = y, .row_targets = (size_t)T};
        ar_step_result res;
        cr_assert_eq(ar_chain_train_step(lp.head, &b, 30.0, &res), AR_OK, "%s", ar_last_error());
        cr_assert_eq(ar_chain_apply(lp.head, step, 1e-3f, 1.0f), AR_OK);
        if (step == 0)
            continue; /* (a stage counts the previous step's optimizer step in its next record) */
        for (int e = 1; e < p.nstages; e++) {
            const ar_edge_bytes *got = &res.edges[e], *want = &p.edge_bytes[e];
            /* a step number's varint is 1 byte here, 2 in the prediction: a few bytes a frame */
            double slack = 4.0 * (2 * M + 4);
            cr_assert(fabs(got->down - want->down) <= slack && fabs(got->up - want->up) <= slack &&
                          fabs(got->down_raw - want->down_raw) <= slack && fabs(got->up_raw - want->up_raw) <= slack,
                      "%s link %d: counted %.0f/%.0f down, %.0f/%.0f up; predicted %.0f/%.0f, %.0f/%.0f",
                      ar_compress_name(codec), e, got->down, got->down_raw, got->up, got->up_raw, want->down,
                      want->down_raw, want->up, want->up_raw);
            if (codec == AR_COMPRESS_INT8)
                cr_assert_lt(got->down, got->down_raw / 2.5, "int8 down %.0f of %.0f", got->down, got->down_raw);
        }
    }
    free(x);
    free(y);
    ar_local_destroy(&lp);
}

Test(plan_links, predicted_bytes_are_what_the_links_count)
{
    ar_model_spec gpt = small_gpt(), mlp = small_mlp();
    for (int codec = AR_COMPRESS_NONE; codec <= AR_COMPRESS_INT8; codec++) {
        /* the head away from the embedding: its tied weight crosses both links */
        predicted_bytes_match(&gpt, "0-1,2,3", 4, 2, codec);
        predicted_bytes_match(&mlp, "0,1-2", 3, 8, codec);
    }
}

/* ---- stage 0 takes the optimizer step ------------------------------------------ */

/* The driver's way: the step's results, its clipping, a STEP. */
static float driver_scale(const ar_step_result *r, float clip)
{
    double sumsq = 0;
    for (int i = 0; i < r->nunits; i++)
        sumsq += r->unit_sumsq[i];
    double norm = sqrt(sumsq);
    return clip > 0 && norm > clip ? (float)(clip / (norm + 1e-6)) : 1.0f;
}

static float *train_gpt(int apply_at_stage0, int ahead, int steps, long *n)
{
    ar_model_spec spec = small_gpt();
    ar_local_pipeline p;
    cr_assert_eq(ar_local_create(&p, &spec, 3, 2, 4, AR_SCHED_1F1B, 9, &adamw), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_local_start(&p, AR_SCHED_1F1B, 9, 1), AR_OK);
    int32_t x[8 * 16], y[8 * 16];
    ar_rng r;
    const float clip = 0.05f; /* small: every step is clipped */
    ar_batch_desc b = {.M = 4, .B = 8, .dtype = AR_DT_I32, .inputs = x, .row_elems = 16, .targets = y,
                       .row_targets = 16};
    for (int step = 0, sent = -1; step < steps; step++) {
        float lr = 1e-2f / (float)(step + 1);
        while (apply_at_stage0 && sent < step + (ahead && step + 1 < steps)) {
            sent++;
            ar_rng_seed(&r, 100 + (uint64_t)sent);
            for (int i = 0; i < 8 * 16; i++) {
                x[i] = (int32_t)ar_rng_below(&r, 13);
                y[i] = (int32_t)ar_rng_below(&r, 13);
            }
            b.step = sent;
            cr_assert_eq(ar_chain_send_step(p.head, &b, 1, 1e-2f / (float)(sent + 1), clip), AR_OK);
        }
        ar_step_result res;
        b.step = step;
        if (apply_at_stage0) {
            cr_assert_eq(ar_chain_recv_step(p.head, &b, 30.0, &res), AR_OK, "%s", ar_last_error());
            cr_assert_lt(driver_scale(&res, clip), 1.0f, "the step was clipped");
            continue;
        }
        ar_rng_seed(&r, 100 + (uint64_t)step);
        for (int i = 0; i < 8 * 16; i++) {
            x[i] = (int32_t)ar_rng_below(&r, 13);
            y[i] = (int32_t)ar_rng_below(&r, 13);
        }
        cr_assert_eq(ar_chain_train_step(p.head, &b, 30.0, &res), AR_OK, "%s", ar_last_error());
        cr_assert_eq(ar_chain_apply(p.head, step, lr, driver_scale(&res, clip)), AR_OK);
    }
    cr_assert_eq(ar_chain_sync(p.head, 30.0), AR_OK);
    long total = 0;
    for (int i = 0; i < p.S; i++)
        total += p.stages[i].param_floats;
    float *w = malloc(sizeof(float) * (size_t)total);
    cr_assert_not_null(w);
    long at = 0;
    for (int i = 0; i < p.S; i++) {
        memcpy(w + at, p.stages[i].mem_params, sizeof(float) * (size_t)p.stages[i].param_floats);
        at += p.stages[i].param_floats;
    }
    ar_local_destroy(&p);
    *n = total;
    return w;
}

Test(stage0_step, stage_0_clips_and_steps_bitwise_as_the_driver_even_a_step_ahead)
{
    long n1, n2, n3;
    float *driver = train_gpt(0, 0, 5, &n1), *stage0 = train_gpt(1, 0, 5, &n2), *ahead = train_gpt(1, 1, 5, &n3);
    cr_assert(n1 == n2 && n2 == n3);
    cr_assert(memcmp(driver, stage0, sizeof(float) * (size_t)n1) == 0, "stage 0's step differs from the driver's");
    cr_assert(memcmp(driver, ahead, sizeof(float) * (size_t)n1) == 0, "a batch sent a step ahead changed the result");
    free(driver);
    free(stage0);
    free(ahead);
}

/* Nobody pays for measurements: a stage sends what its upstream asks of it
 * for them only within a budget that refills slowly, and says so after. */
Test(probe, a_stage_sends_probes_within_a_budget)
{
    ar_model_spec spec = small_mlp();
    ar_local_pipeline p;
    cr_assert_eq(ar_local_create(&p, &spec, 1, 8, 1, AR_SCHED_1F1B, 1, &adamw), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_local_start(&p, AR_SCHED_1F1B, 1, 1), AR_OK);
    int data = 0, refused = 0;
    for (int k = 0; k < 4; k++) { /* 16 MiB each: the budget holds two */
        ar_frame pull = {.kind = AR_FRAME_PROBE};
        pull.scalars[0] = AR_PROBE_PULL;
        pull.scalars[1] = AR_PROBE_MAX_FRAMES;
        pull.scalars[2] = (double)AR_PROBE_FRAME_BYTES;
        cr_assert_eq(ar_link_send(p.head, &pull), AR_OK);
        ar_frame f;
        for (;;) {
            cr_assert_eq(ar_link_recv(p.head, &f, 10.0), AR_OK, "%s", ar_last_error());
            int done = f.kind == AR_FRAME_ERROR || (int)f.scalars[1] == AR_PROBE_MAX_FRAMES - 1;
            if (f.kind == AR_FRAME_ERROR) {
                cr_assert_not_null(memmem(f.data, f.nbytes, "too often", 9));
                refused++;
            } else {
                data++;
            }
            ar_frame_free(&f);
            if (done)
                break;
        }
    }
    cr_assert_eq(data, 2 * AR_PROBE_MAX_FRAMES, "%d frames sent", data);
    cr_assert_eq(refused, 2);
    ar_local_destroy(&p);
}
