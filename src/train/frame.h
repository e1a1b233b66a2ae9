/* Frames: what flows along a pipeline edge (docs/DESIGN.md, "The chain protocol"), and links, the
 * one interface with two implementations (in-process queues here, gRPC in
 * src/net) so the pipeline code never knows which it has. */
#ifndef AR_FRAME_H
#define AR_FRAME_H

#include <stddef.h>
#include <stdint.h>

enum ar_frame_kind {
    AR_FRAME_ACT = 1,     /* down: activations (or the input batch) + targets */
    AR_FRAME_GRAD = 2,    /* up: gradient w.r.t. the stage input; scalars[0] = loss of the mb */
    AR_FRAME_NORM = 3,    /* up: per-unit gradient sum of squares (F64 payload) */
    AR_FRAME_STEP = 4,    /* down: apply the optimizer; scalars = {lr, grad_scale} */
    AR_FRAME_EVAL = 5,    /* down: forward only, no activations kept */
    AR_FRAME_EVAL_RESULT = 6, /* up: scalars = {loss_sum, correct, count} */
    AR_FRAME_STOP = 7,    /* down: the run is over */
    AR_FRAME_ERROR = 8,   /* up: a stage failed; payload is the message */
    AR_FRAME_SYNC = 9,    /* down then back up: a barrier */
    AR_FRAME_ABORT = 10,  /* down: a stage gave up on this step; stop waiting for its frames */
    AR_FRAME_TIED = 11,   /* up: gradient of a tied weight's copy, for its owner's stage */
    AR_FRAME_TP = 12,     /* leader <-> tensor-parallel rank (train/tp_group.h) */
    AR_FRAME_PROBE = 13   /* both ways: measuring a link (train/probe.h); scalars[0] = the operation */
};

/* AR_DT_BF16 and AR_DT_Q8 are compressed float32 tensors (docs/DESIGN.md,
 * "Slow links"): the shape stays the tensor's, the payload is smaller. BF16:
 * the upper 16 bits of each float32, rounded to nearest even. Q8: one
 * float32 scale per block of AR_Q8_BLOCK consecutive elements (the last block
 * may be shorter), all the scales first, then one int8 per element; an
 * element is its int8 times its block's scale. */
enum ar_frame_dtype { AR_DT_F32 = 0, AR_DT_I32 = 1, AR_DT_F64 = 2, AR_DT_U8 = 3, AR_DT_BF16 = 4, AR_DT_Q8 = 5 };
#define AR_Q8_BLOCK 256

#define AR_FRAME_MAX_DIMS 4

typedef struct {
    int32_t kind;
    int64_t step;
    int32_t mb;       /* micro-batch id within the step */
    int32_t nmb;      /* micro-batches in the step */
    int32_t rows;     /* batch rows of this micro-batch */
    int32_t dtype;    /* of the payload */
    int32_t ndim;
    int64_t shape[AR_FRAME_MAX_DIMS];
    void *data;       /* payload, owned by the frame */
    size_t nbytes;
    int32_t *targets; /* riding along with ACT/EVAL frames, owned */
    size_t ntargets;
    double scalars[4];
} ar_frame;

/* Bytes of one element of dtype (Q8: its int8, without the scales); 0 when unknown. */
size_t ar_dtype_size(int dtype);
/* Payload bytes of `count` elements of dtype, Q8's scales included; 0 when
 * the dtype is unknown. */
size_t ar_payload_bytes(int dtype, size_t count);
/* Validate a frame received from a peer (docs/DESIGN.md, "The chain protocol"): known kind and dtype,
 * shape product x dtype size == byte length, sizes under max_bytes. */
int ar_frame_validate(const ar_frame *f, size_t max_bytes);
/* Set the payload to a copy of data with the given shape. */
int ar_frame_set_payload(ar_frame *f, int dtype, int ndim, const int64_t *shape, const void *data);
int ar_frame_set_targets(ar_frame *f, const int32_t *targets, size_t n);
void ar_frame_free(ar_frame *f);
const char *ar_frame_kind_name(int kind);
/* Bytes of the frame as one protobuf Frame message (proto/arceus.proto, the
 * way src/net/link.c encodes it: zero fields and trailing zero scalars left
 * out), payload included. What a link counts per frame, and what the planner
 * prices a message at. */
size_t ar_frame_wire_bytes(const ar_frame *f);

