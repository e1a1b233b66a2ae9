/* The market's storage: accounts and tokens, providers, jobs, leases, usage
 * and the double-entry credit ledger.
 *
 * One module, one interface. Callers see plain C structs in and out and never
 * SQL; the only implementation today is SQLite (store_sqlite.c, the embedded
 * default), and a PostgreSQL backend can be added behind this same header
 * without touching its callers.
 *
 * Money is integers only (market/money.h): amounts are micro-credits (int64,
 * 1 credit = AR_MICRO_PER_CREDIT), prices are micro-credits per TFLOP (1e12
 * FLOPs), and every cost is ar_flops_cost, so an estimate is exact.
 *
 * Invariants every function keeps (the tests check them):
 *   - every change that writes more than one row is one transaction: all of
 *     it is committed or none of it (a process killed mid-way loses nothing
 *     that was committed and leaves nothing half-written);
 *   - every transfer is exactly two ledger rows (+x, -x) with one transfer id,
 *     so the sum of all ledger rows is always zero; credits enter through the
 *     system account "mint", the only account allowed below zero;
 *   - a payment for work goes from the renter to the system account
 *     "escrow", which holds it until it is released to the provider (or
 *     reversed to the renter): the escrow's balance is always exactly the
 *     sum of the payments it holds (ar_store_ledger_check);
 *   - no user account's balance goes below zero: a change that would do so is
 *     refused with AR_ELIMIT and writes nothing;
 *   - tokens are never stored, only their SHA-256 (hex).
 *
 * Functions return 0 or a negative AR_E* code with the detail in
 * ar_last_error(); database failures are AR_EIO ("db: what: sqlite message").
 * One ar_store may be shared by threads (calls are serialised); several
 * ar_store on the same database (threads or processes) are also safe.
 * Arrays returned through `**out` are heap blocks the caller frees with
 * ar_free (jobs with ar_store_jobs_free). */
#ifndef AR_MARKET_STORE_H
#define AR_MARKET_STORE_H

#include "market/money.h" /* micro-credits: AR_CREDITS, AR_MICRO_PER_CREDIT */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* hex SHA-256 / hex of 32 random bytes, plus the NUL */
#define AR_TOKEN_LEN 65
#define AR_NAME_MAX 64
#define AR_ADDR_MAX 256
#define AR_REASON_MAX 32
/* why a provider is unavailable, with its terminating zero */
#define AR_WHY_MAX 128

/* The schema version this build creates and migrates to. */
#define AR_STORE_SCHEMA_VERSION 10

typedef struct ar_store ar_store;

/* Open (creating it if missing) and migrate the database at `path`. A database
 * with a newer schema than this build knows is refused (AR_EFORMAT). */
int ar_store_open(const char *path, ar_store **out);
void ar_store_close(ar_store *s);
int ar_store_schema_version(ar_store *s, int *version);

/* ---- accounts ------------------------------------------------------------ */

typedef struct {
    int64_t id;
    char name[AR_NAME_MAX];
    int64_t balance; /* micro-credits: spendable */
    int64_t created; /* unix seconds */
    bool system;     /* the mint, the escrow */
    /* the market's record of the account, never its claim: the reliability
     * of its providers (0..1; a new account starts at AR_RELIABILITY_NEW),
     * and the loss claims it made as a renter that the market confirmed or
     * found false */
    double reliability;
    int64_t confirmed_claims, false_claims;
} ar_account;

/* Where reliability starts: below that of an account with a record, which
 * earns its way up with work paid by others (AR_RELIABILITY_GROWTH). */
#define AR_RELIABILITY_NEW 0.5
/* Each stage-step paid by another account's job and released from escrow
 * takes this fraction of the way that is left to 1 off: r = 1 - (1 - r) * g. */
#define AR_RELIABILITY_GROWTH 0.98

/* A new account with `initial_credits` micro-credits minted to it (one
 * transfer from the mint, in the same transaction as the account). Writes the
 * token (64 hex chars) to token_out: it exists only there, the database keeps
 * its hash. AR_EINVAL for a taken or bad name. id_out may be NULL. */
