/* Finite-difference gradient checks, one per operator (ggml's habit).
 *
 * For an op y = f(x) we take a scalar L = sum_i y[i] * r[i] with a fixed
 * random r, get dL/dx from the op's backward with dout = r, and compare it
 * with the central difference (L(x+h) - L(x-h)) / 2h. The forward runs in
 * fp32 as in training; L is summed in double so the difference of two nearly
 * equal sums does not drown in rounding. Tolerances were set from the errors
 * observed (reported by each test on failure) with a margin, and are tight
 * enough that a dropped term or a flipped sign fails: see the comments at
 * GC_RTOL / GC_ATOL. */
#include <criterion/criterion.h>

#include "core/core.h"
#include "ops/ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Pass iff |analytic - numeric| <= GC_ATOL + GC_RTOL * |numeric|. The worst
 * error observed over all ops below is 1.2e-4 (LayerNorm dinp), so 1e-3 leaves a
 * margin, while a missing LayerNorm term or a sign error moves gradients by
 * O(0.1..1). */
#define GC_ATOL 1e-3
#define GC_RTOL 1e-3
#define GC_H 1e-2f

/* ---- helpers --------------------------------------------------------------- */

/* Every buffer of a test comes from this pool and is freed by the suite's
 * fini, which Criterion runs even after a failed assertion: no leak reports
 * drowning the real failure message. */
#define POOL_MAX 64
static void *pool[POOL_MAX];
static int pool_n;

static void pool_free(void)
{
    while (pool_n > 0)
        free(pool[--pool_n]);
}

TestSuite(ops_gradcheck, .fini = pool_free);

static float *zeros(long n)
{
    cr_assert(pool_n < POOL_MAX, "test buffer pool exhausted");
    float *p = calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    cr_assert_not_null(p);
    pool[pool_n++] = p;
    return p;
}

static float *fill_normal(long n, uint64_t seed, float scale)
{
    float *p = zeros(n);
    ar_rng r;
    ar_rng_seed(&r, seed);
    for (long i = 0; i < n; i++)
        p[i] = scale * ar_rng_normal(&r);
    return p;
}

static double dot_d(const float *a, const float *b, long n)
{
    double s = 0.0;
    for (long i = 0; i < n; i++)
        s += (double)a[i] * (double)b[i];
    return s;
}

typedef double (*loss_fn)(void *ctx);

/* Compares the analytic gradient g of the loss with respect to x[0..n) with
 * central differences, perturbing x in place (restored exactly afterwards).
 * Fails the test with the worst element on mismatch. */
static void gradcheck(const char *what, float *x, const float *g, long n, loss_fn f, void *ctx,
                      float h)
{
    double worst = 0.0;
    long worst_i = -1;
    double worst_fd = 0.0, max_err = 0.0;
    for (long i = 0; i < n; i++) {
        float orig = x[i];
        x[i] = orig + h;
        double lp = f(ctx);
        x[i] = orig - h;
        double lm = f(ctx);
        x[i] = orig;
        /* divide by the step actually taken in fp32, not the nominal 2h */
        double step = (double)(orig + h) - (double)(orig - h);
        double fd = (lp - lm) / step;
        double err = fabs((double)g[i] - fd);
        max_err = err > max_err ? err : max_err;
        double excess = err - (GC_ATOL + GC_RTOL * fabs(fd));
        if (worst_i < 0 || excess > worst) {
            worst = excess;
            worst_i = i;
            worst_fd = fd;
        }
    }
    cr_log_info("%s: %ld elements, max |analytic - fd| = %.3g", what, n, max_err);
    if (n > 0)
        cr_assert(worst <= 0.0,
                  "%s: gradient mismatch at [%ld]: analytic %.6g, finite difference %.6g "
                  "(|diff| %.3g > tol %.3g)",
                  what, worst_i, (double)g[worst_i], worst_fd, fabs(g[worst_i] - worst_fd),
                  GC_ATOL + GC_RTOL * fabs(worst_fd));
}

/* ---- linear ---------------------------------------------------------------- */

typedef struct {
    float *inp, *w, *b, *out, *r;
    int N, IN, OUT;
} lin_ctx;

static double lin_loss(void *p)
{
    lin_ctx *c = p;
    ar_linear_forward(c->out, c->inp, c->w, c->b, c->N, c->IN, c->OUT);
    return dot_d(c->out, c->r, (long)c->N * c->OUT);
}

