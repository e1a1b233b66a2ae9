/* Stage side and driver side of the chain protocol. */
#include "train/pipeline.h"

#include "core/core.h"
#include "core/digest.h"
#include "train/audit.h"
#include "train/probe.h"
#include "train/schedule.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- stage side ------------------------------------------------------- */

/* Returned inside this file when a step was abandoned because a neighbour
 * failed and the failure has already been reported or passed on: the stage
 * keeps serving and reports nothing more. */
#define STEP_ABANDONED 1

typedef struct {
    ar_stage_runner *r;
    int64_t failed_step; /* frames of this step still arriving are dropped */
    int32_t **slot_targets; /* targets of the micro-batch in each slot (last stage) */
    int *slot_rows;
    double busy, idle;
    double update_s; /* optimizer time since the last step: busy time of the next step's window */
    /* a group leader's traffic with its other members (group_traffic): at
     * the start of the step, and during the optimizer step since the last */
    uint64_t traffic_mark, update_traffic;
    /* this step's commitments (pipeline.h): the state digest, and per
     * micro-batch the digests of ACT_IN, ACT_OUT, GRAD_IN, GRAD_OUT */
    uint8_t state_digest[32];
    /* the state digest is computed on a helper thread while the step's
     * forward and backward run (they read the parameters and write only
     * gradients and activations); joined before anything writes the state */
    pthread_t hasher;
    int hashing, hash_rc;
    uint8_t (*mbd)[4][32];
    int mbd_cap;
    /* test builds only (ARCEUS_FAULTS): the cheat this stage plays */
    int fault;
    float **stale;     /* per micro-batch: the previous step's honest output */
    int stale_cap;
    float *cheat;      /* a cheat's copy of what it sends */
    size_t cheat_cap;
    /* the down link's counters at the last NORM record (or the end of its
     * measurement): each record carries what moved since */
    uint64_t down_mark[4];
    ar_probe_rx probe; /* a burst of PROBE frames from upstream being received */
    /* bytes the upstream may still have this stage send for measurements (a
     * PULL's burst back, a RUN's probe of the next link): a stage's
     * bandwidth is its provider's, and nobody pays for probes */
    double probe_budget, probe_t;
} serve_state;

/* A measurement of a link sends at most 2 x AR_PROBE_MAX_BYTES and some
 * pings each way; a pipeline measures each link at setup (once more after a
 * reload). The budget holds a few of them and refills slowly. */
#define PROBE_BUDGET_BYTES (8.0 * AR_PROBE_MAX_BYTES)
#define PROBE_REFILL_BPS ((double)AR_PROBE_MAX_BYTES / 10.0)

/* Take `bytes` of the probe budget; AR_ELIMIT when there is not enough. */
static int probe_spend(serve_state *st, double bytes)
{
    double now = ar_now();
    st->probe_budget += (now - st->probe_t) * PROBE_REFILL_BPS;
    st->probe_t = now;
    if (st->probe_budget > PROBE_BUDGET_BYTES)
        st->probe_budget = PROBE_BUDGET_BYTES;
    if (bytes > st->probe_budget)
        return ar_fail(AR_ELIMIT, "measurements asked too often: %.1f MB more to send, %.1f MB allowed now",
                       bytes / 1e6, st->probe_budget / 1e6);
    st->probe_budget -= bytes;
    return AR_OK;
}

/* Stage records in the NORM frame (AR_NORM_HEADER), then the units' gradient
 * sums of squares. */
#define NORM_HEADER AR_NORM_HEADER
/* how long a link's measurement may wait for an answer */
#define PROBE_TIMEOUT_S 60.0

static void link_counters(const ar_link *l, uint64_t c[4])
{
    c[0] = l ? l->bytes_sent : 0;
    c[1] = l ? l->raw_sent : 0;
    c[2] = l ? l->bytes_received : 0;
    c[3] = l ? l->raw_received : 0;
}


#define DIGEST_WORDS AR_NORM_DIGEST_WORDS
#define NORM_DIGEST_AT 10 /* the record's digest words field */

/* ---- cheats, compiled only into test builds ---------------------------- */

/* A provider that cheats, for the audit tests: ARCEUS_FAULT=KIND or
 * KIND@STAGE (one stage of an in-process pipeline). The release build has no
 * trace of it: FAULT_OF is the constant 0 there and the code folds away. */
enum { FAULT_NONE, FAULT_SKIP_UPDATE, FAULT_NOISE, FAULT_ZERO_GRAD, FAULT_STALE };
#ifdef ARCEUS_FAULTS
#define FAULT_OF(st) ((st)->fault)
static int fault_from_env(int index)
{
    const char *e = getenv("ARCEUS_FAULT");
    if (!e || !*e)
        return FAULT_NONE;
    static const char *names[] = {"", "skip-update", "noise", "zero-grad", "stale"};
    const char *at = strchr(e, '@');
    size_t len = at ? (size_t)(at - e) : strlen(e);
    if (at && atoi(at + 1) != index)
        return FAULT_NONE;
    for (int k = 1; k < 5; k++)
        if (strlen(names[k]) == len && strncmp(e, names[k], len) == 0) {
            ar_log(AR_LOG_WARN, "stage %d cheats: %s", index, names[k]);
            return k;
        }
    return FAULT_NONE;
}
#else
#define FAULT_OF(st) 0
static int fault_from_env(int index)
{
    (void)index;
    return FAULT_NONE;
}
#endif

static float *cheat_copy(serve_state *st, const float *x, size_t n)
{
    if (st->cheat_cap < n) {
        free(st->cheat);
        st->cheat_cap = 0;
        if (!(st->cheat = malloc(n * sizeof(float))))
            return NULL;
        st->cheat_cap = n;
    }
    if (x)
        memcpy(st->cheat, x, n * sizeof(float));
    else
        memset(st->cheat, 0, n * sizeof(float));
    return st->cheat;
}

/* Relative noise of size 1e-3 (a cheat computing in lower precision, or
 * skipping work that barely shows). */
static const float *cheat_noise(serve_state *st, int64_t step, int mb, const float *x, size_t n)
{
    float *y = cheat_copy(st, x, n);
    if (!y)
        return x;
    for (size_t i = 0; i < n; i++) {
        uint64_t h = ar_hash3(st->r->seed ^ 0x5eed, (uint64_t)step * 4096 + (uint64_t)mb, i);
        float u = (float)(h >> 40) / (float)(1 << 24) * 2.0f - 1.0f;
        y[i] = x[i] * (1.0f + 1e-3f * u);
    }
    return y;
}