int ar_store_account_create(ar_store *s, const char *name, int64_t initial_credits,
                            char token_out[AR_TOKEN_LEN], int64_t *id_out);
/* The account a token belongs to; AR_ENOTFOUND when none (or the mint). */
int ar_store_account_auth(ar_store *s, const char *token, int64_t *id_out);
int ar_store_account_balance(ar_store *s, int64_t account_id, int64_t *micro_out);
int ar_store_account_get(ar_store *s, int64_t account_id, ar_account *out);
int ar_store_account_find(ar_store *s, const char *name, ar_account *out);
/* Credits minted to an existing account (a top-up): one transfer. */
int ar_store_account_mint(ar_store *s, int64_t account_id, int64_t micro);
int ar_store_account_list(ar_store *s, ar_account **out, size_t *n);
/* What the account's providers have earned that escrow still holds. */
int ar_store_account_pending(ar_store *s, int64_t account_id, int64_t *micro_out);
/* The market's record of an account: its reliability (0..1), for the
 * operator and the tests. */
int ar_store_account_set_reliability(ar_store *s, int64_t account_id, double reliability);
/* A loss claim the account made was confirmed (true) or found false. */
int ar_store_account_claim(ar_store *s, int64_t account_id, bool confirmed);

/* ---- providers ------------------------------------------------------------ */

/* Whether the market reached a provider's worker (a Hello within its
 * deadline): the market's own finding, never the provider's claim. A state,
 * not a flag: a provider the market cannot reach directly may one day be
 * served another way (a relay). */
typedef enum {
    AR_REACH_UNCHECKED = 0,   /* never tried, or the market does not check */
    AR_REACH_OK = 1,          /* the last check was answered: dialled directly */
    AR_REACH_UNREACHABLE = 2, /* the last check failed: not leased until one succeeds */
    AR_REACH_RELAYED = 3,     /* answered only through the market's relay (net/relay.h) */
} ar_reach;

/* "direct", "relayed", "unreachable", "unchecked" */
const char *ar_reach_name(ar_reach r);

typedef struct {
    int64_t id;
    int64_t account_id;
    char address[AR_ADDR_MAX]; /* host:port of its worker */
    double gflops;             /* claimed */
    int64_t mem_bytes;
    int cores;
    int64_t price_per_tflop; /* micro-credits per TFLOP */
    double reliability;      /* 0..1: its account's (ar_account.reliability) */
    bool online;
    int64_t last_heartbeat; /* unix seconds */
    ar_reach reach;         /* the market's last check of its worker */
    int64_t reach_checked;  /* when (unix seconds; 0: never) */
    int reach_failures;     /* checks failed in a row */
    /* what the provider last said of its owner's rules: not to be leased
     * now (and why), since when (unix seconds; 0: never said) */
    bool unavailable;
    char unavailable_why[AR_WHY_MAX];
    int64_t availability_changed;
    /* it said it is leaving its lease (a graceful leave), since when (unix
     * seconds); 0: it is not */
    int64_t leaving_since;
    /* what renters' drivers observed of its speed (ar_store_provider_observe):
     * FLOPs in busy seconds, and the FLOPs its claims promised in them; the
     * same summed over every provider of its account */
    double obs_flops, obs_busy_s, obs_claim_flops;
    double acct_obs_flops, acct_obs_claim_flops;
} ar_provider;

/* Register (or re-register: same account and address keep their id, the
 * profile is updated) a provider, online from now. id/online/last_heartbeat
 * and reliability (the account's) of *p are ignored. */
int ar_store_provider_register(ar_store *s, const ar_provider *p, int64_t *id_out);
/* Online, last_heartbeat = now; AR_ENOTFOUND for an unknown id. */
int ar_store_provider_heartbeat(ar_store *s, int64_t provider_id);
/* A Heartbeat: online, last_heartbeat = now, and the availability and the
 * leave it says (as ar_store_provider_set_availability and
 * ar_store_provider_set_leaving), in one write committed with others in a
 * group. AR_ENOTFOUND for an unknown id, AR_EINVAL for a bad why (nothing
 * written). */
