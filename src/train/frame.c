/* Frame helpers and the in-process link (two mutex + condvar queues). */
#include "train/frame.h"

#include "core/core.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <time.h>
#include <errno.h>

size_t ar_dtype_size(int dtype)
{
    switch (dtype) {
    case AR_DT_F32: return 4;
    case AR_DT_I32: return 4;
    case AR_DT_F64: return 8;
    case AR_DT_U8: return 1;
    default: return 0;
    }
}

const char *ar_frame_kind_name(int kind)
{
    static const char *names[] = {"?", "ACT", "GRAD", "NORM", "STEP", "EVAL", "EVAL_RESULT", "STOP", "ERROR", "SYNC", "ABORT", "TIED", "TP"};
    return kind >= 1 && kind <= AR_FRAME_TP ? names[kind] : "unknown";
}

int ar_frame_validate(const ar_frame *f, size_t max_bytes)
{
    if (f->kind < AR_FRAME_ACT || f->kind > AR_FRAME_TP)
        return ar_fail(AR_EPROTO, "unknown frame kind %d", f->kind);
    size_t es = ar_dtype_size(f->dtype);
    if (es == 0)
        return ar_fail(AR_EPROTO, "%s frame: unknown dtype %d", ar_frame_kind_name(f->kind), f->dtype);
    if (f->ndim < 0 || f->ndim > AR_FRAME_MAX_DIMS)
        return ar_fail(AR_EPROTO, "%s frame: %d dimensions (at most %d)", ar_frame_kind_name(f->kind),
                       f->ndim, AR_FRAME_MAX_DIMS);
    size_t count = f->ndim ? 1 : 0;
    for (int i = 0; i < f->ndim; i++) {
        if (f->shape[i] < 0 || (f->shape[i] > 0 && count > max_bytes / (size_t)f->shape[i]))
            return ar_fail(AR_EPROTO, "%s frame: bad or oversized shape", ar_frame_kind_name(f->kind));
        count *= (size_t)f->shape[i];
    }
    if (count > max_bytes / es)
        return ar_fail(AR_ELIMIT, "%s frame: payload of %zu elements exceeds the %zu byte limit",
                       ar_frame_kind_name(f->kind), count, max_bytes);
    if (count * es != f->nbytes)
        return ar_fail(AR_EPROTO, "%s frame: shape gives %zu bytes but the payload has %zu",
                       ar_frame_kind_name(f->kind), count * es, f->nbytes);
    if (f->ntargets > max_bytes / 4)
        return ar_fail(AR_ELIMIT, "%s frame: too many targets", ar_frame_kind_name(f->kind));
    if (f->nmb < 0 || f->mb < 0 || (f->nmb > 0 && f->mb >= f->nmb))
        return ar_fail(AR_EPROTO, "%s frame: micro-batch %d out of range [0, %d)",
                       ar_frame_kind_name(f->kind), f->mb, f->nmb);
    return AR_OK;
}

int ar_frame_set_payload(ar_frame *f, int dtype, int ndim, const int64_t *shape, const void *data)
{
    size_t count = 1;
    for (int i = 0; i < ndim; i++)
        count *= (size_t)shape[i];
    if (ndim == 0)
        count = 0;
    size_t nbytes = count * ar_dtype_size(dtype);
    void *buf = NULL;
    if (nbytes) {
        buf = malloc(nbytes);
        if (!buf)
            return ar_fail(AR_ENOMEM, "out of memory for a %zu byte frame", nbytes);
        memcpy(buf, data, nbytes);
    }
    free(f->data);
    f->data = buf;
    f->nbytes = nbytes;
    f->dtype = dtype;
    f->ndim = ndim;
    for (int i = 0; i < ndim; i++)
        f->shape[i] = shape[i];
    return AR_OK;
}

