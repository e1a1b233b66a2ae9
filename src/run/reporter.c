/* A run's reports to the market on a thread of their own (reporter.h). */
#include "run/reporter.h"

#include "core/core.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static struct timespec abs_time(double t)
{
    /* ar_now() is CLOCK_MONOTONIC, and so is the condition variables' clock */
    struct timespec ts = {.tv_sec = (time_t)t, .tv_nsec = (long)((t - floor(t)) * 1e9)};
    if (ts.tv_nsec >= 1000000000L)
        ts.tv_nsec = 999999999L;
    return ts;
}

static void wait_until(ar_reporter *r, pthread_cond_t *cv, double deadline)
{
    struct timespec ts = abs_time(deadline);
    pthread_cond_timedwait(cv, &r->mu, &ts);
}

static void drop_head(ar_reporter *r)
{
    free(r->queue[r->head].stages);
    r->queue[r->head].stages = NULL;
    r->head = (r->head + 1) % r->cap;
    r->count--;
}

/* Send the oldest queued step (r->mu not held). */
static int send_step(ar_reporter *r, const ar_reported_step *s, int64_t *spent, int *status)
{
    return ar_market_report_loss(r->client, r->token, s->step, s->loss, s->stages, s->n, NULL, spent, NULL,
                                 status);
}

static void *reporter_main(void *arg)
{
    ar_reporter *r = arg;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        int have_progress = r->progress && !r->progress_off && !r->outage;
        while (!r->stopping && !r->refused && r->count == 0 && !have_progress) {
            pthread_cond_broadcast(&r->idle);
            pthread_cond_wait(&r->wake, &r->mu);
            have_progress = r->progress && !r->progress_off && !r->outage;
        }
        if (r->stopping || r->refused)
            break;
        if (r->count > 0) {
            /* the head stays in the queue until paid: a flush or a
             * rollback sees it; in_flight keeps a rollback off it */
            ar_reported_step s = r->queue[r->head];
            r->in_flight = 1;
            r->sent_at = ar_now();
            pthread_mutex_unlock(&r->mu);
            int64_t spent = 0;
            int status = 0;
            int rc = send_step(r, &s, &spent, &status);
            char why[1024];
            snprintf(why, sizeof why, "%s", ar_last_error());
            pthread_mutex_lock(&r->mu);
            r->in_flight = 0;
            if (rc == AR_ECLOSED) {
                if (!r->outage) {
                    ar_log(AR_LOG_WARN, "market %s: paying for step %ld: %s; training goes on, step %ld onwards "
                           "is paid when the market is back", r->market, s.step + 1, why, s.step + 1);
                    r->outage = 1;
                    r->outage_paid = 0;
                }
                wait_until(r, &r->wake, ar_now() + r->retry_delay_s);
                continue;
            }
            if (rc != AR_OK) {
                snprintf(r->refusal, sizeof r->refusal, "market %.200s: paying for step %ld: %.700s", r->market,
                         s.step + 1, why);
                r->refused = rc;
                break;
            }
            r->spent = spent;
            if (r->outage)
                r->outage_paid++;
            drop_head(r);
            pthread_cond_broadcast(&r->idle); /* one fewer: for ar_reporter_keep_up */
            if (r->outage && r->count == 0) {
                ar_log(AR_LOG_WARN, "market %s is back: %ld unpaid step%s paid", r->market, r->outage_paid,
                       r->outage_paid == 1 ? "" : "s");
                r->outage = 0;
            }
            continue;
        }
        /* the queue is empty and a progress report waits */
        void *buf = r->progress;
        size_t len = r->progress_len;
        long nval = r->progress_nval, plan = r->progress_plan;
        r->progress = NULL;
        pthread_mutex_unlock(&r->mu);
        int status = 0;
        int rc = ar_market_report_progress_packed(r->client, buf, len, &status);
        char why[1024];
        snprintf(why, sizeof why, "%s", ar_last_error());
        free(buf);
        pthread_mutex_lock(&r->mu);
        if (rc == AR_OK) {
            if (plan > 0)
                r->plan_sent = plan;
            if (nval > r->nval_sent)
                r->nval_sent = nval;
        } else if (status == AR_STATUS_UNIMPLEMENTED || status == AR_STATUS_INVALID_ARGUMENT) {
            /* an older market, or one that finds our report malformed: the
             * dashboard goes without, the run goes on */
            ar_log(AR_LOG_WARN, "market %s: no progress for its dashboard: %s", r->market, why);
            r->progress_off = 1;
        }
        /* other failures: the next report (about a second later) carries
         * everything this one did, since plan_sent and nval_sent are unchanged */
    }
    pthread_cond_broadcast(&r->idle);
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