int ar_store_provider_beat(ar_store *s, int64_t provider_id, bool unavailable, const char *why, bool leaving);
int ar_store_provider_mark_offline(ar_store *s, int64_t provider_id);
/* What a provider says of its owner's rules: unavailable (why: at most
 * AR_WHY_MAX - 1 bytes, no control characters) or available. The time of a
 * change is kept; saying the same again changes nothing. AR_ENOTFOUND for
 * no provider, AR_EINVAL for a bad why. */
int ar_store_provider_set_availability(ar_store *s, int64_t provider_id, bool unavailable, const char *why);
/* What a provider says of a graceful leave: leaving (its renter may hand
 * its place over, and no one leases it) or not. The time it began is kept
 * while it goes on. AR_ENOTFOUND for no provider. */
int ar_store_provider_set_leaving(ar_store *s, int64_t provider_id, bool leaving);
/* Marks offline every online provider silent for more than max_age_s
 * seconds; *count_out (may be NULL) gets how many. */
int ar_store_provider_expire(ar_store *s, int64_t max_age_s, int *count_out);
int ar_store_provider_get(ar_store *s, int64_t provider_id, ar_provider *out);
/* Providers by id; only the online ones when online_only. */
int ar_store_provider_list(ar_store *s, bool online_only, ar_provider **out, size_t *n);
/* The outcome of a check of the provider's worker, now: a success clears the
 * count of failures in a row, a failure adds one. AR_ENOTFOUND for no
 * provider. */
int ar_store_provider_set_reach(ar_store *s, int64_t provider_id, ar_reach reach);
/* *out: the provider is a member of a live (not released) lease. A worker
 * hosts one stage at a time, so the market leases it to one job at a time. */
int ar_store_provider_leased(ar_store *s, int64_t provider_id, bool *out);
/* Adds an observation of a provider's speed: `flops` of its plan's work
 * done in `busy_s` seconds, which its claim then said would take
 * claim_flops FLOPs. All finite and >= 0. */
int ar_store_provider_observe(ar_store *s, int64_t provider_id, double flops, double busy_s, double claim_flops);
/* Everything observed so far over all providers: the market's reference. */
int ar_store_speed_totals(ar_store *s, double *flops, double *claim_flops);

/* One sample of a lease stage's busy time since its run began, as the
 * renter's driver reported it after `step` completed steps. */
typedef struct {
    int64_t provider_id, step;
    double busy_s, wall_s;
} ar_stage_sample;
/* Replaces the last sample of (lease, stage) with *now; *prev gets the one
 * it replaces, *had whether there was one. */
int ar_store_stage_sample_swap(ar_store *s, int64_t lease_id, int stage, const ar_stage_sample *now,
                               ar_stage_sample *prev, bool *had);

/* ---- jobs ------------------------------------------------------------------ */

typedef enum {
    AR_JOB_QUEUED,
    AR_JOB_RUNNING,
    AR_JOB_DONE,
    AR_JOB_FAILED,
    AR_JOB_CANCELLED,
} ar_job_status;

const char *ar_job_status_name(ar_job_status st);
/* AR_EINVAL for an unknown name */
int ar_job_status_parse(const char *name, ar_job_status *out);

typedef struct {
    int64_t id;
    int64_t renter_id;
    ar_job_status status;
    char *spec; /* owned: free with ar_store_job_clear / ar_store_jobs_free */
    int64_t created;
    int64_t step;        /* last completed step */
    int64_t max_credits; /* micro-credits the job may spend; 0 = no cap */
    int64_t spent;       /* micro-credits paid so far for this job */
} ar_job;

int ar_store_job_create(ar_store *s, int64_t renter_id, const char *spec, int64_t max_credits,
                        int64_t *id_out);
