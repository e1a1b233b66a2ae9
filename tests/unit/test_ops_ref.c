/* Operators against naive double-precision references, the optimizers
 * against hand-written torch.optim formulas, the accumulate (+=) convention
 * of every backward, and bitwise determinism. */
#include <criterion/criterion.h>

#include "core/core.h"
#include "ops/ops.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers --------------------------------------------------------------- */

/* Buffers come from a pool freed by the suite's fini, which Criterion runs
 * even after a failed assertion. */
#define POOL_MAX 96
static void *pool[POOL_MAX];
static int pool_n;

static void pool_free(void)
{
    while (pool_n > 0)
        free(pool[--pool_n]);
}

TestSuite(ops_ref, .fini = pool_free);

static void *alloc(size_t bytes)
{
    cr_assert(pool_n < POOL_MAX, "test buffer pool exhausted");
    void *p = calloc(bytes > 0 ? bytes : 1, 1);
    cr_assert_not_null(p);
    pool[pool_n++] = p;
    return p;
}

static float *zeros(long n) { return alloc((size_t)n * sizeof(float)); }

static float *fill_normal(long n, uint64_t seed, float scale)
{
    float *p = zeros(n);
    ar_rng r;
    ar_rng_seed(&r, seed);
    for (long i = 0; i < n; i++)
        p[i] = scale * ar_rng_normal(&r);
    return p;
}

static float *copy(const float *x, long n)
{
    float *p = zeros(n);
    memcpy(p, x, (size_t)n * sizeof(float));
    return p;
}

/* |a - b| <= atol + rtol |b| for every element, else fail naming the worst */
static void assert_close(const char *what, const float *a, const double *b, long n, double atol,
                         double rtol)
{
    for (long i = 0; i < n; i++) {
        double err = fabs((double)a[i] - b[i]);
        cr_assert(err <= atol + rtol * fabs(b[i]), "%s[%ld]: got %.9g, want %.9g (|diff| %.3g)",
                  what, i, (double)a[i], b[i], err);
    }
}

static void assert_close_f(const char *what, const float *a, const float *b, long n, double atol,
                           double rtol)
{
    for (long i = 0; i < n; i++) {
        double err = fabs((double)a[i] - (double)b[i]);
        cr_assert(err <= atol + rtol * fabs((double)b[i]),
                  "%s[%ld]: got %.9g, want %.9g (|diff| %.3g)", what, i, (double)a[i],
                  (double)b[i], err);
    }
}

static double *dzeros(long n) { return alloc((size_t)n * sizeof(double)); }

/* ---- linear ---------------------------------------------------------------- */

static void check_linear_forward(int N, int IN, int OUT, int with_bias)
{
    float *x = fill_normal((long)N * IN, 1, 1.0f), *w = fill_normal((long)OUT * IN, 2, 0.3f);
    float *b = with_bias ? fill_normal(OUT, 3, 1.0f) : NULL;
    float *y = fill_normal((long)N * OUT, 4, 9.0f); /* garbage: forward must overwrite */
    double *ref = dzeros((long)N * OUT);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OUT; o++) {
            double s = b ? b[o] : 0.0;
            for (int i = 0; i < IN; i++)
                s += (double)x[n * IN + i] * w[o * IN + i];
            ref[n * OUT + o] = s;
        }
    ar_linear_forward(y, x, w, b, N, IN, OUT);
    assert_close("linear out", y, ref, (long)N * OUT, 1e-5, 1e-5);
}

Test(ops_ref, linear_forward_small) { check_linear_forward(7, 13, 5, 1); }
Test(ops_ref, linear_forward_no_bias) { check_linear_forward(7, 13, 5, 0); }
/* large enough for the parallel bias fill */
Test(ops_ref, linear_forward_large) { check_linear_forward(64, 96, 80, 1); }