static void check_linear(int with_bias)
{
    lin_ctx c = {.N = 4, .IN = 6, .OUT = 5};
    c.inp = fill_normal((long)c.N * c.IN, 1, 1.0f);
    c.w = fill_normal((long)c.OUT * c.IN, 2, 0.5f);
    c.b = with_bias ? fill_normal(c.OUT, 3, 0.5f) : NULL;
    c.out = zeros((long)c.N * c.OUT);
    c.r = fill_normal((long)c.N * c.OUT, 4, 1.0f);
    float *dinp = zeros((long)c.N * c.IN), *dw = zeros((long)c.OUT * c.IN);
    float *db = with_bias ? zeros(c.OUT) : NULL;
    ar_linear_backward(dinp, dw, db, c.r, c.inp, c.w, c.N, c.IN, c.OUT);
    gradcheck("linear dinp", c.inp, dinp, (long)c.N * c.IN, lin_loss, &c, GC_H);
    gradcheck("linear dweight", c.w, dw, (long)c.OUT * c.IN, lin_loss, &c, GC_H);
    if (with_bias)
        gradcheck("linear dbias", c.b, db, c.OUT, lin_loss, &c, GC_H);
}

Test(ops_gradcheck, linear_with_bias) { check_linear(1); }
Test(ops_gradcheck, linear_without_bias) { check_linear(0); }

/* ---- element-wise: relu, gelu, dropout, residual ---------------------------- */

typedef struct {
    float *x, *y, *out, *r;
    long n;
    int op; /* 0 relu, 1 gelu, 2 dropout, 3 residual */
    float p;
    uint64_t seed;
} ew_ctx;

static double ew_loss(void *p)
{
    ew_ctx *c = p;
    switch (c->op) {
    case 0: ar_relu_forward(c->out, c->x, c->n); break;
    case 1: ar_gelu_forward(c->out, c->x, c->n); break;
    case 2: ar_dropout_forward(c->out, c->x, c->n, c->p, c->seed); break;
    default: ar_residual_forward(c->out, c->x, c->y, c->n); break;
    }
    return dot_d(c->out, c->r, c->n);
}

Test(ops_gradcheck, relu)
{
    ew_ctx c = {.n = 64, .op = 0};
    c.x = fill_normal(c.n, 10, 1.0f);
    /* keep away from the kink, where the finite difference is meaningless */
    for (long i = 0; i < c.n; i++)
        if (fabsf(c.x[i]) < 0.1f)
            c.x[i] = c.x[i] < 0 ? -0.1f - c.x[i] : 0.1f + c.x[i];
    c.out = zeros(c.n);
    c.r = fill_normal(c.n, 11, 1.0f);
    float *dx = zeros(c.n);
    ew_loss(&c);
    ar_relu_backward(dx, c.out, c.r, c.n);
    gradcheck("relu dinp", c.x, dx, c.n, ew_loss, &c, 1e-3f);
}

Test(ops_gradcheck, gelu)
{
    ew_ctx c = {.n = 101, .op = 1};
    c.x = zeros(c.n);
    for (long i = 0; i < c.n; i++) /* a sweep over [-5, 5] covers both tails */
        c.x[i] = -5.0f + 10.0f * (float)i / (float)(c.n - 1) + 0.013f;
    c.out = zeros(c.n);
    c.r = fill_normal(c.n, 12, 1.0f);
    float *dx = zeros(c.n);
    ar_gelu_backward(dx, c.x, c.r, c.n);
    gradcheck("gelu dinp", c.x, dx, c.n, ew_loss, &c, GC_H);
}

Test(ops_gradcheck, dropout)
{
    ew_ctx c = {.n = 200, .op = 2, .p = 0.3f, .seed = 0x5eed};
    c.x = fill_normal(c.n, 13, 1.0f);
    c.out = zeros(c.n);
    c.r = fill_normal(c.n, 14, 1.0f);
    float *dx = zeros(c.n);
    ar_dropout_backward(dx, c.r, c.n, c.p, c.seed);
    gradcheck("dropout dinp", c.x, dx, c.n, ew_loss, &c, GC_H);

    /* forward and backward use the same mask: dinp is zero exactly where out is */
    ew_loss(&c);
    long kept = 0;
    for (long i = 0; i < c.n; i++) {
        int fwd_kept = c.out[i] != 0.0f;
        int bwd_kept = dx[i] != 0.0f;
        cr_assert_eq(fwd_kept, bwd_kept, "mask differs at %ld", i);
        if (fwd_kept) {
            kept++;
            cr_assert_float_eq(c.out[i], c.x[i] / 0.7f, 1e-6f * (1 + fabsf(c.x[i])));
            cr_assert_float_eq(dx[i], c.r[i] / 0.7f, 1e-6f * (1 + fabsf(c.r[i])));
        }
    }
    cr_assert(kept > 0 && kept < c.n);
}

