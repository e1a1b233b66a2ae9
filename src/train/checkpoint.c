/* Saving and loading checkpoints (see checkpoint.h). */
#include "train/checkpoint.h"

#include "core/core.h"
#include "nn/safetensors.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

static int join(char *buf, size_t size, const char *dir, const char *name)
{
    int n = snprintf(buf, size, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= size)
        return ar_fail(AR_EINVAL, "%s: path too long", dir);
    return AR_OK;
}

/* A checkpoint is a set of files that must agree: the weights, the moments
 * and the step they belong to. Each file is written atomically (temporary
 * file, fsync, rename), but a process killed between two renames would leave
 * a mix of two checkpoints. So a new set is first written whole into
 * DIR/.pending, state.json last (its presence there means the set is
 * complete), then moved into DIR file by file, state.json last, and .pending
 * removed. Whoever opens the checkpoint next settles it first: a complete
 * .pending is moved in (roll forward), an incomplete one is discarded and DIR
 * still holds the previous checkpoint, whole. */
static const char *const set_files[] = {"model.safetensors", "optimizer.safetensors", "spec.json",
                                        "state.json"};
#define NSET_FILES (sizeof set_files / sizeof set_files[0])

static int sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return ar_fail(AR_EIO, "%s: cannot open the folder: %s", dir, strerror(errno));
    int rc = fsync(fd) == 0 ? AR_OK : ar_fail(AR_EIO, "%s: cannot flush the folder: %s", dir, strerror(errno));
    close(fd);
    return rc;
}

/* Whether name is a temporary file of the atomic writer
 * (ar_write_file_atomic: "FILE.tmp.PID") for one of the set's files: what a
 * process killed in the middle of writing a file into .pending leaves. */
static int is_set_temporary(const char *name)
{
    for (size_t i = 0; i < NSET_FILES; i++) {
        size_t n = strlen(set_files[i]);
        if (strncmp(name, set_files[i], n) != 0 || strncmp(name + n, ".tmp.", 5) != 0 || !name[n + 5])
            continue;
        const char *pid = name + n + 5;
        while (*pid >= '0' && *pid <= '9')
            pid++;
        if (*pid == '\0')
            return 1;
    }
    return 0;
}

/* Remove the writer's temporary files from .pending; anything else there
 * is left alone (and then keeps .pending from being removed, with an error
 * that names it). */
static int remove_temporaries(const char *pending)
{
    DIR *d = opendir(pending);
    if (!d)
        return ar_fail(AR_EIO, "%s: cannot read the folder: %s", pending, strerror(errno));
    int rc = AR_OK;
    struct dirent *e;
    char path[4096];
    while (rc == AR_OK && (e = readdir(d)) != NULL) {
        if (!is_set_temporary(e->d_name))
            continue;
        if ((rc = join(path, sizeof path, pending, e->d_name)) == AR_OK && unlink(path) != 0 && errno != ENOENT)
            rc = ar_fail(AR_EIO, "%s: cannot remove: %s", path, strerror(errno));
    }
    closedir(d);
    return rc;
}

static int settle(const char *dir)
{
    char pending[4096], from[4096], to[4096], state[4096];
    int rc;
    if ((rc = join(pending, sizeof pending, dir, ".pending")) != AR_OK ||
        (rc = join(state, sizeof state, pending, "state.json")) != AR_OK)
        return rc;
    struct stat st;
    if (stat(pending, &st) != 0)
        return AR_OK; /* nothing half-done */
    int complete = stat(state, &st) == 0;
    for (size_t i = 0; i < NSET_FILES; i++) {
        if ((rc = join(from, sizeof from, pending, set_files[i])) != AR_OK ||
            (rc = join(to, sizeof to, dir, set_files[i])) != AR_OK)
            return rc;
        if (!complete) {
            if (unlink(from) != 0 && errno != ENOENT)
                return ar_fail(AR_EIO, "%s: cannot remove: %s", from, strerror(errno));
        } else if (rename(from, to) != 0 && errno != ENOENT) {
            /* ENOENT: moved in before an interruption */
            return ar_fail(AR_EIO, "%s: cannot move into place: %s", from, strerror(errno));
        }
    }
    /* a process killed while writing a file of the set leaves its temporary */
    if ((rc = remove_temporaries(pending)) != AR_OK)
        return rc;
    if (rmdir(pending) != 0)
        return ar_fail(AR_EIO, "%s: cannot remove: %s%s", pending, strerror(errno),
                       errno == ENOTEMPTY ? " (it holds files that are not part of a checkpoint)" : "");
    return sync_dir(dir);
}

