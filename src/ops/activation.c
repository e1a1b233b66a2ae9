/* Element-wise operators: ReLU, GELU (tanh approximation), residual add,
 * dropout. None of them reduce, so results do not depend on thread count. */
#include "ops/ops.h"

#include "ops/ops_internal.h"

#include <math.h>

/* ---- ReLU: inp (n) -> out (n) ------------------------------------------- */

void ar_relu_forward(float *out, const float *inp, long n)
{
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++)
        out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
}

/* The forward output is enough: out > 0 exactly where inp > 0, so the layer
 * need not keep its input alive. */
void ar_relu_backward(float *dinp, const float *out, const float *dout, long n)
{
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++)
        dinp[i] += out[i] > 0.0f ? dout[i] : 0.0f;
}

/* ---- GELU, tanh approximation --------------------------------------------
 * 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written in the same order
 * as PyTorch's approximate='tanh' kernel; tanh comes from ar_fast_tanhf
 * (absolute error ~2e-7), which keeps the loop vectorised.              */

#define GELU_BETA 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_KAPPA 0.044715f

void ar_gelu_forward(float *out, const float *inp, long n)
{
#pragma omp parallel for simd if (parallel : n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++) {
        float x = inp[i];
        float inner = GELU_BETA * (x + GELU_KAPPA * x * x * x);
        out[i] = 0.5f * x * (1.0f + ar_fast_tanhf(inner));
    }
}

/* d/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 kappa x^2) */
void ar_gelu_backward(float *dinp, const float *inp, const float *dout, long n)
{
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++) {
        float x = inp[i];
        float x2 = x * x;
        float inner = GELU_BETA * (x + GELU_KAPPA * x2 * x);
        float th = ar_fast_tanhf(inner);
        float left = 0.5f * x;
        float right = 1.0f + th;
        float dleft = 0.5f * right;
        float dright = left * (1.0f - th * th) * GELU_BETA * (1.0f + 3.0f * GELU_KAPPA * x2);
        dinp[i] += dout[i] * (dleft + dright);
    }
}

/* ---- residual add: out = a + b -------------------------------------------- */

void ar_residual_forward(float *out, const float *a, const float *b, long n)
{
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++)
        out[i] = a[i] + b[i];
}

/* Either gradient may be NULL (a branch whose input needs no gradient); the
 * two may also be the same buffer, which then receives 2*dout. */
void ar_residual_backward(float *da, float *db, const float *dout, long n)
{
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++) {
        if (da)
            da[i] += dout[i];
        if (db)
            db[i] += dout[i];
    }
}

/* ---- dropout ---------------------------------------------------------------
 * Counter-based: the keep decision for element i is a pure function of
 * (seed, i), so backward recomputes the mask instead of storing it, and a
 * pipeline stage that recomputes a micro-batch gets the same mask.        */

static inline uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Uniform in [0,1) with 24 bits, exact in float. The seed is mixed once so
 * that nearby seeds (step, step+1) give unrelated streams. */
static inline float dropout_uniform(uint64_t seed_mixed, long i)
{
    uint64_t h = splitmix64(seed_mixed ^ ((uint64_t)i * 0xd1b54a32d192ed03ULL));
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

void ar_dropout_forward(float *out, const float *inp, long n, float p, uint64_t seed)
{
    if (p <= 0.0f) {
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
        for (long i = 0; i < n; i++)
            out[i] = inp[i];
        return;
    }
    /* p >= 1 drops everything; 1/(1-p) would be infinite. */
    float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    uint64_t sm = splitmix64(seed);
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++)
        out[i] = dropout_uniform(sm, i) >= p ? inp[i] * scale : 0.0f;
}

void ar_dropout_backward(float *dinp, const float *dout, long n, float p, uint64_t seed)
{
    if (p <= 0.0f) {
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
        for (long i = 0; i < n; i++)
            dinp[i] += dout[i];
        return;
    }
    float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    uint64_t sm = splitmix64(seed);
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++)
        if (dropout_uniform(sm, i) >= p)
            dinp[i] += dout[i] * scale;
}
