/* Pipelines: schedules, the learning-rate schedule, frames and links, stage
 * argument checks, and whole in-process pipelines (determinism across
 * partitions and schedules, error frames, evaluation). */
#include "core/core.h"
#include "nn/spec.h"
#include "run/driver.h"
#include "train/frame.h"
#include "train/local.h"
#include "train/pipeline.h"
#include "train/schedule.h"
#include "train/stage.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- schedules ------------------------------------------------------------ */

static void check_schedule(int kind, int S, int s, int M)
{
    ar_action acts[64];
    cr_assert(2 * M <= 64);
    int in_flight = ar_schedule_build(kind, S, s, M, acts);
    int nf[32] = {0}, nb[32] = {0};
    int open = 0, max_open = 0, next_b = 0, lead_f = -1;
    for (int i = 0; i < 2 * M; i++) {
        int mb = acts[i].mb;
        cr_assert(mb >= 0 && mb < M, "kind %d S %d s %d M %d: mb %d", kind, S, s, M, mb);
        if (acts[i].op == 'F') {
            cr_assert_eq(nf[mb], 0, "mb %d forwarded twice", mb);
            nf[mb]++;
            open++;
            if (open > max_open)
                max_open = open;
        } else {
            cr_assert_eq(acts[i].op, 'B', "bad op %c", acts[i].op);
            cr_assert_eq(nf[mb], 1, "kind %d S %d s %d M %d: B(%d) before F(%d)", kind, S, s, M,
                         mb, mb);
            cr_assert_eq(nb[mb], 0, "mb %d backward twice", mb);
            cr_assert_eq(mb, next_b, "kind %d S %d s %d M %d: backward %d out of order", kind, S,
                         s, M, mb);
            if (lead_f < 0)
                lead_f = i;
            next_b++;
            nb[mb]++;
            open--;
        }
    }
    for (int mb = 0; mb < M; mb++)
        cr_assert(nf[mb] == 1 && nb[mb] == 1);
    cr_assert_eq(in_flight, max_open, "kind %d S %d s %d M %d: returns %d, schedule keeps %d",
                 kind, S, s, M, in_flight, max_open);
    if (kind == AR_SCHED_GPIPE) {
        cr_assert_eq(lead_f, M);
        cr_assert_eq(in_flight, M);
    } else {
        /* S-s-1 warm-up forwards, and one more where a stage follows */
        int warm = s < S - 1 ? S - s : 0;
        warm = warm < M ? warm : M;
        /* warm-up forwards, then the first forward of the steady phase */
        int want_lead = warm + 1 < M ? warm + 1 : M;
        cr_assert_eq(lead_f, want_lead, "kind 1F1B S %d s %d M %d: %d forwards before the first B",
                     S, s, M, lead_f);
        if (s == S - 1)
            for (int i = 0; i < 2 * M; i++)
                cr_assert(acts[i].op == (i % 2 ? 'B' : 'F') && acts[i].mb == i / 2,
                          "last stage of 1F1B does not alternate at %d", i);
    }
}

Test(schedule, invariants)
{
    for (int kind = 0; kind < 2; kind++)
        for (int S = 1; S <= 6; S++)
            for (int s = 0; s < S; s++)
                for (int M = 1; M <= 12; M++)
                    check_schedule(kind, S, s, M);
}

Test(schedule, one_f_one_b_examples)
{
    ar_action a[8];
    /* stage 0 of 4, M 4: F0 F1 F2 F3 B0 B1 B2 B3 (warm-up 4 capped at M) */
    cr_assert_eq(ar_schedule_build(AR_SCHED_1F1B, 4, 0, 4, a), 4);
    const char *want = "F0F1F2F3B0B1B2B3";
    for (int i = 0; i < 8; i++)
        cr_assert(a[i].op == want[2 * i] && a[i].mb == want[2 * i + 1] - '0');
    /* stage 1 of 3, M 5: warm-up 2 (the textbook 1, plus one to overlap
     * transfers), then F2 B0 F3 B1 F4 B2, drain B3 B4; three in flight */
    ar_action b[10];
    cr_assert_eq(ar_schedule_build(AR_SCHED_1F1B, 3, 1, 5, b), 3);
    want = "F0F1F2B0F3B1F4B2B3B4";
    for (int i = 0; i < 10; i++)
        cr_assert(b[i].op == want[2 * i] && b[i].mb == want[2 * i + 1] - '0', "at %d: %c%d", i,
                  b[i].op, b[i].mb);
    /* the last stage alternates from the start: one in flight */
    cr_assert_eq(ar_schedule_build(AR_SCHED_1F1B, 3, 2, 4, a), 1);
    want = "F0B0F1B1F2B2F3B3";
    for (int i = 0; i < 8; i++)
        cr_assert(a[i].op == want[2 * i] && a[i].mb == want[2 * i + 1] - '0', "at %d: %c%d", i,
                  a[i].op, a[i].mb);
}

