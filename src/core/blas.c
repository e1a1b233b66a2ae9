/* The engine's sgemm (blas.h): packed panels, a register-blocked FMA
 * micro-kernel, the threads over blocks of C.
 *
 * Layout (the usual one of BLIS-style products):
 *   - op(B) is packed once per call, by all threads, into micro-panels of NR
 *     columns: for each chunk of KC rows of op(B), for each NR columns, the
 *     chunk's rows one after another (NR floats each, zero-padded past N);
 *   - each task (a block of rows of C times a slice of its columns) packs its
 *     rows of alpha*op(A), KC at a time, into micro-panels of MR rows (MR
 *     floats per k, zero-padded past M), then for each NR-wide micro-panel of
 *     B runs the micro-kernel over the MR-row panels: the B micro-panel stays
 *     in the first-level cache while the A block streams from the second;
 *   - the micro-kernel keeps an MR x NR block of C in registers: it starts
 *     from beta*C (or C, for every KC chunk after the first), adds
 *     a[i][k] * b[k][j] for the chunk's k in order with one FMA each, and
 *     stores the block back.
 * So an element's value is the same FMA chain whatever the blocking, thread
 * count or kernel: the kernels only differ in how many elements they chain
 * at once.
 *
 * Measured on the bench machine (one core of a 2-core AMD EPYC with
 * AVX-512, thread CPU time; OpenBLAS 0.3.21 in the same program): the
 * products of gpt-5m's training step run at 160-195 GFLOP/s, against
 * 100-108 GFLOP/s for OpenBLAS with the Haswell kernels this machine's
 * environment selects (OPENBLAS_CORETYPE=Haswell) and 180-205 GFLOP/s with
 * its AVX-512 (SkylakeX) kernels. */
#include "blas.h"

#include "core.h"

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AR_X86 1
#endif

#define MR AR_GEMM_MR /* rows of the register block */
#define NR AR_GEMM_NR /* columns of the register block (4 AVX-512 vectors) */
#ifndef KC
#define KC 256        /* k per packed chunk: a B micro-panel is KC x NR */
#endif
#ifndef MC
#define MC 96         /* target rows per block of C */
#endif
#define NC_MAX 1024   /* widest column slice (wider products are cut) */
/* Below this much arithmetic a product stays on one thread: waking the team
 * costs microseconds. */
#define PAR_MIN_FLOPS (4.0 * 1024 * 1024)

/* ---- per-thread packing buffers -------------------------------------------
 * A thread keeps its buffers between calls (a training step makes hundreds
 * of products of the same few shapes); they are freed when it exits. */

enum { BUF_A, BUF_B, NBUFS };

typedef struct {
    float *p[NBUFS];
    size_t n[NBUFS];
} pack_bufs;

static pthread_key_t bufs_key;
static pthread_once_t bufs_once = PTHREAD_ONCE_INIT;

static void bufs_free(void *v)
{
    pack_bufs *b = v;
    for (int i = 0; i < NBUFS; i++)
        free(b->p[i]);
    free(b);
}

static void bufs_init(void)
{
    (void)pthread_key_create(&bufs_key, bufs_free);
}

/* The calling thread's buffer `which`, at least n floats, 64-byte aligned;
 * NULL if memory ran out. */
static float *thread_buf(int which, size_t n)
{
    pthread_once(&bufs_once, bufs_init);
    pack_bufs *b = pthread_getspecific(bufs_key);
    if (!b) {
        b = calloc(1, sizeof *b);
        if (!b || pthread_setspecific(bufs_key, b) != 0) {
            free(b);
            return NULL;
        }
    }
    if (b->n[which] < n) {
        free(b->p[which]);
        size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
        b->p[which] = aligned_alloc(64, bytes);
        b->n[which] = b->p[which] ? n : 0;
    }
    return b->p[which];
}

/* ---- micro-kernels --------------------------------------------------------
 * c (m x n valid of MR x NR, row stride ldc) = init + sum_k a[k][i] b[k][j],
 * a: kc x MR packed, b: kc x NR packed. init: 0 (mode 0), c (mode 1),
 * beta * c (mode 2). */

enum { INIT_ZERO, INIT_LOAD, INIT_SCALE };

