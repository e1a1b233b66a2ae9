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

/* A tile's work at least (FLOPs): every tile packs the shared operand again,
 * so smaller tiles cost more copying than their parallelism gains. With
 * these settings the MLP and gpt-5m train as fast as with OpenBLAS's own
 * threads (1,000-step A/B runs on 2 cores). */
#define TILE_MIN_FLOPS (32.0 * 1024 * 1024)
/* Tiles cover a multiple of this many rows or columns: the micro-kernels'
 * blocks, so a tile's edge is not a sliver. */
#define TILE_ALIGN 16
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
    /* a power of two, so that the tiles share out evenly over 2, 4, 8 or
     * 16 threads (3 tiles on 2 threads take as long as 4) */
    int tiles = 1;
    while (tiles * 2 <= MAX_TILES && tiles * 2 * TILE_MIN_FLOPS <= flops)
        tiles *= 2;
    int split_rows = M >= N;
    int side = split_rows ? M : N;
    if (tiles > side)
        tiles = side;
    if (tiles < 1)
        tiles = 1;
    int step = (side + tiles - 1) / tiles;
    step = (step + TILE_ALIGN - 1) / TILE_ALIGN * TILE_ALIGN;
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