Test(schedule, names)
{
    int k = -1;
    cr_assert_eq(ar_schedule_parse("gpipe", &k), AR_OK);
    cr_assert_eq(k, AR_SCHED_GPIPE);
    cr_assert_eq(ar_schedule_parse("1f1b", &k), AR_OK);
    cr_assert_eq(k, AR_SCHED_1F1B);
    cr_assert_eq(ar_schedule_parse("zero-bubble", &k), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "zero-bubble"));
    cr_assert_str_eq(ar_schedule_name(AR_SCHED_GPIPE), "gpipe");
    cr_assert_str_eq(ar_schedule_name(AR_SCHED_1F1B), "1f1b");
}

/* ---- learning rate ------------------------------------------------------- */

Test(lr, warmup_and_cosine)
{
    const float lr = 3e-3f, min_lr = 3e-4f;
    const long warmup = 10, total = 100;
    cr_assert_float_eq(ar_lr_at(0, lr, min_lr, warmup, total), lr / warmup, 1e-9);
    for (long s = 0; s < warmup; s++)
        cr_assert_float_eq(ar_lr_at(s, lr, min_lr, warmup, total), lr * (s + 1) / warmup, 1e-9);
    for (long s = 1; s < warmup; s++)
        cr_assert_gt(ar_lr_at(s, lr, min_lr, warmup, total),
                     ar_lr_at(s - 1, lr, min_lr, warmup, total));
    cr_assert_float_eq(ar_lr_at(warmup - 1, lr, min_lr, warmup, total), lr, 1e-9);
    cr_assert_float_eq(ar_lr_at(warmup, lr, min_lr, warmup, total), lr, 1e-9);
    float peak = 0;
    for (long s = 0; s <= total; s++) {
        float v = ar_lr_at(s, lr, min_lr, warmup, total);
        cr_assert(v <= lr * (1 + 1e-6f));
        cr_assert(v >= min_lr * (1 - 1e-6f) || s < warmup);
        if (v > peak)
            peak = v;
    }
    cr_assert_float_eq(peak, lr, 1e-9);
    for (long s = warmup + 1; s <= total; s++)
        cr_assert_lt(ar_lr_at(s, lr, min_lr, warmup, total),
                     ar_lr_at(s - 1, lr, min_lr, warmup, total), "not decreasing at %ld", s);
    /* halfway through the cosine: the mean of lr and min_lr */
    cr_assert_float_eq(ar_lr_at(warmup + (total - warmup) / 2, lr, min_lr, warmup, total),
                       0.5f * (lr + min_lr), 1e-7);
    cr_assert_float_eq(ar_lr_at(total, lr, min_lr, warmup, total), min_lr, 1e-9);
    /* and stays there */
    cr_assert_float_eq(ar_lr_at(total + 50, lr, min_lr, warmup, total), min_lr, 1e-9);
    /* no warm-up: starts at the peak */
    cr_assert_float_eq(ar_lr_at(0, lr, min_lr, 0, total), lr, 1e-9);
    cr_assert_float_eq(ar_lr_at(total, lr, min_lr, 0, total), min_lr, 1e-9);
}

/* ---- frames -------------------------------------------------------------- */

static ar_frame good_frame(void)
{
    ar_frame f = {.kind = AR_FRAME_ACT, .step = 3, .mb = 1, .nmb = 4, .rows = 2,
                  .dtype = AR_DT_F32, .ndim = 2, .shape = {2, 5}, .nbytes = 40};
    return f;
}

static void expect_invalid(const ar_frame *f, size_t max, int code, const char *needle)
{
    int rc = ar_frame_validate(f, max);
    cr_assert_eq(rc, code, "got %d (%s), want %d", rc, ar_last_error(), code);
    if (needle)
        cr_assert_not_null(strstr(ar_last_error(), needle), "\"%s\" lacks \"%s\"", ar_last_error(),
                           needle);
}

Test(frame, validate)
{
    ar_frame f = good_frame();
    cr_assert_eq(ar_frame_validate(&f, 1 << 20), AR_OK, "%s", ar_last_error());
    /* every kind is fine with an empty payload */
    for (int k = AR_FRAME_ACT; k <= AR_FRAME_PROBE; k++) {
        ar_frame e = {.kind = k};
        cr_assert_eq(ar_frame_validate(&e, 1 << 20), AR_OK, "%s", ar_last_error());
    }

    f.kind = 0;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "kind 0");
    f.kind = AR_FRAME_PROBE + 1;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "kind 14");
    f.kind = -1;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "kind -1");

    f = good_frame();
    f.dtype = 6;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "dtype 6");
    f.dtype = -1;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "dtype");

    f = good_frame();
    f.ndim = 5;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "dimensions");
    f.ndim = -1;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "dimensions");

    f = good_frame();
    f.shape[1] = -5;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "shape");
    f.shape[0] = -2;
    f.shape[1] = -5; /* the product is positive, the dims are not */
    expect_invalid(&f, 1 << 20, AR_EPROTO, "shape");

    f = good_frame();
    f.nbytes = 36;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "40 bytes");
    f = good_frame();
    f.dtype = AR_DT_F64; /* 80 bytes by shape */
    expect_invalid(&f, 1 << 20, AR_EPROTO, "80 bytes");
    f = good_frame();
    f.dtype = AR_DT_U8;
    f.nbytes = 10;
    cr_assert_eq(ar_frame_validate(&f, 1 << 20), AR_OK, "%s", ar_last_error());

    /* oversize: 40 bytes against a 39 byte limit, and a shape whose product overflows */
    f = good_frame();
    cr_assert_eq(ar_frame_validate(&f, 40), AR_OK, "%s", ar_last_error());
    expect_invalid(&f, 39, AR_ELIMIT, "limit");
    f.ndim = 4;
    f.shape[0] = f.shape[1] = f.shape[2] = f.shape[3] = (int64_t)1 << 40;
    cr_assert_neq(ar_frame_validate(&f, (size_t)1 << 31), AR_OK);
    f = good_frame();
    f.ntargets = (1 << 20) / 4 + 1;
    expect_invalid(&f, 1 << 20, AR_ELIMIT, "targets");

    f = good_frame();
    f.mb = 4;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "micro-batch 4");
    f.mb = 7;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "micro-batch 7");
    f.mb = -1;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "micro-batch");
    f.mb = 0;
    f.nmb = -1;
    expect_invalid(&f, 1 << 20, AR_EPROTO, "micro-batch");
}

