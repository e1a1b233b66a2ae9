/* Audits by replay: the stage's record of its last steps, and the replay. */
#include "train/audit.h"

#include "core/core.h"
#include "core/digest.h"

#include <stdlib.h>
#include <string.h>

static void mb_free(ar_audit_mb *b)
{
    free(b->act);
    free(b->targets);
    free(b->grad);
    memset(b, 0, sizeof *b);
}

void ar_audit_material_free(ar_audit_material *m)
{
    ar_free(m->params);
    ar_free(m->m);
    ar_free(m->v);
    for (int i = 0; m->mb && i < m->M; i++)
        mb_free(&m->mb[i]);
    free(m->mb);
    memset(m, 0, sizeof *m);
    m->step = -1;
}

int ar_audit_keep_init(ar_audit_keep *k)
{
    memset(k, 0, sizeof *k);
    for (int i = 0; i < AR_AUDIT_KEEP_STEPS; i++)
        k->slot[i].step = -1;
    if (pthread_mutex_init(&k->mu, NULL) != 0)
        return ar_fail(AR_EINTERNAL, "mutex init failed");
    return AR_OK;
}

void ar_audit_keep_destroy(ar_audit_keep *k)
{
    for (int i = 0; i < AR_AUDIT_KEEP_STEPS; i++)
        ar_audit_material_free(&k->slot[i]);
    pthread_mutex_destroy(&k->mu);
}

void ar_audit_keep_clear(ar_audit_keep *k)
{
    pthread_mutex_lock(&k->mu);
    for (int i = 0; i < AR_AUDIT_KEEP_STEPS; i++)
        ar_audit_material_free(&k->slot[i]);
    pthread_mutex_unlock(&k->mu);
}

static void *dup_bytes(const void *p, size_t n)
{
    if (!n)
        return NULL;
    void *q = malloc(n);
    if (q)
        memcpy(q, p, n);
    return q;
}

static int keep_begin(ar_audit_keep *k, const ar_stage *s, int64_t step, int M, int deferred)
{
    pthread_mutex_lock(&k->mu);
    /* the oldest slot takes the new step */
    int i = 0;
    for (int j = 1; j < AR_AUDIT_KEEP_STEPS; j++)
        if (k->slot[j].step < k->slot[i].step)
            i = j;
    ar_audit_material *m = &k->slot[i];
    int rc = AR_OK;
    if (m->param_floats != s->param_floats || !m->params) {
        ar_audit_material_free(m);
        m->param_floats = s->param_floats;
        if (!(m->params = ar_calloc((size_t)s->param_floats, sizeof(float))) ||
            !(m->m = ar_calloc((size_t)s->param_floats, sizeof(float))) ||
            !(m->v = ar_calloc((size_t)s->param_floats, sizeof(float))))
            rc = AR_ENOMEM;
    }
    for (int j = 0; m->mb && j < m->M; j++)
        mb_free(&m->mb[j]);
    free(m->mb);
    m->mb = NULL;
    m->step = -1;
    if (rc == AR_OK && !(m->mb = calloc((size_t)M, sizeof *m->mb)))
        rc = AR_ENOMEM;
    if (rc == AR_OK) {
        if (!deferred) {
            size_t n = (size_t)s->param_floats * sizeof(float);
            memcpy(m->params, s->mem_params, n);
            memcpy(m->m, s->mem_m, n);
            memcpy(m->v, s->mem_v, n);
        }
        m->opt_step = s->opt_step;
        m->M = M;
        m->step = step;
        m->has_update = 0;
        m->copying = deferred;
        k->cur = i;
    }
    pthread_mutex_unlock(&k->mu);
    return rc == AR_OK ? AR_OK : ar_fail(rc, "out of memory keeping step %lld for audits", (long long)step);
}

int ar_audit_keep_begin(ar_audit_keep *k, const ar_stage *s, int64_t step, int M)
{
    return keep_begin(k, s, step, M, 0);
}

