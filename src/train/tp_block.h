/* The leader's side of a tensor-parallel GPT block: a layer that runs the
 * unsplit parts (both LayerNorms, the residual adds, the two projection
 * biases) and has its ranks (train/tp_group.h) compute the heads and the MLP
 * hidden units, summing their partial outputs in rank order. Its parameters
 * are the unsplit ones, with the whole block's names and shapes. */
#ifndef AR_TP_BLOCK_H
#define AR_TP_BLOCK_H

#include "nn/layer.h"
#include "train/frame.h"

/* ranks: links to the group's ranks, each serving shards of this block. */
int ar_tp_block_create(const ar_model_spec *spec, int unit, ar_link **ranks, int nranks,
                       ar_layer **out);

#endif
