/* The chain protocol (see docs/DESIGN.md), both ends of it:
 *  - ar_stage_serve runs one stage: it takes frames from its upstream link
 *    (the driver or the previous stage) and talks to its downstream link;
 *  - the ar_chain_* functions are the driver's side, talking to stage 0. */
#ifndef AR_PIPELINE_H
#define AR_PIPELINE_H

#include "train/frame.h"
#include "train/stage.h"

#include <stdatomic.h>
#include <stdint.h>

/* A stage's flags in its NORM record. */
enum {
    /* its device is leaving (its owner wants it back, or it is stopping):
     * the driver should move the stage elsewhere after this step */
    AR_STAGE_LEAVING = 1,
};

typedef struct {
    ar_stage *stage;
    ar_link *up;         /* towards the driver */
    ar_link *down;       /* towards the next stage; NULL on the last */
    int schedule;        /* enum ar_schedule_kind */
    int index, count;    /* this stage's position in the pipeline */
    int threads;         /* OpenMP/BLAS threads for this stage (0 = keep) */
    size_t max_frame_bytes;
    uint64_t seed;       /* run seed, for dropout */
    double timeout_s;    /* how long to wait for a neighbour mid-step (< 0: forever) */
    struct ar_audit_keep *keep; /* NULL, or where the stage records its last steps for
                                 * audits by replay (train/audit.h); needs digests */
    int digests;                /* commit digests of every step in the NORM record (below):
                                 * off unless asked for (a market lease, audits), for they cost
                                 * a SHA-256 of 3x the parameters per step */
    /* when set and nonzero, each step's NORM record says the stage's device
     * is leaving (AR_STAGE_LEAVING); NULL: never */
    const atomic_int *leaving;
    int extra_warmup;    /* 1F1B forwards beyond the default, to cover the round trip of the link
                          * to the next stage (the plan's; slots for them in the stage) */
} ar_stage_runner;

/* Serve until a STOP frame or the upstream link closes. Returns AR_OK after
 * STOP, or the error that ended it. */
int ar_stage_serve(ar_stage_runner *r);

/* What a stage commits to after every step, in its NORM record (docs/DESIGN.md,
 * "Audits by replay"): SHA-256 of its state before the step (ar_stage_state_digest)
 * and, over the step's micro-batches, of what it received and produced. Each
 * of the last four is SHA-256 of the micro-batches' own digests in micro-batch
 * order (ar_digest_act, ar_digest_grad): one hash per tensor per micro-batch. */
enum {
    AR_DIGEST_STATE,    /* parameters, moments, step count before the step */
    AR_DIGEST_ACT_IN,   /* ACT payloads with their targets, as received */
    AR_DIGEST_ACT_OUT,  /* outputs (the last stage: logits) with the targets */
    AR_DIGEST_GRAD_IN,  /* GRAD payloads with their losses, as received (none on the last stage) */
    AR_DIGEST_GRAD_OUT, /* GRAD payloads with their losses, as sent up */
    AR_DIGEST_KINDS
};
typedef struct {
    uint8_t d[AR_DIGEST_KINDS][32];
} ar_step_digests;

/* A micro-batch's activation digest: payload bytes then the targets. */
int ar_digest_act(const void *payload, size_t nbytes, const int32_t *targets, size_t ntargets,
                  uint8_t out[32]);
/* A micro-batch's gradient digest: payload bytes (may be none) then the loss. */
int ar_digest_grad(const void *payload, size_t nbytes, double loss, uint8_t out[32]);

/* Fields of each stage's record in a NORM frame before its units' gradient
 * sums of squares: first unit, units, busy s, idle s, tensor-parallel bytes,
 * flags (AR_STAGE_LEAVING), then its link to the next stage's traffic since
 * its last record (sent, sent as float32, received, received as float32),
 * then the digest words (0 or AR_NORM_DIGEST_WORDS) that follow the gradient
 * sums of squares as raw bytes (ar_step_digests). */
#define AR_NORM_HEADER 11
#define AR_NORM_DIGEST_WORDS (AR_DIGEST_KINDS * 32 / (int)sizeof(double))

/* What the driver learns from one training step. */
typedef struct {
    double loss;             /* mean over the step's micro-batches */
    int nunits;
    double unit_sumsq[512];  /* gradient sum of squares per unit, in unit order */
    int nstages;
    double busy_s[64], idle_s[64]; /* per stage, this step */
    double tp_bytes[64];     /* per stage: a group leader's traffic with its other members this
                              * step (frame bytes, both directions; 0 for a plain stage) */
    int has_digests[64];     /* the stage committed digests (its runner's .digests) */
    ar_step_digests digests[64];
    int leaving[64];         /* per stage: its device said it is leaving (AR_STAGE_LEAVING) */
    /* edges[e]: the link into stage e, as stage e-1 counted it since its
     * last step (edges[0], the driver's own, is the driver's to fill) */
    ar_edge_bytes edges[64];
} ar_step_result;

/* One training step: inputs is (B, ...) rows split into M micro-batches of
 * B/M rows; row_elems elements per row (T tokens, or 784 pixels), targets
 * row_targets per row. dtype AR_DT_I32 (tokens) or AR_DT_F32 (features). */
typedef struct {
    int64_t step;
    int M, B;
    int dtype;
    const void *inputs;
    size_t row_elems;
    const int32_t *targets;
    size_t row_targets;
} ar_batch_desc;

int ar_chain_train_step(ar_link *l, const ar_batch_desc *batch, double timeout_s,
                        ar_step_result *out);
/* The same in two halves, so that a driver can send the next step's batch
 * before this step's results are back (docs/DESIGN.md, "Slow links"). With
 * apply, stage 0 takes the optimizer step itself once it has every stage's
 * gradient norms: lr, and the gradient clipped to clip (0: not clipped) the
 * driver's way (scale clip / (norm + 1e-6) when the norm is over it), with
 * the same sums in the same order, so bitwise what ar_chain_apply with the
 * driver's scale does; the driver sends no STEP then. Without apply the
 * driver must ar_chain_apply. */
int ar_chain_send_step(ar_link *l, const ar_batch_desc *batch, int apply, float lr, float clip);
int ar_chain_recv_step(ar_link *l, const ar_batch_desc *batch, double timeout_s, ar_step_result *out);
/* Apply the optimizer everywhere: learning rate and gradient scale. */
int ar_chain_apply(ar_link *l, int64_t step, float lr, float grad_scale);
/* Forward-only evaluation of one chunk of B rows: returns the summed loss,
 * the number of correct predictions and the number of predictions. */
int ar_chain_eval(ar_link *l, const ar_batch_desc *batch, double timeout_s, double *loss_sum,
                  double *correct, double *count);
/* Measure every link of the chain (train/probe.h): the driver's to stage 0
 * here, then each stage its link to the next, in turn. edges[e] is the link
 * into stage e; *n gets how many (the stages). Each answer must come within
 * timeout_s. */
int ar_chain_probe(ar_link *l, double timeout_s, ar_link_figures *edges, int max, int *n);
/* Wait until every stage has processed everything sent before. */
int ar_chain_sync(ar_link *l, double timeout_s);
int ar_chain_stop(ar_link *l);

#endif