int ar_audit_keep_begin_deferred(ar_audit_keep *k, const ar_stage *s, int64_t step, int M)
{
    return keep_begin(k, s, step, M, 1);
}

void ar_audit_keep_copy_state(ar_audit_keep *k, const ar_stage *s)
{
    pthread_mutex_lock(&k->mu);
    ar_audit_material *m = &k->slot[k->cur];
    int copy = m->copying && m->params && m->param_floats == s->param_floats;
    pthread_mutex_unlock(&k->mu);
    if (!copy)
        return;
    /* the slot is the recording one and marked copying: nobody else reads
     * or writes its state (ar_audit_keep_get skips it) */
    size_t n = (size_t)s->param_floats * sizeof(float);
    memcpy(m->params, s->mem_params, n);
    memcpy(m->m, s->mem_m, n);
    memcpy(m->v, s->mem_v, n);
    pthread_mutex_lock(&k->mu);
    m->copying = 0;
    pthread_mutex_unlock(&k->mu);
}

int ar_audit_keep_act(ar_audit_keep *k, int mb, int rows, const void *act, size_t nbytes, const int32_t *targets,
                      size_t ntargets)
{
    pthread_mutex_lock(&k->mu);
    ar_audit_material *m = &k->slot[k->cur];
    int rc = AR_OK;
    if (m->step >= 0 && mb >= 0 && mb < m->M) {
        ar_audit_mb *b = &m->mb[mb];
        mb_free(b);
        b->rows = rows;
        b->act_bytes = nbytes;
        b->ntargets = ntargets;
        if ((nbytes && !(b->act = dup_bytes(act, nbytes))) ||
            (ntargets && !(b->targets = dup_bytes(targets, ntargets * sizeof(int32_t)))))
            rc = ar_fail(AR_ENOMEM, "out of memory keeping a micro-batch for audits");
    }
    pthread_mutex_unlock(&k->mu);
    return rc;
}

int ar_audit_keep_grad(ar_audit_keep *k, int mb, const float *grad, size_t nbytes, double loss)
{
    pthread_mutex_lock(&k->mu);
    ar_audit_material *m = &k->slot[k->cur];
    int rc = AR_OK;
    if (m->step >= 0 && mb >= 0 && mb < m->M) {
        ar_audit_mb *b = &m->mb[mb];
        free(b->grad);
        b->grad = NULL;
        b->grad_bytes = nbytes;
        b->loss = loss;
        if (nbytes && !(b->grad = dup_bytes(grad, nbytes)))
            rc = ar_fail(AR_ENOMEM, "out of memory keeping a gradient for audits");
    }
    pthread_mutex_unlock(&k->mu);
    return rc;
}

void ar_audit_keep_update(ar_audit_keep *k, int64_t step, float lr, float scale)
{
    pthread_mutex_lock(&k->mu);
    for (int i = 0; i < AR_AUDIT_KEEP_STEPS; i++)
        if (k->slot[i].step == step) {
            k->slot[i].has_update = 1;
            k->slot[i].lr = lr;
            k->slot[i].scale = scale;
        }
    pthread_mutex_unlock(&k->mu);
}

