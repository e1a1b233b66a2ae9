/* Tensor-parallel shards of a GPT block: the sum of the shards' partial
 * outputs, with the leader's LayerNorms, residuals and biases, equals the
 * whole block, forward and backward, for even and uneven splits. */
#include <criterion/criterion.h>

#include "core/core.h"
#include "nn/layer.h"
#include "nn/tp.h"
#include "ops/ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* full block parameter order (gpt.c) */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, APROJ_W, APROJ_B, LN2_W, LN2_B, FC_W, FC_B, MPROJ_W, MPROJ_B };

static ar_model_spec tiny_spec(void)
{
    ar_model_spec s;
    memset(&s, 0, sizeof s);
    s.type = AR_MODEL_GPT;
    s.vocab_size = 11;
    s.block_size = 7;
    s.n_layer = 2;
    s.n_head = 8;
    s.n_embd = 32;
    return s;
}

static void fill(float *x, long n, ar_rng *r, float scale)
{
    for (long i = 0; i < n; i++)
        x[i] = scale * ar_rng_normal(r);
}

static void alloc_params(ar_param *p, int n, ar_rng *r)
{
    for (int i = 0; i < n; i++) {
        p[i].data = ar_calloc((size_t)p[i].numel, sizeof(float));
        p[i].grad = ar_calloc((size_t)p[i].numel, sizeof(float));
        p[i].m = ar_calloc((size_t)p[i].numel, sizeof(float));
        p[i].v = ar_calloc((size_t)p[i].numel, sizeof(float));
        cr_assert(p[i].data && p[i].grad && p[i].m && p[i].v);
        if (r)
            fill(p[i].data, p[i].numel, r, 0.2f);
    }
}

static void free_params(ar_param *p, int n)
{
    for (int i = 0; i < n; i++) {
        ar_free(p[i].data);
        ar_free(p[i].grad);
        ar_free(p[i].m);
        ar_free(p[i].v);
    }
}

static double max_diff(const float *a, const float *b, long n)
{
    double m = 0;
    for (long i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > m)
            m = d;
    }
    return m;
}

static void add_bias(float *x, const float *b, int N, int C)
{
    for (int i = 0; i < N; i++)
        for (int j = 0; j < C; j++)
            x[(size_t)i * C + j] += b[j];
}

static void col_sum(float *db, const float *d, int N, int C)
{
    for (int i = 0; i < N; i++)
        for (int j = 0; j < C; j++)
            db[j] += d[(size_t)i * C + j];
}

