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
    AR_FRAME_TP = 12      /* leader <-> tensor-parallel rank (train/tp_group.h) */
};

enum ar_frame_dtype { AR_DT_F32 = 0, AR_DT_I32 = 1, AR_DT_F64 = 2, AR_DT_U8 = 3 };

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

size_t ar_dtype_size(int dtype);
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

/* ---- links ------------------------------------------------------------- */

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
};

int ar_link_send(ar_link *l, ar_frame *f);
int ar_link_recv(ar_link *l, ar_frame *f, double timeout_s);
void ar_link_close(ar_link *l);
void ar_link_destroy(ar_link *l);

/* Two connected in-process endpoints: what a sends, b receives, and back. */
int ar_link_local_pair(ar_link **a, ar_link **b, const char *name_a, const char *name_b);

#endif
