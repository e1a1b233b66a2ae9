/* Audits by replay, the driver's side (docs/DESIGN.md, "Audits by replay").
 *
 * Every stage of a remote pipeline commits digests of each step in its NORM
 * record. The digest of a stage's state after step k arrives only with step
 * k+1, so when step k+1's results are in, the driver draws, per stage, with
 * its own RNG (seeded from the OS: a provider cannot know the draws), which
 * stages' step k it checks. For a drawn stage it fetches the replay material
 * from the provider (the Worker's Audit RPC: the state before step k and
 * the micro-batches it received), replays the step on a stage of its own
 * (--verifier self) and compares every digest bitwise: the kernels'
 * results do not depend on the thread count, so the verifier may run with
 * any --threads. */
#include "run/driver_internal.h"

#include "market/rules.h"
#include "net/market.h"
#include "core/digest.h"
#include "train/audit.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int driver_audit_setup(run *r)
{
    driver_audit *a = &r->audit;
    a->have_prev = 0;
    if (r->c->audit_rate < 0) /* not given: audits where money is at stake */
        r->c->audit_rate = r->c->market ? AR_LEASE_AUDIT_RATE : 0.0f;
    uint64_t seed = 0;
    if (r->c->audit_seed) {
        seed = r->c->audit_seed; /* tests and benchmarks: reproducible draws */
    } else if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed) {
        return ar_fail(AR_EIO, "no random bytes for the audits' draws");
    }
    ar_rng_seed(&a->rng, seed);
    for (int i = 0; i < 64; i++)
        a->last_passed[i] = -1;
    for (int i = 0; i < 4; i++)
        a->sent[i].step = -1;
    return AR_OK;
}

int driver_audit_batch(run *r, long step, const ar_batch_desc *b)
{
    driver_audit *a = &r->audit;
    if (!(r->c->audit_rate > 0) || !r->remote || b->M < 1)
        return AR_OK;
    /* as stage 0 hashes each micro-batch's ACT frame (pipeline.c): payload
     * then targets, then the micro-batches' digests in order */
    int rows = b->B / b->M;
    ar_sha256 h = {0};
    int rc = ar_sha256_begin(&h);
    for (int mb = 0; mb < b->M && rc == AR_OK; mb++) {
        uint8_t d[32];
        size_t row0 = (size_t)mb * (size_t)rows;
        rc = ar_digest_act((const char *)b->inputs + row0 * b->row_elems * 4, (size_t)rows * b->row_elems * 4,
                           b->targets + row0 * b->row_targets, (size_t)rows * b->row_targets, d);
        if (rc == AR_OK)
            rc = ar_sha256_add(&h, d, sizeof d);
    }
    int k = (int)(step % 4);
    if (rc == AR_OK)
        rc = ar_sha256_end(&h, a->sent[k].d);
    ar_sha256_free(&h);
    a->sent[k].step = rc == AR_OK ? step : -1;
    return rc;
}

void driver_audit_reset(run *r)
{
    /* a new pipeline: the stages kept nothing of the old one's steps */
    r->audit.have_prev = 0;
}

void driver_audit_free(run *r)
{
    driver_audit *a = &r->audit;
    for (int i = 0; i < 64; i++)
        if (a->ver_made[i]) {
            ar_stage_destroy(&a->ver[i]);
            a->ver_made[i] = 0;
        }
}

/* The verifier's stage for stage i: units and shape as the plan has them. */
static int verifier_for(run *r, int i, ar_stage **out)
{
    driver_audit *a = &r->audit;
    int first = r->plan.first[i], last = r->plan.last[i];
    if (a->ver_made[i] && (a->ver_first[i] != first || a->ver_last[i] != last)) {
        ar_stage_destroy(&a->ver[i]);
        a->ver_made[i] = 0;
    }
    if (!a->ver_made[i]) {
        int rc = ar_stage_create(&a->ver[i], &r->spec, first, last, r->rows_per_mb, 1, r->c->seed, &r->oc);
        if (rc != AR_OK)
            return rc;
        a->ver_made[i] = 1;
        a->ver_first[i] = first;
        a->ver_last[i] = last;
    }
    *out = &a->ver[i];
    return AR_OK;
}

/* The most bytes stage v's material for one step may take: its state (3x
 * its parameters), and per micro-batch its input, targets and incoming
 * gradient, with their headers. */
static size_t material_bound(const run *r, const ar_stage *v)
{
    size_t per_row = (size_t)v->T * (ar_stage_in_width(v) * 4 + ar_stage_out_width(v) * 4 + 4);
    return 4096 + (size_t)v->param_floats * 12 + (size_t)r->M * (64 + (size_t)r->rows_per_mb * per_row);
}

