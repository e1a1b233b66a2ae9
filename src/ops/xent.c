/* Softmax cross-entropy over the last dimension. */
#include "ops/ops.h"

#include "ops/ops_internal.h"

#include <math.h>
#include <stddef.h>

/* logits (N,V), targets (N) -> losses (N), probs (N,V); returns the mean loss.
 * Subtracting the row max keeps exp() finite; the loss is taken as
 * log(sum exp(x - max)) - (x_target - max) in double rather than -log(prob),
 * which would lose everything once a probability underflows in fp32. */
double ar_xent_forward(float *losses, float *probs, const float *logits, const int32_t *targets,
                       int N, int V)
{
    long total = (long)N * V;
#pragma omp parallel for if (total > AR_OPS_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;
        float *p = probs + (size_t)n * V;
        float mx = x[0];
        for (int i = 1; i < V; i++)
            mx = x[i] > mx ? x[i] : mx;
        for (int i = 0; i < V; i++)
            p[i] = ar_fast_expf(x[i] - mx);
        double sum = 0.0;
        for (int i = 0; i < V; i++)
            sum += p[i];
        float inv = (float)(1.0 / sum);
        for (int i = 0; i < V; i++)
            p[i] *= inv;
        losses[n] = (float)(log(sum) - ((double)x[targets[n]] - (double)mx));
    }
    /* The mean runs serially in a fixed order so it is bitwise reproducible. */
    double s = 0.0;
    for (int n = 0; n < N; n++)
        s += losses[n];
    return N > 0 ? s / N : 0.0;
}

/* dlogits (N,V) += scale * (probs - onehot(targets)) */
void ar_xent_backward(float *dlogits, const float *probs, const int32_t *targets, float scale,
                      int N, int V)
{
    long total = (long)N * V;
#pragma omp parallel for if (total > AR_OPS_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *p = probs + (size_t)n * V;
        float *d = dlogits + (size_t)n * V;
        int tgt = targets[n];
        for (int i = 0; i < V; i++) {
            float ind = i == tgt ? 1.0f : 0.0f;
            d[i] += scale * (p[i] - ind);
        }
    }
}