Test(ops_gradcheck, dropout_mask_depends_on_seed_only)
{
    long n = 20000;
    float *x = zeros(n), *a = zeros(n), *b = zeros(n), *d = zeros(n);
    for (long i = 0; i < n; i++)
        x[i] = 1.0f;
    ar_dropout_forward(a, x, n, 0.3f, 42);
    ar_dropout_forward(b, x, n, 0.3f, 42);
    cr_assert(memcmp(a, b, (size_t)n * sizeof(float)) == 0, "same seed, different mask");
    ar_dropout_forward(d, x, n, 0.3f, 43);
    long differ = 0, kept = 0;
    for (long i = 0; i < n; i++) {
        differ += (a[i] != 0.0f) != (d[i] != 0.0f);
        kept += a[i] != 0.0f;
    }
    /* two independent masks with p=0.3 disagree on 2*0.3*0.7 = 42% of entries */
    cr_assert(differ > n / 3 && differ < n / 2, "seeds 42 and 43 disagree on %ld of %ld", differ,
              n);
    double frac = (double)kept / (double)n;
    cr_assert(fabs(frac - 0.7) < 0.02, "kept fraction %.4f, want 0.7", frac);
    /* p = 0 is the identity, p = 1 drops everything */
    ar_dropout_forward(a, x, n, 0.0f, 7);
    ar_dropout_forward(b, x, n, 1.0f, 7);
    for (long i = 0; i < n; i++) {
        cr_assert_eq(a[i], 1.0f);
        cr_assert_eq(b[i], 0.0f);
    }
}

Test(ops_gradcheck, residual)
{
    ew_ctx c = {.n = 50, .op = 3};
    c.x = fill_normal(c.n, 15, 1.0f);
    c.y = fill_normal(c.n, 16, 1.0f);
    c.out = zeros(c.n);
    c.r = fill_normal(c.n, 17, 1.0f);
    float *da = zeros(c.n), *db = zeros(c.n);
    ar_residual_backward(da, db, c.r, c.n);
    gradcheck("residual da", c.x, da, c.n, ew_loss, &c, GC_H);
    gradcheck("residual db", c.y, db, c.n, ew_loss, &c, GC_H);
}

/* ---- layernorm -------------------------------------------------------------- */

typedef struct {
    float *inp, *w, *b, *out, *mean, *rstd, *r;
    int N, C;
} ln_ctx;

static double ln_loss(void *p)
{
    ln_ctx *c = p;
    ar_layernorm_forward(c->out, c->mean, c->rstd, c->inp, c->w, c->b, c->N, c->C);
    return dot_d(c->out, c->r, (long)c->N * c->C);
}

Test(ops_gradcheck, layernorm)
{
    ln_ctx c = {.N = 4, .C = 7};
    long nc = (long)c.N * c.C;
    c.inp = fill_normal(nc, 20, 1.0f);
    for (long i = 0; i < nc; i++) /* a row offset, as in a residual stream */
        c.inp[i] += 0.5f * (float)(i / c.C);
    c.w = fill_normal(c.C, 21, 1.0f);
    c.b = fill_normal(c.C, 22, 1.0f);
    c.out = zeros(nc), c.mean = zeros(c.N), c.rstd = zeros(c.N);
    c.r = fill_normal(nc, 23, 1.0f);
    float *dx = zeros(nc), *dw = zeros(c.C), *db = zeros(c.C);
    ln_loss(&c);
    ar_layernorm_backward(dx, dw, db, c.r, c.inp, c.w, c.mean, c.rstd, c.N, c.C);
    gradcheck("layernorm dinp", c.inp, dx, nc, ln_loss, &c, GC_H);
    gradcheck("layernorm dweight", c.w, dw, c.C, ln_loss, &c, GC_H);
    gradcheck("layernorm dbias", c.b, db, c.C, ln_loss, &c, GC_H);
}

/* ---- embedding -------------------------------------------------------------- */

typedef struct {
    float *wte, *wpe, *out, *r;
    const int32_t *tok;
    int B, T, C;
} emb_ctx;

static double emb_loss(void *p)
{
    emb_ctx *c = p;
    ar_embedding_forward(c->out, c->tok, c->wte, c->wpe, c->B, c->T, c->C);
    return dot_d(c->out, c->r, (long)c->B * c->T * c->C);
}

