/* Measuring a link (docs/DESIGN.md, "Slow links"): its round trip and its
 * throughput each way, with PROBE frames over the link itself, so a gRPC
 * link is measured through the same stream, HTTP/2 flow control and event
 * loops its frames will take. Works on any link (train/frame.h).
 *
 * The measuring end (ar_probe_link) sends PINGs, answered at once with
 * PONGs; then a burst of DATA frames, timed where they arrive: the other end
 * answers the burst's last frame with an ACK giving the time from the first
 * frame's arrival to the last's and the bytes after the first (the first
 * frame's own time in flight is the round trip's, not the rate's); then it
 * PULLs a burst the other way and times it itself. A burst that arrives in
 * under AR_PROBE_MIN_SPAN_S is repeated four times larger, up to
 * AR_PROBE_MAX_BYTES: a fast link costs a few milliseconds, a 20 Mbit/s one
 * about a second in all. */
#ifndef AR_PROBE_H
#define AR_PROBE_H

#include "train/frame.h"

enum ar_probe_op {
    AR_PROBE_RUN = 1,    /* down the chain: measure your link to the next stage, then report */
    AR_PROBE_PING = 2,   /* answer with PONG (scalars[1]: a sequence number, echoed) */
    AR_PROBE_PONG = 3,
    AR_PROBE_DATA = 4,   /* a burst's frame: scalars[1] its index, scalars[2] the burst's count */
    AR_PROBE_ACK = 5,    /* a burst arrived: scalars[1] seconds first to last, scalars[2] bytes after the first */
    AR_PROBE_PULL = 6,   /* send a burst back: scalars[1] frames, scalars[2] bytes each */
    AR_PROBE_REPORT = 7  /* up the chain: F64 payload, (rtt s, down B/s, up B/s) per link from here down */
};

#define AR_PROBE_PINGS 5
#define AR_PROBE_FRAME_BYTES ((size_t)256 << 10) /* a gpt-5m activation of 2 rows: what links carry */
#define AR_PROBE_MIN_SPAN_S 0.2
#define AR_PROBE_MAX_BYTES ((size_t)4 << 20)
#define AR_PROBE_MAX_FRAMES 64
#define AR_PROBE_REPORT_FIELDS 3

/* The answering end's state between the frames of a burst. */
typedef struct {
    int expect;          /* frames in the burst being received (0: none) */
    int got;
    double first_t;      /* arrival of its first frame */
    double bytes_after;  /* frame bytes of the rest */
} ar_probe_rx;

/* Measure link l (its other end runs ar_probe_answer on what arrives). Each
 * answer must come within timeout_s. Counts in l's byte counters like any
 * frame (a caller that counts traffic per step takes its marks after). */
int ar_probe_link(ar_link *l, double timeout_s, ar_link_figures *out);

/* The other end: answer PROBE frame f (PING, DATA or PULL) that arrived on
 * l. f stays the caller's. AR_EPROTO for an operation that is not the
 * answering end's, or a burst out of order. */
int ar_probe_answer(ar_link *l, const ar_frame *f, ar_probe_rx *rx);

#endif