/* A job's status and step; a job that stops running (done, failed,
 * cancelled) is stamped with the time it ended, the start of its escrow's
 * settling window; one running again loses the stamp. */
int ar_store_job_update(ar_store *s, int64_t job_id, ar_job_status status, int64_t step);
int ar_store_job_get(ar_store *s, int64_t job_id, ar_job *out);
/* Jobs by id, those of one renter (renter_id > 0) or all (0). */
int ar_store_job_list(ar_store *s, int64_t renter_id, ar_job **out, size_t *n);
void ar_store_job_clear(ar_job *j);
void ar_store_jobs_free(ar_job *jobs, size_t n);

/* One point of a job's loss curve, as its driver reported it. */
typedef struct {
    int64_t step; /* the completed step (0-based) */
    double loss;
} ar_job_point;

/* The training loss of `step` of a job (a step reported again replaces its
 * loss: a run resumed from a checkpoint redoes steps). AR_EINVAL for a
 * negative step or a loss that is not finite, AR_ENOTFOUND for no job. */
int ar_store_job_progress_record(ar_store *s, int64_t job_id, int64_t step, double loss);
/* A job's reported losses by step; *out is freed with ar_free. */
int ar_store_job_progress(ar_store *s, int64_t job_id, ar_job_point **out, size_t *n);

/* ---- a running job as its driver sees it (the dashboard) ---------------------- */

/* A job's validation loss after `step` completed steps (a step reported
 * again replaces it). AR_EINVAL for a negative step or a loss that is not
 * finite, AR_ENOTFOUND for no job. */
int ar_store_job_val_record(ar_store *s, int64_t job_id, int64_t step, double loss);
/* A job's validation losses by step; *out is freed with ar_free. */
int ar_store_job_val(ar_store *s, int64_t job_id, ar_job_point **out, size_t *n);
/* The training losses of steps after `after_step` (-1: all), by step: what
 * a dashboard polling for new points needs. */
int ar_store_job_progress_since(ar_store *s, int64_t job_id, int64_t after_step,
                                ar_job_point **out, size_t *n);

#define AR_UNIT_MAX 16

/* The latest snapshot of a running job. */
typedef struct {
    int64_t step;          /* completed steps when it was taken */
    int64_t total_steps;   /* the steps the run plans */
    double items_per_s;    /* recent throughput */
    char unit[AR_UNIT_MAX]; /* of items_per_s: "tokens" or "samples" */
    double eta_s;          /* seconds left, as the driver estimates them */
    double wall_s;         /* the driver's wall time of training steps so far */
    char *plan;            /* the plan as a JSON document, or NULL; owned */
    int64_t updated;       /* unix seconds */
} ar_job_live;

/* One stage's busy and idle seconds since its run began, sampled after
 * `step` completed steps, with the driver's wall time then. */
typedef struct {
    int64_t step;
    int stage;
    double wall_s, busy_s, idle_s;
} ar_stage_time;

/* Record a snapshot of a job and its stages' times (one transaction): the
 * snapshot replaces the previous one, except that a NULL plan keeps the plan
 * already stored; the stage times are added to the job's timeline (a sample
 * of the same step and stage again replaces it). AR_EINVAL for values out of
 * range, AR_ENOTFOUND for no job. */
int ar_store_job_live_set(ar_store *s, int64_t job_id, const ar_job_live *live,
                          const ar_stage_time *times, size_t n_times);
/* The latest snapshot; AR_ENOTFOUND when the job has none. Clear it with
 * ar_store_job_live_clear. */
int ar_store_job_live_get(ar_store *s, int64_t job_id, ar_job_live *out);
void ar_store_job_live_clear(ar_job_live *l);
/* A job's stage-time samples by step, then stage; *out freed with ar_free. */
int ar_store_job_stage_times(ar_store *s, int64_t job_id, ar_stage_time **out, size_t *n);

/* ---- market-wide figures (the dashboard's public overview) ------------------------ */