int ar_audit_keep_get(ar_audit_keep *k, int64_t step, ar_audit_material *out)
{
    memset(out, 0, sizeof *out);
    out->step = -1;
    pthread_mutex_lock(&k->mu);
    const ar_audit_material *m = NULL;
    for (int i = 0; i < AR_AUDIT_KEEP_STEPS; i++)
        if (k->slot[i].step == step && step >= 0 && !k->slot[i].copying)
            m = &k->slot[i];
    int rc = AR_OK;
    if (!m) {
        rc = ar_fail(AR_ENOTFOUND, "step %lld is no longer kept for audits", (long long)step);
        goto out;
    }
    *out = *m;
    out->params = out->m = out->v = NULL;
    out->mb = NULL;
    out->M = 0;
    size_t n = (size_t)m->param_floats;
    if (!(out->params = ar_calloc(n, sizeof(float))) || !(out->m = ar_calloc(n, sizeof(float))) ||
        !(out->v = ar_calloc(n, sizeof(float))) || !(out->mb = calloc((size_t)m->M, sizeof *out->mb))) {
        rc = AR_ENOMEM;
        goto out;
    }
    out->M = m->M;
    memcpy(out->params, m->params, n * sizeof(float));
    memcpy(out->m, m->m, n * sizeof(float));
    memcpy(out->v, m->v, n * sizeof(float));
    for (int i = 0; i < m->M; i++) {
        const ar_audit_mb *a = &m->mb[i];
        ar_audit_mb *b = &out->mb[i];
        *b = *a;
        b->act = dup_bytes(a->act, a->act_bytes);
        b->targets = dup_bytes(a->targets, a->ntargets * sizeof(int32_t));
        b->grad = dup_bytes(a->grad, a->grad_bytes);
        if ((a->act_bytes && !b->act) || (a->ntargets && !b->targets) || (a->grad_bytes && !b->grad)) {
            b->act_bytes = b->ntargets = b->grad_bytes = 0; /* freed below as far as it got */
            rc = AR_ENOMEM;
            goto out;
        }
    }
out:
    pthread_mutex_unlock(&k->mu);
    if (rc == AR_ENOMEM) {
        ar_audit_material_free(out);
        return ar_fail(AR_ENOMEM, "out of memory copying audit material");
    }
    return rc;
}

/* ---- the material on the wire ------------------------------------------------ */

#define MATERIAL_MAGIC 0x4d415241u /* "ARAM" */
#define MATERIAL_HEADER 48
#define MB_HEADER 36

typedef struct {
    uint8_t *p;
    size_t at, n;
} wbuf;

static void put(wbuf *w, const void *x, size_t len)
{
    if (len)
        memcpy(w->p + w->at, x, len);
    w->at += len;
}

int ar_audit_material_encode(const ar_audit_material *m, void **buf, size_t *n)
{
    *buf = NULL;
    *n = 0;
    size_t state = (size_t)m->param_floats * sizeof(float);
    size_t total = MATERIAL_HEADER + 3 * state;
    for (int i = 0; i < m->M; i++)
        total += MB_HEADER + m->mb[i].act_bytes + m->mb[i].ntargets * sizeof(int32_t) + m->mb[i].grad_bytes;
    wbuf w = {.p = malloc(total), .n = total};
    if (!w.p)
        return ar_fail(AR_ENOMEM, "out of memory encoding audit material");
    uint32_t magic = MATERIAL_MAGIC, pad = 0;
    int64_t step = m->step, pf = m->param_floats;
    int32_t M = m->M, opt = m->opt_step, upd = m->has_update;
    put(&w, &magic, 4);
    put(&w, &pad, 4);
    put(&w, &step, 8);
    put(&w, &pf, 8);
    put(&w, &M, 4);
    put(&w, &opt, 4);
    put(&w, &upd, 4);
    put(&w, &m->lr, 4);
    put(&w, &m->scale, 4);
    put(&w, &pad, 4);
    put(&w, m->params, state);
    put(&w, m->m, state);
    put(&w, m->v, state);
    for (int i = 0; i < m->M; i++) {
        const ar_audit_mb *b = &m->mb[i];
        int32_t rows = b->rows;
        uint64_t ab = b->act_bytes, nt = b->ntargets, gb = b->grad_bytes;
        put(&w, &rows, 4);
        put(&w, &ab, 8);
        put(&w, &nt, 8);
        put(&w, &gb, 8);
        put(&w, &b->loss, 8);
        put(&w, b->act, b->act_bytes);
        put(&w, b->targets, b->ntargets * sizeof(int32_t));
        put(&w, b->grad, b->grad_bytes);
    }
    *buf = w.p;
    *n = w.at;
    return AR_OK;
}