int ar_reporter_start(ar_reporter *r, const char *market, const char *lease_token, int64_t spent,
                      double retry_delay_s)
{
    memset(r, 0, sizeof *r);
    if (strlen(market) >= sizeof r->market || strlen(lease_token) >= sizeof r->token)
        return ar_fail(AR_EINVAL, "market address or lease token too long");
    snprintf(r->market, sizeof r->market, "%s", market);
    snprintf(r->token, sizeof r->token, "%s", lease_token);
    r->spent = spent;
    r->retry_delay_s = retry_delay_s;
    int rc = ar_client_open(market, &r->client);
    if (rc != AR_OK)
        return ar_fail(rc, "market %s: %s", market, ar_last_error());
    pthread_condattr_t ca;
    int err = pthread_mutex_init(&r->mu, NULL);
    if (err == 0 && (err = pthread_condattr_init(&ca)) == 0) {
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        if ((err = pthread_cond_init(&r->wake, &ca)) == 0 && (err = pthread_cond_init(&r->idle, &ca)) != 0)
            pthread_cond_destroy(&r->wake);
        pthread_condattr_destroy(&ca);
        if (err != 0)
            pthread_mutex_destroy(&r->mu);
    }
    if (err == 0 && (err = pthread_create(&r->thread, NULL, reporter_main, r)) != 0) {
        pthread_cond_destroy(&r->wake);
        pthread_cond_destroy(&r->idle);
        pthread_mutex_destroy(&r->mu);
    }
    if (err != 0) {
        ar_client_close(r->client);
        r->client = NULL;
        return ar_fail(AR_ENOMEM, "starting the market reporter thread: %s", strerror(err));
    }
    r->started = 1;
    return AR_OK;
}

int ar_reporter_push_step(ar_reporter *r, long step, double loss, const ar_market_stage_usage *stages, size_t n)
{
    ar_market_stage_usage *copy = malloc((n ? n : 1) * sizeof *copy);
    if (!copy)
        return ar_fail(AR_ENOMEM, "out of memory for the unpaid steps");
    memcpy(copy, stages, n * sizeof *copy);
    pthread_mutex_lock(&r->mu);
    if (r->count == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 64;
        ar_reported_step *q = malloc(cap * sizeof *q);
        if (!q) {
            pthread_mutex_unlock(&r->mu);
            free(copy);
            return ar_fail(AR_ENOMEM, "out of memory for the unpaid steps");
        }
        for (size_t i = 0; i < r->count; i++)
            q[i] = r->queue[(r->head + i) % r->cap];
        free(r->queue);
        r->queue = q;
        r->head = 0;
        r->cap = cap;
    }
    r->queue[(r->head + r->count) % r->cap] = (ar_reported_step){.step = step, .loss = loss, .n = n, .stages = copy};
    r->count++;
    pthread_cond_signal(&r->wake);
    pthread_mutex_unlock(&r->mu);
    return AR_OK;
}

void ar_reporter_push_progress(ar_reporter *r, void *buf, size_t len, long nval, long plan)
{
    pthread_mutex_lock(&r->mu);
    free(r->progress);
    r->progress = buf;
    r->progress_len = len;
    r->progress_nval = nval;
    r->progress_plan = plan;
    pthread_cond_signal(&r->wake);
    pthread_mutex_unlock(&r->mu);
}

void ar_reporter_state(ar_reporter *r, int64_t *spent, size_t *queued, int *outage, long *plan_sent,
                       long *nval_sent, int *progress_off)
{
    pthread_mutex_lock(&r->mu);
    if (spent)
        *spent = r->spent;
    if (queued)
        *queued = r->count;
    if (outage)
        *outage = r->outage;
    if (plan_sent)
        *plan_sent = r->plan_sent;
    if (nval_sent)
        *nval_sent = r->nval_sent;
    if (progress_off)
        *progress_off = r->progress_off;
    pthread_mutex_unlock(&r->mu);
}

