/* Tensor parallelism (docs/DESIGN.md has the picture): one GPT block shared by a group of
 * devices. Each rank holds a range of attention heads (its rows of the QKV
 * weight, its columns of the attention projection) and a range of MLP hidden
 * units (its rows of c_fc, its columns of the MLP projection), and turns the
 * normalised input into a partial output; the group's leader sums the
 * partials and runs what is not split (LayerNorms, residuals, the two
 * projection biases). Backward mirrors it: every rank gets the same output
 * gradient, returns a partial input gradient, and keeps its own parameter
 * gradients and optimizer state.
 *
 * An MLP model splits the same way, a pair of linear layers at a time: the
 * first by its output columns (each rank a range of hidden units, with their
 * bias and activation), the second by its input rows (the units' columns of
 * its weight); the leader sums the partial outputs and adds the second's bias
 * (and its activation, when it has one). An MLP shard is a GPT shard without
 * attention: the same three MLP parameters and the same arithmetic.
 *
 * This file is the arithmetic of a shard; moving the tensors between the
 * leader and the ranks is the pipeline's business. */
#ifndef AR_TP_H
#define AR_TP_H

#include "nn/layer.h"
#include "nn/spec.h"

typedef struct {
    int begin, end; /* [begin, end) */
} ar_range;

/* Split n items into parts, in proportion to weights (NULL: equal), largest
 * remainder first; with n >= parts every part gets at least one. */
int ar_tp_split(int n, int parts, const double *weights, ar_range *out);

/* Parameters of a shard, in this order. */
enum {
    AR_SHARD_QKV_W,   /* (3 Cr, C): q rows, then k rows, then v rows of the heads */
    AR_SHARD_QKV_B,   /* (3 Cr) */
    AR_SHARD_APROJ_W, /* (C, Cr): the heads' columns of attn.c_proj.weight */
    AR_SHARD_FC_W,    /* (Hr, C) */
    AR_SHARD_FC_B,    /* (Hr) */
    AR_SHARD_MPROJ_W, /* (C, Hr): the units' columns of mlp.c_proj.weight */
    AR_SHARD_NPARAMS
};

typedef struct {
    const ar_model_spec *spec;
    int layer;          /* GPT: the block's index (0..n_layer-1); MLP: the pair's first unit */
    ar_range heads;     /* of n_head (none in an MLP shard) */
    ar_range hidden;    /* of 4 * n_embd, or of the MLP pair's hidden units */
    int first_param;    /* 0, or AR_SHARD_FC_W for an MLP shard (no attention) */
    int in, out;        /* widths of the input and of the partial output (C and C in a GPT) */
    int activation;     /* of the hidden units: enum ar_activation */
    /* declared like a layer's parameters; data/grad/m/v set by the owner */
    ar_param params[AR_SHARD_NPARAMS];
} ar_block_shard;

/* Declare the shard's parameters (names are the full tensors' names; the
 * ranges say which slice). */
int ar_block_shard_init(ar_block_shard *s, const ar_model_spec *spec, int layer, ar_range heads,
                        ar_range hidden);

/* An MLP shard: units unit and unit + 1 (a hidden layer and the next),
 * hidden units `hidden` of the first's outputs. */
int ar_mlp_shard_init(ar_block_shard *s, const ar_model_spec *spec, int unit, ar_range hidden);
/* The same copies for an MLP shard: `first` and `second` are the pair's
 * layers as mlp.c holds them. */
void ar_mlp_shard_from_full(ar_block_shard *s, const ar_layer *first, const ar_layer *second, int which);
void ar_mlp_shard_to_full(const ar_block_shard *s, ar_layer *first, ar_layer *second, int which);

/* Copy the shard's slice out of the full tensors of a block (as a layer of
 * gpt.c holds them: params[] in the block's order), or back into them.
 * which: 0 data, 1 grad, 2 m, 3 v. */
void ar_block_shard_from_full(ar_block_shard *s, const ar_layer *full, int which);
void ar_block_shard_to_full(const ar_block_shard *s, ar_layer *full, int which);

/* Saved floats per micro-batch of (B,T) for the attention part and the MLP part. */
size_t ar_shard_attn_saved(const ar_block_shard *s, int B, int T);
size_t ar_shard_mlp_saved(const ar_block_shard *s, int B, int T);
size_t ar_shard_scratch(const ar_block_shard *s, int B, int T);

/* ln (B,T,C) -> partial (B,T,C) = attn_heads(ln) . Wproj_cols^T (no bias);
 * AR_OK, or AR_ENOMEM (the attention's packing space) */
int ar_shard_attn_forward(ar_block_shard *s, int B, int T, const float *ln, float *saved,
                           float *partial);
/* dpartial (B,T,C) -> dln (B,T,C) += ..., parameter gradients += ...;
 * AR_OK or AR_ENOMEM */
int ar_shard_attn_backward(ar_block_shard *s, int B, int T, const float *ln, const float *saved,
                            const float *dpartial, float *dln, float *scratch);
/* ln (B,T,in) -> partial (B,T,out) = act(ln Wfc^T + b) Wmproj_cols^T (no bias) */
void ar_shard_mlp_forward(ar_block_shard *s, int B, int T, const float *ln, float *saved,
                          float *partial);
void ar_shard_mlp_backward(ar_block_shard *s, int B, int T, const float *ln, const float *saved,
                           const float *dpartial, float *dln, float *scratch);

#endif
