/* A run's lease at the market (driver_internal.h): leasing providers, paying
 * each step (queued while the market is away), the dashboard's progress
 * reports, a replacement for a lost provider, and releasing the lease. */
#include "run/driver_internal.h"

#include "market/money.h"
#include "net/relay.h"
#include "run/market_plan.h"
#include "train/schedule.h"

#include <errno.h>
#include <unistd.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* FLOPs per step of every stage of the plan, as the lease fixed them, and
 * the cost of one step at the leased prices, rounded per stage as the
 * market pays it. The market computed them from the model with the same
 * rule as this driver (ar_plan_stage_flops): a lease that prices a stage
 * otherwise is not run. */
int driver_price_stages(run *r)
{
    int units = ar_spec_units(&r->spec);
    ar_unit_cost *costs = ar_calloc((size_t)units, sizeof *costs);
    if (!costs)
        return AR_ENOMEM;
    int rc = ar_plan_unit_costs(&r->spec, r->rows_per_mb, costs);
    r->step_cost = 0;
    for (int i = 0; rc == AR_OK && i < r->S; i++) {
        int64_t mine = 0, cost;
        if ((rc = ar_plan_stage_flops(costs, units, r->plan.first[i], r->plan.last[i], r->M, &mine)) != AR_OK)
            break;
        r->stage_flops[i] = r->lease.providers[i].flops_per_step;
        if (r->stage_flops[i] != mine) {
            rc = ar_fail(AR_EPROTO, "market %s prices stage %d (provider %lld) at %lld FLOPs per step; this model's "
                         "units %d-%d take %lld", r->c->market, i, (long long)r->provider_ids[i],
                         (long long)r->stage_flops[i], r->plan.first[i], r->plan.last[i] - 1, (long long)mine);
            break;
        }
        if ((rc = ar_flops_cost(r->stage_flops[i], r->prices[i], &cost)) == AR_OK)
            r->step_cost += cost;
    }
    ar_free(costs);
    return rc;
}

/* The plan of a lease: stage i holds the units the market fixed for
 * member i, on device i. */
int driver_lease_plan(run *r, ar_plan *out)
{
    int units = ar_spec_units(&r->spec);
    memset(out, 0, sizeof *out);
    if (r->S < 1 || (size_t)r->S != r->lease.n)
        return ar_fail(AR_EPROTO, "market %s: the lease has %zu members for %d stages", r->c->market, r->lease.n,
                       r->S);
    for (int i = 0; i < r->S; i++) {
        const ar_market_leased *l = &r->lease.providers[i];
        if (l->first_unit != (i ? out->last[i - 1] : 0) || l->last_unit <= l->first_unit || l->last_unit > units)
            return ar_fail(AR_EPROTO, "market %s: the lease gives stage %d units %d-%d of a model of %d, not a "
                           "contiguous split", r->c->market, i, l->first_unit, l->last_unit - 1, units);
        out->device[i] = i;
        out->first[i] = l->first_unit;
        out->last[i] = l->last_unit;
        out->group_size[i] = 1;
        out->group[i][0] = i;
    }
    if (out->last[r->S - 1] != units)
        return ar_fail(AR_EPROTO, "market %s: the lease covers %d of the model's %d units", r->c->market,
                       out->last[r->S - 1], units);
    out->nstages = r->S;
    return AR_OK;
}

/* A hand --plan with --market: the renter's split, sent with the lease. */
static int hand_split(const run *r, uint32_t *units_out, size_t *n)
{
    const char *text = r->c->plan;
    *n = 0;
    if (!text || !strcmp(text, "auto"))
        return AR_OK;
    if (strchr(text, '@') || strchr(text, '~'))
        return ar_fail(AR_EINVAL, "--plan %s: with --market a plan gives each leased provider's units (\"0-1,2,3\"), "
                       "no devices or groups", text);
    ar_plan p;
    int rc = ar_plan_parse(text, ar_spec_units(&r->spec), AR_PLAN_MAX_STAGES, &p);
    if (rc != AR_OK)
        return rc;
    if (p.nstages != r->c->devices)
        return ar_fail(AR_EINVAL, "--plan %s has %d stages for --devices %d: one stage per leased provider", text,
                       p.nstages, r->c->devices);
    for (int i = 0; i < p.nstages; i++)
        units_out[i] = (uint32_t)(p.last[i] - p.first[i]);
    *n = (size_t)p.nstages;
    return AR_OK;
}

