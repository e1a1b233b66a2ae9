/* What the files of the training driver share: the state of a run and the
 * functions one file calls in another. driver.c runs the training;
 * driver_data.c is the training data, batch by batch; driver_market.c is a
 * run's lease at the market (paying steps, progress reports, replacing a
 * lost provider, releasing). Not an interface outside src/train. */
#ifndef AR_DRIVER_INTERNAL_H
#define AR_DRIVER_INTERNAL_H

#include "run/driver.h"

#include "core/core.h"
#include "data/data.h"
#include "net/market.h"
#include "net/net.h"
#include "run/remote_stage.h"
#include "run/reporter.h"
#include "nn/spec.h"
#include "train/local.h"
#include "train/pipeline.h"
#include "train/plan.h"

#include <stdint.h>
#include <stdio.h>

/* ---- the training data (driver_data.c) ---------------------------------- */

typedef struct {
    int is_text;
    ar_text_set text;
    ar_image_set train, test;
    ar_rng rng;       /* text: window positions */
    long pos;         /* images: samples consumed so far */
    uint64_t seed;
    int32_t *perm;    /* images: order of the current epoch */
    long perm_epoch;
} data_source;

void data_source_rewind(data_source *d);
int data_source_open(data_source *d, const ar_model_spec *spec, const char *path, uint64_t seed);
void data_source_close(data_source *d);
int data_source_next(data_source *d, int B, int T, void *inputs, int32_t *targets);

/* ---- a run --------------------------------------------------------------- */

/* Audits by replay (driver_audit.c): the draws, the last step's digests
 * (stage k's step is audited when step k+1 brings its state after), the
 * verifier's stages, and the counts. */
typedef struct {
    ar_rng rng;
    int have_prev;
    long prev_step;
    ar_step_digests prev[64];
    ar_stage ver[64];
    int ver_made[64], ver_first[64], ver_last[64];
    long passed, failed, skipped;
    long last_passed[64]; /* each stage's last step that passed an audit (-1: none) */
    long failed_step;
    double cpu_s; /* the verifier's CPU seconds */
    int64_t returned; /* micro-credits the market gave back for confirmed failures */
    /* the batches the driver sent: what stage 0 must say it received */
    struct {
        long step; /* -1: none */
        uint8_t d[32];
    } sent[4];
    char why[600];
} driver_audit;

/* What a device offers the planner when the market knows better than its
 * Hello (a leased provider's record). */
typedef struct {
    double gflops, mem_bytes;
    int known;
} device_offer;

typedef struct {
    ar_train_config *c;
    ar_model_spec spec;
    data_source data;
    int S;
    ar_local_pipeline pipe;
    ar_stage *stages;      /* pipe.stages */
    ar_stage **stage_ptrs; /* pipe.stage_ptrs */
    ar_link *head;         /* the driver's end towards stage 0 */
    int threads_per_stage;
    int M, B, T, rows_per_mb;
    size_t row_elems;
    void *inputs;
    int32_t *targets;
    FILE *log;
    double *curve_x, *curve_y, *val_x, *val_y;
    long ncurve, nval;
    double busy[64], idle[64];
    double tp_bytes[64]; /* a group's measured traffic, summed over tp_steps steps */
    long tp_steps;
    double step_wall; /* driver-side wall time of the training steps (bubble = 1 - busy/wall) */
    /* remote workers (--workers HOST:PORT,...): the stages live in worker
     * processes; local "shadow" stages of the same ranges hold their state
     * for checkpoints (filled by Save) and resuming (pushed by Restore) */
    int remote;
    ar_plan plan;
    ar_device devs[64];
    ar_client *clients[64];
    char addrs[64][128];
    ar_stage shadows[64];
    ar_remote_stage *groups; /* [S]: each stage's workers (a tensor-parallel group or one) */
    ar_client *member_clients[64]; /* group members after their leaders: closed at the end */
    int nmember_clients;
    int tp_local;          /* in-process tensor-parallel groups: checkpoints go through the shadows */
    ar_stage *shadow_ptrs[64];
    int nshadows;
    ar_link *remote_head;
    /* a market lease (--market): the providers behind addrs, their prices,
     * each stage's FLOPs per step, and what has been paid */
    ar_client *market;
    ar_market_lease lease;
    int leased;
    int64_t provider_ids[64], prices[64], stage_flops[64];
    /* each stage's ticket from the market: its own Load's, given to no one
     * else (the lease token stays here: it pays) */
    char tickets[64][AR_TOKEN_LEN];
    /* a member the market reaches only through its relay (net/relay.h):
     * the relay and the member's pass there; relays[i] "" when dialled
     * directly (docs/DESIGN.md, "The relay") */
    char relays[64][AR_ADDR_MAX];
    char passes[64][160];
    uint64_t edges_printed; /* a hash of the edges last printed (printed again only when they change) */
    int64_t step_cost;
    long steps_done;
    int budget_stop; /* ended by --max-credits: the job is cancelled, not failed */
    /* completed steps are paid, and the dashboard's progress sent, by the
     * reporter's thread: a market that hangs never holds up a step */
    ar_reporter reporter;
    /* recovery (remote stages): what each device offers the planner (the
     * market's record for a leased provider), the spare workers not planned
     * (--spares), where the run restarts from when a stage is lost (the last
     * checkpoint, or the start), and how long a stage may stay silent */
    ar_optim_config oc;
    device_offer offers[64];
    char spare_addrs[64][128];
    int nspares;
    const char *restore_dir; /* NULL: the start of the run */
    long restore_step;
    double last_ckpt_t;
    double timeout;          /* the stage timeout in force (s) */
    double slowest_step;     /* the slowest training step so far (s) */
    int failures;            /* losses since the last checkpoint */
    int recovered;           /* recover() went back to a checkpoint: the training loop starts there */
    int leave_seen;          /* the last step's results had a stage leaving: no batch goes ahead */
    /* the dashboard's view of the run (ReportProgress): queued about every
     * PROGRESS_EVERY_S; the plan goes with every report until the market
     * has it (plan: the generation of the plan in force, counted from 1) */
    double progress_at;
    long plan_gen, nval_queued;
    /* a graceful leave no device could take over: the run ends, its state kept */
    int stranded;
    int group_leave_warned;
    /* slow links (docs/DESIGN.md, "Slow links"): what setup measured, link
     * by link (the pair of workers, or the driver's to one), which the
     * planner prices; the traffic of each link, per step and in all */
    struct {
        char from[128], to[128]; /* from "" : the driver's */
        ar_link_figures f;
    } links[128];
    int nlinks;
    uint64_t head_mark[4]; /* the driver's link's counters at the last step's end */
    ar_edge_bytes edge_sum[64];
    long edge_steps;
    double traffic_sent_at; /* when the plan last went to the market with the traffic */
    driver_audit audit;
    int cheat;       /* a stage that failed an audit: recover() replaces it (-1: none) */
} run;

