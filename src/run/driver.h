/* The driver: feeds data into the pipeline, keeps the learning-rate
 * schedule, clips gradients, evaluates, logs, draws the loss curve and
 * writes checkpoints. Single-device training is a pipeline of one stage. */
#ifndef AR_DRIVER_H
#define AR_DRIVER_H

#include "nn/spec.h"
#include "train/stage.h"

#include <stdint.h>

typedef struct {
    const char *model_path;  /* JSON spec */
    const char *data_path;   /* text file, or a folder of IDX files */
    const char *out_dir;     /* checkpoints, loss.svg (NULL: none) */
    const char *resume_dir;  /* continue from this checkpoint */
    const char *log_path;    /* JSON lines (NULL: none) */
    long steps;              /* total optimizer steps of the run */
    int batch;
    int micro_batches;
    int stages;              /* in-process pipeline stages ("--workers local:N") */
    const char *remote_workers; /* "HOST:PORT,HOST:PORT,...": one stage per worker process */
    const char *plan;        /* "auto" or NULL: the planner decides; "0-2,3-5,6-7": units per stage */
    const char *worker_token;/* the secret of workers started with --token (no market) */
    int schedule;            /* enum ar_schedule_kind */
    int compress;            /* enum ar_compress: what crosses the links between stages (AUTO: per link) */
    float lr, min_lr;
    long warmup;
    float weight_decay, beta1, beta2, eps;
    float clip;              /* 0: no clipping */
    int optimizer;           /* enum ar_optimizer */
    uint64_t seed;
    int threads;             /* 0: all cores */
    long eval_every;         /* 0: only at the end */
    int eval_batches;        /* language models: random val batches per evaluation */
    long ckpt_every;         /* K > 0: every K steps; 0: only at the end; -1 (default): whenever
                                about a minute of training has passed since the last one */
    float stage_timeout;     /* seconds a remote stage may stay silent mid-step before it is
                                declared lost; 0: 10 s or 4x the slowest step, whichever is more */
    int spares;              /* the last `spares` of remote_workers replace lost stages */
    long stop_after;         /* stop (with a checkpoint) after this step, as if interrupted; 0: run to the end */
    int quiet;
    int profile;             /* print milliseconds per operator and step (the stages in this process) */
    /* training on leased providers: the market, the renter's account token,
     * how many providers, and the most the job may spend (micro-credits,
     * 0: the balance). market NULL: no market. */
    const char *market;
    const char *token;
    int devices;
    int64_t max_credits;
    /* audits by replay (remote stages): the chance per stage and step that
     * the driver replays the stage's step and compares its digests (0: no
     * audits; AR_AUDIT_RATE_AUTO: by whose machines run the stages, see
     * below); who replays (AR_VERIFIER_SELF: the driver); the draws' seed
     * (0: from the OS, so providers cannot predict them) */
    float audit_rate;
    int verifier;
    uint64_t audit_seed;
    /* which of the recipe fields the user set on the command line (resume
     * keeps the stored recipe for the rest) */
    unsigned set_mask;
} ar_train_config;

enum {
    AR_SET_STEPS = 1u << 0,
    AR_SET_LR = 1u << 1,
    AR_SET_BATCH = 1u << 2,
    AR_SET_MB = 1u << 3,
    AR_SET_WARMUP = 1u << 4,
    AR_SET_MIN_LR = 1u << 5,
    AR_SET_OPT = 1u << 6,
    AR_SET_SEED = 1u << 7,
    AR_SET_CLIP = 1u << 8,
    AR_SET_WD = 1u << 9
};

enum { AR_VERIFIER_SELF = 0 };
/* --audit-rate's default depends on whose machines run the stages: on a
 * market lease they are strangers paid per step, so a share of their steps
 * is replayed; on --workers the renter names they are its own, trusted as an
 * in-process run is, so none unless it asks. AUTO (the config's default)
 * becomes one or the other when the run starts (driver_audit_setup). */
#define AR_AUDIT_RATE_AUTO (-1.0f)
#define AR_LEASE_AUDIT_RATE 0.05f

/* Defaults for a model type (for a GPT, the recipe bench/quality.py measures). */
void ar_train_config_defaults(ar_train_config *c, int model_type);

/* Learning rate at step (from 0): linear warm-up to lr, cosine to min_lr. */
float ar_lr_at(long step, float lr, float min_lr, long warmup, long total);

/* Run a whole training job; prints progress and a summary to stderr/stdout. */
int ar_train_run(ar_train_config *c);

#endif
