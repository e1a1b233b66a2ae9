/* A run's reports to the market, off the training thread.
 *
 * Every completed step is paid by a ReportUsage call, and the dashboard
 * gets a ReportProgress about once a second. Both used to be synchronous
 * calls on the training thread, so a market that hung (stopped, swapping,
 * a half-open connection) stalled training for up to the call's timeout.
 * Now the training thread only queues: the reporter's own thread, with its
 * own channel to the market, sends the queued steps in order and the
 * newest progress, and the training thread reads back what the market
 * said (the job's spent total, a refusal) without ever waiting on it.
 *
 * Paying stays exactly-once: the market records each (job, step, stage)
 * once, so a report that reached it before the reply was lost pays nothing
 * twice when it is sent again. */
#ifndef AR_RUN_REPORTER_H
#define AR_RUN_REPORTER_H

#include "net/market.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* One completed step waiting to be paid: its loss and, per stage, the
 * provider that did the work and its FLOPs (as they were when the step
 * completed: a replacement later does not change who did it). */
typedef struct {
    long step; /* 0-based */
    double loss;
    size_t n;
    ar_market_stage_usage *stages;
} ar_reported_step;

typedef struct {
    pthread_t thread;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t wake; /* the thread: work, or stop */
    pthread_cond_t idle; /* waiters: the queue drained, or a refusal */
    ar_client *client;   /* the thread's own channel to the market */
    char market[256], token[128];
    /* the steps not yet paid, oldest first (a ring) */
    ar_reported_step *queue;
    size_t head, count, cap;
    int in_flight;     /* the head is being sent right now */
    double sent_at;    /* when (ar_now()) */
    int64_t spent;     /* the job's total, as the market last said */
    int refused;       /* a refusal (budget, lease): the run's error */
    char refusal[1024];
    int outage;        /* the market is unreachable: retrying */
    long outage_paid;  /* steps paid late since the outage began */
    double retry_delay_s;
    /* the newest progress report not yet sent (packed), and what the
     * market has confirmed receiving: the plan, and validations */
    void *progress;
    size_t progress_len;
    long progress_nval, progress_plan; /* what it carries (plan: its generation, 0 none) */
    long plan_sent;    /* the generation of the plan the market has */
    long nval_sent;
    int progress_off;
    int stopping;
} ar_reporter;

/* Start the thread, with its own channel to the market at `market`;
 * `spent` is the job's total so far. */
int ar_reporter_start(ar_reporter *r, const char *market, const char *lease_token, int64_t spent,
                      double retry_delay_s);
/* Queue step `step` (0-based) for payment: the stages' usage is copied. */
int ar_reporter_push_step(ar_reporter *r, long step, double loss, const ar_market_stage_usage *stages,
                          size_t n);
/* Replace the pending progress report with a newer one (packed by
 * ar_market_progress_pack; the reporter takes buf). nval: the validations
 * the report covers; plan: the generation of the plan it carries (the run
 * counts its plans from 1; 0: no plan). A report that fails is not sent
 * again: the next one carries whatever the market has not confirmed. */
void ar_reporter_push_progress(ar_reporter *r, void *buf, size_t len, long nval, long plan);
/* What the market said so far: the job's spent total, the steps still
 * queued, whether it is unreachable, which plan it has and how many
 * validations, whether it takes progress at all; any pointer may be NULL.
 * Never waits on the market. */
void ar_reporter_state(ar_reporter *r, int64_t *spent, size_t *queued, int *outage, long *plan_sent,
                       long *nval_sent, int *progress_off);
/* A refusal by the market (AR_OK if none), as the run's error. */
int ar_reporter_refusal(ar_reporter *r);
/* Wait until every queued step is paid and the pending progress sent, a
 * refusal, or `deadline` (ar_now() clock): AR_OK when drained. */
int ar_reporter_flush(ar_reporter *r, double deadline);
/* Wait while more than max_queued steps are queued and the market answers:
 * it is unreachable, or a call has waited stall_s for its answer, and this
 * returns at once. Slows a run down to a market that is slow but alive (the
 * queue stays bounded), never to one that does not answer. */
void ar_reporter_keep_up(ar_reporter *r, size_t max_queued, double stall_s);
/* After a rollback to `kept` steps: the queued steps from `kept` on are
 * redone, and paid then to whoever redoes them. */
void ar_reporter_rollback(ar_reporter *r, long kept);
/* The job's spent total as another call told it (a reversal's). */
void ar_reporter_set_spent(ar_reporter *r, int64_t spent);
/* The steps still queued, as "3-7, 9" (1-based). */
void ar_reporter_queued_text(ar_reporter *r, char *buf, size_t size);
/* Stop the thread (a call in flight finishes first) and free everything. */
void ar_reporter_stop(ar_reporter *r);

#endif
