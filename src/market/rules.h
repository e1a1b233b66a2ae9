/* The market's rules: which providers a renter gets and in what order, what
 * a plan costs, how a reported step is paid, how the loss of a member is
 * settled, and how a lease ends.
 *
 * Plain C over the store (market/store.h): no RPC, no wire format. The
 * Market service (net/market.c) decodes a request, checks its bounds and
 * formats, calls one of these and encodes the answer; the tests call them
 * directly over a database file. Each small step (ranking, splitting,
 * pricing, checking a report) is a function of its own, so that a rule can
 * change without touching the others or the RPC layer.
 *
 * Every function returns AR_OK or a negative AR_E* code with the reason in
 * ar_last_error(): AR_EINVAL a request that does not fit the lease or job,
 * AR_ENOTFOUND no such job or lease (of this account), AR_ELIMIT a budget
 * or a cap that cannot cover the work (and, where said, a precondition that
 * no longer holds); anything else is the store failing (AR_EIO, AR_ENOMEM). */
#ifndef AR_MARKET_RULES_H
#define AR_MARKET_RULES_H

#include "market/dashboard.h"
#include "market/money.h"
#include "market/store.h"
#include "train/stage.h"
#include "train/plan.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- the market's policy ------------------------------------------------------- */

/* Providers one account may register, unless the market says otherwise
 * (arceus market --max-providers-per-account). A person or a small lab rents
 * out a handful of machines; 16 covers that with room to spare, while one
 * account can no longer fill the database and every renter's ranking with
 * thousands of rows. A provider with more machines asks the operator for a
 * higher limit. Re-registering an address the account already has does not
 * count. */
#define AR_MARKET_DEFAULT_MAX_PROVIDERS 16
/* The lowest port a provider's worker may advertise: below it are the
 * system's services (ssh, mail, a web server), not workers. */
#define AR_MARKET_MIN_PORT 1024
/* A provider whose worker failed checks in a row is checked again after 2,
 * 4, 8, ... seconds, at most this many: a provider advertising a black hole
 * costs the market a Hello deadline now and then, not at every lease. */
#define AR_REACH_RETRY_S 60
/* Checks one lease (or replacement) may make of workers not known to be
 * reachable before it settles for the providers it has. */
#define AR_REACH_MAX_PROBES 8

/* Can the market reach the worker at `address`? A Hello within a short
 * deadline (net/ provides it; tests pass a fake). true: answered. */
typedef bool (*ar_reach_probe)(void *ctx, const char *address);
/* The same through the market's relay, to provider_id's worker there. */
typedef bool (*ar_relay_probe)(void *ctx, int64_t provider_id, const char *address);

/* How the market admits providers and what it leases. */
typedef struct {
    int max_providers_per_account; /* 0: AR_MARKET_DEFAULT_MAX_PROVIDERS */
    /* the market listens on loopback (a test, the demo): its providers may
     * too; otherwise a loopback address is refused */
    bool allow_loopback;
    /* NULL: the market does not check its providers' workers, and every
     * provider counts as reachable (a loss claim then rests on heartbeats) */
    ar_reach_probe probe;
    void *probe_ctx;
    /* seconds without a heartbeat after which a provider's heartbeats count
     * as stopped, for a loss claim; 0: AR_CLAIM_QUIET_S */
    double claim_quiet_s;
    /* the escrow's settling window after a job ends (seconds); 0 releases
     * at once when the job ends */
    int64_t escrow_window_s;
    /* NULL: the market has no relay; otherwise a worker the probe cannot
     * reach but this one can (through the relay) is leased as relayed */
    ar_relay_probe relay_probe;
} ar_market_policy;

/* The most providers one lease holds. */
#define AR_MARKET_MAX_DEVICES 64
/* FLOPs one stage may be paid for per step (keeps every cost in int64). */
#define AR_MARKET_MAX_STAGE_FLOPS AR_PLAN_MAX_STEP_FLOPS
/* The model spec a lease carries (a spec with its vocabulary is ~2 KiB). */
#define AR_MARKET_MAX_SPEC_BYTES 16384
/* Micro-batch shape a lease may be priced for. */
#define AR_MARKET_MAX_MB_ROWS 1000000
#define AR_MARKET_MAX_MICRO_BATCHES 100000

/* Heartbeat silence that, with a Hello the market's own probe cannot get
 * answered, confirms a loss claim (at most: a market whose providers must
 * beat more often uses a third of --offline-after). */
