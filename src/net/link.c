/* Links over a gRPC Pipe stream, for both ends (docs/DESIGN.md, "The chain protocol").
 *
 * A link never blocks on its peer: frames sent are queued and written one
 * batch at a time by the event loop; a receive is always outstanding and
 * every frame that arrives is decoded, validated and queued. Like the
 * in-process link, both directions are unbounded queues, so two neighbours
 * writing large frames to each other cannot deadlock on flow control.
 *
 * Frames go out as two slices: the header packed by protobuf-c (payload
 * unset), ending with the payload field's tag and length, then the payload
 * itself by reference (grpc_slice_new: freed when gRPC is done with it). The
 * bytes are ordinary protobuf for any other client. Frames come in through a
 * hand-written decoder reading gRPC's slices directly, so the payload is
 * copied once, into the frame's own buffer. */
#include "net/net_internal.h"

#include "arceus.pb-c.h"
#include "core/core.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- encoding ----------------------------------------------------------- */

static size_t put_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* Takes the frame's buffers. session: the stage's session, on the first
 * frame of a client's Pipe (NULL otherwise). */
static int frame_encode(ar_frame *f, const char *session, grpc_byte_buffer **out)
{
    Arceus__Frame h = ARCEUS__FRAME__INIT;
    if (session)
        h.session = (char *)session;
    h.kind = f->kind;
    h.step = f->step;
    h.mb = f->mb;
    h.nmb = f->nmb;
    h.rows = f->rows;
    h.dtype = f->dtype;
    int64_t shape[AR_FRAME_MAX_DIMS];
    int nd = f->ndim < 0 ? 0 : f->ndim > AR_FRAME_MAX_DIMS ? AR_FRAME_MAX_DIMS : f->ndim;
    for (int i = 0; i < nd; i++)
        shape[i] = f->shape[i];
    h.n_shape = (size_t)nd;
    h.shape = shape;
    size_t ns = 4;
    while (ns > 0 && f->scalars[ns - 1] == 0)
        ns--;
    h.n_scalars = ns;
    h.scalars = f->scalars;
    h.targets.len = f->ntargets * sizeof(int32_t); /* little-endian hosts */
    h.targets.data = (uint8_t *)f->targets;
    size_t hlen = arceus__frame__get_packed_size(&h);
    grpc_slice hs = grpc_slice_malloc(hlen + 11);
    uint8_t *p = GRPC_SLICE_START_PTR(hs);
    size_t at = arceus__frame__pack(&h, p);
    free(f->targets);
    f->targets = NULL;
    grpc_slice slices[2];
    size_t nslices = 1;
    if (f->nbytes > 0 && f->data) {
        p[at++] = (10 << 3) | 2; /* field 10 (payload), length-delimited */
        at += put_varint(p + at, f->nbytes);
        slices[1] = grpc_slice_new(f->data, f->nbytes, free);
        nslices = 2;
    } else {
        free(f->data);
    }
    f->data = NULL;
    memset(f, 0, sizeof *f);
    slices[0] = grpc_slice_sub_no_ref(hs, 0, at);
    *out = grpc_raw_byte_buffer_create(slices, nslices);
    grpc_slice_unref(hs);
    if (nslices == 2)
        grpc_slice_unref(slices[1]);
    return *out ? AR_OK : ar_fail(AR_ENOMEM, "out of memory for a message");
}

/* ---- decoding ----------------------------------------------------------- */

/* A cursor over the segments of a message. */
typedef struct {
    const uint8_t **ptr;
    const size_t *len;
    int nseg, seg;
    size_t off;
    size_t left; /* bytes left in the whole message */
} cursor;

static int cur_byte(cursor *c, uint8_t *b)
{
    while (c->seg < c->nseg && c->off >= c->len[c->seg]) {
        c->seg++;
        c->off = 0;
    }
    if (c->seg >= c->nseg || c->left == 0)
        return -1;
    *b = c->ptr[c->seg][c->off++];
    c->left--;
    return 0;
}

static int cur_read(cursor *c, void *dst, size_t n)
{
    if (n > c->left)
        return -1;
    uint8_t *d = dst;
    while (n > 0) {
        while (c->seg < c->nseg && c->off >= c->len[c->seg]) {
            c->seg++;
            c->off = 0;
        }
        if (c->seg >= c->nseg)
            return -1;
        size_t take = c->len[c->seg] - c->off;
        if (take > n)
            take = n;
        if (d) {
            memcpy(d, c->ptr[c->seg] + c->off, take);
            d += take;
        }
        c->off += take;
        c->left -= take;
        n -= take;
    }
    return 0;
}

static int cur_varint(cursor *c, uint64_t *v)
{
    uint64_t r = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        uint8_t b;
        if (cur_byte(c, &b) != 0)
            return -1;
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = r;
            return 0;
        }
    }
    return -1;
}

#define BAD(...) do { rc = ar_fail(AR_EPROTO, __VA_ARGS__); goto fail; } while (0)

/* With payload_at non-NULL the payload is not copied: f->nbytes is set, f->data
 * stays NULL and *payload_at gets the payload's offset in the message. */
/* Frames coalesced into one message (field 15, see proto/arceus.proto). */
#define MAX_NESTED NET_MAX_COALESCED
typedef struct {
    int n;
    size_t off[MAX_NESTED], len[MAX_NESTED];
} nested_list;

static int decode_segments_n(const uint8_t **ptr, const size_t *len, int nseg, ar_frame *f,
                             size_t *payload_at, nested_list *nested);

static int decode_segments(const uint8_t **ptr, const size_t *len, int nseg, ar_frame *f,
                           size_t *payload_at)
{
    return decode_segments_n(ptr, len, nseg, f, payload_at, NULL);
}

