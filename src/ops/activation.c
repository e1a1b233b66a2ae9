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

/* ---- GELU, tanh approximation (ar_gelu, ops_internal.h) ------------------ */

void ar_gelu_forward(float *out, const float *inp, long n)
{
#pragma omp parallel for simd if (parallel : n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++)
        out[i] = ar_gelu(inp[i]);
}

void ar_gelu_backward(float *dinp, const float *inp, const float *dout, long n)
{
#pragma omp parallel for simd if (parallel : n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++)
        dinp[i] += dout[i] * ar_gelu_grad(inp[i]);
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
    uint64_t sm = ar_splitmix64(seed);
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++)
        out[i] = ar_dropout_u(sm, i) >= p ? inp[i] * scale : 0.0f;
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
    uint64_t sm = ar_splitmix64(seed);
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++)
        if (ar_dropout_u(sm, i) >= p)
            dinp[i] += dout[i] * scale;
}
