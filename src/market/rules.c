/* The market's rules (rules.h) over the store. */
#include "market/rules.h"

#include "arceus.h"
#include "core/core.h"
#include "nn/spec.h"
#include "train/audit.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* Choosing free providers and leasing them (AcquireLease, a replacement) is
 * one step: two renters asking at once never get the same provider. The
 * market is one process over its database, so a lock of this process is
 * enough. */
static pthread_mutex_t choose_mu = PTHREAD_MUTEX_INITIALIZER;

/* ---- ranking ------------------------------------------------------------------ */

static int rank_cmp(const void *a, const void *b)
{
    const ar_ranked *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    if (x->p->mem_bytes != y->p->mem_bytes)
        return x->p->mem_bytes > y->p->mem_bytes ? -1 : 1;
    return x->p->id < y->p->id ? -1 : x->p->id > y->p->id;
}

/* How well an account's claims held up: observed / claimed (at most 1),
 * or -1 when nothing was observed. */
static double account_ratio(const ar_provider *p)
{
    if (!(p->acct_obs_claim_flops > 0))
        return -1;
    double r = p->acct_obs_flops / p->acct_obs_claim_flops;
    return r > 1 ? 1 : r < 0 ? 0 : r;
}

double ar_rules_speed(const ar_provider *p)
{
    double claim = p->gflops > 0 && isfinite(p->gflops) ? p->gflops * 1e9 : 1.0;
    double trust = account_ratio(p);
    double prior = claim * (trust < 0 ? 1.0 : trust);
    if (!(prior > 0))
        prior = 1.0; /* an account whose claims were all false: 1 FLOP/s until seen */
    double f = p->obs_flops > 0 ? p->obs_flops : 0, b = p->obs_busy_s > 0 ? p->obs_busy_s : 0;
    return (AR_SPEED_PRIOR_FLOPS + f) / (AR_SPEED_PRIOR_FLOPS / prior + b) / 1e9;
}

static int double_cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct {
    int64_t account;
    double ratio;
} account_seen;

static int seen_cmp(const void *a, const void *b)
{
    const account_seen *x = a, *y = b;
    return x->account < y->account ? -1 : x->account > y->account;
}

/* How each account among ps[] that was observed held its claims, sorted:
 * ratios[0..*k), one per account (ratios has room for n; seen is scratch
 * of n). Every provider of an account carries the account's figures. */
static void account_ratios(const ar_provider *ps, size_t n, account_seen *seen, double *ratios, size_t *k)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (account_ratio(&ps[i]) >= 0)
            seen[m++] = (account_seen){.account = ps[i].account_id, .ratio = account_ratio(&ps[i])};
    qsort(seen, m, sizeof *seen, seen_cmp);
    *k = 0;
    for (size_t i = 0; i < m; i++)
        if (i == 0 || seen[i].account != seen[i - 1].account)
            ratios[(*k)++] = seen[i].ratio;
    qsort(ratios, *k, sizeof *ratios, double_cmp);
}

/* The median of how the other accounts' claims held up (1 when no other
 * account was observed): claims are sgemm peaks and observations whole
 * training steps, so a claim is judged against how claims fare on this
 * market, and not by its own account. sorted[0..k) from account_ratios;
 * own < 0: p's account was not observed. */
static double reference_ratio(const double *sorted, size_t k, double own)
{
    size_t skip = k; /* the index of p's own account's ratio: left out */
    if (own >= 0)
        for (size_t i = 0; i < k && skip == k; i++)
            if (sorted[i] == own)
                skip = i;
    size_t m = skip < k ? k - 1 : k;
    if (m == 0)
        return 1.0;
#define AT(r) (sorted[(r) < skip ? (r) : (r) + 1])
    double med = m % 2 ? AT(m / 2) : 0.5 * (AT(m / 2 - 1) + AT(m / 2));
#undef AT
    return med > 0 ? med : 1e-300;
}

void ar_rules_rank(const ar_provider *ps, size_t n, ar_ranked *out)
{
    double best_speed = 0;
    int64_t min_price = INT64_MAX;
    for (size_t i = 0; i < n; i++) {
        double v = ar_rules_speed(&ps[i]);
        if (v > best_speed)
            best_speed = v;
        if (ps[i].price_per_tflop < min_price)
            min_price = ps[i].price_per_tflop;
    }
    /* (without room for the ratios every claim is taken as it stands) */
    double *ratios = n ? malloc(n * sizeof *ratios) : NULL;
    account_seen *seen = n ? malloc(n * sizeof *seen) : NULL;
    size_t k = 0;
    if (!seen) {
        free(ratios);
        ratios = NULL;
    }
    if (ratios)
        account_ratios(ps, n, seen, ratios, &k);
    free(seen);
    const double p0 = (double)AR_MICRO_PER_CREDIT;
    for (size_t i = 0; i < n; i++) {
        const ar_provider *p = &ps[i];
        double rel = p->reliability < 0 ? 0 : p->reliability > 1 ? 1 : p->reliability;
        double speed = ar_rules_speed(p);
        /* an overstated claim: its speed far below what claims like it give */
        double claim = 1.0;
        if (p->gflops > 0) {
            double held = speed / p->gflops, ref = ratios ? reference_ratio(ratios, k, account_ratio(p)) : 1.0;
            if (held < AR_SPEED_FAR_BELOW * ref)
                claim = held / ref;
        }
        out[i].p = p;
        out[i].score = rel * rel * (best_speed > 0 ? speed / best_speed : 1) * claim * ((double)min_price + p0) /
                       ((double)p->price_per_tflop + p0);
    }
    free(ratios);
    qsort(out, n, sizeof *out, rank_cmp);
}

int ar_rules_free_providers(ar_store *s, int64_t min_mem, ar_provider **providers, ar_ranked **ranked,
                            size_t *n, size_t *busy)
{
    size_t all = 0, k = 0, held = 0;
    *ranked = NULL;
    *n = 0;
    if (busy)
        *busy = 0;
    int rc = ar_store_provider_list(s, true, providers, &all);
    if (rc != AR_OK)
        return rc;
    /* the candidates first go to the front of *providers, in id order */
    ar_provider *ps = *providers;
    for (size_t i = 0; i < all; i++) {
        /* too small, or its owner's rules say not now (arceus provide --when,
         * --hours, --on-battery) */
        if (ps[i].mem_bytes < min_mem || ps[i].unavailable || ps[i].leaving_since)
            continue;
        /* a worker hosts one stage: a provider leased to a live job is not free */
        bool leased = false;
        if ((rc = ar_store_provider_leased(s, ps[i].id, &leased)) != AR_OK)
            return rc;
        if (leased) {
            held++;
            continue;
        }
        if (k != i)
            ps[k] = ps[i];
        k++;
    }
    if (!(*ranked = ar_calloc(k ? k : 1, sizeof **ranked)))
        return ar_fail(AR_ENOMEM, "out of memory for %zu providers", k);
    ar_rules_rank(ps, k, *ranked);
    *n = k;
    if (busy)
        *busy = held;
    return AR_OK;
}

/* ---- reachability ------------------------------------------------------------------ */

bool ar_rules_leasable(const ar_market_policy *policy, const ar_provider *p)
{
    return !policy || !policy->probe || p->reach == AR_REACH_OK ||
           (p->reach == AR_REACH_RELAYED && policy->relay_probe);
}

bool ar_rules_reach_due(const ar_provider *p, int64_t now)
{
    if (p->reach == AR_REACH_OK)
        return false;
    if (p->reach == AR_REACH_RELAYED)
        return now - p->reach_checked >= AR_REACH_RETRY_S;
    if (p->reach_failures < 2)
        return true;
    int64_t wait = p->reach_failures >= 7 ? AR_REACH_RETRY_S : (int64_t)1 << (p->reach_failures - 1);
    return now - p->reach_checked >= (wait < AR_REACH_RETRY_S ? wait : AR_REACH_RETRY_S);
}

int ar_rules_check_reach(ar_store *s, const ar_market_policy *policy, ar_provider *p)
{
    if (!policy || !policy->probe)
        return AR_OK;
    ar_reach was = p->reach, now;
    /* a relayed worker is behind a router: the relay first (a dial of its
     * address would only wait out the deadline) */
    bool relay = policy->relay_probe != NULL;
    if (relay && was == AR_REACH_RELAYED && policy->relay_probe(policy->probe_ctx, p->id, p->address))
        now = AR_REACH_RELAYED;
    else if (policy->probe(policy->probe_ctx, p->address))
        now = AR_REACH_OK;
    else if (relay && was != AR_REACH_RELAYED && policy->relay_probe(policy->probe_ctx, p->id, p->address))
        now = AR_REACH_RELAYED;
    else
        now = AR_REACH_UNREACHABLE;
    int rc = ar_store_provider_set_reach(s, p->id, now);
    if (rc != AR_OK)
        return rc;
    if (now != was)
        ar_log(now != AR_REACH_UNREACHABLE ? AR_LOG_INFO : AR_LOG_WARN, "market: provider %lld at %s is %s%s",
               (long long)p->id, p->address, ar_reach_name(now),
               now == AR_REACH_RELAYED      ? " (reached through the relay only)"
               : now != AR_REACH_UNREACHABLE ? ""
                                             : ": it is not leased until a check reaches its worker");
    p->reach = now;
    p->reach_checked = (int64_t)time(NULL);
    p->reach_failures = now != AR_REACH_UNREACHABLE ? 0 : p->reach_failures + 1;
    return AR_OK;
}