static int decode_segments_n(const uint8_t **ptr, const size_t *len, int nseg, ar_frame *f,
                             size_t *payload_at, nested_list *nested)
{
    cursor c = {.ptr = ptr, .len = len, .nseg = nseg};
    for (int i = 0; i < nseg; i++)
        c.left += len[i];
    size_t total = c.left;
    memset(f, 0, sizeof *f);
    int rc;
    int nscalars = 0;
    while (c.left > 0) {
        uint64_t key, v, n;
        if (cur_varint(&c, &key) != 0)
            BAD("truncated frame");
        int field = (int)(key >> 3), wt = (int)(key & 7);
        if (field == 7 && wt == 2) { /* packed shape */
            if (cur_varint(&c, &n) != 0 || n > c.left)
                BAD("truncated frame shape");
            size_t end = c.left - n;
            while (c.left > end) {
                if (f->ndim >= AR_FRAME_MAX_DIMS)
                    BAD("frame with more than %d dimensions", AR_FRAME_MAX_DIMS);
                if (cur_varint(&c, &v) != 0 || c.left < end)
                    BAD("malformed frame shape");
                f->shape[f->ndim++] = (int64_t)v;
            }
        } else if (field == 8 && wt == 2) { /* packed scalars */
            if (cur_varint(&c, &n) != 0 || n > c.left || n % 8)
                BAD("malformed frame scalars");
            for (uint64_t i = 0; i < n / 8; i++) {
                double d;
                if (cur_read(&c, &d, 8) != 0)
                    BAD("truncated frame scalars");
                if (nscalars >= 4)
                    BAD("frame with more than 4 scalars");
                f->scalars[nscalars++] = d;
            }
        } else if (field == 8 && wt == 1) {
            double d;
            if (cur_read(&c, &d, 8) != 0)
                BAD("truncated frame scalars");
            if (nscalars >= 4)
                BAD("frame with more than 4 scalars");
            f->scalars[nscalars++] = d;
        } else if (field == 15 && wt == 2 && nested) {
            if (cur_varint(&c, &n) != 0 || n > c.left)
                BAD("truncated coalesced frame");
            if (nested->n >= MAX_NESTED)
                BAD("more than %d frames in one message", MAX_NESTED);
            nested->off[nested->n] = total - c.left;
            nested->len[nested->n] = n;
            nested->n++;
            if (cur_read(&c, NULL, n) != 0)
                BAD("truncated coalesced frame");
        } else if ((field == 9 || field == 10) && wt == 2) {
            if (cur_varint(&c, &n) != 0 || n > c.left)
                BAD("truncated frame %s", field == 9 ? "targets" : "payload");
            if (field == 9 && n % 4)
                BAD("frame targets of %llu bytes (not whole int32)", (unsigned long long)n);
            if (field == 10 && payload_at) {
                *payload_at = total - c.left;
                free(f->data);
                f->data = NULL;
                f->nbytes = n;
                if (cur_read(&c, NULL, n) != 0)
                    BAD("truncated frame");
                continue;
            }
            void *buf = n ? malloc(n) : NULL;
            if (n && !buf) {
                rc = ar_fail(AR_ENOMEM, "out of memory for a %llu byte frame", (unsigned long long)n);
                goto fail;
            }
            if (cur_read(&c, buf, n) != 0) {
                free(buf);
                BAD("truncated frame");
            }
            if (field == 9) {
                free(f->targets);
                f->targets = buf;
                f->ntargets = n / 4;
            } else {
                free(f->data);
                f->data = buf;
                f->nbytes = n;
            }
        } else if (wt == 0) {
            if (cur_varint(&c, &v) != 0)
                BAD("truncated frame");
            switch (field) {
            case 1: f->kind = (int32_t)v; break;
            case 2: f->step = (int64_t)v; break;
            case 3: f->mb = (int32_t)v; break;
            case 4: f->nmb = (int32_t)v; break;
            case 5: f->rows = (int32_t)v; break;
            case 6: f->dtype = (int32_t)v; break;
            case 7:
                if (f->ndim >= AR_FRAME_MAX_DIMS)
                    BAD("frame with more than %d dimensions", AR_FRAME_MAX_DIMS);
                f->shape[f->ndim++] = (int64_t)v;
                break;
            default: break; /* unknown field: skipped */
            }
        } else if (wt == 1) {
            if (cur_read(&c, NULL, 8) != 0)
                BAD("truncated frame");
        } else if (wt == 5) {
            if (cur_read(&c, NULL, 4) != 0)
                BAD("truncated frame");
        } else if (wt == 2) {
            if (cur_varint(&c, &n) != 0 || cur_read(&c, NULL, n) != 0)
                BAD("truncated frame");
        } else {
            BAD("frame field %d has wire type %d", field, wt);
        }
    }
    return AR_OK;
fail:
    ar_frame_free(f);
    return rc;
}

/* The session field (16) among the top-level fields of a message, without
 * decoding the frames. 1 when present (buf gets it, or "" when it does not
 * fit), 0 when absent or when the message is malformed before it. */
static int session_of_segments(const uint8_t **ptr, const size_t *len, int nseg, char *buf, size_t size)
{
    cursor c = {.ptr = ptr, .len = len, .nseg = nseg};
    for (int i = 0; i < nseg; i++)
        c.left += len[i];
    buf[0] = '\0';
    while (c.left > 0) {
        uint64_t key, n;
        if (cur_varint(&c, &key) != 0)
            return 0;
        int field = (int)(key >> 3), wt = (int)(key & 7);
        if (wt == 0) {
            if (cur_varint(&c, &n) != 0)
                return 0;
        } else if (wt == 1 || wt == 5) {
            if (cur_read(&c, NULL, wt == 1 ? 8 : 4) != 0)
                return 0;
        } else if (wt == 2) {
            if (cur_varint(&c, &n) != 0 || n > c.left)
                return 0;
            if (field == 16) {
                if (n < size) {
                    if (cur_read(&c, buf, n) != 0)
                        return 0;
                    buf[n] = '\0';
                    if (strlen(buf) != n) /* a NUL inside: not a session */
                        buf[0] = '\0';
                } else if (cur_read(&c, NULL, n) != 0) {
                    return 0;
                }
                return 1;
            }
            if (cur_read(&c, NULL, n) != 0)
                return 0;
        } else {
            return 0;
        }
    }
    return 0;
}

