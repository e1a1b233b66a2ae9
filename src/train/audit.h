/* Audits by replay (docs/DESIGN.md, "Audits by replay"): what a stage keeps
 * of its last steps so that its work can be done again, and the replay.
 *
 * A stage with a keep (ar_stage_runner.keep) records, for each of its last
 * two steps, its state before the step (step count, parameters, moments),
 * every micro-batch it received (ACT payload and targets, GRAD payload and
 * loss) and the STEP's learning rate and gradient scale. Two steps, because
 * the digest of the state after step k arrives only in step k+1's NORM: the
 * driver draws its audit of step k then, and fetches step k's material
 * before it sends step k+3. Three steps are kept: the driver sends each
 * batch a step ahead, so stage 0 may have begun step k+2 by then. */
#ifndef AR_TRAIN_AUDIT_H
#define AR_TRAIN_AUDIT_H

#include "train/pipeline.h"
#include "train/stage.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    int rows;
    void *act;          /* the ACT payload as received */
    size_t act_bytes;
    int32_t *targets;
    size_t ntargets;
    float *grad;        /* the GRAD payload as received (NULL on the last stage) */
    size_t grad_bytes;
    double loss;        /* the loss the GRAD carried */
} ar_audit_mb;

typedef struct {
    int64_t step;       /* -1: empty */
    int M;
    int opt_step;
    long param_floats;
    float *params, *m, *v;
    ar_audit_mb *mb;
    int has_update;     /* the STEP came: lr and scale are known */
    int copying;        /* the state before the step is being copied in: not to be read */
    float lr, scale;
} ar_audit_material;

#define AR_AUDIT_KEEP_STEPS 3

typedef struct ar_audit_keep {
    pthread_mutex_t mu;
    ar_audit_material slot[AR_AUDIT_KEEP_STEPS];
    int cur;            /* the slot being recorded */
} ar_audit_keep;

int ar_audit_keep_init(ar_audit_keep *k);
void ar_audit_keep_destroy(ar_audit_keep *k);
/* Forget every kept step (a new Load: another session's steps). */
void ar_audit_keep_clear(ar_audit_keep *k);
void ar_audit_material_free(ar_audit_material *m);

/* The stage side (train/pipeline.c), all under the keep's lock: a step
 * begins (the state before it is copied), a micro-batch's input or incoming
 * gradient arrives, the STEP arrives. */
int ar_audit_keep_begin(ar_audit_keep *k, const ar_stage *s, int64_t step, int M);
/* The same, but the state is copied by ar_audit_keep_copy_state, which may
 * run on another thread while the step's forward and backward run (they do
 * not write the state); until it returns the step is not readable. */
int ar_audit_keep_begin_deferred(ar_audit_keep *k, const ar_stage *s, int64_t step, int M);
void ar_audit_keep_copy_state(ar_audit_keep *k, const ar_stage *s);
int ar_audit_keep_act(ar_audit_keep *k, int mb, int rows, const void *act, size_t nbytes, const int32_t *targets,
                      size_t ntargets);
int ar_audit_keep_grad(ar_audit_keep *k, int mb, const float *grad, size_t nbytes, double loss);
void ar_audit_keep_update(ar_audit_keep *k, int64_t step, float lr, float scale);
/* A deep copy of step `step`'s material, if it is still kept (AR_ENOTFOUND
 * otherwise). */
int ar_audit_keep_get(ar_audit_keep *k, int64_t step, ar_audit_material *out);

/* The material as bytes, for the Worker's Audit RPC (a flat little-endian
 * record: a header, the state, then each micro-batch's inputs). *buf is
 * malloc'd. */
int ar_audit_material_encode(const ar_audit_material *m, void **buf, size_t *n);
/* The material back from untrusted bytes: refused (AR_EPROTO, naming
 * `origin`) unless it is well formed, of exactly `param_floats` parameters,
 * at most `max_mb` micro-batches of at most `max_rows` rows each, and every
 * size consistent with the bytes given. The replay checks the shapes
 * against the stage. */
int ar_audit_material_decode(const void *buf, size_t n, long param_floats, int max_mb, int max_rows,
                             const char *origin, ar_audit_material *out);

/* Replay a step on `s`, a stage built like the audited one (same spec, units,
 * optimizer, max rows): load the material's state, run every micro-batch's
 * forward and backward in micro-batch order (dropout seeded from `seed` as the
 * stage was), apply the update, and write the digests the stage should have
 * committed into *out and the digest of the state after into state_after.
 * Stages that share a tied weight with another stage cannot be replayed
 * alone and are refused (AR_EINVAL). */
int ar_audit_replay(ar_stage *s, const ar_audit_material *m, uint64_t seed, ar_step_digests *out,
                    uint8_t state_after[32]);

/* Compare a replay with what was committed: the state and inputs must match
 * the committed digests exactly (they are the provider's own words), the
 * outputs and the state after too. Returns AR_OK on a match, otherwise
 * AR_EPROTO with the first mismatch named in ar_last_error(). */
int ar_audit_compare(const ar_step_digests *replayed, const uint8_t state_after[32],
                     const ar_step_digests *committed, const uint8_t committed_after[32]);

/* The whole audit of stage `stage` of S at step k, given what every stage
 * committed for step k (all[0..S)) and the audited stage's state digest of
 * step k+1 (the state after k): the material's inputs must be those its
 * neighbours committed to sending (ACT in = the previous stage's ACT out,
 * GRAD in = the next stage's GRAD out), then the replay on `verifier` must
 * reproduce every committed digest. AR_OK: passed; AR_EPROTO: failed, the
 * reason in ar_last_error(); anything else: the audit could not be done. */
int ar_audit_stage(ar_stage *verifier, const ar_audit_material *m, uint64_t seed, const ar_step_digests *all,
                   int S, int stage, const uint8_t state_after[32]);
/* The same, with the neighbour checks chosen: a compressed link (bf16,
 * int8) delivers other bytes than its sender hashed, so its two ends'
 * digests are not compared (check_up: the link from stage-1, check_down:
 * the link to stage+1). */
int ar_audit_stage_ex(ar_stage *verifier, const ar_audit_material *m, uint64_t seed, const ar_step_digests *all,
                      int S, int stage, const uint8_t state_after[32], int check_up, int check_down);

#endif
