/* Operators: forward and backward side by side (llm.c's habit).
 *
 * Conventions:
 *   - plain fp32 arrays, row-major, shapes in the comment of each function;
 *   - every backward ACCUMULATES (+=) into the input gradient and into the
 *     parameter gradients, so residual branches and micro-batches add up; the
 *     caller zeroes the buffers when a new sum starts. The fused layers'
 *     input gradients say where they OVERWRITE instead (fresh scratch needs
 *     no zeroing); parameter gradients always accumulate;
 *   - linear weights use PyTorch's nn.Linear layout (out_features, in_features),
 *     so checkpoints map one-to-one onto a PyTorch state_dict;
 *   - element-wise loops run on the OpenMP pool that the products also use.
 */
#ifndef AR_OPS_H
#define AR_OPS_H

#include <stdint.h>

/* ---- linear: y = x W^T + b ---------------------------------------------
 * inp (N,IN), weight (OUT,IN), bias (OUT) or NULL -> out (N,OUT)          */
void ar_linear_forward(float *out, const float *inp, const float *weight, const float *bias,
                       int N, int IN, int OUT);
/* dout (N,OUT) -> dinp (N,IN) (may be NULL), dweight (OUT,IN), dbias (OUT) or NULL */
void ar_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, int N, int IN, int OUT);

/* ---- fused linear layers ----------------------------------------------------
 * What follows a product done on each block of its output while the block
 * is in cache (the product's epilogue), instead of in passes of their own.
 * All return AR_OK, or AR_ENOMEM (a few KB of per-block partial sums).
 *
 * GELU: pre (N,OUT) = inp W^T + bias, out (N,OUT) = gelu(pre).            */
int ar_linear_gelu_forward(float *pre, float *out, const float *inp, const float *weight,
                           const float *bias, int N, int IN, int OUT);
/* Residual: out (N,OUT) = resid + dropout(inp W^T + bias), the dropout as
 * ar_dropout_forward on (N,OUT) with drop_p and drop_seed (drop_p 0: none);
 * then, if ln is not NULL, ln (N,OUT) = LayerNorm(out) with ln_w and ln_b,
 * saving mean (N) and rstd (N), as ar_layernorm_forward.                  */
int ar_linear_residual_forward(float *out, const float *resid, const float *inp, const float *weight,
                               const float *bias, int N, int IN, int OUT, float drop_p,
                               uint64_t drop_seed, float *ln, float *mean, float *rstd,
                               const float *ln_w, const float *ln_b);
/* The input gradient through a GELU: dpre (N,IN) = (dout W) * gelu'(pre),
 * OVERWRITTEN (dout (N,OUT), W (OUT,IN), pre (N,IN)); dpre_bias (IN, may be
 * NULL) += the column sums of dpre: the bias gradient of the layer whose
 * output pre is.                                                          */
int ar_linear_backward_gelu(float *dpre, float *dpre_bias, const float *dout, const float *weight,
                            const float *pre, int N, int IN, int OUT);
/* The input gradient through a LayerNorm: g (N,IN) = dout W is the gradient
 * of the output of a LayerNorm of x (N,IN) (weight ln_w, saved mean, rstd);
 *   dx = (accumulate ? dx : 0) + resid_grad (may be NULL) + LayerNorm'(g)
 * and ln_wgrad, ln_bgrad (IN, may be NULL) +=. g is a buffer for the
 * product (N*IN floats); NULL when not accumulating lets it live in dx.  */
int ar_linear_backward_layernorm(float *dx, int accumulate, const float *resid_grad, float *ln_wgrad,
                                 float *ln_bgrad, float *g, const float *dout, const float *weight,
                                 const float *x, const float *ln_w, const float *mean,
                                 const float *rstd, int N, int IN, int OUT);

/* dinp (N,IN) = (accumulate ? dinp : 0) + dout W: a linear layer's input
 * gradient alone (the weight gradient: ar_linear_backward with dinp NULL) */
void ar_linear_backward_input(float *dinp, int accumulate, const float *dout, const float *weight, int N,
                              int IN, int OUT);

/* ---- ReLU: inp (n) -> out (n); backward uses the forward output --------- */
void ar_relu_forward(float *out, const float *inp, long n);
void ar_relu_backward(float *dinp, const float *out, const float *dout, long n);

/* ---- GELU, tanh approximation (PyTorch approximate='tanh') -------------- */
void ar_gelu_forward(float *out, const float *inp, long n);
void ar_gelu_backward(float *dinp, const float *inp, const float *dout, long n);

/* ---- LayerNorm over the last dimension, eps 1e-5 -------------------------
 * inp (N,C), weight (C), bias (C) -> out (N,C); saves mean (N), rstd (N)   */