/* The previous step's output of the same micro-batch, instead of this one's. */
static const float *cheat_stale(serve_state *st, int mb, const float *x, size_t n)
{
    if (mb >= st->stale_cap) {
        float **g = realloc(st->stale, (size_t)(mb + 1) * sizeof *g);
        if (!g)
            return x;
        for (int i = st->stale_cap; i <= mb; i++)
            g[i] = NULL;
        st->stale = g;
        st->stale_cap = mb + 1;
    }
    float *prev = st->stale[mb];
    float *now = malloc(n * sizeof(float));
    if (!now)
        return x;
    memcpy(now, x, n * sizeof(float));
    st->stale[mb] = now;
    if (!prev)
        return x;
    const float *y = cheat_copy(st, prev, n);
    free(prev);
    return y ? y : x;
}

/* ---- digests ------------------------------------------------------------ */

int ar_digest_act(const void *payload, size_t nbytes, const int32_t *targets, size_t ntargets,
                  uint8_t out[32])
{
    ar_sha256 h = {0};
    int rc = ar_sha256_begin(&h);
    if (rc == AR_OK)
        rc = ar_sha256_add(&h, payload, nbytes);
    if (rc == AR_OK)
        rc = ar_sha256_add(&h, targets, ntargets * sizeof(int32_t));
    if (rc == AR_OK)
        rc = ar_sha256_end(&h, out);
    ar_sha256_free(&h);
    return rc;
}

int ar_digest_grad(const void *payload, size_t nbytes, double loss, uint8_t out[32])
{
    ar_sha256 h = {0};
    int rc = ar_sha256_begin(&h);
    if (rc == AR_OK)
        rc = ar_sha256_add(&h, payload, nbytes);
    if (rc == AR_OK)
        rc = ar_sha256_add(&h, &loss, sizeof loss);
    if (rc == AR_OK)
        rc = ar_sha256_end(&h, out);
    ar_sha256_free(&h);
    return rc;
}

/* The state digest, off the step's critical path: hashing 3x the parameters
 * costs as much as a good part of a small model's step (mlp-fashion: ~8 MB,
 * 3-5 ms, against ~7 ms of compute per stage), while the forward and backward
 * passes never write what it reads. */
static void *hash_state_main(void *arg)
{
    serve_state *st = arg;
    if (st->r->keep)
        ar_audit_keep_copy_state(st->r->keep, st->r->stage);
    st->hash_rc = ar_stage_state_digest(st->r->stage, st->state_digest);
    return NULL;
}

static void hash_state_start(serve_state *st)
{
    st->hashing = pthread_create(&st->hasher, NULL, hash_state_main, st) == 0;
    if (!st->hashing) /* no thread: here and now */
        hash_state_main(st);
}

/* Wait for the digest; before anything may write the stage's state. */
static int hash_state_join(serve_state *st)
{
    if (st->hashing) {
        pthread_join(st->hasher, NULL);
        st->hashing = 0;
        /* the helper's error message stayed on its thread: hash again here
         * for the caller's (it fails the same way) */
        if (st->hash_rc != AR_OK)
            st->hash_rc = ar_stage_state_digest(st->r->stage, st->state_digest);
    }
    return st->hash_rc;
}

/* The step's digests from the micro-batches' (pipeline.h). */
static int combine_digests(serve_state *st, int M, ar_step_digests *d)
{
    memcpy(d->d[AR_DIGEST_STATE], st->state_digest, 32);
    for (int k = 0; k < 4; k++) {
        ar_sha256 h = {0};
        int rc = ar_sha256_begin(&h);
        for (int mb = 0; mb < M && rc == AR_OK; mb++)
            rc = ar_sha256_add(&h, st->mbd[mb][k], 32);
        if (rc == AR_OK)
            rc = ar_sha256_end(&h, d->d[AR_DIGEST_ACT_IN + k]);
        ar_sha256_free(&h);
        if (rc != AR_OK)
            return rc;
    }
    return AR_OK;
}

/* Bytes a group leader exchanged with its members other than its own share
 * (rank 0, computed in-process on the leader's device): the group's network
 * traffic. 0 for a plain stage. */
static uint64_t group_traffic(const ar_stage *s)
{
    uint64_t n = 0;
    for (int k = 1; k < s->tp_nranks; k++)
        n += s->tp_ranks[k]->bytes_sent + s->tp_ranks[k]->bytes_received;
    return n;
}

static uint64_t mb_seed(uint64_t seed, int64_t step, int mb)
{
    return ar_hash3(seed, (uint64_t)step, (uint64_t)mb);
}

/* Report an error upstream so the driver can name the failing stage. */
static void send_error(ar_stage_runner *r, const char *what)
{
    char msg[600];
    snprintf(msg, sizeof msg, "stage %d (layers %d-%d): %s: %s", r->index, r->stage->first,
             r->stage->last - 1, what, ar_last_error());
    ar_log(AR_LOG_ERROR, "%s", msg);
    ar_frame f = {.kind = AR_FRAME_ERROR};
    int64_t len = (int64_t)strlen(msg);
    if (ar_frame_set_payload(&f, AR_DT_U8, 1, &len, msg) == AR_OK)
        ar_link_send(r->up, &f);
    else
        ar_frame_free(&f);
}

/* Receive, timing the wait as idle time. */
static int timed_recv(serve_state *st, ar_link *l, ar_frame *f)
{
    double t0 = ar_now();
    int rc = ar_link_recv(l, f, st->r->timeout_s);
    st->idle += ar_now() - t0;
    if (rc == AR_OK && (rc = ar_frame_validate(f, st->r->max_frame_bytes)) != AR_OK)
        ar_frame_free(f);
    return rc;
}

