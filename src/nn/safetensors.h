/* The safetensors format (the Hugging Face one, loadable by PyTorch):
 * 8-byte little-endian header length N, N bytes of JSON
 *   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *    "__metadata__": {"key": "value", ...}}
 * then the raw little-endian data; offsets are relative to the data start.
 * We write F32 (and I32 for integer state); we read F32, I32 and I64. */
#ifndef AR_SAFETENSORS_H
#define AR_SAFETENSORS_H

#include "core/core.h"

#include <stddef.h>
#include <stdint.h>

enum ar_dtype { AR_F32 = 0, AR_I32 = 1, AR_I64 = 2 };

typedef struct {
    char name[128];
    int dtype;
    int ndim;
    int64_t shape[8];
    size_t nbytes;
    const void *data; /* points into the file buffer (reader) or the caller's memory (writer) */
} ar_st_tensor;

typedef struct {
    char *buffer; /* the whole file */
    size_t size;
    ar_st_tensor *tensors;
    int count;
    char **meta_keys, **meta_values; /* __metadata__ string pairs */
    int meta_count;
} ar_st_file;

/* Reads and validates everything: header length within the file, JSON well
 * formed, known dtype, shape product x dtype size == end - begin, offsets
 * inside the data, no overlap, no duplicate names. */
int ar_st_load(const char *path, ar_st_file *out);
/* Same, from memory (the buffer is copied). */
int ar_st_parse(const void *data, size_t size, ar_st_file *out);
const ar_st_tensor *ar_st_find(const ar_st_file *f, const char *name);
const char *ar_st_meta(const ar_st_file *f, const char *key);
void ar_st_free(ar_st_file *f);

/* Write tensors (and optional metadata pairs) atomically to path. */
int ar_st_save(const char *path, const ar_st_tensor *tensors, int count, const char *const *meta_keys,
               const char *const *meta_values, int meta_count);

#endif