Test(frame, payload_helpers)
{
    ar_frame f = {.kind = AR_FRAME_ACT};
    float data[6] = {1, 2, 3, 4, 5, 6};
    int64_t shape[2] = {2, 3};
    cr_assert_eq(ar_frame_set_payload(&f, AR_DT_F32, 2, shape, data), AR_OK);
    cr_assert_eq(f.nbytes, sizeof data);
    cr_assert_arr_eq(f.data, data, sizeof data);
    cr_assert_eq(ar_frame_validate(&f, 1 << 20), AR_OK, "%s", ar_last_error());
    /* replacing frees the old buffer (LeakSanitizer) */
    cr_assert_eq(ar_frame_set_payload(&f, AR_DT_F32, 2, shape, data), AR_OK);
    int32_t t[3] = {4, 5, 6};
    cr_assert_eq(ar_frame_set_targets(&f, t, 3), AR_OK);
    cr_assert_eq(ar_frame_set_targets(&f, t, 2), AR_OK);
    cr_assert_eq(f.ntargets, 2);
    ar_frame_free(&f);
    cr_assert_null(f.data);
    cr_assert_null(f.targets);
    cr_assert_eq(ar_dtype_size(AR_DT_F64), 8);
    cr_assert_eq(ar_dtype_size(AR_DT_U8), 1);
    cr_assert_eq(ar_dtype_size(99), 0);
    cr_assert_str_eq(ar_frame_kind_name(AR_FRAME_GRAD), "GRAD");
    cr_assert_str_eq(ar_frame_kind_name(99), "unknown");
}

/* ---- in-process links ---------------------------------------------------- */

static void send_numbered(ar_link *l, int64_t step, int n)
{
    ar_frame f = {.kind = AR_FRAME_ACT, .step = step};
    int64_t shape[1] = {n};
    float *buf = malloc(sizeof(float) * (size_t)n);
    for (int i = 0; i < n; i++)
        buf[i] = (float)(step * 100 + i);
    cr_assert_eq(ar_frame_set_payload(&f, AR_DT_F32, 1, shape, buf), AR_OK);
    int32_t t[2] = {(int32_t)step, -(int32_t)step};
    cr_assert_eq(ar_frame_set_targets(&f, t, 2), AR_OK);
    free(buf);
    cr_assert_eq(ar_link_send(l, &f), AR_OK, "%s", ar_last_error());
    /* ownership moved: the frame is reset */
    cr_assert_null(f.data);
    cr_assert_null(f.targets);
}

Test(link, order_and_both_directions)
{
    ar_link *a, *b;
    cr_assert_eq(ar_link_local_pair(&a, &b, "end a", "end b"), AR_OK);
    cr_assert_str_eq(a->name, "end a");
    for (int i = 0; i < 20; i++)
        send_numbered(a, i, i + 1);
    send_numbered(b, 77, 3);
    for (int i = 0; i < 20; i++) {
        ar_frame f;
        cr_assert_eq(ar_link_recv(b, &f, 1.0), AR_OK, "%s", ar_last_error());
        cr_assert_eq(f.step, i);
        cr_assert_eq(f.nbytes, sizeof(float) * (size_t)(i + 1));
        cr_assert_eq(((float *)f.data)[i], (float)(i * 100 + i));
        cr_assert_eq(f.ntargets, 2);
        cr_assert_eq(f.targets[0], i);
        ar_frame_free(&f);
    }
    ar_frame f;
    cr_assert_eq(ar_link_recv(a, &f, 1.0), AR_OK, "%s", ar_last_error());
    cr_assert_eq(f.step, 77);
    ar_frame_free(&f);
    ar_link_destroy(a);
    ar_link_destroy(b);
}