static void kernel_portable(int kc, const float *a, const float *b, float *c, int ldc, int mode,
                            float beta, int m, int n)
{
    float acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            acc[i][j] = 0.0f;
    if (mode != INIT_ZERO)
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                acc[i][j] = mode == INIT_SCALE ? beta * c[(size_t)i * ldc + j] : c[(size_t)i * ldc + j];
    for (int k = 0; k < kc; k++)
        for (int i = 0; i < MR; i++) {
            float av = a[k * MR + i];
            for (int j = 0; j < NR; j++)
                acc[i][j] = fmaf(av, b[k * NR + j], acc[i][j]);
        }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
            c[(size_t)i * ldc + j] = acc[i][j];
}

#ifdef AR_X86
#define NV512 (NR / 16)

/* The vector kernels are left out of the sanitizers' instrumentation: with
 * ASan, their accumulator arrays live in instrumented stack memory instead of
 * registers and every product runs about twenty times slower, too slow for
 * the sanitized end-to-end tests to train anything. They read only the packed
 * panels (sized and written by instrumented code, above) and the rows of A
 * and C the caller's m, n, k and strides name, and write only C's m x n
 * block; tests/unit/test_blas.c checks guard words around C and every
 * element against a reference. UBSan is left out for the same reason: its
 * bounds and overflow checks on the fixed MR x NR loops also keep the
 * accumulators out of registers. */
#define KERNEL_UNINSTRUMENTED __attribute__((no_sanitize("address", "undefined")))

KERNEL_UNINSTRUMENTED __attribute__((target("avx512f"))) static void
kernel_avx512(int kc, const float *a, const float *b, float *c, int ldc, int mode, float beta, int m, int n)
{
    __m512 acc[MR][NV512];
    __mmask16 mask[NV512];
    for (int v = 0; v < NV512; v++) {
        int r = n - 16 * v;
        mask[v] = r >= 16 ? (__mmask16)0xFFFF : r <= 0 ? (__mmask16)0 : (__mmask16)((1u << r) - 1);
    }
    __m512 vbeta = _mm512_set1_ps(beta);
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV512; v++) {
            __m512 x = _mm512_setzero_ps();
            if (mode != INIT_ZERO && i < m) {
                /* masked: never reads past the row's end */
                x = _mm512_maskz_loadu_ps(mask[v], c + (size_t)i * ldc + 16 * v);
                if (mode == INIT_SCALE)
                    x = _mm512_mul_ps(vbeta, x);
            }
            acc[i][v] = x;
        }
#pragma GCC unroll 2
    for (int k = 0; k < kc; k++) {
        __m512 bv[NV512];
        for (int v = 0; v < NV512; v++)
            bv[v] = _mm512_load_ps(b + (size_t)k * NR + 16 * v);
        for (int i = 0; i < MR; i++) {
            __m512 av = _mm512_set1_ps(a[(size_t)k * MR + i]);
            for (int v = 0; v < NV512; v++)
                acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
        }
    }
    for (int i = 0; i < MR; i++)
        if (i < m)
            for (int v = 0; v < NV512; v++)
                _mm512_mask_storeu_ps(c + (size_t)i * ldc + 16 * v, mask[v], acc[i][v]);
}

/* The same, reading A where it lies (rows of a row-major A, lda apart,
 * contiguous in k) instead of from a packed panel: the products whose A is
 * not transposed skip packing it. Rows past m read row 0 (and are not
 * stored). */
KERNEL_UNINSTRUMENTED __attribute__((target("avx512f"))) static void
kernel_avx512_direct(int kc, const float *a, int lda, const float *b, float *c, int ldc, int mode, float beta,
                     int m, int n)
{
    __m512 acc[MR][NV512];
    __mmask16 mask[NV512];
    const float *ar[MR];
    for (int i = 0; i < MR; i++)
        ar[i] = a + (size_t)(i < m ? i : 0) * lda;
    for (int v = 0; v < NV512; v++) {
        int r = n - 16 * v;
        mask[v] = r >= 16 ? (__mmask16)0xFFFF : r <= 0 ? (__mmask16)0 : (__mmask16)((1u << r) - 1);
    }
    __m512 vbeta = _mm512_set1_ps(beta);
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV512; v++) {
            __m512 x = _mm512_setzero_ps();
            if (mode != INIT_ZERO && i < m) {
                x = _mm512_maskz_loadu_ps(mask[v], c + (size_t)i * ldc + 16 * v);
                if (mode == INIT_SCALE)
                    x = _mm512_mul_ps(vbeta, x);
            }
            acc[i][v] = x;
        }