typedef struct {
    int64_t providers, providers_online;
    double gflops_online;    /* the online providers' combined GFLOP/s */
    int64_t jobs, jobs_running;
    int64_t credits_moved;   /* micro-credits paid by renters to providers, net of reversals */
    int64_t steps_paid;      /* (job, step, stage) pieces of work paid */
} ar_market_totals;

int ar_store_totals(ar_store *s, ar_market_totals *out);

/* What a provider earned in one second of work: the usage paid to it. */
typedef struct {
    int64_t provider_id;
    int64_t time;   /* unix seconds */
    int64_t amount; /* micro-credits */
    int64_t steps;  /* pieces of work paid in that second */
} ar_earning;

/* The earnings of the providers of one account, by provider, then time;
 * *out freed with ar_free. */
int ar_store_provider_earnings(ar_store *s, int64_t account_id, ar_earning **out, size_t *n);

/* ---- leases ---------------------------------------------------------------- */

/* One provider's place in a job's plan. `stage` is the member's slot in the
 * plan: the stage index, or a distinct index per tensor-parallel shard, so
 * that (job, step, stage) names one piece of work. */
typedef struct {
    int64_t provider_id;
    int stage;
    int64_t flops_per_step;  /* the market's, from the plan: what a step of it is paid */
    int64_t price_per_tflop; /* micro-credits per TFLOP, fixed for the lease */
    int first_unit, last_unit; /* the model's units it holds [first, last) */
    /* the last step of this member's work that audits verified (-1: none):
     * payments up to it are released, and a loss claim reverses nothing up
     * to it */
    int64_t verified_step;
} ar_lease_member;

/* What a lease's plan was priced from: the model spec (its JSON) and the
 * micro-batch shape. */
typedef struct {
    const char *spec;
    int mb_rows, micro_batches, schedule;
} ar_lease_plan;

typedef struct {
    int64_t id;
    int64_t job_id;
    int64_t renter_id;
    int64_t created;
    bool released;
    int64_t estimate; /* micro-credits for the estimated steps */
    bool has_plan;    /* made with a plan (every lease since schema 7) */
    int mb_rows, micro_batches, schedule;
    int64_t plan;     /* the plan's number: 0, then one more each time the market re-plans */
} ar_lease;

/* Leases `members` to `job_id` (which must belong to renter_id) for about
 * `est_steps` steps. The estimate, sum(cost(flops_per_step, price)) *
 * est_steps, is checked up front against the renter's balance and against
 * max_credits (0: no cap besides the balance): when either cannot cover it,
 * AR_ELIMIT and a message that gives the estimate, and nothing is written.
 * On success the lease token (hash stored) goes to token_out; the driver gives
 * it to the leased workers, which accept it for this job only. lease_id_out
 * and estimate_out may be NULL. */
int ar_store_lease_create(ar_store *s, int64_t job_id, int64_t renter_id,
                          const ar_lease_member *members, size_t n_members, int64_t est_steps,
                          int64_t max_credits, const ar_lease_plan *plan, char token_out[AR_TOKEN_LEN],
                          int64_t *lease_id_out, int64_t *estimate_out);
/* The model spec a lease was priced from (*out malloc'd: free()); NULL
 * when it has none. */
int ar_store_lease_spec(ar_store *s, int64_t lease_id, char **out);
/* The live (not released) lease of a token; AR_ENOTFOUND otherwise. */
int ar_store_lease_auth(ar_store *s, const char *token, ar_lease *out);
int ar_store_lease_get(ar_store *s, int64_t lease_id, ar_lease *out);
int ar_store_lease_members(ar_store *s, int64_t lease_id, ar_lease_member **out, size_t *n);
int ar_store_lease_release(ar_store *s, int64_t lease_id);

/* ---- tickets ----------------------------------------------------------------- */