/* How an audit ended. */
enum { AUDIT_PASSED, AUDIT_NOT_DONE, AUDIT_CHAIN, AUDIT_NO_MATERIAL, AUDIT_REPLAY };

/* The market's check of a failed audit (a leased run): the evidence goes
 * with the digests of the step and the next, reported first. Confirmed, the
 * market holds the provider's loss claim (ar_rules_replace); otherwise the
 * run cannot replace it through the market, and ends. */
static int report_failure(run *r, int i, long step, const ar_audit_material *m)
{
    int rc = ar_reporter_flush(&r->reporter, ar_now() + MARKET_RELEASE_WAIT_S);
    if (rc != AR_OK)
        return ar_fail(rc, "stage %d failed an audit, and the steps' digests could not reach the market: %s", i,
                       ar_last_error());
    void *buf = NULL;
    size_t n = 0;
    if ((rc = ar_audit_material_encode(m, &buf, &n)) != AR_OK)
        return rc;
    ar_audit_evidence ev = {.material = buf, .material_bytes = n, .optim = r->oc, .seed = r->c->seed};
    bool confirmed = false;
    int64_t returned = 0;
    int status = 0;
    rc = ar_market_report_audit(r->market, r->lease.token, r->provider_ids[i], i, step, &ev, &confirmed, &returned,
                                &status);
    free(buf);
    if (rc != AR_OK)
        return ar_fail(rc, "stage %d (provider %lld) failed an audit of step %ld, and the market did not confirm "
                       "it: %s", i, (long long)r->provider_ids[i], step + 1, ar_last_error());
    if (!confirmed)
        return ar_fail(AR_EINTERNAL, "the market answered an audit's evidence without confirming it");
    char a[40];
    if (!r->c->quiet)
        printf("the market confirmed stage %d's failed audit: %s credits of provider %lld's held earnings came "
               "back\n", i, ar_credits_text(returned, a, sizeof a), (long long)r->provider_ids[i]);
    r->audit.returned += returned;
    return AR_OK;
}

/* Audit stage i's step `step` against what every stage committed for it
 * (all) and the stage's state digest of the step after. *how: the outcome;
 * the reason of a failure in ar_last_error(). A failure on a leased run is
 * reported to the market with its evidence before it is acted on. */
static int audit_one(run *r, int i, long step, const ar_step_digests *all, const uint8_t after[32], int *how)
{
    *how = AUDIT_NOT_DONE;
    ar_stage *v;
    int rc = verifier_for(r, i, &v);
    if (rc != AR_OK)
        return rc;
    if (v->has_tied_copy || v->tied_owner || v->expects_tied) {
        ar_fail(AR_EINVAL, "stage %d shares a tied weight with another stage: it cannot be replayed alone", i);
        return AR_OK;
    }
    /* the inputs it says it had are what its neighbours say they sent (a
     * compressed link delivers other bytes than its sender hashed) */
    int up = i > 0 && r->plan.codec[i] == AR_COMPRESS_NONE;
    int down = i + 1 < r->S && r->plan.codec[i + 1] == AR_COMPRESS_NONE;
    if ((up && memcmp(all[i].d[AR_DIGEST_ACT_IN], all[i - 1].d[AR_DIGEST_ACT_OUT], 32) != 0) ||
        (down && memcmp(all[i].d[AR_DIGEST_GRAD_IN], all[i + 1].d[AR_DIGEST_GRAD_OUT], 32) != 0)) {
        *how = AUDIT_CHAIN;
        ar_fail(AR_EPROTO, "stage %d says it received other %s than stage %d says it sent", i,
                up && memcmp(all[i].d[AR_DIGEST_ACT_IN], all[i - 1].d[AR_DIGEST_ACT_OUT], 32) != 0 ? "activations"
                                                                                                  : "gradients",
                up && memcmp(all[i].d[AR_DIGEST_ACT_IN], all[i - 1].d[AR_DIGEST_ACT_OUT], 32) != 0 ? i - 1 : i + 1);
        return AR_OK;
    }
    ar_audit_material m;
    rc = ar_remote_audit(r->clients[i], ar_remote_stage_session(&r->groups[i]), step, material_bound(r, v),
                         v->param_floats, r->M, r->rows_per_mb, &m);
    if (rc == AR_EPROTO) { /* refused, malformed or oversized: the provider's failure */
        *how = AUDIT_NO_MATERIAL;
        ar_fail(AR_EPROTO, "no material to replay: %s", ar_last_error());
        return AR_OK;
    }
    if (rc != AR_OK) /* unreachable: the lost-stage path sees to it */
        return rc == AR_ENOMEM ? rc : AR_OK;
    double t0 = cpu_now();
    rc = ar_audit_stage_ex(v, &m, r->c->seed, all, r->S, i, after, 0, 0);
    r->audit.cpu_s += cpu_now() - t0;
    if (rc == AR_OK) {
        *how = AUDIT_PASSED;
    } else if (rc == AR_EPROTO || rc == AR_ESHAPE || rc == AR_EINVAL) {
        /* the material does not fit the stage, or the replay differs */
        *how = AUDIT_REPLAY;
        char why[600];
        snprintf(why, sizeof why, "%s", ar_last_error());
        rc = r->leased ? report_failure(r, i, step, &m) : AR_OK;
        if (rc == AR_OK)
            ar_fail(AR_EPROTO, "%s", why);
    }
    ar_audit_material_free(&m);
    return rc == AR_EPROTO || rc == AR_ESHAPE || rc == AR_EINVAL ? AR_OK : rc;
}

