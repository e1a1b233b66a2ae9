/* Parsing and validating model specs (cJSON). */
#include "nn/spec.h"

#include "core/core.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Read an integer in [lo, hi] from item; the message names the key. */
static int get_int(const cJSON *item, const char *origin, int lo, int hi, int *out)
{
    if (!cJSON_IsNumber(item))
        return ar_fail(AR_EFORMAT, "%s: \"%s\" must be a number", origin, item->string);
    double v = item->valuedouble;
    if (v != floor(v) || v < lo || v > hi)
        return ar_fail(AR_EINVAL, "%s: \"%s\" must be an integer in [%d, %d], got %g", origin,
                       item->string, lo, hi, v);
    *out = (int)v;
    return AR_OK;
}

static int parse_common_and_type(const cJSON *root, const char *origin, ar_model_spec *s)
{
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "type");
    if (!type)
        return ar_fail(AR_EFORMAT, "%s: missing \"type\" (\"gpt\" or \"mlp\")", origin);
    if (!cJSON_IsString(type))
        return ar_fail(AR_EFORMAT, "%s: \"type\" must be a string", origin);
    if (strcmp(type->valuestring, "gpt") == 0)
        s->type = AR_MODEL_GPT;
    else if (strcmp(type->valuestring, "mlp") == 0)
        s->type = AR_MODEL_MLP;
    else
        return ar_fail(AR_EINVAL, "%s: unknown model type \"%s\" (expected \"gpt\" or \"mlp\")",
                       origin, type->valuestring);
    return AR_OK;
}

static int parse_vocab(const cJSON *item, const char *origin, ar_model_spec *s)
{
    if (!cJSON_IsArray(item))
        return ar_fail(AR_EFORMAT, "%s: \"vocab\" must be an array of byte values", origin);
    int n = cJSON_GetArraySize(item);
    if (n < 1 || n > 256)
        return ar_fail(AR_EINVAL, "%s: \"vocab\" must have 1..256 entries, has %d", origin, n);
    int seen[256] = {0};
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, item)
    {
        if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) || e->valuedouble < 0 ||
            e->valuedouble > 255)
            return ar_fail(AR_EINVAL, "%s: \"vocab\"[%d] must be a byte value 0..255", origin, i);
        int b = (int)e->valuedouble;
        if (seen[b])
            return ar_fail(AR_EINVAL, "%s: \"vocab\" repeats byte %d", origin, b);
        seen[b] = 1;
        s->vocab[i++] = (uint8_t)b;
    }
    s->has_vocab = 1;
    if (s->vocab_size == 0)
        s->vocab_size = n;
    return AR_OK;
}

