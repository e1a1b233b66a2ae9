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

#include "train/audit.h"

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
    uint64_t seed = 0;
    if (r->c->audit_seed) {
        seed = r->c->audit_seed; /* tests and benchmarks: reproducible draws */
    } else if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed) {
        return ar_fail(AR_EIO, "no random bytes for the audits' draws");
    }
    ar_rng_seed(&a->rng, seed);
    for (int i = 0; i < 64; i++)
        a->last_passed[i] = -1;
    return AR_OK;
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

/* Audit stage i's step `step` against what every stage committed for it
 * (all) and the stage's state digest of the step after. AR_OK: passed;
 * AR_EPROTO: failed (why in ar_last_error()); other: not done. */
static int audit_one(run *r, int i, long step, const ar_step_digests *all, const uint8_t after[32])
{
    ar_stage *v;
    int rc = verifier_for(r, i, &v);
    if (rc != AR_OK)
        return rc;
    if (v->has_tied_copy || v->tied_owner || v->expects_tied)
        return ar_fail(AR_EINVAL, "stage %d shares a tied weight with another stage: it cannot be replayed alone", i);
    ar_audit_material m;
    rc = ar_remote_audit(r->clients[i], ar_remote_stage_session(&r->groups[i]), step, material_bound(r, v),
                         v->param_floats, r->M, r->rows_per_mb, &m);
    if (rc != AR_OK) /* refused, malformed or oversized material is the provider's failure */
        return rc == AR_EPROTO ? ar_fail(AR_EPROTO, "no material to replay: %s", ar_last_error()) : rc;
    /* a compressed link delivers other bytes than its sender hashed */
    int up = i == 0 || r->plan.codec[i] == AR_COMPRESS_NONE;
    int down = i + 1 >= r->S || r->plan.codec[i + 1] == AR_COMPRESS_NONE;
    double t0 = cpu_now();
    rc = ar_audit_stage_ex(v, &m, r->c->seed, all, r->S, i, after, up, down);
    r->audit.cpu_s += cpu_now() - t0;
    ar_audit_material_free(&m);
    if (rc == AR_ESHAPE) /* the material does not fit the stage: the provider's */
        rc = ar_fail(AR_EPROTO, "%s", ar_last_error());
    return rc;
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
    if (a->have_prev && a->prev_step == step - 1) {
        for (int i = 0; i < r->S; i++) {
            /* drawn for every stage, audited or not: the draws do not depend
             * on what the providers did */
            if (ar_rng_uniform(&a->rng) >= r->c->audit_rate)
                continue;
            int rc = audit_one(r, i, step - 1, a->prev, res->digests[i].d[AR_DIGEST_STATE]);
            if (rc == AR_OK) {
                a->passed++;
                a->last_passed[i] = step - 1;
                continue;
            }
            if (rc == AR_EPROTO) {
                a->failed++;
                snprintf(a->why, sizeof a->why, "%s", ar_last_error());
                a->failed_step = step - 1;
                *failed = i;
                a->have_prev = 0;
                return AR_OK;
            }
            if (rc == AR_ENOMEM || rc == AR_EINTERNAL)
                return rc;
            /* not done (unreachable: the lost-stage path sees to it; a tied
             * stage): counted, never a failure */
            a->skipped++;
            ar_log(AR_LOG_DEBUG, "audit of stage %d at step %ld not done: %s", i, step - 1, ar_last_error());
        }
    }
    memcpy(a->prev, res->digests, (size_t)r->S * sizeof a->prev[0]);
    a->prev_step = step;
    a->have_prev = 1;
    return AR_OK;
}