/* A leased provider's address, as the market gave it: the driver dials it,
 * so it must be one the market itself would admit (market/rules.h), whoever
 * answers for the market. */
static int check_leased_address(const run *r, const ar_market_leased *l)
{
    char why[300];
    if (ar_rules_check_address(l->p.address, ar_rules_host_is_loopback(r->c->market), why, sizeof why) != AR_OK)
        return ar_fail(AR_EPROTO, "market %s: provider %lld: %s", r->c->market, (long long)l->p.id, why);
    return AR_OK;
}

/* Ask the market for c->devices providers; their addresses become the
 * workers. Printed before the plan: who, at what price, the estimate. */
int driver_acquire_lease(run *r, long start_step, int64_t resume_job)
{
    ar_train_config *c = r->c;
    if (c->remote_workers || c->stages > 1)
        return ar_fail(AR_EINVAL, "--market leases the workers: drop --workers");
    if (c->devices < 1 || c->devices > AR_MARKET_MAX_DEVICES)
        return ar_fail(AR_EINVAL, "--devices %d out of range 1..%d", c->devices, AR_MARKET_MAX_DEVICES);
    if (!c->token || !c->token[0])
        return ar_fail(AR_EINVAL, "--market needs --token T (arceus market add-account prints one)");
    int units = ar_spec_units(&r->spec);
    ar_unit_cost *costs = ar_calloc((size_t)units, sizeof *costs);
    if (!costs)
        return AR_ENOMEM;
    int rc = ar_plan_unit_costs(&r->spec, r->rows_per_mb, costs);
    double flops = 0;
    for (int u = 0; u < units; u++)
        flops += costs[u].flops;
    ar_free(costs);
    if (rc != AR_OK)
        return rc;
    flops *= r->M;
    if ((rc = ar_client_open(c->market, &r->market)) != AR_OK)
        return ar_fail(rc, "market %s: %s", c->market, ar_last_error());
    char spec[200];
    snprintf(spec, sizeof spec, "%s %s, %ld parameters, batch %d, %ld steps",
             r->spec.type == AR_MODEL_GPT ? "gpt" : "mlp", c->model_path ? c->model_path : c->resume_dir,
             ar_spec_param_count(&r->spec), r->B, c->steps);
    uint32_t split[AR_PLAN_MAX_STAGES];
    size_t n_split = 0;
    if ((rc = hand_split(r, split, &n_split)) != AR_OK)
        return rc;
    /* the market prices the work from the model itself */
    char *model = ar_spec_to_json(&r->spec);
    if (!model)
        return ar_fail(AR_ENOMEM, "out of memory for the model spec");
    ar_market_lease_request q = {.devices = (uint32_t)c->devices, .max_credits = c->max_credits,
                                 .est_steps = c->steps - start_step, .spec = spec,
                                 .flops_per_step = (int64_t)llround(flops),
                                 .resume_job = resume_job, .kept_steps = start_step,
                                 .model_spec = model, .mb_rows = r->rows_per_mb, .micro_batches = r->M,
                                 .schedule = c->schedule, .stage_units = split, .n_stage_units = n_split};
    int status = 0;
    rc = ar_market_acquire(r->market, c->token, &q, &r->lease, &status);
    free(model);
    if (rc != AR_OK)
        return ar_fail(rc, "market %s: no lease: %s", c->market, ar_last_error());
    if ((rc = ar_reporter_start(&r->reporter, c->market, r->lease.token, 0, MARKET_RETRY_S)) != AR_OK) {
        /* the lease is the market's until released: release it now */
        int64_t spent;
        ar_market_release(r->market, r->lease.token, "failed", start_step, &spent, &status);
        return rc;
    }
    r->leased = 1;
    r->remote = 1;
    r->S = (int)r->lease.n;
    for (int i = 0; i < r->S; i++) {
        const ar_market_leased *l = &r->lease.providers[i];
        size_t n = strnlen(l->p.address, sizeof l->p.address);
        if (n == 0 || n >= sizeof r->addrs[i])
            return ar_fail(AR_EPROTO, "market %s: provider %lld has an address of %zu characters",
                           c->market, (long long)l->p.id, n);
        if ((rc = check_leased_address(r, l)) != AR_OK)
            return rc;
        memcpy(r->addrs[i], l->p.address, n + 1); /* (snprintf trips gcc's restrict check here) */
        r->provider_ids[i] = l->p.id;
        memcpy(r->tickets[i], l->ticket, sizeof r->tickets[i]);
        memcpy(r->relays[i], l->relay, sizeof r->relays[i]);
        memcpy(r->passes[i], l->relay_pass, sizeof r->passes[i]);
        r->prices[i] = l->p.price_per_tflop;
        /* what the market planned with: its estimate of the speed */
        r->offers[i].gflops = l->speed_gflops > 0 ? l->speed_gflops : l->p.gflops;
        r->offers[i].mem_bytes = (double)l->p.mem_bytes;
        r->offers[i].known = 1;
    }
    if (!c->quiet) {
        char a[40], b[40];
        printf("lease %lld for job %lld from market %s: %d provider%s, estimate %s credits for %ld steps%s%s\n",
               (long long)r->lease.lease_id, (long long)r->lease.job_id, c->market, r->S, r->S == 1 ? "" : "s",
               ar_credits_text(r->lease.estimate, a, sizeof a), c->steps - start_step,
               c->max_credits > 0 ? ", max " : "", c->max_credits > 0 ? ar_credits_text(c->max_credits, b, sizeof b) : "");
        for (int i = 0; i < r->S; i++) {
            const ar_market_leased *l = &r->lease.providers[i];
            printf("  provider %lld (%s) at %s%s%s: %.1f GFLOP/s, %.0f MiB, %s credits/TFLOP, reliability %.2f; "
                   "%.1f GFLOP/s observed; units %d-%d, %lld FLOPs per step\n",
                   (long long)l->p.id, l->account, l->p.address, l->relay[0] ? " through relay " : "", l->relay,
                   l->p.gflops, l->p.mem_bytes / 1048576.0, ar_credits_text(l->p.price_per_tflop, a, sizeof a),
                   l->p.reliability, l->speed_gflops, l->first_unit, l->last_unit - 1, (long long)l->flops_per_step);
        }
        fflush(stdout);
    }
    return AR_OK;
}