/* Check an ACT/EVAL frame against what this stage expects. */
static int check_input(const ar_stage *s, const ar_frame *f)
{
    int want_dtype = s->layers[0]->in_floats_per_row == 0 ? AR_DT_I32 : AR_DT_F32;
    if (f->dtype != want_dtype)
        return ar_fail(AR_EPROTO, "%s frame has dtype %d, this stage takes %s",
                       ar_frame_kind_name(f->kind), f->dtype, want_dtype == AR_DT_I32 ? "int32 tokens" : "float32");
    if (f->rows < 1 || f->rows > s->max_B)
        return ar_fail(AR_EPROTO, "%s frame of %d rows, this stage takes 1..%d",
                       ar_frame_kind_name(f->kind), f->rows, s->max_B);
    size_t want = (size_t)f->rows * s->T * ar_stage_in_width(s) * 4;
    if (f->nbytes != want)
        return ar_fail(AR_ESHAPE, "%s frame carries %zu bytes, %d rows need %zu",
                       ar_frame_kind_name(f->kind), f->nbytes, f->rows, want);
    if (f->ntargets != (size_t)f->rows * s->T)
        return ar_fail(AR_ESHAPE, "%s frame carries %zu targets, %d rows need %zu",
                       ar_frame_kind_name(f->kind), f->ntargets, f->rows, (size_t)f->rows * s->T);
    return AR_OK;
}

/* Forward the stage output (with the targets) to the next stage. */
static int send_down(ar_stage_runner *r, const ar_frame *in, const float *out, int kind)
{
    ar_stage *s = r->stage;
    ar_frame f = {.kind = kind, .step = in->step, .mb = in->mb, .nmb = in->nmb, .rows = in->rows};
    int64_t shape[2] = {(int64_t)in->rows * s->T, (int64_t)ar_stage_out_width(s)};
    int rc = ar_frame_set_payload(&f, AR_DT_F32, 2, shape, out);
    if (rc == AR_OK)
        rc = ar_frame_set_targets(&f, in->targets, in->ntargets);
    if (rc != AR_OK) {
        ar_frame_free(&f);
        return rc;
    }
    return ar_link_send(r->down, &f);
}

static int run_forward(serve_state *st, ar_frame *f)
{
    ar_stage_runner *r = st->r;
    ar_stage *s = r->stage;
    int rc = check_input(s, f);
    if (rc != AR_OK)
        return rc;
    int slot = f->mb % s->nslots;
    const float *out;
    double t0 = ar_now();
    uint8_t (*dg)[32] = st->mbd[f->mb]; /* f->mb < M: run_step checked it */
    rc = r->digests ? ar_digest_act(f->data, f->nbytes, f->targets, f->ntargets, dg[0]) : AR_OK;
    if (rc == AR_OK && r->keep)
        rc = ar_audit_keep_act(r->keep, f->mb, f->rows, f->data, f->nbytes, f->targets, f->ntargets);
    if (rc == AR_OK)
        rc = ar_stage_forward(s, slot, f->rows, f->data, 1, mb_seed(r->seed, f->step, f->mb), &out);
    size_t nout = (size_t)f->rows * s->T * ar_stage_out_width(s);
    if (rc == AR_OK && r->down && FAULT_OF(st) == FAULT_NOISE)
        out = cheat_noise(st, f->step, f->mb, out, nout);
    if (rc == AR_OK && r->down && FAULT_OF(st) == FAULT_STALE)
        out = cheat_stale(st, f->mb, out, nout);
    if (rc == AR_OK && r->digests)
        rc = ar_digest_act(out, nout * sizeof(float), f->targets, f->ntargets, dg[1]);
    st->busy += ar_now() - t0;
    if (rc != AR_OK)
        return rc;
    if (r->down)
        return send_down(r, f, out, AR_FRAME_ACT);
    /* last stage: keep the targets for the backward pass */
    free(st->slot_targets[slot]);
    st->slot_targets[slot] = f->targets;
    st->slot_rows[slot] = f->rows;
    f->targets = NULL;
    f->ntargets = 0;
    return AR_OK;
}

static int run_backward(serve_state *st, int64_t step, int mb, int M, double *loss_out)
{
    ar_stage_runner *r = st->r;
    ar_stage *s = r->stage;
    int slot = mb % s->nslots;
    const float *din = NULL;
    double loss = 0;
    int rc;
    int rows;
    if (!r->down) {
        rows = st->slot_rows[slot];
        double t0 = ar_now();
        rc = r->digests ? ar_digest_grad(NULL, 0, 0.0, st->mbd[mb][2]) : AR_OK;
        if (rc == AR_OK)
            rc = ar_stage_loss(s, slot, rows, st->slot_targets[slot], &loss, NULL);
        if (rc == AR_OK) {
            /* the step's loss is the mean over all rows of all micro-batches */
            float scale = 1.0f / ((float)rows * (float)s->T * (float)M);
            rc = ar_stage_backward(s, slot, rows, st->slot_targets[slot], NULL, scale,
                                   mb_seed(r->seed, step, mb), &din);
        }
        st->busy += ar_now() - t0;
        if (rc != AR_OK)
            return rc;
    } else {
        ar_frame g;
        if ((rc = timed_recv(st, r->down, &g)) != AR_OK)
            return rc;
        if (g.kind == AR_FRAME_ERROR) {
            ar_link_send(r->up, &g); /* relay: the driver reports the failing stage */
            return STEP_ABANDONED;
        }
        rows = g.rows;
        size_t want = (size_t)rows * s->T * ar_stage_out_width(s) * 4;
        if (g.kind != AR_FRAME_GRAD || g.mb != mb || g.step != step || g.dtype != AR_DT_F32 ||
            g.nbytes != want || rows < 1 || rows > s->max_B) {
            rc = ar_fail(AR_EPROTO, "expected the GRAD of micro-batch %d of step %lld, got %s of %d",
                         mb, (long long)step, ar_frame_kind_name(g.kind), g.mb);
            ar_frame_free(&g);
            return rc;
        }
        loss = g.scalars[0];
        double t0 = ar_now();
        rc = r->digests ? ar_digest_grad(g.data, g.nbytes, loss, st->mbd[mb][2]) : AR_OK;
        if (rc == AR_OK && r->keep)
            rc = ar_audit_keep_grad(r->keep, mb, g.data, g.nbytes, loss);
        if (rc == AR_OK)
            rc = ar_stage_backward(s, slot, rows, NULL, g.data, 0.0f, mb_seed(r->seed, step, mb), &din);
        st->busy += ar_now() - t0;
        ar_frame_free(&g);
        if (rc != AR_OK)
            return rc;
    }
    ar_frame up = {.kind = AR_FRAME_GRAD, .step = step, .mb = mb, .nmb = M, .rows = rows};
    up.scalars[0] = loss;
    size_t nin = din ? (size_t)rows * s->T * s->layers[0]->in_floats_per_row : 0;
    if (din && FAULT_OF(st) == FAULT_ZERO_GRAD)
        din = cheat_copy(st, NULL, nin);
    if (din && !r->down && FAULT_OF(st) == FAULT_NOISE)
        din = cheat_noise(st, step, mb, din, nin);
    if (!din && nin)
        return ar_fail(AR_ENOMEM, "out of memory");
    if (r->digests && (rc = ar_digest_grad(din, nin * sizeof(float), loss, st->mbd[mb][3])) != AR_OK)
        return rc;
    if (din) {
        int64_t shape[2] = {(int64_t)rows * s->T, (int64_t)s->layers[0]->in_floats_per_row};
        if ((rc = ar_frame_set_payload(&up, AR_DT_F32, 2, shape, din)) != AR_OK)
            return rc;
    }
    *loss_out = loss;
    return ar_link_send(r->up, &up);
}