int ar_rules_pick(ar_store *s, const ar_market_policy *policy, const ar_ranked *ranked, size_t n, size_t want,
                  ar_ranked *picked, size_t *n_picked, size_t *unreachable)
{
    size_t k = 0, left_out = 0;
    int probes = 0;
    int64_t now = (int64_t)time(NULL);
    for (size_t i = 0; i < n && k < want; i++) {
        /* the rows are the caller's copies: a check updates the store and them */
        ar_provider *p = (ar_provider *)ranked[i].p;
        if (!ar_rules_leasable(policy, p) && ar_rules_reach_due(p, now) && probes < AR_REACH_MAX_PROBES) {
            probes++;
            int rc = ar_rules_check_reach(s, policy, p);
            if (rc != AR_OK)
                return rc;
        }
        if (ar_rules_leasable(policy, p))
            picked[k++] = ranked[i];
        else
            left_out++;
    }
    *n_picked = k;
    if (unreachable)
        *unreachable = left_out;
    return AR_OK;
}

/* ---- pricing ---------------------------------------------------------------------- */

void ar_rules_model_clear(ar_market_model *m)
{
    free(m->json);
    ar_free(m->costs);
    memset(m, 0, sizeof *m);
}

int ar_rules_model(const char *spec_json, int mb_rows, int micro_batches, int schedule, ar_market_model *out)
{
    memset(out, 0, sizeof *out);
    size_t len = spec_json ? strlen(spec_json) : 0;
    if (len == 0 || len > AR_MARKET_MAX_SPEC_BYTES)
        return ar_fail(AR_EINVAL, "the model spec is %zu bytes: 1..%d", len, AR_MARKET_MAX_SPEC_BYTES);
    if (mb_rows < 1 || mb_rows > AR_MARKET_MAX_MB_ROWS || micro_batches < 1 ||
        micro_batches > AR_MARKET_MAX_MICRO_BATCHES || (schedule != 0 && schedule != 1))
        return ar_fail(AR_EINVAL, "micro-batches of %d rows (1..%d), %d micro-batches (1..%d) or schedule %d (0, 1) "
                       "out of range", mb_rows, AR_MARKET_MAX_MB_ROWS, micro_batches, AR_MARKET_MAX_MICRO_BATCHES,
                       schedule);
    /* the same strict parser a provider's worker uses on a Load */
    int rc = ar_spec_parse(spec_json, len, "the lease's model spec", &out->spec);
    if (rc == AR_OK)
        rc = ar_spec_validate(&out->spec, "the lease's model spec");
    if (rc != AR_OK)
        return ar_fail(AR_EINVAL, "%s", ar_last_error());
    out->units = ar_spec_units(&out->spec);
    out->mb_rows = mb_rows;
    out->micro_batches = micro_batches;
    out->schedule = schedule;
    if (!(out->json = ar_spec_to_json(&out->spec)) ||
        !(out->costs = ar_calloc((size_t)out->units, sizeof *out->costs))) {
        ar_rules_model_clear(out);
        return ar_fail(AR_ENOMEM, "out of memory for the model's costs");
    }
    if ((rc = ar_plan_unit_costs(&out->spec, mb_rows, out->costs)) != AR_OK) {
        ar_rules_model_clear(out);
        return ar_fail(AR_EINVAL, "%s", ar_last_error());
    }
    return AR_OK;
}

/* Whether a renter's split gives each of n stages at least one unit and
 * covers the model's units once. */
static int split_covers(const ar_market_model *m, const uint32_t *stage_units, size_t n_stage_units, size_t n)
{
    if (n_stage_units != n)
        return ar_fail(AR_EINVAL, "the split has %zu stages for %zu providers", n_stage_units, n);
    int u = 0;
    for (size_t i = 0; i < n; i++) {
        if (stage_units[i] < 1 || stage_units[i] > (uint32_t)(m->units - u))
            return ar_fail(AR_EINVAL, "the split's stage %zu has %u layers: the %d layers are not covered once", i,
                           stage_units[i], m->units);
        u += (int)stage_units[i];
    }
    if (u != m->units)
        return ar_fail(AR_EINVAL, "the split covers %d of the model's %d layers", u, m->units);
    return AR_OK;
}

int ar_rules_split(const ar_market_model *m, const ar_device *devs, size_t n, const uint32_t *stage_units,
                   size_t n_stage_units, ar_lease_member *members)
{
    if (n < 1 || n > AR_MARKET_MAX_DEVICES || n > (size_t)m->units)
        return ar_fail(AR_EINVAL, "%zu providers for a model of %d layers: each holds at least one", n, m->units);
    ar_plan plan;
    int rc;
    if (n_stage_units > 0) {
        /* the renter's split: checked, then priced by the same cost model */
        if ((rc = split_covers(m, stage_units, n_stage_units, n)) != AR_OK)
            return rc;
        memset(&plan, 0, sizeof plan);
        int u = 0;
        for (size_t i = 0; i < n; i++) {
            plan.device[i] = (int)i;
            plan.first[i] = u;
            plan.last[i] = u += (int)stage_units[i];
            plan.group_size[i] = 1;
            plan.group[i][0] = (int)i;
        }
        plan.nstages = (int)n;
        rc = ar_plan_estimate(&plan, m->costs, m->units, devs, (int)n, m->micro_batches, m->schedule);
        if (rc == AR_ELIMIT)
            return ar_fail(AR_ELIMIT, "the split does not fit the providers' memory: %s", ar_last_error());
    } else {
        rc = ar_plan_each(m->costs, m->units, devs, (int)n, m->micro_batches, m->schedule, &plan);
    }
    for (size_t i = 0; rc == AR_OK && i < n; i++) {
        members[i].stage = (int)i;
        members[i].first_unit = plan.first[i];
        members[i].last_unit = plan.last[i];
        members[i].verified_step = -1;
        rc = ar_plan_stage_flops(m->costs, m->units, plan.first[i], plan.last[i], m->micro_batches,
                                 &members[i].flops_per_step);
    }
    return rc;
}

int ar_rules_price_plan(const ar_lease_member *members, size_t n, int64_t est_steps, int64_t *per_step,
                        int64_t *estimate)
{
    if (est_steps < 0)
        return ar_fail(AR_EINVAL, "negative step estimate (%lld)", (long long)est_steps);
    int64_t step_cost = 0, total;
    for (size_t i = 0; i < n; i++) {
        int64_t c = 0;
        int rc = ar_flops_cost(members[i].flops_per_step, members[i].price_per_tflop, &c);
        if (rc != AR_OK)
            return rc;
        if (__builtin_add_overflow(step_cost, c, &step_cost))
            return ar_fail(AR_ELIMIT, "lease cost per step overflows");
    }
    if (__builtin_mul_overflow(step_cost, est_steps, &total))
        return ar_fail(AR_ELIMIT, "lease estimate overflows (%lld steps)", (long long)est_steps);
    if (per_step)
        *per_step = step_cost;
    if (estimate)
        *estimate = total;
    return AR_OK;
}

/* ---- leases ----------------------------------------------------------------------- */

/* A provider as its renter sees it, under its account's name, with its
 * place in the plan. */
static int leased_view(ar_store *s, const ar_provider *p, const ar_lease_member *m, ar_market_leased *out)
{
    ar_account owner;
    int rc = ar_store_account_get(s, p->account_id, &owner);
    if (rc != AR_OK)
        return rc;
    memset(out, 0, sizeof *out);
    out->p = *p;
    out->p.price_per_tflop = m->price_per_tflop;
    snprintf(out->account, sizeof out->account, "%s", owner.name);
    out->flops_per_step = m->flops_per_step;
    out->stage = m->stage;
    out->first_unit = m->first_unit;
    out->last_unit = m->last_unit;
    out->speed_gflops = ar_rules_speed(p);
    return AR_OK;
}

/* Providers as the planner sees them: the market's estimate of their
 * speed, the memory they offer, one stage each. */
static void plan_device(const ar_provider *p, ar_device *d)
{
    memset(d, 0, sizeof *d);
    snprintf(d->name, sizeof d->name, "provider %lld", (long long)p->id);
    d->gflops = ar_rules_speed(p);
    if (!(d->gflops > 0))
        d->gflops = 1e-9;
    d->mem_bytes = (double)p->mem_bytes;
    d->solo = 1;
}

/* The n best of ranked[] as a lease's members (stage i for the i-th), the
 * model split among them, and as the renter sees them. */
static int choose_members(ar_store *s, const ar_market_lease_request *req, const ar_market_model *model,
                          const ar_ranked *ranked, size_t n, ar_lease_member *members, ar_market_lease *out)
{
    ar_device devs[AR_MARKET_MAX_DEVICES];
    for (size_t i = 0; i < n; i++) {
        plan_device(ranked[i].p, &devs[i]);
        members[i] = (ar_lease_member){.provider_id = ranked[i].p->id,
                                       .price_per_tflop = ranked[i].p->price_per_tflop};
    }
    int rc = ar_rules_split(model, devs, n, req->stage_units, req->n_stage_units, members);
    for (size_t i = 0; rc == AR_OK && i < n; i++)
        rc = leased_view(s, ranked[i].p, &members[i], &out->providers[i]);
    if (rc == AR_OK)
        out->n = n;
    return rc;
}