#pragma GCC unroll 2
    for (int k = 0; k < kc; k++) {
        __m512 bv[NV512];
        for (int v = 0; v < NV512; v++)
            bv[v] = _mm512_load_ps(b + (size_t)k * NR + 16 * v);
        for (int i = 0; i < MR; i++) {
            __m512 av = _mm512_set1_ps(ar[i][k]);
            for (int v = 0; v < NV512; v++)
                acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
        }
    }
    for (int i = 0; i < MR; i++)
        if (i < m)
            for (int v = 0; v < NV512; v++)
                _mm512_mask_storeu_ps(c + (size_t)i * ldc + 16 * v, mask[v], acc[i][v]);
}

/* AVX2: 8-wide vectors, so the MR x NR block is done as two halves of 32
 * columns (6 x 4 accumulators each, within the 16 registers). */
KERNEL_UNINSTRUMENTED __attribute__((target("avx2,fma"))) static void
kernel_avx2_half(int kc, const float *a, const float *b, float *c, int ldc, int mode, float beta, int m, int n)
{
    __m256 acc[MR][4];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 4; v++)
            acc[i][v] = _mm256_setzero_ps();
    if (mode != INIT_ZERO) {
        float tmp[8];
        for (int i = 0; i < m; i++)
            for (int v = 0; v < 4; v++) {
                for (int j = 0; j < 8; j++) {
                    int col = 8 * v + j;
                    float x = col < n ? c[(size_t)i * ldc + col] : 0.0f;
                    tmp[j] = mode == INIT_SCALE ? beta * x : x;
                }
                acc[i][v] = _mm256_loadu_ps(tmp);
            }
    }
    for (int k = 0; k < kc; k++) {
        __m256 bv[4];
        for (int v = 0; v < 4; v++)
            bv[v] = _mm256_loadu_ps(b + (size_t)k * NR + 8 * v);
        for (int i = 0; i < MR; i++) {
            __m256 av = _mm256_set1_ps(a[(size_t)k * MR + i]);
            for (int v = 0; v < 4; v++)
                acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
        }
    }
    float tmp[8];
    for (int i = 0; i < m; i++)
        for (int v = 0; v < 4; v++) {
            _mm256_storeu_ps(tmp, acc[i][v]);
            for (int j = 0; j < 8 && 8 * v + j < n; j++)
                c[(size_t)i * ldc + 8 * v + j] = tmp[j];
        }
}

static void kernel_avx2(int kc, const float *a, const float *b, float *c, int ldc, int mode, float beta,
                        int m, int n)
{
    kernel_avx2_half(kc, a, b, c, ldc, mode, beta, m, n < 32 ? n : 32);
    if (n > 32)
        kernel_avx2_half(kc, a, b + 32, c + 32, ldc, mode, beta, m, n - 32);
}
#endif

typedef void (*kernel_fn)(int, const float *, const float *, float *, int, int, float, int, int);
typedef void (*direct_fn)(int, const float *, int, const float *, float *, int, int, float, int, int);

static kernel_fn kernel;
static direct_fn kernel_direct; /* NULL: A is always packed */
static const char *kernel_name;
static pthread_once_t kernel_once = PTHREAD_ONCE_INIT;

/* The widest kernel the CPU runs; $ARCEUS_SGEMM_KERNEL may name a narrower
 * one (the tests check that every kernel gives the same bits). */
static void kernel_pick(void)
{
    const char *want = getenv("ARCEUS_SGEMM_KERNEL");
    kernel = kernel_portable;
    kernel_name = "portable";
    if (want && strcmp(want, "portable") == 0)
        return;
#ifdef AR_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (__builtin_cpu_supports("avx512f") && !(want && strcmp(want, "avx2") == 0)) {
        kernel = kernel_avx512;
        kernel_direct = kernel_avx512_direct;
        kernel_name = "avx512";
    } else if (avx2) {
        kernel = kernel_avx2;
        kernel_name = "avx2";
    }
#endif
}

const char *ar_sgemm_kernel(void)
{
    pthread_once(&kernel_once, kernel_pick);
    return kernel_name;
}

/* ---- packing ------------------------------------------------------------ */

static void pack_a(int ta, const float *A, int lda, float alpha, int i0, int mc, int p0, int kc, float *dst);