/* Tied weights split over stages (see stage.h): the head's stage sends the
 * gradient of its copy up; stages in between pass it on; the owner adds it
 * to its own gradient, exactly as a single stage folds it. */
static int exchange_tied(serve_state *st, int64_t step)
{
    ar_stage_runner *r = st->r;
    ar_stage *s = r->stage;
    int rc;
    if (s->has_tied_copy) {
        ar_frame t = {.kind = AR_FRAME_TIED, .step = step};
        int64_t n = s->tied_copy.numel;
        if ((rc = ar_frame_set_payload(&t, AR_DT_F32, 1, &n, s->tied_grads)) != AR_OK)
            return rc;
        return ar_link_send(r->up, &t);
    }
    if (!s->expects_tied || !r->down)
        return AR_OK;
    ar_frame t;
    if ((rc = timed_recv(st, r->down, &t)) != AR_OK)
        return rc;
    if (t.kind == AR_FRAME_ERROR) {
        ar_link_send(r->up, &t);
        return STEP_ABANDONED;
    }
    if (t.kind != AR_FRAME_TIED || t.dtype != AR_DT_F32) {
        ar_frame_free(&t);
        return ar_fail(AR_EPROTO, "expected the tied-weight gradient from the next stage");
    }
    if (!s->tied_owner)
        return ar_link_send(r->up, &t);
    ar_param *w = s->tied_owner;
    if (t.nbytes != (size_t)w->numel * sizeof(float)) {
        ar_frame_free(&t);
        return ar_fail(AR_ESHAPE, "tied-weight gradient of %zu bytes for %s of %ld floats", t.nbytes,
                       w->name, w->numel);
    }
    const float *g = t.data;
    for (long j = 0; j < w->numel; j++)
        w->grad[j] += g[j];
    ar_frame_free(&t);
    return AR_OK;
}

/* After the last backward: fold tied weights, then send the per-unit
 * gradient norms (ours first, then those from downstream) and timings up. */
static int send_norms(serve_state *st, int64_t step, int M, double *sumsq)
{
    ar_stage_runner *r = st->r;
    ar_stage *s = r->stage;
    int rc;
    if ((rc = exchange_tied(st, step)) != AR_OK)
        return rc;
    ar_stage_fold_tied(s);
    ar_frame below = {0};
    if ((rc = hash_state_join(st)) != AR_OK)
        return rc;
    if (r->down) {
        if ((rc = timed_recv(st, r->down, &below)) != AR_OK)
            return rc;
        if (below.kind == AR_FRAME_ERROR) {
            ar_link_send(r->up, &below);
            return STEP_ABANDONED;
        }
        if (below.kind != AR_FRAME_NORM || below.dtype != AR_DT_F64) {
            ar_frame_free(&below);
            return ar_fail(AR_EPROTO, "expected NORM from the next stage");
        }
    }
    size_t nd = r->digests ? DIGEST_WORDS : 0;
    size_t mine = NORM_HEADER + (size_t)s->nlayers + nd;
    size_t theirs = below.nbytes / sizeof(double);
    double *vals = malloc((mine + theirs) * sizeof(double));
    if (!vals) {
        ar_frame_free(&below);
        return ar_fail(AR_ENOMEM, "out of memory for norms");
    }
    if ((rc = ar_stage_grad_sumsq(s, vals + NORM_HEADER)) != AR_OK) {
        free(vals);
        ar_frame_free(&below);
        return rc;
    }
    vals[0] = s->first;
    vals[1] = s->nlayers;
    vals[2] = st->busy;
    vals[3] = st->idle;
    /* this step's, its norm exchange included, and the last optimizer step's */
    vals[4] = (double)(group_traffic(s) - st->traffic_mark + st->update_traffic);
    /* the device's owner wants it back: the driver learns it with this step */
    vals[5] = r->leaving && atomic_load(r->leaving) ? AR_STAGE_LEAVING : 0;
    vals[NORM_DIGEST_AT] = (double)nd;
    st->update_traffic = 0;
    uint64_t now[4];
    link_counters(r->down, now);
    for (int k = 0; k < 4; k++) {
        vals[6 + k] = (double)(now[k] - st->down_mark[k]);
        st->down_mark[k] = now[k];
    }
    if (nd) {
        ar_step_digests dg;
        if ((rc = combine_digests(st, M, &dg)) != AR_OK) {
            free(vals);
            ar_frame_free(&below);
            return rc;
        }
        memcpy(vals + NORM_HEADER + s->nlayers, &dg, sizeof dg);
    }
    if (theirs)
        memcpy(vals + mine, below.data, theirs * sizeof(double));
    ar_frame_free(&below);
    /* every unit's gradient sum of squares, added in unit order (records
     * come in stage order): as the driver adds them */
    *sumsq = 0;
    for (size_t at = 0; at + NORM_HEADER <= mine + theirs;) {
        double nu = vals[at + 1], dw = vals[at + NORM_DIGEST_AT];
        if (!(nu >= 0 && (dw == 0 || dw == DIGEST_WORDS) &&
              at + NORM_HEADER + (size_t)nu + (size_t)dw <= mine + theirs))
            break; /* malformed from below: the driver says so */
        for (size_t i = 0; i < (size_t)nu; i++)
            *sumsq += vals[at + NORM_HEADER + i];
        at += NORM_HEADER + (size_t)nu + (size_t)dw;
    }
    ar_frame f = {.kind = AR_FRAME_NORM, .step = step};
    int64_t n = (int64_t)(mine + theirs);
    rc = ar_frame_set_payload(&f, AR_DT_F64, 1, &n, vals);
    free(vals);
    if (rc != AR_OK)
        return rc;
    return ar_link_send(r->up, &f);
}

static int run_apply(serve_state *st, ar_frame *f);

