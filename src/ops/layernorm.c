/* LayerNorm over the last dimension, as torch.nn.LayerNorm: biased variance,
 * eps 1e-5 inside the square root. */
#include "ops/ops.h"

#include "ops/ops_internal.h"

#include <math.h>
#include <stddef.h>

/* inp (N,C), weight (C), bias (C) -> out (N,C), mean (N), rstd (N) */
void ar_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                          const float *weight, const float *bias, int N, int C)
{
    long total = (long)N * C;
#pragma omp parallel for if (total > AR_OPS_PAR_MIN)
    for (int n = 0; n < N; n++)
        ar_ln_row(out + (size_t)n * C, inp + (size_t)n * C, weight, bias, C, &mean[n], &rstd[n]);
}

/* dout (N,C) -> dinp (N,C), dweight (C), dbias (C), all accumulated.
 *   xhat = (x - mean) rstd,  g = weight * dout
 *   dinp = rstd (g - mean(g) - xhat mean(g xhat))
 * dweight/dbias sum over rows; that pass runs over column blocks, each
 * thread walking the rows in order, so it is deterministic and race free. */
void ar_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                           const float *inp, const float *weight, const float *mean,
                           const float *rstd, int N, int C)
{
    long total = (long)N * C;
    if (dinp) {
#pragma omp parallel for if (total > AR_OPS_PAR_MIN)
        for (int n = 0; n < N; n++)
            ar_ln_row_backward(dinp + (size_t)n * C, 1, NULL, dout + (size_t)n * C, inp + (size_t)n * C,
                               weight, mean[n], rstd[n], C, NULL, NULL);
    }
    if (dweight || dbias) {
        enum { CB = 64 };
        int nblocks = (C + CB - 1) / CB;
#pragma omp parallel for if (total > AR_OPS_PAR_MIN && nblocks > 1)
        for (int blk = 0; blk < nblocks; blk++) {
            int c0 = blk * CB;
            int c1 = c0 + CB < C ? c0 + CB : C;
            float dw[CB], db[CB];
            for (int i = 0; i < c1 - c0; i++)
                dw[i] = db[i] = 0.0f;
            for (int n = 0; n < N; n++) {
                const float *x = inp + (size_t)n * C;
                const float *dy = dout + (size_t)n * C;
                float m = mean[n], rs = rstd[n];
                for (int i = c0; i < c1; i++) {
                    dw[i - c0] += (x[i] - m) * rs * dy[i];
                    db[i - c0] += dy[i];
                }
            }
            for (int i = c0; i < c1; i++) {
                if (dweight)
                    dweight[i] += dw[i - c0];
                if (dbias)
                    dbias[i] += db[i - c0];
            }
        }
    }
}