int driver_audit_step(run *r, long step, const ar_step_result *res, int *failed)
{
    driver_audit *a = &r->audit;
    *failed = -1;
    if (!(r->c->audit_rate > 0) || !r->remote || res->nstages != r->S)
        return AR_OK;
    int all_digests = 1;
    for (int i = 0; i < r->S; i++)
        all_digests &= res->has_digests[i] && r->plan.group_size[i] <= 1;
    if (!all_digests) {
        a->have_prev = 0;
        return AR_OK;
    }
    /* stage 0's inputs are the batch this driver sent: checked at every step
     * (not over a compressed link: stage 0 hashes what it decompressed) */
    int k = (int)(step % 4);
    if (a->sent[k].step == step && r->plan.codec[0] == AR_COMPRESS_NONE &&
        memcmp(res->digests[0].d[AR_DIGEST_ACT_IN], a->sent[k].d, 32) != 0) {
        a->failed++;
        snprintf(a->why, sizeof a->why, "stage 0 says it received another batch than the driver sent");
        a->failed_step = step;
        a->have_prev = 0;
        if (r->leased)
            return ar_fail(AR_EPROTO, "stage 0 (provider %lld) at step %ld: %s; the market cannot confirm this kind "
                           "of failure yet, so the run stops", (long long)r->provider_ids[0], step + 1, a->why);
        *failed = 0;
        return AR_OK;
    }
    if (a->have_prev && a->prev_step == step - 1) {
        for (int i = 0; i < r->S; i++) {
            /* drawn for every stage, audited or not: the draws do not depend
             * on what the providers did */
            if (ar_rng_uniform(&a->rng) >= r->c->audit_rate)
                continue;
            int how;
            int rc = audit_one(r, i, step - 1, a->prev, res->digests[i].d[AR_DIGEST_STATE], &how);
            if (rc != AR_OK)
                return rc;
            if (how == AUDIT_PASSED) {
                a->passed++;
                a->last_passed[i] = step - 1;
                bool confirmed;
                int64_t back;
                int status;
                /* escrow releases the provider's pay up to here (the renter's
                 * word is enough to pay sooner); best effort */
                if (r->leased && ar_market_report_audit(r->market, r->lease.token, r->provider_ids[i], i, step - 1,
                                                        NULL, &confirmed, &back, &status) != AR_OK)
                    ar_log(AR_LOG_DEBUG, "reporting a passed audit: %s", ar_last_error());
                continue;
            }
            if (how == AUDIT_NOT_DONE) {
                a->skipped++;
                ar_log(AR_LOG_DEBUG, "audit of stage %d at step %ld not done: %s", i, step - 1, ar_last_error());
                continue;
            }
            a->failed++;
            snprintf(a->why, sizeof a->why, "%s", ar_last_error());
            a->failed_step = step - 1;
            a->have_prev = 0;
            if (r->leased && how != AUDIT_REPLAY)
                /* no evidence the market could check: no claim, no money */
                return ar_fail(AR_EPROTO, "stage %d (provider %lld) failed an audit of step %ld: %s; the market "
                               "cannot confirm this kind of failure yet, so the run stops",
                               i, (long long)r->provider_ids[i], step, a->why);
            *failed = i;
            return AR_OK;
        }
    }
    memcpy(a->prev, res->digests, (size_t)r->S * sizeof a->prev[0]);
    a->prev_step = step;
    a->have_prev = 1;
    return AR_OK;
}