static int count_params(ar_stage *const *stages, int nstages)
{
    int n = 0;
    for (int i = 0; i < nstages; i++)
        n += stages[i]->nparams;
    return n;
}

/* Write one safetensors file with a tensor per parameter; which selects the
 * buffer: 0 data, 1 m, 2 v. */
static int save_tensors(const char *path, ar_stage *const *stages, int nstages, int which,
                        int count_which)
{
    int n = count_params(stages, nstages) * count_which;
    ar_st_tensor *t = ar_calloc((size_t)(n ? n : 1), sizeof *t);
    if (!t)
        return AR_ENOMEM;
    int k = 0;
    for (int w = which; w < which + count_which; w++)
        for (int i = 0; i < nstages; i++)
            for (int j = 0; j < stages[i]->nparams; j++) {
                const ar_param *p = stages[i]->params[j];
                const char *prefix = w == 0 ? "" : w == 1 ? "m." : "v.";
                snprintf(t[k].name, sizeof t[k].name, "%s%s", prefix, p->name);
                t[k].dtype = AR_F32;
                t[k].ndim = p->ndim;
                t[k].shape[0] = p->shape[0];
                t[k].shape[1] = p->shape[1];
                t[k].nbytes = (size_t)p->numel * sizeof(float);
                t[k].data = w == 0 ? p->data : w == 1 ? p->m : p->v;
                k++;
            }
    const char *keys[] = {"format"};
    const char *vals[] = {"pt"};
    int rc = ar_st_save(path, t, k, keys, vals, 1);
    ar_free(t);
    return rc;
}

/* A float written with 9 significant digits reads back as the same float,
 * so a resumed run uses bit-identical hyper-parameters. */
static void add_float(cJSON *o, const char *key, float v)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%.9g", v);
    cJSON_AddRawToObject(o, key, buf);
}

static char *state_to_json(const ar_train_state *s)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    char buf[32];
    cJSON_AddNumberToObject(o, "step", (double)s->step);
    cJSON_AddNumberToObject(o, "opt_step", s->opt_step);
    snprintf(buf, sizeof buf, "%" PRIu64, s->seed);
    cJSON_AddStringToObject(o, "seed", buf);
    cJSON *rng = cJSON_AddArrayToObject(o, "data_rng");
    for (int i = 0; rng && i < 4; i++) {
        snprintf(buf, sizeof buf, "%016" PRIx64, s->data_rng[i]);
        cJSON_AddItemToArray(rng, cJSON_CreateString(buf));
    }
    cJSON_AddNumberToObject(o, "data_pos", (double)s->data_pos);
    cJSON_AddNumberToObject(o, "steps", (double)s->steps);
    cJSON_AddNumberToObject(o, "batch", s->batch);
    cJSON_AddNumberToObject(o, "micro_batches", s->micro_batches);
    cJSON_AddStringToObject(o, "optimizer", s->optimizer ? "sgd" : "adamw");
    add_float(o, "lr", s->lr);
    add_float(o, "min_lr", s->min_lr);
    cJSON_AddNumberToObject(o, "warmup", (double)s->warmup);
    add_float(o, "weight_decay", s->weight_decay);
    add_float(o, "beta1", s->beta1);
    add_float(o, "beta2", s->beta2);
    add_float(o, "eps", s->eps);
    add_float(o, "clip", s->clip);
    if (s->market_job > 0)
        cJSON_AddNumberToObject(o, "market_job", (double)s->market_job);
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    return text;
}