typedef struct {
    const uint8_t *p;
    size_t at, n;
} rbuf;

static int take(rbuf *r, void *x, size_t len)
{
    if (len > r->n - r->at)
        return 0;
    memcpy(x, r->p + r->at, len);
    r->at += len;
    return 1;
}

/* len bytes into a fresh buffer (NULL when len is 0); 0 when short or no memory */
static int take_dup(rbuf *r, void **x, size_t len)
{
    *x = NULL;
    if (!len)
        return 1;
    if (len > r->n - r->at || !(*x = malloc(len)))
        return 0;
    return take(r, *x, len);
}

int ar_audit_material_decode(const void *buf, size_t n, long param_floats, int max_mb, int max_rows,
                             const char *origin, ar_audit_material *out)
{
    memset(out, 0, sizeof *out);
    out->step = -1;
    rbuf r = {.p = buf, .n = n};
    uint32_t magic = 0, pad;
    int64_t step, pf;
    int32_t M, opt, upd;
    float lr, scale;
    if (!take(&r, &magic, 4) || magic != MATERIAL_MAGIC || !take(&r, &pad, 4) || !take(&r, &step, 8) ||
        !take(&r, &pf, 8) || !take(&r, &M, 4) || !take(&r, &opt, 4) || !take(&r, &upd, 4) || !take(&r, &lr, 4) ||
        !take(&r, &scale, 4) || !take(&r, &pad, 4))
        return ar_fail(AR_EPROTO, "%s: not audit material", origin);
    if (pf != param_floats || M < 1 || M > max_mb || step < 0 || opt < 0)
        return ar_fail(AR_EPROTO, "%s: audit material of %lld parameters and %d micro-batches (expected %ld and at most %d)",
                       origin, (long long)pf, M, param_floats, max_mb);
    size_t state = (size_t)pf * sizeof(float);
    if (n - r.at < 3 * state)
        return ar_fail(AR_EPROTO, "%s: audit material cut short", origin);
    out->param_floats = pf;
    out->opt_step = opt;
    out->has_update = upd != 0;
    out->lr = lr;
    out->scale = scale;
    int rc = AR_OK;
    if (!(out->params = ar_calloc((size_t)pf, sizeof(float))) || !(out->m = ar_calloc((size_t)pf, sizeof(float))) ||
        !(out->v = ar_calloc((size_t)pf, sizeof(float))) || !(out->mb = calloc((size_t)M, sizeof *out->mb))) {
        rc = ar_fail(AR_ENOMEM, "out of memory for audit material");
        goto fail;
    }
    take(&r, out->params, state);
    take(&r, out->m, state);
    take(&r, out->v, state);
    out->M = M;
    for (int i = 0; i < M; i++) {
        ar_audit_mb *b = &out->mb[i];
        int32_t rows;
        uint64_t ab, nt, gb;
        double loss;
        if (!take(&r, &rows, 4) || !take(&r, &ab, 8) || !take(&r, &nt, 8) || !take(&r, &gb, 8) ||
            !take(&r, &loss, 8) || rows < 1 || rows > max_rows || ab > n || nt > n / sizeof(int32_t) || gb > n) {
            rc = ar_fail(AR_EPROTO, "%s: audit material's micro-batch %d is malformed", origin, i);
            goto fail;
        }
        b->rows = rows;
        b->loss = loss;
        if (!take_dup(&r, &b->act, (size_t)ab) || !take_dup(&r, (void **)&b->targets, (size_t)nt * sizeof(int32_t)) ||
            !take_dup(&r, (void **)&b->grad, (size_t)gb)) {
            rc = ar_fail(AR_EPROTO, "%s: audit material's micro-batch %d is cut short", origin, i);
            goto fail;
        }
        b->act_bytes = (size_t)ab;
        b->ntargets = (size_t)nt;
        b->grad_bytes = (size_t)gb;
    }
    if (r.at != n) {
        rc = ar_fail(AR_EPROTO, "%s: %zu bytes after the audit material", origin, n - r.at);
        goto fail;
    }
    out->step = step;
    return AR_OK;
fail:
    ar_audit_material_free(out);
    return rc;
}