Test(link, recv_timeout)
{
    ar_link *a, *b;
    cr_assert_eq(ar_link_local_pair(&a, &b, "a", "b"), AR_OK);
    ar_frame f;
    double t0 = ar_now();
    int rc = ar_link_recv(b, &f, 0.1);
    double dt = ar_now() - t0;
    cr_assert_neq(rc, AR_OK);
    cr_assert_eq(rc, AR_ECLOSED, "%d: %s", rc, ar_last_error());
    cr_assert(dt >= 0.09 && dt < 0.2, "returned after %.3f s", dt);
    /* zero timeout: poll */
    t0 = ar_now();
    cr_assert_neq(ar_link_recv(b, &f, 0), AR_OK);
    cr_assert_lt(ar_now() - t0, 0.1);
    /* a frame that is there is returned at once even with a zero timeout */
    send_numbered(a, 5, 2);
    cr_assert_eq(ar_link_recv(b, &f, 0), AR_OK, "%s", ar_last_error());
    cr_assert_eq(f.step, 5);
    ar_frame_free(&f);
    ar_link_destroy(a);
    ar_link_destroy(b);
}

Test(link, closed)
{
    ar_link *a, *b;
    cr_assert_eq(ar_link_local_pair(&a, &b, "a", "b"), AR_OK);
    send_numbered(a, 1, 4);
    ar_link_close(a);
    ar_frame f;
    /* what was sent before the close is still delivered */
    cr_assert_eq(ar_link_recv(b, &f, 1.0), AR_OK, "%s", ar_last_error());
    cr_assert_eq(f.step, 1);
    ar_frame_free(&f);
    /* then AR_ECLOSED at once, even when waiting forever */
    double t0 = ar_now();
    cr_assert_eq(ar_link_recv(b, &f, -1), AR_ECLOSED);
    cr_assert_eq(ar_link_recv(a, &f, -1), AR_ECLOSED);
    cr_assert_lt(ar_now() - t0, 0.5);
    /* sending on a closed link fails and frees the frame (LeakSanitizer) */
    ar_frame g = {.kind = AR_FRAME_ACT};
    int64_t shape[1] = {16};
    float buf[16] = {0};
    cr_assert_eq(ar_frame_set_payload(&g, AR_DT_F32, 1, shape, buf), AR_OK);
    cr_assert_eq(ar_link_send(b, &g), AR_ECLOSED);
    cr_assert_null(g.data);
    ar_link_destroy(a);
    ar_link_destroy(b);
}

Test(link, destroy_frees_queued_frames)
{
    ar_link *a, *b;
    cr_assert_eq(ar_link_local_pair(&a, &b, "a", "b"), AR_OK);
    for (int i = 0; i < 5; i++) {
        send_numbered(a, i, 64);
        send_numbered(b, i, 32);
    }
    /* destroy in either order with frames still queued: LeakSanitizer checks */
    ar_link_destroy(b);
    ar_link_destroy(a);
}

/* ---- stage argument checks ------------------------------------------------ */

static const ar_optim_config adamw = {.kind = AR_OPT_ADAMW, .beta1 = 0.9f, .beta2 = 0.999f,
                                      .eps = 1e-8f, .weight_decay = 0.01f};

static ar_model_spec tiny_gpt(void)
{
    ar_model_spec s;
    memset(&s, 0, sizeof s);
    s.type = AR_MODEL_GPT;
    s.vocab_size = 11;
    s.block_size = 4;
    s.n_layer = 1;
    s.n_head = 2;
    s.n_embd = 8;
    return s;
}

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

Test(stage, gpt_bad_arguments)
{
    ar_model_spec spec = tiny_gpt();
    ar_stage st;
    cr_assert_eq(ar_stage_create(&st, &spec, 0, ar_spec_units(&spec), 2, 2, 7, &adamw), AR_OK,
                 "%s", ar_last_error());
    int32_t tok[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    int32_t tgt[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    const float *out;
    double loss;
    long correct;
    cr_assert_eq(ar_stage_forward(&st, 0, 2, tok, 1, 1, &out), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_stage_loss(&st, 0, 2, tgt, &loss, &correct), AR_OK, "%s", ar_last_error());
    cr_assert(isfinite(loss) && loss > 0);

    /* token outside the vocabulary */
    tok[5] = 11;
    cr_assert_eq(ar_stage_forward(&st, 0, 2, tok, 1, 1, &out), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "token 11"), "%s", ar_last_error());
    cr_assert_not_null(strstr(ar_last_error(), "vocabulary"), "%s", ar_last_error());
    tok[5] = -1;
    cr_assert_eq(ar_stage_forward(&st, 0, 2, tok, 1, 1, &out), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "token -1"), "%s", ar_last_error());
    tok[5] = 5;

    /* target out of range */
    cr_assert_eq(ar_stage_forward(&st, 0, 2, tok, 1, 1, &out), AR_OK);
    tgt[7] = 11;
    cr_assert_eq(ar_stage_loss(&st, 0, 2, tgt, &loss, NULL), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "target 11"), "%s", ar_last_error());
    tgt[7] = -3;
    cr_assert_eq(ar_stage_loss(&st, 0, 2, tgt, &loss, NULL), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "target -3"), "%s", ar_last_error());
    tgt[7] = 8;

    /* slot out of range */
    cr_assert_eq(ar_stage_forward(&st, 2, 2, tok, 1, 1, &out), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "slot 2"), "%s", ar_last_error());
    cr_assert_eq(ar_stage_forward(&st, -1, 2, tok, 1, 1, &out), AR_EINVAL);
    cr_assert_eq(ar_stage_loss(&st, 5, 2, tgt, &loss, NULL), AR_EINVAL);
    const float *din;
    cr_assert_eq(ar_stage_backward(&st, 9, 2, tgt, NULL, 1.0f, 1, &din), AR_EINVAL);

    /* more rows than max_B, or none */
    int32_t big[12] = {0};
    cr_assert_eq(ar_stage_forward(&st, 0, 3, big, 1, 1, &out), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "3 rows"), "%s", ar_last_error());
    cr_assert_eq(ar_stage_forward(&st, 0, 0, big, 1, 1, &out), AR_EINVAL);
    cr_assert_eq(ar_stage_loss(&st, 0, 3, big, &loss, NULL), AR_EINVAL);
    cr_assert_eq(ar_stage_backward(&st, 0, 3, big, NULL, 1.0f, 1, &din), AR_EINVAL);
    ar_stage_destroy(&st);
}