/* The optimizer step stage 0 takes itself, when the driver's batch asked
 * for it (ar_chain_send_step): the driver's clipping, in the driver's
 * arithmetic on the same sums, so the result is bitwise the driver's STEP;
 * then the STEP goes down as if the driver had sent it. A step whose loss or
 * gradient is not finite is not applied: the driver ends the run on it. */
static int apply_locally(serve_state *st, int64_t step, double lr, double clip, double sumsq, double loss)
{
    ar_stage_runner *r = st->r;
    double norm = sqrt(sumsq);
    if (!isfinite(loss) || !isfinite(norm))
        return AR_OK;
    float scale = 1.0f;
    if (clip > 0 && norm > clip)
        scale = (float)(clip / (norm + 1e-6));
    ar_frame f = {.kind = AR_FRAME_STEP, .step = step};
    f.scalars[0] = lr;
    f.scalars[1] = scale;
    double t0 = ar_now();
    uint64_t traffic0 = group_traffic(r->stage);
    int rc = run_apply(st, &f);
    st->update_s += ar_now() - t0;
    st->update_traffic += group_traffic(r->stage) - traffic0;
    ar_frame_free(&f);
    return rc;
}

static int run_step(serve_state *st, ar_frame *first)
{
    ar_stage_runner *r = st->r;
    ar_stage *s = r->stage;
    int M = first->nmb;
    int64_t step = first->step;
    /* the driver's batch may ask stage 0 to take the optimizer step itself:
     * scalars {lr, clip, 1} on its first frame */
    int apply = r->index == 0 && first->scalars[2] == 1.0;
    double apply_lr = first->scalars[0], apply_clip = first->scalars[1];
    if (apply && !(apply_lr >= 0 && apply_lr < 1e3 && apply_clip >= 0 && apply_clip < 1e12))
        return ar_fail(AR_EPROTO, "a batch asking for a step with lr %g and clip %g", apply_lr, apply_clip);
    double loss_sum = 0;
    if (M < 1 || M > 4096)
        return ar_fail(AR_EPROTO, "a step of %d micro-batches", M);
    ar_action *acts = malloc(sizeof(ar_action) * 2 * (size_t)M);
    if (!acts)
        return ar_fail(AR_ENOMEM, "out of memory for the schedule");
    int in_flight = ar_schedule_build_ex(r->schedule, r->count, r->index, M, r->extra_warmup, acts);
    int rc = AR_OK;
    if (in_flight > s->nslots) {
        rc = ar_fail(AR_ELIMIT, "the schedule keeps %d micro-batches in flight, the stage has %d slots",
                     in_flight, s->nslots);
        goto done;
    }
    /* the driver sends the next step's frames right after STEP, so the
     * optimizer update falls inside the next step's wall time: count it */
    st->busy = st->update_s;
    st->idle = 0;
    st->update_s = 0;
    st->traffic_mark = group_traffic(s);
    if (M > st->mbd_cap) {
        free(st->mbd);
        st->mbd_cap = 0;
        if (!(st->mbd = malloc((size_t)M * sizeof *st->mbd))) {
            rc = ar_fail(AR_ENOMEM, "out of memory for digests");
            goto done;
        }
        st->mbd_cap = M;
    }
    /* the state this step starts from, committed in this step's NORM */
    /* the audit record's copy of the state goes with the hashing, off the
     * step's critical path */
    if (r->keep && (rc = (r->digests ? ar_audit_keep_begin_deferred : ar_audit_keep_begin)(r->keep, s, step, M)) !=
                       AR_OK)
        goto done;
    if (r->digests)
        hash_state_start(st);
    ar_stage_zero_grad(s);
    int next_f = 0;
    for (int i = 0; i < 2 * M; i++) {
        if (acts[i].op == 'F') {
            ar_frame f;
            if (next_f == 0) {
                f = *first;
                memset(first, 0, sizeof *first);
            } else if ((rc = timed_recv(st, r->up, &f)) != AR_OK) {
                goto done;
            }
            if (f.kind == AR_FRAME_ABORT) {
                /* an earlier stage gave up on this step: so do we */
                ar_frame_free(&f);
                rc = STEP_ABANDONED;
                goto done;
            }
            if (f.kind != AR_FRAME_ACT || f.mb != acts[i].mb || f.step != step || f.nmb != M) {
                rc = ar_fail(AR_EPROTO, "expected ACT %d of step %lld, got %s %d of step %lld",
                             acts[i].mb, (long long)step, ar_frame_kind_name(f.kind), f.mb,
                             (long long)f.step);
                ar_frame_free(&f);
                goto done;
            }
            next_f++;
            rc = run_forward(st, &f);
            ar_frame_free(&f);
        } else {
            double loss = 0;
            rc = run_backward(st, step, acts[i].mb, M, &loss);
            loss_sum += loss; /* in micro-batch order, as the driver adds them */
        }
        if (rc != AR_OK)
            goto done;
    }
    double sumsq = 0;
    rc = send_norms(st, step, M, &sumsq);
    if (rc == AR_OK && apply)
        rc = apply_locally(st, step, apply_lr, apply_clip, sumsq, loss_sum / M);
done:
    if (hash_state_join(st) != AR_OK && rc == AR_OK)
        rc = ar_fail(AR_EINTERNAL, "state digest failed");
    free(acts);
    return rc;
}

static int run_apply(serve_state *st, ar_frame *f)
{
    ar_stage_runner *r = st->r;
    ar_stage *s = r->stage;
    double lr = f->scalars[0], scale = f->scalars[1];
    if (!(lr >= 0 && lr < 1e3) || !(scale > 0 && scale <= 1))
        return ar_fail(AR_EPROTO, "STEP with lr %g and gradient scale %g", lr, scale);
    if (r->keep)
        ar_audit_keep_update(r->keep, f->step, (float)lr, (float)scale);
    int urc = FAULT_OF(st) == FAULT_SKIP_UPDATE ? AR_OK : ar_stage_update(s, (float)lr, (float)scale);
    if (urc != AR_OK)
        return urc;
    if (s->has_tied_copy) {
        /* the owner's updated values ride on the STEP frame */
        if (f->dtype != AR_DT_F32 || f->nbytes != (size_t)s->tied_copy.numel * sizeof(float))
            return ar_fail(AR_EPROTO, "STEP frame without the %s values this stage copies",
                           s->tied_copy.name);
        memcpy(s->tied_copy.data, f->data, f->nbytes);
    }
    if (!r->down)
        return AR_OK;
    ar_frame g = {.kind = AR_FRAME_STEP, .step = f->step};
    memcpy(g.scalars, f->scalars, sizeof g.scalars);
    if (s->tied_owner) {
        int64_t n = s->tied_owner->numel;
        int rc = ar_frame_set_payload(&g, AR_DT_F32, 1, &n, s->tied_owner->data);
        if (rc != AR_OK)
            return rc;
    } else if (f->data) {
        /* pass the tied values on towards the head's stage */
        g.data = f->data;
        g.nbytes = f->nbytes;
        g.dtype = f->dtype;
        g.ndim = f->ndim;
        memcpy(g.shape, f->shape, sizeof g.shape);
        f->data = NULL;
        f->nbytes = 0;
    }
    return ar_link_send(r->down, &g);
}