Test(ops_ref, linear_backward_reference)
{
    int N = 9, IN = 11, OUT = 6;
    float *x = fill_normal((long)N * IN, 5, 1.0f), *w = fill_normal((long)OUT * IN, 6, 0.3f);
    float *dy = fill_normal((long)N * OUT, 7, 1.0f);
    float *dx = zeros((long)N * IN), *dw = zeros((long)OUT * IN), *db = zeros(OUT);
    double *rdx = dzeros((long)N * IN), *rdw = dzeros((long)OUT * IN), *rdb = dzeros(OUT);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OUT; o++) {
            double g = dy[n * OUT + o];
            rdb[o] += g;
            for (int i = 0; i < IN; i++) {
                rdx[n * IN + i] += g * w[o * IN + i];
                rdw[o * IN + i] += g * x[n * IN + i];
            }
        }
    ar_linear_backward(dx, dw, db, dy, x, w, N, IN, OUT);
    assert_close("linear dinp", dx, rdx, (long)N * IN, 1e-5, 1e-5);
    assert_close("linear dweight", dw, rdw, (long)OUT * IN, 1e-5, 1e-5);
    assert_close("linear dbias", db, rdb, OUT, 1e-5, 1e-5);
    /* dinp may be NULL (first layer) */
    float *dw2 = zeros((long)OUT * IN);
    ar_linear_backward(NULL, dw2, NULL, dy, x, w, N, IN, OUT);
    assert_close_f("linear dweight (dinp NULL)", dw2, dw, (long)OUT * IN, 0, 0);
}

/* ---- attention ------------------------------------------------------------- */

static void naive_attention(double *out, double *att, const float *qkv, int B, int T, int NH,
                            int HS)
{
    int C = NH * HS;
    double scale = 1.0 / sqrt((double)HS);
    double *pre = calloc((size_t)T, sizeof(double));
    cr_assert_not_null(pre);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * 3 * C + h * HS;
                double mx = -INFINITY;
                for (int j = 0; j <= t; j++) {
                    const float *k = qkv + ((size_t)b * T + j) * 3 * C + C + h * HS;
                    double s = 0;
                    for (int i = 0; i < HS; i++)
                        s += (double)q[i] * k[i];
                    pre[j] = s * scale;
                    mx = pre[j] > mx ? pre[j] : mx;
                }
                double sum = 0;
                for (int j = 0; j <= t; j++)
                    sum += pre[j] = exp(pre[j] - mx);
                double *arow = att + (((size_t)b * NH + h) * T + t) * T;
                for (int j = 0; j < T; j++)
                    arow[j] = j <= t ? pre[j] / sum : 0.0;
                double *o = out + ((size_t)b * T + t) * C + h * HS;
                for (int i = 0; i < HS; i++) {
                    double s = 0;
                    for (int j = 0; j <= t; j++)
                        s += arow[j] * qkv[((size_t)b * T + j) * 3 * C + 2 * C + h * HS + i];
                    o[i] = s;
                }
            }
    free(pre);
}

static void check_attention_forward(int B, int T, int NH, int HS)
{
    long nqkv = (long)B * T * 3 * NH * HS, nout = (long)B * T * NH * HS;
    long natt = (long)B * NH * T * T;
    float *qkv = fill_normal(nqkv, 8, 1.0f);
    float *out = fill_normal(nout, 9, 5.0f), *att = fill_normal(natt, 10, 5.0f);
    double *rout = dzeros(nout), *ratt = dzeros(natt);
    naive_attention(rout, ratt, qkv, B, T, NH, HS);
    ar_attention_forward(out, att, qkv, B, T, NH, HS);
    assert_close("attention out", out, rout, nout, 2e-6, 2e-5);
    assert_close("attention att", att, ratt, natt, 2e-7, 2e-5);
    /* causal: future tokens get exactly zero probability; each row sums to 1 */
    for (long r = 0; r < (long)B * NH * T; r++) {
        int t = (int)(r % T);
        double s = 0;
        for (int j = 0; j < T; j++) {
            if (j > t)
                cr_assert_eq(att[r * T + j], 0.0f, "att row %ld sees future token %d", r, j);
            s += att[r * T + j];
        }
        cr_assert(fabs(s - 1.0) < 1e-5, "att row %ld sums to %.8f", r, s);
    }
}

Test(ops_ref, attention_forward_small) { check_attention_forward(2, 7, 3, 4); }
/* T=100 spans four causal row blocks, the last partial; HS=64 as in GPT */
Test(ops_ref, attention_forward_blocks) { check_attention_forward(2, 100, 2, 64); }

/* ---- layernorm, gelu, relu, embedding forward ------------------------------- */

