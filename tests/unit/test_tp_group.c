/* A tensor-parallel group over in-process links: ranks serving shards of a
 * GPT block, driven by a leader that runs the LayerNorms, residuals and
 * biases, match one device holding the whole block: forward, backward,
 * gradient norm and an AdamW step, for 2 and 3 (uneven) ranks. */
#include <criterion/criterion.h>

#include "core/core.h"
#include "ops/ops.h"
#include "train/frame.h"
#include "train/stage.h"
#include "train/tp_group.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

enum { LN1_W, LN1_B, ATTN_W, ATTN_B, APROJ_W, APROJ_B, LN2_W, LN2_B, FC_W, FC_B, MPROJ_W, MPROJ_B };

typedef struct {
    ar_tp_rank rank;
    ar_link *link;
    pthread_t thread;
    int rc;
} rank_thread;

static void *rank_main(void *arg)
{
    rank_thread *t = arg;
    t->rc = ar_tp_rank_serve(&t->rank, t->link);
    return NULL;
}

static double max_diff(const float *a, const float *b, long n)
{
    double m = 0;
    for (long i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        m = d > m ? d : m;
    }
    return m;
}

static void check_group(int R)
{
    ar_model_spec spec;
    memset(&spec, 0, sizeof spec);
    spec.type = AR_MODEL_GPT;
    spec.vocab_size = 13;
    spec.block_size = 8;
    spec.n_layer = 2;
    spec.n_head = 8;
    spec.n_embd = 32;
    const int B = 3, T = spec.block_size, C = spec.n_embd;
    const size_t NC = (size_t)B * T * C;
    ar_optim_config adamw = {.kind = AR_OPT_ADAMW, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f,
                             .weight_decay = 0.1f};
    const uint64_t seed = 7;

    /* one device: block 0 (unit 1) as a stage of its own */
    ar_stage whole;
    cr_assert_eq(ar_stage_create(&whole, &spec, 1, 2, B, 1, seed, &adamw), AR_OK, "%s", ar_last_error());
    ar_rng rng;
    ar_rng_seed(&rng, 99);
    float *x = ar_calloc(NC, 4), *dout = ar_calloc(NC, 4);
    for (size_t i = 0; i < NC; i++) {
        x[i] = ar_rng_normal(&rng);
        dout[i] = ar_rng_normal(&rng);
    }
    const float *out_whole, *dx_whole;
    ar_stage_zero_grad(&whole);
    cr_assert_eq(ar_stage_forward(&whole, 0, B, x, 1, 0, &out_whole), AR_OK);
    cr_assert_eq(ar_stage_backward(&whole, 0, B, NULL, dout, 0, 0, &dx_whole), AR_OK);
    double sumsq_whole;
    ar_stage_grad_sumsq(&whole, &sumsq_whole);

    /* the group: R ranks in threads, linked to the leader */
    ar_range heads[3], hidden[3];
    cr_assert_eq(ar_tp_split(spec.n_head, R, NULL, heads), AR_OK);
    cr_assert_eq(ar_tp_split(4 * C, R, NULL, hidden), AR_OK);
    rank_thread rt[3];
    ar_link *leader_end[3];
    for (int r = 0; r < R; r++) {
        cr_assert_eq(ar_tp_rank_create(&rt[r].rank, &spec, 0, 1, &heads[r], &hidden[r], B, 1, seed, &adamw),
                     AR_OK, "%s", ar_last_error());
        cr_assert_eq(ar_link_local_pair(&leader_end[r], &rt[r].link, "rank", "leader"), AR_OK);
        cr_assert_eq(pthread_create(&rt[r].thread, NULL, rank_main, &rt[r]), 0);
    }

    /* the leader: its own parameters are the whole block's unsplit ones */
    ar_param *w = whole.layers[0]->params;
    const int N = B * T;
    float *ln1 = ar_calloc(NC, 4), *m1 = ar_calloc(N, 4), *r1 = ar_calloc(N, 4), *attn = ar_calloc(NC, 4),
          *res1 = ar_calloc(NC, 4), *ln2 = ar_calloc(NC, 4), *m2 = ar_calloc(N, 4), *r2 = ar_calloc(N, 4),
          *mlp = ar_calloc(NC, 4), *out = ar_calloc(NC, 4);
    ar_layernorm_forward(ln1, m1, r1, x, w[LN1_W].data, w[LN1_B].data, N, C);
    cr_assert_eq(ar_tp_group_scatter(leader_end, R, AR_TP_ATTN_FWD, 0, 0, B, T, C, ln1), AR_OK);
    cr_assert_eq(ar_tp_group_gather_sum(leader_end, R, NC, attn, 10), AR_OK, "%s", ar_last_error());
    for (int i = 0; i < N; i++)
        for (int j = 0; j < C; j++)
            attn[(size_t)i * C + j] += w[APROJ_B].data[j];
    ar_residual_forward(res1, x, attn, (long)NC);
    ar_layernorm_forward(ln2, m2, r2, res1, w[LN2_W].data, w[LN2_B].data, N, C);
    cr_assert_eq(ar_tp_group_scatter(leader_end, R, AR_TP_MLP_FWD, 0, 0, B, T, C, ln2), AR_OK);
    cr_assert_eq(ar_tp_group_gather_sum(leader_end, R, NC, mlp, 10), AR_OK, "%s", ar_last_error());
    for (int i = 0; i < N; i++)
        for (int j = 0; j < C; j++)
            mlp[(size_t)i * C + j] += w[MPROJ_B].data[j];
    ar_residual_forward(out, res1, mlp, (long)NC);
    double fwd = max_diff(out, out_whole, (long)NC);
    cr_expect(fwd <= 1e-5, "%d ranks: output differs by %.3g", R, fwd);

    /* backward (the leader's own parameter gradients are checked by test_tp) */
    float *dres1 = ar_calloc(NC, 4), *dln = ar_calloc(NC, 4), *dx = ar_calloc(NC, 4);
    float *g_ln2w = ar_calloc(C, 4), *g_ln2b = ar_calloc(C, 4), *g_ln1w = ar_calloc(C, 4), *g_ln1b = ar_calloc(C, 4);
    memcpy(dres1, dout, NC * 4);
    cr_assert_eq(ar_tp_group_scatter(leader_end, R, AR_TP_MLP_BWD, 0, 0, B, T, C, dout), AR_OK);
    cr_assert_eq(ar_tp_group_gather_sum(leader_end, R, NC, dln, 10), AR_OK, "%s", ar_last_error());
    ar_layernorm_backward(dres1, g_ln2w, g_ln2b, dln, res1, w[LN2_W].data, m2, r2, N, C);
    memset(dln, 0, NC * 4);
    cr_assert_eq(ar_tp_group_scatter(leader_end, R, AR_TP_ATTN_BWD, 0, 0, B, T, C, dres1), AR_OK);
    cr_assert_eq(ar_tp_group_gather_sum(leader_end, R, NC, dln, 10), AR_OK, "%s", ar_last_error());
    memcpy(dx, dres1, NC * 4);
    ar_layernorm_backward(dx, g_ln1w, g_ln1b, dln, x, w[LN1_W].data, m1, r1, N, C);
    double bwd = max_diff(dx, dx_whole, (long)NC);
    cr_expect(bwd <= 1e-5, "%d ranks: input gradient differs by %.3g", R, bwd);

    /* the ranks' share of the gradient norm */
    double shard_sumsq = 0;
    cr_assert_eq(ar_tp_group_scatter(leader_end, R, AR_TP_NORM, 0, 0, 0, T, C, NULL), AR_OK);
    for (int r = 0; r < R; r++) {
        ar_frame f;
        cr_assert_eq(ar_link_recv(leader_end[r], &f, 10), AR_OK);
        cr_assert_eq(f.kind, AR_FRAME_TP);
        cr_assert_eq(f.nbytes, sizeof(double));
        shard_sumsq += ((double *)f.data)[0];
        ar_frame_free(&f);
    }
    int split[] = {ATTN_W, ATTN_B, APROJ_W, FC_W, FC_B, MPROJ_W};
    double want = 0;
    for (int k = 0; k < 6; k++)
        want += ar_sum_squares(w[split[k]].grad, w[split[k]].numel);
    cr_expect(fabs(shard_sumsq - want) <= 1e-5 * want, "shard gradient norm² %.9g vs %.9g", shard_sumsq, want);
    (void)sumsq_whole;

    /* an AdamW step on both sides; the shards put together equal the whole */
    ar_stage_update(&whole, 1e-2f, 1.0f);
    ar_frame stepf = {0};
    for (int r = 0; r < R; r++) {
        stepf = (ar_frame){.kind = AR_FRAME_TP};
        stepf.scalars[0] = AR_TP_STEP;
        stepf.scalars[1] = 1e-2;
        stepf.scalars[2] = 1.0;
        cr_assert_eq(ar_link_send(leader_end[r], &stepf), AR_OK);
    }
    float none = 0;
    cr_assert_eq(ar_tp_group_gather_sum(leader_end, R, 0, &none, 10), AR_OK, "%s", ar_last_error());
    ar_layer joined = *whole.layers[0];
    float *buf[12] = {0};
    for (int k = 0; k < 6; k++) {
        int i = split[k];
        buf[i] = ar_calloc((size_t)w[i].numel, 4);
        joined.params[i].data = buf[i];
    }
    for (int r = 0; r < R; r++)
        ar_block_shard_to_full(&rt[r].rank.shards[0], &joined, 0);
    for (int k = 0; k < 6; k++) {
        int i = split[k];
        double d;
        if (i == ATTN_B) {
            /* The key bias gets no gradient (softmax ignores a shift common to
             * every key): its gradient is rounding noise, of either sign, which
             * AdamW's first step turns into +-lr. Check the q and v parts, and
             * that the key part's gradient is indeed noise. */
            d = fmax(max_diff(buf[i], w[i].data, C), max_diff(buf[i] + 2 * C, w[i].data + 2 * C, C));
            double kg = 0;
            for (int j = C; j < 2 * C; j++)
                kg = fmax(kg, fabs(w[i].grad[j]));
            cr_expect(kg < 1e-6, "key-bias gradient %.3g is not noise", kg);
        } else {
            d = max_diff(buf[i], w[i].data, w[i].numel);
        }
        cr_expect(d <= 1e-5, "%d ranks: %s after a step differs by %.3g", R, w[i].name, d);
        ar_free(buf[i]);
    }

    /* a bad request is answered with an error, and the rank keeps serving */
    cr_assert_eq(ar_tp_group_scatter(leader_end, 1, AR_TP_ATTN_FWD, 5, 0, B, T, C, ln1), AR_OK);
    float *junk = ar_calloc(NC, 4);
    cr_assert_neq(ar_tp_group_gather_sum(leader_end, 1, NC, junk, 10), AR_OK);
    cr_expect(strstr(ar_last_error(), "out of range") != NULL, "%s", ar_last_error());
    cr_assert_eq(ar_tp_group_scatter(leader_end, R, AR_TP_ATTN_FWD, 0, 0, B, T, C, ln1), AR_OK);
    cr_assert_eq(ar_tp_group_gather_sum(leader_end, R, NC, junk, 10), AR_OK, "%s", ar_last_error());

    for (int r = 0; r < R; r++) {
        ar_frame stop = {.kind = AR_FRAME_TP};
        stop.scalars[0] = AR_TP_STOP;
        ar_link_send(leader_end[r], &stop);
        pthread_join(rt[r].thread, NULL);
        cr_expect_eq(rt[r].rc, AR_OK);
        ar_link_destroy(leader_end[r]);
        ar_link_destroy(rt[r].link);
        ar_tp_rank_destroy(&rt[r].rank);
    }
    float *all[] = {x, dout, ln1, m1, r1, attn, res1, ln2, m2, r2, mlp, out, dres1, dln, dx, g_ln2w, g_ln2b,
                    g_ln1w, g_ln1b, junk};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        ar_free(all[i]);
    ar_stage_destroy(&whole);
}

Test(tp_group, two_ranks) { check_group(2); }
Test(tp_group, three_uneven_ranks) { check_group(3); }