static int run_eval(serve_state *st, ar_frame *f)
{
    ar_stage_runner *r = st->r;
    ar_stage *s = r->stage;
    int rc = check_input(s, f);
    if (rc != AR_OK)
        return rc;
    const float *out;
    /* evaluation uses slot 0: no training micro-batch is in flight between steps */
    if ((rc = ar_stage_forward(s, 0, f->rows, f->data, 0, 0, &out)) != AR_OK)
        return rc;
    if (r->down) {
        if ((rc = send_down(r, f, out, AR_FRAME_EVAL)) != AR_OK)
            return rc;
        ar_frame res;
        if ((rc = timed_recv(st, r->down, &res)) != AR_OK)
            return rc;
        if (res.kind != AR_FRAME_EVAL_RESULT && res.kind != AR_FRAME_ERROR) {
            ar_frame_free(&res);
            return ar_fail(AR_EPROTO, "expected EVAL_RESULT from the next stage");
        }
        return ar_link_send(r->up, &res);
    }
    double loss;
    long correct;
    if ((rc = ar_stage_loss(s, 0, f->rows, f->targets, &loss, &correct)) != AR_OK)
        return rc;
    double count = (double)f->rows * s->T;
    ar_frame res = {.kind = AR_FRAME_EVAL_RESULT, .step = f->step, .rows = f->rows};
    res.scalars[0] = loss * count;
    res.scalars[1] = (double)correct;
    res.scalars[2] = count;
    return ar_link_send(r->up, &res);
}

/* RUN: measure the link to the next stage, have it measure its own, and
 * send the figures up (ours first, then those from below). */
static int run_probe(serve_state *st)
{
    ar_stage_runner *r = st->r;
    double timeout = r->timeout_s > 0 ? r->timeout_s : PROBE_TIMEOUT_S;
    double vals[AR_PROBE_REPORT_FIELDS * 64];
    size_t n = 0;
    int rc;
    if (r->down) {
        ar_link_figures fig;
        if ((rc = ar_probe_link(r->down, timeout, &fig)) != AR_OK)
            return rc;
        vals[n++] = fig.rtt_s;
        vals[n++] = fig.down_Bps;
        vals[n++] = fig.up_Bps;
        ar_frame run = {.kind = AR_FRAME_PROBE};
        run.scalars[0] = AR_PROBE_RUN;
        if ((rc = ar_link_send(r->down, &run)) != AR_OK)
            return rc;
        ar_frame below;
        if ((rc = ar_link_recv(r->down, &below, timeout)) != AR_OK)
            return rc;
        if (below.kind == AR_FRAME_ERROR) {
            ar_link_send(r->up, &below); /* relay: the driver names the failing stage */
            return STEP_ABANDONED;
        }
        size_t theirs = below.nbytes / sizeof(double);
        if (below.kind != AR_FRAME_PROBE || (int)below.scalars[0] != AR_PROBE_REPORT ||
            (below.nbytes && below.dtype != AR_DT_F64) || theirs % AR_PROBE_REPORT_FIELDS ||
            n + theirs > sizeof vals / sizeof vals[0]) {
            ar_frame_free(&below);
            return ar_fail(AR_EPROTO, "expected the link figures from the next stage");
        }
        if (theirs)
            memcpy(vals + n, below.data, theirs * sizeof(double));
        n += theirs;
        ar_frame_free(&below);
    }
    /* the traffic of the steps starts here, not with the measurement */
    link_counters(r->down, st->down_mark);
    ar_frame rep = {.kind = AR_FRAME_PROBE};
    rep.scalars[0] = AR_PROBE_REPORT;
    int64_t len = (int64_t)n;
    if (n && (rc = ar_frame_set_payload(&rep, AR_DT_F64, 1, &len, vals)) != AR_OK)
        return rc;
    return ar_link_send(r->up, &rep);
}

/* A barrier: answered once every stage has processed what came before it. */
static int run_sync(serve_state *st, ar_frame *f)
{
    ar_stage_runner *r = st->r;
    int rc;
    if (r->down) {
        ar_frame g = {.kind = AR_FRAME_SYNC, .step = f->step};
        if ((rc = ar_link_send(r->down, &g)) != AR_OK)
            return rc;
        if ((rc = timed_recv(st, r->down, &g)) != AR_OK)
            return rc;
        return ar_link_send(r->up, &g);
    }
    ar_frame g = {.kind = AR_FRAME_SYNC, .step = f->step};
    return ar_link_send(r->up, &g);
}