Test(stage, mlp_bad_arguments)
{
    ar_model_spec spec = small_mlp();
    ar_stage st;
    /* bad unit ranges and sizes */
    cr_assert_eq(ar_stage_create(&st, &spec, 0, 4, 2, 1, 7, &adamw), AR_EINVAL);
    cr_assert_eq(ar_stage_create(&st, &spec, 2, 2, 2, 1, 7, &adamw), AR_EINVAL);
    cr_assert_eq(ar_stage_create(&st, &spec, 0, 3, 0, 1, 7, &adamw), AR_EINVAL);
    cr_assert_eq(ar_stage_create(&st, &spec, 0, 3, 2, 0, 7, &adamw), AR_EINVAL);

    /* a middle stage cannot compute a loss */
    cr_assert_eq(ar_stage_create(&st, &spec, 1, 2, 2, 1, 7, &adamw), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_stage_in_width(&st), 16);
    cr_assert_eq(ar_stage_out_width(&st), 12);
    float x[32] = {0};
    const float *out;
    double loss;
    int32_t tgt[2] = {0, 1};
    cr_assert_eq(ar_stage_forward(&st, 0, 2, x, 1, 1, &out), AR_OK, "%s", ar_last_error());
    cr_assert_neq(ar_stage_loss(&st, 0, 2, tgt, &loss, NULL), AR_OK);
    ar_stage_destroy(&st);

    cr_assert_eq(ar_stage_create(&st, &spec, 0, 3, 2, 1, 7, &adamw), AR_OK, "%s", ar_last_error());
    float in[40];
    for (int i = 0; i < 40; i++)
        in[i] = (float)i / 40;
    cr_assert_eq(ar_stage_forward(&st, 0, 2, in, 1, 1, &out), AR_OK);
    tgt[1] = 5;
    cr_assert_eq(ar_stage_loss(&st, 0, 2, tgt, &loss, NULL), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "target 5"), "%s", ar_last_error());
    cr_assert_eq(ar_stage_forward(&st, 1, 2, in, 1, 1, &out), AR_EINVAL);
    cr_assert_eq(ar_stage_forward(&st, 0, 3, in, 1, 1, &out), AR_EINVAL);
    ar_stage_destroy(&st);
}

/* ---- whole in-process pipelines ------------------------------------------ */

#define NSTEPS 5
#define BATCH 8

typedef struct {
    double loss[NSTEPS];
    double sumsq[NSTEPS][8];
    float *weights;
    long nweights;
} run_result;

static void make_data(int step, float *x, int32_t *y, const ar_model_spec *spec)
{
    ar_rng r;
    ar_rng_seed(&r, 1000 + (uint64_t)step);
    for (int i = 0; i < BATCH * spec->inputs; i++)
        x[i] = ar_rng_normal(&r);
    for (int i = 0; i < BATCH; i++)
        y[i] = (int32_t)ar_rng_below(&r, (uint64_t)spec->classes);
}

/* All parameters of every stage, in unit order. */
static float *gather_weights(const ar_local_pipeline *p, long *n)
{
    long total = 0;
    for (int i = 0; i < p->S; i++)
        total += p->stages[i].param_floats;
    float *w = malloc(sizeof(float) * (size_t)total);
    cr_assert_not_null(w);
    long at = 0;
    for (int i = 0; i < p->S; i++) {
        memcpy(w + at, p->stages[i].mem_params, sizeof(float) * (size_t)p->stages[i].param_floats);
        at += p->stages[i].param_floats;
    }
    *n = total;
    return w;
}

