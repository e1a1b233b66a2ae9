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

/* An MLP's pair of linear layers on a group, as two layers of the leader so
 * that units and layers stay one to one. The first (column = 1, unit u) sends
 * its input to the ranks and outputs nothing of use (its output width is
 * the pair's hidden width, zeros: the hidden units live on the ranks); in
 * backward it sums the ranks' input gradients. The second (column = 0, unit
 * u + 1) sums their partial outputs, adds its bias and activation; in
 * backward it sends the gradient before its bias to the ranks. */
int ar_tp_mlp_create(const ar_model_spec *spec, int unit, int column, ar_link **ranks, int nranks,
                     ar_layer **out);

#endif