int net_frames_session(grpc_byte_buffer *bb, char *buf, size_t size)
{
    buf[0] = '\0';
    if (size == 0 || bb->type != GRPC_BB_RAW)
        return 0;
    const grpc_slice_buffer *sb = &bb->data.raw.slice_buffer;
    if (sb->count > (size_t)0x7fffffff)
        return 0;
    const uint8_t **ptr = malloc(sizeof *ptr * (sb->count ? sb->count : 1));
    size_t *len = malloc(sizeof *len * (sb->count ? sb->count : 1));
    int found = 0;
    if (ptr && len) {
        for (size_t i = 0; i < sb->count; i++) {
            ptr[i] = GRPC_SLICE_START_PTR(sb->slices[i]);
            len[i] = GRPC_SLICE_LENGTH(sb->slices[i]);
        }
        found = session_of_segments(ptr, len, (int)sb->count, buf, size);
    }
    free(ptr);
    free(len);
    return found;
}

int ar_net_frame_decode(const void *data, size_t len, ar_frame *f)
{
    const uint8_t *p = data;
    return decode_segments(&p, &len, 1, f, NULL);
}

/* A received message as one uncompressed byte buffer (the slices are read in
 * place); a compressed one is flattened first. NULL when out of memory. */
static grpc_byte_buffer *raw_buffer(grpc_byte_buffer *bb)
{
    if (bb->type == GRPC_BB_RAW && bb->data.raw.compression == GRPC_COMPRESS_NONE)
        return bb;
    grpc_byte_buffer_reader r;
    grpc_byte_buffer *out = NULL;
    if (grpc_byte_buffer_reader_init(&r, bb)) {
        grpc_slice s = grpc_byte_buffer_reader_readall(&r);
        grpc_byte_buffer_reader_destroy(&r);
        out = grpc_raw_byte_buffer_create(&s, 1);
        grpc_slice_unref(s);
    }
    grpc_byte_buffer_destroy(bb);
    return out;
}

/* Decode the header of a raw byte buffer in place, leaving the payload in
 * the buffer (f->data NULL, *payload_at its offset): the event loop only
 * parses and validates; the copy is made by the thread that takes the frame
 * (net_payload_copy), so a link's receiver and the loop work in parallel. */
/* The segments [off, off + n) of a segment list, as a new list (malloc'd). */
static int sub_segments(const uint8_t **ptr, const size_t *len, int nseg, size_t off, size_t n,
                        const uint8_t ***out_ptr, size_t **out_len, int *out_n)
{
    const uint8_t **p = malloc(sizeof *p * (size_t)(nseg ? nseg : 1));
    size_t *l = malloc(sizeof *l * (size_t)(nseg ? nseg : 1));
    if (!p || !l) {
        free(p);
        free(l);
        return ar_fail(AR_ENOMEM, "out of memory reading a message");
    }
    int k = 0;
    for (int i = 0; i < nseg && n > 0; i++) {
        if (off >= len[i]) {
            off -= len[i];
            continue;
        }
        size_t take = len[i] - off < n ? len[i] - off : n;
        p[k] = ptr[i] + off;
        l[k] = take;
        k++;
        n -= take;
        off = 0;
    }
    *out_ptr = p;
    *out_len = l;
    *out_n = k;
    return n == 0 ? AR_OK : ar_fail(AR_EPROTO, "truncated coalesced frame");
}

/* Decode every frame of a message: the first, then those coalesced into it
 * (field 15), into fs[0..*count); payloads stay in the buffer (payload_at). */
static int frames_decode_bb(grpc_byte_buffer *bb, ar_frame *fs, size_t *payload_at, int *count)
{
    *count = 0;
    if (bb->type != GRPC_BB_RAW)
        return ar_fail(AR_EPROTO, "message is not a raw byte buffer");
    const grpc_slice_buffer *sb = &bb->data.raw.slice_buffer;
    enum { NSTACK = 64 };
    const uint8_t *ptr_s[NSTACK];
    size_t len_s[NSTACK];
    size_t n = sb->count;
    const uint8_t **ptr = n <= NSTACK ? ptr_s : malloc(sizeof *ptr * n);
    size_t *len = n <= NSTACK ? len_s : malloc(sizeof *len * n);
    nested_list *nested = malloc(sizeof *nested);
    int rc;
    *count = 0;
    if (!ptr || !len || !nested) {
        rc = ar_fail(AR_ENOMEM, "out of memory reading a message");
    } else if (n > (size_t)0x7fffffff) {
        rc = ar_fail(AR_EPROTO, "message of too many slices");
    } else {
        for (size_t i = 0; i < n; i++) {
            ptr[i] = GRPC_SLICE_START_PTR(sb->slices[i]);
            len[i] = GRPC_SLICE_LENGTH(sb->slices[i]);
        }
        nested->n = 0;
        rc = decode_segments_n(ptr, len, (int)n, &fs[0], &payload_at[0], nested);
        if (rc == AR_OK)
            *count = 1;
        for (int k = 0; rc == AR_OK && k < nested->n; k++) {
            const uint8_t **sp = NULL;
            size_t *sl = NULL;
            int sn = 0;
            rc = sub_segments(ptr, len, (int)n, nested->off[k], nested->len[k], &sp, &sl, &sn);
            if (rc == AR_OK) {
                size_t at = 0;
                /* a coalesced frame carries no further frames */
                rc = decode_segments(sp, sl, sn, &fs[*count], &at);
                payload_at[*count] = nested->off[k] + at;
                if (rc == AR_OK)
                    (*count)++;
            }
            free(sp);
            free(sl);
        }
        if (rc != AR_OK) {
            for (int k = 0; k < *count; k++)
                ar_frame_free(&fs[k]);
            *count = 0;
        }
    }
    if (ptr != ptr_s)
        free(ptr);
    if (len != len_s)
        free(len);
    free(nested);
    return rc;
}