/* Queue step `step` (0-based), just completed, for payment: each stage's
 * provider and FLOPs; its loss goes with it (the job's loss curve at the
 * market). The reporter's thread sends it. */
int driver_queue_usage(run *r, long step, const ar_step_result *res)
{
    double loss = res->loss;
    ar_market_stage_usage u[64];
    _Static_assert(sizeof res->digests[0] == AR_STAGE_DIGEST_BYTES, "a stage's digests are what the market keeps");
    for (int i = 0; i < r->S; i++) {
        u[i] = (ar_market_stage_usage){.stage = i, .provider_id = r->provider_ids[i], .flops = r->stage_flops[i]};
        /* what the stage committed travels with its payment (NORM records
         * come in pipeline order, one per stage) */
        if (i < res->nstages && res->has_digests[i]) {
            u[i].has_digests = true;
            memcpy(u[i].digests, &res->digests[i], AR_STAGE_DIGEST_BYTES);
        }
    }
    return ar_reporter_push_step(&r->reporter, step, loss, u, (size_t)r->S);
}

/* Tell the market how the run goes, for its dashboard: throughput, ETA, a
 * new validation loss, each stage's busy and idle time, and the plan until
 * the market has it. Every PROGRESS_EVERY_S at most, besides at the last
 * step and after an evaluation; never while the market is unreachable.
 * Nothing is paid by it, so a failure costs a warning, not the run. */