/* rows [i0, i0+mc) of alpha*op(A), k in [p0, p0+kc), into MR-row panels;
 * sums (NULL: none) gets each row's values added, in k order */
static void pack_a_sum(int ta, const float *A, int lda, float alpha, int i0, int mc, int p0, int kc, float *dst,
                       float *sums)
{
    if (sums) {
        if (!ta)
            for (int i = 0; i < mc; i++) {
                const float *s = A + (size_t)(i0 + i) * lda + p0;
                float acc = sums[i];
                for (int k = 0; k < kc; k++)
                    acc += s[k];
                sums[i] = acc;
            }
        else
            for (int k = 0; k < kc; k++) {
                const float *s = A + (size_t)(p0 + k) * lda + i0;
                for (int i = 0; i < mc; i++)
                    sums[i] += s[i];
            }
    }
    pack_a(ta, A, lda, alpha, i0, mc, p0, kc, dst);
}

static void pack_a(int ta, const float *A, int lda, float alpha, int i0, int mc, int p0, int kc, float *dst)
{
    if (!ta) {
        /* A (M,K): each row is contiguous in k */
        for (int ir = 0; ir < mc; ir += MR) {
            int mr = mc - ir < MR ? mc - ir : MR;
            float *d = dst + (size_t)ir * kc;
            for (int i = 0; i < mr; i++) {
                const float *s = A + (size_t)(i0 + ir + i) * lda + p0;
                if (alpha == 1.0f)
                    for (int k = 0; k < kc; k++)
                        d[k * MR + i] = s[k];
                else
                    for (int k = 0; k < kc; k++)
                        d[k * MR + i] = alpha * s[k];
            }
            for (int i = mr; i < MR; i++)
                for (int k = 0; k < kc; k++)
                    d[k * MR + i] = 0.0f;
        }
    } else {
        /* A (K,M): each k is a contiguous run of rows */
        for (int k = 0; k < kc; k++) {
            const float *s = A + (size_t)(p0 + k) * lda + i0;
            for (int ir = 0; ir < mc; ir += MR) {
                int mr = mc - ir < MR ? mc - ir : MR;
                float *d = dst + (size_t)ir * kc + (size_t)k * MR;
                int i = 0;
                if (alpha == 1.0f)
                    for (; i < mr; i++)
                        d[i] = s[ir + i];
                else
                    for (; i < mr; i++)
                        d[i] = alpha * s[ir + i];
                for (; i < MR; i++)
                    d[i] = 0.0f;
            }
        }
    }
}

/* the NR columns from j0 (nr of them valid) of op(B), k in [p0, p0+kc) */
static void pack_b(int tb, const float *B, int ldb, int j0, int nr, int p0, int kc, float *d)
{
    if (!tb) {
        /* B (K,N): each k is a contiguous run of columns */
        for (int k = 0; k < kc; k++) {
            const float *s = B + (size_t)(p0 + k) * ldb + j0;
            float *dk = d + (size_t)k * NR;
            int j = 0;
            for (; j < nr; j++)
                dk[j] = s[j];
            for (; j < NR; j++)
                dk[j] = 0.0f;
        }
    } else {
        /* B (N,K): each column is contiguous in k. 16 k at a time, so the
         * rows of the panel being written stay in the first-level cache. */
        for (int k0 = 0; k0 < kc; k0 += 16) {
            int k1 = k0 + 16 < kc ? k0 + 16 : kc;
            for (int j = 0; j < nr; j++) {
                const float *s = B + (size_t)(j0 + j) * ldb + p0;
                for (int k = k0; k < k1; k++)
                    d[(size_t)k * NR + j] = s[k];
            }
            for (int j = nr; j < NR; j++)
                for (int k = k0; k < k1; k++)
                    d[(size_t)k * NR + j] = 0.0f;
        }
    }
}

void ar_gemm_pack_a(int trans_a, const float *A, int lda, float alpha, int i0, int m, int p0, int kc,
                    float *dst)
{
    pack_a(trans_a, A, lda, alpha, i0, m, p0, kc, dst);
}

void ar_gemm_pack_b(int trans_b, const float *B, int ldb, int j0, int n, int p0, int kc, float *dst)
{
    for (int jr = 0; jr < n; jr += NR)
        pack_b(trans_b, B, ldb, j0 + jr, n - jr < NR ? n - jr : NR, p0, kc, dst + (size_t)jr * kc);
}

