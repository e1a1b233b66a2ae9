/* Fully connected layer, y = x W^T + b, with W in nn.Linear's (OUT,IN)
 * layout so a checkpoint maps one-to-one onto a PyTorch state_dict. */
#include "ops/ops.h"

#include "core/blas.h"
#include "core/core.h"
#include "ops/ops_internal.h"

#include <stddef.h>

/* ---- fused layers ----------------------------------------------------------
 * The work that follows a product (bias, activation, residual, dropout,
 * LayerNorm, their backwards) done in the product's epilogue, on each block
 * of rows while it is in the cache, instead of in passes of its own over
 * memory. Reductions over rows (bias and LayerNorm parameter gradients) keep
 * a partial per block and add the blocks in order: the blocks depend on the
 * shape only, so the sums do not depend on the thread count. */

typedef struct {
    const float *bias;   /* per column, or NULL */
    float *gelu_out;     /* GELU: C keeps the pre-activation, this gets gelu(pre) */
    const float *resid;  /* added after the branch's dropout */
    float drop_p, drop_scale;
    uint64_t drop_sm;    /* splitmix64(seed), 0 when no dropout */
    int OUT;
    float *ln, *mean, *rstd; /* LayerNorm of the finished rows, or ln NULL */
    const float *ln_w, *ln_b;
} fwd_epi;

static void fwd_epilogue(void *ctx, float *C, int ldc, int i0, int i1, int j0, int j1, int block)
{
    (void)block;
    const fwd_epi *e = ctx;
    for (int i = i0; i < i1; i++) {
        float *row = C + (size_t)i * ldc;
        size_t at = (size_t)i * e->OUT;
        if (e->bias)
            for (int j = j0; j < j1; j++)
                row[j] += e->bias[j];
        if (e->drop_sm)
            for (int j = j0; j < j1; j++)
                row[j] = ar_dropout_u(e->drop_sm, (long)(at + j)) >= e->drop_p ? row[j] * e->drop_scale : 0.0f;
        if (e->resid)
            for (int j = j0; j < j1; j++)
                row[j] += e->resid[at + j];
        if (e->gelu_out) {
            float *g = e->gelu_out + at;
#pragma omp simd
            for (int j = j0; j < j1; j++)
                g[j] = ar_gelu(row[j]);
        }
        if (e->ln)
            ar_ln_row(e->ln + at, row, e->ln_w, e->ln_b, e->OUT, &e->mean[i], &e->rstd[i]);
    }
}

/* inp (N,IN), weight (OUT,IN), bias (OUT) or NULL -> out (N,OUT) */
void ar_linear_forward(float *out, const float *inp, const float *weight, const float *bias,
                       int N, int IN, int OUT)
{
    if (N <= 0 || OUT <= 0)
        return;
    if (IN <= 0) {
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OUT; o++)
                out[(size_t)n * OUT + o] = bias ? bias[o] : 0.0f;
        return;
    }
    /* out (N,OUT) = inp (N,IN) . weight^T (IN,OUT), the bias added to each
     * block of rows as it is finished */
    fwd_epi e = {.bias = bias, .OUT = OUT};
    ar_gemm_epilogue ep = {.fn = fwd_epilogue, .ctx = &e, .full_rows = 0};
    ar_sgemm_ex(0, 1, N, OUT, IN, 1.0f, inp, IN, weight, IN, 0.0f, out, OUT, bias ? &ep : NULL);
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
        /* dweight (OUT,IN) += dout^T (OUT,N) . inp (N,IN); the bias
         * gradient, dout's column sums, is summed as dout^T is packed */
        if (dweight) {
            ar_gemm_epilogue ep = {.a_sums = dbias};
            ar_sgemm_ex(1, 0, OUT, IN, N, 1.0f, dout, OUT, inp, IN, 1.0f, dweight, IN, dbias ? &ep : NULL);
            dbias = NULL;
        }
    }
    if (dbias) {
        /* (no weight gradient) Column sums of dout. Threads own disjoint column blocks and each
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


int ar_linear_gelu_forward(float *pre, float *out, const float *inp, const float *weight, const float *bias,
                           int N, int IN, int OUT)
{
    fwd_epi e = {.bias = bias, .gelu_out = out, .OUT = OUT};
    ar_gemm_epilogue ep = {.fn = fwd_epilogue, .ctx = &e, .full_rows = 0};
    ar_sgemm_ex(0, 1, N, OUT, IN, 1.0f, inp, IN, weight, IN, 0.0f, pre, OUT, &ep);
    return AR_OK;
}

int ar_linear_residual_forward(float *out, const float *resid, const float *inp, const float *weight,
                               const float *bias, int N, int IN, int OUT, float drop_p, uint64_t drop_seed,
                               float *ln, float *mean, float *rstd, const float *ln_w, const float *ln_b)
{
    fwd_epi e = {.bias = bias, .resid = resid, .OUT = OUT, .ln = ln, .mean = mean, .rstd = rstd,
                 .ln_w = ln_w, .ln_b = ln_b};
    if (drop_p > 0.0f) {
        e.drop_p = drop_p;
        e.drop_scale = drop_p < 1.0f ? 1.0f / (1.0f - drop_p) : 0.0f;
        e.drop_sm = ar_splitmix64(drop_seed);
        if (!e.drop_sm) /* (0 means "no dropout" here) */
            e.drop_sm = 1;
    }
    ar_gemm_epilogue ep = {.fn = fwd_epilogue, .ctx = &e, .full_rows = ln != NULL};
    ar_sgemm_ex(0, 1, N, OUT, IN, 1.0f, inp, IN, weight, IN, 0.0f, out, OUT, &ep);
    return AR_OK;
}