#define AR_CLAIM_QUIET_S 10.0
/* Loss claims the market found false before an account may make no more
 * claims and take no more leases. */
#define AR_MAX_FALSE_CLAIMS 3
/* The escrow's settling window by default (arceus market --escrow-window). */
#define AR_ESCROW_DEFAULT_WINDOW_S 3600

/* Speed: a provider's claim is a prior worth this many FLOPs of
 * observation; what renters' drivers observe replaces it as it comes. */
#define AR_SPEED_PRIOR_FLOPS 1e8
/* A provider whose observed speed is below this fraction of its claim
 * (relative to how other accounts' claims hold up) loses rank in
 * proportion. */
#define AR_SPEED_FAR_BELOW 0.1

/* ---- ranking ---------------------------------------------------------------- */

/* A candidate provider and its score (higher is better). */
typedef struct {
    const ar_provider *p;
    double score;
} ar_ranked;

/* A provider's speed in GFLOP/s as the market estimates it: its claim as a
 * prior worth AR_SPEED_PRIOR_FLOPS of work, then what renters' drivers
 * observed (FLOPs of its plan per busy second):
 *
 *     speed = (F0 + observed FLOPs) / (F0 / prior + observed busy seconds)
 *
 * where the prior is the claim times how well its account's claims have
 * held up so far (observed / claimed, at most 1): a provider registered
 * anew by an account whose claims were false starts from a discounted
 * claim. */
double ar_rules_speed(const ar_provider *p);

/* Scores the n providers ps[] and writes them to out[0..n), best first.
 *
 *     score = reliability^2 * (speed / best_speed) * (min_price + p0) / (price + p0) * claim
 *
 * i.e. speed per credit, each factor normalised to the best candidate: a
 * provider twice as fast at the same price scores twice as high, one twice as
 * expensive at the same speed half as high. speed is ar_rules_speed, not
 * the claim. p0 = 1 credit per TFLOP keeps free providers from scoring
 * infinitely and damps tiny price differences. Reliability (its account's,
 * clamped to 0..1) is squared: the pipeline stalls on any one stage, so an
 * unreliable member costs the whole job, not just its share. claim is 1,
 * or, for a provider whose speed is below AR_SPEED_FAR_BELOW times its claim
 * (both scaled by the median of how other accounts' claims hold up), that
 * ratio: an overstated claim costs rank beyond the speed it did not have.
 * Ties go to more memory, then to the older registration (lower id). */
void ar_rules_rank(const ar_provider *ps, size_t n, ar_ranked *out);

/* The online providers free to lease (in no live lease) offering at least
 * min_mem bytes, ranked by ar_rules_rank: (*ranked)[0..*n) point into
 * *providers; the caller frees both with ar_free, also on failure. *busy
 * (may be NULL) counts those left out only because a live lease holds
 * them. */
int ar_rules_free_providers(ar_store *s, int64_t min_mem, ar_provider **providers, ar_ranked **ranked,
                            size_t *n, size_t *busy);

/* ---- pricing ------------------------------------------------------------------ */

/* A lease's model as the market prices it: the spec parsed and checked,
 * its canonical JSON (what the lease keeps, and what a Load of it must
 * carry), its units' costs for the micro-batch shape. */
typedef struct {
    ar_model_spec spec;
    char *json; /* ar_spec_to_json's: free() */
    int units;
    ar_unit_cost *costs; /* [units]: ar_free() */
    int mb_rows, micro_batches, schedule;
} ar_market_model;

/* Parses and checks a spec (at most AR_MARKET_MAX_SPEC_BYTES) and prices its
 * units: AR_EINVAL naming what is wrong. Free with ar_rules_model_clear. */
int ar_rules_model(const char *spec_json, int mb_rows, int micro_batches, int schedule, ar_market_model *out);
void ar_rules_model_clear(ar_market_model *m);

/* The split of a lease: members[i] (provider and price filled in by the
 * caller, for devices devs[i] in pipeline order) get stage i, their units
 * and FLOPs per step, from the renter's split (stage_units[i] units each,
 * n_stage_units == n) or else the best split with one stage per device
 * (ar_plan_each) over the devices' speed and memory. AR_EINVAL for a split
 * that does not cover the model, AR_ELIMIT for one that does not fit. */
int ar_rules_split(const ar_market_model *m, const ar_device *devs, size_t n, const uint32_t *stage_units,
                   size_t n_stage_units, ar_lease_member *members);

