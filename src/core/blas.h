/* Matrix products: the engine's own sgemm.
 *
 * Every product of the engine goes through ar_sgemm. It does not call a BLAS
 * library: it packs the operands into panels and runs a register-blocked
 * micro-kernel (AVX-512 or AVX2 where the CPU has them, portable C
 * otherwise), so that
 *
 *   - its result is defined by the arithmetic alone: each element of C is
 *     one chain of fused multiply-adds over k in increasing order, started
 *     from beta*C (0 when beta is 0, C itself when beta is 1), with alpha
 *     applied to A's elements first. Neither the thread count, nor how C is
 *     cut into blocks, nor which kernel runs changes a bit of it: --threads 1
 *     and --threads 16 agree, and so do two machines with different vector
 *     units (a verifier replaying a provider's step);
 *   - it runs at the speed of the CPU's widest FMA: OpenBLAS picks its
 *     kernels by the CPU it recognises (or OPENBLAS_CORETYPE), and on CPUs it
 *     does not know it falls back to narrower ones;
 *   - work can be done on a block of C while it is still in cache (an
 *     epilogue: bias, activation, residual, LayerNorm), instead of in another
 *     pass over memory.
 *
 * The threads share C by row blocks (and column slices when there are few
 * rows); called from inside an active OpenMP parallel region it runs on the
 * calling thread alone. */
#ifndef AR_BLAS_H
#define AR_BLAS_H

/* Called once for each finished block of C, rows [i0,i1) and columns
 * [j0,j1), by the thread that computed it, while the block is in its cache.
 * With full_rows set every block spans all N columns (row-wise work such as
 * a LayerNorm). block is the block's index among those of this product
 * (0 .. ar_sgemm_blocks()-1), fixed by the shape: an epilogue that reduces
 * over rows keeps a partial per block and adds them in block order. */
typedef struct {
    void (*fn)(void *ctx, float *C, int ldc, int i0, int i1, int j0, int j1, int block);
    void *ctx;
    int full_rows;
    /* if not NULL: a_sums[i] += the sum over k, in k order, of op(A)[i][k]
     * (before alpha), taken while A is packed: a linear layer's bias
     * gradient during its weight gradient's product, without a pass of its
     * own. fn may then be NULL. */
    float *a_sums;
} ar_gemm_epilogue;

/* C (M,N) = alpha op(A) op(B) + beta C, row-major, as cblas_sgemm (see above
 * for the exact arithmetic). trans_a: A is stored (K,M); trans_b: B is
 * stored (N,K). */
void ar_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc);

/* The same with an epilogue (NULL: none). */
void ar_sgemm_ex(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc, const ar_gemm_epilogue *ep);

/* The blocks a product of M rows is cut into for an epilogue with full_rows
 * (a function of M alone), and block b's first row: blocks cover
 * [ar_sgemm_block_row(M, b), ar_sgemm_block_row(M, b + 1)). */
int ar_sgemm_blocks(int M);
int ar_sgemm_block_row(int M, int b);

/* ---- building blocks, for products done piece by piece -------------------
 * (the attention: many small products over one head's rows, where a whole
 * ar_sgemm per piece would pack the same operands again and again). The
 * same packing and kernel as ar_sgemm, so the same arithmetic. */
#ifndef AR_GEMM_MR
#define AR_GEMM_MR 6  /* rows of a packed A panel and of a kernel block */
#endif
#ifndef AR_GEMM_NR
#define AR_GEMM_NR 64 /* columns of a packed B panel and of a kernel block */
#endif

/* Rows [i0, i0+m) of alpha op(A), k in [p0, p0+kc), into panels of MR
 * rows: panel r (rows i0+r*MR ..) at dst + r*MR*kc, element (i, k) of a
 * panel at [k*MR + i], rows past m zero. dst holds ceil(m/MR)*MR*kc floats. */
void ar_gemm_pack_a(int trans_a, const float *A, int lda, float alpha, int i0, int m, int p0, int kc,
                    float *dst);
/* Columns [j0, j0+n) of op(B), k in [p0, p0+kc), into panels of NR
 * columns: panel c at dst + c*NR*kc, element (k, j) at [k*NR + j], columns
 * past n zero. dst holds ceil(n/NR)*NR*kc floats. */
void ar_gemm_pack_b(int trans_b, const float *B, int ldb, int j0, int n, int p0, int kc, float *dst);
/* One block of C: its m <= MR rows and n <= NR columns (row stride ldc) =
 * beta*C + the panels' product over kc (a: an A panel, b: a B panel, both
 * from k = their first packed k; a prefix of k may be used, or an offset
 * panel a + k0*MR, b + k0*NR). beta 0: C is not read. */
void ar_gemm_block(int kc, const float *a, const float *b, float *C, int ldc, float beta, int m, int n);

/* Which micro-kernel runs: "avx512", "avx2" or "portable" (the widest the
 * CPU has, or a narrower one named by $ARCEUS_SGEMM_KERNEL). */
const char *ar_sgemm_kernel(void);

#endif