/* A lease member's ticket is the one secret its worker gets (in the Load):
 * it lets that provider's worker load a stage of that lease and nothing
 * else. It is HMAC-SHA256(lease token, "arceus ticket v1" || lease id ||
 * provider id), in hex: as unpredictable as the lease token (32 bytes of
 * RAND_bytes), bound to one (lease, provider) pair, useless for finding the
 * lease token or another member's ticket, and the same whenever it is
 * issued again (a renter's ReplaceProvider asked twice gets the same
 * answer). The store keeps only its SHA-256. */
int ar_store_ticket_derive(const char *lease_token, int64_t lease_id, int64_t provider_id,
                           char ticket_out[AR_TOKEN_LEN]);
/* Issues (again) the ticket of member provider_id of live lease lease_id to
 * the holder of the lease's token: AR_ENOTFOUND when the token is not that
 * live lease's or the provider is not a member. */
int ar_store_ticket_issue(ar_store *s, int64_t lease_id, int64_t provider_id, const char *lease_token,
                          char ticket_out[AR_TOKEN_LEN]);
/* The lease and provider a ticket was issued for, when that lease is live
 * and the provider still a member of it; AR_ENOTFOUND otherwise. */
int ar_store_ticket_auth(ar_store *s, const char *ticket, int64_t *lease_id, int64_t *provider_id);

/* ---- usage and payment --------------------------------------------------- */

typedef enum {
    AR_USAGE_PAID, /* new: one transfer renter -> escrow, held for the provider */
    AR_USAGE_DUP,  /* already paid to this provider: nothing written */
} ar_usage_result;

/* Provider `provider_id` completed `stage` of `step` of `job_id` (under the
 * job's latest lease and its plan): the renter pays cost(flops, price) into
 * escrow, held for the provider, in one transaction with the usage row.
 * Paid once per (lease, plan, step, stage, provider) (see store_sqlite.c
 * for the policy); a lost provider's contested payment for the same step
 * is reversed to the renter in the same transaction. AR_ELIMIT, nothing
 * written, when the renter's balance or the job's max_credits cannot cover
 * it. result_out may be NULL. */
int ar_store_usage_record(ar_store *s, int64_t job_id, int64_t step, int64_t provider_id,
                          int stage, int64_t flops, int64_t price_per_tflop,
                          ar_usage_result *result_out);
/* One stage of one step as its driver reports it: who completed it and how
 * many FLOPs it took. */
/* What a stage commits to for one step (train/pipeline.h, ar_step_digests):
 * five SHA-256 digests, state before the step, ACT in, ACT out, GRAD in,
 * GRAD out. */
#define AR_STAGE_DIGEST_BYTES 160
typedef struct {
    int stage;
    int64_t provider_id;
    int64_t flops;
    bool has_digests; /* the driver forwards what the stage committed */
    uint8_t digests[AR_STAGE_DIGEST_BYTES];
} ar_stage_usage;

/* A completed step of a lease's job, to be paid (ar_store_step_settle). */
typedef struct {
    int64_t lease_id;
    int64_t step;
    const ar_stage_usage *stages;
    size_t n_stages;
    bool has_loss; /* the step's training loss, kept as the job's curve */
    double loss;
} ar_step_report;

/* Checks a step's stages against the members of its lease and gives each
 * stage its price and the FLOPs it is paid for (prices[i] micro-credits per
 * TFLOP and flops[i] for stages[i]): AR_OK, or an error (with its message)
 * that refuses the whole report. Called with the store locked: it must not
 * call the store. */
typedef int (*ar_step_check)(void *ctx, const ar_lease_member *members, size_t n_members,
                             const ar_stage_usage *stages, size_t n_stages, int64_t *prices, int64_t *flops);

typedef struct {
    int64_t paid;    /* micro-credits paid for this report (duplicates pay nothing) */
    int64_t spent;   /* what the job has spent now */
    int64_t balance; /* the renter's balance now */
    int duplicates;  /* stages already paid to the same provider */
    int reversed;    /* a lost provider's contested payments reversed by this redo */
} ar_step_settlement;