/* What a plan costs: per_step = the sum of ar_flops_cost(flops_per_step,
 * price) of its members (each rounded as it will be paid), estimate =
 * per_step * est_steps. AR_ELIMIT when either overflows. Either output may
 * be NULL. */
int ar_rules_price_plan(const ar_lease_member *members, size_t n, int64_t est_steps, int64_t *per_step,
                        int64_t *estimate);

/* ---- leases -------------------------------------------------------------------- */

/* What a renter asks for. */
typedef struct {
    uint32_t devices;
    int64_t max_credits;    /* micro-credits; 0: no cap but the balance */
    int64_t est_steps;
    const char *spec;       /* a one-line summary of the job */
    int64_t flops_per_step; /* the whole model's, per training step, as the renter counts them */
    int64_t min_mem_bytes;  /* each provider must offer this much; 0: any */
    /* a run resumed from a checkpoint continues its job (0: a new job): the
     * job's old leases end; nothing is reversed */
    int64_t resume_job;
    int64_t kept_steps;
    /* the work itself, which the market prices (ar_rules_model): the model
     * spec's JSON, the micro-batch shape, and the renter's split if it has
     * one (stage_units[i] units for stage i; n_stage_units 0: the market's) */
    const char *model_spec;
    int mb_rows, micro_batches, schedule;
    const uint32_t *stage_units;
    size_t n_stage_units;
} ar_market_lease_request;

/* A leased provider as its renter sees it. */
typedef struct {
    ar_provider p; /* price_per_tflop fixed for the lease; account_id 0 on the client side */
    char account[AR_NAME_MAX];
    int64_t flops_per_step; /* the plan's: what each step of it is paid for */
    /* its ticket (store.h, "tickets"): for its own Load only; "" when none
     * was issued */
    char ticket[AR_TOKEN_LEN];
    int stage, first_unit, last_unit; /* its place in the plan: units [first, last) */
    double speed_gflops;              /* ar_rules_speed */
    /* a relayed member (p.reach AR_REACH_RELAYED): the relay and the pass
     * that opens circuits to it there (net/relay.h); "" when dialled directly */
    char relay[AR_ADDR_MAX];
    char relay_pass[160];
} ar_market_leased;

typedef struct {
    int64_t job_id, lease_id;
    char token[AR_TOKEN_LEN]; /* the lease token */
    int64_t estimate;         /* micro-credits for est_steps */
    size_t n;
    ar_market_leased providers[AR_MARKET_MAX_DEVICES]; /* in pipeline order */
} ar_market_lease;

/* Leases req->devices free providers to renter_id (ar_rules_free_providers'
 * best that are leasable under `policy` (ar_rules_pick), in that order),
 * splits the model among them (ar_rules_split: the lease fixes each
 * member's units and FLOPs per step, hence the price of a step) and creates
 * the job (or resumes req->resume_job: its old leases end, nothing is
 * reversed) and its lease, whose estimate is checked against the renter's
 * balance and the caps. Choosing and leasing is one step within this
 * process: two renters asking at once never get the same provider.
 *   - a model spec, shape or split that is not valid: AR_EINVAL;
 *   - a renter with AR_MAX_FALSE_CLAIMS false loss claims: AR_ELIMIT;
 *   - fewer providers free than asked for: AR_ELIMIT with *too_few set
 *     (try later; a resumed running job is marked failed at kept_steps, to
 *     be resumed again; a finished one keeps its status);
 *   - a budget or cap below the estimate: AR_ELIMIT (the message gives the
 *     estimate), the job stays on record, cancelled;
 *   - a resume of a job that is not the renter's: AR_ENOTFOUND. */
int ar_rules_acquire(ar_store *s, const ar_market_policy *policy, int64_t renter_id,
                     const ar_market_lease_request *req, ar_market_lease *out, bool *too_few);

/* Whether `policy` lets the market lease p: always without a probe,
 * otherwise only once a check reached its worker, directly or through the
 * relay. */
bool ar_rules_leasable(const ar_market_policy *policy, const ar_provider *p);
/* Whether a provider not known to be reachable is due for another check at
 * `now`: at once after its first failure (a provider often registers just
 * before its worker is up), then after a wait that doubles with each
 * failure, from 2 s to AR_REACH_RETRY_S. A relayed provider is checked again
 * every AR_REACH_RETRY_S (its connection to the relay may be gone); a
 * directly reachable one is not. */
