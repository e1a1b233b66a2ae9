/* Token + position embedding. */
#include "ops/ops.h"

#include "ops/ops_internal.h"

#include <stddef.h>

/* tokens (B,T), wte (V,C), wpe (maxT,C) -> out (B,T,C) */
void ar_embedding_forward(float *out, const int32_t *tokens, const float *wte, const float *wpe,
                          int B, int T, int C)
{
    long BT = (long)B * T;
#pragma omp parallel for if (BT * C > AR_OPS_PAR_MIN)
    for (long bt = 0; bt < BT; bt++) {
        int t = (int)(bt % T);
        const float *e = wte + (size_t)tokens[bt] * C;
        const float *p = wpe + (size_t)t * C;
        float *o = out + (size_t)bt * C;
        for (int i = 0; i < C; i++)
            o[i] = e[i] + p[i];
    }
}

/* dout (B,T,C) -> dwte (V,C), dwpe (maxT,C), accumulated; either may be NULL.
 * A token may repeat, so rows of dwte collide: threads therefore own column
 * blocks, and each walks (b,t) in order. No atomics, and the summation order
 * is fixed whatever the thread count. */
void ar_embedding_backward(float *dwte, float *dwpe, const float *dout, const int32_t *tokens,
                           int B, int T, int C)
{
    enum { CB = 64 };
    long BT = (long)B * T;
    int nblocks = (C + CB - 1) / CB;
#pragma omp parallel for if (BT * C > AR_OPS_PAR_MIN && nblocks > 1)
    for (int blk = 0; blk < nblocks; blk++) {
        int c0 = blk * CB;
        int c1 = c0 + CB < C ? c0 + CB : C;
        for (long bt = 0; bt < BT; bt++) {
            const float *d = dout + (size_t)bt * C;
            if (dwte) {
                float *g = dwte + (size_t)tokens[bt] * C;
                for (int i = c0; i < c1; i++)
                    g[i] += d[i];
            }
            if (dwpe) {
                float *g = dwpe + (size_t)(bt % T) * C;
                for (int i = c0; i < c1; i++)
                    g[i] += d[i];
            }
        }
    }
}