/* The refusal when fewer providers are free than asked for. */
static int too_few_providers(const ar_market_lease_request *req, size_t free_n, size_t busy, size_t unreachable)
{
    char busy_note[96] = "", reach_note[96] = "";
    if (busy)
        snprintf(busy_note, sizeof busy_note, ", %zu more leased to other jobs", busy);
    if (unreachable)
        snprintf(reach_note, sizeof reach_note, ", %zu more the market cannot reach", unreachable);
    return ar_fail(AR_ELIMIT, "%u providers asked for, %zu online%s%s%s: try fewer --devices or later",
                   req->devices, free_n, busy ? " and free" : req->min_mem_bytes ? " with enough memory" : "",
                   busy_note, reach_note);
}

/* The ticket of each member of a lease just made, from its token. */
static int issue_tickets(ar_store *s, ar_market_lease *out)
{
    for (size_t i = 0; i < out->n; i++) {
        int rc = ar_store_ticket_issue(s, out->lease_id, out->providers[i].p.id, out->token,
                                       out->providers[i].ticket);
        if (rc != AR_OK)
            return rc;
    }
    return AR_OK;
}

/* Leases the chosen members to job_id. Refused, the job stays on record,
 * cancelled with nothing spent; leased, it is running from start_step. */
static int lease_job(ar_store *s, int64_t renter_id, const ar_market_lease_request *req,
                     const ar_market_model *model, int64_t job_id, int64_t start_step,
                     const ar_lease_member *members, ar_market_lease *out)
{
    ar_lease_plan plan = {.spec = model->json, .mb_rows = model->mb_rows, .micro_batches = model->micro_batches,
                          .schedule = model->schedule};
    int rc = ar_store_lease_create(s, job_id, renter_id, members, out->n, req->est_steps, req->max_credits, &plan,
                                   out->token, &out->lease_id, &out->estimate);
    if (rc != AR_OK) {
        char why[600];
        snprintf(why, sizeof why, "%s", ar_last_error());
        if (!req->resume_job && ar_store_job_update(s, job_id, AR_JOB_CANCELLED, 0) != AR_OK)
            ar_log(AR_LOG_ERROR, "market: job %lld: %s", (long long)job_id, ar_last_error());
        ar_log(AR_LOG_INFO, "market: job %lld: %s", (long long)job_id, why);
        return ar_fail(rc, "%s", why);
    }
    out->job_id = job_id;
    if ((rc = ar_store_job_update(s, job_id, AR_JOB_RUNNING, start_step)) != AR_OK)
        return rc;
    /* the renter's driver counts each stage's busy time from the start of
     * its run: the first sample of every stage, so that a run whose only
     * progress report is its last is observed all the same */
    for (size_t i = 0; i < out->n; i++) {
        ar_stage_sample start = {.provider_id = members[i].provider_id, .step = start_step}, prev;
        bool had;
        if ((rc = ar_store_stage_sample_swap(s, out->lease_id, members[i].stage, &start, &prev, &had)) != AR_OK)
            return rc;
    }
    ar_log(AR_LOG_INFO, "market: job %lld leases %zu providers (lease %lld, estimate %lld micro-credits)",
           (long long)job_id, out->n, (long long)out->lease_id, (long long)out->estimate);
    return AR_OK;
}

/* ar_rules_acquire with choose_mu held. *before: the resumed job's status
 * before (its old leases have ended), or -1 when nothing was resumed. */
static int acquire_locked(ar_store *s, const ar_market_policy *policy, int64_t renter_id,
                          const ar_market_lease_request *req, const ar_market_model *model, ar_market_lease *out,
                          bool *too_few, int *before)
{
    int rc;
    bool resumed = req->resume_job > 0;
    if (resumed) {
        /* a new driver for the same job: the old one's leases end (their
         * providers are free again). Nothing is reversed: that work was
         * done, and what the renter's checkpoint kept is its own business */
        ar_job_status st = AR_JOB_RUNNING;
        if ((rc = ar_store_job_resume(s, req->resume_job, renter_id, req->kept_steps, &st)) != AR_OK)
            return rc;
        *before = (int)st;
        ar_log(AR_LOG_INFO, "market: job %lld resumes from step %lld (%s before; nothing reversed)",
               (long long)req->resume_job, (long long)req->kept_steps, ar_job_status_name(st));
    }
    ar_provider *ps = NULL;
    ar_ranked *ranked = NULL, picked[AR_MARKET_MAX_DEVICES];
    size_t n_free = 0, busy = 0, n_picked = 0, unreachable = 0;
    ar_lease_member members[AR_MARKET_MAX_DEVICES];
    rc = ar_rules_free_providers(s, req->min_mem_bytes, &ps, &ranked, &n_free, &busy);
    /* only workers the market reached: a renter's driver dials them */
    if (rc == AR_OK)
        rc = ar_rules_pick(s, policy, ranked, n_free, req->devices, picked, &n_picked, &unreachable);
    if (rc == AR_OK && n_picked < req->devices) {
        *too_few = true;
        rc = too_few_providers(req, n_picked, busy, unreachable);
    }
    if (rc == AR_OK)
        rc = choose_members(s, req, model, picked, req->devices, members, out);
    int64_t job_id = req->resume_job;
    if (rc == AR_OK && !resumed)
        rc = ar_store_job_create(s, renter_id, req->spec, req->max_credits, &job_id);
    if (rc == AR_OK) {
        rc = lease_job(s, renter_id, req, model, job_id, resumed ? req->kept_steps : 0, members, out);
        if (rc == AR_OK && (rc = issue_tickets(s, out)) != AR_OK) {
            /* a lease whose members cannot be loaded is no lease: end it */
            char why[600];
            snprintf(why, sizeof why, "%s", ar_last_error());
            if (ar_store_lease_release(s, out->lease_id) != AR_OK ||
                ar_store_job_update(s, job_id, resumed ? AR_JOB_FAILED : AR_JOB_CANCELLED,
                                    resumed ? req->kept_steps : 0) != AR_OK)
                ar_log(AR_LOG_ERROR, "market: job %lld: %s", (long long)job_id, ar_last_error());
            rc = ar_fail(rc, "issuing the lease's tickets: %s", why);
        }
    }
    ar_free(ranked);
    ar_free(ps);
    return rc;
}

int ar_rules_acquire(ar_store *s, const ar_market_policy *policy, int64_t renter_id,
                     const ar_market_lease_request *req, ar_market_lease *out, bool *too_few)
{
    *too_few = false;
    memset(out, 0, sizeof *out);
    if (req->devices < 1 || req->devices > AR_MARKET_MAX_DEVICES || req->est_steps < 0 || req->max_credits < 0 ||
        req->flops_per_step < 0 || req->min_mem_bytes < 0 || req->resume_job < 0 || req->kept_steps < 0 ||
        req->n_stage_units > AR_MARKET_MAX_DEVICES)
        return ar_fail(AR_EINVAL, "a lease of %u providers (1..%d) with negative steps, FLOPs, memory or credits",
                       req->devices, AR_MARKET_MAX_DEVICES);
    ar_account renter;
    int rc = ar_store_account_get(s, renter_id, &renter);
    if (rc != AR_OK)
        return rc;
    if (renter.false_claims >= AR_MAX_FALSE_CLAIMS)
        return ar_fail(AR_ELIMIT, "account %s has made %lld loss claims the market found false: it takes no more "
                       "leases (ask the market's operator)", renter.name, (long long)renter.false_claims);
    /* the market prices the work itself: the renter's word is only the model */
    ar_market_model model;
    if ((rc = ar_rules_model(req->model_spec, req->mb_rows, req->micro_batches, req->schedule, &model)) != AR_OK)
        return rc;
    if (req->devices > (uint32_t)model.units)
        rc = ar_fail(AR_EINVAL, "%u providers for a model of %d layers: each holds at least one", req->devices,
                     model.units);
    /* a renter's split is checked before any provider is chosen for it */
    else if (req->n_stage_units > 0)
        rc = split_covers(&model, req->stage_units, req->n_stage_units, req->devices);
    if (rc != AR_OK) {
        ar_rules_model_clear(&model);
        return rc;
    }
    int before = -1;
    pthread_mutex_lock(&choose_mu);
    rc = acquire_locked(s, policy, renter_id, req, &model, out, too_few, &before);
    /* a resumed running job whose new lease cannot be made is marked
     * failed, not left "running" without a lease (a later resume brings it
     * back); a finished one keeps its status */
    if (rc != AR_OK && before == AR_JOB_RUNNING) {
        char why[600];
        snprintf(why, sizeof why, "%s", ar_last_error());
        if (ar_store_job_update(s, req->resume_job, AR_JOB_FAILED, req->kept_steps) != AR_OK)
            ar_log(AR_LOG_ERROR, "market: job %lld: %s", (long long)req->resume_job, ar_last_error());
        else
            ar_log(AR_LOG_INFO, "market: job %lld could not resume (no lease): marked failed",
                   (long long)req->resume_job);
        ar_fail(rc, "%s", why);
    }
    pthread_mutex_unlock(&choose_mu);
    ar_rules_model_clear(&model);
    if (rc != AR_OK) {
        memset(out->token, 0, sizeof out->token);
        for (size_t i = 0; i < out->n; i++)
            memset(out->providers[i].ticket, 0, sizeof out->providers[i].ticket);
    }
    return rc;
}

