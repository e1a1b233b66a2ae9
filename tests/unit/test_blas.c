/* ar_sgemm: against a double-precision product for every transpose, alpha
 * and beta and awkward shapes; bitwise the FMA chain blas.h defines (so any
 * kernel, blocking or thread count gives these bits); the same bits on 1
 * and on several threads; epilogues see every block once, with full rows
 * when asked. */
#include <criterion/criterion.h>

#include "core/blas.h"
#include "core/core.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define POOL_MAX 32
static void *pool[POOL_MAX];
static int pool_n;

static void pool_free(void)
{
    while (pool_n > 0)
        free(pool[--pool_n]);
}

TestSuite(blas, .fini = pool_free);

static float *buf(long n)
{
    cr_assert(pool_n < POOL_MAX);
    float *p = calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    cr_assert_not_null(p);
    pool[pool_n++] = p;
    return p;
}

static float *randn(long n, uint64_t seed)
{
    float *p = buf(n);
    ar_rng r;
    ar_rng_seed(&r, seed);
    for (long i = 0; i < n; i++)
        p[i] = ar_rng_normal(&r);
    return p;
}

static float at_a(int ta, const float *A, int lda, int i, int k)
{
    return ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
}

static float at_b(int tb, const float *B, int ldb, int k, int j)
{
    return tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
}

/* The definition: beta*C (0 / C itself for beta 0 / 1), then one fmaf per k
 * in order with alpha*a. */
static void chain_ref(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                      const float *B, int ldb, float beta, float *C, int ldc)
{
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float c = C[(size_t)i * ldc + j];
            float acc = beta == 0.0f ? 0.0f : beta == 1.0f ? c : beta * c;
            for (int k = 0; k < K; k++) {
                float a = at_a(ta, A, lda, i, k);
                if (alpha != 1.0f)
                    a = alpha * a;
                acc = fmaf(a, at_b(tb, B, ldb, k, j), acc);
            }
            C[(size_t)i * ldc + j] = acc;
        }
}

typedef struct {
    int M, N, K;
} shape;

enum { GUARD = 256 };

/* edges of every kind: fewer rows than a register block, columns just over
 * a panel, k over one packed chunk, the model's own shapes */
static const shape shapes[] = {{1, 1, 1},   {5, 3, 7},     {7, 65, 33},  {13, 64, 256}, {37, 129, 300},
                               {96, 96, 96}, {200, 70, 513}, {130, 256, 64}, {64, 1030, 20}, {2, 300, 600}};

static void check_shapes(void)
{
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int v = 0; v < 3; v++) {
                    int M = shapes[s].M, N = shapes[s].N, K = shapes[s].K;
                    float alpha = v == 2 ? 0.125f : 1.0f, beta = v == 0 ? 0.0f : v == 1 ? 1.0f : -0.5f;
                    int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
                    const float *A = randn((long)(ta ? K : M) * lda, 1 + s);
                    const float *B = randn((long)(tb ? N : K) * ldb, 100 + s);
                    /* GUARD floats after C: the vector kernels run outside ASan, so a write
                     * past C's last row would go unseen by it */
                    float *C = randn((long)M * ldc + GUARD, 200 + s), *R = buf((long)M * ldc);
                    float *C0 = buf((long)M * ldc + GUARD);
                    memcpy(C0, C, sizeof(float) * ((size_t)M * ldc + GUARD));
                    memcpy(R, C, sizeof(float) * M * ldc);
                    ar_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
                    chain_ref(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, R, ldc);
                    for (int i = 0; i < M; i++)
                        for (int j = 0; j < ldc; j++) {
                            size_t x = (size_t)i * ldc + j;
                            if (j >= N) {
                                cr_assert(C[x] == C0[x], "wrote outside C at (%d,%d)", i, j);
                                continue;
                            }
                            double d = beta * (double)C0[x];
                            for (int k = 0; k < K; k++)
                                d += (double)alpha * at_a(ta, A, lda, i, k) * at_b(tb, B, ldb, k, j);
                            cr_assert(fabs(C[x] - d) <= 1e-5 * (K + 1) * 4,
                                      "%dx%dx%d ta%d tb%d alpha %g beta %g: (%d,%d) %g vs %g", M, N, K, ta, tb,
                                      alpha, beta, i, j, C[x], d);
                            cr_assert(memcmp(&C[x], &R[x], sizeof(float)) == 0,
                                      "%dx%dx%d ta%d tb%d: (%d,%d) %.9g is not the FMA chain's %.9g (kernel %s)",
                                      M, N, K, ta, tb, i, j, C[x], R[x], ar_sgemm_kernel());
                        }
                    cr_assert(memcmp(C + (size_t)M * ldc, C0 + (size_t)M * ldc, sizeof(float) * GUARD) == 0,
                              "%dx%dx%d ta%d tb%d: wrote past C's last row", M, N, K, ta, tb);
                    pool_free();
                }
}

