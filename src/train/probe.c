/* Measuring a link with PROBE frames (probe.h). */
#include "train/probe.h"

#include "core/core.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int send_op(ar_link *l, int op, double a, double b, size_t payload)
{
    ar_frame f = {.kind = AR_FRAME_PROBE};
    f.scalars[0] = op;
    f.scalars[1] = a;
    f.scalars[2] = b;
    if (payload > 0) {
        /* the bytes themselves do not matter; calloc'd pages cost nothing to fill */
        f.data = calloc(1, payload);
        if (!f.data)
            return ar_fail(AR_ENOMEM, "out of memory for a %zu byte probe", payload);
        f.nbytes = payload;
        f.dtype = AR_DT_U8;
        f.ndim = 1;
        f.shape[0] = (int64_t)payload;
    }
    return ar_link_send(l, &f);
}

/* The next frame, which must be a PROBE frame of operation op. */
static int recv_op(ar_link *l, int op, double timeout_s, ar_frame *f)
{
    int rc = ar_link_recv(l, f, timeout_s);
    if (rc != AR_OK)
        return ar_fail(rc, "measuring the link to %s: %s", l->name, ar_last_error());
    if (f->kind == AR_FRAME_PROBE && (int)f->scalars[0] == op)
        return AR_OK;
    if (f->kind == AR_FRAME_ERROR) {
        rc = ar_fail(AR_EPROTO, "measuring the link to %s: %.*s", l->name, (int)f->nbytes,
                     f->data ? (const char *)f->data : "");
    } else {
        rc = ar_fail(AR_EPROTO, "measuring the link to %s: expected PROBE operation %d, got %s (operation %g)",
                     l->name, op, ar_frame_kind_name(f->kind), f->scalars[0]);
    }
    ar_frame_free(f);
    return rc;
}

/* Bytes per second of a burst: bytes after the first frame over the time
 * from its arrival to the last's. A burst that arrives at once (a fast link,
 * or frames the sender coalesced into one message) is measured as at least
 * 1 GB/s rather than as infinite. */
static double rate(double bytes, double span)
{
    return bytes / (span > bytes * 1e-9 ? span : bytes * 1e-9);
}

int ar_probe_link(ar_link *l, double timeout_s, ar_link_figures *out)
{
    memset(out, 0, sizeof *out);
    int rc;
    ar_frame f;
    /* the fastest of a few round trips: queueing only ever adds */
    double rtt = INFINITY;
    for (int i = 0; i < AR_PROBE_PINGS; i++) {
        double t0 = ar_now();
        if ((rc = send_op(l, AR_PROBE_PING, i, 0, 0)) != AR_OK || (rc = recv_op(l, AR_PROBE_PONG, timeout_s, &f)) != AR_OK)
            return rc;
        double t = ar_now() - t0;
        int seq = (int)f.scalars[1];
        ar_frame_free(&f);
        if (seq != i)
            return ar_fail(AR_EPROTO, "measuring the link to %s: PONG %d for PING %d", l->name, seq, i);
        rtt = t < rtt ? t : rtt;
    }
    out->rtt_s = rtt;
    /* down: bursts timed by the other end */
    for (int frames = 4;; frames *= 4) {
        for (int i = 0; i < frames; i++)
            if ((rc = send_op(l, AR_PROBE_DATA, i, frames, AR_PROBE_FRAME_BYTES)) != AR_OK)
                return rc;
        if ((rc = recv_op(l, AR_PROBE_ACK, timeout_s, &f)) != AR_OK)
            return rc;
        double span = f.scalars[1], bytes = f.scalars[2];
        ar_frame_free(&f);
        if (!(span >= 0 && span < 3600 && bytes > 0 && bytes < 1e12))
            return ar_fail(AR_EPROTO, "measuring the link to %s: an ACK of %g bytes in %g s", l->name, bytes, span);
        out->down_Bps = rate(bytes, span);
        if (span >= AR_PROBE_MIN_SPAN_S || (size_t)frames * 4 * AR_PROBE_FRAME_BYTES > AR_PROBE_MAX_BYTES)
            break;
    }
    /* up: bursts the other end sends, timed here */
    for (int frames = 4;; frames *= 4) {
        if ((rc = send_op(l, AR_PROBE_PULL, frames, (double)AR_PROBE_FRAME_BYTES, 0)) != AR_OK)
            return rc;
        double first = 0, bytes = 0, last = 0;
        for (int i = 0; i < frames; i++) {
            if ((rc = recv_op(l, AR_PROBE_DATA, timeout_s, &f)) != AR_OK)
                return rc;
            last = ar_now();
            int index = (int)f.scalars[1];
            double size = (double)ar_frame_wire_bytes(&f);
            ar_frame_free(&f);
            if (index != i)
                return ar_fail(AR_EPROTO, "measuring the link to %s: DATA %d where %d was due", l->name, index, i);
            if (i == 0)
                first = last;
            else
                bytes += size;
        }
        out->up_Bps = rate(bytes, last - first);
        if (last - first >= AR_PROBE_MIN_SPAN_S || (size_t)frames * 4 * AR_PROBE_FRAME_BYTES > AR_PROBE_MAX_BYTES)
            break;
    }
    out->measured = 1;
    return AR_OK;
}

int ar_probe_answer(ar_link *l, const ar_frame *f, ar_probe_rx *rx)
{
    int op = (int)f->scalars[0];
    switch (op) {
    case AR_PROBE_PING:
        return send_op(l, AR_PROBE_PONG, f->scalars[1], 0, 0);
    case AR_PROBE_DATA: {
        double now = ar_now();
        int index = (int)f->scalars[1], count = (int)f->scalars[2];
        if (count < 2 || count > AR_PROBE_MAX_FRAMES || index != (index == 0 ? 0 : rx->got) || index >= count ||
            (index > 0 && count != rx->expect)) {
            rx->expect = 0;
            return ar_fail(AR_EPROTO, "probe DATA %d of %d out of order", index, count);
        }
        if (index == 0) {
            rx->expect = count;
            rx->got = 0;
            rx->first_t = now;
            rx->bytes_after = 0;
        } else {
            rx->bytes_after += (double)ar_frame_wire_bytes(f);
        }
        if (++rx->got < rx->expect)
            return AR_OK;
        rx->expect = 0;
        return send_op(l, AR_PROBE_ACK, now - rx->first_t, rx->bytes_after, 0);
    }
    case AR_PROBE_PULL: {
        double frames = f->scalars[1], bytes = f->scalars[2];
        /* what a prober may ask for: the sizes it uses itself */
        if (!(frames >= 2 && frames <= AR_PROBE_MAX_FRAMES && bytes >= 1 && bytes <= (double)AR_PROBE_FRAME_BYTES))
            return ar_fail(AR_EPROTO, "probe PULL of %g frames of %g bytes (at most %d of %zu)", frames, bytes,
                           AR_PROBE_MAX_FRAMES, AR_PROBE_FRAME_BYTES);
        for (int i = 0; i < (int)frames; i++) {
            int rc = send_op(l, AR_PROBE_DATA, i, frames, (size_t)bytes);
            if (rc != AR_OK)
                return rc;
        }
        return AR_OK;
    }
    default:
        return ar_fail(AR_EPROTO, "probe operation %d is not for the answering end", op);
    }
}