static void train(const ar_model_spec *spec, int S, int M, int sched, const ar_optim_config *o,
                  run_result *res)
{
    memset(res, 0, sizeof *res);
    ar_local_pipeline p;
    int rc = ar_local_create(&p, spec, S, BATCH / M, M, sched, 42, o);
    cr_assert_eq(rc, AR_OK, "%s", ar_last_error());
    cr_assert_eq(p.S, S);
    cr_assert_eq(ar_local_start(&p, sched, 42, 1), AR_OK, "%s", ar_last_error());
    float x[BATCH * 20];
    int32_t y[BATCH];
    cr_assert(spec->inputs == 20);
    /* one fixed batch, so that the loss must fall */
    make_data(0, x, y, spec);
    for (int step = 0; step < NSTEPS; step++) {
        ar_batch_desc b = {.step = step, .M = M, .B = BATCH, .dtype = AR_DT_F32, .inputs = x,
                           .row_elems = 20, .targets = y, .row_targets = 1};
        ar_step_result r;
        rc = ar_chain_train_step(p.head, &b, 30.0, &r);
        cr_assert_eq(rc, AR_OK, "S %d M %d sched %d step %d: %s", S, M, sched, step,
                     ar_last_error());
        cr_assert(isfinite(r.loss));
        cr_assert_eq(r.nstages, S);
        cr_assert_eq(r.nunits, ar_spec_units(spec));
        res->loss[step] = r.loss;
        for (int u = 0; u < r.nunits; u++) {
            cr_assert_gt(r.unit_sumsq[u], 0);
            res->sumsq[step][u] = r.unit_sumsq[u];
        }
        cr_assert_eq(ar_chain_apply(p.head, step, 1e-2f, 1.0f), AR_OK, "%s", ar_last_error());
    }
    cr_assert_eq(ar_chain_sync(p.head, 30.0), AR_OK, "%s", ar_last_error());
    res->weights = gather_weights(&p, &res->nweights);
    cr_assert_eq(res->nweights, ar_spec_param_count(spec));
    ar_local_destroy(&p);
}

static void assert_bitwise(const run_result *a, const run_result *b, const char *what)
{
    for (int s = 0; s < NSTEPS; s++) {
        cr_assert(memcmp(&a->loss[s], &b->loss[s], sizeof(double)) == 0,
                  "%s: loss of step %d: %.17g vs %.17g", what, s, a->loss[s], b->loss[s]);
        cr_assert(memcmp(a->sumsq[s], b->sumsq[s], sizeof a->sumsq[s]) == 0,
                  "%s: gradient norms of step %d differ", what, s);
    }
    cr_assert_eq(a->nweights, b->nweights);
    for (long i = 0; i < a->nweights; i++)
        cr_assert(memcmp(&a->weights[i], &b->weights[i], sizeof(float)) == 0,
                  "%s: weight %ld: %.9g vs %.9g", what, i, a->weights[i], b->weights[i]);
}

static void run_matrix(const ar_optim_config *o)
{
    ar_model_spec spec = small_mlp();
    run_result base[2]; /* S = 1, gpipe, for M = 1 and M = 4 */
    const int Ms[2] = {1, 4};
    for (int mi = 0; mi < 2; mi++) {
        train(&spec, 1, Ms[mi], AR_SCHED_GPIPE, o, &base[mi]);
        for (int S = 1; S <= 3; S += 2)
            for (int sched = 0; sched < 2; sched++) {
                if (S == 1 && sched == AR_SCHED_GPIPE)
                    continue;
                run_result r;
                train(&spec, S, Ms[mi], sched, o, &r);
                char what[64];
                snprintf(what, sizeof what, "S %d M %d %s vs S 1 gpipe", S, Ms[mi],
                         ar_schedule_name(sched));
                assert_bitwise(&base[mi], &r, what);
                free(r.weights);
            }
    }
    /* a different micro-batch split only changes the summation order */
    for (int s = 0; s < NSTEPS; s++)
        cr_assert_float_eq(base[0].loss[s], base[1].loss[s], 1e-5, "loss of step %d: %.9g vs %.9g",
                           s, base[0].loss[s], base[1].loss[s]);
    for (long i = 0; i < base[0].nweights; i++)
        cr_assert_float_eq(base[0].weights[i], base[1].weights[i], 1e-5,
                           "weight %ld: %.9g vs %.9g", i, base[0].weights[i], base[1].weights[i]);
    /* and training did something */
    cr_assert_lt(base[0].loss[NSTEPS - 1], base[0].loss[0]);
    free(base[0].weights);
    free(base[1].weights);
}

Test(pipeline, identical_across_partitions_and_schedules_adamw)
{
    run_matrix(&adamw);
}

Test(pipeline, identical_across_partitions_and_schedules_sgd)
{
    ar_optim_config sgd = {.kind = AR_OPT_SGD, .beta1 = 0.9f, .weight_decay = 0.0f};
    run_matrix(&sgd);
}

/* Receive one frame on the driver's end, which must be an ERROR naming `needle`. */
static void expect_error_frame(ar_link *head, const char *needle)
{
    ar_frame f;
    cr_assert_eq(ar_link_recv(head, &f, 10.0), AR_OK, "no answer: %s", ar_last_error());
    cr_assert_eq(f.kind, AR_FRAME_ERROR, "got a %s frame", ar_frame_kind_name(f.kind));
    cr_assert_eq(f.dtype, AR_DT_U8);
    char msg[1024];
    size_t n = f.nbytes < sizeof msg - 1 ? f.nbytes : sizeof msg - 1;
    memcpy(msg, f.data, n);
    msg[n] = 0;
    ar_frame_free(&f);
    cr_assert_not_null(strstr(msg, needle), "error frame \"%s\" does not mention \"%s\"", msg,
                       needle);
    cr_assert_not_null(strstr(msg, "stage 0"), "error frame \"%s\" does not name the stage", msg);
    /* nothing else follows */
    cr_assert_neq(ar_link_recv(head, &f, 0.05), AR_OK, "unexpected %s frame after the error",
                  ar_frame_kind_name(f.kind));
}