void ar_gemm_block(int kc, const float *a, const float *b, float *C, int ldc, float beta, int m, int n)
{
    pthread_once(&kernel_once, kernel_pick);
    int mode = beta == 0.0f ? INIT_ZERO : beta == 1.0f ? INIT_LOAD : INIT_SCALE;
    kernel(kc, a, b, C, ldc, mode, beta, m, n);
}

/* ---- blocks --------------------------------------------------------------- */

/* Row blocks: about MC rows each, a multiple of 4 of them where the rows
 * allow (so they share out evenly over 2 or 4 threads), boundaries on MR.
 * A function of M alone. */
int ar_sgemm_blocks(int M)
{
    if (M <= 0)
        return 0;
    int panels = (M + MR - 1) / MR;
    int nb = (M + MC - 1) / MC;
    nb = (nb + 3) / 4 * 4;
    if (nb > panels)
        nb = panels;
    return nb;
}

int ar_sgemm_block_row(int M, int b)
{
    int nb = ar_sgemm_blocks(M);
    if (b >= nb)
        return M;
    int panels = (M + MR - 1) / MR;
    return (int)((long)b * panels / nb) * MR;
}

typedef struct {
    int ta, M, N, K;
    float alpha, beta;
    const float *A;
    int lda;
    const float *pb; /* packed op(B) */
    int npad;        /* N rounded up to NR */
    float *C;
    int ldc;
    int nrb, ncs, slice; /* row blocks, column slices, columns per slice */
    const ar_gemm_epilogue *ep;
} gemm_job;

static void run_task(const gemm_job *g, int task, float *abuf)
{
    int rb = task % g->nrb, cs = task / g->nrb;
    int i0 = ar_sgemm_block_row(g->M, rb), i1 = ar_sgemm_block_row(g->M, rb + 1);
    int j0 = cs * g->slice, j1 = j0 + g->slice < g->N ? j0 + g->slice : g->N;
    int mc = i1 - i0;
    if (mc <= 0 || j1 <= j0)
        return;
    /* the row sums of op(A), by the first column slice's tasks only */
    float sums[MC + 2 * MR];
    float *a_sums = g->ep && g->ep->a_sums && cs == 0 ? sums : NULL;
    if (a_sums)
        for (int i = 0; i < mc; i++)
            sums[i] = 0.0f;
    /* A's rows as they lie when they are contiguous in k and unscaled */
    int direct = kernel_direct && !g->ta && g->alpha == 1.0f && !a_sums;
    for (int p0 = 0; p0 < g->K; p0 += KC) {
        int kc = g->K - p0 < KC ? g->K - p0 : KC;
        int mode = p0 > 0 ? INIT_LOAD : g->beta == 0.0f ? INIT_ZERO : g->beta == 1.0f ? INIT_LOAD : INIT_SCALE;
        if (!direct)
            pack_a_sum(g->ta, g->A, g->lda, g->alpha, i0, mc, p0, kc, abuf, a_sums);
        const float *bchunk = g->pb + (size_t)p0 * g->npad;
        for (int jr = j0; jr < j1; jr += NR) {
            const float *bp = bchunk + (size_t)jr * kc;
            int n = j1 - jr < NR ? j1 - jr : NR;
            for (int ir = 0; ir < mc; ir += MR) {
                float *c = g->C + (size_t)(i0 + ir) * g->ldc + jr;
                int m = mc - ir < MR ? mc - ir : MR;
                if (direct)
                    kernel_direct(kc, g->A + (size_t)(i0 + ir) * g->lda + p0, g->lda, bp, c, g->ldc, mode, g->beta,
                                  m, n);
                else
                    kernel(kc, abuf + (size_t)ir * kc, bp, c, g->ldc, mode, g->beta, m, n);
            }
        }
    }
    if (a_sums)
        for (int i = 0; i < mc; i++)
            g->ep->a_sums[i0 + i] += sums[i];
    if (g->ep && g->ep->fn)
        g->ep->fn(g->ep->ctx, g->C, g->ldc, i0, i1, j0, j1, task);
}

/* Without memory for a packing buffer (a few MB, kept per thread): a task's
 * block by the same FMA chains, element by element. Slow, but the same bits,
 * so a process short of memory computes what any other does. */