int ar_frame_set_targets(ar_frame *f, const int32_t *targets, size_t n)
{
    int32_t *buf = NULL;
    if (n) {
        buf = malloc(n * sizeof *buf);
        if (!buf)
            return ar_fail(AR_ENOMEM, "out of memory for %zu targets", n);
        memcpy(buf, targets, n * sizeof *buf);
    }
    free(f->targets);
    f->targets = buf;
    f->ntargets = n;
    return AR_OK;
}

void ar_frame_free(ar_frame *f)
{
    free(f->data);
    free(f->targets);
    memset(f, 0, sizeof *f);
}

/* protobuf's varint length of v */
static size_t varint_bytes(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* a one-byte tag and an int32/int64 varint, left out when zero (proto3);
 * negative values take ten bytes */
static size_t int_field(int64_t v)
{
    return v ? 1 + varint_bytes((uint64_t)v) : 0;
}

/* a one-byte tag, the length, the bytes; left out when empty */
static size_t bytes_field(size_t n)
{
    return n ? 1 + varint_bytes(n) + n : 0;
}

size_t ar_frame_wire_bytes(const ar_frame *f)
{
    size_t n = int_field(f->kind) + int_field(f->step) + int_field(f->mb) + int_field(f->nmb) +
               int_field(f->rows) + int_field(f->dtype);
    int nd = f->ndim < 0 ? 0 : f->ndim > AR_FRAME_MAX_DIMS ? AR_FRAME_MAX_DIMS : f->ndim;
    size_t shape = 0;
    for (int i = 0; i < nd; i++)
        shape += varint_bytes((uint64_t)f->shape[i]);
    n += bytes_field(shape); /* packed */
    int ns = 4;
    while (ns > 0 && f->scalars[ns - 1] == 0)
        ns--;
    n += bytes_field((size_t)ns * sizeof(double)); /* packed */
    n += bytes_field(f->ntargets * sizeof(int32_t));
    n += bytes_field(f->nbytes);
    return n;
}

int ar_link_send(ar_link *l, ar_frame *f)
{
    size_t bytes = ar_frame_wire_bytes(f); /* the send takes the frame */
    int rc = l->vt->send(l, f);
    if (rc == AR_OK)
        l->bytes_sent += bytes;
    return rc;
}

int ar_link_recv(ar_link *l, ar_frame *f, double timeout_s)
{
    int rc = l->vt->recv(l, f, timeout_s);
    if (rc == AR_OK)
        l->bytes_received += ar_frame_wire_bytes(f);
    return rc;
}

void ar_link_close(ar_link *l)
{
    if (l)
        l->vt->close(l);
}

void ar_link_destroy(ar_link *l)
{
    if (l)
        l->vt->destroy(l);
}

/* ---- in-process link ---------------------------------------------------- */

typedef struct queue_node {
    ar_frame frame;
    struct queue_node *next;
} queue_node;

/* One direction of a pair; shared by both endpoints. */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t ready;
    queue_node *head, *tail;
    int closed;
} frame_queue;

typedef struct {
    frame_queue q[2];
    int refs; /* endpoints still alive, under q[0].lock */
} local_shared;

typedef struct {
    ar_link base;
    local_shared *shared;
    frame_queue *out, *in;
} local_link;

static int local_send(ar_link *l, ar_frame *f)
{
    local_link *ll = (local_link *)l;
    queue_node *n = malloc(sizeof *n);
    if (!n) {
        ar_frame_free(f);
        return ar_fail(AR_ENOMEM, "out of memory queueing a frame");
    }
    n->frame = *f;
    n->next = NULL;
    memset(f, 0, sizeof *f);
    pthread_mutex_lock(&ll->out->lock);
    if (ll->out->closed) {
        pthread_mutex_unlock(&ll->out->lock);
        ar_frame_free(&n->frame);
        free(n);
        return ar_fail(AR_ECLOSED, "%s: link closed", l->name);
    }
    if (ll->out->tail)
        ll->out->tail->next = n;
    else
        ll->out->head = n;
    ll->out->tail = n;
    pthread_cond_signal(&ll->out->ready);
    pthread_mutex_unlock(&ll->out->lock);
    return AR_OK;
}