void ar_linear_backward_input(float *dinp, int accumulate, const float *dout, const float *weight, int N,
                              int IN, int OUT)
{
    ar_sgemm(0, 0, N, IN, OUT, 1.0f, dout, OUT, weight, IN, accumulate ? 1.0f : 0.0f, dinp, IN);
}

/* sum the blocks' partials (nb rows of n) into out, in block order */
static void add_partials(float *out, const float *part, int nb, int n)
{
    for (int j = 0; j < n; j++) {
        float s = 0.0f;
        for (int b = 0; b < nb; b++)
            s += part[(size_t)b * n + j];
        out[j] += s;
    }
}

typedef struct {
    const float *pre;  /* GELU backward: the pre-activation (N,IN) */
    float *dbias_part; /* per block, IN each: column sums of the result */
    int IN;
    /* LayerNorm backward */
    float *dx;
    int accumulate;
    const float *extra, *x, *ln_w, *mean, *rstd;
    float *dw_part, *db_part;
} bwd_epi;

static void gelu_bwd_epilogue(void *ctx, float *C, int ldc, int i0, int i1, int j0, int j1, int block)
{
    const bwd_epi *e = ctx;
    float *part = e->dbias_part ? e->dbias_part + (size_t)block * e->IN : NULL;
    for (int i = i0; i < i1; i++) {
        float *row = C + (size_t)i * ldc;
        const float *pre = e->pre + (size_t)i * e->IN;
#pragma omp simd
        for (int j = j0; j < j1; j++)
            row[j] *= ar_gelu_grad(pre[j]);
        if (part)
            for (int j = j0; j < j1; j++)
                part[j] += row[j];
    }
}

int ar_linear_backward_gelu(float *dpre, float *dpre_bias, const float *dout, const float *weight,
                            const float *pre, int N, int IN, int OUT)
{
    int nb = ar_sgemm_blocks(N);
    bwd_epi e = {.pre = pre, .IN = IN};
    if (dpre_bias && !(e.dbias_part = ar_calloc((size_t)nb * IN, sizeof(float))))
        return AR_ENOMEM;
    ar_gemm_epilogue ep = {.fn = gelu_bwd_epilogue, .ctx = &e, .full_rows = 1};
    /* dpre (N,IN) = dout (N,OUT) . weight (OUT,IN), then * gelu'(pre) */
    ar_sgemm_ex(0, 0, N, IN, OUT, 1.0f, dout, OUT, weight, IN, 0.0f, dpre, IN, &ep);
    if (dpre_bias) {
        add_partials(dpre_bias, e.dbias_part, nb, IN);
        ar_free(e.dbias_part);
    }
    return AR_OK;
}

static void ln_bwd_epilogue(void *ctx, float *C, int ldc, int i0, int i1, int j0, int j1, int block)
{
    (void)j0;
    (void)j1;
    const bwd_epi *e = ctx;
    int n = e->IN;
    for (int i = i0; i < i1; i++) {
        size_t at = (size_t)i * n;
        ar_ln_row_backward(e->dx + at, e->accumulate, e->extra ? e->extra + at : NULL, C + (size_t)i * ldc,
                           e->x + at, e->ln_w, e->mean[i], e->rstd[i], n,
                           e->dw_part ? e->dw_part + (size_t)block * n : NULL,
                           e->db_part ? e->db_part + (size_t)block * n : NULL);
    }
}

int ar_linear_backward_layernorm(float *dx, int accumulate, const float *resid_grad, float *ln_wgrad,
                                 float *ln_bgrad, float *g, const float *dout, const float *weight,
                                 const float *x, const float *ln_w, const float *mean, const float *rstd,
                                 int N, int IN, int OUT)
{
    int nb = ar_sgemm_blocks(N);
    bwd_epi e = {.IN = IN, .dx = dx, .accumulate = accumulate, .extra = resid_grad, .x = x, .ln_w = ln_w,
                 .mean = mean, .rstd = rstd};
    if (!g) {
        if (accumulate)
            return ar_fail(AR_EINTERNAL, "layernorm backward: accumulating needs a buffer for the product");
        g = dx; /* each row's product is read before that row of dx is written */
    }
    if ((ln_wgrad && !(e.dw_part = ar_calloc((size_t)nb * IN, sizeof(float)))) ||
        (ln_bgrad && !(e.db_part = ar_calloc((size_t)nb * IN, sizeof(float))))) {
        ar_free(e.dw_part);
        return AR_ENOMEM;
    }
    ar_gemm_epilogue ep = {.fn = ln_bwd_epilogue, .ctx = &e, .full_rows = 1};
    /* g (N,IN) = dout (N,OUT) . weight (OUT,IN): the gradient of the LayerNorm's output */
    ar_sgemm_ex(0, 0, N, IN, OUT, 1.0f, dout, OUT, weight, IN, 0.0f, g, IN, &ep);
    if (ln_wgrad)
        add_partials(ln_wgrad, e.dw_part, nb, IN);
    if (ln_bgrad)
        add_partials(ln_bgrad, e.db_part, nb, IN);
    ar_free(e.dw_part);
    ar_free(e.db_part);
    return AR_OK;
}