static void check_split(int R, const double *weights)
{
    ar_model_spec spec = tiny_spec();
    const int B = 2, T = spec.block_size, C = spec.n_embd, N = B * T;
    ar_rng rng;
    ar_rng_seed(&rng, 42);

    /* the whole block */
    ar_layer *full;
    cr_assert_eq(ar_gpt_layer_create(&spec, 1, &full), AR_OK);
    alloc_params(full->params, full->nparams, &rng);
    float *x = ar_calloc((size_t)N * C, sizeof(float)), *dout = ar_calloc((size_t)N * C, sizeof(float));
    fill(x, (long)N * C, &rng, 1.0f);
    fill(dout, (long)N * C, &rng, 1.0f);
    size_t nsaved = full->vt->saved_floats(full, B, T), nscratch = full->vt->scratch_floats(full, B, T);
    float *saved = ar_calloc(nsaved, sizeof(float)), *scratch = ar_calloc(nscratch, sizeof(float));
    float *dx_full = ar_calloc((size_t)N * C, sizeof(float));
    ar_pass pass = {.B = B, .T = T, .train = 1, .scratch = scratch, .scratch_floats = nscratch};
    cr_assert_eq(full->vt->forward(full, &pass, x, saved), AR_OK);
    cr_assert_eq(full->vt->backward(full, &pass, x, saved, dout, dx_full), AR_OK);

    /* the shards */
    ar_range heads[8], hidden[8];
    cr_assert_eq(ar_tp_split(spec.n_head, R, weights, heads), AR_OK);
    cr_assert_eq(ar_tp_split(4 * C, R, weights, hidden), AR_OK);
    ar_block_shard sh[8];
    float *ssaved_a[8], *ssaved_m[8];
    size_t sscratch = 0;
    for (int r = 0; r < R; r++) {
        cr_assert_eq(ar_block_shard_init(&sh[r], &spec, 0, heads[r], hidden[r]), AR_OK, "%s", ar_last_error());
        alloc_params(sh[r].params, AR_SHARD_NPARAMS, NULL);
        ar_block_shard_from_full(&sh[r], full, 0);
        ssaved_a[r] = ar_calloc(ar_shard_attn_saved(&sh[r], B, T), sizeof(float));
        ssaved_m[r] = ar_calloc(ar_shard_mlp_saved(&sh[r], B, T), sizeof(float));
        size_t need = ar_shard_scratch(&sh[r], B, T);
        sscratch = need > sscratch ? need : sscratch;
    }
    float *tscratch = ar_calloc(sscratch, sizeof(float));

    /* the leader's forward: LN, sum of partials + bias, residual, twice */
    size_t NC = (size_t)N * C;
    float *ln1 = ar_calloc(NC, 4), *m1 = ar_calloc(N, 4), *r1 = ar_calloc(N, 4), *attn = ar_calloc(NC, 4),
          *part = ar_calloc(NC, 4), *res1 = ar_calloc(NC, 4), *ln2 = ar_calloc(NC, 4),
          *m2 = ar_calloc(N, 4), *r2 = ar_calloc(N, 4), *mlp = ar_calloc(NC, 4), *out = ar_calloc(NC, 4);
    ar_param *w = full->params;
    ar_layernorm_forward(ln1, m1, r1, x, w[LN1_W].data, w[LN1_B].data, N, C);
    for (int r = 0; r < R; r++) {
        ar_shard_attn_forward(&sh[r], B, T, ln1, ssaved_a[r], part);
        ar_residual_forward(attn, attn, part, (long)NC);
    }
    add_bias(attn, w[APROJ_B].data, N, C);
    ar_residual_forward(res1, x, attn, (long)NC);
    ar_layernorm_forward(ln2, m2, r2, res1, w[LN2_W].data, w[LN2_B].data, N, C);
    for (int r = 0; r < R; r++) {
        ar_shard_mlp_forward(&sh[r], B, T, ln2, ssaved_m[r], part);
        ar_residual_forward(mlp, mlp, part, (long)NC);
    }
    add_bias(mlp, w[MPROJ_B].data, N, C);
    ar_residual_forward(out, res1, mlp, (long)NC);
    double fwd = max_diff(out, saved, (long)NC);
    cr_expect(fwd <= 1e-5, "%d shards: forward differs by %.3g", R, fwd);

    /* the leader's backward, with separate gradients for its own params */
    ar_param lead[12];
    memcpy(lead, full->params, sizeof lead);
    float *lgrad[12];
    for (int i = 0; i < 12; i++) {
        lgrad[i] = ar_calloc((size_t)lead[i].numel, sizeof(float));
        lead[i].grad = lgrad[i];
    }
    float *dres1 = ar_calloc(NC, 4), *dln = ar_calloc(NC, 4), *dx = ar_calloc(NC, 4);
    memcpy(dres1, dout, NC * 4);
    col_sum(lead[MPROJ_B].grad, dout, N, C);
    for (int r = 0; r < R; r++)
        ar_shard_mlp_backward(&sh[r], B, T, ln2, ssaved_m[r], dout, dln, tscratch);
    ar_layernorm_backward(dres1, lead[LN2_W].grad, lead[LN2_B].grad, dln, res1, w[LN2_W].data, m2, r2, N, C);
    col_sum(lead[APROJ_B].grad, dres1, N, C);
    memset(dln, 0, NC * 4);
    for (int r = 0; r < R; r++)
        ar_shard_attn_backward(&sh[r], B, T, ln1, ssaved_a[r], dres1, dln, tscratch);
    memcpy(dx, dres1, NC * 4);
    ar_layernorm_backward(dx, lead[LN1_W].grad, lead[LN1_B].grad, dln, x, w[LN1_W].data, m1, r1, N, C);
    double bwd = max_diff(dx, dx_full, (long)NC);
    cr_expect(bwd <= 1e-5, "%d shards: input gradient differs by %.3g", R, bwd);

    /* every parameter gradient: the leader's own, and the shards' gathered */
    int own[] = {LN1_W, LN1_B, APROJ_B, LN2_W, LN2_B, MPROJ_B};
    for (size_t k = 0; k < sizeof own / sizeof own[0]; k++) {
        int i = own[k];
        double d = max_diff(lead[i].grad, full->params[i].grad, lead[i].numel);
        cr_expect(d <= 1e-5, "%s differs by %.3g", full->params[i].name, d);
    }
    ar_layer gathered = *full;
    float *ggrad[12];
    for (int i = 0; i < 12; i++) {
        ggrad[i] = ar_calloc((size_t)full->params[i].numel, sizeof(float));
        gathered.params[i].grad = ggrad[i];
    }
    for (int r = 0; r < R; r++)
        ar_block_shard_to_full(&sh[r], &gathered, 1);
    int split[] = {ATTN_W, ATTN_B, APROJ_W, FC_W, FC_B, MPROJ_W};
    for (size_t k = 0; k < sizeof split / sizeof split[0]; k++) {
        int i = split[k];
        double d = max_diff(gathered.params[i].grad, full->params[i].grad, full->params[i].numel);
        cr_expect(d <= 1e-5, "%d shards: %s differs by %.3g", R, full->params[i].name, d);
    }
    /* and the slices of the weights put back together are the weights */
    ar_layer round = *full;
    float *gdata[12];
    for (int i = 0; i < 12; i++) {
        gdata[i] = ar_calloc((size_t)full->params[i].numel, sizeof(float));
        round.params[i].data = gdata[i];
    }
    for (int r = 0; r < R; r++)
        ar_block_shard_to_full(&sh[r], &round, 0);
    for (size_t k = 0; k < sizeof split / sizeof split[0]; k++) {
        int i = split[k];
        cr_expect(memcmp(gdata[i], full->params[i].data, (size_t)full->params[i].numel * 4) == 0,
                  "%s does not round-trip through the shards", full->params[i].name);
    }

    for (int i = 0; i < 12; i++) {
        ar_free(lgrad[i]);
        ar_free(ggrad[i]);
        ar_free(gdata[i]);
    }
    for (int r = 0; r < R; r++) {
        free_params(sh[r].params, AR_SHARD_NPARAMS);
        ar_free(ssaved_a[r]);
        ar_free(ssaved_m[r]);
    }
    float *bufs[] = {x, dout, saved, scratch, dx_full, tscratch, ln1, m1, r1, attn, part, res1, ln2,
                     m2, r2, mlp, out, dres1, dln, dx};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        ar_free(bufs[i]);
    free_params(full->params, full->nparams);
    ar_layer_destroy(full);
}