static void run_task_unpacked(const gemm_job *g, int task, const float *B, int ldb, int tb)
{
    int rb = task % g->nrb, cs = task / g->nrb;
    int i0 = ar_sgemm_block_row(g->M, rb), i1 = ar_sgemm_block_row(g->M, rb + 1);
    int j0 = cs * g->slice, j1 = j0 + g->slice < g->N ? j0 + g->slice : g->N;
    float *sums = g->ep && cs == 0 ? g->ep->a_sums : NULL;
    for (int i = i0; i < i1; i++) {
        for (int j = j0; j < j1; j++) {
            float *c = g->C + (size_t)i * g->ldc + j;
            float acc = g->beta == 0.0f ? 0.0f : g->beta == 1.0f ? *c : g->beta * *c;
            for (int k = 0; k < g->K; k++) {
                float a = g->ta ? g->A[(size_t)k * g->lda + i] : g->A[(size_t)i * g->lda + k];
                if (g->alpha != 1.0f)
                    a = g->alpha * a;
                acc = fmaf(a, tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j], acc);
            }
            *c = acc;
        }
        if (sums) {
            float acc = 0.0f;
            for (int k = 0; k < g->K; k++)
                acc += g->ta ? g->A[(size_t)k * g->lda + i] : g->A[(size_t)i * g->lda + k];
            sums[i] += acc;
        }
    }
    if (g->ep && g->ep->fn && i0 < i1 && j0 < j1)
        g->ep->fn(g->ep->ctx, g->C, g->ldc, i0, i1, j0, j1, task);
}

/* K == 0: C = beta C (as BLAS), then the epilogue */
static void scale_only(int M, int N, float beta, float *C, int ldc, const ar_gemm_epilogue *ep)
{
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++)
            C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
    if (!ep || !ep->fn)
        return;
    int nb = ar_sgemm_blocks(M);
    for (int b = 0; b < nb; b++)
        ep->fn(ep->ctx, C, ldc, ar_sgemm_block_row(M, b), ar_sgemm_block_row(M, b + 1), 0, N, b);
}

void ar_sgemm_ex(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc, const ar_gemm_epilogue *ep)
{
    if (M <= 0 || N <= 0)
        return;
    if (K <= 0) {
        scale_only(M, N, beta, C, ldc, ep);
        return;
    }
    pthread_once(&kernel_once, kernel_pick);
    gemm_job g = {.ta = trans_a, .M = M, .N = N, .K = K, .alpha = alpha, .beta = beta, .A = A, .lda = lda,
                  .C = C, .ldc = ldc, .ep = ep};
    g.npad = (N + NR - 1) / NR * NR;
    g.nrb = ar_sgemm_blocks(M);
    g.ncs = ep && ep->full_rows ? 1 : (g.npad + NC_MAX - 1) / NC_MAX;
    g.slice = (g.npad / NR + g.ncs - 1) / g.ncs * NR;
    int tasks = g.nrb * g.ncs;

    int threads = 1;
#ifdef _OPENMP
    if (!omp_in_parallel() && 2.0 * M * N * K >= PAR_MIN_FLOPS)
        threads = omp_get_max_threads();
    if (threads > tasks)
        threads = tasks;
#endif
    int npanels = g.npad / NR;
    int nchunks = (K + KC - 1) / KC;
    float *pb = thread_buf(BUF_B, (size_t)g.npad * K);
    g.pb = pb;
    if (!pb) {
        ar_log(AR_LOG_WARN, "ar_sgemm: no memory to pack %d x %d, computing unpacked", K, N);
        for (int t = 0; t < tasks; t++)
            run_task_unpacked(&g, t, B, ldb, trans_b);
        return;
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int t = 0; t < nchunks * npanels; t++) {
            int p0 = t / npanels * KC, jr = t % npanels * NR;
            int kc = K - p0 < KC ? K - p0 : KC;
            pack_b(trans_b, B, ldb, jr, N - jr < NR ? N - jr : NR, p0, kc, pb + (size_t)p0 * g.npad + (size_t)jr * kc);
        }
        float *abuf = thread_buf(BUF_A, (size_t)(MC + 2 * MR) * KC * 2);
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; t++) {
            if (abuf)
                run_task(&g, t, abuf);
            else
                run_task_unpacked(&g, t, B, ldb, trans_b);
        }
    }
}

void ar_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc)
{
    ar_sgemm_ex(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL);
}