bool ar_rules_reach_due(const ar_provider *p, int64_t now);
/* Checks p's worker with the policy's probe (a relayed one through the relay
 * first, then directly), then, when that fails, through the relay (the
 * policy's relay_probe) and records the outcome in the store and in
 * p->reach: AR_REACH_OK, AR_REACH_RELAYED or AR_REACH_UNREACHABLE. AR_OK
 * whatever the outcome; an error only when the store fails. Without a
 * probe, nothing is done. */
int ar_rules_check_reach(ar_store *s, const ar_market_policy *policy, ar_provider *p);
/* Picks up to `want` of ranked[0..n) (best first) that the policy lets the
 * market lease, checking in rank order those due for a check (at most
 * AR_REACH_MAX_PROBES checks): picked[0..*n_picked) keep the rank order.
 * *unreachable (may be NULL) counts the candidates left out as unreachable. */
int ar_rules_pick(ar_store *s, const ar_market_policy *policy, const ar_ranked *ranked, size_t n, size_t want,
                  ar_ranked *picked, size_t *n_picked, size_t *unreachable);

/* ---- paying a step ------------------------------------------------------------- */

/* The check ar_rules_settle_step runs on a report against the lease's
 * members (an ar_step_check): every member of the lease's plan is reported
 * once, at its stage; a stage's FLOPs are 0 or exactly the plan's (a
 * report naming other FLOP counts is refused: the lease fixed them).
 * prices[i] and flops[i] get the lease's price and the plan's FLOPs of
 * stages[i]. AR_EINVAL naming the first bad stage otherwise. */
int ar_rules_check_usage(void *unused, const ar_lease_member *members, size_t n_members,
                         const ar_stage_usage *stages, size_t n_stages, int64_t *prices, int64_t *flops);

/* Step `step` of the lease's job completed: its stages are checked and paid
 * their plan FLOPs at the lease's prices, into escrow; its loss kept
 * (has_loss and finite) and the job counted at step + 1, in one store
 * transaction (ar_store_step_settle). No stages (n_stages 0): every member
 * of the lease as it stands. A step reported again pays nothing new.
 * AR_ELIMIT when the balance or the job's cap cannot cover a stage (the
 * stages before it stay paid). */
int ar_rules_settle_step(ar_store *s, const ar_lease *lease, int64_t step, const ar_stage_usage *stages,
                         size_t n_stages, bool has_loss, double loss, ar_step_settlement *out);

/* ---- a lost member ---------------------------------------------------------------- */

typedef struct {
    /* the market cannot confirm the loss yet (the provider's worker does
     * not answer, but its heartbeats have not stopped): nothing changed,
     * ask again in about retry_after_s */
    bool unconfirmed;
    double retry_after_s;
    bool found;                   /* a free provider took the lost one's place */
    ar_market_leased replacement; /* when found: at the lost member's stage, units and FLOPs */
    int contested;                /* the lost provider's payments contested */
    int64_t spent;                /* what the job has spent */
    bool again;                   /* the answer of an earlier, identical request */
    size_t n;                     /* the lease's members now, by stage */
    ar_market_leased members[AR_MARKET_MAX_DEVICES];
} ar_market_replacement;

/* The renter says provider lost_provider_id of its live lease stopped
 * answering and the job goes back to its checkpoint of kept_steps steps.
 * The claim is checked first: it holds when an audit of the provider in
 * this job failed, or when the market's own probe (policy->probe) cannot
 * get its worker to answer a Hello and its heartbeats have stopped (none
 * for policy->claim_quiet_s, or it is offline). Otherwise:
 *   - its worker answers the market: AR_ELIMIT, nothing changes, and the
 *     renter's account counts a false claim;
 *   - it does not answer but still beats: AR_OK with out->unconfirmed.
 * Accepted, in one transaction (ar_store_lease_replace): the provider is
 * marked offline, its account's reliability multiplied by
 * AR_RELIABILITY_AFTER_LOSS, its held payments after kept_steps and after
 * its verified step contested (reversed only as their steps are redone and
 * paid to another), and the best free provider takes its place with its
 * units; none free, the market re-plans the lease over the members left.
 * Asked again for a provider already settled with the same kept_steps (the
 * answer was lost), it answers as before and does nothing twice (again set).
 * AR_EINVAL when the provider is not in the lease (and was not settled
 * there with these kept_steps); AR_ELIMIT when its replacement has left the
 * lease since, or the renter has made AR_MAX_FALSE_CLAIMS false claims.
 * `reason` (may be NULL) is only logged. The replacement is the best free
 * provider leasable under `policy` (ar_rules_pick); with the lease's token
 * (the renter's, as the request carried it; NULL: none is issued) it comes
 * with its ticket, the same when asked again. */