Test(tp, one_shard_is_the_block) { check_split(1, NULL); }
Test(tp, two_even_shards) { check_split(2, NULL); }
Test(tp, three_uneven_shards) { check_split(3, NULL); } /* 8 heads: 3+3+2 */
Test(tp, shards_in_proportion_to_speed)
{
    double w[2] = {2.0, 1.0};
    check_split(2, w);
}

Test(tp, split_sizes)
{
    ar_range r[4];
    cr_assert_eq(ar_tp_split(8, 3, NULL, r), AR_OK);
    cr_expect(r[0].end - r[0].begin == 3 && r[1].end - r[1].begin == 3 && r[2].end - r[2].begin == 2,
              "8 over 3: %d+%d+%d", r[0].end - r[0].begin, r[1].end - r[1].begin, r[2].end - r[2].begin);
    cr_expect_eq(r[2].end, 8);
    double w[2] = {2, 1};
    cr_assert_eq(ar_tp_split(9, 2, w, r), AR_OK);
    cr_expect_eq(r[0].end - r[0].begin, 6);
    cr_assert_eq(ar_tp_split(2, 3, NULL, r), AR_EINVAL);
    double bad[2] = {1, 0};
    cr_assert_eq(ar_tp_split(4, 2, bad, r), AR_EINVAL);
}

/* An MLP's pair of linear layers split over 3 ranks (uneven): the sum of the
 * partial outputs plus the second layer's bias equals the whole pair's
 * output, and the summed input gradients and the gathered weight gradients
 * equal the whole pair's. */