/* Pays a completed step in ONE transaction: it reads the live lease and its
 * members, asks `check` for each stage's price, pays every stage as
 * ar_store_usage_record would (into escrow, once per (lease, plan, step,
 * stage, provider): duplicates write nothing), keeps the step's
 * loss (when has_loss and finite), marks the job running with step + 1
 * steps done, and reads back what the job has spent and the renter's
 * balance. AR_ENOTFOUND when the lease is not live; check's error refuses
 * the report and writes nothing. A stage that the renter's balance or the
 * job's max_credits cannot cover: AR_ELIMIT; the stages before it stay paid
 * (and nothing after it is written), exactly as when each stage was paid in
 * a transaction of its own. */
int ar_store_step_settle(ar_store *s, const ar_step_report *r, ar_step_check check, void *ctx,
                         ar_step_settlement *out);

/* A lost member's account's reliability is multiplied by this (the market
 * ranks providers by reliability squared). */
#define AR_RELIABILITY_AFTER_LOSS 0.8

/* The market accepted that a member of a live lease was lost mid-run (the
 * rules checked the claim). In one transaction: the provider is marked
 * offline, its account's reliability multiplied by
 * AR_RELIABILITY_AFTER_LOSS, and the renter's confirmed claims counted; its
 * held payments of the lease's job for steps >= kept_steps and after its
 * verified step are contested: nothing moves now, and each is reversed to
 * the renter when its step is paid to another provider at the stage that
 * took over its work (the replacement's; any stage after a re-plan). Its
 * place goes to `replacement` (provider_id and price; stage, units and
 * FLOPs stay the lost member's), or, replacement NULL, the lease's members
 * become replan[0..n_replan) (stage, units and FLOPs each; the plan number
 * grows). The settlement is kept (ar_store_lease_replacement), so that a
 * driver whose answer was lost can ask again and get the same one.
 * AR_ENOTFOUND when the lease is not live or the provider not in it. */
int ar_store_lease_replace(ar_store *s, int64_t lease_id, int64_t lost_provider_id, int64_t kept_steps,
                           const ar_lease_member *replacement, const ar_lease_member *replan, size_t n_replan,
                           int *contested_out);

/* How the loss of a lease member was settled by ar_store_lease_replace. */
typedef struct {
    int stage;
    int64_t kept_steps;
    int64_t replacement_id; /* the provider that took its place; 0: none was free */
    int contested;          /* its payments contested */
} ar_lease_replacement;
/* The last settlement of lost_provider_id's loss in lease_id; AR_ENOTFOUND
 * when it was never reported lost there. */
int ar_store_lease_replacement(ar_store *s, int64_t lease_id, int64_t lost_provider_id,
                               ar_lease_replacement *out);
/* A graceful leave: member leaver_id of live lease lease_id said it is
 * leaving and its renter has taken its stage's state after `step` completed
 * steps. In one transaction its place (stage and FLOPs) goes to
 * replacement->provider_id at replacement->price_per_tflop, its ticket ends,
 * and the hand-over is kept (ar_store_lease_handover) so that a driver whose
 * answer was lost can ask again. Not a loss: no payment moves, the leaver's
 * reliability and online state stay. AR_ENOTFOUND when the lease is not
 * live or the leaver not in it; AR_ELIMIT when the leaver has not said it is
 * leaving. */
int ar_store_lease_hand_over(ar_store *s, int64_t lease_id, int64_t leaver_id, int64_t step,
                             const ar_lease_member *replacement);

/* How a graceful leave was settled by ar_store_lease_hand_over. */
typedef struct {
    int stage;
    int64_t step;
    int64_t replacement_id;
} ar_lease_handover;
/* The last hand-over of leaver_id's place in lease_id; AR_ENOTFOUND when
 * there was none. */
int ar_store_lease_handover(ar_store *s, int64_t lease_id, int64_t leaver_id, ar_lease_handover *out);