/* how often the plan goes again with its links' traffic */
#define TRAFFIC_EVERY_S 10.0

void driver_report_progress(run *r, long step, double rate, double elapsed, long start)
{
    ar_train_config *c = r->c;
    if (!r->leased)
        return;
    int outage = 0, off = 0;
    long plan_sent = 0, nval_sent = 0;
    ar_reporter_state(&r->reporter, NULL, NULL, &outage, &plan_sent, &nval_sent, &off);
    int last = step + 1 == c->steps;
    if (outage || off || (ar_now() < r->progress_at && r->nval <= r->nval_queued && !last))
        return;
    r->progress_at = ar_now() + PROGRESS_EVERY_S;
    /* what the market has not confirmed goes again: this report replaces
     * any the reporter has not sent yet */
    int with_val = r->nval > nval_sent;
    /* the plan goes again now and then with what its links have moved
     * (its first report has none yet) */
    if (plan_sent == r->plan_gen && r->edge_steps > 0 && ar_now() >= r->traffic_sent_at + TRAFFIC_EVERY_S)
        r->plan_gen++;
    int with_plan = plan_sent != r->plan_gen;
    long done = step + 1 - start;
    ar_market_progress p = {.step = step + 1, .total_steps = c->steps, .items_per_s = rate,
                            .unit = r->data.is_text ? "tokens" : "samples",
                            .eta_s = done > 0 ? elapsed / (double)done * (double)(c->steps - step - 1) : 0,
                            .has_val = with_val, .wall_s = r->step_wall, .n_stages = (size_t)r->S,
                            .busy_s = r->busy, .idle_s = r->idle};
    if (with_val) {
        p.val_step = (int64_t)r->val_x[r->nval - 1];
        p.val_loss = r->val_y[r->nval - 1];
    }
    ar_market_plan_stage stages[AR_PLAN_MAX_STAGES];
    char layers[AR_PLAN_MAX_STAGES][AR_LAYERS_TEXT_MAX], model[96];
    char (*shares)[AR_PLAN_SHARE_TEXT] = NULL; /* a group member's share in words; 80 KB at most */
    ar_market_plan_link links[AR_PLAN_MAX_STAGES];
    char link_names[AR_PLAN_MAX_STAGES][2][AR_PLAN_LINK_NAME];
    if (with_plan && (shares = calloc(AR_PLAN_MAX_STAGES * AR_PLAN_MAX_GROUP, sizeof *shares))) {
        ar_market_plan_fill(&r->plan, r->devs, &r->spec, &r->lease, stages, layers, shares);
        /* stage s is held by device s once the run is set up (setup_remote) */
        for (int s = 0; s < r->plan.nstages && s < r->S; s++)
            stages[s].members[0].relayed = r->relays[s][0] != '\0' && !driver_edge_reversed(r, s);
        snprintf(model, sizeof model, "%s, %ld parameters", r->spec.type == AR_MODEL_GPT ? "gpt" : "mlp",
                 ar_spec_param_count(&r->spec));
        p.n_plan = (size_t)r->plan.nstages;
        p.plan = stages;
        p.model = model;
        p.schedule = ar_schedule_name(c->schedule);
        p.micro_batches = r->M;
        p.predicted_bubble = r->plan.bubble;
        ar_market_plan_links(&r->plan, r->devs, r->edge_sum, r->edge_steps, links, link_names);
        p.n_links = (size_t)r->plan.nstages;
        p.links = links;
        r->traffic_sent_at = ar_now();
    }
    char saved[1024];
    snprintf(saved, sizeof saved, "%s", ar_last_error());
    void *buf;
    size_t len;
    if (ar_market_progress_pack(r->lease.token, &p, &buf, &len) == AR_OK) {
        ar_reporter_push_progress(&r->reporter, buf, len, with_val ? r->nval : nval_sent, p.n_plan > 0 ? r->plan_gen : 0);
        r->nval_queued = r->nval;
    } else {
        /* nothing is paid by it: a warning, not the run's end */
        ar_log(AR_LOG_WARN, "market %s: no progress for its dashboard: %s", c->market, ar_last_error());
    }
    free(shares);
    ar_fail(AR_OK, "%s", saved);
}