Test(tp, mlp_pair_shards_sum_to_the_whole_pair)
{
    ar_model_spec spec;
    memset(&spec, 0, sizeof spec);
    spec.type = AR_MODEL_MLP;
    spec.inputs = 12;
    spec.n_hidden = 2;
    spec.hidden[0] = 10;
    spec.hidden[1] = 6;
    spec.classes = 3;
    spec.activation = AR_ACT_GELU;
    ar_rng rng;
    ar_rng_seed(&rng, 5);
    const int B = 4, IN = 12, H = 10, OUT = 6;
    ar_layer *l0, *l1;
    cr_assert_eq(ar_layer_create(&spec, 0, &l0), AR_OK);
    cr_assert_eq(ar_layer_create(&spec, 1, &l1), AR_OK);
    alloc_params(l0->params, l0->nparams, &rng);
    alloc_params(l1->params, l1->nparams, &rng);
    float x[4 * 12], dout[4 * 6];
    fill(x, B * IN, &rng, 1.0f);
    fill(dout, B * OUT, &rng, 1.0f);
    /* the whole pair: layer 1 before its activation is what the leader sums */
    float *s0 = ar_calloc(l0->vt->saved_floats(l0, B, 1), sizeof(float));
    float *scr = ar_calloc(4 * B * (IN + H + OUT), sizeof(float));
    float pre1[4 * 6], dh[4 * 10] = {0}, dx_full[4 * 12] = {0};
    ar_pass pass = {.B = B, .T = 1, .train = 1, .scratch = scr, .scratch_floats = 4 * B * (IN + H + OUT)};
    cr_assert_eq(l0->vt->forward(l0, &pass, x, s0), AR_OK);
    ar_linear_forward(pre1, s0, l1->params[0].data, l1->params[1].data, B, H, OUT);
    ar_linear_backward(dh, l1->params[0].grad, l1->params[1].grad, dout, s0, l1->params[0].data, B, H, OUT);
    cr_assert_eq(l0->vt->backward(l0, &pass, x, s0, dh, dx_full), AR_OK);

    ar_range parts[3];
    cr_assert_eq(ar_tp_split(H, 3, NULL, parts), AR_OK);
    cr_assert(parts[0].end - parts[0].begin == 4 && parts[2].end - parts[2].begin == 3);
    float sum[4 * 6], dx[4 * 12] = {0};
    for (int i = 0; i < B; i++)
        memcpy(sum + i * OUT, l1->params[1].data, OUT * sizeof(float));
    ar_layer *g0, *g1; /* where the ranks' gradients are gathered */
    cr_assert_eq(ar_layer_create(&spec, 0, &g0), AR_OK);
    cr_assert_eq(ar_layer_create(&spec, 1, &g1), AR_OK);
    alloc_params(g0->params, g0->nparams, NULL);
    alloc_params(g1->params, g1->nparams, NULL);
    for (int r = 0; r < 3; r++) {
        ar_block_shard sh;
        cr_assert_eq(ar_mlp_shard_init(&sh, &spec, 0, parts[r]), AR_OK, "%s", ar_last_error());
        cr_assert_eq(sh.first_param, AR_SHARD_FC_W);
        alloc_params(sh.params + AR_SHARD_FC_W, 3, NULL);
        ar_mlp_shard_from_full(&sh, l0, l1, 0);
        float *saved = ar_calloc(ar_shard_mlp_saved(&sh, B, 1), sizeof(float));
        float *scratch = ar_calloc(ar_shard_scratch(&sh, B, 1), sizeof(float));
        float partial[4 * 6];
        ar_shard_mlp_forward(&sh, B, 1, x, saved, partial);
        for (int i = 0; i < B * OUT; i++)
            sum[i] += partial[i];
        ar_shard_mlp_backward(&sh, B, 1, x, saved, dout, dx, scratch);
        ar_mlp_shard_to_full(&sh, g0, g1, 1);
        free_params(sh.params + AR_SHARD_FC_W, 3);
        ar_free(saved);
        ar_free(scratch);
    }
    cr_assert_lt(max_diff(sum, pre1, B * OUT), 1e-5);
    cr_assert_lt(max_diff(dx, dx_full, B * IN), 1e-5);
    cr_assert_lt(max_diff(g0->params[0].grad, l0->params[0].grad, H * IN), 1e-5);
    cr_assert_lt(max_diff(g0->params[1].grad, l0->params[1].grad, H), 1e-5);
    cr_assert_lt(max_diff(g1->params[0].grad, l1->params[0].grad, OUT * H), 1e-5);
    ar_free(s0);
    ar_free(scr);
    free_params(l0->params, l0->nparams);
    free_params(l1->params, l1->nparams);
    free_params(g0->params, g0->nparams);
    free_params(g1->params, g1->nparams);
    ar_layer_destroy(l0);
    ar_layer_destroy(l1);
    ar_layer_destroy(g0);
    ar_layer_destroy(g1);
}