int ar_rules_replace(ar_store *s, const ar_market_policy *policy, const ar_lease *lease, const char *lease_token,
                     int64_t lost_provider_id, int64_t kept_steps, const char *reason, ar_market_replacement *out);

/* ---- a graceful leave ---------------------------------------------------------------- */

typedef struct {
    bool found;                   /* a free provider took the leaver's place */
    ar_market_leased replacement; /* when found: at the leaver's stage and FLOPs */
    int64_t spent;                /* what the job has spent */
    bool again;                   /* the answer of an earlier, identical request */
} ar_market_handover;

/* Member provider_id of the live lease said it is leaving (its heartbeats:
 * ar_store_provider_set_leaving) and its renter has taken its stage's state
 * after `step` completed steps: the best free provider offering at least
 * min_mem bytes and leasable under `policy` takes its place (stage and
 * FLOPs), with its ticket when lease_token is given (the same when asked
 * again). Not a loss: nothing is reversed, the leaver keeps its payments,
 * reliability and online state. None free: out->found false and nothing
 * changes (the renter may ask again). Asked again after a hand-over, the
 * same answer (again set). AR_ELIMIT when the member has not said it is
 * leaving, or its replacement has left the lease since; AR_EINVAL when the
 * provider is not in the lease (and handed over no place there). */
int ar_rules_hand_over(ar_store *s, const ar_market_policy *policy, const ar_lease *lease, const char *lease_token,
                       int64_t provider_id, int64_t step, int64_t min_mem, ar_market_handover *out);

/* ---- the end of a lease, providers, progress --------------------------------------- */

/* The lease ends and its job is `status` (done, failed or cancelled: the
 * caller checks) after `steps` completed steps; *spent (may be NULL) gets
 * what the job spent in all. With a settling window of 0 (policy) the
 * job's escrow is released at once. */
int ar_rules_release(ar_store *s, const ar_market_policy *policy, const ar_lease *lease, ar_job_status status,
                     int64_t steps, int64_t *spent);

/* ---- escrow and audits ------------------------------------------------------------ */

/* Releases what escrow holds and is due at `now` (ar_store_escrow_release
 * with the policy's window): run by the market's sweep. */
int ar_rules_settle_escrow(ar_store *s, const ar_market_policy *policy, int64_t now, int *released);

/* The hooks for audits by replay. An audit of member provider_id's work at
 * `step` passed: its work up to that step is verified (a later loss claim
 * reverses nothing up to it) and its payments up to it are released. */
int ar_rules_audit_passed(ar_store *s, const ar_lease *lease, int64_t provider_id, int64_t step, int *released);
/* An audit failure the market confirmed, with its evidence: recorded, the
 * provider's held earnings for the job go back to the renter, its account's
 * reliability drops to 0, and a loss claim against it in this job holds
 * (ar_rules_replace). *returned (may be NULL): micro-credits given back. */
int ar_rules_audit_failed(ar_store *s, const ar_lease *lease, int64_t provider_id, int64_t step, int stage,
                          const char *evidence, int64_t *returned);

/* What a renter's driver sends with an audit it says failed: the replay
 * material the provider gave it (train/audit.c's record), and what the
 * replay needs besides: the optimizer and the run's seed (dropout). */
typedef struct {
    const void *material;
    size_t material_bytes;
    ar_optim_config optim;
    uint64_t seed;
} ar_audit_evidence;

/* The market's own check of a failed audit, before any money moves: it
 * builds the member's stage from the lease's model spec and units, replays
 * the evidence, and confirms the failure only when the material is what the
 * provider committed to (its state and inputs match the digests the
 * provider committed for `step`) and the replay's outputs or state after
 * the step differ from what it committed (its digests of step and step+1).
 * Confirmed: ar_rules_audit_failed (*returned: what went back to the
 * renter). Not confirmed: nothing moves, the renter's account counts a
 * false claim, and AR_ELIMIT says why. AR_ENOTFOUND when the digests of
 * step or step+1 have not been reported (paid) yet; AR_EINVAL for a
 * provider that is not the lease's member at `stage`. */
