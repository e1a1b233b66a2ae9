/* The one place that knows which BLAS we link: OpenBLAS on Linux,
 * Accelerate on macOS. Everything else includes this header. */
#ifndef AR_BLAS_H
#define AR_BLAS_H

#ifdef __APPLE__
#include <Accelerate/Accelerate.h>
#else
#include <cblas.h>
#endif

void ar_blas_set_threads(int n);

/* C (M,N) = alpha op(A) op(B) + beta C, row-major, as cblas_sgemm, with a
 * result that does not depend on the number of threads.
 *
 * OpenBLAS splits a product over its threads by rows or columns, and some
 * of its kernels (Haswell's, for one) compute the edges of a split in
 * another order than the inside: the same product on 1 and on 2 threads
 * then differs in the last bits, and so would two runs that must be bitwise
 * equal (a pipeline stage against one device, a replay on a verifier). So
 * the output is cut into tiles by its shape alone, each tile is one
 * single-threaded sgemm, and the threads share the tiles. */
void ar_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc);

#endif
