/* The Market service (proto/arceus.proto): the market server over the store
 * (market/store.h), and the client side of its RPCs for the CLI.
 *
 * Every call is authenticated by an account token (UNAUTHENTICATED when it is
 * missing or unknown); every field of a request is checked before the
 * database is touched. Providers that send no heartbeat for offline_after_s
 * seconds are marked offline by a sweep thread of the server. */
#ifndef AR_NET_MARKET_H
#define AR_NET_MARKET_H

#include "market/rules.h" /* the lease types, limits and the plan (market/dashboard.h) */
#include "net/net.h"
#include "train/plan.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* gRPC status codes the market uses besides those of net.h. */
#define AR_STATUS_PERMISSION_DENIED 7
#define AR_STATUS_UNAUTHENTICATED 16

#define AR_MARKET_DEFAULT_OFFLINE_AFTER_S 15
/* short: a worker answers Hello on its own thread, even mid-step */
#define AR_MARKET_DEFAULT_REACH_TIMEOUT_S 2.0
#define AR_MARKET_MAX_PROVIDERS_LIMIT 1000000
/* Request limits (checked by the server; the client does not pre-check). */
#define AR_MARKET_MAX_GFLOPS 1e9             /* 1 EFLOP/s per provider */
#define AR_MARKET_MAX_MEM ((int64_t)1 << 52) /* 4 PiB */
#define AR_MARKET_MAX_CORES 65536
#define AR_MARKET_MAX_PRICE AR_CREDITS(1000000) /* micro-credits per TFLOP */

/* ---- the server ----------------------------------------------------------- */

typedef struct {
    const char *listen;  /* HOST:PORT; port 0 picks a free one */
    const char *db_path; /* SQLite file, created if missing */
    int offline_after_s; /* 0: AR_MARKET_DEFAULT_OFFLINE_AFTER_S */
    /* providers one account may register; 0: AR_MARKET_DEFAULT_MAX_PROVIDERS */
    int max_providers_per_account;
    /* The market checks that it reaches a provider's worker (a Hello within
     * this many seconds) before leasing it: at its registration, at its
     * heartbeats and when a lease considers it (market/rules.h). 0:
     * AR_MARKET_DEFAULT_REACH_TIMEOUT_S; below 0: no checks (a market that
     * cannot reach its providers' network), every provider leasable. A
     * market listening on loopback lets its providers' workers be on
     * loopback (they are refused otherwise). */
    double reach_timeout_s;
    /* The escrow's settling window: what a job paid is released to its
     * providers this many seconds after the job ends (at once when 0). */
    int64_t escrow_window_s;
    /* The relay for providers the market cannot dial (net/relay.h;
     * docs/DESIGN.md, "The relay"): relay_listen runs one inside the market
     * (HOST:PORT, which providers and renters dial), relay_at names one run
     * apart (arceus relay), whose key relay_key must then be (the built-in
     * one draws a random key without it). NULL: no relay. Needs the reach
     * checks (reach_timeout_s >= 0). */
    const char *relay_listen, *relay_at;
    const unsigned char *relay_key; /* AR_RELAY_KEY_BYTES, or NULL */
} ar_market_config;

typedef struct ar_market ar_market;

/* Open the database, bind, start serving and sweeping; *addr gets
 * "HOST:PORT" with the real port. */
int ar_market_start(const ar_market_config *c, ar_market **out, char *addr, size_t addr_size);
/* Cancel every call, stop the sweep and the relay, close the database. */
void ar_market_stop(ar_market *m);
/* The relay's address as providers and renters are told it ("": none). */
const char *ar_market_relay(const ar_market *m);

/* ---- the client side ------------------------------------------------------ */

/* A non-OK status gives AR_EPROTO with the server's message in
 * ar_last_error() and the gRPC code in *status (may be NULL). */

typedef struct {
    double gflops;
    int64_t mem_bytes;
    int cores;
    int64_t price_per_tflop; /* micro-credits per TFLOP */
} ar_market_profile;

int ar_market_register(ar_client *c, const char *token, const char *address,
                       const ar_market_profile *p, int64_t *provider_id, int *offline_after_s,
                       int *status);