int ar_rules_audit_claim(ar_store *s, const ar_lease *lease, int64_t provider_id, int64_t step, int stage,
                         const ar_audit_evidence *ev, bool *confirmed, int64_t *returned);

/* Registers (or re-registers) a provider of p->account_id from its claimed
 * profile (address, gflops, mem_bytes, cores, price_per_tflop). Reliability
 * is the market's record of the account, not of the address: registering
 * again, or at another address, changes nothing of it. */
int ar_rules_register_provider(ar_store *s, const ar_provider *p, int64_t *id_out);

/* Why an IP address may not be a worker's ("loopback", "link-local",
 * "multicast", "unspecified", "reserved", "a cloud metadata address"), or
 * NULL when it may. family AF_INET (4 bytes) or AF_INET6 (16 bytes); an
 * IPv4 address inside IPv6 (mapped, NAT64) is judged as IPv4. */
const char *ar_rules_ip_refusal(int family, const unsigned char *addr, bool allow_loopback);
/* A provider's advertised worker address: HOST:PORT (an IPv6 host in
 * brackets), the port 1024..65535, and the host, once resolved, none of the
 * addresses ar_rules_ip_refusal refuses (every address a name resolves to
 * is checked). AR_EINVAL with the reason in why otherwise. */
int ar_rules_check_address(const char *address, bool allow_loopback, char *why, size_t why_size);
/* Whether every address HOST (of HOST:PORT) resolves to is loopback: a
 * market listening there serves this machine only. */
bool ar_rules_host_is_loopback(const char *hostport);

/* A provider's registration as the market admits it: its address checked
 * (ar_rules_check_address), the account's providers within the policy's
 * limit (a re-registration of an address it has is always allowed), then
 * ar_rules_register_provider and a check of its worker (ar_rules_check_reach,
 * whatever the last one found). AR_EINVAL for the address, AR_ELIMIT for the
 * limit, with the reason. *reach_out (may be NULL) gets the state found. */
int ar_rules_admit_provider(ar_store *s, const ar_market_policy *policy, const ar_provider *p, int64_t *id_out,
                            ar_reach *reach_out);

/* A Load's ticket as a provider's worker asks about it (CheckLease). */
typedef struct {
    ar_lease lease;
    size_t n; /* the lease's members, by stage */
    char addresses[AR_MARKET_MAX_DEVICES][AR_ADDR_MAX];
    /* what the asking provider is paid to hold (has_plan: the lease has a
     * plan): its units and the SHA-256 (hex) of the model's canonical spec */
    bool has_plan;
    int first_unit, last_unit;
    char spec_sha256[AR_TOKEN_LEN];
    int mb_rows, micro_batches;
} ar_market_ticket_check;

/* Whether `ticket` is provider_id's for a live lease that still holds it:
 * AR_ENOTFOUND for an unknown ticket or a lease released or left,
 * AR_EINVAL for another provider's ticket; on AR_OK, out gets the lease and
 * its members' worker addresses. The caller has checked that provider_id
 * is the asking account's. */
int ar_rules_check_ticket(ar_store *s, int64_t provider_id, const char *ticket, ar_market_ticket_check *out);

/* What a running job's driver reports for the dashboard. */
typedef struct {
    ar_job_live live; /* its plan is ignored: see `plan` */
    const ar_stage_time *times;
    size_t n_times;
    bool has_val; /* an evaluation since the last report */
    int64_t val_step;
    double val_loss;
    const ar_market_plan *plan; /* NULL: the stored plan is kept */
} ar_market_progress_report;

/* Keeps a job's snapshot, its stages' times, its validation loss and its
 * plan (as the dashboard's JSON, ar_dashboard_plan_json); and from each
 * stage's busy time since the last report (or since the lease began, when
 * the driver's counters started at 0), what the member at that stage did
 * per second: an observation of its provider's speed (its plan FLOPs per
 * step times the steps, in the busy seconds), unless the renter is the
 * provider's own account or the numbers cannot be (busy beyond wall time). */
int ar_rules_report_progress(ar_store *s, const ar_lease *lease, const ar_market_progress_report *r);

/* The SHA-256 of a text, in hex (the spec a lease was priced from). */
int ar_rules_sha256_hex(const char *text, char out[AR_TOKEN_LEN]);

#endif