int ar_stage_serve(ar_stage_runner *r)
{
    if (r->threads > 0) {
#ifdef _OPENMP
        /* the OpenMP thread count is per thread: set it on the stage's own */
        omp_set_num_threads(r->threads);
#endif
    }
    ar_stage *s = r->stage;
    serve_state st = {.r = r, .failed_step = -1, .probe_budget = PROBE_BUDGET_BYTES, .probe_t = ar_now(),
                      .fault = fault_from_env(r->index)};
    st.slot_targets = calloc((size_t)s->nslots, sizeof *st.slot_targets);
    st.slot_rows = calloc((size_t)s->nslots, sizeof *st.slot_rows);
    if (!st.slot_targets || !st.slot_rows) {
        free(st.slot_targets);
        free(st.slot_rows);
        return ar_fail(AR_ENOMEM, "out of memory starting a stage");
    }
    int rc = AR_OK;
    for (;;) {
        ar_frame f;
        if ((rc = ar_link_recv(r->up, &f, -1)) != AR_OK)
            break;
        if ((rc = ar_frame_validate(&f, r->max_frame_bytes)) != AR_OK) {
            ar_frame_free(&f);
            send_error(r, "bad frame");
            continue;
        }
        const char *what = NULL;
        if (f.step == st.failed_step &&
            (f.kind == AR_FRAME_ABORT || (f.kind == AR_FRAME_ACT && f.mb != 0))) {
            /* the rest of a step that failed here, or its abort: nothing to do
             * (micro-batch 0 of the same step starts a retry) */
            ar_frame_free(&f);
            continue;
        }
        int64_t step = f.step;
        switch (f.kind) {
        case AR_FRAME_ACT:
            rc = run_step(&st, &f);
            if (rc != AR_OK) {
                what = "training step";
                /* drop the step's remaining frames and tell later stages to
                 * stop waiting for them */
                st.failed_step = step;
                if (r->down) {
                    ar_frame a = {.kind = AR_FRAME_ABORT, .step = step};
                    ar_link_send(r->down, &a);
                }
            }
            break;
        case AR_FRAME_ABORT:
            if (r->down) {
                ar_frame a = {.kind = AR_FRAME_ABORT, .step = step};
                ar_link_send(r->down, &a);
            }
            break;
        case AR_FRAME_STEP: {
            /* braces: C11 allows no declaration right after a label */
            double t0 = ar_now();
            uint64_t traffic0 = group_traffic(s);
            rc = run_apply(&st, &f);
            st.update_s += ar_now() - t0;
            st.update_traffic += group_traffic(s) - traffic0;
            if (rc != AR_OK)
                what = "optimizer step";
            break;
        }
        case AR_FRAME_EVAL:
            if ((rc = run_eval(&st, &f)) != AR_OK)
                what = "evaluation";
            break;
        case AR_FRAME_SYNC:
            if ((rc = run_sync(&st, &f)) != AR_OK)
                what = "sync";
            break;
        case AR_FRAME_PROBE: {
            int op = (int)f.scalars[0];
            double cost = op == AR_PROBE_RUN    ? 2.0 * AR_PROBE_MAX_BYTES
                          : op == AR_PROBE_PULL ? f.scalars[1] * f.scalars[2]
                                                : 0.0;
            if (!(cost >= 0 && cost < 1e12)) /* a PULL's own check names it */
                cost = 0;
            rc = probe_spend(&st, cost);
            if (rc == AR_OK)
                rc = op == AR_PROBE_RUN ? run_probe(&st) : ar_probe_answer(r->up, &f, &st.probe);
            if (rc != AR_OK)
                what = "measuring the links";
            break;
        }
        case AR_FRAME_STOP:
            if (r->down) {
                ar_frame g = {.kind = AR_FRAME_STOP};
                ar_link_send(r->down, &g);
            }
            ar_frame_free(&f);
            rc = AR_OK;
            goto out;
        default:
            rc = ar_fail(AR_EPROTO, "unexpected %s frame from upstream", ar_frame_kind_name(f.kind));
            what = "protocol";
        }
        ar_frame_free(&f);
        if (rc == STEP_ABANDONED) {
            rc = AR_OK;
            continue;
        }
        if (rc == AR_ECLOSED) /* a neighbour is gone: nothing left to serve */
            break;
        if (what)
            send_error(r, what);
    }
out:
    for (int i = 0; i < s->nslots; i++)
        free(st.slot_targets[i]);
    free(st.slot_targets);
    free(st.slot_rows);
    free(st.mbd);
    free(st.cheat);
    for (int i = 0; i < st.stale_cap; i++)
        free(st.stale[i]);
    free(st.stale);
    return rc;
}

/* ---- driver side ------------------------------------------------------ */

static int send_rows(ar_link *l, int kind, const ar_batch_desc *b, int mb, int row0, int rows,
                     const double *scalars)
{
    ar_frame f = {.kind = kind, .step = b->step, .mb = mb, .nmb = kind == AR_FRAME_ACT ? b->M : 0,
                  .rows = rows};
    if (scalars)
        memcpy(f.scalars, scalars, 3 * sizeof(double));
    size_t es = 4;
    int64_t shape[2] = {rows, (int64_t)b->row_elems};
    int rc = ar_frame_set_payload(&f, b->dtype, 2, shape,
                                  (const char *)b->inputs + (size_t)row0 * b->row_elems * es);
    if (rc == AR_OK)
        rc = ar_frame_set_targets(&f, b->targets + (size_t)row0 * b->row_targets,
                                  (size_t)rows * b->row_targets);
    if (rc != AR_OK) {
        ar_frame_free(&f);
        return rc;
    }
    return ar_link_send(l, &f);
}

/* An ERROR frame from a stage becomes the error of the call. */
static int frame_error(ar_frame *f)
{
    int rc = ar_fail(AR_EPROTO, "%.*s", (int)f->nbytes, f->data ? (const char *)f->data : "");
    ar_frame_free(f);
    return rc;
}

int ar_chain_train_step(ar_link *l, const ar_batch_desc *b, double timeout_s, ar_step_result *out)
{
    int rc = ar_chain_send_step(l, b, 0, 0, 0);
    return rc == AR_OK ? ar_chain_recv_step(l, b, timeout_s, out) : rc;
}

int ar_chain_send_step(ar_link *l, const ar_batch_desc *b, int apply, float lr, float clip)
{
    if (b->M < 1 || b->B % b->M != 0)
        return ar_fail(AR_EINVAL, "batch %d does not split into %d equal micro-batches", b->B, b->M);
    int rows = b->B / b->M;
    int rc;
    for (int mb = 0; mb < b->M; mb++) {
        double s[3] = {lr, clip, 1.0};
        if ((rc = send_rows(l, AR_FRAME_ACT, b, mb, mb * rows, rows, mb == 0 && apply ? s : NULL)) != AR_OK)
            return rc;
    }
    return AR_OK;
}

