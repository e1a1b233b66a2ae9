/* Optimizers, matching torch.optim.AdamW and torch.optim.SGD step for step.
 * Both are element-wise, hence deterministic for any thread count. */
#include "ops/ops.h"

#include "ops/ops_internal.h"

#include <math.h>
#include <stddef.h>

/* AdamW (decoupled weight decay):
 *   p *= 1 - lr*wd
 *   m  = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
 *   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
 * The bias corrections are computed in double, as PyTorch does with Python
 * floats, then used as fp32 scalars like torch's tensor kernels. */
void ar_adamw_update(float *param, const float *grad, float *m, float *v, long n, float lr,
                     float beta1, float beta2, float eps, float weight_decay, int t,
                     float grad_scale)
{
    double bc1 = 1.0 - pow((double)beta1, (double)t);
    double bc2 = 1.0 - pow((double)beta2, (double)t);
    float step_size = (float)((double)lr / bc1);
    float bc2_sqrt = (float)sqrt(bc2);
    float decay = (float)(1.0 - (double)lr * (double)weight_decay);
    float omb1 = 1.0f - beta1, omb2 = 1.0f - beta2;
#pragma omp parallel for if (n > AR_OPS_PAR_MIN)
    for (long i = 0; i < n; i++) {
        float g = grad[i] * grad_scale;
        float p = param[i] * decay;
        float mi = beta1 * m[i] + omb1 * g;
        float vi = beta2 * v[i] + omb2 * (g * g);
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        param[i] = p - step_size * (mi / denom);
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