int net_frames_receive(grpc_byte_buffer *bb, size_t max_frame, ar_frame *fs, size_t *payload_at,
                       int *count)
{
    int rc = frames_decode_bb(bb, fs, payload_at, count);
    for (int k = 0; rc == AR_OK && k < *count; k++)
        rc = ar_frame_validate(&fs[k], max_frame);
    if (rc != AR_OK) {
        for (int k = 0; k < *count; k++)
            ar_frame_free(&fs[k]);
        *count = 0;
    }
    return rc;
}

/* Copy n bytes at offset `at` of a raw byte buffer into a new buffer. */
int net_payload_copy(grpc_byte_buffer *bb, size_t at, size_t n, void **out)
{
    *out = NULL;
    if (n == 0)
        return AR_OK;
    uint8_t *buf = malloc(n);
    if (!buf)
        return ar_fail(AR_ENOMEM, "out of memory for a %zu byte frame", n);
    const grpc_slice_buffer *sb = &bb->data.raw.slice_buffer;
    size_t got = 0;
    for (size_t i = 0; i < sb->count && got < n; i++) {
        size_t sl = GRPC_SLICE_LENGTH(sb->slices[i]);
        if (at >= sl) {
            at -= sl;
            continue;
        }
        size_t take = sl - at < n - got ? sl - at : n - got;
        memcpy(buf + got, GRPC_SLICE_START_PTR(sb->slices[i]) + at, take);
        got += take;
        at = 0;
    }
    if (got != n) { /* cannot happen: the decoder checked the length */
        free(buf);
        return ar_fail(AR_EPROTO, "truncated frame payload");
    }
    *out = buf;
    return AR_OK;
}

/* ---- the link ----------------------------------------------------------- */

typedef struct out_msg {
    grpc_byte_buffer *bb;
    struct out_msg *next;
} out_msg;

/* A received message, shared by the frames coalesced in it until the last
 * of their payloads has been copied out. One counter for the message costs
 * a frame one atomic operation, where a reference of its own to every slice
 * of the message (grpc_byte_buffer_copy) cost one per slice, on cache lines
 * the event loop and the receiving thread both write: at 64 KiB frames,
 * 64 frames to a 4 MiB message of 64 slices, that was 8,192 atomics a
 * message. */
typedef struct {
    grpc_byte_buffer *bb;
    atomic_int refs;
} msg_hold;

static void hold_release(msg_hold *h)
{
    if (h && atomic_fetch_sub(&h->refs, 1) == 1) {
        grpc_byte_buffer_destroy(h->bb);
        free(h);
    }
}

typedef struct in_msg {
    ar_frame f;          /* payload still in hold->bb when f.nbytes > 0 */
    msg_hold *hold;
    size_t payload_at;
    struct in_msg *next;
} in_msg;

typedef struct glink glink;
typedef struct {
    net_tag base;
    glink *l;
} link_tag;

struct glink {
    ar_link base;
    grpc_call *call;
    int is_server;
    struct ar_rpc *rpc; /* server end: where statuses go (under mu) */
    size_t max_frame;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;           /* the owner + every outstanding batch */
    link_tag send_tag, recv_tag, end_tag, meta_tag, half_tag;
    out_msg *out_head, *out_tail;
    out_msg *coalesced, *coalesced_tail; /* only inside coalesce_locked */
    grpc_byte_buffer *sending;
    int send_busy;
    int want_half_close, half_closed;
    in_msg *in_head, *in_tail;
    grpc_byte_buffer *recv_buf;
    int recv_done;      /* no more frames will come */
    int ended;          /* client: status received; server: close received */
    int closed;         /* closed here */
    int failed;
    int status;         /* gRPC status once known, else -1 */
    char err[600];
    grpc_status_code st_code;
    grpc_slice st_details;
    grpc_metadata_array st_trailing, init_md;
    int cancelled;
    ar_link *close_also;
    /* sessions: a client's first frame carries `session` (net_link_set_session);
     * a server end keeps what its first message carried */
    char session[AR_SESSION_HEX + 1];
    int session_sent;
    int first_seen; /* server: the first message arrived (and was decoded) */
    int first_has_session;
    char first_session[AR_SESSION_HEX + 1];
};

static void link_unref(glink *l)
{
    pthread_mutex_lock(&l->mu);
    int left = --l->refs;
    pthread_mutex_unlock(&l->mu);
    if (left > 0)
        return;
    for (out_msg *m = l->out_head; m;) {
        out_msg *next = m->next;
        grpc_byte_buffer_destroy(m->bb);
        free(m);
        m = next;
    }
    for (in_msg *m = l->in_head; m;) {
        in_msg *next = m->next;
        ar_frame_free(&m->f);
        hold_release(m->hold);
        free(m);
        m = next;
    }
    if (l->recv_buf)
        grpc_byte_buffer_destroy(l->recv_buf);
    grpc_slice_unref(l->st_details);
    grpc_metadata_array_destroy(&l->st_trailing);
    grpc_metadata_array_destroy(&l->init_md);
    grpc_call_unref(l->call);
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
    free(l);
}

static int start_locked(glink *l, link_tag *t, const grpc_op *ops, size_t n)
{
    if (net_loop_closing()) {
        l->failed = 1;
        if (!l->err[0])
            snprintf(l->err, sizeof l->err, "%s: the network is shutting down", l->base.name);
        return -1;
    }
    l->refs++;
    grpc_call_error e = grpc_call_start_batch(l->call, ops, n, t, NULL);
    if (e != GRPC_CALL_OK) {
        l->refs--;
        l->failed = 1;
        if (!l->err[0])
            snprintf(l->err, sizeof l->err, "%s: cannot start a gRPC batch (%d)", l->base.name, (int)e);
        return -1;
    }
    return 0;
}

