/* A tensor-parallel group (see docs/DESIGN.md): the stage leader and its ranks.
 *
 * Each rank serves the shards of the stage's blocks that it holds
 * (ar_tp_rank_serve, over one link from the leader); the leader drives them
 * with ar_tp_group_* calls that scatter a normalised input to every rank and
 * gather the partial outputs, summed in rank order. The leader computes its
 * own shard (rank 0) itself, between scattering and gathering, so the ranks
 * work in parallel with it.
 *
 * All messages are AR_FRAME_TP frames: scalars[0] is the operation, mb the
 * activation slot, rows the batch rows; the payload is the tensor. */
#ifndef AR_TP_GROUP_H
#define AR_TP_GROUP_H

#include "nn/tp.h"
#include "train/plan.h"
#include "train/frame.h"
#include "train/stage.h"

enum ar_tp_op {
    AR_TP_ATTN_FWD = 1, /* payload ln (B,T,C) -> reply partial (B,T,C) */
    AR_TP_ATTN_BWD = 2, /* payload dpartial -> reply partial dln */
    AR_TP_MLP_FWD = 3,
    AR_TP_MLP_BWD = 4,
    AR_TP_NORM = 5,     /* reply: sum of squared gradients per block (F64) */
    AR_TP_STEP = 6,     /* scalars[1] lr, scalars[2] gradient scale: AdamW, then zero the gradients */
    AR_TP_STOP = 7
};

/* One rank: shards of blocks [first_block, first_block + nblocks), or of an
 * MLP's pairs of linear layers from unit first_block. */
typedef struct {
    ar_model_spec spec;
    int first_block, nblocks;
    ar_block_shard *shards;
    float *mem_params, *mem_grads, *mem_m, *mem_v;
    long param_floats;
    int max_B, T, nslots;
    float **ln_attn, **ln_mlp;   /* [block * nslots + slot]: the inputs, kept for backward */
    float **saved_attn, **saved_mlp;
    float *scratch, *partial;
    ar_optim_config optim;
    int opt_step;
} ar_tp_rank;

/* heads[b], hidden[b]: this rank's ranges in shard b (heads unused in an
 * MLP). The
 * shard parameters are initialised from seed like the whole model's (each
 * parameter's own stream, then sliced), so a group starts from the same
 * weights as a single device. */
int ar_tp_rank_create(ar_tp_rank *r, const ar_model_spec *spec, int first_block, int nblocks,
                      const ar_range *heads, const ar_range *hidden, int max_B, int nslots,
                      uint64_t seed, const ar_optim_config *optim);
void ar_tp_rank_destroy(ar_tp_rank *r);
/* Serve the leader until AR_TP_STOP or the link closes. */
int ar_tp_rank_serve(ar_tp_rank *r, ar_link *leader);

/* The shards of units [first_unit, last_unit): GPT blocks (*first_block is
 * the first block's index), or an MLP's pairs of linear layers (units
 * *first_block + 2i and + 2i + 1; an odd last layer stays whole with the
 * leader). AR_EINVAL when there are none. */
int ar_tp_blocks(const ar_model_spec *spec, int first_unit, int last_unit, int *first_block, int *nblocks);

#define AR_TP_MAX_SHARDS 128

/* How a group shares a stage: its shards and each member's part of each. */
typedef struct {
    int first, count; /* as ar_tp_blocks gives them */
    int members;
    ar_range heads[AR_PLAN_MAX_GROUP];                    /* GPT: each member's heads, every block alike */
    ar_range hidden[AR_PLAN_MAX_GROUP][AR_TP_MAX_SHARDS]; /* each member's hidden units in each shard */
} ar_tp_layout;

/* Split every shard of the units among `members`, in proportion to weights
 * (NULL: equally; 8 heads over 3 equal members give 3+3+2). */
int ar_tp_group_layout(const ar_model_spec *spec, int first_unit, int last_unit, int members,
                       const double *weights, ar_tp_layout *out);
/* Create member k's rank of a layout. */
int ar_tp_layout_rank(const ar_tp_layout *l, int k, const ar_model_spec *spec, int max_B, int nslots,
                      uint64_t seed, const ar_optim_config *optim, ar_tp_rank *out);

/* Copy a stage's state between its parts (part: a plain stage, or a group
 * leader's unsplit parameters; ranks: the group's shards) and a whole stage
 * of the same units: values, AdamW moments, the tied copy, the step count.
 * What checkpoints use: they always see whole tensors. */
int ar_tp_parts_to_full(ar_stage *part, ar_tp_rank *const *ranks, int nranks, ar_stage *full);
int ar_tp_parts_from_full(ar_stage *part, ar_tp_rank *const *ranks, int nranks, ar_stage *full);

/* The leader's side: send one operation to every rank, then collect the
 * replies, adding them (in rank order) into sum (B*T*C floats, which the
 * caller has filled with its own partial). */
int ar_tp_group_scatter(ar_link **ranks, int nranks, int op, int block, int slot, int B, int T,
                        int C, const float *x);
int ar_tp_group_gather_sum(ar_link **ranks, int nranks, size_t n, float *sum, double timeout_s);

#endif
