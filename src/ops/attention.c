/* Causal multi-head self-attention.
 *
 * Every (batch, head) pair is an independent problem of a few small GEMMs,
 * so the pairs are spread over the OpenMP team and each GEMM runs on one
 * thread (the OpenMP build of OpenBLAS does that by itself inside a parallel
 * region). Q, K and V are read in place from the qkv buffer with a leading
 * dimension of 3C, so nothing is transposed or copied.
 *
 * Causality is exploited by cutting the T query rows into blocks: a block of
 * rows [r0,r1) only sees keys [0,r1), so its GEMMs are r1 wide instead of T.
 * With 32-row blocks that does 10/16 of the dense work at T=128.           */
#include "ops/ops.h"

#include "core/blas.h"
#include "ops/ops_internal.h"

#include <math.h>
#include <stddef.h>

#ifndef ATT_ROW_BLOCK
#define ATT_ROW_BLOCK 32 /* measured: 16..128 within 10%, 32 best for backward */
#endif

/* qkv (B,T,3C) with C = NH*HS -> out (B,T,C), att (B,NH,T,T) */
void ar_attention_forward(float *out, float *att, const float *qkv, int B, int T, int NH, int HS)
{
    const int C = NH * HS, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)HS);
    const int BH = B * NH;
#pragma omp parallel for schedule(static) if (BH > 1 && (long)BH * T * T > AR_OPS_PAR_MIN)
    for (int bh = 0; bh < BH; bh++) {
        int b = bh / NH, h = bh % NH;
        const float *q = qkv + (size_t)b * T * C3 + (size_t)h * HS;
        const float *k = q + C;
        const float *v = q + 2 * C;
        float *a = att + (size_t)bh * T * T;
        float *o = out + (size_t)b * T * C + (size_t)h * HS;
        for (int r0 = 0; r0 < T; r0 += ATT_ROW_BLOCK) {
            int r1 = r0 + ATT_ROW_BLOCK < T ? r0 + ATT_ROW_BLOCK : T;
            int m = r1 - r0;
            float *ab = a + (size_t)r0 * T;
            /* preatt[r0:r1, 0:r1] = scale * Q[r0:r1] . K[0:r1]^T */
            ar_sgemm(0, 1, m, r1, HS, scale, q + (size_t)r0 * C3, C3, k, C3, 0.0f, ab, T);
            /* softmax over the keys each query may see (j <= t); the rest is
             * zero so att is a proper (B,NH,T,T) matrix for any consumer. */
            for (int t = r0; t < r1; t++) {
                float *row = a + (size_t)t * T;
                float mx = ar_row_max(row, t + 1);
                for (int j = 0; j <= t; j++)
                    row[j] = ar_fast_expf(row[j] - mx);
                float sum = ar_row_sum(row, t + 1);
                float inv = 1.0f / sum;
                for (int j = 0; j <= t; j++)
                    row[j] *= inv;
                for (int j = t + 1; j < T; j++)
                    row[j] = 0.0f;
            }
            /* out[r0:r1] = att[r0:r1, 0:r1] . V[0:r1] */
            ar_sgemm(0, 0, m, HS, r1, 1.0f, ab, T, v, C3, 0.0f, o + (size_t)r0 * C, C);
        }
    }
}

/* dout (B,T,C) -> dqkv (B,T,3C) accumulated; scratch (B,NH,T,T) holds datt,
 * turned in place into dpreatt:
 *   datt    = dout . V^T                  dV += att^T . dout
 *   dpreatt = scale * att * (datt - rowsum(att * datt))
 *   dQ     += dpreatt . K                 dK += dpreatt^T . Q
 * Each (b,h) writes its own columns of dqkv, so the pairs never collide.   */
void ar_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                           const float *att, int B, int T, int NH, int HS)
{
    const int C = NH * HS, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)HS);
    const int BH = B * NH;
#pragma omp parallel for schedule(static) if (BH > 1 && (long)BH * T * T > AR_OPS_PAR_MIN)
    for (int bh = 0; bh < BH; bh++) {
        int b = bh / NH, h = bh % NH;
        size_t base = (size_t)b * T * C3 + (size_t)h * HS;
        const float *q = qkv + base, *k = q + C, *v = q + 2 * C;
        float *dq = dqkv + base, *dk = dq + C, *dv = dq + 2 * C;
        const float *a = att + (size_t)bh * T * T;
        float *da = scratch + (size_t)bh * T * T;
        const float *dob = dout + (size_t)b * T * C + (size_t)h * HS;
        for (int r0 = 0; r0 < T; r0 += ATT_ROW_BLOCK) {
            int r1 = r0 + ATT_ROW_BLOCK < T ? r0 + ATT_ROW_BLOCK : T;
            int m = r1 - r0;
            const float *ab = a + (size_t)r0 * T;
            float *dab = da + (size_t)r0 * T;
            const float *dor = dob + (size_t)r0 * C;
            /* datt[r0:r1, 0:r1] = dout[r0:r1] . V[0:r1]^T */
            ar_sgemm(0, 1, m, r1, HS, 1.0f, dor, C, v, C3, 0.0f, dab, T);
            /* dV[0:r1] += att[r0:r1, 0:r1]^T . dout[r0:r1] */
            ar_sgemm(1, 0, r1, HS, m, 1.0f, ab, T, dor, C, 1.0f, dv, C3);
            /* softmax backward, in place; entries above the diagonal become
             * zero so the GEMMs below may read the whole [r0:r1, 0:r1] block. */
            for (int t = r0; t < r1; t++) {
                const float *arow = a + (size_t)t * T;
                float *drow = da + (size_t)t * T;
                float dot = ar_row_dot(arow, drow, t + 1);
                for (int j = 0; j <= t; j++)
                    drow[j] = scale * arow[j] * (drow[j] - dot);
                for (int j = t + 1; j < r1; j++)
                    drow[j] = 0.0f;
            }
            /* dQ[r0:r1] += dpreatt[r0:r1, 0:r1] . K[0:r1] */
            ar_sgemm(0, 0, m, HS, r1, 1.0f, dab, T, k, C3, 1.0f, dq + (size_t)r0 * C3, C3);
            /* dK[0:r1] += dpreatt[r0:r1, 0:r1]^T . Q[r0:r1] */
            ar_sgemm(1, 0, r1, HS, m, 1.0f, dab, T, q + (size_t)r0 * C3, C3, 1.0f, dk, C3);
        }
    }
}