Test(ops_ref, layernorm_forward)
{
    int N = 5, C = 33;
    float *x = fill_normal((long)N * C, 11, 2.0f), *w = fill_normal(C, 12, 1.0f);
    float *b = fill_normal(C, 13, 1.0f);
    for (long i = 0; i < (long)N * C; i++)
        x[i] += 100.0f; /* large mean: a one-pass variance would cancel badly */
    float *y = zeros((long)N * C), *mean = zeros(N), *rstd = zeros(N);
    double *ry = dzeros((long)N * C), *rm = dzeros(N), *rr = dzeros(N);
    for (int n = 0; n < N; n++) {
        double m = 0, v = 0;
        for (int i = 0; i < C; i++)
            m += x[n * C + i];
        m /= C;
        for (int i = 0; i < C; i++)
            v += (x[n * C + i] - m) * (x[n * C + i] - m);
        v /= C; /* biased, like torch */
        rm[n] = m;
        rr[n] = 1.0 / sqrt(v + 1e-5);
        for (int i = 0; i < C; i++)
            ry[n * C + i] = (x[n * C + i] - m) * rr[n] * w[i] + b[i];
    }
    ar_layernorm_forward(y, mean, rstd, x, w, b, N, C);
    assert_close("layernorm out", y, ry, (long)N * C, 1e-4, 1e-4);
    assert_close("layernorm mean", mean, rm, N, 0, 1e-7);
    assert_close("layernorm rstd", rstd, rr, N, 0, 1e-6);
}

Test(ops_ref, gelu_relu_forward)
{
    long n = 2001;
    float *x = zeros(n), *y = zeros(n), *z = zeros(n);
    double *ry = dzeros(n), *rz = dzeros(n);
    for (long i = 0; i < n; i++) {
        x[i] = -10.0f + 20.0f * (float)i / (float)(n - 1);
        double xd = x[i];
        ry[i] = 0.5 * xd * (1.0 + tanh(sqrt(2.0 / M_PI) * (xd + 0.044715 * xd * xd * xd)));
        rz[i] = xd > 0 ? xd : 0.0;
    }
    ar_gelu_forward(y, x, n);
    ar_relu_forward(z, x, n);
    assert_close("gelu", y, ry, n, 1e-6, 1e-6);
    assert_close("relu", z, rz, n, 0, 0);
}

Test(ops_ref, embedding_forward)
{
    static const int32_t tok[6] = {2, 0, 2, 1, 1, 3};
    int B = 2, T = 3, C = 4, V = 4;
    float *wte = fill_normal((long)V * C, 14, 1.0f), *wpe = fill_normal((long)T * C, 15, 1.0f);
    float *out = zeros((long)B * T * C);
    ar_embedding_forward(out, tok, wte, wpe, B, T, C);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < C; i++)
                cr_assert_eq(out[(b * T + t) * C + i], wte[tok[b * T + t] * C + i] + wpe[t * C + i]);
}

/* ---- cross-entropy ------------------------------------------------------------ */

Test(ops_ref, xent_forward)
{
    int N = 6, V = 65;
    float *logits = fill_normal((long)N * V, 16, 3.0f);
    static const int32_t tgt[6] = {0, 64, 10, 10, 33, 7};
    /* a row with huge logits must not overflow exp() */
    for (int i = 0; i < V; i++)
        logits[5 * V + i] += 1000.0f;
    float *losses = zeros(N), *probs = zeros((long)N * V);
    double *rl = dzeros(N), *rp = dzeros((long)N * V), mean = 0;
    for (int n = 0; n < N; n++) {
        double mx = -INFINITY, s = 0;
        for (int i = 0; i < V; i++)
            mx = logits[n * V + i] > mx ? logits[n * V + i] : mx;
        for (int i = 0; i < V; i++)
            s += exp(logits[n * V + i] - mx);
        for (int i = 0; i < V; i++)
            rp[n * V + i] = exp(logits[n * V + i] - mx) / s;
        rl[n] = log(s) - (logits[n * V + tgt[n]] - mx);
        mean += rl[n] / N;
    }
    double got = ar_xent_forward(losses, probs, logits, tgt, N, V);
    cr_assert(fabs(got - mean) < 1e-5 * (1 + mean), "mean loss %.9f, want %.9f", got, mean);
    assert_close("xent losses", losses, rl, N, 1e-5, 1e-5);
    assert_close("xent probs", probs, rp, (long)N * V, 1e-7, 1e-5);
    /* backward: scale * (probs - onehot) */
    float *dl = zeros((long)N * V);
    double *rdl = dzeros((long)N * V);
    for (long i = 0; i < (long)N * V; i++)
        rdl[i] = 0.25 * (probs[i] - (tgt[i / V] == (int)(i % V) ? 1.0 : 0.0));
    ar_xent_backward(dl, probs, tgt, 0.25f, N, V);
    assert_close("xent dlogits", dl, rdl, (long)N * V, 1e-7, 1e-6);
}

