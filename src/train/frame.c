/* Frame helpers and the in-process link (two mutex + condvar queues). */
#include "train/frame.h"

#include "core/core.h"

#include <math.h>
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
    case AR_DT_BF16: return 2;
    case AR_DT_Q8: return 1;
    default: return 0;
    }
}

static size_t q8_blocks(size_t count)
{
    return (count + AR_Q8_BLOCK - 1) / AR_Q8_BLOCK;
}

size_t ar_payload_bytes(int dtype, size_t count)
{
    size_t n = count * ar_dtype_size(dtype);
    return dtype == AR_DT_Q8 ? n + 4 * q8_blocks(count) : n;
}

static int is_compressed(int dtype)
{
    return dtype == AR_DT_BF16 || dtype == AR_DT_Q8;
}

/* The frames whose float32 tensors may travel compressed: activations and
 * their gradients, forward and backward, between stages and inside a
 * tensor-parallel group. */
static int kind_compressible(int kind)
{
    return kind == AR_FRAME_ACT || kind == AR_FRAME_EVAL || kind == AR_FRAME_GRAD || kind == AR_FRAME_TP;
}

const char *ar_frame_kind_name(int kind)
{
    static const char *names[] = {"?",    "ACT",   "GRAD",  "NORM", "STEP", "EVAL", "EVAL_RESULT",
                                  "STOP", "ERROR", "SYNC", "ABORT", "TIED", "TP",   "PROBE"};
    return kind >= 1 && kind <= AR_FRAME_PROBE ? names[kind] : "unknown";
}

int ar_frame_validate(const ar_frame *f, size_t max_bytes)
{
    if (f->kind < AR_FRAME_ACT || f->kind > AR_FRAME_PROBE)
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
    if (is_compressed(f->dtype) && !kind_compressible(f->kind))
        return ar_fail(AR_EPROTO, "%s frame: compressed (%s), which only activations and their gradients may be",
                       ar_frame_kind_name(f->kind), f->dtype == AR_DT_Q8 ? "int8" : "bf16");
    size_t want = ar_payload_bytes(f->dtype, count);
    if (f->dtype == AR_DT_Q8 && want != f->nbytes)
        return ar_fail(AR_EPROTO, "%s frame: %zu int8 elements in %zu blocks of %d need %zu bytes with their scales, "
                       "the payload has %zu (a block cut short?)", ar_frame_kind_name(f->kind), count,
                       q8_blocks(count), AR_Q8_BLOCK, want, f->nbytes);
    if (want != f->nbytes)
        return ar_fail(AR_EPROTO, "%s frame: shape gives %zu bytes but the payload has %zu",
                       ar_frame_kind_name(f->kind), want, f->nbytes);
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

/* ---- compression ---------------------------------------------------------- */

const char *ar_compress_name(int codec)
{
    switch (codec) {
    case AR_COMPRESS_NONE: return "none";
    case AR_COMPRESS_BF16: return "bf16";
    case AR_COMPRESS_INT8: return "int8";
    case AR_COMPRESS_AUTO: return "auto";
    default: return "?";
    }
}

int ar_compress_parse(const char *name, int *codec)
{
    for (int c = AR_COMPRESS_NONE; c <= AR_COMPRESS_AUTO; c++)
        if (strcmp(name, ar_compress_name(c)) == 0) {
            *codec = c;
            return AR_OK;
        }
    return ar_fail(AR_EINVAL, "unknown compression \"%s\" (expected none, bf16, int8 or auto)", name);
}

int ar_frame_compressible(const ar_frame *f)
{
    return kind_compressible(f->kind) && f->dtype == AR_DT_F32 && f->data &&
           f->nbytes >= AR_COMPRESS_MIN_FLOATS * sizeof(float) && f->nbytes % sizeof(float) == 0;
}

size_t ar_compressed_bytes(int codec, size_t floats)
{
    if (codec == AR_COMPRESS_BF16)
        return ar_payload_bytes(AR_DT_BF16, floats);
    if (codec == AR_COMPRESS_INT8)
        return ar_payload_bytes(AR_DT_Q8, floats);
    return floats * sizeof(float);
}

/* float32 -> bfloat16, rounded to nearest even (finite input). 0 when the
 * rounding overflows to infinity (values within half a bf16 step of FLT_MAX). */
static int to_bf16(float x, uint16_t *out)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    *out = (uint16_t)(u >> 16);
    return (*out & 0x7f80u) != 0x7f80u;
}

static float from_bf16(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* Encode n finite floats; 0 when one is not finite (or rounds to infinity). */
static int encode_bf16(const float *x, size_t n, uint16_t *out)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]) || !to_bf16(x[i], &out[i]))
            return 0;
    return 1;
}

/* Scales first, then the int8 values: symmetric, round to nearest, so the
 * largest magnitude of a block is exactly +-127 scales. 0 when a value is
 * not finite. */