/* Frames queued behind the one being sent ride in the same message (as its
 * field 15): one gRPC message costs about as much as tens of KiB of payload,
 * and a link never waits to fill a message. Only frames up to
 * COALESCE_SMALL are coalesced, up to COALESCE_FRAMES of them and
 * COALESCE_BYTES in all; a larger frame goes alone. Measured with
 * bench/link_bench on 2 and 16 cores: 64 KiB frames gain most from the
 * largest messages (3.0 -> 4.1 GB/s going from 64 to 256 frames a message,
 * 16 cores), while 1 MiB frames were slower coalesced 16 to a message than
 * alone (the receiver then holds and copies 16 MiB of cold slices at once,
 * and gets none of it before all of it). */
#define COALESCE_BYTES ((size_t)16 << 20)
#define COALESCE_FRAMES NET_MAX_COALESCED
#define COALESCE_SMALL ((size_t)512 << 10)

/* The next message: the head of the queue, plus the frames queued behind it
 * while they fit. NULL when out of memory (the head is sent alone). */
static grpc_byte_buffer *coalesce_locked(glink *l, grpc_byte_buffer *head)
{
    size_t total = grpc_byte_buffer_length(head), nslices = head->data.raw.slice_buffer.count;
    int frames = 1;
    out_msg *m = l->out_head;
    int small = total <= COALESCE_SMALL;
    while (m && small && frames < COALESCE_FRAMES && m->bb->type == GRPC_BB_RAW &&
           grpc_byte_buffer_length(m->bb) <= COALESCE_SMALL &&
           total + grpc_byte_buffer_length(m->bb) + 16 <= COALESCE_BYTES) {
        total += grpc_byte_buffer_length(m->bb) + 16;
        nslices += 1 + m->bb->data.raw.slice_buffer.count;
        frames++;
        m = m->next;
    }
    if (frames == 1 || head->type != GRPC_BB_RAW)
        return head;
    grpc_slice *slices = malloc(sizeof *slices * nslices);
    if (!slices)
        return head;
    size_t k = 0;
    const grpc_slice_buffer *hs = &head->data.raw.slice_buffer;
    for (size_t i = 0; i < hs->count; i++)
        slices[k++] = hs->slices[i];
    grpc_slice tags[COALESCE_FRAMES];
    int ntags = 0;
    for (int f = 1; f < frames; f++) {
        out_msg *next = l->out_head;
        l->out_head = next->next;
        if (!l->out_head)
            l->out_tail = NULL;
        uint8_t tag[16];
        size_t tl = 0;
        tag[tl++] = (15 << 3) | 2; /* field 15 (more), length-delimited */
        tl += put_varint(tag + tl, grpc_byte_buffer_length(next->bb));
        tags[ntags] = grpc_slice_from_copied_buffer((const char *)tag, tl);
        slices[k++] = tags[ntags++];
        const grpc_slice_buffer *ns = &next->bb->data.raw.slice_buffer;
        for (size_t i = 0; i < ns->count; i++)
            slices[k++] = ns->slices[i];
        /* the new message takes its own references below; keep the old
         * buffers until then */
        next->next = NULL;
        if (f == 1)
            l->coalesced = next;
        else
            l->coalesced_tail->next = next;
        l->coalesced_tail = next;
    }
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(slices, k);
    free(slices);
    for (int i = 0; i < ntags; i++)
        grpc_slice_unref(tags[i]);
    for (out_msg *o = l->coalesced; o;) {
        out_msg *next = o->next;
        grpc_byte_buffer_destroy(o->bb);
        free(o);
        o = next;
    }
    l->coalesced = l->coalesced_tail = NULL;
    if (!bb) /* cannot happen in practice; the coalesced frames are lost: fail the link */
        l->failed = 1;
    grpc_byte_buffer_destroy(head);
    return bb;
}

static void start_send_locked(glink *l)
{
    out_msg *m = l->out_head;
    l->out_head = m->next;
    if (!l->out_head)
        l->out_tail = NULL;
    l->sending = coalesce_locked(l, m->bb);
    free(m);
    if (!l->sending) {
        if (!l->err[0])
            snprintf(l->err, sizeof l->err, "%s: out of memory sending", l->base.name);
        return;
    }
    l->send_busy = 1;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = l->sending;
    if (start_locked(l, &l->send_tag, &op, 1) != 0) {
        grpc_byte_buffer_destroy(l->sending);
        l->sending = NULL;
        l->send_busy = 0;
    } else if (l->is_server && l->rpc) {
        /* the server bounds how long a client may leave it unread (on_send,
         * which ends the send, needs mu, held here) */
        net_rpc_note(l->rpc, NET_RPC_SEND_BEGIN);
    }
}

static void maybe_half_close_locked(glink *l)
{
    if (l->is_server || !l->want_half_close || l->half_closed || l->send_busy || l->out_head)
        return;
    l->half_closed = 1;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    start_locked(l, &l->half_tag, &op, 1);
}

static void start_recv_locked(glink *l)
{
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &l->recv_buf;
    if (start_locked(l, &l->recv_tag, &op, 1) != 0)
        l->recv_done = 1;
}

static void on_send(net_tag *t, int ok)
{
    glink *l = ((link_tag *)t)->l;
    pthread_mutex_lock(&l->mu);
    grpc_byte_buffer_destroy(l->sending);
    l->sending = NULL;
    l->send_busy = 0;
    if (l->is_server && l->rpc)
        net_rpc_note(l->rpc, NET_RPC_SEND_END);
    if (!ok) {
        l->failed = 1;
        if (!l->err[0])
            snprintf(l->err, sizeof l->err, "%s disconnected", l->base.name);
    } else if (l->out_head && !l->closed) {
        start_send_locked(l);
    }
    maybe_half_close_locked(l);
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    link_unref(l);
}