/* ---- optimizers -------------------------------------------------------------- */

Test(ops_ref, adamw_matches_torch_formula)
{
    long n = 37;
    float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, gs = 0.5f;
    float *p = fill_normal(n, 17, 1.0f), *m = zeros(n), *v = zeros(n);
    double *rp = dzeros(n), *rm = dzeros(n), *rv = dzeros(n);
    for (long i = 0; i < n; i++)
        rp[i] = p[i];
    for (int t = 1; t <= 5; t++) {
        float *g = fill_normal(n, 100 + (uint64_t)t, 1.0f);
        if (t == 3)
            g[0] = 0.0f; /* a zero gradient: only decay and momentum move it */
        ar_adamw_update(p, g, m, v, n, lr, b1, b2, eps, wd, t, gs);
        /* torch.optim.AdamW, single-tensor path, in double */
        double bc1 = 1.0 - pow(b1, t), bc2 = 1.0 - pow(b2, t);
        for (long i = 0; i < n; i++) {
            double gi = (double)g[i] * gs;
            rp[i] *= 1.0 - (double)lr * wd;
            rm[i] = b1 * rm[i] + (1.0 - b1) * gi;
            rv[i] = b2 * rv[i] + (1.0 - b2) * gi * gi;
            double denom = sqrt(rv[i]) / sqrt(bc2) + eps;
            rp[i] -= (double)lr / bc1 * rm[i] / denom;
        }
        assert_close("adamw param", p, rp, n, 1e-6, 1e-5);
        assert_close("adamw m", m, rm, n, 1e-7, 1e-5);
        assert_close("adamw v", v, rv, n, 1e-9, 1e-5);
    }
}

Test(ops_ref, sgd_momentum_matches_torch_formula)
{
    long n = 29;
    float lr = 0.05f, mom = 0.9f, wd = 1e-2f, gs = 2.0f;
    float *p = fill_normal(n, 18, 1.0f), *buf = fill_normal(n, 19, 7.0f); /* t=1 ignores buf */
    double *rp = dzeros(n), *rb = dzeros(n);
    for (long i = 0; i < n; i++)
        rp[i] = p[i];
    for (int t = 1; t <= 4; t++) {
        float *g = fill_normal(n, 200 + (uint64_t)t, 1.0f);
        ar_sgd_update(p, g, buf, n, lr, mom, wd, t, gs);
        for (long i = 0; i < n; i++) {
            double gi = (double)g[i] * gs + wd * rp[i];
            rb[i] = t == 1 ? gi : mom * rb[i] + gi;
            rp[i] -= lr * rb[i];
        }
        assert_close("sgd param", p, rp, n, 1e-6, 1e-5);
        assert_close("sgd buf", buf, rb, n, 1e-6, 1e-5);
    }
    /* no momentum, no buffer: plain SGD */
    float *q = fill_normal(n, 20, 1.0f), *g = fill_normal(n, 21, 1.0f);
    float *q0 = copy(q, n);
    ar_sgd_update(q, g, NULL, n, 0.1f, 0.0f, 0.0f, 1, 1.0f);
    for (long i = 0; i < n; i++)
        cr_assert_eq(q[i], q0[i] - 0.1f * g[i]);
}

/* ---- sum of squares ------------------------------------------------------------ */

Test(ops_ref, sum_squares)
{
    /* sizes around the chunk (4096) and group (256 chunks) boundaries */
    static const long sizes[] = {0, 1, 7, 4095, 4096, 4097, 1048576, 1100003};
    float *x = fill_normal(1100003, 22, 1.0f);
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        long n = sizes[k];
        double ref = 0;
        for (long i = 0; i < n; i++)
            ref += (double)x[i] * x[i];
        double got = ar_sum_squares(x, n);
        cr_assert(fabs(got - ref) <= 1e-12 * (1 + ref), "n=%ld: %.17g vs %.17g", n, got, ref);
    }
    /* the summation order is fixed by the data: same bits for any thread count */
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    double one = ar_sum_squares(x, 1100003);
    omp_set_num_threads(2);
    double two = ar_sum_squares(x, 1100003);
    omp_set_num_threads(saved);
    cr_assert(memcmp(&one, &two, sizeof one) == 0, "1 thread %.17g, 2 threads %.17g", one, two);
}