int ar_spec_parse(const char *json, size_t len, const char *origin, ar_model_spec *out)
{
    memset(out, 0, sizeof *out);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!root) {
        size_t at = end && end >= json ? (size_t)(end - json) : 0;
        return ar_fail(AR_EFORMAT, "%s: malformed JSON near byte %zu", origin, at);
    }
    int rc = AR_OK;
    while (end && end < json + len && (*end == ' ' || *end == '\n' || *end == '\r' || *end == '\t'))
        end++;
    if (end && end < json + len && *end != '\0') {
        rc = ar_fail(AR_EFORMAT, "%s: unexpected data after the JSON object at byte %zu", origin,
                     (size_t)(end - json));
        goto done;
    }
    if (!cJSON_IsObject(root)) {
        rc = ar_fail(AR_EFORMAT, "%s: a model spec must be a JSON object", origin);
        goto done;
    }
    if ((rc = parse_common_and_type(root, origin, out)) != AR_OK)
        goto done;
    out->activation = AR_ACT_RELU;
    const cJSON *vocab_item = NULL;
    const cJSON *item;
    cJSON_ArrayForEach(item, root)
    {
        const char *k = item->string;
        if (strcmp(k, "type") == 0)
            continue;
        if (strcmp(k, "dropout") == 0) {
            if (!cJSON_IsNumber(item) || !(item->valuedouble >= 0 && item->valuedouble < 1)) {
                rc = ar_fail(AR_EINVAL, "%s: \"dropout\" must be a number in [0, 1)", origin);
                goto done;
            }
            out->dropout = (float)item->valuedouble;
            continue;
        }
        if (out->type == AR_MODEL_GPT) {
            if (strcmp(k, "vocab_size") == 0)
                rc = get_int(item, origin, 0, 256, &out->vocab_size);
            else if (strcmp(k, "block_size") == 0)
                rc = get_int(item, origin, 1, 8192, &out->block_size);
            else if (strcmp(k, "n_layer") == 0)
                rc = get_int(item, origin, 1, AR_MAX_LAYERS - 2, &out->n_layer);
            else if (strcmp(k, "n_head") == 0)
                rc = get_int(item, origin, 1, 1024, &out->n_head);
            else if (strcmp(k, "n_embd") == 0)
                rc = get_int(item, origin, 1, 16384, &out->n_embd);
            else if (strcmp(k, "vocab") == 0)
                vocab_item = item;
            else
                rc = ar_fail(AR_EINVAL, "%s: unknown key \"%s\" for a gpt model", origin, k);
        } else {
            if (strcmp(k, "inputs") == 0)
                rc = get_int(item, origin, 1, 1 << 24, &out->inputs);
            else if (strcmp(k, "classes") == 0)
                rc = get_int(item, origin, 2, 1 << 20, &out->classes);
            else if (strcmp(k, "activation") == 0) {
                if (cJSON_IsString(item) && strcmp(item->valuestring, "relu") == 0)
                    out->activation = AR_ACT_RELU;
                else if (cJSON_IsString(item) && strcmp(item->valuestring, "gelu") == 0)
                    out->activation = AR_ACT_GELU;
                else
                    rc = ar_fail(AR_EINVAL, "%s: \"activation\" must be \"relu\" or \"gelu\"",
                                 origin);
            } else if (strcmp(k, "hidden") == 0) {
                if (!cJSON_IsArray(item)) {
                    rc = ar_fail(AR_EFORMAT, "%s: \"hidden\" must be an array of sizes", origin);
                    goto done;
                }
                int n = cJSON_GetArraySize(item);
                if (n > AR_MAX_HIDDEN) {
                    rc = ar_fail(AR_EINVAL, "%s: \"hidden\" has %d layers, at most %d", origin, n,
                                 AR_MAX_HIDDEN);
                    goto done;
                }
                out->n_hidden = 0;
                const cJSON *e;
                cJSON_ArrayForEach(e, item)
                {
                    if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) ||
                        e->valuedouble < 1 || e->valuedouble > (1 << 20)) {
                        rc = ar_fail(AR_EINVAL, "%s: \"hidden\"[%d] must be an integer in [1, %d]",
                                     origin, out->n_hidden, 1 << 20);
                        goto done;
                    }
                    out->hidden[out->n_hidden++] = (int)e->valuedouble;
                }
            } else
                rc = ar_fail(AR_EINVAL, "%s: unknown key \"%s\" for an mlp model", origin, k);
        }
        if (rc != AR_OK)
            goto done;
    }
    if (vocab_item && (rc = parse_vocab(vocab_item, origin, out)) != AR_OK)
        goto done;
    if (out->type == AR_MODEL_GPT) {
        if (!out->block_size || !out->n_layer || !out->n_head || !out->n_embd) {
            rc = ar_fail(AR_EINVAL,
                         "%s: a gpt model needs \"block_size\", \"n_layer\", \"n_head\" and "
                         "\"n_embd\"",
                         origin);
            goto done;
        }
        if (out->n_embd % out->n_head != 0) {
            rc = ar_fail(AR_EINVAL, "%s: \"n_embd\" (%d) must be a multiple of \"n_head\" (%d)",
                         origin, out->n_embd, out->n_head);
            goto done;
        }
        if (out->has_vocab && cJSON_GetArraySize(vocab_item) != out->vocab_size) {
            rc = ar_fail(AR_EINVAL, "%s: \"vocab\" has %d entries but \"vocab_size\" is %d",
                         origin, cJSON_GetArraySize(vocab_item), out->vocab_size);
            goto done;
        }
    } else {
        if (!out->inputs || !out->classes) {
            rc = ar_fail(AR_EINVAL, "%s: an mlp model needs \"inputs\" and \"classes\"", origin);
            goto done;
        }
    }