/* A bad message from the peer: the stream ends with INVALID_ARGUMENT (the
 * peer learns why) and nothing more is received. mu held. */
static void fail_invalid_locked(glink *l, const char *msg)
{
    l->recv_done = 1;
    l->failed = 1;
    l->status = GRPC_STATUS_INVALID_ARGUMENT;
    snprintf(l->err, sizeof l->err, "%s: %s", l->base.name, msg);
    ar_log(AR_LOG_ERROR, "%s: %s", l->base.name, msg);
    if (l->is_server && l->rpc)
        net_rpc_send_status_async(l->rpc, GRPC_STATUS_INVALID_ARGUMENT, msg);
    else if (!l->is_server)
        grpc_call_cancel_with_status(l->call, GRPC_STATUS_INVALID_ARGUMENT, msg, NULL);
    pthread_cond_broadcast(&l->cv);
}

static void on_recv(net_tag *t, int ok)
{
    glink *l = ((link_tag *)t)->l;
    grpc_byte_buffer *bb = l->recv_buf;
    l->recv_buf = NULL;
    int got = ok && bb; /* a message arrived (else the stream ended) */
    enum { MAXF = 1 + MAX_NESTED };
    ar_frame *fs = NULL;
    size_t *payload_at = NULL;
    int nf = 0;
    int rc = AR_OK;
    char msg[512] = "";
    if (bb && !ok) {
        grpc_byte_buffer_destroy(bb);
        bb = NULL;
    }
    /* only the event loop touches first_seen's writer side before it is set
     * under mu below: receives are one at a time */
    int first_msg = got && l->is_server && !l->first_seen;
    char session[AR_SESSION_HEX + 1] = "";
    int has_session = 0;
    if (got && !(bb = raw_buffer(bb))) {
        rc = AR_ENOMEM;
        snprintf(msg, sizeof msg, "out of memory reading a message");
    } else if (got) {
        if (first_msg)
            has_session = net_frames_session(bb, session, sizeof session);
        fs = calloc(MAXF, sizeof *fs);
        payload_at = calloc(MAXF, sizeof *payload_at);
        if (!fs || !payload_at) {
            rc = AR_ENOMEM;
            snprintf(msg, sizeof msg, "out of memory reading a message");
        } else {
            rc = net_frames_receive(bb, l->max_frame, fs, payload_at, &nf);
            if (rc != AR_OK)
                snprintf(msg, sizeof msg, "bad frame: %s", ar_last_error());
        }
    }
    /* one queue entry per frame; a frame with a payload keeps the message
     * (a reference to its hold) until its payload is taken. This function
     * holds one reference while it queues them. */
    in_msg *first = NULL, *last = NULL;
    msg_hold *hold = NULL;
    if (got && rc == AR_OK) {
        hold = malloc(sizeof *hold);
        if (!hold) {
            rc = AR_ENOMEM;
            snprintf(msg, sizeof msg, "out of memory queueing a frame");
        } else {
            hold->bb = bb;
            atomic_init(&hold->refs, 1);
            bb = NULL; /* the hold's now */
        }
    }
    for (int k = 0; got && rc == AR_OK && k < nf; k++) {
        in_msg *m = malloc(sizeof *m);
        if (!m) {
            rc = AR_ENOMEM;
            snprintf(msg, sizeof msg, "out of memory queueing a frame");
            break;
        }
        m->f = fs[k];
        memset(&fs[k], 0, sizeof fs[k]);
        m->hold = NULL;
        m->payload_at = payload_at[k];
        m->next = NULL;
        if (m->f.nbytes > 0) {
            atomic_fetch_add(&hold->refs, 1);
            m->hold = hold;
        }
        if (last)
            last->next = m;
        else
            first = m;
        last = m;
    }
    if (rc != AR_OK) {
        while (first) {
            in_msg *next = first->next;
            ar_frame_free(&first->f);
            hold_release(first->hold);
            free(first);
            first = next;
        }
        last = NULL;
    }
    for (int k = 0; fs && k < nf; k++)
        ar_frame_free(&fs[k]);
    free(fs);
    free(payload_at);
    if (bb)
        grpc_byte_buffer_destroy(bb);
    bb = NULL;
    hold_release(hold);
    pthread_mutex_lock(&l->mu);
    if (first_msg) {
        l->first_seen = 1;
        l->first_has_session = has_session;
        memcpy(l->first_session, session, sizeof session);
    }
    if (got && l->is_server && l->rpc) /* the stream is alive (the server's idle limit) */
        net_rpc_note(l->rpc, NET_RPC_RECEIVED);
    if (!got) {
        l->recv_done = 1;
    } else if (rc != AR_OK) {
        fail_invalid_locked(l, msg);
    } else {
        if (first) {
            if (l->in_tail)
                l->in_tail->next = first;
            else
                l->in_head = first;
            l->in_tail = last;
        }
        if (l->closed)
            l->recv_done = 1;
        else
            start_recv_locked(l);
    }
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    link_unref(l);
}

static void on_end(net_tag *t, int ok)
{
    glink *l = ((link_tag *)t)->l;
    ar_link *other = NULL;
    pthread_mutex_lock(&l->mu);
    l->ended = 1;
    if (l->is_server) {
        if (l->cancelled || !ok) {
            l->failed = 1;
            l->recv_done = 1;
            if (l->status < 0)
                l->status = GRPC_STATUS_CANCELLED;
            if (!l->err[0])
                snprintf(l->err, sizeof l->err, "%s went away", l->base.name);
            other = l->close_also;
        }
    } else {
        l->status = (int)l->st_code;
        if (l->st_code != GRPC_STATUS_OK) {
            l->failed = 1;
            char *d = grpc_slice_to_c_string(l->st_details);
            if (!l->err[0] || l->st_code != GRPC_STATUS_INVALID_ARGUMENT) {
                if (l->st_code == GRPC_STATUS_ABORTED) /* a report relayed from further down */
                    snprintf(l->err, sizeof l->err, "%s", d);
                else if (l->st_code == GRPC_STATUS_UNAVAILABLE || l->st_code == GRPC_STATUS_CANCELLED ||
                         l->st_code == GRPC_STATUS_INTERNAL || l->st_code == GRPC_STATUS_UNKNOWN)
                    snprintf(l->err, sizeof l->err, "%s disconnected (%s)", l->base.name, d);
                else
                    snprintf(l->err, sizeof l->err, "%s: %s", l->base.name, d);
            }
            gpr_free(d);
        }
    }
    pthread_cond_broadcast(&l->cv);
    /* under mu, so the owner can detach `other` before destroying it */
    if (other)
        ar_link_close(other);
    pthread_mutex_unlock(&l->mu);
    link_unref(l);
}