/* SHA-256 of the micro-batches' digests of one kind, in micro-batch order
 * (pipeline.c, combine_digests). */
static int combine(uint8_t (*mbd)[4][32], int M, int k, uint8_t out[32])
{
    ar_sha256 h = {0};
    int rc = ar_sha256_begin(&h);
    for (int mb = 0; mb < M && rc == AR_OK; mb++)
        rc = ar_sha256_add(&h, mbd[mb][k], 32);
    if (rc == AR_OK)
        rc = ar_sha256_end(&h, out);
    ar_sha256_free(&h);
    return rc;
}

int ar_audit_replay(ar_stage *s, const ar_audit_material *m, uint64_t seed, ar_step_digests *out,
                    uint8_t state_after[32])
{
    if (s->has_tied_copy || s->tied_owner || s->expects_tied || s->tp_nranks)
        return ar_fail(AR_EINVAL, "a stage sharing a tied weight or split over a group cannot be replayed alone");
    if (m->param_floats != s->param_floats || m->M < 1 || !m->has_update)
        return ar_fail(AR_EINVAL, "audit material of %ld parameters and %d micro-batches (update %s) for a stage of %ld",
                       m->param_floats, m->M, m->has_update ? "known" : "missing", s->param_floats);
    size_t n = (size_t)s->param_floats * sizeof(float);
    memcpy(s->mem_params, m->params, n);
    memcpy(s->mem_m, m->m, n);
    memcpy(s->mem_v, m->v, n);
    s->opt_step = m->opt_step;
    int last = ar_stage_is_last(s);
    size_t in_width = ar_stage_in_width(s), out_width = ar_stage_out_width(s);
    int rc = ar_stage_state_digest(s, out->d[AR_DIGEST_STATE]);
    uint8_t (*mbd)[4][32] = calloc((size_t)m->M, sizeof *mbd);
    if (!mbd)
        return ar_fail(AR_ENOMEM, "out of memory for a replay");
    ar_stage_zero_grad(s);
    for (int i = 0; rc == AR_OK && i < m->M; i++) {
        const ar_audit_mb *b = &m->mb[i];
        if (b->rows < 1 || b->rows > s->max_B || b->act_bytes != (size_t)b->rows * s->T * in_width * 4 ||
            b->ntargets != (size_t)b->rows * s->T ||
            (!last && b->grad_bytes != (size_t)b->rows * s->T * out_width * 4)) {
            rc = ar_fail(AR_ESHAPE, "audit material: micro-batch %d of %d rows does not fit the stage", i, b->rows);
            break;
        }
        /* the same dropout stream as the stage's (pipeline.c, mb_seed) */
        uint64_t drop = ar_hash3(seed, (uint64_t)m->step, (uint64_t)i);
        const float *y = NULL, *din = NULL;
        double loss = b->loss;
        if ((rc = ar_digest_act(b->act, b->act_bytes, b->targets, b->ntargets, mbd[i][0])) != AR_OK ||
            (rc = ar_stage_forward(s, 0, b->rows, b->act, 1, drop, &y)) != AR_OK ||
            (rc = ar_digest_act(y, (size_t)b->rows * s->T * out_width * 4, b->targets, b->ntargets, mbd[i][1])) != AR_OK)
            break;
        if (last) {
            float scale = 1.0f / ((float)b->rows * (float)s->T * (float)m->M);
            if ((rc = ar_digest_grad(NULL, 0, 0.0, mbd[i][2])) != AR_OK ||
                (rc = ar_stage_loss(s, 0, b->rows, b->targets, &loss, NULL)) != AR_OK ||
                (rc = ar_stage_backward(s, 0, b->rows, b->targets, NULL, scale, drop, &din)) != AR_OK)
                break;
        } else if ((rc = ar_digest_grad(b->grad, b->grad_bytes, loss, mbd[i][2])) != AR_OK ||
                   (rc = ar_stage_backward(s, 0, b->rows, NULL, b->grad, 0.0f, drop, &din)) != AR_OK) {
            break;
        }
        size_t nin = din ? (size_t)b->rows * s->T * s->layers[0]->in_floats_per_row : 0;
        rc = ar_digest_grad(din, nin * sizeof(float), loss, mbd[i][3]);
    }
    for (int k = 0; rc == AR_OK && k < 4; k++)
        rc = combine(mbd, m->M, k, out->d[AR_DIGEST_ACT_IN + k]);
    free(mbd);
    /* a weight tied inside the stage (a one-stage GPT's embedding and head)
     * gets its copy's gradient, as the stage's NORM does it (pipeline.c) */
    if (rc == AR_OK)
        ar_stage_fold_tied(s);
    if (rc == AR_OK)
        rc = ar_stage_update(s, m->lr, m->scale);
    if (rc == AR_OK)
        rc = ar_stage_state_digest(s, state_after);
    return rc;
}

