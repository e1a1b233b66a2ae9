/* Model specs: the declarative JSON description of a model. Providers build
 * models only from specs like these, never from code sent by someone else. */
#ifndef AR_SPEC_H
#define AR_SPEC_H

#include <stddef.h>
#include <stdint.h>

enum ar_model_type { AR_MODEL_GPT = 1, AR_MODEL_MLP = 2 };
enum ar_activation { AR_ACT_RELU = 0, AR_ACT_GELU = 1 };

#define AR_MAX_HIDDEN 16
#define AR_MAX_LAYERS 256

typedef struct {
    int type;
    float dropout;
    /* GPT */
    int vocab_size; /* 0 in a config file: taken from the data */
    int block_size;
    int n_layer;
    int n_head;
    int n_embd;
    /* MLP */
    int inputs;
    int hidden[AR_MAX_HIDDEN];
    int n_hidden;
    int classes;
    int activation;
    /* the character vocabulary, stored with a checkpoint (token id -> byte) */
    int has_vocab;
    uint8_t vocab[256];
} ar_model_spec;

/* Strict: unknown keys, wrong types and out-of-range values are errors whose
 * message names the key and the origin (usually the file name). */
int ar_spec_parse(const char *json, size_t len, const char *origin, ar_model_spec *out);
int ar_spec_load(const char *path, ar_model_spec *out);
/* Serialise (with the vocabulary when present); caller frees with free(). */
char *ar_spec_to_json(const ar_model_spec *spec);
/* Check the whole spec is complete (vocab_size known, etc.). */
int ar_spec_validate(const ar_model_spec *spec, const char *origin);

/* Pipeline units: the layers a plan assigns to devices.
 * GPT: 0 = embedding, 1..n_layer = blocks, n_layer+1 = head (ln_f + logits).
 * MLP: one unit per linear layer (with its activation). */
int ar_spec_units(const ar_model_spec *spec);
/* Total number of parameters of the whole model. */
long ar_spec_param_count(const ar_model_spec *spec);

#endif