/* The escrow of jobs that ended is released when the window is 0. */
int ar_rules_release(ar_store *s, const ar_market_policy *policy, const ar_lease *lease, ar_job_status status,
                     int64_t steps, int64_t *spent)
{
    ar_job job;
    int rc;
    if ((rc = ar_store_lease_release(s, lease->id)) != AR_OK ||
        (rc = ar_store_job_update(s, lease->job_id, status, steps)) != AR_OK ||
        (rc = ar_store_job_get(s, lease->job_id, &job)) != AR_OK)
        return rc;
    ar_log(AR_LOG_INFO, "market: job %lld %s after %lld steps, lease %lld released (%lld micro-credits spent)",
           (long long)lease->job_id, ar_job_status_name(status), (long long)steps, (long long)lease->id,
           (long long)job.spent);
    if (spent)
        *spent = job.spent;
    ar_store_job_clear(&job);
    if (policy && policy->escrow_window_s == 0)
        rc = ar_rules_settle_escrow(s, policy, (int64_t)time(NULL), NULL);
    return rc;
}

/* ---- escrow and audits ----------------------------------------------------------- */

int ar_rules_settle_escrow(ar_store *s, const ar_market_policy *policy, int64_t now, int *released)
{
    int n = 0;
    int64_t window = policy ? policy->escrow_window_s : AR_ESCROW_DEFAULT_WINDOW_S;
    int rc = ar_store_escrow_release(s, now, window, &n);
    if (rc == AR_OK && n > 0)
        ar_log(AR_LOG_INFO, "market: %d payment%s released from escrow to %s providers", n, n == 1 ? "" : "s",
               n == 1 ? "its" : "their");
    if (released)
        *released = n;
    return rc;
}

int ar_rules_audit_passed(ar_store *s, const ar_lease *lease, int64_t provider_id, int64_t step, int *released)
{
    int n = 0;
    int rc = ar_store_member_verified(s, lease->id, provider_id, step, &n);
    if (rc == AR_OK)
        ar_log(AR_LOG_INFO, "market: job %lld: provider %lld verified up to step %lld (%d payments released)",
               (long long)lease->job_id, (long long)provider_id, (long long)step + 1, n);
    if (released)
        *released = n;
    return rc;
}

int ar_rules_audit_failed(ar_store *s, const ar_lease *lease, int64_t provider_id, int64_t step, int stage,
                          const char *evidence, int64_t *returned)
{
    int64_t back = 0;
    ar_audit_failure f = {.lease_id = lease->id, .provider_id = provider_id, .step = step, .stage = stage,
                          .evidence = evidence};
    int rc = ar_store_audit_failure(s, &f, &back);
    if (rc == AR_OK) {
        char a[40];
        ar_log(AR_LOG_WARN,
               "market: job %lld: an audit of provider %lld (stage %d, step %lld) failed: %s credits it held go back "
               "to the renter, its account's reliability is 0",
               (long long)lease->job_id, (long long)provider_id, stage, (long long)step + 1,
               ar_credits_text(back, a, sizeof a));
    }
    if (returned)
        *returned = back;
    return rc;
}

