/* Private helpers shared by the operator files (not part of the API). */
#ifndef AR_OPS_INTERNAL_H
#define AR_OPS_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Below this many elements an element-wise loop stays serial: waking the
 * OpenMP team costs a few microseconds, more than the loop itself. */
#define AR_OPS_PAR_MIN 4096L

/* exp(x) in fp32, within about 2 ulp of expf for x in [-87.3, 88.7].
 *
 * Why not expf: glibc's expf is a scalar call that blocks vectorisation, and
 * softmax/GELU spend most of their time in it (~15 ns per GELU element with
 * tanhf). This branch-free Cephes-style version vectorises at -O3 and is
 * plain IEEE arithmetic, so the same binary gives the same bits on every
 * run and for any thread count.
 * Below -87.3 it returns 0 (expf would return a denormal), above 88.7 +inf;
 * NaN propagates. */
static inline float ar_fast_expf(float x)
{
    const float hi = 88.7228391f, lo = -87.3365447f;
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    /* n = round(x / ln2) with the 1.5*2^23 trick: no float->int conversion */
    const float shifter = 12582912.0f;
    float t = xc * 1.44269504088896341f + shifter;
    float n = t - shifter;
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);
    uint32_t nb = tb - 0x4B400000u; /* == n as an int, two's complement */
    /* r = x - n ln2 in two pieces for accuracy */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    /* 2^n as 2^n1 * 2^n2 so that n = 128 (x near 88.7) stays representable */
    int32_t ni = (int32_t)nb;
    int32_t n1 = ni / 2, n2 = ni - n1;
    uint32_t b1 = ((uint32_t)n1 + 127u) << 23, b2 = ((uint32_t)n2 + 127u) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    y = y * s1 * s2;
    y = x < lo ? 0.0f : y;
    y = x > hi ? __builtin_inff() : y;
    return y;
}

/* tanh(u) = 1 - 2 / (exp(2u) + 1): saturates cleanly to +-1 and has an
 * absolute error near 1e-7, which is what GELU needs (it adds 1 to it). */
static inline float ar_fast_tanhf(float u)
{
    return 1.0f - 2.0f / (ar_fast_expf(2.0f * u) + 1.0f);
}

/* Reductions over a row with 16 fixed lanes: the order of the additions
 * depends only on n, never on the thread count, and the lanes let the
 * compiler use vector registers where a single scalar chain would stall
 * on add latency (it cannot reassociate a plain float sum by itself). */
#define AR_LANES 16

static inline float ar_row_max(const float *x, int n)
{
    float m[AR_LANES];
    for (int k = 0; k < AR_LANES; k++)
        m[k] = -__builtin_inff();
    int i = 0;
    for (; i + AR_LANES <= n; i += AR_LANES)
        for (int k = 0; k < AR_LANES; k++)
            m[k] = x[i + k] > m[k] ? x[i + k] : m[k];
    float r = -__builtin_inff();
    for (; i < n; i++)
        r = x[i] > r ? x[i] : r;
    for (int k = 0; k < AR_LANES; k++)
        r = m[k] > r ? m[k] : r;
    return r;
}

static inline float ar_row_sum(const float *x, int n)
{
    float s[AR_LANES] = {0};
    int i = 0;
    for (; i + AR_LANES <= n; i += AR_LANES)
        for (int k = 0; k < AR_LANES; k++)
            s[k] += x[i + k];
    float r = 0.0f;
    for (int k = 0; k < AR_LANES; k++)
        r += s[k];
    for (; i < n; i++)
        r += x[i];
    return r;
}

static inline float ar_row_dot(const float *x, const float *y, int n)
{
    float s[AR_LANES] = {0};
    int i = 0;
    for (; i + AR_LANES <= n; i += AR_LANES)
        for (int k = 0; k < AR_LANES; k++)
            s[k] += x[i + k] * y[i + k];
    float r = 0.0f;
    for (int k = 0; k < AR_LANES; k++)
        r += s[k];
    for (; i < n; i++)
        r += x[i] * y[i];
    return r;
}

/* ---- dropout's counter-based mask ------------------------------------------
 * keep element i iff dropout_u(splitmix64(seed), i) >= p: a pure function of
 * (seed, i), so backward (and a fused epilogue) recomputes it. */
