/* Checkpoints: a folder holding
 *   model.safetensors      the weights (PyTorch state_dict names)
 *   spec.json              the model spec with the vocabulary
 *   optimizer.safetensors  AdamW moments (m.NAME, v.NAME) or SGD momentum
 *   state.json             step, recipe, RNG state and data position (and the
 *                          market job it pays, if any)
 * written as a whole: see checkpoint.c. The format is partition-independent: stages write and read parameters by
 * name, so a run saved from S stages resumes on any other split. */
#ifndef AR_CHECKPOINT_H
#define AR_CHECKPOINT_H

#include "train/stage.h"

#include <stdint.h>

typedef struct {
    long step;           /* optimizer steps done */
    int opt_step;
    uint64_t seed;
    uint64_t data_rng[4];
    long data_pos;
    /* recipe */
    long steps;
    int batch, micro_batches, optimizer;
    float lr, min_lr, weight_decay, beta1, beta2, eps, clip;
    long warmup;
    int64_t market_job; /* the market job that pays for the run (0: none): a resumed run continues it */
} ar_train_state;

int ar_checkpoint_save(const char *dir, ar_stage *const *stages, int nstages,
                       const ar_train_state *state);
/* Load weights (and optimizer moments when with_optimizer) into the stages. */
int ar_checkpoint_load_params(const char *dir, ar_stage *const *stages, int nstages,
                              int with_optimizer);
int ar_checkpoint_load_state(const char *dir, ar_train_state *state);
/* Load weights from one safetensors file into the stages by name: every
 * parameter must be present with the right shape. */
int ar_load_weights_file(const char *path, ar_stage *const *stages, int nstages,
                         const char *prefix);

/* One stage holding the whole model of a checkpoint, for sampling and
 * evaluation, with micro-batches of up to max_B rows. */
int ar_checkpoint_open_stage(const char *dir, int max_B, ar_stage *stage);

#endif