int ar_audit_compare(const ar_step_digests *replayed, const uint8_t state_after[32],
                     const ar_step_digests *committed, const uint8_t committed_after[32])
{
    static const char *names[AR_DIGEST_KINDS] = {"state before the step", "activations received",
                                                 "activations produced", "gradients received",
                                                 "gradients sent"};
    for (int k = 0; k < AR_DIGEST_KINDS; k++)
        if (memcmp(replayed->d[k], committed->d[k], 32) != 0)
            return ar_fail(AR_EPROTO, "the replay's %s differ from the committed digest", names[k]);
    if (memcmp(state_after, committed_after, 32) != 0)
        return ar_fail(AR_EPROTO, "the replay's state after the step differs from the committed digest");
    return AR_OK;
}

int ar_audit_stage(ar_stage *verifier, const ar_audit_material *m, uint64_t seed, const ar_step_digests *all,
                   int S, int stage, const uint8_t state_after[32])
{
    return ar_audit_stage_ex(verifier, m, seed, all, S, stage, state_after, 1, 1);
}

int ar_audit_stage_ex(ar_stage *verifier, const ar_audit_material *m, uint64_t seed, const ar_step_digests *all,
                      int S, int stage, const uint8_t state_after[32], int check_up, int check_down)
{
    if (stage < 0 || stage >= S)
        return ar_fail(AR_EINVAL, "stage %d of %d", stage, S);
    /* the provider's inputs are what its neighbours say they sent: a stage
     * cannot blame a neighbour for what it computed */
    if (check_up && stage > 0 && memcmp(all[stage].d[AR_DIGEST_ACT_IN], all[stage - 1].d[AR_DIGEST_ACT_OUT], 32) != 0)
        return ar_fail(AR_EPROTO, "stage %d says it received other activations than stage %d sent", stage,
                       stage - 1);
    if (check_down && stage + 1 < S && memcmp(all[stage].d[AR_DIGEST_GRAD_IN], all[stage + 1].d[AR_DIGEST_GRAD_OUT], 32) != 0)
        return ar_fail(AR_EPROTO, "stage %d says it received other gradients than stage %d sent", stage,
                       stage + 1);
    ar_step_digests got;
    uint8_t after[32];
    int rc = ar_audit_replay(verifier, m, seed, &got, after);
    if (rc != AR_OK)
        return rc == AR_EPROTO ? ar_fail(AR_EINVAL, "%s", ar_last_error()) : rc;
    return ar_audit_compare(&got, after, &all[stage], state_after);
}