int ar_market_heartbeat(ar_client *c, const char *token, int64_t provider_id, int *status);
/* A heartbeat that also says whether the owner's rules let the machine be
 * leased now: unavailable, and why (at most AR_WHY_MAX - 1 bytes); and
 * whether it is leaving its lease (a graceful leave: HeartbeatRequest.leaving). */
int ar_market_heartbeat_availability(ar_client *c, const char *token, int64_t provider_id, bool unavailable,
                                     const char *why, bool leaving, int *status);

/* A registration as the market answers it: the id, how often to beat, how
 * the market reached the worker, and its relay (net/relay.h) with this
 * provider's credential there ("" when the market has none). */
typedef struct {
    int64_t provider_id;
    int offline_after_s;
    ar_reach reach;
    char relay[AR_ADDR_MAX];
    char relay_credential[65];
} ar_market_registration;
int ar_market_register_full(ar_client *c, const char *token, const char *address, const ar_market_profile *p,
                            ar_market_registration *out, int *status);
/* A heartbeat with the owner's availability (as above) that also says how
 * the market reaches the worker now (reach may be NULL). */
int ar_market_heartbeat_full(ar_client *c, const char *token, int64_t provider_id, bool unavailable,
                             const char *why, bool leaving, ar_reach *reach, int *status);

typedef struct {
    ar_provider p; /* account_id is 0: the market names the account instead */
    char account[AR_NAME_MAX];
    double speed_gflops; /* the market's estimate (ar_rules_speed): the claim until observed */
} ar_market_provider;

/* Online providers (all when include_offline); *out is malloc'd (free()). */
int ar_market_providers(ar_client *c, const char *token, bool include_offline,
                        ar_market_provider **out, size_t *n, int *status);

/* The ledger of `account` (NULL or "": the caller's own); rows malloc'd.
 * *balance is spendable, *pending (may be NULL) what escrow holds for it. */
int ar_market_ledger(ar_client *c, const char *token, const char *account,
                     char account_out[AR_NAME_MAX], ar_ledger_row **rows, size_t *n,
                     int64_t *balance, int64_t *pending, int *status);
int ar_market_balance(ar_client *c, const char *token, char account_out[AR_NAME_MAX],
                      int64_t *balance, int *status);

/* ---- leases ---------------------------------------------------------------- */

/* The request, the lease and its providers are the market's own types
 * (market/rules.h); the client fills them from the replies. */

/* Create a job and lease `devices` online providers for it. A budget that
 * cannot cover the estimate: AR_EPROTO with status FAILED_PRECONDITION and
 * the market's message (which gives the estimate). */
int ar_market_acquire(ar_client *c, const char *token, const ar_market_lease_request *req,
                      ar_market_lease *out, int *status);

/* one stage's usage of a step (market/store.h) */
typedef ar_stage_usage ar_market_stage_usage;

/* Step `step` completed: each stage is paid once (a repeated report of the
 * same step pays nothing new). paid/spent/balance may be NULL. */
int ar_market_report(ar_client *c, const char *lease_token, int64_t step,
                     const ar_market_stage_usage *u, size_t n, int64_t *paid, int64_t *spent,
                     int64_t *balance, int *status);
/* ar_market_report with the step's training loss, which the market keeps as
 * the job's loss curve (`arceus job ID`); a NaN loss sends none. */
int ar_market_report_loss(ar_client *c, const char *lease_token, int64_t step, double loss,
                          const ar_market_stage_usage *u, size_t n, int64_t *paid,
                          int64_t *spent, int64_t *balance, int *status);
/* Provider lost_provider_id of the lease stopped answering; the job goes
 * back to its checkpoint of kept_steps steps. The market checks the claim
 * (market/rules.h, ar_rules_replace): one it cannot confirm yet is AR_EPROTO
 * with status AR_STATUS_ABORTED (ask again), a false one AR_EPROTO with
 * FAILED_PRECONDITION. Confirmed, out->found and out->replacement say who
 * took its place (none: the lease was re-planned over those left), and
 * out->members[0..out->n) are the lease's members now, by stage, with their
 * units and FLOPs. */
int ar_market_replace(ar_client *c, const char *lease_token, int64_t lost_provider_id, int64_t kept_steps,
                      const char *reason, ar_market_replacement *out, int *status);