static void sleep_until(double t)
{
    double d = t - ar_now();
    if (d <= 0)
        return;
    struct timespec ts = {.tv_sec = (time_t)d, .tv_nsec = (long)((d - (double)(time_t)d) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* The lease ends with the run, whatever ended it: first the unpaid steps
 * are paid, waiting up to MARKET_RELEASE_WAIT_S for an unreachable market. */
void driver_release_lease(run *r, int rc)
{
    if (!r->leased)
        return;
    char saved[1024];
    snprintf(saved, sizeof saved, "%s", ar_last_error());
    double deadline = ar_now() + MARKET_RELEASE_WAIT_S;
    /* the last steps are usually on their way: a moment for them first */
    double soon = ar_now() + MARKET_RETRY_S;
    if (ar_reporter_flush(&r->reporter, soon < deadline ? soon : deadline) == AR_ECLOSED) {
        size_t queued = 0;
        ar_reporter_state(&r->reporter, NULL, &queued, NULL, NULL, NULL, NULL);
        ar_log(AR_LOG_WARN, "market %s: %zu step%s unpaid, waiting up to %.0f s for the market", r->c->market,
               queued, queued == 1 ? "" : "s", MARKET_RELEASE_WAIT_S);
        if (ar_reporter_flush(&r->reporter, deadline) == AR_ECLOSED) {
            char steps[512];
            ar_reporter_queued_text(&r->reporter, steps, sizeof steps);
            ar_reporter_state(&r->reporter, NULL, &queued, NULL, NULL, NULL, NULL);
            ar_log(AR_LOG_WARN, "market %s: gave up on paying for %zu step%s of job %lld (steps %s): they are unpaid",
                   r->c->market, queued, queued == 1 ? "" : "s", (long long)r->lease.job_id, steps);
        }
    }
    if (ar_reporter_refusal(&r->reporter) != AR_OK && rc == AR_OK)
        ar_log(AR_LOG_WARN, "%s", ar_last_error());
    int64_t spent = 0;
    ar_reporter_state(&r->reporter, &spent, NULL, NULL, NULL, NULL, NULL);
    ar_reporter_stop(&r->reporter);
    int status = 0;
    const char *how = rc == AR_OK ? "done" : r->budget_stop ? "cancelled" : "failed";
    int rrc;
    while ((rrc = ar_market_release(r->market, r->lease.token, how, r->steps_done, &spent, &status)) == AR_ECLOSED &&
           ar_now() + MARKET_RETRY_S < deadline)
        sleep_until(ar_now() + MARKET_RETRY_S);
    if (rrc != AR_OK)
        ar_log(AR_LOG_WARN, "market %s: releasing lease %lld: %s", r->c->market,
               (long long)r->lease.lease_id, ar_last_error());
    else if (!r->c->quiet) {
        char a[40];
        printf("lease %lld released: job %lld %s, %s credits spent\n", (long long)r->lease.lease_id,
               (long long)r->lease.job_id, how, ar_credits_text(spent, a, sizeof a));
        fflush(stdout);
    }
    r->leased = 0;
    ar_fail(AR_OK, "%s", saved);
}

/* The lease's members as the market now has them (after a replacement or
 * a re-plan): the stages' providers, addresses, tickets (the replacement's
 * new one; the others keep theirs), prices and what they offer. */
static int take_members(run *r, const ar_market_replacement *got)
{
    if (got->n < 1 || got->n > AR_MARKET_MAX_DEVICES)
        return ar_fail(AR_EPROTO, "market %s: no provider is left in the lease", r->c->market);
    ar_market_lease *was = malloc(sizeof *was);
    if (!was)
        return ar_fail(AR_ENOMEM, "out of memory for the lease");
    *was = r->lease;
    int rc = AR_OK;
    for (size_t i = 0; i < got->n && rc == AR_OK; i++) {
        ar_market_leased l = got->members[i];
        const char *ticket = NULL;
        if (got->found && l.p.id == got->replacement.p.id)
            ticket = got->replacement.ticket;
        for (size_t k = 0; !ticket && k < was->n; k++)
            if (was->providers[k].p.id == l.p.id)
                ticket = was->providers[k].ticket;
        size_t n = strnlen(l.p.address, sizeof l.p.address);
        if (!ticket || l.stage != (int)i)
            rc = ar_fail(AR_EPROTO, "market %s: the lease now names provider %lld at stage %d, not one of ours",
                         r->c->market, (long long)l.p.id, l.stage);
        else if (n == 0 || n >= sizeof r->addrs[i])
            rc = ar_fail(AR_EPROTO, "market %s: provider %lld has an address of %zu characters", r->c->market,
                         (long long)l.p.id, n);
        else
            rc = check_leased_address(r, &l);
        if (rc != AR_OK)
            break;
        snprintf(l.ticket, sizeof l.ticket, "%s", ticket);
        memcpy(r->addrs[i], l.p.address, n + 1);
        r->provider_ids[i] = l.p.id;
        memcpy(r->tickets[i], l.ticket, sizeof r->tickets[i]);
        memcpy(r->relays[i], l.relay, sizeof r->relays[i]);
        memcpy(r->passes[i], l.relay_pass, sizeof r->passes[i]);
        r->prices[i] = l.p.price_per_tflop;
        r->offers[i] = (device_offer){.gflops = l.speed_gflops > 0 ? l.speed_gflops : l.p.gflops,
                                      .mem_bytes = (double)l.p.mem_bytes, .known = 1};
        r->lease.providers[i] = l;
    }
    if (rc == AR_OK) {
        r->lease.n = got->n;
        r->S = (int)got->n;
    } else {
        r->lease = *was;
    }
    free(was);
    return rc;
}

/* A replacement for the lost provider lost_id from the market. The market
 * checks the claim first: while it cannot confirm it yet (the provider's
 * heartbeats have not stopped) it is asked again, until
 * MARKET_RELEASE_WAIT_S; refused, the run ends with the market's reason.
 * Confirmed, the provider leaves the lease, its payments for the steps
 * redone are contested, and a free provider takes its stage (*found 1), or
 * the market re-plans the lease over the providers left (*found 0). The
 * run's stages become the lease's members. */
int driver_replace_from_market(run *r, int64_t lost_id, long kept, const char *why, int *found)
{
    int status = 0, rc, told = 0;
    *found = 0;
    double deadline = ar_now() + MARKET_RELEASE_WAIT_S;
    /* every step done before the loss is paid first, as it was done: a
     * market that stays away leaves them queued, and the replacement below
     * waits for it too */
    if ((rc = ar_reporter_flush(&r->reporter, deadline)) != AR_OK && rc != AR_ECLOSED)
        return rc;
    ar_market_replacement *got = malloc(sizeof *got);
    if (!got)
        return ar_fail(AR_ENOMEM, "out of memory for a replacement");
    for (;;) {
        rc = ar_market_replace(r->market, r->lease.token, lost_id, kept, why, got, &status);
        int again = rc == AR_ECLOSED || (rc != AR_OK && status == AR_STATUS_ABORTED);
        if (!again || ar_now() + 1.0 >= deadline)
            break;
        if (status == AR_STATUS_ABORTED && !told++)
            ar_log(AR_LOG_WARN, "market %s: %s", r->c->market, ar_last_error());
        /* the market is away (it keeps the lease), or not sure yet */
        sleep_until(ar_now() + (rc == AR_ECLOSED ? MARKET_RETRY_S : 1.0));
    }
    if (rc != AR_OK) {
        free(got);
        return ar_fail(rc, "market %s: replacing provider %lld: %s", r->c->market, (long long)lost_id,
                       ar_last_error());
    }
    ar_reporter_set_spent(&r->reporter, got->spent);
    ar_reporter_rollback(&r->reporter, kept);
    *found = got->found;
    rc = take_members(r, got);
    if (rc == AR_OK && got->found && !r->c->quiet)
        printf("  provider %lld (%s) at %s%s%s replaces it: %.1f GFLOP/s, reliability %.2f\n",
               (long long)got->replacement.p.id, got->replacement.account, got->replacement.p.address,
               got->replacement.relay[0] ? " through relay " : "", got->replacement.relay,
               got->replacement.p.gflops, got->replacement.p.reliability);
    free(got);
    return rc;
}

/* A graceful leave (driver.c, move_leaving): stage i's provider said it is
 * leaving and its state is here after `done` steps. Every step done is paid
 * first, while it is still a member (the market refuses a report naming a
 * provider that has left the lease, and the leaver is owed each one); then
 * the market hands its place over to a free provider offering the stage's
 * memory, reversing nothing. *found 0: none is free, and nothing changed at
 * the market. Found: stage i's provider, ticket, price and offer are the
 * new one's, and *addr its worker's address. */
int driver_hand_over(run *r, int i, long done, char *addr, size_t addr_size, int *found)
{
    int status = 0, rc;
    int64_t spent = 0, leaver = r->provider_ids[i];
    *found = 0;
    double deadline = ar_now() + MARKET_RELEASE_WAIT_S;
    if ((rc = ar_reporter_flush(&r->reporter, deadline)) == AR_ECLOSED) {
        size_t queued = 0;
        ar_reporter_state(&r->reporter, NULL, &queued, NULL, NULL, NULL, NULL);
        return ar_fail(rc, "market %s unreachable for %.0f s with %zu step%s unpaid", r->c->market,
                       MARKET_RELEASE_WAIT_S, queued, queued == 1 ? "" : "s");
    }
    if (rc != AR_OK || (rc = ar_reporter_refusal(&r->reporter)) != AR_OK)
        return rc;
    ar_market_leased got;
    /* a refusal may mean that the leaver's heartbeat saying so is still on
     * its way (it tells the market before the stage says it): asked again
     * for a few seconds */
    double refused_until = ar_now() + HAND_OVER_REFUSED_S;
    for (;;) {
        rc = ar_market_hand_over(r->market, r->lease.token, leaver, done, (int64_t)r->plan.stage_mem[i], &got,
                                 found, &spent, &status);
        double retry = rc == AR_ECLOSED ? MARKET_RETRY_S
                       : rc != AR_OK && status == AR_STATUS_FAILED_PRECONDITION && ar_now() < refused_until ? 0.5
                                                                                                         : 0;
        if (retry <= 0 || ar_now() + retry >= deadline)
            break;
        sleep_until(ar_now() + retry);
    }
    if (rc != AR_OK)
        return ar_fail(rc, "market %s: handing provider %lld's place over: %s", r->c->market, (long long)leaver,
                       ar_last_error());
    ar_reporter_set_spent(&r->reporter, spent);
    if (!*found)
        return AR_OK;
    size_t n = strnlen(got.p.address, sizeof got.p.address);
    if (n == 0 || n >= addr_size || n >= sizeof r->addrs[i])
        return ar_fail(AR_EPROTO, "market %s: provider %lld has an address of %zu characters", r->c->market,
                       (long long)got.p.id, n);
    if ((rc = check_leased_address(r, &got)) != AR_OK)
        return rc;
    memcpy(addr, got.p.address, n + 1);
    r->provider_ids[i] = got.p.id;
    memcpy(r->tickets[i], got.ticket, sizeof r->tickets[i]);
    memcpy(r->relays[i], got.relay, sizeof r->relays[i]);
    memcpy(r->passes[i], got.relay_pass, sizeof r->passes[i]);
    r->prices[i] = got.p.price_per_tflop;
    r->offers[i] = (device_offer){.gflops = got.p.gflops, .mem_bytes = (double)got.p.mem_bytes, .known = 1};
    /* the lease as the dashboard's plan names its members */
    for (size_t k = 0; k < r->lease.n; k++)
        if (r->lease.providers[k].p.id == leaver)
            r->lease.providers[k] = got;
    if (!r->c->quiet)
        printf("  provider %lld (%s) at %s%s%s takes its place: %.1f GFLOP/s, reliability %.2f; provider %lld "
               "leaves paid for every step it did\n",
               (long long)got.p.id, got.account, got.p.address, got.relay[0] ? " through relay " : "", got.relay,
               got.p.gflops, got.p.reliability, (long long)leaver);
    return AR_OK;
}

int driver_open_worker(run *r, int i, ar_client **out)
{
    if (r->relays[i][0])
        return ar_client_open_relayed(r->addrs[i], r->relays[i], r->passes[i], out);
    return ar_client_open(r->addrs[i], out);
}

int driver_edge_reversed(const run *r, int i)
{
    return r->leased && i > 0 && i < r->S && r->relays[i][0] && !r->relays[i - 1][0];
}

void driver_print_edges(run *r)
{
    if (r->c->quiet || !r->leased)
        return;
    /* who dials whom: the driver dials stage 0 (and every stage for its
     * control calls), stage i dials stage i + 1 */
    char text[AR_PLAN_MAX_STAGES * 420]; /* a line: two addresses of up to 128 and words */
    size_t n = 0;
    text[0] = '\0';
    for (int i = 0; i < r->S && n < sizeof text; i++) {
        char from[32];
        if (i == 0)
            snprintf(from, sizeof from, "driver");
        else
            snprintf(from, sizeof from, "stage %d", i - 1);
        int w;
        if (driver_edge_reversed(r, i))
            w = snprintf(text + n, sizeof text - n,
                         "edge %s -> stage %d (%s): reversed: it dials stage %d back directly (relay %s only if it "
                         "cannot)\n",
                         from, i, r->addrs[i], i - 1, r->relays[i]);
        else if (r->relays[i][0])
            w = snprintf(text + n, sizeof text - n, "edge %s -> stage %d (%s): relayed via %s\n", from, i,
                         r->addrs[i], r->relays[i]);
        else
            w = snprintf(text + n, sizeof text - n, "edge %s -> stage %d (%s): direct\n", from, i, r->addrs[i]);
        n = w < 0 ? sizeof text : n + (size_t)w;
    }
    /* once per set of edges: a run loads its stages again once its links are
     * measured, with the same edges */
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (const char *c = text; *c; c++)
        h = (h ^ (unsigned char)*c) * 1099511628211ull;
    if (h == r->edges_printed)
        return;
    r->edges_printed = h;
    fputs(text, stdout);
    fflush(stdout);
}

/* Whether a TCP connection to HOST:PORT opens within a second. */
static int relay_answers(const char *hostport)
{
    int fd = ar_net_dial(hostport, 1.0);
    if (fd < 0)
        return 0;
    close(fd);
    return 1;
}

int driver_wait_relays(run *r, const int *lost, int n, double wait_s)
{
    const char *relay = NULL;
    for (int k = 0; k < n && !relay; k++)
        if (r->relays[lost[k]][0])
            relay = r->relays[lost[k]];
    if (!relay || relay_answers(relay))
        return 1;
    if (!r->c->quiet) {
        printf("  relay %s does not answer: waiting up to %.0f s for it to come back\n", relay, wait_s);
        fflush(stdout);
    }
    double end = ar_now() + wait_s;
    while (ar_now() < end) {
        sleep_until(ar_now() + 0.5);
        if (relay_answers(relay)) {
            if (!r->c->quiet) {
                printf("  relay %s is back\n", relay);
                fflush(stdout);
            }
            return 1;
        }
    }
    return 0;
}