/* Write the set into `pending` (a folder that exists); state.json last. */
static int write_set(const char *pending, ar_stage *const *stages, int nstages,
                     const ar_train_state *state)
{
    char path[4096];
    int rc;
    if ((rc = join(path, sizeof path, pending, "model.safetensors")) != AR_OK ||
        (rc = save_tensors(path, stages, nstages, 0, 1)) != AR_OK)
        return rc;
    int sgd = stages[0]->optim.kind == AR_OPT_SGD;
    if ((rc = join(path, sizeof path, pending, "optimizer.safetensors")) != AR_OK ||
        (rc = save_tensors(path, stages, nstages, 1, sgd ? 1 : 2)) != AR_OK)
        return rc;
    char *spec = ar_spec_to_json(&stages[0]->spec);
    if (!spec)
        return AR_ENOMEM;
    if ((rc = join(path, sizeof path, pending, "spec.json")) == AR_OK)
        rc = ar_write_file_atomic(path, spec, strlen(spec));
    free(spec);
    if (rc != AR_OK)
        return rc;
    char *st = state_to_json(state);
    if (!st)
        return ar_fail(AR_ENOMEM, "cannot serialise the training state");
    if ((rc = join(path, sizeof path, pending, "state.json")) == AR_OK)
        rc = ar_write_file_atomic(path, st, strlen(st));
    free(st);
    return rc == AR_OK ? sync_dir(pending) : rc;
}

int ar_checkpoint_save(const char *dir, ar_stage *const *stages, int nstages,
                       const ar_train_state *state)
{
    char pending[4096];
    int rc;
    if ((rc = ar_mkdir_p(dir)) != AR_OK || (rc = settle(dir)) != AR_OK ||
        (rc = join(pending, sizeof pending, dir, ".pending")) != AR_OK ||
        (rc = ar_mkdir_p(pending)) != AR_OK ||
        (rc = write_set(pending, stages, nstages, state)) != AR_OK)
        return rc;
    return settle(dir); /* moves the complete set into place */
}

static int load_into(const ar_st_file *f, const char *path, ar_stage *const *stages, int nstages,
                     int which, const char *prefix)
{
    for (int i = 0; i < nstages; i++)
        for (int j = 0; j < stages[i]->nparams; j++) {
            ar_param *p = stages[i]->params[j];
            char name[160];
            snprintf(name, sizeof name, "%s%s", prefix, p->name);
            const ar_st_tensor *t = ar_st_find(f, name);
            if (!t)
                return ar_fail(AR_ENOTFOUND, "%s: no tensor \"%s\"", path, name);
            int shape_ok = t->dtype == AR_F32 && t->ndim == p->ndim && t->shape[0] == p->shape[0] &&
                           (p->ndim == 1 || t->shape[1] == p->shape[1]);
            if (!shape_ok)
                return ar_fail(AR_ESHAPE, "%s: tensor \"%s\" has the wrong dtype or shape", path, name);
            float *dst = which == 0 ? p->data : which == 1 ? p->m : p->v;
            memcpy(dst, t->data, (size_t)p->numel * sizeof(float));
        }
    /* the copies of tied weights kept by a head's stage read the same tensor */
    for (int i = 0; which == 0 && i < nstages; i++) {
        ar_param *c = stages[i]->has_tied_copy ? &stages[i]->tied_copy : NULL;
        if (!c)
            continue;
        const ar_st_tensor *t = ar_st_find(f, c->name);
        if (!t || t->dtype != AR_F32 || t->nbytes != (size_t)c->numel * sizeof(float))
            return ar_fail(AR_ENOTFOUND, "%s: no tensor \"%s\" of the right shape", path, c->name);
        memcpy(c->data, t->data, t->nbytes);
    }
    return AR_OK;
}

int ar_load_weights_file(const char *path, ar_stage *const *stages, int nstages, const char *prefix)
{
    ar_st_file f;
    int rc = ar_st_load(path, &f);
    if (rc != AR_OK)
        return rc;
    rc = load_into(&f, path, stages, nstages, 0, prefix ? prefix : "");
    ar_st_free(&f);
    return rc;
}

int ar_checkpoint_load_params(const char *dir, ar_stage *const *stages, int nstages,
                              int with_optimizer)
{
    char path[4096];
    int rc;
    if ((rc = settle(dir)) != AR_OK || (rc = join(path, sizeof path, dir, "model.safetensors")) != AR_OK ||
        (rc = ar_load_weights_file(path, stages, nstages, "")) != AR_OK)
        return rc;
    if (!with_optimizer)
        return AR_OK;
    if ((rc = join(path, sizeof path, dir, "optimizer.safetensors")) != AR_OK)
        return rc;
    ar_st_file f;
    if ((rc = ar_st_load(path, &f)) != AR_OK)
        return rc;
    rc = load_into(&f, path, stages, nstages, 1, "m.");
    if (rc == AR_OK && stages[0]->optim.kind != AR_OPT_SGD)
        rc = load_into(&f, path, stages, nstages, 2, "v.");
    ar_st_free(&f);
    return rc;
}