static void hex32(const uint8_t d[32], char out[65])
{
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

/* A claim that does not hold: counted against the renter, nothing moves. */
static int false_audit_claim(ar_store *s, const ar_lease *lease, int64_t provider_id, int64_t step, const char *why)
{
    char msg[700];
    snprintf(msg, sizeof msg, "%s", why);
    ar_log(AR_LOG_WARN, "market: job %lld: a failed audit of provider %lld at step %lld not confirmed: %s",
           (long long)lease->job_id, (long long)provider_id, (long long)step + 1, msg);
    int rc = ar_store_account_claim(s, lease->renter_id, false);
    if (rc != AR_OK)
        return rc;
    return ar_fail(AR_ELIMIT, "the market's replay does not confirm the failure: %s; nothing moved, and the claim "
                   "counts as false", msg);
}

static int valid_optim(const ar_optim_config *o)
{
    return (o->kind == AR_OPT_ADAMW || o->kind == AR_OPT_SGD) && o->beta1 >= 0 && o->beta1 < 1 && o->beta2 >= 0 &&
           o->beta2 < 1 && o->eps > 0 && o->eps < 1 && o->weight_decay >= 0 && o->weight_decay <= 10;
}

int ar_rules_audit_claim(ar_store *s, const ar_lease *lease, int64_t provider_id, int64_t step, int stage,
                         const ar_audit_evidence *ev, bool *confirmed, int64_t *returned)
{
    *confirmed = false;
    if (returned)
        *returned = 0;
    ar_account renter;
    int rc = ar_store_account_get(s, lease->renter_id, &renter);
    if (rc != AR_OK)
        return rc;
    if (renter.false_claims >= AR_MAX_FALSE_CLAIMS)
        return ar_fail(AR_ELIMIT, "account %s has made %lld claims the market found false: it may make no more "
                       "(ask the market's operator)", renter.name, (long long)renter.false_claims);
    if (step < 0 || !lease->has_plan || lease->mb_rows < 1 || lease->micro_batches < 1)
        return ar_fail(AR_EINVAL, "an audit of step %lld of a lease without a plan", (long long)step);
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    if ((rc = ar_store_lease_members(s, lease->id, &mem, &nm)) != AR_OK)
        return rc;
    int first = -1, last = -1;
    for (size_t i = 0; i < nm; i++)
        if (mem[i].provider_id == provider_id && mem[i].stage == stage) {
            first = mem[i].first_unit;
            last = mem[i].last_unit;
        }
    ar_free(mem);
    if (first < 0)
        return ar_fail(AR_EINVAL, "provider %lld is not the lease's member at stage %d", (long long)provider_id, stage);
    /* what the provider committed (the first report of each stands) */
    ar_step_digests committed;
    uint8_t after[AR_STAGE_DIGEST_BYTES];
    _Static_assert(sizeof committed == AR_STAGE_DIGEST_BYTES, "a stage's digests are what the store keeps");
    if ((rc = ar_store_stage_digests(s, lease->job_id, step, stage, provider_id, (uint8_t *)&committed)) != AR_OK ||
        (rc = ar_store_stage_digests(s, lease->job_id, step + 1, stage, provider_id, after)) != AR_OK)
        return rc == AR_ENOTFOUND ? ar_fail(AR_ENOTFOUND, "the digests of steps %lld and %lld of stage %d have not "
                                            "both been reported", (long long)step + 1, (long long)step + 2, stage)
                                  : rc;
    if (!valid_optim(&ev->optim))
        return false_audit_claim(s, lease, provider_id, step, "the evidence's optimizer settings are out of range");
    char *json = NULL;
    if ((rc = ar_store_lease_spec(s, lease->id, &json)) != AR_OK)
        return rc;
    if (!json)
        return ar_fail(AR_EINVAL, "the lease has no model spec");
    ar_model_spec spec;
    rc = ar_spec_parse(json, strlen(json), "the lease's model", &spec);
    free(json);
    if (rc != AR_OK)
        return rc;
    ar_stage st;
    if ((rc = ar_stage_create(&st, &spec, first, last, lease->mb_rows, 1, ev->seed, &ev->optim)) != AR_OK)
        return rc;
    ar_audit_material m;
    ar_step_digests got;
    uint8_t got_after[32];
    char why[400] = "";
    rc = ar_audit_material_decode(ev->material, ev->material_bytes, st.param_floats, lease->micro_batches,
                                  lease->mb_rows, "the evidence", &m);
    if (rc == AR_OK) {
        if (m.step != step)
            snprintf(why, sizeof why, "the evidence is of step %lld, not %lld", (long long)m.step + 1,
                     (long long)step + 1);
        else if ((rc = ar_audit_replay(&st, &m, ev->seed, &got, got_after)) != AR_OK)
            snprintf(why, sizeof why, "the evidence cannot be replayed: %.300s", ar_last_error());
        ar_audit_material_free(&m);
    } else {
        snprintf(why, sizeof why, "%.380s", ar_last_error());
    }
    ar_stage_destroy(&st);
    if (rc == AR_ENOMEM || rc == AR_EINTERNAL)
        return rc;
    if (why[0])
        return false_audit_claim(s, lease, provider_id, step, why);
    /* the material must be the provider's own: its state and inputs as it
     * committed to them */
    static const char *names[AR_DIGEST_KINDS] = {"state before the step", "activations received",
                                                 "activations produced", "gradients received", "gradients sent"};
    static const int inputs[] = {AR_DIGEST_STATE, AR_DIGEST_ACT_IN, AR_DIGEST_GRAD_IN};
    for (size_t i = 0; i < sizeof inputs / sizeof inputs[0]; i++)
        if (memcmp(got.d[inputs[i]], committed.d[inputs[i]], 32) != 0) {
            snprintf(why, sizeof why, "the evidence's %s are not what the provider committed to", names[inputs[i]]);
            return false_audit_claim(s, lease, provider_id, step, why);
        }
    const char *differs = NULL;
    if (memcmp(got.d[AR_DIGEST_ACT_OUT], committed.d[AR_DIGEST_ACT_OUT], 32) != 0)
        differs = names[AR_DIGEST_ACT_OUT];
    else if (memcmp(got.d[AR_DIGEST_GRAD_OUT], committed.d[AR_DIGEST_GRAD_OUT], 32) != 0)
        differs = names[AR_DIGEST_GRAD_OUT];
    else if (memcmp(got_after, after, 32) != 0)
        differs = "state after the step";
    if (!differs)
        return false_audit_claim(s, lease, provider_id, step, "the replay reproduces every digest the provider "
                                 "committed");
    /* confirmed: the evidence on record is the digests, the provider's and the replay's */
    char ev_text[2048], c_hex[AR_DIGEST_KINDS][65], g_hex[AR_DIGEST_KINDS][65], ca[65], ga[65];
    for (int k = 0; k < AR_DIGEST_KINDS; k++) {
        hex32(committed.d[k], c_hex[k]);
        hex32(got.d[k], g_hex[k]);
    }
    hex32(after, ca);
    hex32(got_after, ga);
    snprintf(ev_text, sizeof ev_text,
             "{\"job\": %lld, \"step\": %lld, \"stage\": %d, \"provider\": %lld, \"differs\": \"%s\", "
             "\"committed\": {\"state\": \"%s\", \"act_in\": \"%s\", \"act_out\": \"%s\", \"grad_in\": \"%s\", "
             "\"grad_out\": \"%s\", \"state_after\": \"%s\"}, \"replayed\": {\"act_out\": \"%s\", \"grad_out\": "
             "\"%s\", \"state_after\": \"%s\"}}",
             (long long)lease->job_id, (long long)step, stage, (long long)provider_id, differs, c_hex[0], c_hex[1],
             c_hex[2], c_hex[3], c_hex[4], ca, g_hex[AR_DIGEST_ACT_OUT], g_hex[AR_DIGEST_GRAD_OUT], ga);
    if ((rc = ar_rules_audit_failed(s, lease, provider_id, step, stage, ev_text, returned)) != AR_OK)
        return rc;
    *confirmed = true;
    return AR_OK;
}

/* ---- paying a step ------------------------------------------------------------------ */

int ar_rules_check_usage(void *unused, const ar_lease_member *members, size_t n_members,
                         const ar_stage_usage *stages, size_t n_stages, int64_t *prices, int64_t *flops)
{
    (void)unused;
    /* a step is done by every stage: paying some of them is paying less */
    if (n_stages != n_members)
        return ar_fail(AR_EINVAL, "the report names %zu stages, the lease's plan has %zu: every stage of a step is "
                       "paid", n_stages, n_members);
    for (size_t i = 0; i < n_stages; i++) {
        const ar_stage_usage *u = &stages[i];
        const ar_lease_member *m = NULL;
        for (size_t j = 0; j < n_members; j++)
            if (members[j].stage == u->stage)
                m = &members[j];
        bool twice = false;
        for (size_t j = 0; j < i; j++)
            twice = twice || stages[j].stage == u->stage || stages[j].provider_id == u->provider_id;
        const char *why = !m                                ? "no such stage in the lease's plan"
                          : m->provider_id != u->provider_id ? "the provider is not the lease's at that stage"
                          : twice                            ? "stage or provider reported twice"
                          : u->flops != 0 && u->flops != m->flops_per_step
                              ? "the FLOPs differ from the lease's plan, which fixes them"
                              : NULL;
        if (why)
            return ar_fail(AR_EINVAL, "stage %d (provider %lld, %lld FLOPs; the plan's: %lld): %s", u->stage,
                           (long long)u->provider_id, (long long)u->flops, m ? (long long)m->flops_per_step : 0LL,
                           why);
        prices[i] = m->price_per_tflop;
        flops[i] = m->flops_per_step;
    }
    return AR_OK;
}

int ar_rules_settle_step(ar_store *s, const ar_lease *lease, int64_t step, const ar_stage_usage *stages,
                         size_t n_stages, bool has_loss, double loss, ar_step_settlement *out)
{
    ar_stage_usage all[AR_MARKET_MAX_DEVICES];
    if (n_stages == 0) {
        /* every member as the lease stands (a replacement between this read
         * and the payment makes the check refuse the report: sent again, it
         * is read again) */
        ar_lease_member *mem = NULL;
        size_t nm = 0;
        int rc = ar_store_lease_members(s, lease->id, &mem, &nm);
        for (size_t i = 0; rc == AR_OK && i < nm && i < AR_MARKET_MAX_DEVICES; i++)
            all[n_stages++] = (ar_stage_usage){.stage = mem[i].stage, .provider_id = mem[i].provider_id};
        ar_free(mem);
        if (rc != AR_OK)
            return rc;
        stages = all;
    }
    ar_step_report r = {.lease_id = lease->id, .step = step, .stages = stages, .n_stages = n_stages,
                        .has_loss = has_loss, .loss = loss};
    return ar_store_step_settle(s, &r, ar_rules_check_usage, NULL, out);
}

/* ---- a lost member ---------------------------------------------------------------- */

/* The lease's members as the renter sees them now: out->members. */
static int members_view(ar_store *s, const ar_lease *lease, ar_market_replacement *out)
{
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    out->n = 0;
    int rc = ar_store_lease_members(s, lease->id, &mem, &nm);
    for (size_t i = 0; rc == AR_OK && i < nm && i < AR_MARKET_MAX_DEVICES; i++) {
        ar_provider p;
        if ((rc = ar_store_provider_get(s, mem[i].provider_id, &p)) == AR_OK &&
            (rc = leased_view(s, &p, &mem[i], &out->members[out->n])) == AR_OK)
            out->n++;
    }
    ar_free(mem);
    return rc;
}

/* The answer to a loss settled before (its answer was lost: the market died
 * after settling, before replying). Asked again with the same kept steps, it
 * is the same answer and nothing is done twice: no second reliability
 * penalty, no second contest, no second replacement. Anything else is
 * refused. */
static int replace_again(ar_store *s, const ar_lease *lease, const char *lease_token, int64_t lost_provider_id,
                         int64_t kept_steps, const ar_lease_member *mem, size_t nm, ar_market_replacement *out)
{
    ar_lease_replacement done;
    int rc = ar_store_lease_replacement(s, lease->id, lost_provider_id, &done);
    if (rc == AR_ENOTFOUND || (rc == AR_OK && done.kept_steps != kept_steps))
        return ar_fail(AR_EINVAL, "provider %lld is not in the lease", (long long)lost_provider_id);
    if (rc != AR_OK)
        return rc;
    const ar_lease_member *now = NULL;
    for (size_t i = 0; i < nm; i++)
        if (mem[i].stage == done.stage && mem[i].provider_id == done.replacement_id)
            now = &mem[i];
    if (done.replacement_id != 0 && !now)
        return ar_fail(AR_ELIMIT, "provider %lld was replaced by provider %lld, which has left the lease since",
                       (long long)lost_provider_id, (long long)done.replacement_id);
    if (now) {
        ar_provider with;
        if ((rc = ar_store_provider_get(s, now->provider_id, &with)) != AR_OK ||
            (rc = leased_view(s, &with, now, &out->replacement)) != AR_OK)
            return rc;
        /* the same ticket as the first answer: it derives from the lease */
        if (lease_token &&
            (rc = ar_store_ticket_issue(s, lease->id, with.id, lease_token, out->replacement.ticket)) != AR_OK)
            return rc;
        out->found = true;
    }
    out->contested = done.contested;
    out->again = true;
    ar_log(AR_LOG_WARN, "market: job %lld asked again about lost provider %lld: answered as before (%s %lld)",
           (long long)lease->job_id, (long long)lost_provider_id, now ? "replaced by provider" : "no replacement",
           (long long)done.replacement_id);
    return AR_OK;
}

/* The members left when member `lost` leaves without a replacement, the
 * model re-split over them (their order kept). n_left 0 when none is left
 * or the model fits them no more (the run then cannot go on). */
static int replan_without(ar_store *s, const ar_lease *lease, const ar_lease_member *mem, size_t nm,
                          const ar_lease_member *lost, ar_lease_member *left, size_t *n_left)
{
    *n_left = 0;
    char *spec = NULL;
    int rc = ar_store_lease_spec(s, lease->id, &spec);
    if (rc != AR_OK)
        return rc;
    ar_market_model model;
    if (!spec) {
        return ar_fail(AR_EINVAL, "lease %lld was made before the market fixed plans: release it and lease again",
                       (long long)lease->id);
    }
    rc = ar_rules_model(spec, lease->mb_rows, lease->micro_batches, lease->schedule, &model);
    free(spec);
    if (rc != AR_OK)
        return rc;
    ar_device devs[AR_MARKET_MAX_DEVICES];
    size_t n = 0;
    for (size_t i = 0; rc == AR_OK && i < nm; i++) {
        if (&mem[i] == lost)
            continue;
        ar_provider p;
        if ((rc = ar_store_provider_get(s, mem[i].provider_id, &p)) != AR_OK)
            break;
        plan_device(&p, &devs[n]);
        left[n++] = (ar_lease_member){.provider_id = mem[i].provider_id, .price_per_tflop = mem[i].price_per_tflop};
    }
    if (rc == AR_OK && n > 0 && n <= (size_t)model.units) {
        rc = ar_rules_split(&model, devs, n, NULL, 0, left);
        if (rc == AR_ELIMIT) {
            ar_log(AR_LOG_WARN, "market: lease %lld: the %zu providers left cannot hold the model: %s",
                   (long long)lease->id, n, ar_last_error());
            n = 0;
            rc = AR_OK;
        }
    }
    ar_rules_model_clear(&model);
    if (rc == AR_OK)
        *n_left = n;
    return rc;
}

/* Settles the loss of member `lost`, confirmed: the best free provider (if
 * any) takes its place; none, the market re-plans over those left. */
static int replace_member(ar_store *s, const ar_market_policy *policy, const ar_lease *lease,
                          const char *lease_token, const ar_lease_member *mem, size_t nm, const ar_lease_member *lost,
                          int64_t kept_steps, const char *reason, ar_market_replacement *out)
{
    ar_provider *ps = NULL;
    ar_ranked *ranked = NULL, best;
    size_t n_free = 0, n_picked = 0, n_left = 0;
    ar_lease_member with = {0}, left[AR_MARKET_MAX_DEVICES];
    int rc = ar_rules_free_providers(s, 0, &ps, &ranked, &n_free, NULL);
    if (rc == AR_OK)
        rc = ar_rules_pick(s, policy, ranked, n_free, 1, &best, &n_picked, NULL);
    if (rc == AR_OK && n_picked > 0) {
        /* its place, its units, its FLOPs: the replacement's own price */
        with = *lost;
        with.provider_id = best.p->id;
        with.price_per_tflop = best.p->price_per_tflop;
        with.verified_step = -1;
        rc = leased_view(s, best.p, &with, &out->replacement);
        out->found = rc == AR_OK;
    } else if (rc == AR_OK) {
        rc = replan_without(s, lease, mem, nm, lost, left, &n_left);
    }
    if (rc == AR_OK)
        rc = ar_store_lease_replace(s, lease->id, lost->provider_id, kept_steps, out->found ? &with : NULL, left,
                                    n_left, &out->contested);
    if (rc == AR_OK && out->found && lease_token)
        rc = ar_store_ticket_issue(s, lease->id, with.provider_id, lease_token, out->replacement.ticket);
    if (rc == AR_OK) {
        char instead[96];
        if (out->found)
            snprintf(instead, sizeof instead, "provider %lld replaces it", (long long)with.provider_id);
        else
            snprintf(instead, sizeof instead, "no free provider to replace it: re-planned over %zu", n_left);
        ar_log(AR_LOG_WARN,
               "market: job %lld lost provider %lld (%.256s), confirmed: marked offline, its account's reliability "
               "lowered, %d of its payments from step %lld on contested; %s",
               (long long)lease->job_id, (long long)lost->provider_id, reason ? reason : "", out->contested,
               (long long)kept_steps + 1, instead);
    }
    ar_free(ranked);
    ar_free(ps);
    return rc;
}

/* Whether the market confirms that provider_id is lost: an audit of it in
 * this job failed, or its worker does not answer the market's own Hello and
 * its heartbeats have stopped. AR_OK and *confirmed, or *confirmed false
 * with out->unconfirmed (not yet) or AR_ELIMIT (false: it answers). */
static int confirm_loss(ar_store *s, const ar_market_policy *policy, const ar_lease *lease, int64_t provider_id,
                        bool *confirmed, ar_market_replacement *out)
{
    *confirmed = false;
    bool failed = false;
    int rc = ar_store_audit_failed(s, lease->job_id, provider_id, &failed);
    if (rc != AR_OK || failed) {
        *confirmed = failed;
        return rc;
    }
    ar_provider p;
    if ((rc = ar_store_provider_get(s, provider_id, &p)) != AR_OK)
        return rc;
    if (policy && policy->probe) {
        /* its own Hello, with the market's deadline (outside every lock) */
        if ((rc = ar_rules_check_reach(s, policy, &p)) != AR_OK)
            return rc;
        if (p.reach == AR_REACH_OK)
            return ar_fail(AR_ELIMIT,
                           "the market reaches provider %lld (its worker at %s answered the market's Hello): the "
                           "loss is not confirmed",
                           (long long)provider_id, p.address);
    }
    double quiet = policy && policy->claim_quiet_s > 0 ? policy->claim_quiet_s : AR_CLAIM_QUIET_S;
    double silent = (double)((int64_t)time(NULL) - p.last_heartbeat);
    if (!p.online || silent >= quiet) {
        *confirmed = true;
        return AR_OK;
    }
    out->unconfirmed = true;
    out->retry_after_s = quiet - silent > 1 ? quiet - silent : 1;
    return AR_OK;
}

int ar_rules_replace(ar_store *s, const ar_market_policy *policy, const ar_lease *lease, const char *lease_token,
                     int64_t lost_provider_id, int64_t kept_steps, const char *reason, ar_market_replacement *out)
{
    memset(out, 0, sizeof *out);
    if (kept_steps < 0)
        return ar_fail(AR_EINVAL, "kept steps %lld below zero", (long long)kept_steps);
    ar_account renter;
    int rc = ar_store_account_get(s, lease->renter_id, &renter);
    if (rc != AR_OK)
        return rc;
    if (renter.false_claims >= AR_MAX_FALSE_CLAIMS)
        return ar_fail(AR_ELIMIT, "account %s has made %lld loss claims the market found false: it may make no "
                       "more (ask the market's operator)", renter.name, (long long)renter.false_claims);
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    if ((rc = ar_store_lease_members(s, lease->id, &mem, &nm)) != AR_OK)
        return rc;
    bool member = false;
    for (size_t i = 0; i < nm; i++)
        member = member || mem[i].provider_id == lost_provider_id;
    ar_free(mem);
    mem = NULL;
    /* the claim is checked before anything moves (a claim asked again
     * after it was settled is answered as before, without a check) */
    bool confirmed = false;
    if (member && (rc = confirm_loss(s, policy, lease, lost_provider_id, &confirmed, out)) != AR_OK) {
        if (rc == AR_ELIMIT) {
            char why[600];
            snprintf(why, sizeof why, "%s", ar_last_error());
            int crc = ar_store_account_claim(s, lease->renter_id, false);
            ar_log(AR_LOG_WARN, "market: job %lld: %s's claim that provider %lld is lost refused: %s", (long long)lease->job_id,
                   renter.name, (long long)lost_provider_id, why);
            if (crc != AR_OK)
                return crc;
            rc = ar_fail(AR_ELIMIT, "%s; nothing was reversed, and account %s has made %lld false claims (at %d it may "
                         "make no more claims or leases)", why, renter.name, (long long)renter.false_claims + 1,
                         AR_MAX_FALSE_CLAIMS);
        }
        return rc;
    }
    if (member && !confirmed) {
        ar_log(AR_LOG_INFO, "market: job %lld: provider %lld does not answer but still sends heartbeats: the loss "
               "is not confirmed yet", (long long)lease->job_id, (long long)lost_provider_id);
        return AR_OK;
    }
    /* choosing the replacement and leasing it is one step, as in acquire */
    pthread_mutex_lock(&choose_mu);
    rc = ar_store_lease_members(s, lease->id, &mem, &nm);
    const ar_lease_member *lost = NULL;
    for (size_t i = 0; rc == AR_OK && i < nm; i++)
        if (mem[i].provider_id == lost_provider_id)
            lost = &mem[i];
    if (rc == AR_OK && member && !lost) /* settled by a call at the same time */
        member = false;
    if (rc == AR_OK)
        rc = lost && member ? replace_member(s, policy, lease, lease_token, mem, nm, lost, kept_steps, reason, out)
                            : replace_again(s, lease, lease_token, lost_provider_id, kept_steps, mem, nm, out);
    pthread_mutex_unlock(&choose_mu);
    ar_free(mem);
    if (rc == AR_OK)
        rc = members_view(s, lease, out);
    ar_job job;
    if (rc == AR_OK && (rc = ar_store_job_get(s, lease->job_id, &job)) == AR_OK) {
        out->spent = job.spent;
        ar_store_job_clear(&job);
    }
    return rc;
}

/* ---- a graceful leave ----------------------------------------------------------------- */

/* The answer to a hand-over made before (its answer was lost): the same
 * replacement and ticket, nothing done twice. */
static int hand_over_again(ar_store *s, const ar_lease *lease, const char *lease_token, int64_t leaver_id,
                           const ar_lease_member *mem, size_t nm, ar_market_handover *out)
{
    ar_lease_handover done;
    int rc = ar_store_lease_handover(s, lease->id, leaver_id, &done);
    if (rc == AR_ENOTFOUND)
        return ar_fail(AR_EINVAL, "provider %lld is not in the lease", (long long)leaver_id);
    if (rc != AR_OK)
        return rc;
    const ar_lease_member *now = NULL;
    for (size_t i = 0; i < nm; i++)
        if (mem[i].stage == done.stage && mem[i].provider_id == done.replacement_id)
            now = &mem[i];
    if (!now)
        return ar_fail(AR_ELIMIT, "provider %lld handed its place over to provider %lld, which has left the lease "
                       "since", (long long)leaver_id, (long long)done.replacement_id);
    ar_provider with;
    if ((rc = ar_store_provider_get(s, now->provider_id, &with)) != AR_OK ||
        (rc = leased_view(s, &with, now, &out->replacement)) != AR_OK)
        return rc;
    if (lease_token &&
        (rc = ar_store_ticket_issue(s, lease->id, with.id, lease_token, out->replacement.ticket)) != AR_OK)
        return rc;
    out->found = true;
    out->again = true;
    return AR_OK;
}

/* The best free provider with min_mem takes member `leaver`'s place. */
static int hand_over_member(ar_store *s, const ar_market_policy *policy, const ar_lease *lease,
                            const char *lease_token, const ar_lease_member *leaver, int64_t step, int64_t min_mem,
                            ar_market_handover *out)
{
    ar_provider p;
    int rc = ar_store_provider_get(s, leaver->provider_id, &p);
    if (rc != AR_OK)
        return rc;
    /* checked here for a clear refusal, and again in the store's transaction */
    if (!p.leaving_since)
        return ar_fail(AR_ELIMIT, "provider %lld has not said it is leaving: a member that stopped answering "
                       "is a loss (ReplaceProvider)", (long long)leaver->provider_id);
    ar_provider *ps = NULL;
    ar_ranked *ranked = NULL, best;
    size_t n_free = 0, n_picked = 0;
    rc = ar_rules_free_providers(s, min_mem, &ps, &ranked, &n_free, NULL);
    if (rc == AR_OK)
        rc = ar_rules_pick(s, policy, ranked, n_free, 1, &best, &n_picked, NULL);
    if (rc == AR_OK && n_picked > 0) {
        /* its place, its units, its FLOPs: the replacement's own price */
        ar_lease_member with = *leaver;
        with.provider_id = best.p->id;
        with.price_per_tflop = best.p->price_per_tflop;
        with.verified_step = -1;
        rc = leased_view(s, best.p, &with, &out->replacement);
        if (rc == AR_OK)
            rc = ar_store_lease_hand_over(s, lease->id, leaver->provider_id, step, &with);
        if (rc == AR_OK && lease_token)
            rc = ar_store_ticket_issue(s, lease->id, with.provider_id, lease_token, out->replacement.ticket);
        out->found = rc == AR_OK;
    }
    if (rc == AR_OK && out->found)
        ar_log(AR_LOG_INFO, "market: job %lld: provider %lld leaves gracefully after %lld steps, provider %lld "
               "takes its place (nothing reversed)", (long long)lease->job_id, (long long)leaver->provider_id,
               (long long)step, (long long)out->replacement.p.id);
    else if (rc == AR_OK)
        ar_log(AR_LOG_INFO, "market: job %lld: provider %lld is leaving after %lld steps, and no free provider "
               "can take its place", (long long)lease->job_id, (long long)leaver->provider_id, (long long)step);
    ar_free(ranked);
    ar_free(ps);
    return rc;
}

int ar_rules_hand_over(ar_store *s, const ar_market_policy *policy, const ar_lease *lease, const char *lease_token,
                       int64_t provider_id, int64_t step, int64_t min_mem, ar_market_handover *out)
{
    memset(out, 0, sizeof *out);
    if (step < 0 || min_mem < 0)
        return ar_fail(AR_EINVAL, "step %lld or memory %lld below zero", (long long)step, (long long)min_mem);
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    /* choosing the replacement and leasing it is one step, as in acquire */
    pthread_mutex_lock(&choose_mu);
    int rc = ar_store_lease_members(s, lease->id, &mem, &nm);
    const ar_lease_member *leaver = NULL;
    for (size_t i = 0; rc == AR_OK && i < nm; i++)
        if (mem[i].provider_id == provider_id)
            leaver = &mem[i];
    if (rc == AR_OK)
        rc = leaver ? hand_over_member(s, policy, lease, lease_token, leaver, step, min_mem, out)
                    : hand_over_again(s, lease, lease_token, provider_id, mem, nm, out);
    pthread_mutex_unlock(&choose_mu);
    ar_free(mem);
    ar_job job;
    if (rc == AR_OK && (rc = ar_store_job_get(s, lease->job_id, &job)) == AR_OK) {
        out->spent = job.spent;
        ar_store_job_clear(&job);
    }
    return rc;
}

/* ---- providers and progress --------------------------------------------------------- */

int ar_rules_register_provider(ar_store *s, const ar_provider *p, int64_t *id_out)
{
    /* reliability is the account's record: nothing here touches it */
    int rc = ar_store_provider_register(s, p, id_out);
    if (rc != AR_OK)
        return rc;
    ar_log(AR_LOG_INFO, "market: provider %lld at %s registered (%.1f GFLOP/s claimed, %d cores)", (long long)*id_out,
           p->address, p->gflops, p->cores);
    return AR_OK;
}

/* One stage's busy time since the last report as an observation of the
 * speed of the member at that stage. */
static int observe_stage(ar_store *s, const ar_lease *lease, const ar_lease_member *m, const ar_stage_time *t,
                         int64_t step)
{
    ar_stage_sample now = {.provider_id = m->provider_id, .step = step, .busy_s = t->busy_s, .wall_s = t->wall_s},
                    prev;
    bool had = false;
    int rc = ar_store_stage_sample_swap(s, lease->id, m->stage, &now, &prev, &had);
    /* the same member since the last sample, steps forward, busy time that
     * fits in the wall time: anything else starts the count again (a
     * replacement, a rollback, a new driver) */
    if (rc != AR_OK || !had || prev.provider_id != m->provider_id || now.step <= prev.step ||
        now.busy_s <= prev.busy_s || now.wall_s < prev.wall_s)
        return rc;
    double busy = now.busy_s - prev.busy_s, wall = now.wall_s - prev.wall_s;
    if (busy > wall * 1.01 + 1e-3)
        return AR_OK;
    ar_provider p;
    if ((rc = ar_store_provider_get(s, m->provider_id, &p)) != AR_OK)
        return rc;
    /* a renter's word about its own providers proves nothing */
    if (p.account_id == lease->renter_id)
        return AR_OK;
    double flops = (double)m->flops_per_step * (double)(now.step - prev.step);
    return ar_store_provider_observe(s, p.id, flops, busy, busy * p.gflops * 1e9);
}

int ar_rules_report_progress(ar_store *s, const ar_lease *lease, const ar_market_progress_report *r)
{
    ar_job_live live = r->live;
    live.plan = NULL;
    if (r->plan && !(live.plan = ar_dashboard_plan_json(r->plan)))
        return ar_fail(AR_ENOMEM, "out of memory for the plan");
    int rc = ar_store_job_live_set(s, lease->job_id, &live, r->times, r->n_times);
    if (rc == AR_OK && r->has_val)
        rc = ar_store_job_val_record(s, lease->job_id, r->val_step, r->val_loss);
    free(live.plan);
    if (rc != AR_OK || r->n_times == 0)
        return rc;
    /* what the renter's driver saw of each stage's speed */
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    if ((rc = ar_store_lease_members(s, lease->id, &mem, &nm)) != AR_OK)
        return rc;
    for (size_t i = 0; rc == AR_OK && i < r->n_times; i++)
        for (size_t j = 0; rc == AR_OK && j < nm; j++)
            if (mem[j].stage == r->times[i].stage && mem[j].flops_per_step > 0)
                rc = observe_stage(s, lease, &mem[j], &r->times[i], r->live.step);
    ar_free(mem);
    return rc;
}

int ar_rules_sha256_hex(const char *text, char out[AR_TOKEN_LEN])
{
    unsigned char md[SHA256_DIGEST_LENGTH];
    if (!SHA256((const unsigned char *)text, strlen(text), md))
        return ar_fail(AR_EINTERNAL, "sha256 failed");
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
    return AR_OK;
}

/* ---- admitting a provider ---------------------------------------------------------- */

/* Why an IPv4 address (4 bytes, network order) may not be a worker's. */
static const char *ipv4_refusal(const unsigned char *a, bool allow_loopback)
{
    if (a[0] == 0)
        return "unspecified"; /* 0.0.0.0/8: "this host" */
    if (a[0] == 127)
        return allow_loopback ? NULL : "loopback";
    if (a[0] == 169 && a[1] == 254)
        return "link-local"; /* where cloud metadata services live (169.254.169.254) */
    if (a[0] >= 224 && a[0] <= 239)
        return "multicast";
    if (a[0] >= 240)
        return "reserved"; /* 240/4 and the broadcast address */
    return NULL;
}

const char *ar_rules_ip_refusal(int family, const unsigned char *a, bool allow_loopback)
{
    if (family == AF_INET)
        return ipv4_refusal(a, allow_loopback);
    if (family != AF_INET6)
        return "not an IP address";
    static const unsigned char zero[16], loopback[15], mapped[12] = {[10] = 0xff, [11] = 0xff},
                                                        nat64[12] = {0x00, 0x64, 0xff, 0x9b},
                                                        aws_metadata[16] = {0xfd, 0x00, 0x0e, 0xc2, [14] = 0x02, [15] = 0x54};
    /* an IPv4 address written as IPv6 (::ffff:a.b.c.d, 64:ff9b::a.b.c.d)
     * goes where the IPv4 address goes */
    if (!memcmp(a, mapped, 12) || !memcmp(a, nat64, 12))
        return ipv4_refusal(a + 12, allow_loopback);
    if (!memcmp(a, zero, 16))
        return "unspecified";
    if (!memcmp(a, loopback, 15) && a[15] == 1)
        return allow_loopback ? NULL : "loopback";
    if (a[0] == 0xfe && (a[1] & 0xc0) == 0x80)
        return "link-local"; /* fe80::/10 */
    if (a[0] == 0xff)
        return "multicast";
    if (!memcmp(a, aws_metadata, 16))
        return "a cloud metadata address"; /* fd00:ec2::254 */
    return NULL;
}

/* HOST and PORT of "HOST:PORT" or "[IPV6]:PORT" into host (brackets
 * dropped) and *port; false with the reason in why. */
static bool split_hostport(const char *address, char *host, size_t host_size, long *port, char *why,
                           size_t why_size)
{
    const char *colon = strrchr(address, ':');
    if (!colon || colon == address || !colon[1]) {
        snprintf(why, why_size, "worker address \"%.64s\" is not HOST:PORT", address);
        return false;
    }
    const char *h = address;
    size_t hl = (size_t)(colon - address);
    if (h[0] == '[') {
        if (hl < 2 || h[hl - 1] != ']') {
            snprintf(why, why_size, "worker address \"%.64s\": unterminated [IPv6] host", address);
            return false;
        }
        h++;
        hl -= 2;
    } else if (memchr(h, ':', hl)) {
        snprintf(why, why_size, "worker address \"%.64s\": an IPv6 host goes in brackets, [HOST]:PORT", address);
        return false;
    }
    if (hl == 0 || hl >= host_size) {
        snprintf(why, why_size, "worker address \"%.64s\": the host is empty or too long", address);
        return false;
    }
    memcpy(host, h, hl);
    host[hl] = '\0';
    char *end = NULL;
    *port = strtol(colon + 1, &end, 10);
    if (!isdigit((unsigned char)colon[1]) || *end || *port < 0 || *port > 65535) {
        snprintf(why, why_size, "worker address \"%.64s\": the port is not a number in 1..65535", address);
        return false;
    }
    return true;
}

/* Every address `host` stands for (a literal, or what the name resolves
 * to), each passed to `visit` until it returns false. AR_EINVAL when the
 * host does not resolve. */
static int each_address(const char *host, bool (*visit)(void *ctx, int family, const unsigned char *a), void *ctx,
                        char *why, size_t why_size)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int g = getaddrinfo(host, NULL, &hints, &res);
    if (g != 0 || !res) {
        snprintf(why, why_size, "worker host \"%.64s\" does not resolve: %s", host, g ? gai_strerror(g) : "no address");
        return AR_EINVAL;
    }
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        const unsigned char *a = NULL;
        if (ai->ai_family == AF_INET)
            a = (const unsigned char *)&((const struct sockaddr_in *)(const void *)ai->ai_addr)->sin_addr;
        else if (ai->ai_family == AF_INET6)
            a = (const unsigned char *)&((const struct sockaddr_in6 *)(const void *)ai->ai_addr)->sin6_addr;
        if (a && !visit(ctx, ai->ai_family, a))
            break;
    }
    freeaddrinfo(res);
    return AR_OK;
}