int ar_chain_recv_step(ar_link *l, const ar_batch_desc *b, double timeout_s, ar_step_result *out)
{
    int rc;
    memset(out, 0, sizeof *out);
    /* losses arrive in micro-batch order; summing them in that order keeps
     * the result independent of the partition */
    int got = 0;
    double loss_sum = 0;
    while (got < b->M) {
        ar_frame f;
        if ((rc = ar_link_recv(l, &f, timeout_s)) != AR_OK)
            return rc;
        if (f.kind == AR_FRAME_ERROR)
            return frame_error(&f);
        if (f.kind != AR_FRAME_GRAD || f.mb != got) {
            rc = ar_fail(AR_EPROTO, "expected GRAD %d, got %s %d", got, ar_frame_kind_name(f.kind), f.mb);
            ar_frame_free(&f);
            return rc;
        }
        loss_sum += f.scalars[0];
        got++;
        ar_frame_free(&f);
    }
    out->loss = loss_sum / b->M;
    ar_frame n;
    if ((rc = ar_link_recv(l, &n, timeout_s)) != AR_OK)
        return rc;
    if (n.kind == AR_FRAME_ERROR)
        return frame_error(&n);
    if (n.kind != AR_FRAME_NORM || n.dtype != AR_DT_F64) {
        ar_frame_free(&n);
        return ar_fail(AR_EPROTO, "expected NORM after the gradients");
    }
    const double *v = n.data;
    size_t count = n.nbytes / sizeof(double), at = 0;
    while (at + NORM_HEADER <= count && out->nstages < 64) {
        int first = (int)v[at], nu = (int)v[at + 1], nd = (int)v[at + NORM_DIGEST_AT];
        if (nu < 0 || (nd != 0 && nd != DIGEST_WORDS) || at + NORM_HEADER + (size_t)nu + (size_t)nd > count ||
            first < 0 || first + nu > 512)
            break;
        int si = out->nstages;
        out->busy_s[si] = v[at + 2];
        out->idle_s[si] = v[at + 3];
        out->tp_bytes[si] = v[at + 4];
        out->leaving[si] = ((int)v[at + 5] & AR_STAGE_LEAVING) != 0;
        out->has_digests[si] = nd != 0;
        if (nd)
            memcpy(&out->digests[si], v + at + NORM_HEADER + nu, sizeof out->digests[si]);
        if (si + 1 < 64)
            out->edges[si + 1] = (ar_edge_bytes){.down = v[at + 6], .down_raw = v[at + 7],
                                                 .up = v[at + 8], .up_raw = v[at + 9]};
        out->nstages++;
        for (int i = 0; i < nu; i++)
            out->unit_sumsq[first + i] = v[at + NORM_HEADER + i];
        if (first + nu > out->nunits)
            out->nunits = first + nu;
        at += NORM_HEADER + (size_t)nu + (size_t)nd;
    }
    rc = at == count ? AR_OK : ar_fail(AR_EPROTO, "malformed NORM frame");
    ar_frame_free(&n);
    return rc;
}

int ar_chain_apply(ar_link *l, int64_t step, float lr, float grad_scale)
{
    ar_frame f = {.kind = AR_FRAME_STEP, .step = step};
    f.scalars[0] = lr;
    f.scalars[1] = grad_scale;
    return ar_link_send(l, &f);
}

int ar_chain_eval(ar_link *l, const ar_batch_desc *b, double timeout_s, double *loss_sum,
                  double *correct, double *count)
{
    int rc = send_rows(l, AR_FRAME_EVAL, b, 0, 0, b->B, NULL);
    if (rc != AR_OK)
        return rc;
    ar_frame f;
    if ((rc = ar_link_recv(l, &f, timeout_s)) != AR_OK)
        return rc;
    if (f.kind == AR_FRAME_ERROR)
        return frame_error(&f);
    if (f.kind != AR_FRAME_EVAL_RESULT) {
        ar_frame_free(&f);
        return ar_fail(AR_EPROTO, "expected EVAL_RESULT, got %s", ar_frame_kind_name(f.kind));
    }
    *loss_sum += f.scalars[0];
    *correct += f.scalars[1];
    *count += f.scalars[2];
    ar_frame_free(&f);
    return AR_OK;
}

int ar_chain_probe(ar_link *l, double timeout_s, ar_link_figures *edges, int max, int *n)
{
    *n = 0;
    if (max < 1)
        return ar_fail(AR_EINVAL, "no room for the link figures");
    int rc = ar_probe_link(l, timeout_s, &edges[0]);
    if (rc != AR_OK)
        return rc;
    *n = 1;
    ar_frame f = {.kind = AR_FRAME_PROBE};
    f.scalars[0] = AR_PROBE_RUN;
    if ((rc = ar_link_send(l, &f)) != AR_OK)
        return rc;
    /* each stage measures its link in turn: allow each its time */
    if ((rc = ar_link_recv(l, &f, timeout_s > 0 ? timeout_s * 64 : timeout_s)) != AR_OK)
        return rc;
    if (f.kind == AR_FRAME_ERROR)
        return frame_error(&f);
    size_t count = f.nbytes / sizeof(double);
    if (f.kind != AR_FRAME_PROBE || (int)f.scalars[0] != AR_PROBE_REPORT || (f.nbytes && f.dtype != AR_DT_F64) ||
        count % AR_PROBE_REPORT_FIELDS) {
        ar_frame_free(&f);
        return ar_fail(AR_EPROTO, "expected the stages' link figures");
    }
    const double *v = f.data;
    for (size_t i = 0; i + AR_PROBE_REPORT_FIELDS <= count && *n < max; i += AR_PROBE_REPORT_FIELDS) {
        ar_link_figures *e = &edges[(*n)++];
        *e = (ar_link_figures){.rtt_s = v[i], .down_Bps = v[i + 1], .up_Bps = v[i + 2], .measured = 1};
        if (!(isfinite(e->rtt_s) && e->rtt_s >= 0 && e->down_Bps > 0 && e->up_Bps > 0 && isfinite(e->down_Bps) &&
              isfinite(e->up_Bps))) {
            ar_frame_free(&f);
            return ar_fail(AR_EPROTO, "link %d's figures are out of range (%g s, %g B/s, %g B/s)", *n - 1,
                           v[i], v[i + 1], v[i + 2]);
        }
    }
    ar_frame_free(&f);
    return AR_OK;
}

int ar_chain_sync(ar_link *l, double timeout_s)
{
    ar_frame f = {.kind = AR_FRAME_SYNC};
    int rc = ar_link_send(l, &f);
    if (rc != AR_OK)
        return rc;
    if ((rc = ar_link_recv(l, &f, timeout_s)) != AR_OK)
        return rc;
    if (f.kind == AR_FRAME_ERROR)
        return frame_error(&f);
    rc = f.kind == AR_FRAME_SYNC ? AR_OK : ar_fail(AR_EPROTO, "expected SYNC, got %s", ar_frame_kind_name(f.kind));
    ar_frame_free(&f);
    return rc;
}

int ar_chain_stop(ar_link *l)
{
    ar_frame f = {.kind = AR_FRAME_STOP};
    return ar_link_send(l, &f);
}