static void on_other(net_tag *t, int ok)
{
    glink *l = ((link_tag *)t)->l;
    (void)ok;
    pthread_mutex_lock(&l->mu);
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    link_unref(l);
}

static int g_send(ar_link *al, ar_frame *f)
{
    glink *l = (glink *)al;
    grpc_byte_buffer *bb;
    out_msg *m = malloc(sizeof *m);
    if (!m) {
        ar_frame_free(f);
        return ar_fail(AR_ENOMEM, "out of memory queueing a frame");
    }
    /* the first frame of a client's Pipe carries the session: encoded and
     * queued under mu, so no other frame can go out before it */
    pthread_mutex_lock(&l->mu);
    int with_session = l->session[0] && !l->session_sent;
    if (!with_session)
        pthread_mutex_unlock(&l->mu);
    int rc = frame_encode(f, with_session ? l->session : NULL, &bb);
    if (with_session && rc == AR_OK)
        l->session_sent = 1;
    if (!with_session)
        pthread_mutex_lock(&l->mu);
    if (rc != AR_OK) {
        pthread_mutex_unlock(&l->mu);
        free(m);
        return rc;
    }
    m->bb = bb;
    m->next = NULL;
    if (l->failed || l->closed || l->ended || l->half_closed) {
        rc = ar_fail(AR_ECLOSED, "%s", l->err[0] ? l->err : "link closed");
        pthread_mutex_unlock(&l->mu);
        grpc_byte_buffer_destroy(bb);
        free(m);
        return rc;
    }
    if (l->out_tail)
        l->out_tail->next = m;
    else
        l->out_head = m;
    l->out_tail = m;
    if (!l->send_busy)
        start_send_locked(l);
    pthread_mutex_unlock(&l->mu);
    return AR_OK;
}

static void deadline_in(struct timespec *ts, double s)
{
    clock_gettime(CLOCK_REALTIME, ts);
    double t = (double)ts->tv_sec + ts->tv_nsec * 1e-9 + s;
    ts->tv_sec = (time_t)t;
    ts->tv_nsec = (long)((t - (double)ts->tv_sec) * 1e9);
}

/* Wait on the link's condition until pred or the deadline; mu held. */
#define WAIT_UNTIL(l, pred, timeout_s)                                                             \
    do {                                                                                           \
        struct timespec dl_;                                                                       \
        if ((timeout_s) >= 0)                                                                      \
            deadline_in(&dl_, (timeout_s));                                                        \
        while (!(pred)) {                                                                          \
            if ((timeout_s) < 0)                                                                   \
                pthread_cond_wait(&(l)->cv, &(l)->mu);                                             \
            else if (pthread_cond_timedwait(&(l)->cv, &(l)->mu, &dl_) != 0)                        \
                break;                                                                             \
        }                                                                                          \
    } while (0)

static int g_recv(ar_link *al, ar_frame *f, double timeout_s)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    WAIT_UNTIL(l, l->in_head || l->recv_done || l->closed, timeout_s);
    in_msg *m = l->in_head;
    if (m) {
        l->in_head = m->next;
        if (!l->in_head)
            l->in_tail = NULL;
        pthread_mutex_unlock(&l->mu);
        *f = m->f;
        int rc = AR_OK;
        if (m->hold) {
            rc = net_payload_copy(m->hold->bb, m->payload_at, f->nbytes, &f->data);
            hold_release(m->hold);
            if (rc != AR_OK)
                ar_frame_free(f);
        }
        free(m);
        /* a compressed payload's scales and values, checked here, on the
         * receiving thread (the event loop only parsed the header): a bad
         * one ends the stream like any bad frame */
        if (rc == AR_OK && (rc = ar_frame_check_compressed(f)) != AR_OK) {
            char msg[512];
            snprintf(msg, sizeof msg, "bad frame: %s", ar_last_error());
            ar_frame_free(f);
            pthread_mutex_lock(&l->mu);
            fail_invalid_locked(l, msg);
            pthread_mutex_unlock(&l->mu);
            rc = ar_fail(AR_EPROTO, "%s: %s", al->name, msg);
        }
        return rc;
    }
    int rc;
    if (!l->is_server && l->recv_done && !l->ended && !l->closed)
        WAIT_UNTIL(l, l->ended, 5.0); /* the status says why */
    if (l->err[0])
        rc = ar_fail(AR_ECLOSED, "%s", l->err);
    else if (l->closed)
        rc = ar_fail(AR_ECLOSED, "%s: link closed", al->name);
    else if (l->recv_done)
        rc = ar_fail(AR_ECLOSED, "%s: the stream ended", al->name);
    else
        rc = ar_fail(AR_ECLOSED, "%s: no frame within %.1f s", al->name, timeout_s);
    pthread_mutex_unlock(&l->mu);
    return rc;
}

static void g_close(ar_link *al)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    int was = l->closed || l->ended;
    l->closed = 1;
    if (!l->err[0])
        snprintf(l->err, sizeof l->err, "%s: link closed", al->name);
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    if (!was)
        grpc_call_cancel(l->call, NULL);
}