typedef struct {
    bool allow_loopback;
    const char *refusal; /* the first address refused, and why */
    char text[INET6_ADDRSTRLEN];
    size_t count, loopback;
} address_visit;

static bool judge_address(void *ctx, int family, const unsigned char *a)
{
    address_visit *v = ctx;
    v->count++;
    if (ar_rules_ip_refusal(family, a, false) && !ar_rules_ip_refusal(family, a, true))
        v->loopback++;
    const char *why = ar_rules_ip_refusal(family, a, v->allow_loopback);
    if (!why)
        return true;
    v->refusal = why;
    if (!inet_ntop(family, a, v->text, sizeof v->text))
        snprintf(v->text, sizeof v->text, "?");
    return false;
}

int ar_rules_check_address(const char *address, bool allow_loopback, char *why, size_t why_size)
{
    char host[AR_ADDR_MAX];
    long port = 0;
    if (!address || strlen(address) >= AR_ADDR_MAX) {
        snprintf(why, why_size, "worker address must be 1..%d characters", AR_ADDR_MAX - 1);
        return AR_EINVAL;
    }
    if (!split_hostport(address, host, sizeof host, &port, why, why_size))
        return AR_EINVAL;
    if (port < AR_MARKET_MIN_PORT) {
        snprintf(why, why_size, "worker address \"%.64s\": port %ld is a system service's (a worker's port is %d..65535)",
                 address, port, AR_MARKET_MIN_PORT);
        return AR_EINVAL;
    }
    /* every address the name stands for: a renter's driver may dial any */
    address_visit v = {.allow_loopback = allow_loopback};
    if (each_address(host, judge_address, &v, why, why_size) != AR_OK)
        return AR_EINVAL;
    if (v.refusal) {
        snprintf(why, why_size, "worker address \"%.64s\" is %s (%s): renters' drivers cannot be sent there%s",
                 address, v.refusal, v.text,
                 !strcmp(v.refusal, "loopback") ? " (a loopback worker is for a market on loopback)" : "");
        return AR_EINVAL;
    }
    return AR_OK;
}