/* ---- the accumulate (+=) convention ---------------------------------------------
 * Every backward adds into its outputs: starting from G0, one call gives
 * G0 + g, a second call G0 + 2g. The size is chosen above the parallel
 * threshold so the OpenMP paths are covered too.                           */

static void check_accumulates(const char *what, const float *g0, const float *once,
                              const float *twice, long n)
{
    for (long i = 0; i < n; i++) {
        double g = (double)once[i] - g0[i];
        double want = (double)g0[i] + 2.0 * g;
        double err = fabs(twice[i] - want);
        cr_assert(err <= 1e-5 * (1 + fabs(want)), "%s[%ld]: after two calls %.9g, want %.9g",
                  what, i, (double)twice[i], want);
    }
    /* and the first call did add something */
    int changed = 0;
    for (long i = 0; i < n && !changed; i++)
        changed = once[i] != g0[i];
    cr_assert(changed, "%s: backward left the gradient untouched", what);
}

/* run `call` twice on a buffer seeded with G0, checking both states */
#define ACCUM_CHECK(what, buf, n, seed, call)                                                      \
    do {                                                                                           \
        float *g0_ = fill_normal((n), (seed), 1.0f);                                               \
        memcpy((buf), g0_, (size_t)(n) * sizeof(float));                                           \
        call;                                                                                      \
        float *once_ = copy((buf), (n));                                                           \
        call;                                                                                      \
        check_accumulates((what), g0_, once_, (buf), (n));                                         \
    } while (0)

Test(ops_ref, backward_accumulates)
{
    int N = 128, C = 48, OUT = 40;
    long nc = (long)N * C;
    float *x = fill_normal(nc, 30, 1.0f);
    float *dy = fill_normal(nc, 32, 1.0f), *g = zeros(nc), *g2 = zeros(nc);
    float *w = fill_normal((long)OUT * C, 33, 0.3f), *dyo = fill_normal((long)N * OUT, 34, 1.0f);
    float *dw = zeros((long)OUT * C), *db = zeros(OUT);

    /* linear */
    ACCUM_CHECK("linear dinp", g, nc, 40, ar_linear_backward(g, NULL, NULL, dyo, x, w, N, C, OUT));
    ACCUM_CHECK("linear dweight", dw, (long)OUT * C, 41,
                ar_linear_backward(NULL, dw, NULL, dyo, x, w, N, C, OUT));
    ACCUM_CHECK("linear dbias", db, OUT, 42,
                ar_linear_backward(NULL, NULL, db, dyo, x, w, N, C, OUT));

    /* element-wise */
    float *out = zeros(nc);
    ar_relu_forward(out, x, nc);
    ACCUM_CHECK("relu", g, nc, 43, ar_relu_backward(g, out, dy, nc));
    ACCUM_CHECK("gelu", g, nc, 44, ar_gelu_backward(g, x, dy, nc));
    ACCUM_CHECK("dropout", g, nc, 45, ar_dropout_backward(g, dy, nc, 0.3f, 99));
    ACCUM_CHECK("residual da", g, nc, 46, ar_residual_backward(g, NULL, dy, nc));
    ACCUM_CHECK("residual db", g2, nc, 47, ar_residual_backward(NULL, g2, dy, nc));

    /* layernorm */
    float *lw = fill_normal(C, 35, 1.0f), *lb = fill_normal(C, 36, 1.0f);
    float *mean = zeros(N), *rstd = zeros(N), *dlw = zeros(C), *dlb = zeros(C);
    ar_layernorm_forward(out, mean, rstd, x, lw, lb, N, C);
    ACCUM_CHECK("layernorm dinp", g, nc, 48,
                ar_layernorm_backward(g, NULL, NULL, dy, x, lw, mean, rstd, N, C));
    ACCUM_CHECK("layernorm dweight", dlw, C, 49,
                ar_layernorm_backward(NULL, dlw, NULL, dy, x, lw, mean, rstd, N, C));
    ACCUM_CHECK("layernorm dbias", dlb, C, 50,
                ar_layernorm_backward(NULL, NULL, dlb, dy, x, lw, mean, rstd, N, C));

    /* embedding: B=4, T=32 with a small vocabulary so tokens repeat */
    int32_t *tok = alloc((size_t)N * sizeof(int32_t));
    for (int i = 0; i < N; i++)
        tok[i] = (i * 7) % 11;
    float *dwte = zeros(11L * C), *dwpe = zeros(32L * C);
    ACCUM_CHECK("embedding dwte", dwte, 11L * C, 51,
                ar_embedding_backward(dwte, NULL, dy, tok, 4, 32, C));
    ACCUM_CHECK("embedding dwpe", dwpe, 32L * C, 52,
                ar_embedding_backward(NULL, dwpe, dy, tok, 4, 32, C));

    /* attention: B=2, T=40, NH=2, HS=8 */
    int B = 2, T = 40, NH = 2, HS = 8;
    long nqkv = (long)B * T * 3 * NH * HS, natt = (long)B * NH * T * T;
    float *qkv = fill_normal(nqkv, 37, 1.0f), *aout = zeros((long)B * T * NH * HS);
    float *att = zeros(natt), *scratch = zeros(natt), *dqkv = zeros(nqkv);
    float *dao = fill_normal((long)B * T * NH * HS, 38, 1.0f);
    ar_attention_forward(aout, att, qkv, B, T, NH, HS);
    ACCUM_CHECK("attention dqkv", dqkv, nqkv, 53,
                ar_attention_backward(dqkv, scratch, dao, qkv, att, B, T, NH, HS));

    /* cross-entropy */
    int V = 17;
    int32_t *tgt = alloc((size_t)N * sizeof(int32_t));
    for (int i = 0; i < N; i++)
        tgt[i] = (i * 5) % V;
    float *logits = fill_normal((long)N * V, 39, 1.0f), *probs = zeros((long)N * V);
    float *losses = zeros(N), *dl = zeros((long)N * V);
    ar_xent_forward(losses, probs, logits, tgt, N, V);
    ACCUM_CHECK("xent dlogits", dl, (long)N * V, 54,
                ar_xent_backward(dl, probs, tgt, 1.0f / (float)N, N, V));
}