Test(ops_gradcheck, embedding_repeated_tokens)
{
    /* token 1 appears four times, token 3 twice, token 4 never */
    static const int32_t tok[2 * 4] = {1, 3, 1, 0, 2, 1, 3, 1};
    int V = 5, maxT = 6;
    emb_ctx c = {.tok = tok, .B = 2, .T = 4, .C = 3};
    long no = (long)c.B * c.T * c.C;
    c.wte = fill_normal((long)V * c.C, 30, 1.0f);
    c.wpe = fill_normal((long)maxT * c.C, 31, 1.0f);
    c.out = zeros(no);
    c.r = fill_normal(no, 32, 1.0f);
    float *dwte = zeros((long)V * c.C), *dwpe = zeros((long)maxT * c.C);
    ar_embedding_backward(dwte, dwpe, c.r, tok, c.B, c.T, c.C);
    gradcheck("embedding dwte", c.wte, dwte, (long)V * c.C, emb_loss, &c, GC_H);
    gradcheck("embedding dwpe", c.wpe, dwpe, (long)maxT * c.C, emb_loss, &c, GC_H);
    for (int i = 0; i < c.C; i++) {
        cr_assert_eq(dwte[4 * c.C + i], 0.0f, "unused token got a gradient");
        cr_assert_eq(dwpe[5 * c.C + i], 0.0f, "unused position got a gradient");
    }
    /* either gradient may be NULL */
    ar_embedding_backward(NULL, dwpe, c.r, tok, c.B, c.T, c.C);
    ar_embedding_backward(dwte, NULL, c.r, tok, c.B, c.T, c.C);
}

/* ---- attention -------------------------------------------------------------- */

typedef struct {
    float *qkv, *out, *att, *r;
    int B, T, NH, HS;
} att_ctx;

static double att_loss(void *p)
{
    att_ctx *c = p;
    ar_attention_forward(c->out, c->att, c->qkv, c->B, c->T, c->NH, c->HS);
    return dot_d(c->out, c->r, (long)c->B * c->T * c->NH * c->HS);
}

static void check_attention(int B, int T, int NH, int HS, uint64_t seed)
{
    att_ctx c = {.B = B, .T = T, .NH = NH, .HS = HS};
    long nqkv = (long)B * T * 3 * NH * HS, nout = (long)B * T * NH * HS;
    long natt = (long)B * NH * T * T;
    c.qkv = fill_normal(nqkv, seed, 1.0f);
    c.out = zeros(nout), c.att = zeros(natt);
    c.r = fill_normal(nout, seed + 1, 1.0f);
    float *dqkv = zeros(nqkv), *scratch = zeros(natt);
    att_loss(&c);
    ar_attention_backward(dqkv, scratch, c.r, c.qkv, c.att, B, T, NH, HS);
    char what[64];
    snprintf(what, sizeof what, "attention dqkv (B=%d,T=%d,NH=%d,HS=%d)", B, T, NH, HS);
    gradcheck(what, c.qkv, dqkv, nqkv, att_loss, &c, GC_H);
}

Test(ops_gradcheck, attention_small) { check_attention(2, 5, 2, 3, 40); }

/* T=45 spans two row blocks of the causal blocking, the second one partial */
Test(ops_gradcheck, attention_multi_block) { check_attention(1, 45, 2, 2, 50); }

/* ---- cross-entropy ---------------------------------------------------------- */

typedef struct {
    float *logits, *losses, *probs;
    const int32_t *tgt;
    int N, V;
} xent_ctx;

static double xent_loss(void *p)
{
    xent_ctx *c = p;
    return ar_xent_forward(c->losses, c->probs, c->logits, c->tgt, c->N, c->V);
}

Test(ops_gradcheck, xent)
{
    static const int32_t tgt[5] = {0, 6, 3, 3, 1};
    xent_ctx c = {.tgt = tgt, .N = 5, .V = 7};
    long n = (long)c.N * c.V;
    c.logits = fill_normal(n, 60, 2.0f);
    c.losses = zeros(c.N), c.probs = zeros(n);
    float *dl = zeros(n);
    xent_loss(&c);
    /* the returned loss is the mean, so scale = 1/N gives its gradient */
    ar_xent_backward(dl, c.probs, tgt, 1.0f / (float)c.N, c.N, c.V);
    gradcheck("xent dlogits", c.logits, dl, n, xent_loss, &c, GC_H);
}
