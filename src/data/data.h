/* Data sets: IDX files (MNIST, Fashion-MNIST) and character-level text. */
#ifndef AR_DATA_H
#define AR_DATA_H

#include "core/core.h"

#include <stdint.h>

/* ---- IDX ----------------------------------------------------------------
 * The MNIST file format: magic 0x00 0x00 type ndim, then ndim big-endian
 * uint32 sizes, then the data. Only type 0x08 (unsigned byte) is accepted.
 * Files may be gzip'd (detected by the 1f 8b magic, read through zlib).
 * Every size is validated against the file length and a sanity limit.     */
typedef struct {
    int ndim;
    uint32_t dims[4];
    uint8_t *data; /* product(dims) bytes */
    size_t count;  /* product(dims) */
} ar_idx;

int ar_idx_load(const char *path, ar_idx *out);
void ar_idx_free(ar_idx *idx);

/* An image classification set: images as floats in [0,1], labels as int32. */
typedef struct {
    int count;        /* number of examples */
    int features;     /* e.g. 784 */
    int classes;      /* 1 + the largest label */
    float *images;    /* (count, features) */
    int32_t *labels;  /* (count) */
} ar_image_set;

/* Load "<dir>/<prefix>-images-idx3-ubyte[.gz]" and "...-labels-idx1-ubyte[.gz]"
 * with prefix "train" or "t10k"; checks the counts agree.                 */
int ar_image_set_load(const char *dir, const char *prefix, ar_image_set *out);
void ar_image_set_free(ar_image_set *s);

/* ---- character-level text -----------------------------------------------
 * The vocabulary is the sorted set of distinct bytes of the file; tokens are
 * indices into it. The first 90% of tokens are the training split, the
 * rest validation (nanoGPT's split).                                      */
typedef struct {
    int vocab_size;
    uint8_t vocab[256];   /* token id -> byte */
    int16_t lookup[256];  /* byte -> token id, -1 if absent */
    int32_t *tokens;      /* whole file */
    long count;
    long train_count;     /* tokens [0, train_count) train, the rest val */
} ar_text_set;

int ar_text_load(const char *path, ar_text_set *out);
/* Build the lookup table from a stored vocabulary (for sampling). */
int ar_text_vocab_init(ar_text_set *out, const uint8_t *vocab, int vocab_size);
/* Encode a string with the vocabulary; unknown bytes are an error. */
int ar_text_encode(const ar_text_set *t, const char *text, int32_t *out, long *count);
void ar_text_free(ar_text_set *t);

/* Sample B random windows of T+1 tokens from the split (val=0 train, 1 val):
 * inputs (B,T) and targets (B,T) shifted by one. Uses and advances rng.  */
int ar_text_batch(const ar_text_set *t, int val, ar_rng *rng, int B, int T, int32_t *inputs,
                  int32_t *targets);

#endif