done:
    cJSON_Delete(root);
    return rc;
}

int ar_spec_load(const char *path, ar_model_spec *out)
{
    char *text;
    size_t len;
    int rc = ar_read_file(path, &text, &len);
    if (rc != AR_OK)
        return rc;
    rc = ar_spec_parse(text, len, path, out);
    ar_free(text);
    return rc;
}

int ar_spec_validate(const ar_model_spec *s, const char *origin)
{
    if (s->type == AR_MODEL_GPT && s->vocab_size < 1)
        return ar_fail(AR_EINVAL, "%s: vocab_size is not known (give it or train on text data)",
                       origin);
    return AR_OK;
}

char *ar_spec_to_json(const ar_model_spec *s)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return NULL;
    int ok = 1;
    if (s->type == AR_MODEL_GPT) {
        ok &= cJSON_AddStringToObject(root, "type", "gpt") != NULL;
        ok &= cJSON_AddNumberToObject(root, "vocab_size", s->vocab_size) != NULL;
        ok &= cJSON_AddNumberToObject(root, "block_size", s->block_size) != NULL;
        ok &= cJSON_AddNumberToObject(root, "n_layer", s->n_layer) != NULL;
        ok &= cJSON_AddNumberToObject(root, "n_head", s->n_head) != NULL;
        ok &= cJSON_AddNumberToObject(root, "n_embd", s->n_embd) != NULL;
    } else {
        ok &= cJSON_AddStringToObject(root, "type", "mlp") != NULL;
        ok &= cJSON_AddNumberToObject(root, "inputs", s->inputs) != NULL;
        cJSON *h = cJSON_AddArrayToObject(root, "hidden");
        ok &= h != NULL;
        for (int i = 0; ok && i < s->n_hidden; i++)
            ok &= cJSON_AddItemToArray(h, cJSON_CreateNumber(s->hidden[i]));
        ok &= cJSON_AddNumberToObject(root, "classes", s->classes) != NULL;
        ok &= cJSON_AddStringToObject(root, "activation",
                                      s->activation == AR_ACT_GELU ? "gelu" : "relu") != NULL;
    }
    ok &= cJSON_AddNumberToObject(root, "dropout", s->dropout) != NULL;
    if (ok && s->has_vocab) {
        cJSON *v = cJSON_AddArrayToObject(root, "vocab");
        ok &= v != NULL;
        for (int i = 0; ok && i < s->vocab_size; i++)
            ok &= cJSON_AddItemToArray(v, cJSON_CreateNumber(s->vocab[i]));
    }
    char *text = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (!text)
        ar_fail(AR_ENOMEM, "cannot serialise the model spec");
    return text;
}

int ar_spec_units(const ar_model_spec *s)
{
    return s->type == AR_MODEL_GPT ? s->n_layer + 2 : s->n_hidden + 1;
}

long ar_spec_param_count(const ar_model_spec *s)
{
    if (s->type == AR_MODEL_GPT) {
        long C = s->n_embd;
        long block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) +
                     (4 * C * C + C);
        return (long)s->vocab_size * C + (long)s->block_size * C + s->n_layer * block + 2 * C;
    }
    long total = 0, in = s->inputs;
    for (int i = 0; i <= s->n_hidden; i++) {
        long out = i < s->n_hidden ? s->hidden[i] : s->classes;
        total += in * out + out;
        in = out;
    }
    return total;
}