static void good_step(ar_local_pipeline *p, int64_t step, int M)
{
    ar_model_spec spec = small_mlp();
    float x[BATCH * 20];
    int32_t y[BATCH];
    make_data((int)step, x, y, &spec);
    ar_batch_desc b = {.step = step, .M = M, .B = BATCH, .dtype = AR_DT_F32, .inputs = x,
                       .row_elems = 20, .targets = y, .row_targets = 1};
    ar_step_result r;
    cr_assert_eq(ar_chain_train_step(p->head, &b, 10.0, &r), AR_OK, "%s", ar_last_error());
    cr_assert(isfinite(r.loss));
    cr_assert_eq(ar_chain_apply(p->head, step, 1e-3f, 1.0f), AR_OK);
    cr_assert_eq(ar_chain_sync(p->head, 10.0), AR_OK, "%s", ar_last_error());
}

Test(pipeline, bad_frames_answered_with_error_then_serving)
{
    ar_model_spec spec = small_mlp();
    for (int S = 1; S <= 3; S += 2) {
        ar_local_pipeline p;
        cr_assert_eq(ar_local_create(&p, &spec, S, BATCH, 2, AR_SCHED_1F1B, 3, &adamw), AR_OK,
                     "%s", ar_last_error());
        cr_assert_eq(ar_local_start(&p, AR_SCHED_1F1B, 3, 1), AR_OK, "%s", ar_last_error());
        good_step(&p, 0, 2);

        /* 1: an ACT frame whose payload does not match its rows */
        float x[3 * 20] = {0};
        int32_t t[3] = {0, 1, 2};
        ar_frame f = {.kind = AR_FRAME_ACT, .step = 1, .mb = 0, .nmb = 1, .rows = 3};
        int64_t shape[2] = {2, 20};
        cr_assert_eq(ar_frame_set_payload(&f, AR_DT_F32, 2, shape, x), AR_OK);
        cr_assert_eq(ar_frame_set_targets(&f, t, 3), AR_OK);
        cr_assert_eq(ar_link_send(p.head, &f), AR_OK);
        expect_error_frame(p.head, "160 bytes");
        good_step(&p, 1, 2);

        /* 2: a frame that fails validation (shape says 240 bytes, payload has 160) */
        f = (ar_frame){.kind = AR_FRAME_ACT, .step = 2, .mb = 0, .nmb = 1, .rows = 3,
                       .dtype = AR_DT_F32, .ndim = 2, .shape = {3, 20}};
        f.data = calloc(40, sizeof(float));
        f.nbytes = 160;
        cr_assert_eq(ar_frame_set_targets(&f, t, 3), AR_OK);
        cr_assert_eq(ar_link_send(p.head, &f), AR_OK);
        expect_error_frame(p.head, "bad frame");
        good_step(&p, 2, 2);

        /* 3: an unknown frame kind */
        f = (ar_frame){.kind = 42};
        cr_assert_eq(ar_link_send(p.head, &f), AR_OK);
        expect_error_frame(p.head, "kind 42");

        /* 4: a kind a stage never takes from upstream */
        f = (ar_frame){.kind = AR_FRAME_GRAD};
        cr_assert_eq(ar_link_send(p.head, &f), AR_OK);
        expect_error_frame(p.head, "GRAD");

        /* 5: a wrong dtype (tokens for an MLP) */
        int32_t xi[3 * 20] = {0};
        f = (ar_frame){.kind = AR_FRAME_ACT, .step = 3, .mb = 0, .nmb = 1, .rows = 3};
        shape[0] = 3;
        cr_assert_eq(ar_frame_set_payload(&f, AR_DT_I32, 2, shape, xi), AR_OK);
        cr_assert_eq(ar_frame_set_targets(&f, t, 3), AR_OK);
        cr_assert_eq(ar_link_send(p.head, &f), AR_OK);
        expect_error_frame(p.head, "dtype");

        /* 6: a STEP with a nonsense learning rate */
        cr_assert_eq(ar_chain_apply(p.head, 3, NAN, 1.0f), AR_OK);
        expect_error_frame(p.head, "STEP");

        /* 7: the driver's own checks */
        ar_batch_desc b = {.step = 4, .M = 3, .B = BATCH, .dtype = AR_DT_F32, .inputs = x,
                           .row_elems = 20, .targets = t, .row_targets = 1};
        ar_step_result r;
        cr_assert_eq(ar_chain_train_step(p.head, &b, 1.0, &r), AR_EINVAL);

        good_step(&p, 4, 2);
        ar_local_destroy(&p);
    }
}

