/* A stage whose GPT blocks are split over a tensor-parallel group (ranks in
 * threads, in-process links) trains like the same stage on one device:
 * every step's loss within 1e-5 (relative) and the weights within 1e-5 after
 * ten AdamW steps with clipping, for 2 ranks and for 3 uneven ones, and
 * with dropout. */
#include <criterion/criterion.h>

#include "core/core.h"
#include "nn/tp.h"
#include "train/stage.h"
#include "train/tp_group.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

typedef struct {
    ar_tp_rank rank;
    ar_link *link;
    pthread_t thread;
} rank_thread;

static void *rank_main(void *arg)
{
    rank_thread *t = arg;
    ar_tp_rank_serve(&t->rank, t->link);
    return NULL;
}

/* One training step on a stage holding the whole model; returns the loss. */
static double train_step(ar_stage *s, const int32_t *x, const int32_t *y, int B, float lr, uint64_t drop)
{
    const float *out, *din;
    double loss;
    ar_stage_zero_grad(s);
    cr_assert_eq(ar_stage_forward(s, 0, B, x, 1, drop, &out), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_stage_loss(s, 0, B, y, &loss, NULL), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_stage_backward(s, 0, B, y, NULL, 1.0f / (B * s->T), drop, &din), AR_OK, "%s",
                 ar_last_error());
    ar_stage_fold_tied(s);
    double sums[16], total = 0;
    cr_assert_eq(ar_stage_grad_sumsq(s, sums), AR_OK, "%s", ar_last_error());
    for (int i = 0; i < s->nlayers; i++)
        total += sums[i];
    double norm = sqrt(total);
    float scale = norm > 0.5 ? (float)(0.5 / (norm + 1e-6)) : 1.0f;
    cr_assert_eq(ar_stage_update(s, lr, scale), AR_OK, "%s", ar_last_error());
    return loss;
}

static void check(int R, float dropout)
{
    ar_model_spec spec;
    memset(&spec, 0, sizeof spec);
    spec.type = AR_MODEL_GPT;
    spec.vocab_size = 17;
    spec.block_size = 8;
    spec.n_layer = 2;
    spec.n_head = 8;
    spec.n_embd = 32;
    spec.dropout = dropout;
    const int B = 4, T = spec.block_size, units = ar_spec_units(&spec);
    ar_optim_config adamw = {.kind = AR_OPT_ADAMW, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f,
                             .weight_decay = 0.1f};
    const uint64_t seed = 5;

    ar_stage one;
    cr_assert_eq(ar_stage_create(&one, &spec, 0, units, B, 1, seed, &adamw), AR_OK);

    ar_range heads[2][3], hidden[2][3], h[3], u[3];
    cr_assert_eq(ar_tp_split(spec.n_head, R, NULL, h), AR_OK);
    cr_assert_eq(ar_tp_split(4 * spec.n_embd, R, NULL, u), AR_OK);
    rank_thread rt[3];
    ar_link *ends[3];
    for (int r = 0; r < R; r++) {
        for (int b = 0; b < spec.n_layer; b++) {
            heads[b][r] = h[r];
            hidden[b][r] = u[r];
        }
        ar_range hr[2] = {heads[0][r], heads[1][r]}, ur[2] = {hidden[0][r], hidden[1][r]};
        cr_assert_eq(ar_tp_rank_create(&rt[r].rank, &spec, 0, spec.n_layer, hr, ur, B, 1, seed, &adamw),
                     AR_OK, "%s", ar_last_error());
        cr_assert_eq(ar_link_local_pair(&ends[r], &rt[r].link, "rank", "leader"), AR_OK);
        cr_assert_eq(pthread_create(&rt[r].thread, NULL, rank_main, &rt[r]), 0);
    }
    ar_stage tp;
    cr_assert_eq(ar_stage_create_tp(&tp, &spec, 0, units, B, 1, seed, &adamw, ends, R), AR_OK, "%s",
                 ar_last_error());
    /* memory: the leader holds only the unsplit parts of the blocks, each
     * rank only its slices, and together they hold the model once */
    long ranks_total = 0, biggest = 0, smallest = -1;
    for (int r = 0; r < R; r++) {
        long n = rt[r].rank.param_floats;
        ranks_total += n;
        biggest = n > biggest ? n : biggest;
        smallest = smallest < 0 || n < smallest ? n : smallest;
    }
    cr_expect_eq(tp.param_floats + ranks_total, one.param_floats, "leader %ld + ranks %ld != %ld",
                 tp.param_floats, ranks_total, one.param_floats);
    /* no rank holds more than its share of heads and units, rounded up:
     * per head HS rows of q, k, v (+ biases) and HS columns of the
     * projection; per unit a row of c_fc (+ bias) and a column of c_proj */
    long C = spec.n_embd, HS = C / spec.n_head;
    long heads_up = (spec.n_head + R - 1) / R, units_up = (4 * C + R - 1) / R;
    long bound = spec.n_layer * (heads_up * HS * (4 * C + 3) + units_up * (2 * C + 1));
    cr_expect_leq(biggest, bound, "a rank holds %ld floats, its share is at most %ld", biggest, bound);
    cr_expect_gt(smallest, 0);

    ar_rng rng;
    ar_rng_seed(&rng, 11);
    int32_t x[4 * 8], y[4 * 8];
    for (int step = 0; step < 10; step++) {
        for (int i = 0; i < B * T; i++) {
            x[i] = (int32_t)ar_rng_below(&rng, (uint64_t)spec.vocab_size);
            y[i] = (int32_t)ar_rng_below(&rng, (uint64_t)spec.vocab_size);
        }
        uint64_t drop = 1000 + (uint64_t)step;
        double a = train_step(&one, x, y, B, 3e-3f, drop), b = train_step(&tp, x, y, B, 3e-3f, drop);
        cr_expect(fabs(a - b) <= 1e-5 * fabs(a), "%d ranks, step %d: loss %.8f vs %.8f", R, step, a, b);
    }
    /* the unsplit parameters, by name */
    for (int i = 0; i < tp.nparams; i++) {
        ar_param *p = tp.params[i], *q = ar_stage_find_param(&one, p->name);
        cr_assert_not_null(q, "%s", p->name);
        double d = 0;
        for (long j = 0; j < p->numel; j++)
            d = fmax(d, fabs((double)p->data[j] - (double)q->data[j]));
        cr_expect(d <= 1e-5, "%d ranks: %s differs by %.3g", R, p->name, d);
    }
    for (int r = 0; r < R; r++) {
        ar_frame stop = {.kind = AR_FRAME_TP};
        stop.scalars[0] = AR_TP_STOP;
        ar_link_send(ends[r], &stop);
        pthread_join(rt[r].thread, NULL);
        ar_link_destroy(ends[r]);
        ar_link_destroy(rt[r].link);
        ar_tp_rank_destroy(&rt[r].rank);
    }
    ar_stage_destroy(&tp);
    ar_stage_destroy(&one);
}

Test(tp_stage, two_ranks) { check(2, 0.0f); }
Test(tp_stage, three_uneven_ranks) { check(3, 0.0f); }
/* One device does each block's dropout inside its fused products, the
 * group's leader in passes of its own: the same masks, so the same run. */
Test(tp_stage, two_ranks_with_dropout) { check(2, 0.2f); }