static int local_recv(ar_link *l, ar_frame *f, double timeout_s)
{
    local_link *ll = (local_link *)l;
    frame_queue *q = ll->in;
    struct timespec deadline;
    if (timeout_s >= 0) {
        clock_gettime(CLOCK_REALTIME, &deadline);
        double t = deadline.tv_sec + deadline.tv_nsec * 1e-9 + timeout_s;
        deadline.tv_sec = (time_t)t;
        deadline.tv_nsec = (long)((t - (double)deadline.tv_sec) * 1e9);
    }
    pthread_mutex_lock(&q->lock);
    while (!q->head && !q->closed) {
        if (timeout_s < 0)
            pthread_cond_wait(&q->ready, &q->lock);
        else if (pthread_cond_timedwait(&q->ready, &q->lock, &deadline) == ETIMEDOUT)
            break;
    }
    queue_node *n = q->head;
    if (n) {
        q->head = n->next;
        if (!q->head)
            q->tail = NULL;
    }
    int closed = q->closed;
    pthread_mutex_unlock(&q->lock);
    if (!n) {
        if (closed)
            return ar_fail(AR_ECLOSED, "%s: link closed", l->name);
        return ar_fail(AR_ECLOSED, "%s: no frame within %.1f s", l->name, timeout_s);
    }
    *f = n->frame;
    free(n);
    return AR_OK;
}

static void queue_close(frame_queue *q)
{
    pthread_mutex_lock(&q->lock);
    q->closed = 1;
    pthread_cond_broadcast(&q->ready);
    pthread_mutex_unlock(&q->lock);
}

static void local_close(ar_link *l)
{
    local_link *ll = (local_link *)l;
    queue_close(ll->out);
    queue_close(ll->in);
}

static void queue_drain(frame_queue *q)
{
    queue_node *n = q->head;
    while (n) {
        queue_node *next = n->next;
        ar_frame_free(&n->frame);
        free(n);
        n = next;
    }
    q->head = q->tail = NULL;
}

static void local_destroy(ar_link *l)
{
    local_link *ll = (local_link *)l;
    local_shared *sh = ll->shared;
    local_close(l);
    pthread_mutex_lock(&sh->q[0].lock);
    int left = --sh->refs;
    pthread_mutex_unlock(&sh->q[0].lock);
    free(ll);
    if (left == 0) {
        for (int i = 0; i < 2; i++) {
            queue_drain(&sh->q[i]);
            pthread_mutex_destroy(&sh->q[i].lock);
            pthread_cond_destroy(&sh->q[i].ready);
        }
        free(sh);
    }
}

static const ar_link_vt local_vt = {local_send, local_recv, local_close, local_destroy};

int ar_link_local_pair(ar_link **a, ar_link **b, const char *name_a, const char *name_b)
{
    local_shared *sh = calloc(1, sizeof *sh);
    local_link *la = calloc(1, sizeof *la), *lb = calloc(1, sizeof *lb);
    if (!sh || !la || !lb) {
        free(sh);
        free(la);
        free(lb);
        return ar_fail(AR_ENOMEM, "out of memory creating a link");
    }
    for (int i = 0; i < 2; i++) {
        pthread_mutex_init(&sh->q[i].lock, NULL);
        pthread_cond_init(&sh->q[i].ready, NULL);
    }
    sh->refs = 2;
    la->base.vt = lb->base.vt = &local_vt;
    snprintf(la->base.name, sizeof la->base.name, "%s", name_a);
    snprintf(lb->base.name, sizeof lb->base.name, "%s", name_b);
    la->shared = lb->shared = sh;
    la->out = &sh->q[0];
    la->in = &sh->q[1];
    lb->out = &sh->q[1];
    lb->in = &sh->q[0];
    *a = &la->base;
    *b = &lb->base;
    return AR_OK;
}