Test(blas, matches_a_double_product_and_the_fma_chain_exactly)
{
    check_shapes();
}

/* Each test runs in a process of its own, so the kernel is picked afresh. */
Test(blas, the_avx2_kernel_gives_the_same_bits)
{
    setenv("ARCEUS_SGEMM_KERNEL", "avx2", 1);
    check_shapes();
}

Test(blas, the_portable_kernel_gives_the_same_bits)
{
    setenv("ARCEUS_SGEMM_KERNEL", "portable", 1);
    cr_assert_str_eq(ar_sgemm_kernel(), "portable");
    check_shapes();
}

Test(blas, one_and_several_threads_give_the_same_bits)
{
    int M = 515, N = 300, K = 700;
    const float *A = randn((long)M * K, 7), *B = randn((long)K * N, 8);
    float *C1 = randn((long)M * N, 9), *C4 = buf((long)M * N);
    memcpy(C4, C1, sizeof(float) * M * N);
    omp_set_num_threads(1);
    ar_sgemm(0, 1, M, N, K, 1.0f, A, K, B, K, 1.0f, C1, N);
    omp_set_num_threads(4);
    ar_sgemm(0, 1, M, N, K, 1.0f, A, K, B, K, 1.0f, C4, N);
    cr_assert(memcmp(C1, C4, sizeof(float) * M * N) == 0);
}

typedef struct {
    int M, N;
    int *seen; /* per element: times an epilogue covered it */
    int *block_seen;
    int full_rows_ok;
} ep_check;

static void ep_fn(void *ctx, float *C, int ldc, int i0, int i1, int j0, int j1, int block)
{
    ep_check *e = ctx;
    (void)C;
    (void)ldc;
    if (j0 != 0 || j1 != e->N || i0 != ar_sgemm_block_row(e->M, block) || i1 != ar_sgemm_block_row(e->M, block + 1))
        e->full_rows_ok = 0;
#pragma omp critical
    {
        e->block_seen[block]++;
        for (int i = i0; i < i1; i++)
            for (int j = j0; j < j1; j++)
                e->seen[(size_t)i * e->N + j]++;
    }
}

Test(blas, a_full_row_epilogue_sees_each_block_once)
{
    int M = 2048, N = 256, K = 64;
    const float *A = randn((long)M * K, 1), *B = randn((long)K * N, 2);
    float *C = buf((long)M * N);
    int nb = ar_sgemm_blocks(M);
    cr_assert(nb >= 4 && nb % 4 == 0, "%d blocks", nb);
    ep_check e = {M, N, calloc((size_t)M * N, sizeof(int)), calloc((size_t)nb, sizeof(int)), 1};
    ar_gemm_epilogue ep = {.fn = ep_fn, .ctx = &e, .full_rows = 1};
    omp_set_num_threads(2);
    ar_sgemm_ex(0, 0, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N, &ep);
    int ok = e.full_rows_ok;
    for (long i = 0; i < (long)M * N; i++)
        ok &= e.seen[i] == 1;
    for (int b = 0; b < nb; b++)
        ok &= e.block_seen[b] == 1;
    free(e.seen);
    free(e.block_seen);
    cr_assert(ok, "an element or block was missed or seen twice, or a block was not whole rows");
}

Test(blas, row_sums_of_a_are_taken_once_in_k_order)
{
    /* N over one column slice (several tasks pack the same rows of A) */
    int M = 70, N = 1100, K = 600;
    for (int ta = 0; ta < 2; ta++) {
        const float *A = randn((long)M * K, 3 + ta), *B = randn((long)K * N, 4);
        float *C = buf((long)M * N), *sums = randn(M, 5), *want = buf(M);
        memcpy(want, sums, sizeof(float) * M);
        for (int i = 0; i < M; i++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++)
                acc += at_a(ta, A, ta ? M : K, i, k);
            want[i] += acc;
        }
        ar_gemm_epilogue ep = {.a_sums = sums};
        omp_set_num_threads(2);
        ar_sgemm_ex(ta, 0, M, N, K, 1.0f, A, ta ? M : K, B, N, 0.0f, C, N, &ep);
        cr_assert(memcmp(sums, want, sizeof(float) * M) == 0, "ta %d: row sums differ", ta);
    }
}