bool ar_rules_host_is_loopback(const char *hostport)
{
    char host[AR_ADDR_MAX], why[160];
    long port = 0;
    if (!hostport || strlen(hostport) >= AR_ADDR_MAX || !split_hostport(hostport, host, sizeof host, &port, why, sizeof why))
        return false;
    address_visit v = {.allow_loopback = true};
    return each_address(host, judge_address, &v, why, sizeof why) == AR_OK && v.count > 0 && v.loopback == v.count;
}

int ar_rules_admit_provider(ar_store *s, const ar_market_policy *policy, const ar_provider *p, int64_t *id_out,
                            ar_reach *reach_out)
{
    char why[300];
    bool allow_loopback = policy && policy->allow_loopback;
    if (ar_rules_check_address(p->address, allow_loopback, why, sizeof why) != AR_OK)
        return ar_fail(AR_EINVAL, "%s", why);
    int max = policy && policy->max_providers_per_account > 0 ? policy->max_providers_per_account
                                                               : AR_MARKET_DEFAULT_MAX_PROVIDERS;
    /* the count and the new row are one step for this process: two
     * registrations at once cannot both take the last place */
    pthread_mutex_lock(&choose_mu);
    ar_provider *all = NULL;
    size_t n = 0;
    int64_t mine = 0;
    bool again = false;
    int rc = ar_store_provider_list(s, false, &all, &n);
    for (size_t i = 0; rc == AR_OK && i < n; i++)
        if (all[i].account_id == p->account_id) {
            mine++;
            again = again || strcmp(all[i].address, p->address) == 0;
        }
    ar_free(all);
    if (rc == AR_OK && !again && mine >= max)
        rc = ar_fail(AR_ELIMIT,
                     "this account has %lld providers registered, the market's limit: re-register one of their "
                     "addresses, or ask the market's operator (arceus market --max-providers-per-account)",
                     (long long)mine);
    int64_t id = 0;
    if (rc == AR_OK)
        rc = ar_rules_register_provider(s, p, &id);
    pthread_mutex_unlock(&choose_mu);
    ar_provider q;
    if (rc == AR_OK)
        rc = ar_store_provider_get(s, id, &q);
    /* a registration is the worker saying it is there: check it now, whatever
     * the last check found (the probe is outside the lock: it may take its
     * whole deadline) */
    if (rc == AR_OK)
        rc = ar_rules_check_reach(s, policy, &q);
    if (rc != AR_OK)
        return rc;
    *id_out = id;
    if (reach_out)
        *reach_out = q.reach;
    return AR_OK;
}