/* The renter's driver died and a new one resumes job_id (the renter's) from
 * a checkpoint that kept kept_steps steps: the job's live leases are
 * released (their providers are free for the new lease). Nothing is
 * reversed: the work was done, and the renter's checkpoint is its own
 * business. AR_ENOTFOUND for another's job. *status_out (may be NULL) gets
 * the job's status before. */
int ar_store_job_resume(ar_store *s, int64_t job_id, int64_t renter_id, int64_t kept_steps,
                        ar_job_status *status_out);

/* ---- escrow and audits --------------------------------------------------------- */

/* A running job whose last payment is this old counts as ended for its
 * escrow (a renter's driver that died and never came back). */
#define AR_ESCROW_ABANDONED_S 86400

/* Releases to their providers' accounts the payments escrow holds (held or
 * contested) that are due at `now`: those at or before their lease
 * member's verified step, and every one of a job that ended window_s or
 * more ago (or was abandoned, AR_ESCROW_ABANDONED_S). One transaction; each
 * release is a transfer escrow -> provider ("release"), and raises the
 * provider account's reliability (AR_RELIABILITY_GROWTH) when another
 * account paid for it. *released_out (may be NULL): payments released. */
int ar_store_escrow_release(ar_store *s, int64_t now, int64_t window_s, int *released_out);
/* The hook for audits that pass: member provider_id of lease_id has its
 * work up to `step` verified (its verified step only grows), and its held
 * payments of the lease's job up to that step are released at once.
 * AR_ENOTFOUND for no such member. */
int ar_store_member_verified(ar_store *s, int64_t lease_id, int64_t provider_id, int64_t step,
                             int *released_out);

/* A confirmed audit failure and its evidence (job, step, stage, digests). */
typedef struct {
    int64_t lease_id, provider_id, step;
    int stage;
    const char *evidence; /* at most 64 KiB of text */
} ar_audit_failure;
/* The hook for a confirmed audit failure, in one transaction: the failure
 * is recorded with its evidence, every payment escrow holds for the
 * provider in the lease's job goes back to the renter ("reversal"), and
 * the provider's account's reliability drops to 0. *returned_out (may be
 * NULL) gets the micro-credits given back. AR_ENOTFOUND for no such lease
 * or a provider that never served it. */
int ar_store_audit_failure(ar_store *s, const ar_audit_failure *f, int64_t *returned_out);
/* The digests a stage committed for a step of a job, by the provider that
 * did it (the first report of them stands). AR_ENOTFOUND when none came. */
int ar_store_stage_digests(ar_store *s, int64_t job_id, int64_t step, int stage, int64_t provider_id,
                           uint8_t out[AR_STAGE_DIGEST_BYTES]);
/* Whether an audit failure of provider_id in job_id is on record. */
int ar_store_audit_failed(ar_store *s, int64_t job_id, int64_t provider_id, bool *out);

/* ---- ledger ---------------------------------------------------------------- */

typedef struct {
    int64_t id;
    int64_t transfer_id;
    int64_t account_id;
    int64_t amount; /* micro-credits, + received, - paid */
    char reason[AR_REASON_MAX]; /* "mint", "usage" (into escrow), "release" (to the provider), "reversal" */
    int64_t job_id; /* 0 when none */
    int64_t step;   /* -1 when none */
    int64_t created;
} ar_ledger_row;

/* Rows by id: those of one account (> 0) or all (0). */
int ar_store_ledger_list(ar_store *s, int64_t account_id, ar_ledger_row **out, size_t *n);
/* Sum of every ledger row: 0 unless something is badly wrong. */
int ar_store_ledger_sum(ar_store *s, int64_t *sum_out);
/* Full audit: sum zero, every transfer exactly two rows that cancel, every
 * cached balance equal to its rows, no user balance below zero, the escrow's
 * balance the sum of the payments it holds. AR_EINTERNAL
 * with the first discrepancy otherwise. *transfers_out (may be NULL) gets the
 * number of transfers. */
int ar_store_ledger_check(ar_store *s, int64_t *transfers_out);

#endif