/* ---- determinism -----------------------------------------------------------------
 * Same inputs, same thread count: same bits. The column-blocked reductions
 * (layernorm dweight, embedding, linear dbias) are also thread-count free. */

Test(ops_ref, deterministic)
{
    int B = 4, T = 64, NH = 4, HS = 16, C = NH * HS;
    long nqkv = (long)B * T * 3 * C, nout = (long)B * T * C, natt = (long)B * NH * T * T;
    float *qkv = fill_normal(nqkv, 60, 1.0f), *dout = fill_normal(nout, 61, 1.0f);
    float *o1 = zeros(nout), *o2 = zeros(nout), *a1 = zeros(natt), *a2 = zeros(natt);
    float *s = zeros(natt), *d1 = zeros(nqkv), *d2 = zeros(nqkv);
    ar_attention_forward(o1, a1, qkv, B, T, NH, HS);
    ar_attention_backward(d1, s, dout, qkv, a1, B, T, NH, HS);
    ar_attention_forward(o2, a2, qkv, B, T, NH, HS);
    ar_attention_backward(d2, s, dout, qkv, a2, B, T, NH, HS);
    cr_assert(memcmp(o1, o2, (size_t)nout * sizeof(float)) == 0);
    cr_assert(memcmp(a1, a2, (size_t)natt * sizeof(float)) == 0);
    cr_assert(memcmp(d1, d2, (size_t)nqkv * sizeof(float)) == 0);

    /* width 200: four column blocks, so two threads really split the work */
    int N = B * T, W = 200;
    long nw = (long)N * W;
    float *x = fill_normal(nw, 62, 1.0f), *w = fill_normal(W, 63, 1.0f);
    float *dy = fill_normal(nw, 64, 1.0f);
    float *mean = zeros(N), *rstd = zeros(N), *y = zeros(nw);
    ar_layernorm_forward(y, mean, rstd, x, w, w, N, W);
    float *dw1 = zeros(W), *dw2 = zeros(W);
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    ar_layernorm_backward(NULL, dw1, NULL, dy, x, w, mean, rstd, N, W);
    omp_set_num_threads(2);
    ar_layernorm_backward(NULL, dw2, NULL, dy, x, w, mean, rstd, N, W);
    omp_set_num_threads(saved);
    cr_assert(memcmp(dw1, dw2, (size_t)W * sizeof(float)) == 0,
              "layernorm dweight depends on the thread count");
}