void ar_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                          const float *weight, const float *bias, int N, int C);
void ar_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                           const float *inp, const float *weight, const float *mean,
                           const float *rstd, int N, int C);

/* ---- token + position embedding ------------------------------------------
 * tokens (B,T) int32, wte (V,C), wpe (maxT,C) -> out (B,T,C)
 * Tokens must already be validated to lie in [0,V).                       */
void ar_embedding_forward(float *out, const int32_t *tokens, const float *wte, const float *wpe,
                          int B, int T, int C);
/* dout (B,T,C) -> dwte (V,C), dwpe (maxT,C) (either may be NULL) */
void ar_embedding_backward(float *dwte, float *dwpe, const float *dout, const int32_t *tokens,
                           int B, int T, int C);

/* ---- causal multi-head self-attention ------------------------------------
 * qkv (B,T,3*NH*HS): per token the queries of the NH heads, then their keys,
 * then their values (head h at columns h*HS..h*HS+HS-1 of each block).
 * NH is the number of heads THIS call computes: with tensor parallelism a
 * device passes the qkv of its own heads only and gets their outputs.
 * -> out (B,T,NH*HS); saves att (B,NH,T,T), the softmax probabilities
 * (entries above the diagonal are zero). Scale 1/sqrt(HS).               */
int ar_attention_forward(float *out, float *att, const float *qkv, int B, int T, int NH, int HS);
/* dout (B,T,NH*HS) -> dqkv (B,T,3*NH*HS). scratch needs B*NH*T*T floats.
 * Both return AR_OK, or AR_ENOMEM when a few hundred KB of packing space
 * per thread could not be had.                                           */
int ar_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                           const float *att, int B, int T, int NH, int HS);
/* The same, with accumulate 0: dqkv is overwritten (needs no zeroing). */
int ar_attention_backward_ex(float *dqkv, int accumulate, float *scratch, const float *dout,
                             const float *qkv, const float *att, int B, int T, int NH, int HS);

/* ---- dropout, counter-based so forward and backward agree without a mask --
 * keep element i iff hash(seed, i) >= p; kept elements scaled by 1/(1-p).
 * seed should mix (run seed, step, micro-batch, layer).                   */
void ar_dropout_forward(float *out, const float *inp, long n, float p, uint64_t seed);
void ar_dropout_backward(float *dinp, const float *dout, long n, float p, uint64_t seed);

/* ---- residual add: out = a + b; backward adds dout to da and db --------- */
void ar_residual_forward(float *out, const float *a, const float *b, long n);
void ar_residual_backward(float *da, float *db, const float *dout, long n);

/* ---- softmax cross-entropy -----------------------------------------------
 * logits (N,V), targets (N) int32 in [0,V) -> losses (N), probs (N,V)
 * returns the mean loss (computed in double).                            */
double ar_xent_forward(float *losses, float *probs, const float *logits, const int32_t *targets,
                       int N, int V);
/* dlogits (N,V) += scale * (probs - onehot(targets)); scale is usually 1/N */
void ar_xent_backward(float *dlogits, const float *probs, const int32_t *targets, float scale,
                      int N, int V);

/* ---- optimizers (update n parameters in place) ---------------------------
 * AdamW as torch.optim.AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g;
 * v = b2 v + (1-b2) g^2; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
 * t counts from 1. grad_scale multiplies g first (used for clipping).      */
void ar_adamw_update(float *param, const float *grad, float *m, float *v, long n, float lr,
                     float beta1, float beta2, float eps, float weight_decay, int t,
                     float grad_scale);
/* AdamW over many parameters at once (a stage's), in one parallel pass:
 * each segment is updated as ar_adamw_update would, with weight_decay where
 * decay is set and none elsewhere. */
typedef struct {
    float *param;
    const float *grad;
    float *m, *v;
    long n;
    int decay;
} ar_adamw_segment;
void ar_adamw_update_multi(const ar_adamw_segment *segs, int nseg, float lr, float beta1, float beta2,
                           float eps, float weight_decay, int t, float grad_scale);
/* SGD as torch.optim.SGD with momentum (dampening 0, not Nesterov):
 * g = grad_scale*grad + wd*p; buf = momentum*buf + g (buf = g at t==1); p -= lr*buf */
void ar_sgd_update(float *param, const float *grad, float *buf, long n, float lr, float momentum,
                   float weight_decay, int t, float grad_scale);

/* sum of squares of x, accumulated in double */
double ar_sum_squares(const float *x, long n);
/* out[i] = ar_sum_squares(x[i], n[i]) for `count` arrays, bitwise, in one
 * parallel pass; AR_OK or AR_ENOMEM */
int ar_sum_squares_multi(const float *const *x, const long *n, int count, double *out);

#endif