static int get_number(const cJSON *o, const char *key, const char *path, double *out)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(it))
        return ar_fail(AR_EFORMAT, "%s: missing or non-numeric \"%s\"", path, key);
    *out = it->valuedouble;
    return AR_OK;
}

int ar_checkpoint_load_state(const char *dir, ar_train_state *s)
{
    char path[4096];
    int rc = settle(dir);
    if (rc == AR_OK)
        rc = join(path, sizeof path, dir, "state.json");
    if (rc != AR_OK)
        return rc;
    char *text;
    size_t len;
    if ((rc = ar_read_file(path, &text, &len)) != AR_OK)
        return rc;
    cJSON *o = cJSON_ParseWithLength(text, len);
    ar_free(text);
    if (!o || !cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return ar_fail(AR_EFORMAT, "%s: malformed JSON", path);
    }
    memset(s, 0, sizeof *s);
    double v = 0;
#define NUM(key, field, type)                                                                      \
    if ((rc = get_number(o, key, path, &v)) != AR_OK)                                              \
        goto done;                                                                                 \
    s->field = (type)v
    NUM("step", step, long);
    NUM("opt_step", opt_step, int);
    NUM("data_pos", data_pos, long);
    NUM("steps", steps, long);
    NUM("batch", batch, int);
    NUM("micro_batches", micro_batches, int);
    NUM("lr", lr, float);
    NUM("min_lr", min_lr, float);
    NUM("warmup", warmup, long);
    NUM("weight_decay", weight_decay, float);
    NUM("beta1", beta1, float);
    NUM("beta2", beta2, float);
    NUM("eps", eps, float);
    NUM("clip", clip, float);
#undef NUM
    const cJSON *seed = cJSON_GetObjectItemCaseSensitive(o, "seed");
    const cJSON *rng = cJSON_GetObjectItemCaseSensitive(o, "data_rng");
    const cJSON *opt = cJSON_GetObjectItemCaseSensitive(o, "optimizer");
    if (!cJSON_IsString(seed) || !cJSON_IsArray(rng) || cJSON_GetArraySize(rng) != 4 ||
        !cJSON_IsString(opt)) {
        rc = ar_fail(AR_EFORMAT, "%s: missing seed, data_rng or optimizer", path);
        goto done;
    }
    s->seed = strtoull(seed->valuestring, NULL, 10);
    for (int i = 0; i < 4; i++) {
        const cJSON *e = cJSON_GetArrayItem(rng, i);
        if (!cJSON_IsString(e)) {
            rc = ar_fail(AR_EFORMAT, "%s: data_rng[%d] is not a string", path, i);
            goto done;
        }
        s->data_rng[i] = strtoull(e->valuestring, NULL, 16);
    }
    s->optimizer = strcmp(opt->valuestring, "sgd") == 0;
    const cJSON *job = cJSON_GetObjectItemCaseSensitive(o, "market_job"); /* optional */
    if (cJSON_IsNumber(job) && job->valuedouble >= 1 && job->valuedouble < 9e15)
        s->market_job = (int64_t)job->valuedouble;
    if (s->step < 0 || s->batch < 1 || s->micro_batches < 1 || s->steps < 0)
        rc = ar_fail(AR_EFORMAT, "%s: values out of range", path);
done:
    cJSON_Delete(o);
    return rc;
}

int ar_checkpoint_open_stage(const char *dir, int max_B, ar_stage *stage)
{
    char path[4096];
    int rc = settle(dir);
    if (rc == AR_OK)
        rc = join(path, sizeof path, dir, "spec.json");
    if (rc != AR_OK)
        return rc;
    ar_model_spec spec;
    if ((rc = ar_spec_load(path, &spec)) != AR_OK)
        return rc;
    if ((rc = ar_spec_validate(&spec, path)) != AR_OK)
        return rc;
    ar_optim_config oc = {0};
    if ((rc = ar_stage_create(stage, &spec, 0, ar_spec_units(&spec), max_B, 1, 0, &oc)) != AR_OK)
        return rc;
    if ((rc = ar_checkpoint_load_params(dir, &stage, 1, 0)) != AR_OK)
        ar_stage_destroy(stage);
    return rc;
}
