/* Fully connected layer, y = x W^T + b, with W in nn.Linear's (OUT,IN)
 * layout so a checkpoint maps one-to-one onto a PyTorch state_dict. */
#include "ops/ops.h"

#include "core/blas.h"
#include "ops/ops_internal.h"

#include <stddef.h>

/* inp (N,IN), weight (OUT,IN), bias (OUT) or NULL -> out (N,OUT) */
void ar_linear_forward(float *out, const float *inp, const float *weight, const float *bias,
                       int N, int IN, int OUT)
{
    if (N <= 0 || OUT <= 0)
        return;
    float beta = 0.0f;
    if (bias) {
        /* Seed every row with the bias and let the GEMM add onto it (beta=1):
         * one pass over out instead of a second pass after the product. */
        long total = (long)N * OUT;
#pragma omp parallel for if (total > AR_OPS_PAR_MIN)
        for (int n = 0; n < N; n++) {
            float *row = out + (size_t)n * OUT;
            for (int o = 0; o < OUT; o++)
                row[o] = bias[o];
        }
        beta = 1.0f;
    }
    if (IN <= 0) {
        if (!bias)
            for (long i = 0; i < (long)N * OUT; i++)
                out[i] = 0.0f;
        return;
    }
    /* out (N,OUT) = inp (N,IN) . weight^T (IN,OUT) */
    ar_sgemm(0, 1, N, OUT, IN, 1.0f, inp, IN, weight, IN, beta, out, OUT);
}

/* dout (N,OUT) -> dinp (N,IN) (may be NULL), dweight (OUT,IN), dbias (OUT) or NULL;
 * all accumulate (+=). */
void ar_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, int N, int IN, int OUT)
{
    if (N <= 0 || OUT <= 0)
        return;
    if (IN > 0) {
        /* dinp (N,IN) += dout (N,OUT) . weight (OUT,IN) */
        if (dinp)
            ar_sgemm(0, 0, N, IN, OUT, 1.0f, dout, OUT, weight, IN, 1.0f, dinp, IN);
        /* dweight (OUT,IN) += dout^T (OUT,N) . inp (N,IN) */
        if (dweight)
            ar_sgemm(1, 0, OUT, IN, N, 1.0f, dout, OUT, inp, IN, 1.0f, dweight, IN);
    }
    if (dbias) {
        /* Column sums of dout. Threads own disjoint column blocks and each
         * walks the rows in order, so the sum is the same for any thread
         * count and no atomics are needed. */
        enum { CB = 64 };
        int nblocks = (OUT + CB - 1) / CB;
        long total = (long)N * OUT;
#pragma omp parallel for if (total > AR_OPS_PAR_MIN && nblocks > 1)
        for (int blk = 0; blk < nblocks; blk++) {
            int o0 = blk * CB;
            int o1 = o0 + CB < OUT ? o0 + CB : OUT;
            float acc[CB];
            for (int o = o0; o < o1; o++)
                acc[o - o0] = 0.0f;
            for (int n = 0; n < N; n++) {
                const float *row = dout + (size_t)n * OUT;
                for (int o = o0; o < o1; o++)
                    acc[o - o0] += row[o];
            }
            for (int o = o0; o < o1; o++)
                dbias[o] += acc[o - o0];
        }
    }
}
