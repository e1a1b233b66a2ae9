/* A stage: a contiguous range of a model's units with their parameters,
 * gradients and optimizer state, and the activations of the micro-batches in
 * flight. Single-device training is one stage holding every unit. */
#ifndef AR_STAGE_H
#define AR_STAGE_H

#include "nn/layer.h"
#include "ops/ops.h"
#include "nn/spec.h"
#include "train/frame.h"

#include <stdint.h>

enum ar_optimizer { AR_OPT_ADAMW = 0, AR_OPT_SGD = 1 };

typedef struct {
    int kind;            /* enum ar_optimizer */
    float beta1, beta2;  /* AdamW; beta1 is SGD's momentum */
    float eps;
    float weight_decay;  /* applied to matrices only */
} ar_optim_config;

typedef struct {
    ar_model_spec spec;
    int first, last;     /* units [first, last) */
    int nlayers;
    ar_layer **layers;
    int nparams;
    ar_param **params;   /* every parameter of the stage, in unit order */
    long param_floats;
    float *mem_params, *mem_grads, *mem_m, *mem_v; /* one allocation each (llm.c) */
    float *tied_grads;   /* head contributions to tied weights, see layer.h */
    /* When the head and the embedding live in different stages, the head's
     * stage keeps a copy of the tied weight: its gradient goes up to the
     * owner (a TIED frame), and the owner's updated values come back down
     * with the STEP frame, so both stay bitwise equal to a single stage. */
    ar_param tied_copy;
    int has_tied_copy;   /* this stage holds the head but not the embedding */
    int expects_tied;    /* a later stage holds the head's copy: its TIED frame passes here */
    ar_param *tied_owner;/* this stage owns the tied weight of a later stage's head */

    int max_B, T;        /* micro-batch capacity (T = 1 for an MLP) */
    int nslots;
    float **slots;       /* per micro-batch slot: the stage input, then each layer's saved area */
    size_t *layer_offset;/* offset of each layer's saved area in a slot */
    size_t input_floats; /* floats reserved for the input at the start of a slot */
    size_t slot_floats;
    float *probs;        /* last stage: softmax probabilities per slot (nslots * max_B*T*V) */
    size_t probs_floats;
    float *scratch;      /* backward scratch */
    size_t scratch_floats;
    float *grad_in, *grad_out; /* gradient buffers at the stage boundaries (per micro-batch) */

    ar_optim_config optim;
    int opt_step;        /* optimizer steps taken (AdamW's t) */
    ar_adamw_segment *adamw_segs; /* the parameters as AdamW's segments (one pass a step) */
    /* tensor parallelism: the stage's GPT blocks are computed by these ranks
     * (train/tp_group.h); the stage keeps only the unsplit parts */
    ar_link **tp_ranks;
    int tp_nranks;
    uint64_t seed;
} ar_stage;

/* Build units [first,last) of spec, for micro-batches of up to max_B rows and
 * nslots in flight; parameters initialised from seed (each parameter from its
 * own stream, so the values do not depend on how the model is partitioned). */
int ar_stage_create(ar_stage *s, const ar_model_spec *spec, int first, int last, int max_B,
                    int nslots, uint64_t seed, const ar_optim_config *optim);
/* The same, with the stage's GPT blocks split over a tensor-parallel group:
 * ranks[i] is a link to a rank serving this stage's blocks (already running). */
int ar_stage_create_tp(ar_stage *s, const ar_model_spec *spec, int first, int last, int max_B,
                       int nslots, uint64_t seed, const ar_optim_config *optim, ar_link **ranks,
                       int nranks);
void ar_stage_destroy(ar_stage *s);

int ar_stage_is_first(const ar_stage *s);
int ar_stage_is_last(const ar_stage *s);
/* Elements per row of the stage input/output (e.g. C, or 1 for tokens), and
 * rows per micro-batch row (T for a GPT, 1 for an MLP). */
size_t ar_stage_in_width(const ar_stage *s);
size_t ar_stage_out_width(const ar_stage *s);

/* Forward micro-batch `slot` of B rows. input: int32 tokens (B,T) or floats
 * (B*T, in_width); copied into the slot. Returns a pointer to the output
 * (logits for the last stage) through *out. */
int ar_stage_forward(ar_stage *s, int slot, int B, const void *input, int train,
                     uint64_t drop_seed, const float **out);
/* Last stage: loss of the forward output in slot against targets; stores the
 * softmax for backward. Returns the mean loss via *loss and, for classifiers,
 * the number of correct predictions via *correct (may be NULL). */
int ar_stage_loss(ar_stage *s, int slot, int B, const int32_t *targets, double *loss,
                  long *correct);
/* Backward micro-batch `slot`: dout is the gradient of the output (NULL on the
 * last stage, where the loss gradient times loss_scale is used). The gradient
 * of the input is returned via *din (NULL for the first stage). */
int ar_stage_backward(ar_stage *s, int slot, int B, const int32_t *targets, const float *dout,
                      float loss_scale, uint64_t drop_seed, const float **din);

void ar_stage_zero_grad(ar_stage *s);
/* Fold the tied-weight contributions into the owners' gradients (before the
 * norm and the update). */
void ar_stage_fold_tied(ar_stage *s);
/* Sum of squared gradients of each unit of the stage, into out[last-first]
 * (with a tensor-parallel group, the ranks' shares are asked for and added). */
int ar_stage_grad_sumsq(const ar_stage *s, double *out);
/* One optimizer step with learning rate lr; gradients scaled by grad_scale
 * (the ranks of a tensor-parallel group step too). */
int ar_stage_update(ar_stage *s, float lr, float grad_scale);

/* SHA-256 of everything the next optimizer step and forward depend on: the
 * step count, parameters, both moments and the tied copy (a replay starts
 * from state with this digest and must end at the next step's). */
int ar_stage_state_digest(const ar_stage *s, uint8_t out[32]);

ar_param *ar_stage_find_param(const ar_stage *s, const char *name);
/* Every weight tensor the stage reads, by name: its parameters, plus the
 * tied copy (loaded from checkpoints like a parameter, never saved). */
ar_param *ar_stage_find_weight(ar_stage *s, const char *name);

#endif