Test(pipeline, eval_matches_stage_loss)
{
    ar_model_spec spec = small_mlp();
    float x[BATCH * 20];
    int32_t y[BATCH];
    make_data(9, x, y, &spec);

    /* reference: one stage holding everything, same seed so the same weights */
    ar_stage ref;
    cr_assert_eq(ar_stage_create(&ref, &spec, 0, ar_spec_units(&spec), BATCH, 1, 11, &adamw),
                 AR_OK, "%s", ar_last_error());
    const float *out;
    cr_assert_eq(ar_stage_forward(&ref, 0, BATCH, x, 0, 0, &out), AR_OK, "%s", ar_last_error());
    double loss;
    long correct;
    cr_assert_eq(ar_stage_loss(&ref, 0, BATCH, y, &loss, &correct), AR_OK, "%s", ar_last_error());

    for (int S = 1; S <= 3; S++) {
        ar_local_pipeline p;
        cr_assert_eq(ar_local_create(&p, &spec, S, BATCH, 1, AR_SCHED_GPIPE, 11, &adamw), AR_OK,
                     "%s", ar_last_error());
        cr_assert_eq(ar_local_start(&p, AR_SCHED_GPIPE, 11, 1), AR_OK, "%s", ar_last_error());
        ar_batch_desc b = {.step = 0, .M = 1, .B = BATCH, .dtype = AR_DT_F32, .inputs = x,
                           .row_elems = 20, .targets = y, .row_targets = 1};
        double ls = 0, c = 0, n = 0;
        cr_assert_eq(ar_chain_eval(p.head, &b, 10.0, &ls, &c, &n), AR_OK, "%s", ar_last_error());
        cr_assert_eq(n, BATCH);
        cr_assert_eq(c, (double)correct, "S %d: %g correct vs %ld", S, c, correct);
        cr_assert_float_eq(ls, loss * BATCH, 1e-9 * BATCH, "S %d: %.17g vs %.17g", S, ls,
                           loss * BATCH);
        /* it accumulates: a second chunk adds to the sums */
        b.B = 3;
        cr_assert_eq(ar_chain_eval(p.head, &b, 10.0, &ls, &c, &n), AR_OK, "%s", ar_last_error());
        cr_assert_eq(n, BATCH + 3);
        double l3;
        long c3;
        cr_assert_eq(ar_stage_forward(&ref, 0, 3, x, 0, 0, &out), AR_OK);
        cr_assert_eq(ar_stage_loss(&ref, 0, 3, y, &l3, &c3), AR_OK);
        cr_assert_float_eq(ls, loss * BATCH + l3 * 3, 1e-9 * BATCH);
        cr_assert_eq(c, (double)(correct + c3));
        /* a chunk larger than the stages hold is an error frame, not a crash */
        float xx[(BATCH + 1) * 20] = {0};
        int32_t yy[BATCH + 1] = {0};
        b.B = BATCH + 1;
        b.inputs = xx;
        b.targets = yy;
        cr_assert_neq(ar_chain_eval(p.head, &b, 10.0, &ls, &c, &n), AR_OK);
        cr_assert_not_null(strstr(ar_last_error(), "rows"), "%s", ar_last_error());
        /* an out-of-range target too */
        b.B = 2;
        b.inputs = x;
        yy[1] = 5;
        b.targets = yy;
        cr_assert_neq(ar_chain_eval(p.head, &b, 10.0, &ls, &c, &n), AR_OK);
        cr_assert_not_null(strstr(ar_last_error(), "target 5"), "%s", ar_last_error());
        /* and evaluation still works after */
        b.B = BATCH;
        b.targets = y;
        ls = c = n = 0;
        cr_assert_eq(ar_chain_eval(p.head, &b, 10.0, &ls, &c, &n), AR_OK, "%s", ar_last_error());
        cr_assert_float_eq(ls, loss * BATCH, 1e-9 * BATCH);
        ar_local_destroy(&p);
    }
    ar_stage_destroy(&ref);
}

/* When a later stage fails mid-step, the stages before it relay its ERROR
 * frame upstream, abandon the step and keep serving: the next step works. */
Test(pipeline, later_stage_error_then_serving, .timeout = 20.0)
{
    ar_model_spec spec = small_mlp();
    ar_local_pipeline p;
    cr_assert_eq(ar_local_create(&p, &spec, 3, BATCH, 1, AR_SCHED_GPIPE, 3, &adamw), AR_OK);
    cr_assert_eq(ar_local_start(&p, AR_SCHED_GPIPE, 3, 1), AR_OK);
    float x[BATCH * 20];
    int32_t y[BATCH];
    make_data(0, x, y, &spec);
    y[BATCH - 1] = 7; /* outside the 5 classes: the last stage fails in its loss */
    ar_batch_desc b = {.step = 0, .M = 1, .B = BATCH, .dtype = AR_DT_F32, .inputs = x,
                       .row_elems = 20, .targets = y, .row_targets = 1};
    ar_step_result r;
    cr_assert_neq(ar_chain_train_step(p.head, &b, 10.0, &r), AR_OK);
    cr_assert_not_null(strstr(ar_last_error(), "stage 2"), "%s", ar_last_error());
    cr_assert_not_null(strstr(ar_last_error(), "target 7"), "%s", ar_last_error());
    good_step(&p, 1, 1);
    ar_local_destroy(&p);
}