int ar_rules_check_ticket(ar_store *s, int64_t provider_id, const char *ticket, ar_market_ticket_check *out)
{
    memset(out, 0, sizeof *out);
    int64_t lease_id = 0, holder = 0;
    int rc = ar_store_ticket_auth(s, ticket, &lease_id, &holder);
    if (rc != AR_OK)
        return rc;
    /* a ticket opens one provider's worker: another's is refused even by a
     * worker of the same account */
    if (holder != provider_id)
        return ar_fail(AR_EINVAL, "the ticket is provider %lld's, not provider %lld's", (long long)holder,
                       (long long)provider_id);
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    if ((rc = ar_store_lease_get(s, lease_id, &out->lease)) != AR_OK ||
        (rc = ar_store_lease_members(s, lease_id, &mem, &nm)) != AR_OK)
        return rc;
    for (size_t i = 0; i < nm && i < AR_MARKET_MAX_DEVICES && rc == AR_OK; i++) {
        ar_provider p;
        if ((rc = ar_store_provider_get(s, mem[i].provider_id, &p)) == AR_OK)
            snprintf(out->addresses[out->n++], sizeof out->addresses[0], "%s", p.address);
        if (mem[i].provider_id == provider_id) {
            out->first_unit = mem[i].first_unit;
            out->last_unit = mem[i].last_unit;
        }
    }
    ar_free(mem);
    /* what it is paid to hold: its units of this model */
    char *spec = NULL;
    if (rc == AR_OK && out->lease.has_plan && (rc = ar_store_lease_spec(s, lease_id, &spec)) == AR_OK && spec) {
        rc = ar_rules_sha256_hex(spec, out->spec_sha256);
        out->has_plan = rc == AR_OK;
        out->mb_rows = out->lease.mb_rows;
        out->micro_batches = out->lease.micro_batches;
    }
    free(spec);
    return rc;
}