static int encode_q8(const float *x, size_t n, uint8_t *out)
{
    size_t nb = q8_blocks(n);
    float *scales = (float *)(void *)out; /* the payload buffer is malloc'd: aligned */
    int8_t *q = (int8_t *)(out + 4 * nb);
    for (size_t b = 0; b < nb; b++) {
        size_t lo = b * AR_Q8_BLOCK, hi = lo + AR_Q8_BLOCK < n ? lo + AR_Q8_BLOCK : n;
        float m = 0;
        for (size_t i = lo; i < hi; i++) {
            if (!isfinite(x[i]))
                return 0;
            float a = fabsf(x[i]);
            m = a > m ? a : m;
        }
        float scale = m / 127.0f;
        scales[b] = scale;
        for (size_t i = lo; i < hi; i++) {
            long v = scale > 0 ? lrintf(x[i] / scale) : 0;
            q[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
        }
    }
    return 1;
}

int ar_frame_compress(ar_frame *f, int codec)
{
    if ((codec != AR_COMPRESS_BF16 && codec != AR_COMPRESS_INT8) || !ar_frame_compressible(f))
        return AR_OK;
    size_t n = f->nbytes / sizeof(float);
    size_t bytes = ar_compressed_bytes(codec, n);
    void *buf = malloc(bytes);
    if (!buf)
        return ar_fail(AR_ENOMEM, "out of memory compressing a %zu byte frame", f->nbytes);
    int ok = codec == AR_COMPRESS_BF16 ? encode_bf16(f->data, n, buf) : encode_q8(f->data, n, buf);
    if (!ok) { /* a value that is not finite: it goes as it is, for the receiver to see */
        free(buf);
        return AR_OK;
    }
    free(f->data);
    f->data = buf;
    f->nbytes = bytes;
    f->dtype = codec == AR_COMPRESS_BF16 ? AR_DT_BF16 : AR_DT_Q8;
    return AR_OK;
}

static size_t frame_elems(const ar_frame *f)
{
    size_t count = f->ndim ? 1 : 0;
    for (int i = 0; i < f->ndim && i < AR_FRAME_MAX_DIMS; i++)
        count *= (size_t)f->shape[i];
    return count;
}

int ar_frame_check_compressed(const ar_frame *f)
{
    if (!is_compressed(f->dtype))
        return AR_OK;
    size_t n = frame_elems(f);
    if (f->nbytes != ar_payload_bytes(f->dtype, n) || (n && !f->data))
        return ar_fail(AR_EPROTO, "%s frame: compressed payload of %zu bytes for %zu elements",
                       ar_frame_kind_name(f->kind), f->nbytes, n);
    if (f->dtype == AR_DT_BF16) {
        const uint8_t *p = f->data;
        for (size_t i = 0; i < n; i++) {
            uint16_t b = (uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)); /* little-endian */
            if ((b & 0x7f80u) == 0x7f80u)
                return ar_fail(AR_EPROTO, "%s frame: bf16 element %zu is %s (a sender compresses finite values only)",
                               ar_frame_kind_name(f->kind), i, (b & 0x7fu) ? "NaN" : "infinite");
        }
        return AR_OK;
    }
    size_t nb = q8_blocks(n);
    for (size_t b = 0; b < nb; b++) {
        float scale;
        memcpy(&scale, (const uint8_t *)f->data + 4 * b, sizeof scale);
        if (!isfinite(scale) || scale < 0)
            return ar_fail(AR_EPROTO, "%s frame: int8 block %zu of %zu has scale %g (a scale is finite and not negative)",
                           ar_frame_kind_name(f->kind), b, nb, (double)scale);
    }
    return AR_OK;
}

int ar_frame_decompress(ar_frame *f)
{
    if (!is_compressed(f->dtype))
        return AR_OK;
    int rc = ar_frame_check_compressed(f);
    if (rc != AR_OK)
        return rc;
    size_t n = frame_elems(f);
    float *out = malloc(n ? n * sizeof(float) : 1);
    if (!out)
        return ar_fail(AR_ENOMEM, "out of memory decompressing a %s frame of %zu elements",
                       ar_frame_kind_name(f->kind), n);
    const uint8_t *p = f->data; /* NULL for a frame of no elements: nothing to read */
    if (n == 0) {
        /* as it is: no pointer arithmetic on a NULL payload */
    } else if (f->dtype == AR_DT_BF16) {
        for (size_t i = 0; i < n; i++)
            out[i] = from_bf16((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
    } else {
        size_t nb = q8_blocks(n);
        const int8_t *q = (const int8_t *)(p + 4 * nb);
        for (size_t b = 0; b < nb; b++) {
            float scale;
            memcpy(&scale, p + 4 * b, sizeof scale);
            size_t lo = b * AR_Q8_BLOCK, hi = lo + AR_Q8_BLOCK < n ? lo + AR_Q8_BLOCK : n;
            for (size_t i = lo; i < hi; i++)
                out[i] = (float)q[i] * scale;
        }
    }
    free(f->data);
    f->data = out;
    f->nbytes = n * sizeof(float);
    f->dtype = AR_DT_F32;
    return AR_OK;
}

int ar_link_send(ar_link *l, ar_frame *f)
{
    size_t raw = ar_frame_wire_bytes(f); /* the send takes the frame */
    /* out of memory to compress, the frame goes as it is */
    if (l->compress == AR_COMPRESS_BF16 || l->compress == AR_COMPRESS_INT8)
        (void)ar_frame_compress(f, l->compress);
    size_t bytes = ar_frame_wire_bytes(f);
    int rc = l->vt->send(l, f);
    if (rc == AR_OK) {
        l->bytes_sent += bytes;
        l->raw_sent += raw;
    }
    return rc;
}

int ar_link_recv(ar_link *l, ar_frame *f, double timeout_s)
{
    int rc = l->vt->recv(l, f, timeout_s);
    if (rc != AR_OK)
        return rc;
    size_t bytes = ar_frame_wire_bytes(f);
    if ((rc = ar_frame_decompress(f)) != AR_OK) {
        rc = ar_fail(rc, "%s: %s", l->name, ar_last_error());
        ar_frame_free(f);
        return rc;
    }
    l->bytes_received += bytes;
    l->raw_received += ar_frame_wire_bytes(f);
    return AR_OK;
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
