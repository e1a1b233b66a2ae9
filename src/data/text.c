/* Character-level (byte-level) text data: vocabulary, tokens, the 90/10
 * train/val split of nanoGPT, and random batches of windows. */
#include "data/data.h"

#include <limits.h>
#include <string.h>

static void lookup_build(ar_text_set *t)
{
    for (int i = 0; i < 256; i++)
        t->lookup[i] = -1;
    for (int i = 0; i < t->vocab_size; i++)
        t->lookup[t->vocab[i]] = (int16_t)i;
}

int ar_text_load(const char *path, ar_text_set *out)
{
    if (!out)
        return ar_fail(AR_EINVAL, "ar_text_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!path)
        return ar_fail(AR_EINVAL, "ar_text_load: path is NULL");
    char *buf;
    size_t len;
    int rc = ar_read_file(path, &buf, &len);
    if (rc)
        return rc;
    if (len == 0) {
        ar_free(buf);
        return ar_fail(AR_EFORMAT, "%s: empty text file", path);
    }
    if (len > (size_t)INT32_MAX) {
        ar_free(buf);
        return ar_fail(AR_ELIMIT, "%s: text file of %zu bytes is too large", path, len);
    }
    /* vocabulary: the sorted set of distinct bytes */
    unsigned char seen[256] = {0};
    for (size_t i = 0; i < len; i++)
        seen[(unsigned char)buf[i]] = 1;
    out->vocab_size = 0;
    for (int b = 0; b < 256; b++)
        if (seen[b])
            out->vocab[out->vocab_size++] = (uint8_t)b;
    lookup_build(out);

    out->tokens = ar_calloc(len, sizeof(int32_t));
    if (!out->tokens) {
        ar_free(buf);
        memset(out, 0, sizeof *out);
        return AR_ENOMEM;
    }
    for (size_t i = 0; i < len; i++)
        out->tokens[i] = out->lookup[(unsigned char)buf[i]];
    ar_free(buf);
    out->count = (long)len;
    out->train_count = out->count * 9 / 10;
    return AR_OK;
}

int ar_text_vocab_init(ar_text_set *out, const uint8_t *vocab, int vocab_size)
{
    if (!out)
        return ar_fail(AR_EINVAL, "ar_text_vocab_init: out is NULL");
    memset(out, 0, sizeof *out);
    if (!vocab || vocab_size < 1 || vocab_size > 256)
        return ar_fail(AR_EINVAL, "vocabulary size %d not in 1..256", vocab_size);
    for (int i = 0; i < 256; i++)
        out->lookup[i] = -1;
    for (int i = 0; i < vocab_size; i++) {
        if (out->lookup[vocab[i]] >= 0) {
            int first = out->lookup[vocab[i]];
            memset(out, 0, sizeof *out);
            return ar_fail(AR_EINVAL, "vocabulary byte 0x%02x appears twice (ids %d and %d)",
                           vocab[i], first, i);
        }
        out->lookup[vocab[i]] = (int16_t)i;
        out->vocab[i] = vocab[i];
    }
    out->vocab_size = vocab_size;
    return AR_OK;
}

/* out must have room for strlen(text) tokens; it may be NULL to only
 * validate and count. *count receives the number of tokens. */
int ar_text_encode(const ar_text_set *t, const char *text, int32_t *out, long *count)
{
    if (count)
        *count = 0;
    if (!t || !text || !count)
        return ar_fail(AR_EINVAL, "ar_text_encode: NULL argument");
    long n = 0;
    for (const unsigned char *p = (const unsigned char *)text; *p; p++, n++) {
        int id = t->lookup[*p];
        if (id < 0) {
            if (*p >= 0x20 && *p < 0x7f)
                return ar_fail(AR_EINVAL, "character '%c' at offset %ld is not in the vocabulary",
                               *p, n);
            return ar_fail(AR_EINVAL, "byte 0x%02x at offset %ld is not in the vocabulary", *p, n);
        }
        if (out)
            out[n] = id;
    }
    *count = n;
    return AR_OK;
}

void ar_text_free(ar_text_set *t)
{
    if (!t)
        return;
    ar_free(t->tokens);
    memset(t, 0, sizeof *t);
}

int ar_text_batch(const ar_text_set *t, int val, ar_rng *rng, int B, int T, int32_t *inputs,
                  int32_t *targets)
{
    if (!t || !rng || !inputs || !targets)
        return ar_fail(AR_EINVAL, "ar_text_batch: NULL argument");
    if (B < 1 || T < 1)
        return ar_fail(AR_EINVAL, "ar_text_batch: batch %d x %d (both must be >= 1)", B, T);
    if (!t->tokens || t->count <= 0 || t->train_count < 0 || t->train_count > t->count)
        return ar_fail(AR_EINVAL, "ar_text_batch: text set has no tokens");
    long base = val ? t->train_count : 0;
    long span = val ? t->count - t->train_count : t->train_count;
    const char *split = val ? "validation" : "training";
    if (span < (long)T + 1)
        return ar_fail(AR_EINVAL,
                       "%s split has %ld tokens, fewer than the %ld needed for one window of "
                       "block size %d (+1 for the targets)",
                       split, span, (long)T + 1, T);
    for (int b = 0; b < B; b++) {
        long start = base + (long)ar_rng_below(rng, (uint64_t)(span - T));
        const int32_t *src = t->tokens + start;
        int32_t *in = inputs + (size_t)b * (size_t)T;
        int32_t *tg = targets + (size_t)b * (size_t)T;
        memcpy(in, src, (size_t)T * sizeof *in);
        memcpy(tg, src + 1, (size_t)T * sizeof *tg);
    }
    return AR_OK;
}