/* ---- compression on the wire ------------------------------------------ */

/* What a link does to the float32 tensors it sends (docs/DESIGN.md, "Slow
 * links"). AUTO is a setting (arceus train --compress), never a link's: the
 * planner turns it into one of the others per edge. */
enum ar_compress { AR_COMPRESS_NONE = 0, AR_COMPRESS_BF16 = 1, AR_COMPRESS_INT8 = 2, AR_COMPRESS_AUTO = 3 };
/* Tensors smaller than this go as they are: a frame's header and the
 * message around it cost more than the bytes saved. */
#define AR_COMPRESS_MIN_FLOATS 256

const char *ar_compress_name(int codec);
int ar_compress_parse(const char *name, int *codec);
/* Whether a codec may apply to f: an ACT, EVAL, GRAD or TP frame whose
 * payload is float32, of at least AR_COMPRESS_MIN_FLOATS elements. Other
 * frames (gradient norms, the optimizer step and the tied weights it
 * carries, the tied gradient) always travel exactly. */
int ar_frame_compressible(const ar_frame *f);
/* Compress f's payload in place with codec (NONE: nothing). A frame that
 * may not be compressed, or whose values are not all finite (a compressed
 * payload is finite by construction; the receiver refuses any other), is
 * left as it is. AR_ENOMEM leaves it as it is too. */
int ar_frame_compress(ar_frame *f, int codec);
/* Payload bytes of `floats` float32 values once compressed with codec. */
size_t ar_compressed_bytes(int codec, size_t floats);
/* Check a received compressed payload: every Q8 scale finite and not
 * negative, every BF16 value finite. AR_OK for any other dtype; AR_EPROTO
 * naming the frame, the block or element and the value otherwise. The
 * sizes are ar_frame_validate's to check, before this. */
int ar_frame_check_compressed(const ar_frame *f);
/* Back to float32 in place (after ar_frame_check_compressed's checks);
 * nothing for a frame that is not compressed. */
int ar_frame_decompress(ar_frame *f);

/* ---- links ------------------------------------------------------------- */

/* What a link was measured to carry (train/probe.h). */
typedef struct {
    double rtt_s;    /* round trip of a small frame */
    double down_Bps; /* frame bytes per second from the measuring end to the other */
    double up_Bps;   /* and back */
    int measured;
} ar_link_figures;

/* One link's traffic (frame bytes, as ar_frame_wire_bytes counts them):
 * down is what goes towards the last stage, up what comes back; raw the
 * same frames as float32, before compression. */
typedef struct {
    double down, down_raw, up, up_raw;
} ar_edge_bytes;

typedef struct ar_link ar_link;

typedef struct {
    /* Takes ownership of the frame's buffers (also on failure); *f is reset. */
    int (*send)(ar_link *l, ar_frame *f);
    /* Blocks up to timeout_s (< 0: forever); AR_ECLOSED when the peer is gone. */
    int (*recv)(ar_link *l, ar_frame *f, double timeout_s);
    void (*close)(ar_link *l);
    void (*destroy)(ar_link *l);
} ar_link_vt;

struct ar_link {
    const ar_link_vt *vt;
    char name[64]; /* for messages: "stage 1", "worker 127.0.0.1:5001" */
    /* ar_frame_wire_bytes of every frame sent / received through
     * ar_link_send / ar_link_recv: what a tensor-parallel leader reports as
     * its group's traffic. Only the thread using the link touches them. */
    uint64_t bytes_sent, bytes_received;
    /* The same frames' bytes as float32 (before compression, after
     * decompression): with bytes_sent/received, what compression saved. */
    uint64_t raw_sent, raw_received;
    /* What ar_link_send does to the tensors it sends (enum ar_compress, not
     * AUTO); set by the link's owner before the first frame. The receiving
     * end needs no setting: ar_link_recv decompresses what comes. */
    int compress;
};

/* Send f, compressed with the link's codec where it applies. */
int ar_link_send(ar_link *l, ar_frame *f);
/* Receive a frame, decompressed (float32) when it came compressed. */
int ar_link_recv(ar_link *l, ar_frame *f, double timeout_s);
void ar_link_close(ar_link *l);
void ar_link_destroy(ar_link *l);

/* Two connected in-process endpoints: what a sends, b receives, and back. */
int ar_link_local_pair(ar_link **a, ar_link **b, const char *name_a, const char *name_b);

#endif
