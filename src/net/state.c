/* A stage's state as safetensors bytes in memory: what Save streams out and
 * Restore streams in (the same layout as the checkpoint files). */
#include "net/remote.h"

#include "core/core.h"
#include "nn/safetensors.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char name[160];
    const ar_param *p;
    float *data;
} entry;

/* Every tensor of the parts, in a fixed order: each parameter's values, then
 * its AdamW m, then v (stage parameters before the rank's), then the tied
 * copy. *out is malloc'd. */
static int list_entries(const ar_state_parts *parts, entry **out, int *count)
{
    const ar_stage *s = parts->stage;
    const ar_tp_rank *r = parts->rank;
    int ns = s ? s->nparams : 0, np = ns;
    for (int b = 0; r && b < r->nblocks; b++)
        np += AR_SHARD_NPARAMS - r->shards[b].first_param;
    int n = np * 3 + (s && s->has_tied_copy ? 1 : 0);
    entry *e = calloc((size_t)(n ? n : 1), sizeof *e);
    ar_param **params = calloc((size_t)(np ? np : 1), sizeof *params);
    if (!e || !params) {
        free(e);
        free(params);
        return ar_fail(AR_ENOMEM, "out of memory listing the stage state");
    }
    for (int j = 0; j < ns; j++)
        params[j] = s->params[j];
    int at = ns;
    for (int b = 0; r && b < r->nblocks; b++)
        for (int i = r->shards[b].first_param; i < AR_SHARD_NPARAMS; i++)
            params[at++] = &r->shards[b].params[i];
    int k = 0;
    for (int w = 0; w < 3; w++)
        for (int j = 0; j < np; j++) {
            ar_param *p = params[j];
            snprintf(e[k].name, sizeof e[k].name, "%s%s", w == 0 ? "" : w == 1 ? "m." : "v.", p->name);
            e[k].p = p;
            e[k].data = w == 0 ? p->data : w == 1 ? p->m : p->v;
            k++;
        }
    free(params);
    if (s && s->has_tied_copy) {
        snprintf(e[k].name, sizeof e[k].name, "%s", s->tied_copy.name);
        e[k].p = &s->tied_copy;
        e[k].data = s->tied_copy.data;
        k++;
    }
    *out = e;
    *count = k;
    return AR_OK;
}

static int parts_opt_step(const ar_state_parts *parts)
{
    return parts->stage ? parts->stage->opt_step : parts->rank ? parts->rank->opt_step : 0;
}

static int add_tensor(cJSON *root, const char *name, const ar_param *p, uint64_t *offset)
{
    cJSON *o = cJSON_AddObjectToObject(root, name);
    if (!o || !cJSON_AddStringToObject(o, "dtype", "F32"))
        return -1;
    cJSON *shape = cJSON_AddArrayToObject(o, "shape");
    cJSON *offs = cJSON_AddArrayToObject(o, "data_offsets");
    if (!shape || !offs)
        return -1;
    for (int d = 0; d < p->ndim; d++)
        cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)p->shape[d]));
    uint64_t nb = (uint64_t)p->numel * sizeof(float);
    cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)*offset));
    cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(*offset + nb)));
    *offset += nb;
    return 0;
}

int ar_state_encode(const ar_state_parts *parts, void **buf, size_t *len)
{
    entry *e;
    int k;
    int rc = list_entries(parts, &e, &k);
    if (rc != AR_OK)
        return rc;
    cJSON *root = cJSON_CreateObject();
    if (!root) {
        free(e);
        return ar_fail(AR_ENOMEM, "out of memory encoding the stage state");
    }
    char step[32];
    snprintf(step, sizeof step, "%d", parts_opt_step(parts));
    cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
    int bad = !meta || !cJSON_AddStringToObject(meta, "opt_step", step);
    uint64_t offset = 0;
    for (int i = 0; i < k && !bad; i++)
        bad = add_tensor(root, e[i].name, e[i].p, &offset) != 0;
    char *json = bad ? NULL : cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!json) {
        free(e);
        return ar_fail(AR_ENOMEM, "out of memory encoding the stage state");
    }
    size_t jlen = strlen(json), hlen = (jlen + 7) / 8 * 8;
    size_t total = 8 + hlen + (size_t)offset;
    unsigned char *out = malloc(total);
    if (!out) {
        free(json);
        free(e);
        return ar_fail(AR_ENOMEM, "out of memory for a %zu byte stage state", total);
    }
    for (int b = 0; b < 8; b++)
        out[b] = (unsigned char)((uint64_t)hlen >> (8 * b));
    memcpy(out + 8, json, jlen);
    memset(out + 8 + jlen, ' ', hlen - jlen);
    size_t at = 8 + hlen;
    for (int i = 0; i < k; i++) {
        size_t nb = (size_t)e[i].p->numel * sizeof(float);
        memcpy(out + at, e[i].data, nb);
        at += nb;
    }
    free(json);
    free(e);
    *buf = out;
    *len = total;
    return AR_OK;
}

int ar_state_decode(const ar_state_parts *parts, const void *buf, size_t len, const char *origin)
{
    ar_st_file f;
    int rc = ar_st_parse(buf, len, &f);
    if (rc != AR_OK) {
        char why[512]; /* a copy: ar_fail writes where ar_last_error points */
        snprintf(why, sizeof why, "%s", ar_last_error());
        return ar_fail(rc, "%s: %s", origin, why);
    }
    entry *e = NULL;
    int k = 0;
    if ((rc = list_entries(parts, &e, &k)) != AR_OK) {
        ar_st_free(&f);
        return rc;
    }
    /* check everything before writing anything */
    for (int i = 0; i < k && rc == AR_OK; i++) {
        const ar_param *p = e[i].p;
        const ar_st_tensor *t = ar_st_find(&f, e[i].name);
        if (!t || t->dtype != AR_F32 || t->nbytes != (size_t)p->numel * sizeof(float) ||
            t->ndim != p->ndim || t->shape[0] != p->shape[0] || (p->ndim == 2 && t->shape[1] != p->shape[1]))
            rc = ar_fail(AR_ESHAPE, "%s: tensor \"%s\" is missing or of the wrong dtype or shape", origin,
                         e[i].name);
    }
    long step = -1;
    if (rc == AR_OK) {
        const char *st = ar_st_meta(&f, "opt_step");
        char *end = NULL;
        step = st ? strtol(st, &end, 10) : -1;
        if (!st || *end != '\0' || step < 0 || step > 2000000000L)
            rc = ar_fail(AR_EFORMAT, "%s: missing or bad opt_step", origin);
    }
    for (int i = 0; i < k && rc == AR_OK; i++) {
        const ar_st_tensor *t = ar_st_find(&f, e[i].name);
        memcpy(e[i].data, t->data, t->nbytes);
    }
    if (rc == AR_OK) {
        if (parts->stage)
            parts->stage->opt_step = (int)step;
        if (parts->rank)
            parts->rank->opt_step = (int)step;
    }
    free(e);
    ar_st_free(&f);
    return rc;
}
