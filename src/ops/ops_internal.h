/* Private helpers shared by the operator files (not part of the API). */
#ifndef AR_OPS_INTERNAL_H
#define AR_OPS_INTERNAL_H

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

#endif
