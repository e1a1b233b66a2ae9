#include "blas.h"

#include <stddef.h>

void ar_blas_set_threads(int n)
{
#ifdef __APPLE__
    (void)n; /* Accelerate manages its own threads */
#else
    openblas_set_num_threads(n);
#endif
}

/* A tile's work at least (FLOPs): smaller products are not worth a split. */
#define TILE_MIN_FLOPS (8.0 * 1024 * 1024)
/* At most this many tiles: enough to keep 16 cores busy, few enough that a
 * tile's operand packing stays small against its arithmetic. */
#define MAX_TILES 16

void ar_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc)
{
    if (M <= 0 || N <= 0)
        return;
    /* How many tiles, from the shape only. The split is along the longer side
     * of C, so the operand that every tile packs again is the smaller one. */
    double flops = 2.0 * M * N * (K > 0 ? K : 1);
    int tiles = (int)(flops / TILE_MIN_FLOPS);
    if (tiles > MAX_TILES)
        tiles = MAX_TILES;
    int split_rows = M >= N;
    int side = split_rows ? M : N;
    if (tiles > side)
        tiles = side;
    if (tiles < 1)
        tiles = 1;
    int step = (side + tiles - 1) / tiles;
    tiles = (side + step - 1) / step;
    /* Inside an active parallel region OpenBLAS (the OpenMP build) runs each
     * call on the calling thread alone; with one thread in all, so does the
     * region. The tiles are the same whoever computes them. */
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        int begin = t * step, len = side - begin < step ? side - begin : step;
        const float *a = A, *b = B;
        float *c;
        int m = M, n = N;
        if (split_rows) {
            m = len;
            a = trans_a ? A + begin : A + (size_t)begin * lda;
            c = C + (size_t)begin * ldc;
        } else {
            n = len;
            b = trans_b ? B + (size_t)begin * ldb : B + begin;
            c = C + begin;
        }
        cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n,
                    K, alpha, a, lda, b, ldb, beta, c, ldc);
    }
}