#define MARKET_RETRY_S 2.0
#define MARKET_RELEASE_WAIT_S 60.0
/* how long a HandOver refused (the leaver's word not yet at the market) is
 * asked again */
#define HAND_OVER_REFUSED_S 10.0
/* --checkpoint-every by default: about this much training redone at most */
#define AUTO_CHECKPOINT_S 60.0
/* --stage-timeout by default: at least this, or 4x the slowest step */
#define DEFAULT_STAGE_TIMEOUT_S 10.0
/* how long a run waits for a relay that stopped answering to come back
 * before it gives its relayed stages up as lost */
#define RELAY_WAIT_S 60.0
/* ... and how long its providers may take to reattach once it is back:
 * they retry with a backoff of at most 8 s (net/relay_attach.c) */
#define RELAY_REATTACH_S 12.0
/* losses in a row without a checkpoint in between before the run gives up */
#define MAX_FAILURES 5
#define PROGRESS_EVERY_S 1.0
/* Completed steps waiting for payment: past this many, a run waits for a
 * market that answers but slowly, so that the queue (and what a driver that
 * dies leaves unpaid) stays bounded; a market that has left a call
 * unanswered for REPORT_STALL_S holds nothing up. */
#define REPORT_QUEUE_HIGH 256
#define REPORT_STALL_S 1.0

/* ---- audits by replay (driver_audit.c) ---------------------------------- */

int driver_audit_setup(run *r);
void driver_audit_reset(run *r);
void driver_audit_free(run *r);
/* After step `step`'s results: audit the stages drawn for step-1. *failed:
 * the stage whose audit failed (-1: none), the reason in r->audit.why. */
int driver_audit_step(run *r, long step, const ar_step_result *res, int *failed);
/* The batch of `step` is going to stage 0 (inputs, targets): its digest, as
 * stage 0 commits to it. */
int driver_audit_batch(run *r, long step, const ar_batch_desc *b);

/* ---- a run's lease at the market (driver_market.c) ----------------------- */

int driver_price_stages(run *r);
int driver_lease_plan(run *r, ar_plan *out);
int driver_acquire_lease(run *r, long start_step, int64_t resume_job);
int driver_queue_usage(run *r, long step, const ar_step_result *res);
void driver_report_progress(run *r, long step, double rate, double elapsed, long start);
void driver_release_lease(run *r, int rc);
int driver_replace_from_market(run *r, int64_t lost_id, long kept, const char *why, int *found);
int driver_hand_over(run *r, int i, long done, char *addr, size_t addr_size, int *found);
/* Whether stage i (> 0) is relayed and the stage before it is not: the
 * stage before is dialled directly, so stage i dials it back rather than
 * go through the relay (docs/DESIGN.md, "The relay"). */
int driver_edge_reversed(const run *r, int i);
/* A channel to device i: through its relay when it has one. */
int driver_open_worker(run *r, int i, ar_client **out);
/* Print how each stage is reached: "direct" or "relayed via HOST:PORT". */
void driver_print_edges(run *r);
/* Stages lost (lost[0..n)) that are reached through a relay which does not
 * answer at all: wait up to wait_s for it to come back (providers reattach
 * within seconds of it) rather than give up on them. 1 when it is back
 * (or none of them is relayed), 0 when still away. */
int driver_wait_relays(run *r, const int *lost, int n, double wait_s);

#endif
