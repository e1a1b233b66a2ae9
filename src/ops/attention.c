/* Causal multi-head self-attention.
 *
 * Every (batch, head) pair is an independent problem, so the pairs are
 * spread over the OpenMP team and each is done by one thread, from start
 * to end, in one pass over its rows:
 *
 *   forward, for each block of MR query rows: their scores against the keys
 *   up to the block's last row (the kernel's MR x NR blocks; later keys are
 *   never computed), the causal softmax of those rows (masking is the loop
 *   bound, not a pass), then their outputs P V over the same keys;
 *   backward, for each block of rows: dP = dY V^T, the softmax backward,
 *   dQ += dS K; then dK += dS^T Q and dV += P^T dY, each over the rows at
 *   or below the key.
 *
 * The products use the engine's packed panels and micro-kernel (core/blas.h):
 * Q (scaled by 1/sqrt(HS)), K, V and dY are packed once per pair, so a
 * head's operands stay in the core's caches. A pair's results come from one
 * thread in a fixed order, so they do not depend on the thread count. */
#include "ops/ops.h"

#include "core/blas.h"
#include "core/core.h"
#include "ops/ops_internal.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define MR AR_GEMM_MR
#define NR AR_GEMM_NR

static size_t round_up(size_t x, size_t m)
{
    return (x + m - 1) / m * m;
}

/* packed B panels are read with aligned vector loads: every piece of the
 * packing space starts on 64 bytes */
static size_t al(size_t floats)
{
    return round_up(floats, 16);
}

static int team_size(long pairs, long work)
{
#ifdef _OPENMP
    if (pairs > 1 && work > AR_OPS_PAR_MIN && !omp_in_parallel())
        return omp_get_max_threads();
#endif
    (void)pairs;
    (void)work;
    return 1;
}

static int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Floats of packing space one thread needs for a pair. */
static size_t fwd_scratch(int T, int HS)
{
    size_t Tm = round_up((size_t)T, MR), Tn = round_up((size_t)T, NR), Hn = round_up((size_t)HS, NR);
    return al(Tm * HS)      /* Q panels */
           + al(Tn * HS)    /* K^T panels */
           + al(Hn * T)     /* V panels */
           + al((size_t)MR * T); /* one row block of P */
}

/* qkv (B,T,3C) with C = NH*HS -> out (B,T,C), att (B,NH,T,T) */
int ar_attention_forward(float *out, float *att, const float *qkv, int B, int T, int NH, int HS)
{
    const int C = NH * HS, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)HS);
    const int BH = B * NH;
    int threads = team_size(BH, (long)BH * T * T);
    size_t per = fwd_scratch(T, HS);
    float *space = ar_calloc((size_t)threads * per, sizeof(float));
    if (!space)
        return ar_fail(AR_ENOMEM, "attention: no memory for %d threads' packing space", threads);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int bh = 0; bh < BH; bh++) {
        int b = bh / NH, h = bh % NH;
        const float *q = qkv + (size_t)b * T * C3 + (size_t)h * HS;
        const float *k = q + C;
        const float *v = q + 2 * C;
        float *a = att + (size_t)bh * T * T;
        float *o = out + (size_t)b * T * C + (size_t)h * HS;
        float *qp = space + (size_t)thread_id() * per;
        float *kp = qp + al(round_up((size_t)T, MR) * HS);
        float *vp = kp + al(round_up((size_t)T, NR) * HS);
        float *pp = vp + al(round_up((size_t)HS, NR) * T);
        ar_gemm_pack_a(0, q, C3, scale, 0, T, 0, HS, qp); /* rows t, k = feature */
        ar_gemm_pack_b(1, k, C3, 0, T, 0, HS, kp);        /* columns = keys */
        ar_gemm_pack_b(0, v, C3, 0, HS, 0, T, vp);        /* k = key, columns = features */
        for (int i0 = 0; i0 < T; i0 += MR) {
            int m = T - i0 < MR ? T - i0 : MR, keys = i0 + m; /* keys 0..i0+m-1 */
            /* scores of the block's rows against the keys they may see (and
             * the rest of the last NR panel, which the softmax ignores) */
            for (int j0 = 0; j0 < keys; j0 += NR)
                ar_gemm_block(HS, qp + (size_t)i0 * HS, kp + (size_t)j0 * HS, a + (size_t)i0 * T + j0, T, 0.0f,
                              m, T - j0 < NR ? T - j0 : NR);
            /* softmax over j <= t; above the diagonal att is zero, so the
             * product below may run over the block's whole key range */
            for (int t = i0; t < i0 + m; t++) {
                float *row = a + (size_t)t * T;
                float mx = ar_row_max(row, t + 1);
                for (int j = 0; j <= t; j++)
                    row[j] = ar_fast_expf(row[j] - mx);
                float inv = 1.0f / ar_row_sum(row, t + 1);
                for (int j = 0; j <= t; j++)
                    row[j] *= inv;
                for (int j = t + 1; j < T; j++)
                    row[j] = 0.0f;
            }
            /* out rows = P[rows, 0:keys] V[0:keys] */
            ar_gemm_pack_a(0, a, T, 1.0f, i0, m, 0, keys, pp);
            for (int d0 = 0; d0 < HS; d0 += NR)
                ar_gemm_block(keys, pp, vp + (size_t)d0 * T, o + (size_t)i0 * C + d0, C, 0.0f, m,
                              HS - d0 < NR ? HS - d0 : NR);
        }
    }
    ar_free(space);
    return AR_OK;
}