static inline uint64_t ar_splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Uniform in [0,1) with 24 bits, exact in float. */
static inline float ar_dropout_u(uint64_t seed_mixed, long i)
{
    uint64_t h = ar_splitmix64(seed_mixed ^ ((uint64_t)i * 0xd1b54a32d192ed03ULL));
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

/* ---- GELU, tanh approximation ----------------------------------------------
 * 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in the order of PyTorch's
 * approximate='tanh' kernel; one definition for the plain operator and the
 * matrix products' epilogues, so both give the same bits. */
#define AR_GELU_BETA 0.7978845608028654f /* sqrt(2/pi) */
#define AR_GELU_KAPPA 0.044715f

static inline float ar_gelu(float x)
{
    float inner = AR_GELU_BETA * (x + AR_GELU_KAPPA * x * x * x);
    return 0.5f * x * (1.0f + ar_fast_tanhf(inner));
}

/* d/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 kappa x^2) */
static inline float ar_gelu_grad(float x)
{
    float x2 = x * x;
    float inner = AR_GELU_BETA * (x + AR_GELU_KAPPA * x2 * x);
    float th = ar_fast_tanhf(inner);
    float left = 0.5f * x;
    float right = 1.0f + th;
    float dleft = 0.5f * right;
    float dright = left * (1.0f - th * th) * AR_GELU_BETA * (1.0f + 3.0f * AR_GELU_KAPPA * x2);
    return dleft + dright;
}

/* ---- LayerNorm of one row (torch.nn.LayerNorm: biased variance, eps 1e-5) ---
 * Two passes summed in double over 8 fixed lanes: the one-pass
 * E[x^2]-E[x]^2 form cancels badly when |mean| >> std, which residual
 * streams reach; the lanes keep it vectorised and its order fixed. */
#define AR_LN_EPS 1e-5

static inline void ar_ln_row(float *y, const float *x, const float *w, const float *b, int C,
                             float *mean, float *rstd)
{
    double s[8] = {0};
    int i = 0;
    for (; i + 8 <= C; i += 8)
        for (int k = 0; k < 8; k++)
            s[k] += x[i + k];
    double tot = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < C; i++)
        tot += x[i];
    double m = tot / C;
    double v[8] = {0};
    for (i = 0; i + 8 <= C; i += 8)
        for (int k = 0; k < 8; k++) {
            double d = x[i + k] - m;
            v[k] += d * d;
        }
    double var = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    for (; i < C; i++) {
        double d = x[i] - m;
        var += d * d;
    }
    var /= C;
    float mf = (float)m;
    float rs = (float)(1.0 / sqrt(var + AR_LN_EPS));
    for (i = 0; i < C; i++)
        y[i] = (x[i] - mf) * rs * w[i] + b[i];
    *mean = mf;
    *rstd = rs;
}

/* The backward of one row, with g = w * dy and xhat = (x - mean) rstd:
 *   dx = base + rstd (g - mean(g) - xhat mean(g xhat))
 * where base is dx itself (accumulate), `extra` (a residual's gradient
 * passing by), or 0. dw/db (NULL: not wanted) get dy*xhat and dy added.
 * dy is read before dx is written, element by element: dx may be dy when
 * not accumulating. */
static inline void ar_ln_row_backward(float *dx, int accumulate, const float *extra, const float *dy,
                                      const float *x, const float *w, float mean, float rstd, int C,
                                      float *dw, float *db)
{
    float sg[AR_LANES] = {0}, sgx[AR_LANES] = {0};
    int i = 0;
    for (; i + AR_LANES <= C; i += AR_LANES)
        for (int k = 0; k < AR_LANES; k++) {
            float xhat = (x[i + k] - mean) * rstd;
            float g = w[i + k] * dy[i + k];
            sg[k] += g;
            sgx[k] += g * xhat;
        }
    float gsum = 0.0f, gxsum = 0.0f;
    for (int k = 0; k < AR_LANES; k++) {
        gsum += sg[k];
        gxsum += sgx[k];
    }
    for (; i < C; i++) {
        float xhat = (x[i] - mean) * rstd;
        float g = w[i] * dy[i];
        gsum += g;
        gxsum += g * xhat;
    }
    if (dw)
        for (i = 0; i < C; i++)
            dw[i] += (x[i] - mean) * rstd * dy[i];
    if (db)
        for (i = 0; i < C; i++)
            db[i] += dy[i];
    float gmean = gsum / (float)C, gxmean = gxsum / (float)C;
    for (i = 0; i < C; i++) {
        float xhat = (x[i] - mean) * rstd;
        float g = w[i] * dy[i];
        float base = accumulate ? dx[i] : 0.0f;
        if (extra)
            base += extra[i];
        dx[i] = base + rstd * (g - gmean - xhat * gxmean);
    }
}

#endif
