/* Optimizers, matching torch.optim.AdamW and torch.optim.SGD step for step.
 * Both are element-wise, hence deterministic for any thread count. */
#include "ops/ops.h"

#include "core/core.h"
#include "ops/ops_internal.h"

#include <math.h>
#include <stddef.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* AdamW (decoupled weight decay):
 *   p *= 1 - lr*wd
 *   m  = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
 *   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
 * The bias corrections are computed in double, as PyTorch does with Python
 * floats, then used as fp32 scalars like torch's tensor kernels. */
typedef struct {
    float step_size, bc2_sqrt, omb1, omb2;
} adamw_consts;

static adamw_consts adamw_setup(float lr, float beta1, float beta2, int t)
{
    double bc1 = 1.0 - pow((double)beta1, (double)t);
    double bc2 = 1.0 - pow((double)beta2, (double)t);
    adamw_consts k = {(float)((double)lr / bc1), (float)sqrt(bc2), 1.0f - beta1, 1.0f - beta2};
    return k;
}

/* the update of elements [a, b): one pass, read once, written once */
static void adamw_range(float *restrict param, const float *restrict grad, float *restrict m,
                        float *restrict v, long a, long b, adamw_consts k, float beta1, float beta2,
                        float eps, float decay, float grad_scale)
{
#pragma omp simd
    for (long i = a; i < b; i++) {
        float g = grad[i] * grad_scale;
        float p = param[i] * decay;
        float mi = beta1 * m[i] + k.omb1 * g;
        float vi = beta2 * v[i] + k.omb2 * (g * g);
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / k.bc2_sqrt + eps;
        param[i] = p - k.step_size * (mi / denom);
    }
}

void ar_adamw_update(float *param, const float *grad, float *m, float *v, long n, float lr,
                     float beta1, float beta2, float eps, float weight_decay, int t,
                     float grad_scale)
{
    adamw_consts k = adamw_setup(lr, beta1, beta2, t);
    float decay = (float)(1.0 - (double)lr * (double)weight_decay);
    enum { CHUNK = 16384 };
    long chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long c = 0; c < chunks; c++) {
        long a = c * CHUNK, b = a + CHUNK < n ? a + CHUNK : n;
        adamw_range(param, grad, m, v, a, b, k, beta1, beta2, eps, decay, grad_scale);
    }
}

/* Every parameter of a stage in one parallel pass: the elements of all the
 * segments, end to end, are cut into one contiguous share per thread, so
 * the team is woken once per step rather than once per parameter. The
 * arithmetic of each element is ar_adamw_update's. */
void ar_adamw_update_multi(const ar_adamw_segment *segs, int nseg, float lr, float beta1, float beta2,
                           float eps, float weight_decay, int t, float grad_scale)
{
    adamw_consts k = adamw_setup(lr, beta1, beta2, t);
    float decay_wd = (float)(1.0 - (double)lr * (double)weight_decay);
    float decay_none = (float)(1.0 - (double)lr * 0.0);
    long total = 0;
    for (int i = 0; i < nseg; i++)
        total += segs[i].n;
#pragma omp parallel if (total > AR_OPS_PAR_MIN)
    {
        int nt = 1, id = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        long lo = total * id / nt, hi = total * (id + 1) / nt, base = 0;
        for (int i = 0; i < nseg && base < hi; base += segs[i].n, i++) {
            long a = lo > base ? lo - base : 0, b = hi - base < segs[i].n ? hi - base : segs[i].n;
            if (a < b)
                adamw_range(segs[i].param, segs[i].grad, segs[i].m, segs[i].v, a, b, k, beta1, beta2, eps,
                            segs[i].decay ? decay_wd : decay_none, grad_scale);
        }
    }
}

/* SGD with momentum (dampening 0, not Nesterov):
 *   g = grad_scale*grad + wd*p ; buf = momentum*buf + g (buf = g at t==1) ; p -= lr*buf
 * With momentum 0 or no buffer it is plain SGD, as torch skips the buffer. */