static void g_destroy(ar_link *al)
{
    glink *l = (glink *)al;
    if (l->is_server)
        return; /* belongs to its rpc (net_link_release) */
    pthread_mutex_lock(&l->mu);
    int ended = l->ended;
    pthread_mutex_unlock(&l->mu);
    if (!ended)
        grpc_call_cancel(l->call, NULL);
    link_unref(l);
}

static const ar_link_vt grpc_vt = {g_send, g_recv, g_close, g_destroy};

ar_link *net_link_new(grpc_call *call, int is_server, const char *name, size_t max_frame,
                      struct ar_rpc *rpc, grpc_byte_buffer *first, int have_first)
{
    glink *l = calloc(1, sizeof *l);
    if (!l) {
        if (first)
            grpc_byte_buffer_destroy(first);
        ar_fail(AR_ENOMEM, "out of memory for a link");
        return NULL;
    }
    l->base.vt = &grpc_vt;
    snprintf(l->base.name, sizeof l->base.name, "%s", name);
    l->call = call;
    grpc_call_ref(call);
    l->is_server = is_server;
    l->rpc = rpc;
    l->max_frame = max_frame ? max_frame : AR_NET_DEFAULT_MAX_FRAME;
    l->status = -1;
    l->refs = 1;
    l->st_details = grpc_empty_slice();
    grpc_metadata_array_init(&l->st_trailing);
    grpc_metadata_array_init(&l->init_md);
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    l->send_tag = (link_tag){{on_send}, l};
    l->recv_tag = (link_tag){{on_recv}, l};
    l->end_tag = (link_tag){{on_end}, l};
    l->meta_tag = (link_tag){{on_other}, l};
    l->half_tag = (link_tag){{on_other}, l};
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    pthread_mutex_lock(&l->mu);
    /* never wait for the peer's initial metadata before sending: ours go out
     * now, theirs are received in a batch of their own */
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    size_t n = 1;
    if (!is_server) {
        ops[1].op = GRPC_OP_RECV_INITIAL_METADATA;
        ops[1].data.recv_initial_metadata.recv_initial_metadata = &l->init_md;
        n = 2;
    }
    int bad = start_locked(l, &l->meta_tag, ops, n);
    memset(ops, 0, sizeof ops);
    if (is_server) {
        ops[0].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        ops[0].data.recv_close_on_server.cancelled = &l->cancelled;
    } else {
        ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        ops[0].data.recv_status_on_client.status = &l->st_code;
        ops[0].data.recv_status_on_client.status_details = &l->st_details;
        ops[0].data.recv_status_on_client.trailing_metadata = &l->st_trailing;
    }
    bad |= start_locked(l, &l->end_tag, ops, 1);
    if (!have_first)
        start_recv_locked(l);
    else
        l->refs++; /* as a receive batch would hold: on_recv drops it */
    pthread_mutex_unlock(&l->mu);
    if (have_first) {
        /* the server read the first message before the handler ran: take
         * it as received (NULL: the client's stream ended), which also
         * starts the next receive */
        l->recv_buf = first;
        on_recv(&l->recv_tag.base, 1);
    }
    if (bad)
        ar_log(AR_LOG_WARN, "%s: %s", name, l->err);
    return &l->base;
}

void net_link_set_session(ar_link *al, const char *session)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    snprintf(l->session, sizeof l->session, "%s", session);
    pthread_mutex_unlock(&l->mu);
}

int net_link_first_session(ar_link *al, char *buf, size_t size, double timeout_s)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    WAIT_UNTIL(l, l->first_seen || l->recv_done || l->closed || l->failed || l->ended, timeout_s);
    int rc = AR_OK;
    if (l->failed || !l->first_seen)
        rc = ar_fail(AR_ECLOSED, "%s", l->err[0] ? l->err
                                      : l->first_seen || l->recv_done ? "the stream ended before its first frame"
                                                                      : "no frame within the time allowed");
    else if (!l->first_has_session)
        rc = ar_fail(AR_EPROTO, "the first frame carries no session");
    else
        snprintf(buf, size, "%s", l->first_session);
    pthread_mutex_unlock(&l->mu);
    return rc;
}

int ar_net_link_finish(ar_link *al, double timeout_s)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    l->want_half_close = 1;
    maybe_half_close_locked(l);
    WAIT_UNTIL(l, l->ended || l->closed, timeout_s);
    int rc = AR_OK;
    if (!l->ended)
        rc = ar_fail(AR_ECLOSED, "%s: no status within %.1f s", al->name, timeout_s);
    else if (l->failed || l->status != GRPC_STATUS_OK)
        rc = ar_fail(AR_ECLOSED, "%s", l->err[0] ? l->err : "stream failed");
    pthread_mutex_unlock(&l->mu);
    return rc;
}

int ar_net_link_status(ar_link *al)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    int s = l->status;
    pthread_mutex_unlock(&l->mu);
    return s;
}

int ar_net_link_failed(ar_link *al)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    int s = l->failed;
    pthread_mutex_unlock(&l->mu);
    return s;
}

void ar_net_link_close_also(ar_link *al, ar_link *other)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    l->close_also = other;
    if (l->ended && l->failed && other)
        ar_link_close(other);
    pthread_mutex_unlock(&l->mu);
}

void net_link_drain(ar_link *al, double timeout_s)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    WAIT_UNTIL(l, (!l->send_busy && !l->out_head) || l->failed || l->ended, timeout_s);
    pthread_mutex_unlock(&l->mu);
}

void net_link_release(ar_link *al)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    l->rpc = NULL;
    l->close_also = NULL;
    pthread_mutex_unlock(&l->mu);
    link_unref(l);
}

void ar_net_link_error(ar_link *al, char *buf, size_t size)
{
    glink *l = (glink *)al;
    pthread_mutex_lock(&l->mu);
    snprintf(buf, size, "%s", l->err[0] ? l->err : "no error");
    pthread_mutex_unlock(&l->mu);
}