int ar_reporter_refusal(ar_reporter *r)
{
    pthread_mutex_lock(&r->mu);
    int rc = r->refused;
    if (rc != AR_OK)
        ar_fail(rc, "%s", r->refusal);
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int ar_reporter_flush(ar_reporter *r, double deadline)
{
    pthread_mutex_lock(&r->mu);
    for (;;) {
        int pending = r->count > 0 || (r->progress && !r->progress_off && !r->outage) || r->in_flight;
        if (r->refused || !pending || ar_now() >= deadline)
            break;
        /* wake now and then: the thread signals `idle` only when it runs dry */
        double t = ar_now() + 0.05;
        wait_until(r, &r->idle, t < deadline ? t : deadline);
    }
    int rc = r->refused ? r->refused : r->count > 0 ? AR_ECLOSED : AR_OK;
    if (r->refused)
        ar_fail(rc, "%s", r->refusal);
    else if (rc != AR_OK)
        ar_fail(rc, "market %s: %zu step%s still unpaid", r->market, r->count, r->count == 1 ? "" : "s");
    pthread_mutex_unlock(&r->mu);
    return rc;
}

void ar_reporter_keep_up(ar_reporter *r, size_t max_queued, double stall_s)
{
    pthread_mutex_lock(&r->mu);
    while (r->count > max_queued && !r->refused && !r->outage && !r->stopping &&
           !(r->in_flight && ar_now() - r->sent_at >= stall_s))
        wait_until(r, &r->idle, ar_now() + 0.02);
    pthread_mutex_unlock(&r->mu);
}

void ar_reporter_rollback(ar_reporter *r, long kept)
{
    pthread_mutex_lock(&r->mu);
    /* newest first; never the head while it is being sent (the market
     * reverses it again on the next rollback if it pays it after this one) */
    while (r->count > (size_t)(r->in_flight ? 1 : 0)) {
        size_t last = (r->head + r->count - 1) % r->cap;
        if (r->queue[last].step < kept)
            break;
        free(r->queue[last].stages);
        r->queue[last].stages = NULL;
        r->count--;
    }
    pthread_mutex_unlock(&r->mu);
}

void ar_reporter_set_spent(ar_reporter *r, int64_t spent)
{
    pthread_mutex_lock(&r->mu);
    r->spent = spent;
    pthread_mutex_unlock(&r->mu);
}

void ar_reporter_queued_text(ar_reporter *r, char *buf, size_t size)
{
    pthread_mutex_lock(&r->mu);
    size_t n = 0;
    buf[0] = 0;
    for (size_t i = 0; i < r->count && n + 32 < size;) {
        size_t j = i;
        while (j + 1 < r->count &&
               r->queue[(r->head + j + 1) % r->cap].step == r->queue[(r->head + j) % r->cap].step + 1)
            j++;
        long a = r->queue[(r->head + i) % r->cap].step + 1, b = r->queue[(r->head + j) % r->cap].step + 1;
        int w = j > i ? snprintf(buf + n, size - n, "%s%ld-%ld", n ? ", " : "", a, b)
                      : snprintf(buf + n, size - n, "%s%ld", n ? ", " : "", a);
        n += (size_t)w;
        i = j + 1;
        if (i < r->count && n + 32 >= size)
            snprintf(buf + n, size - n, ", ...");
    }
    pthread_mutex_unlock(&r->mu);
}

void ar_reporter_stop(ar_reporter *r)
{
    if (!r->started)
        return;
    pthread_mutex_lock(&r->mu);
    r->stopping = 1;
    pthread_cond_signal(&r->wake);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->thread, NULL);
    while (r->count > 0)
        drop_head(r);
    free(r->queue);
    free(r->progress);
    pthread_cond_destroy(&r->wake);
    pthread_cond_destroy(&r->idle);
    pthread_mutex_destroy(&r->mu);
    ar_client_close(r->client);
    r->started = 0;
    r->queue = NULL;
    r->progress = NULL;
    r->client = NULL;
}
