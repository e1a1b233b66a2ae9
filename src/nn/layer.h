/* The layer interface: a pipeline unit (a GPT block, the embedding, a linear
 * layer of an MLP, ...) with its parameters, forward and backward.
 *
 * A layer does not own memory. It declares its parameters (ar_param) and how
 * many floats it saves per micro-batch for its backward pass; the stage
 * carves both out of its contiguous buffers and hands them back. */
#ifndef AR_LAYER_H
#define AR_LAYER_H

#include "nn/spec.h"

#include <stddef.h>
#include <stdint.h>

enum ar_init { AR_INIT_ZEROS, AR_INIT_ONES, AR_INIT_NORMAL, AR_INIT_UNIFORM_FANIN };

typedef struct {
    char name[64];      /* safetensors / state_dict name, e.g. "h.0.attn.c_attn.weight" */
    int ndim;
    int64_t shape[2];
    long numel;
    int decay;          /* AdamW weight decay applies (matrices) */
    int init;           /* enum ar_init */
    float init_scale;   /* std for NORMAL, fan-in for UNIFORM_FANIN */
    float *data, *grad; /* set by the stage: views into its contiguous buffers */
    float *m, *v;       /* optimizer state (v unused by SGD) */
} ar_param;

/* What one forward/backward call is about. */
typedef struct {
    int B, T;            /* rows of this micro-batch (T = 1 for an MLP) */
    int slot;            /* the micro-batch's activation slot (tensor-parallel ranks keep theirs) */
    int train;           /* 0: evaluation (no dropout) */
    uint64_t drop_seed;  /* mixes run seed, step and micro-batch */
    float *scratch;      /* scratch floats for backward, scratch_floats long */
    size_t scratch_floats;
} ar_pass;

typedef struct ar_layer ar_layer;

typedef struct {
    const char *kind;
    /* floats saved per micro-batch of (B,T); the output comes first */
    size_t (*saved_floats)(const ar_layer *l, int B, int T);
    /* scratch floats needed by backward for (B,T) */
    size_t (*scratch_floats)(const ar_layer *l, int B, int T);
    /* in: the previous unit's output (int32 tokens for the embedding);
     * saved: this layer's saved area, output at saved[0 .. out_floats) */
    int (*forward)(ar_layer *l, const ar_pass *p, const void *in, float *saved);
    /* dout: gradient of the output; din: gradient of the input to ACCUMULATE
     * into (NULL when the input is tokens or needs no gradient) */
    int (*backward)(ar_layer *l, const ar_pass *p, const void *in, const float *saved,
                    const float *dout, float *din);
    void (*destroy)(ar_layer *l);
} ar_layer_vt;

#define AR_LAYER_MAX_PARAMS 16

struct ar_layer {
    const ar_layer_vt *vt;
    const ar_model_spec *spec;
    int unit;                 /* index in the model's units */
    int nparams;
    ar_param params[AR_LAYER_MAX_PARAMS];
    size_t in_floats_per_row;  /* input width per (b,t) row: C, 784, ... (0 for tokens) */
    size_t out_floats_per_row; /* output width per row */
    /* A tied parameter used by this layer but owned by another (the GPT head
     * uses the embedding's wte). tied->data is read; the gradient this layer
     * contributes goes to tied_grad, summed into tied->grad at step time so the
     * result is the same whether or not the owner lives in this stage. */
    ar_param *tied;
    float *tied_grad;
    const char *tied_name;     /* name of the tied parameter, e.g. "wte.weight" */
    /* A tensor-parallel leader's layer whose ranks hold a shard (a GPT block,
     * or the first of an MLP pair): the ranks' gradient norms belong to it. */
    int tp_shard;
};

/* Create unit `unit` of the model described by spec. */
int ar_layer_create(const ar_model_spec *spec, int unit, ar_layer **out);
void ar_layer_destroy(ar_layer *l);

/* Per-model constructors (gpt.c, mlp.c). */
int ar_gpt_layer_create(const ar_model_spec *spec, int unit, ar_layer **out);
int ar_mlp_layer_create(const ar_model_spec *spec, int unit, ar_layer **out);

/* Fill a parameter declaration. */
void ar_param_declare(ar_param *p, const char *name, int64_t rows, int64_t cols, int decay,
                      int init, float init_scale);

#endif