/* A graceful leave: member provider_id of the lease said it is leaving and
 * the driver has its stage's state after `step` completed (and paid)
 * steps. The market leases a free provider offering at least min_mem bytes
 * in its place: *found 1 and *replacement filled (with its ticket), or
 * *found 0 when none is free (nothing changes). Nothing is reversed.
 * spent (may be NULL) gets the job's total. */
/* ReportAudit: an audit of member provider_id (stage) at `step` passed
 * (ev NULL), or failed with its evidence. *confirmed: the market's replay
 * confirmed the failure; *returned: what went back to the renter. */
int ar_market_report_audit(ar_client *c, const char *lease_token, int64_t provider_id, int stage, int64_t step,
                           const ar_audit_evidence *ev, bool *confirmed, int64_t *returned, int *status);
int ar_market_hand_over(ar_client *c, const char *lease_token, int64_t provider_id, int64_t step, int64_t min_mem,
                        ar_market_leased *replacement, int *found, int64_t *spent, int *status);
/* status_name: "done", "failed" or "cancelled"; steps: completed steps. */
int ar_market_release(ar_client *c, const char *lease_token, const char *status_name,
                      int64_t steps, int64_t *spent, int *status);
/* The addresses of a lease's members, as CheckLease answers them, and what
 * the asking provider is paid to hold (has_plan: the lease fixes it): the
 * model's units [first_unit, last_unit) of the spec whose canonical JSON
 * (ar_spec_to_json) has SHA-256 spec_sha256, in micro-batches of mb_rows
 * rows, micro_batches per step. */
typedef struct {
    size_t n;
    char addresses[AR_MARKET_MAX_DEVICES][AR_ADDR_MAX];
    bool has_plan;
    int first_unit, last_unit;
    char spec_sha256[AR_TOKEN_LEN];
    int mb_rows, micro_batches;
} ar_market_members;

/* AR_OK when `ticket` is provider_id's (owned by the account of `token`)
 * for a live lease that still includes it; AR_EPROTO with the market's
 * reason otherwise. members (may be NULL) gets the lease's member
 * addresses. */
int ar_market_check_lease(ar_client *c, const char *token, const char *ticket, int64_t provider_id,
                          int64_t *job_id, ar_market_members *members, int *status);

/* ---- progress for the dashboard ------------------------------------------------ */

/* The plan's stages and members are the dashboard's types (market/dashboard.h). */

typedef struct {
    int64_t step, total_steps; /* completed and planned steps */
    double items_per_s;        /* recent throughput */
    const char *unit;          /* "tokens" or "samples" */
    double eta_s;
    bool has_val;              /* an evaluation since the last report */
    int64_t val_step;
    double val_loss;
    double wall_s;             /* wall time of the training steps so far */
    size_t n_stages;           /* busy_s[i], idle_s[i]: stage i since the run began */
    const double *busy_s, *idle_s;
    /* the plan, when n_plan > 0, with its links (n_links of them) */
    size_t n_plan;
    const ar_market_plan_stage *plan;
    size_t n_links;
    const ar_market_plan_link *links;
    const char *model, *schedule;
    int micro_batches;
    double predicted_bubble;
} ar_market_progress;

/* A running job's progress for the market's dashboard (ReportProgress). */
int ar_market_report_progress(ar_client *c, const char *lease_token, const ar_market_progress *p,
                              int *status);
/* The same in two halves, so that the request can be built on one thread
 * (it points into the run's state) and sent from another: pack it (*buf
 * malloc'd, free() it), then send the packed bytes. */
int ar_market_progress_pack(const char *lease_token, const ar_market_progress *p, void **buf, size_t *len);
int ar_market_report_progress_packed(ar_client *c, const void *buf, size_t len, int *status);

/* ---- jobs ------------------------------------------------------------------ */

/* The jobs of the account of `token`, by id; *out is freed with
 * ar_store_jobs_free (renter_id is 0). */
int ar_market_jobs(ar_client *c, const char *token, ar_job **out, size_t *n, int *status);
/* One job of the caller's and its reported losses (*points freed with
 * ar_free); another account's job: AR_EPROTO, status PERMISSION_DENIED. */
int ar_market_job(ar_client *c, const char *token, int64_t job_id, ar_job *job,
                  ar_job_point **points, size_t *n, int *status);

#endif
