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
    const float *data;
} entry;

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

int ar_stage_state_encode(const ar_stage *s, void **buf, size_t *len)
{
    int n = s->nparams * 3 + (s->has_tied_copy ? 1 : 0);
    entry *e = calloc((size_t)(n ? n : 1), sizeof *e);
    cJSON *root = cJSON_CreateObject();
    if (!e || !root) {
        free(e);
        cJSON_Delete(root);
        return ar_fail(AR_ENOMEM, "out of memory encoding the stage state");
    }
    int k = 0;
    for (int w = 0; w < 3; w++)
        for (int j = 0; j < s->nparams; j++) {
            const ar_param *p = s->params[j];
            snprintf(e[k].name, sizeof e[k].name, "%s%s", w == 0 ? "" : w == 1 ? "m." : "v.", p->name);
            e[k].p = p;
            e[k].data = w == 0 ? p->data : w == 1 ? p->m : p->v;
            k++;
        }
    if (s->has_tied_copy) {
        snprintf(e[k].name, sizeof e[k].name, "%s", s->tied_copy.name);
        e[k].p = &s->tied_copy;
        e[k].data = s->tied_copy.data;
        k++;
    }
    char step[32];
    snprintf(step, sizeof step, "%d", s->opt_step);
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

static int take(const ar_st_file *f, const char *origin, const char *name, const ar_param *p, float *dst)
{
    const ar_st_tensor *t = ar_st_find(f, name);
    if (!t)
        return ar_fail(AR_ENOTFOUND, "%s: no tensor \"%s\"", origin, name);
    if (t->dtype != AR_F32 || t->nbytes != (size_t)p->numel * sizeof(float) || t->ndim != p->ndim ||
        t->shape[0] != p->shape[0] || (p->ndim == 2 && t->shape[1] != p->shape[1]))
        return ar_fail(AR_ESHAPE, "%s: tensor \"%s\" has the wrong dtype or shape", origin, name);
    memcpy(dst, t->data, t->nbytes);
    return AR_OK;
}

int ar_stage_state_decode(ar_stage *s, const void *buf, size_t len, const char *origin)
{
    ar_st_file f;
    int rc = ar_st_parse(buf, len, &f);
    if (rc != AR_OK) {
        char why[512]; /* a copy: ar_fail writes where ar_last_error points */
        snprintf(why, sizeof why, "%s", ar_last_error());
        return ar_fail(rc, "%s: %s", origin, why);
    }
    /* check everything before writing anything */
    for (int pass = 0; pass < 2 && rc == AR_OK; pass++) {
        for (int w = 0; w < 3 && rc == AR_OK; w++)
            for (int j = 0; j < s->nparams && rc == AR_OK; j++) {
                ar_param *p = s->params[j];
                char name[160];
                snprintf(name, sizeof name, "%s%s", w == 0 ? "" : w == 1 ? "m." : "v.", p->name);
                float *dst = w == 0 ? p->data : w == 1 ? p->m : p->v;
                if (pass == 0) {
                    const ar_st_tensor *t = ar_st_find(&f, name);
                    if (!t || t->dtype != AR_F32 || t->nbytes != (size_t)p->numel * sizeof(float))
                        rc = ar_fail(AR_ESHAPE, "%s: tensor \"%s\" is missing or of the wrong shape",
                                     origin, name);
                } else {
                    rc = take(&f, origin, name, p, dst);
                }
            }
        if (rc == AR_OK && s->has_tied_copy) {
            const ar_st_tensor *t = ar_st_find(&f, s->tied_copy.name);
            if (pass == 0 && (!t || t->nbytes != (size_t)s->tied_copy.numel * sizeof(float)))
                rc = ar_fail(AR_ESHAPE, "%s: tensor \"%s\" is missing or of the wrong shape", origin,
                             s->tied_copy.name);
            else if (pass == 1)
                rc = take(&f, origin, s->tied_copy.name, &s->tied_copy, s->tied_copy.data);
        }
        if (rc == AR_OK && pass == 0) {
            const char *st = ar_st_meta(&f, "opt_step");
            char *end = NULL;
            long v = st ? strtol(st, &end, 10) : -1;
            if (!st || *end != '\0' || v < 0 || v > 2000000000L)
                rc = ar_fail(AR_EFORMAT, "%s: missing or bad opt_step", origin);
            else
                s->opt_step = (int)v;
        }
    }
    ar_st_free(&f);
    return rc;
}