void ar_sgd_update(float *param, const float *grad, float *buf, long n, float lr, float momentum,
                   float weight_decay, int t, float grad_scale)
{
    int use_buf = buf != NULL && momentum != 0.0f;
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++) {
        float g = grad[i] * grad_scale;
        if (weight_decay != 0.0f)
            g += weight_decay * param[i];
        if (use_buf) {
            g = t <= 1 ? g : momentum * buf[i] + g;
            buf[i] = g;
        }
        param[i] -= lr * g;
    }
}

/* Sum of squares in double with a summation order fixed by the data alone:
 * fixed 4096-element chunks, each summed serially, the chunk sums then added
 * in index order. So the result is bitwise the same for any thread count,
 * and the gradient norm (hence clipping) is too. */
#define SS_CHUNK 4096L
#define SS_GROUP 256 /* chunks per parallel round; bounds the stack array */

static double chunk_sum_squares(const float *x, long n)
{
    /* four fixed lanes: shorter dependency chains, order still fixed */
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    long i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += (double)x[i] * x[i];
        s1 += (double)x[i + 1] * x[i + 1];
        s2 += (double)x[i + 2] * x[i + 2];
        s3 += (double)x[i + 3] * x[i + 3];
    }
    for (; i < n; i++)
        s0 += (double)x[i] * x[i];
    return (s0 + s1) + (s2 + s3);
}

double ar_sum_squares(const float *x, long n)
{
    if (n <= 0)
        return 0.0;
    long nchunks = (n + SS_CHUNK - 1) / SS_CHUNK;
    double total = 0.0;
    for (long g0 = 0; g0 < nchunks; g0 += SS_GROUP) {
        int gn = (int)(nchunks - g0 < SS_GROUP ? nchunks - g0 : SS_GROUP);
        double part[SS_GROUP];
#pragma omp parallel for if (gn > 1)
        for (int c = 0; c < gn; c++) {
            long start = (g0 + c) * SS_CHUNK;
            long len = n - start < SS_CHUNK ? n - start : SS_CHUNK;
            part[c] = chunk_sum_squares(x + start, len);
        }
        for (int c = 0; c < gn; c++)
            total += part[c];
    }
    return total;
}

/* The sums of squares of many arrays in one parallel pass (a stage's
 * gradients, for the clipping norm): every array is cut into the chunks
 * ar_sum_squares uses, all the chunks of all the arrays are shared by the
 * threads, and each array's chunk sums are then added in order, so out[i]
 * is bitwise ar_sum_squares(x[i], n[i]), one team wake-up for them all. */
int ar_sum_squares_multi(const float *const *x, const long *n, int count, double *out)
{
    long nchunks = 0;
    for (int i = 0; i < count; i++)
        nchunks += (n[i] + SS_CHUNK - 1) / SS_CHUNK;
    double *part = ar_calloc((size_t)(nchunks ? nchunks : 1), sizeof(double));
    long *first = ar_calloc((size_t)count + 1, sizeof(long));
    if (!part || !first) {
        ar_free(part);
        ar_free(first);
        return AR_ENOMEM;
    }
    for (int i = 0; i < count; i++)
        first[i + 1] = first[i] + (n[i] + SS_CHUNK - 1) / SS_CHUNK;
#pragma omp parallel if (nchunks > 1)
    {
        /* each thread walks the arrays, taking every chunk whose global index
         * falls in its share */
        int nt = 1, id = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        long lo = nchunks * id / nt, hi = nchunks * (id + 1) / nt;
        for (int i = 0; i < count; i++)
            for (long c = first[i] > lo ? first[i] : lo; c < first[i + 1] && c < hi; c++) {
                long start = (c - first[i]) * SS_CHUNK;
                long len = n[i] - start < SS_CHUNK ? n[i] - start : SS_CHUNK;
                part[c] = chunk_sum_squares(x[i] + start, len);
            }
    }
    for (int i = 0; i < count; i++) {
        double total = 0.0;
        for (long c = first[i]; c < first[i + 1]; c++)
            total += part[c];
        out[i] = total;
    }
    ar_free(part);
    ar_free(first);
    return AR_OK;
}