static size_t bwd_scratch(int T, int HS)
{
    size_t Tm = round_up((size_t)T, MR), Tn = round_up((size_t)T, NR), Hn = round_up((size_t)HS, NR);
    return al(Tm * HS)          /* dY panels (A of dP) */
           + al(Tn * HS)        /* V^T panels (B of dP) */
           + 3 * al(Hn * T)     /* K, Q, dY panels (B of dQ, dK, dV) */
           + al(Tm * T);        /* one row block of dS, or all of dS^T or P^T as A panels */
}

/* dout (B,T,C) -> dqkv (B,T,3C) accumulated; scratch (B,NH,T,T) holds dS.
 *   dP = dout . V^T                     dV += P^T . dout
 *   dS = scale * P * (dP - rowsum(P * dP))
 *   dQ += dS . K                        dK += dS^T . Q
 * Each (b,h) writes its own columns of dqkv, so the pairs never collide.   */
int ar_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                          const float *att, int B, int T, int NH, int HS)
{
    return ar_attention_backward_ex(dqkv, 1, scratch, dout, qkv, att, B, T, NH, HS);
}

/* Every element of dqkv gets exactly one block product (beta: 1 adds it, 0
 * overwrites), so not accumulating needs no zeroed buffer. */
int ar_attention_backward_ex(float *dqkv, int accumulate, float *scratch, const float *dout,
                             const float *qkv, const float *att, int B, int T, int NH, int HS)
{
    const float beta = accumulate ? 1.0f : 0.0f;
    const int C = NH * HS, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)HS);
    const int BH = B * NH;
    int threads = team_size(BH, (long)BH * T * T);
    size_t per = bwd_scratch(T, HS);
    float *space = ar_calloc((size_t)threads * per, sizeof(float));
    if (!space)
        return ar_fail(AR_ENOMEM, "attention backward: no memory for %d threads' packing space", threads);
    const size_t Tm = round_up((size_t)T, MR), Tn = round_up((size_t)T, NR), Hn = round_up((size_t)HS, NR);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int bh = 0; bh < BH; bh++) {
        int b = bh / NH, h = bh % NH;
        size_t base = (size_t)b * T * C3 + (size_t)h * HS;
        const float *q = qkv + base, *k = q + C, *v = q + 2 * C;
        float *dq = dqkv + base, *dk = dq + C, *dv = dq + 2 * C;
        const float *P = att + (size_t)bh * T * T;
        float *dS = scratch + (size_t)bh * T * T;
        const float *dy = dout + (size_t)b * T * C + (size_t)h * HS;
        float *dyp = space + (size_t)thread_id() * per;
        float *vtp = dyp + al(Tm * HS);
        float *kn = vtp + al(Tn * HS), *qn = kn + al(Hn * T), *dyn = qn + al(Hn * T);
        float *blk = dyn + al(Hn * T);
        ar_gemm_pack_a(0, dy, C, 1.0f, 0, T, 0, HS, dyp);
        ar_gemm_pack_b(1, v, C3, 0, T, 0, HS, vtp);
        ar_gemm_pack_b(0, k, C3, 0, HS, 0, T, kn);
        ar_gemm_pack_b(0, q, C3, 0, HS, 0, T, qn);
        ar_gemm_pack_b(0, dy, C, 0, HS, 0, T, dyn);
        for (int i0 = 0; i0 < T; i0 += MR) {
            int m = T - i0 < MR ? T - i0 : MR, keys = i0 + m;
            /* dP for the block's rows, keys 0..keys-1 (and the panel's rest) */
            for (int j0 = 0; j0 < keys; j0 += NR)
                ar_gemm_block(HS, dyp + (size_t)i0 * HS, vtp + (size_t)j0 * HS, dS + (size_t)i0 * T + j0, T, 0.0f,
                              m, T - j0 < NR ? T - j0 : NR);
            /* softmax backward in place; zero above the diagonal, so the
             * products below may run over whole key ranges */
            for (int t = i0; t < i0 + m; t++) {
                const float *prow = P + (size_t)t * T;
                float *drow = dS + (size_t)t * T;
                float dot = ar_row_dot(prow, drow, t + 1);
                for (int j = 0; j <= t; j++)
                    drow[j] = scale * prow[j] * (drow[j] - dot);
                for (int j = t + 1; j < T; j++)
                    drow[j] = 0.0f;
            }
            /* dQ rows += dS[rows, 0:keys] K[0:keys] */
            ar_gemm_pack_a(0, dS, T, 1.0f, i0, m, 0, keys, blk);
            for (int d0 = 0; d0 < HS; d0 += NR)
                ar_gemm_block(keys, blk, kn + (size_t)d0 * T, dq + (size_t)i0 * C3 + d0, C3, beta, m,
                              HS - d0 < NR ? HS - d0 : NR);
        }
        /* dK rows j += sum over i >= j of dS[i][j] Q[i]; dV likewise with P
         * and dY. A block of key rows j0.. starts its sum at i = j0: the
         * terms before are zeros of the upper triangle. */
        for (int pass = 0; pass < 2; pass++) {
            const float *src = pass == 0 ? dS : P;
            const float *bn = pass == 0 ? qn : dyn;
            float *dst = pass == 0 ? dk : dv;
            ar_gemm_pack_a(1, src, T, 1.0f, 0, T, 0, T, blk); /* rows = keys, k = queries */
            for (int j0 = 0; j0 < T; j0 += MR) {
                int m = T - j0 < MR ? T - j0 : MR;
                for (int d0 = 0; d0 < HS; d0 += NR)
                    ar_gemm_block(T - j0, blk + (size_t)j0 * T + (size_t)j0 * MR, bn + (size_t)d0 * T + (size_t)j0 * NR,
                                  dst + (size_t)j0 * C3 + d0, C3, beta, m, HS - d0 < NR ? HS - d0 : NR);
            }
        }
    }
    ar_free(space);
    return AR_OK;
}
