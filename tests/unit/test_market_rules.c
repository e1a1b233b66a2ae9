/* The market's rules (market/rules.h) called directly, without a server,
 * over a real SQLite file in a temporary folder: how providers are ranked
 * (by observed speed, an overstated claim losing rank), what a lease gets
 * and what refuses it, how the lease's plan fixes the price of a step, how a
 * step is paid (once, into escrow, within the job's cap, the books summing
 * to zero), how a loss claim is checked and settled and asked about again,
 * the audit hooks, what a plan costs, the dashboard's plan JSON, and credits
 * as text and back. */
#include "market/dashboard.h"
#include "market/money.h"
#include "market/rules.h"
#include "market/store.h"

#include "arceus.h"
#include "core/core.h"
#include "nn/spec.h"
#include "train/audit.h"
#include "tmpfiles.h"

#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

TestSuite(market_rules, .init = tmp_make, .fini = tmp_remove);

static const int64_t TF = 1000000000000LL; /* FLOPs in a TFLOP */
/* The leases' model: an MLP of 1000-wide linear layers in micro-batches of
 * 1000 rows, so that each unit takes 6e9 FLOPs a step (2*M*N*K forward,
 * twice that backward), 6000 micro-credits at 1 credit per TFLOP. */
#define UNIT_FLOPS 6000000000LL
#define UNIT_COST 6000
#define MB_ROWS 1000

static ar_store *open_db(void)
{
    ar_store *s = NULL;
    cr_assert_eq(ar_store_open(tmp_path("market.db"), &s), AR_OK, "%s", ar_last_error());
    return s;
}

static int64_t new_account(ar_store *s, const char *name, int64_t micro)
{
    char tok[AR_TOKEN_LEN];
    int64_t id = 0;
    cr_assert_eq(ar_store_account_create(s, name, micro, tok, &id), AR_OK, "%s", ar_last_error());
    return id;
}

static int64_t balance(ar_store *s, int64_t account)
{
    int64_t b = -1;
    cr_assert_eq(ar_store_account_balance(s, account, &b), AR_OK, "%s", ar_last_error());
    return b;
}

/* what escrow holds for an account's providers */
static int64_t pending(ar_store *s, int64_t account)
{
    int64_t b = -1;
    cr_assert_eq(ar_store_account_pending(s, account, &b), AR_OK, "%s", ar_last_error());
    return b;
}

static double reliability(ar_store *s, int64_t account)
{
    ar_account a;
    cr_assert_eq(ar_store_account_get(s, account, &a), AR_OK, "%s", ar_last_error());
    return a.reliability;
}

/* the spec of an MLP of `units` 1000-wide linear layers */
static const char *mlp_spec(int units)
{
    static char buf[256];
    char hidden[128] = "";
    for (int i = 0; i < units - 1; i++)
        snprintf(hidden + strlen(hidden), sizeof hidden - strlen(hidden), "%s1000", i ? ", " : "");
    snprintf(buf, sizeof buf,
             "{\"type\": \"mlp\", \"inputs\": 1000, \"hidden\": [%s], \"classes\": 1000, "
             "\"activation\": \"relu\", \"dropout\": 0.0}",
             hidden);
    return buf;
}

/* a provider of `account` at 127.0.0.1:port, registered through the rule */
static int64_t new_provider(ar_store *s, int64_t account, int port, double gflops, int64_t mem, int64_t price)
{
    ar_provider p = {.account_id = account, .gflops = gflops, .mem_bytes = mem, .cores = 4, .price_per_tflop = price};
    snprintf(p.address, sizeof p.address, "127.0.0.1:%d", port);
    int64_t id = 0;
    cr_assert_eq(ar_rules_register_provider(s, &p, &id), AR_OK, "%s", ar_last_error());
    return id;
}

static ar_provider provider(ar_store *s, int64_t id)
{
    ar_provider p;
    cr_assert_eq(ar_store_provider_get(s, id, &p), AR_OK, "%s", ar_last_error());
    return p;
}

static ar_job job_of(ar_store *s, int64_t id)
{
    ar_job j;
    cr_assert_eq(ar_store_job_get(s, id, &j), AR_OK, "%s", ar_last_error());
    ar_store_job_clear(&j); /* the numbers are what the tests read */
    return j;
}

/* The ledger sums to zero and passes the store's full audit. */
static void assert_books(ar_store *s)
{
    int64_t sum = 1;
    cr_assert_eq(ar_store_ledger_sum(s, &sum), AR_OK, "%s", ar_last_error());
    cr_assert_eq(sum, 0, "the ledger sums to %lld", (long long)sum);
    cr_assert_eq(ar_store_ledger_check(s, NULL), AR_OK, "%s", ar_last_error());
}

static size_t ledger_rows(ar_store *s)
{
    ar_ledger_row *rows = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_ledger_list(s, 0, &rows, &n), AR_OK, "%s", ar_last_error());
    ar_free(rows);
    return n;
}

static ar_lease lease_of(ar_store *s, int64_t id)
{
    ar_lease l;
    cr_assert_eq(ar_store_lease_get(s, id, &l), AR_OK, "%s", ar_last_error());
    return l;
}

/* A fake reachability check: answers from a table the test sets, and counts. */
typedef struct {
    bool up[8];       /* by port - 5001 */
    bool attached[8]; /* to the market's relay, by port - 5001 */
    int calls, relay_calls;
} fake_net;

static bool fake_probe(void *ctx, const char *address)
{
    fake_net *f = ctx;
    f->calls++;
    const char *colon = strrchr(address, ':');
    int port = colon ? atoi(colon + 1) : 0;
    return port >= 5001 && port < 5009 && f->up[port - 5001];
}

/* The same worker through the market's relay: attached[port - 5001]. */
static bool fake_relay_probe(void *ctx, int64_t provider_id, const char *address)
{
    fake_net *f = ctx;
    f->relay_calls++;
    const char *colon = strrchr(address, ':');
    int port = colon ? atoi(colon + 1) : 0;
    return provider_id > 0 && port >= 5001 && port < 5009 && f->attached[port - 5001];
}

/* ---- ranking ------------------------------------------------------------------- */

Test(market_rules, providers_rank_by_reliability_price_speed_then_memory_and_age)
{
    const int64_t G = (int64_t)1 << 30;
    /* one baseline and one provider differing from it in each factor */
    ar_provider ps[] = {
        {.id = 1, .gflops = 100, .mem_bytes = G, .price_per_tflop = AR_CREDITS(1), .reliability = 1.0},
        {.id = 2, .gflops = 100, .mem_bytes = G, .price_per_tflop = AR_CREDITS(1), .reliability = 0.5},
        {.id = 3, .gflops = 100, .mem_bytes = G, .price_per_tflop = AR_CREDITS(3), .reliability = 1.0},
        {.id = 4, .gflops = 200, .mem_bytes = G, .price_per_tflop = AR_CREDITS(1), .reliability = 1.0},
        {.id = 5, .gflops = 100, .mem_bytes = 2 * G, .price_per_tflop = AR_CREDITS(1), .reliability = 1.0},
        {.id = 6, .gflops = 100, .mem_bytes = G, .price_per_tflop = AR_CREDITS(1), .reliability = 1.0},
        /* a claimed reliability above 1 counts as 1 */
        {.id = 7, .gflops = 100, .mem_bytes = G, .price_per_tflop = AR_CREDITS(1), .reliability = 7.0},
    };
    size_t n = sizeof ps / sizeof ps[0];
    ar_ranked rk[sizeof ps / sizeof ps[0]];
    ar_rules_rank(ps, n, rk);
    /* 4: twice as fast; then 5: the baseline's score, more memory; then 1,
     * 6, 7: ties by id; then 3 (half the baseline's: (1 + 1) / (3 + 1)
     * credits) above 2 (a quarter: 0.5 squared) */
    const int64_t want[] = {4, 5, 1, 6, 7, 3, 2};
    for (size_t i = 0; i < n; i++)
        cr_expect_eq(rk[i].p->id, want[i], "rank %zu: provider %lld, not %lld", i, (long long)rk[i].p->id,
                     (long long)want[i]);
    cr_assert_float_eq(rk[0].score, 1.0, 1e-12);
    cr_assert_float_eq(rk[1].score, 0.5, 1e-12); /* half the best speed */
    cr_assert_float_eq(rk[5].score, 0.25, 1e-12);
    cr_assert_float_eq(rk[6].score, 0.125, 1e-12);
}

Test(market_rules, free_providers_leave_out_small_leased_and_offline_ones)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t owner = new_account(s, "owner", 0);
    const int64_t G = (int64_t)1 << 30;
    int64_t small = new_provider(s, owner, 5001, 100, G, AR_CREDITS(1));
    int64_t big = new_provider(s, owner, 5002, 100, 4 * G, AR_CREDITS(1));
    int64_t gone = new_provider(s, owner, 5003, 500, 4 * G, AR_CREDITS(1));
    int64_t busy_one = new_provider(s, owner, 5004, 100, 4 * G, AR_CREDITS(1));
    cr_assert_eq(ar_store_provider_mark_offline(s, gone), AR_OK);
    int64_t job = 0;
    cr_assert_eq(ar_store_job_create(s, renter, "held", 0, &job), AR_OK);
    ar_lease_member m = {.provider_id = busy_one, .stage = 0, .flops_per_step = TF, .price_per_tflop = AR_CREDITS(1)};
    char tok[AR_TOKEN_LEN];
    cr_assert_eq(ar_store_lease_create(s, job, renter, &m, 1, 1, 0, NULL, tok, NULL, NULL), AR_OK, "%s", ar_last_error());

    ar_provider *ps = NULL;
    ar_ranked *rk = NULL;
    size_t n = 0, busy = 0;
    cr_assert_eq(ar_rules_free_providers(s, 2 * G, &ps, &rk, &n, &busy), AR_OK, "%s", ar_last_error());
    cr_assert_eq(n, 1);
    cr_assert_eq(busy, 1);
    cr_assert_eq(rk[0].p->id, big);
    ar_free(rk);
    ar_free(ps);
    cr_assert_eq(ar_rules_free_providers(s, 0, &ps, &rk, &n, NULL), AR_OK, "%s", ar_last_error());
    cr_assert_eq(n, 2);
    cr_assert_eq(rk[0].p->id, big); /* same score: more memory first */
    cr_assert_eq(rk[1].p->id, small);
    ar_free(rk);
    ar_free(ps);
    ar_store_close(s);
}

/* ---- pricing ------------------------------------------------------------------- */

Test(market_rules, the_market_prices_a_model_and_splits_it_one_stage_per_provider)
{
    ar_market_model m;
    cr_assert_eq(ar_rules_model(mlp_spec(3), MB_ROWS, 1, 0, &m), AR_OK, "%s", ar_last_error());
    cr_assert_eq(m.units, 3);
    ar_device devs[2] = {{.gflops = 300, .mem_bytes = 1e9, .solo = 1}, {.gflops = 100, .mem_bytes = 1e9, .solo = 1}};
    ar_lease_member mem[2] = {{.provider_id = 1}, {.provider_id = 2}};
    /* the market's split: the faster provider takes two of the three layers */
    cr_assert_eq(ar_rules_split(&m, devs, 2, NULL, 0, mem), AR_OK, "%s", ar_last_error());
    cr_assert_eq(mem[0].stage, 0);
    cr_assert_eq(mem[0].first_unit, 0);
    cr_assert_eq(mem[0].last_unit, 2);
    cr_assert_eq(mem[0].flops_per_step, 2 * UNIT_FLOPS);
    cr_assert_eq(mem[1].stage, 1);
    cr_assert_eq(mem[1].first_unit, 2);
    cr_assert_eq(mem[1].last_unit, 3);
    cr_assert_eq(mem[1].flops_per_step, UNIT_FLOPS);
    cr_assert_eq(mem[1].verified_step, -1);
    /* the renter's split, checked */
    const uint32_t mine[2] = {1, 2}, short_of[2] = {1, 1}, over[2] = {2, 2}, empty[2] = {0, 3};
    cr_assert_eq(ar_rules_split(&m, devs, 2, mine, 2, mem), AR_OK, "%s", ar_last_error());
    cr_assert_eq(mem[0].last_unit, 1);
    cr_assert_eq(mem[1].flops_per_step, 2 * UNIT_FLOPS);
    cr_assert_eq(ar_rules_split(&m, devs, 2, short_of, 2, mem), AR_EINVAL);
    cr_assert_eq(ar_rules_split(&m, devs, 2, over, 2, mem), AR_EINVAL);
    cr_assert_eq(ar_rules_split(&m, devs, 2, empty, 2, mem), AR_EINVAL);
    cr_assert_eq(ar_rules_split(&m, devs, 2, mine, 1, mem), AR_EINVAL);
    /* one that does not fit the providers' memory */
    devs[0].mem_bytes = devs[1].mem_bytes = 1e6;
    cr_assert_eq(ar_rules_split(&m, devs, 2, mine, 2, mem), AR_ELIMIT);
    cr_assert_eq(ar_rules_split(&m, devs, 2, NULL, 0, mem), AR_ELIMIT);
    /* more providers than layers */
    ar_device four[4] = {devs[0], devs[0], devs[0], devs[0]};
    ar_lease_member m4[4];
    cr_assert_eq(ar_rules_split(&m, four, 4, NULL, 0, m4), AR_EINVAL);
    ar_rules_model_clear(&m);

    /* what the market refuses to price */
    char big[AR_MARKET_MAX_SPEC_BYTES + 2];
    memset(big, ' ', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    cr_assert_eq(ar_rules_model(big, MB_ROWS, 1, 0, &m), AR_EINVAL);
    cr_assert_eq(ar_rules_model("", MB_ROWS, 1, 0, &m), AR_EINVAL);
    cr_assert_eq(ar_rules_model("{\"type\": \"mlp\"}", MB_ROWS, 1, 0, &m), AR_EINVAL);
    cr_assert_eq(ar_rules_model("{\"type\": \"gpt\", \"block_size\": 8, \"n_layer\": 1, \"n_head\": 1, "
                                "\"n_embd\": 8}", MB_ROWS, 1, 0, &m), AR_EINVAL); /* no vocabulary */
    cr_assert_eq(ar_rules_model(mlp_spec(2), 0, 1, 0, &m), AR_EINVAL);
    cr_assert_eq(ar_rules_model(mlp_spec(2), MB_ROWS, 0, 0, &m), AR_EINVAL);
    cr_assert_eq(ar_rules_model(mlp_spec(2), MB_ROWS, 1, 2, &m), AR_EINVAL);
    cr_assert_eq(ar_rules_model(mlp_spec(2), AR_MARKET_MAX_MB_ROWS + 1, 1, 0, &m), AR_EINVAL);
}

Test(market_rules, a_plan_costs_the_sum_of_its_members_rounded_as_paid)
{
    ar_lease_member m[2] = {{.provider_id = 1, .stage = 0, .flops_per_step = 2 * TF, .price_per_tflop = AR_CREDITS(3)},
                            {.provider_id = 2, .stage = 1, .flops_per_step = 1500000, .price_per_tflop = 1000000}};
    int64_t per_step = 0, estimate = 0;
    cr_assert_eq(ar_rules_price_plan(m, 2, 10, &per_step, &estimate), AR_OK, "%s", ar_last_error());
    /* 6 credits, and 1.5 micro-credits rounded to 2 as ar_flops_cost pays it */
    cr_assert_eq(per_step, AR_CREDITS(6) + 2);
    cr_assert_eq(estimate, 10 * (AR_CREDITS(6) + 2));
    m[0].price_per_tflop = INT64_MAX / 2;
    m[0].flops_per_step = TF;
    m[1].price_per_tflop = INT64_MAX / 2;
    m[1].flops_per_step = 4 * TF;
    cr_assert_eq(ar_rules_price_plan(m, 2, 1, &per_step, NULL), AR_ELIMIT);
    m[1].flops_per_step = 0;
    cr_assert_eq(ar_rules_price_plan(m, 2, 3, NULL, &estimate), AR_ELIMIT);
    cr_assert_eq(ar_rules_price_plan(m, 2, -1, NULL, NULL), AR_EINVAL);
}

/* ---- acquiring a lease ------------------------------------------------------------ */

/* A lease of `devices` providers for est_steps steps of the MLP of `units` layers. */
static ar_market_lease_request ask(uint32_t devices, int64_t est_steps, int units)
{
    return (ar_market_lease_request){.devices = devices, .est_steps = est_steps, .flops_per_step = TF,
                                     .spec = "mlp, a test", .model_spec = mlp_spec(units), .mb_rows = MB_ROWS,
                                     .micro_batches = 1};
}

Test(market_rules, acquire_leases_the_best_free_providers_and_creates_the_job)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t alice = new_account(s, "alice", 0), bob = new_account(s, "bob", 0);
    const int64_t G = (int64_t)1 << 30;
    int64_t slow = new_provider(s, alice, 5001, 100, G, AR_CREDITS(1));
    int64_t fast = new_provider(s, bob, 5002, 300, G, AR_CREDITS(1));
    int64_t dear = new_provider(s, bob, 5003, 100, G, AR_CREDITS(5));

    ar_market_lease_request q = ask(2, 10, 3);
    q.flops_per_step = 1; /* the renter's count of the FLOPs is not what the lease is priced by */
    ar_market_lease got;
    bool too_few = true;
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_OK, "%s", ar_last_error());
    cr_assert_not(too_few);
    cr_assert_eq(got.n, 2);
    cr_assert_eq(got.providers[0].p.id, fast);
    cr_assert_str_eq(got.providers[0].account, "bob");
    cr_assert_eq(got.providers[1].p.id, slow);
    cr_assert_str_eq(got.providers[1].account, "alice");
    /* the market's split of the three layers: two on the fast one; at 1
     * credit per TFLOP, for 10 steps */
    cr_assert_eq(got.providers[0].stage, 0);
    cr_assert_eq(got.providers[0].first_unit, 0);
    cr_assert_eq(got.providers[0].last_unit, 2);
    cr_assert_eq(got.providers[0].flops_per_step, 2 * UNIT_FLOPS);
    cr_assert_eq(got.providers[1].flops_per_step, UNIT_FLOPS);
    cr_assert_float_eq(got.providers[0].speed_gflops, 300, 1e-9);
    cr_assert_eq(got.estimate, 10 * 3 * UNIT_COST);
    cr_assert_eq(strlen(got.token), AR_TOKEN_LEN - 1);
    ar_lease l;
    cr_assert_eq(ar_store_lease_auth(s, got.token, &l), AR_OK, "%s", ar_last_error());
    cr_assert_eq(l.id, got.lease_id);
    cr_assert_eq(l.job_id, got.job_id);
    ar_job j = job_of(s, got.job_id);
    cr_assert_eq(j.status, AR_JOB_RUNNING);
    cr_assert_eq(j.step, 0);
    cr_assert_eq(j.renter_id, renter);

    /* the next renter gets what is still free: one provider, not two */
    q.devices = 2;
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_ELIMIT);
    cr_assert(too_few);
    cr_assert(strstr(ar_last_error(), "2 providers asked for, 1 online and free, 2 more leased to other jobs"),
              "%s", ar_last_error());
    q.devices = 1;
    q.est_steps = 1; /* three layers at 5 credits */
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_OK, "%s", ar_last_error());
    cr_assert_eq(got.providers[0].p.id, dear);
    cr_assert_eq(got.estimate, 3 * 5 * UNIT_COST);
    cr_assert_eq(got.providers[0].flops_per_step, 3 * UNIT_FLOPS);
    /* the lease keeps its model, in its canonical form */
    ar_lease l2 = lease_of(s, got.lease_id);
    cr_assert(l2.has_plan);
    cr_assert_eq(l2.mb_rows, MB_ROWS);
    char *spec = NULL;
    cr_assert_eq(ar_store_lease_spec(s, got.lease_id, &spec), AR_OK);
    cr_assert_not_null(spec);
    ar_model_spec parsed;
    cr_assert_eq(ar_spec_parse(spec, strlen(spec), "stored", &parsed), AR_OK, "%s", ar_last_error());
    free(spec);
    /* a lease without a model, or of more providers than layers, is refused */
    q.model_spec = NULL;
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_EINVAL);
    q = ask(4, 1, 3);
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_EINVAL);
    cr_assert(strstr(ar_last_error(), "4 providers for a model of 3 layers"), "%s", ar_last_error());
    assert_books(s);
    ar_store_close(s);
}

Test(market_rules, acquire_refuses_too_few_providers_with_enough_memory)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t owner = new_account(s, "owner", 0);
    const int64_t G = (int64_t)1 << 30;
    new_provider(s, owner, 5001, 100, G, AR_CREDITS(1));
    int64_t big = new_provider(s, owner, 5002, 100, 8 * G, AR_CREDITS(1));
    ar_market_lease_request q = ask(2, 10, 2);
    q.min_mem_bytes = 4 * G;
    ar_market_lease got;
    bool too_few = false;
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_ELIMIT);
    cr_assert(too_few);
    cr_assert(strstr(ar_last_error(), "2 providers asked for, 1 online with enough memory"), "%s", ar_last_error());
    ar_job *jobs = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_job_list(s, renter, &jobs, &n), AR_OK);
    cr_assert_eq(n, 0, "no job is created for a refusal");
    ar_store_jobs_free(jobs, n);
    /* one device fits the one big provider */
    q.devices = 1;
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_OK, "%s", ar_last_error());
    cr_assert_eq(got.providers[0].p.id, big);
    ar_store_close(s);
}

Test(market_rules, acquire_refuses_a_budget_or_cap_below_the_estimate_and_cancels_the_job)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", 300000);
    int64_t owner = new_account(s, "owner", 0);
    int64_t p = new_provider(s, owner, 5001, 100, (int64_t)1 << 30, AR_CREDITS(1));
    ar_market_lease_request q = ask(1, 20, 3); /* 20 steps of 18000 micro-credits */
    ar_market_lease got;
    bool too_few = true;
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_ELIMIT);
    cr_assert_not(too_few);
    cr_assert(strstr(ar_last_error(), "estimated cost 0.360000 credits"), "%s", ar_last_error());
    cr_assert(strstr(ar_last_error(), "balance of 0.300000"), "%s", ar_last_error());
    /* a cap below the estimate, however rich the renter */
    q.est_steps = 10;
    q.max_credits = 50000;
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_ELIMIT);
    cr_assert_not(too_few);
    cr_assert(strstr(ar_last_error(), "exceeds max credits 0.050000"), "%s", ar_last_error());
    /* both refused jobs stay on record, cancelled, with nothing spent; the
     * provider is still free */
    ar_job *jobs = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_job_list(s, renter, &jobs, &n), AR_OK);
    cr_assert_eq(n, 2);
    for (size_t i = 0; i < n; i++) {
        cr_expect_eq(jobs[i].status, AR_JOB_CANCELLED);
        cr_expect_eq(jobs[i].spent, 0);
    }
    ar_store_jobs_free(jobs, n);
    bool leased = true;
    cr_assert_eq(ar_store_provider_leased(s, p, &leased), AR_OK);
    cr_assert_not(leased);
    cr_assert_eq(balance(s, renter), 300000);
    assert_books(s);
    ar_store_close(s);
}

/* ---- paying a step ------------------------------------------------------------------ */

/* A renter with `credits`, two providers at 1 credit per TFLOP leased for a
 * job of two layers, one each: UNIT_COST per stage per step (capped at
 * max_credits). */
typedef struct {
    ar_store *s;
    int64_t renter, owner_a, owner_b, spare_owner;
    int64_t a, b, spare; /* a: stage 0, b: stage 1, spare: free, dearer */
    ar_market_lease lease;
} two_stages;

static void lease_two(two_stages *t, int64_t credits, int64_t max_credits)
{
    t->s = open_db();
    t->renter = new_account(t->s, "renter", credits);
    t->owner_a = new_account(t->s, "a", 0);
    t->owner_b = new_account(t->s, "b", 0);
    t->spare_owner = new_account(t->s, "spare", 0);
    const int64_t G = (int64_t)1 << 30;
    t->a = new_provider(t->s, t->owner_a, 5001, 100, 2 * G, AR_CREDITS(1));
    t->b = new_provider(t->s, t->owner_b, 5002, 100, G, AR_CREDITS(1));
    t->spare = new_provider(t->s, t->spare_owner, 5003, 100, G, AR_CREDITS(2));
    ar_market_lease_request q = ask(2, 1, 2);
    q.max_credits = max_credits;
    bool too_few;
    cr_assert_eq(ar_rules_acquire(t->s, NULL, t->renter, &q, &t->lease, &too_few), AR_OK, "%s", ar_last_error());
    cr_assert_eq(t->lease.providers[0].p.id, t->a);
    cr_assert_eq(t->lease.providers[1].p.id, t->b);
}

/* Step `step` reported by the renter's driver: both stages, 0 FLOPs (the plan's). */
static int settle(two_stages *t, int64_t step, ar_step_settlement *out)
{
    ar_stage_usage u[2] = {{.stage = 0, .provider_id = t->a}, {.stage = 1, .provider_id = t->b}};
    ar_lease l = lease_of(t->s, t->lease.lease_id);
    return ar_rules_settle_step(t->s, &l, step, u, 2, true, 2.5 - 0.1 * (double)step, out);
}

Test(market_rules, a_step_is_paid_once_into_escrow_and_the_books_sum_to_zero)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    ar_step_settlement paid;
    for (int64_t step = 0; step < 3; step++) {
        cr_assert_eq(settle(&t, step, &paid), AR_OK, "%s", ar_last_error());
        cr_assert_eq(paid.paid, 2 * UNIT_COST);
        cr_assert_eq(paid.spent, 2 * UNIT_COST * (step + 1));
        cr_assert_eq(paid.balance, AR_CREDITS(100) - paid.spent);
        cr_assert_eq(paid.duplicates, 0);
        cr_assert_eq(job_of(t.s, t.lease.job_id).step, step + 1);
    }
    size_t rows = ledger_rows(t.s);
    /* the same step again (a retry, a report replayed after a restart) */
    cr_assert_eq(settle(&t, 1, &paid), AR_OK, "%s", ar_last_error());
    cr_assert_eq(paid.paid, 0);
    cr_assert_eq(paid.duplicates, 2);
    cr_assert_eq(paid.spent, 6 * UNIT_COST);
    cr_assert_eq(ledger_rows(t.s), rows);
    /* held in escrow until the work is verified or the job's window passes */
    cr_assert_eq(balance(t.s, t.owner_a), 0);
    cr_assert_eq(pending(t.s, t.owner_a), 3 * UNIT_COST);
    cr_assert_eq(pending(t.s, t.owner_b), 3 * UNIT_COST);
    cr_assert_eq(balance(t.s, t.renter), AR_CREDITS(100) - 6 * UNIT_COST);
    /* no stages named: every member of the lease, at the plan's FLOPs */
    ar_lease l = lease_of(t.s, t.lease.lease_id);
    cr_assert_eq(ar_rules_settle_step(t.s, &l, 3, NULL, 0, false, 0, &paid), AR_OK, "%s", ar_last_error());
    cr_assert_eq(paid.paid, 2 * UNIT_COST);
    /* the plan's FLOPs named: the same as 0 */
    ar_stage_usage u[2] = {{.stage = 0, .provider_id = t.a, .flops = UNIT_FLOPS},
                           {.stage = 1, .provider_id = t.b, .flops = UNIT_FLOPS}};
    cr_assert_eq(ar_rules_settle_step(t.s, &l, 4, u, 2, false, 0, &paid), AR_OK, "%s", ar_last_error());
    cr_assert_eq(paid.paid, 2 * UNIT_COST);
    /* the losses are the job's curve */
    ar_job_point *pts = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_job_progress(t.s, t.lease.job_id, &pts, &n), AR_OK);
    cr_assert_eq(n, 3);
    cr_assert_float_eq(pts[2].loss, 2.3, 1e-12);
    ar_free(pts);
    /* the job done and the window 0: escrow pays out */
    ar_market_policy now = {.escrow_window_s = 0};
    int64_t spent = 0;
    cr_assert_eq(ar_rules_release(t.s, &now, &l, AR_JOB_DONE, 5, &spent), AR_OK, "%s", ar_last_error());
    cr_assert_eq(spent, 10 * UNIT_COST);
    cr_assert_eq(balance(t.s, t.owner_a), 5 * UNIT_COST);
    cr_assert_eq(pending(t.s, t.owner_a), 0);
    assert_books(t.s);
    ar_store_close(t.s);
}

Test(market_rules, a_report_that_does_not_fit_the_lease_pays_nothing)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    ar_lease l = lease_of(t.s, t.lease.lease_id);
    size_t rows = ledger_rows(t.s);
    ar_step_settlement paid;
    struct {
        ar_stage_usage u[2];
        size_t n;
        const char *why;
    } bad[] = {
        /* the renter setting its own price */
        {{{.stage = 0, .provider_id = t.a, .flops = 1}, {.stage = 1, .provider_id = t.b, .flops = 1}}, 2, "the FLOPs differ from the lease's plan"},
        {{{.stage = 0, .provider_id = t.a, .flops = 0}, {.stage = 1, .provider_id = t.b, .flops = UNIT_FLOPS + 1}}, 2, "the FLOPs differ from the lease's plan"},
        /* or paying some of a step's stages */
        {{{.stage = 0, .provider_id = t.a, .flops = 0}}, 1, "every stage of a step is paid"},
        {{{.stage = 0, .provider_id = t.a, .flops = 0}, {.stage = 1, .provider_id = t.spare, .flops = 0}}, 2, "the provider is not the lease's at that stage"},
        {{{.stage = 0, .provider_id = t.b, .flops = 0}, {.stage = 1, .provider_id = t.a, .flops = 0}}, 2, "the provider is not the lease's at that stage"},
        {{{.stage = 0, .provider_id = t.a, .flops = 0}, {.stage = 0, .provider_id = t.a, .flops = 0}}, 2, "stage or provider reported twice"},
        {{{.stage = 0, .provider_id = t.a, .flops = 0}, {.stage = 2, .provider_id = t.b, .flops = 0}}, 2, "no such stage in the lease's plan"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cr_assert_eq(ar_rules_settle_step(t.s, &l, 0, bad[i].u, bad[i].n, false, 0, &paid), AR_EINVAL, "case %zu", i);
        cr_assert(strstr(ar_last_error(), bad[i].why), "case %zu: %s", i, ar_last_error());
    }
    /* nothing of any of them was written, not even the first, good stage */
    cr_assert_eq(ledger_rows(t.s), rows);
    cr_assert_eq(job_of(t.s, t.lease.job_id).step, 0);
    /* a released lease takes no more reports */
    cr_assert_eq(ar_rules_release(t.s, NULL, &l, AR_JOB_DONE, 0, NULL), AR_OK, "%s", ar_last_error());
    cr_assert_eq(settle(&t, 0, &paid), AR_ENOTFOUND);
    cr_assert_eq(ledger_rows(t.s), rows);
    ar_store_close(t.s);
}

Test(market_rules, the_cap_stops_a_step_short_keeping_the_stages_paid_before_it)
{
    two_stages t;
    /* the cap covers one step and a half */
    lease_two(&t, AR_CREDITS(100), 3 * UNIT_COST);
    ar_step_settlement paid;
    cr_assert_eq(settle(&t, 0, &paid), AR_OK, "%s", ar_last_error());
    cr_assert_eq(settle(&t, 1, &paid), AR_ELIMIT);
    cr_assert(strstr(ar_last_error(), "more than its max of 0.018000"), "%s", ar_last_error());
    /* stage 0 of step 1 was paid, stage 1 not; the step is not counted */
    ar_job j = job_of(t.s, t.lease.job_id);
    cr_assert_eq(j.spent, 3 * UNIT_COST);
    cr_assert_eq(j.step, 1);
    cr_assert_eq(pending(t.s, t.owner_a), 2 * UNIT_COST);
    cr_assert_eq(pending(t.s, t.owner_b), UNIT_COST);
    /* asked again, the cap still holds and stage 0 is not paid twice */
    size_t rows = ledger_rows(t.s);
    cr_assert_eq(settle(&t, 1, &paid), AR_ELIMIT);
    cr_assert_eq(ledger_rows(t.s), rows);
    cr_assert_eq(job_of(t.s, t.lease.job_id).spent, 3 * UNIT_COST);
    cr_assert_eq(balance(t.s, t.renter), AR_CREDITS(100) - 3 * UNIT_COST);
    assert_books(t.s);
    ar_store_close(t.s);
}

Test(market_rules, a_renter_out_of_credits_is_refused_and_nothing_is_overdrawn)
{
    two_stages t;
    lease_two(&t, 2 * UNIT_COST, 0);
    ar_step_settlement paid;
    cr_assert_eq(settle(&t, 0, &paid), AR_OK, "%s", ar_last_error());
    cr_assert_eq(paid.balance, 0);
    cr_assert_eq(settle(&t, 1, &paid), AR_ELIMIT);
    cr_assert_eq(balance(t.s, t.renter), 0);
    cr_assert_eq(job_of(t.s, t.lease.job_id).spent, 2 * UNIT_COST);
    assert_books(t.s);
    ar_store_close(t.s);
}

/* Reports and heartbeats from many threads at once are committed in groups
 * (store_sqlite.c, group_write): each succeeds or fails alone, with its own
 * error for its own caller, and the money adds up as if each had been a
 * transaction of its own. */
#define GROUP_THREADS 8
#define GROUP_STEPS 10

typedef struct {
    two_stages *t;
    int index;
    int paid, refused, other;     /* reported steps: paid, refused for money, anything else */
    int beats, unknown_ok, bad_ok; /* heartbeats done; refusals that came with their own message */
} group_worker;

static void *group_main(void *arg)
{
    group_worker *g = arg;
    ar_lease l = lease_of(g->t->s, g->t->lease.lease_id);
    for (int k = 0; k < GROUP_STEPS; k++) {
        int64_t step = g->index * GROUP_STEPS + k;
        ar_stage_usage u[2] = {{.stage = 0, .provider_id = g->t->a}, {.stage = 1, .provider_id = g->t->b}};
        ar_step_settlement out;
        int rc = ar_rules_settle_step(g->t->s, &l, step, u, 2, false, 0, &out);
        g->paid += rc == AR_OK;
        g->refused += rc == AR_ELIMIT && strstr(ar_last_error(), "credits") != NULL;
        g->other += rc != AR_OK && rc != AR_ELIMIT;
        g->beats += ar_store_provider_heartbeat(g->t->s, g->t->a) == AR_OK;
        /* a heartbeat of no provider and a report naming a provider the
         * lease does not have at that stage fail, in the same groups as the
         * others, each with its own message */
        char want[64];
        snprintf(want, sizeof want, "no provider %d", 900000 + g->index);
        g->unknown_ok += ar_store_provider_heartbeat(g->t->s, 900000 + g->index) == AR_ENOTFOUND &&
                         strstr(ar_last_error(), want) != NULL;
        ar_stage_usage bad[2] = {{.stage = 0, .provider_id = g->t->a}, {.stage = 1, .provider_id = g->t->spare}};
        g->bad_ok += ar_rules_settle_step(g->t->s, &l, step, bad, 2, false, 0, &out) == AR_EINVAL &&
                     strstr(ar_last_error(), "not the lease's at that stage") != NULL;
    }
    return NULL;
}

Test(market_rules, writes_committed_together_succeed_or_fail_each_alone)
{
    two_stages t;
    /* 2 UNIT_COST a step: 50 of the 80 steps can be paid */
    lease_two(&t, 100 * UNIT_COST, 0);
    group_worker g[GROUP_THREADS];
    pthread_t th[GROUP_THREADS];
    for (int i = 0; i < GROUP_THREADS; i++) {
        g[i] = (group_worker){.t = &t, .index = i};
        cr_assert_eq(pthread_create(&th[i], NULL, group_main, &g[i]), 0);
    }
    int paid = 0, refused = 0, other = 0;
    for (int i = 0; i < GROUP_THREADS; i++) {
        pthread_join(th[i], NULL);
        paid += g[i].paid;
        refused += g[i].refused;
        other += g[i].other;
        cr_expect_eq(g[i].beats, GROUP_STEPS);
        cr_expect_eq(g[i].unknown_ok, GROUP_STEPS);
        cr_expect_eq(g[i].bad_ok, GROUP_STEPS);
    }
    cr_assert_eq(paid, 50, "paid %d refused %d other %d: %s", paid, refused, other, ar_last_error());
    cr_assert_eq(refused, GROUP_THREADS * GROUP_STEPS - 50);
    cr_assert_eq(other, 0);
    cr_assert_eq(balance(t.s, t.renter), 0);
    cr_assert_eq(pending(t.s, t.owner_a), 50 * UNIT_COST);
    cr_assert_eq(pending(t.s, t.owner_b), 50 * UNIT_COST);
    cr_assert_eq(job_of(t.s, t.lease.job_id).spent, 100 * UNIT_COST);
    assert_books(t.s);
    ar_store_close(t.s);
}

/* ---- a lost member ---------------------------------------------------------------- */

Test(market_rules, a_lost_member_is_replaced_only_redone_steps_reversed_and_asked_again_answered_the_same)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    ar_step_settlement paid;
    for (int64_t step = 0; step < 6; step++)
        cr_assert_eq(settle(&t, step, &paid), AR_OK, "%s", ar_last_error());
    ar_lease l = lease_of(t.s, t.lease.lease_id);

    /* b is gone (the market's sweep found it silent); the checkpoint kept 4
     * steps: b's payments for steps 4 and 5 are contested, nothing moves yet */
    cr_assert_eq(ar_store_provider_mark_offline(t.s, t.b), AR_OK);
    size_t rows = ledger_rows(t.s);
    ar_market_replacement r;
    cr_assert_eq(ar_rules_replace(t.s, NULL, &l, NULL, t.b, 4, "stopped answering", &r), AR_OK, "%s", ar_last_error());
    cr_assert_not(r.unconfirmed);
    cr_assert(r.found);
    cr_assert_not(r.again);
    cr_assert_eq(r.replacement.p.id, t.spare);
    cr_assert_str_eq(r.replacement.account, "spare");
    cr_assert_eq(r.replacement.flops_per_step, UNIT_FLOPS);
    cr_assert_eq(r.replacement.stage, 1);
    cr_assert_eq(r.replacement.first_unit, 1);
    cr_assert_eq(r.replacement.last_unit, 2);
    cr_assert_eq(r.contested, 2);
    cr_assert_eq(r.spent, 12 * UNIT_COST);
    cr_assert_eq(r.n, 2);
    cr_assert_eq(r.members[1].p.id, t.spare);
    cr_assert_eq(r.members[1].p.price_per_tflop, AR_CREDITS(2));
    cr_assert_eq(ledger_rows(t.s), rows);
    cr_assert_float_eq(reliability(t.s, t.owner_b), AR_RELIABILITY_NEW * AR_RELIABILITY_AFTER_LOSS, 1e-12);
    cr_assert_float_eq(provider(t.s, t.b).reliability, AR_RELIABILITY_NEW * AR_RELIABILITY_AFTER_LOSS, 1e-12);
    cr_assert_eq(pending(t.s, t.owner_b), 6 * UNIT_COST);
    cr_assert_eq(balance(t.s, t.renter), AR_CREDITS(100) - 12 * UNIT_COST);
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    cr_assert_eq(ar_store_lease_members(t.s, l.id, &mem, &nm), AR_OK);
    cr_assert_eq(nm, 2);
    cr_assert_eq(mem[1].provider_id, t.spare);
    cr_assert_eq(mem[1].stage, 1);
    cr_assert_eq(mem[1].price_per_tflop, AR_CREDITS(2));
    ar_free(mem);
    assert_books(t.s);

    /* the same question again (its answer was lost): the same answer, nothing twice */
    ar_market_replacement again;
    cr_assert_eq(ar_rules_replace(t.s, NULL, &l, NULL, t.b, 4, "stopped answering", &again), AR_OK, "%s", ar_last_error());
    cr_assert(again.again);
    cr_assert(again.found);
    cr_assert_eq(again.replacement.p.id, r.replacement.p.id);
    cr_assert_str_eq(again.replacement.account, r.replacement.account);
    cr_assert_eq(again.replacement.flops_per_step, r.replacement.flops_per_step);
    cr_assert_eq(again.contested, r.contested);
    cr_assert_eq(again.spent, r.spent);
    cr_assert_eq(ledger_rows(t.s), rows);
    cr_assert_float_eq(reliability(t.s, t.owner_b), AR_RELIABILITY_NEW * AR_RELIABILITY_AFTER_LOSS, 1e-12);
    /* another checkpoint, or a provider never in the lease: refused */
    cr_assert_eq(ar_rules_replace(t.s, NULL, &l, NULL, t.b, 3, NULL, &again), AR_EINVAL);
    cr_assert(strstr(ar_last_error(), "not in the lease"), "%s", ar_last_error());
    cr_assert_eq(ar_rules_replace(t.s, NULL, &l, NULL, 999, 4, NULL, &again), AR_EINVAL);

    /* the replacement's redo of step 4 is paid to it, at its price, and
     * gives back b's payment for that step; a's is not paid twice */
    ar_stage_usage u[2] = {{.stage = 0, .provider_id = t.a, .flops = 0}, {.stage = 1, .provider_id = t.spare, .flops = 0}};
    cr_assert_eq(ar_rules_settle_step(t.s, &l, 4, u, 2, false, 0, &paid), AR_OK, "%s", ar_last_error());
    cr_assert_eq(paid.paid, 2 * UNIT_COST);
    cr_assert_eq(paid.duplicates, 1);
    cr_assert_eq(paid.reversed, 1);
    cr_assert_eq(pending(t.s, t.spare_owner), 2 * UNIT_COST);
    cr_assert_eq(pending(t.s, t.owner_b), 5 * UNIT_COST);
    cr_assert_eq(balance(t.s, t.renter), AR_CREDITS(100) - 13 * UNIT_COST);
    /* the job ends before step 5 is redone: b's step 5 stays b's */
    ar_market_policy now = {.escrow_window_s = 0};
    cr_assert_eq(ar_rules_release(t.s, &now, &l, AR_JOB_DONE, 5, NULL), AR_OK, "%s", ar_last_error());
    cr_assert_eq(balance(t.s, t.owner_b), 5 * UNIT_COST);
    cr_assert_eq(pending(t.s, t.owner_b), 0);
    assert_books(t.s);
    ar_store_close(t.s);
}

Test(market_rules, a_lost_member_with_no_free_provider_leaves_the_lease_replanned_over_the_rest)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    cr_assert_eq(ar_store_provider_mark_offline(t.s, t.spare), AR_OK);
    cr_assert_eq(ar_store_provider_mark_offline(t.s, t.a), AR_OK);
    ar_lease l = lease_of(t.s, t.lease.lease_id);
    ar_market_replacement r;
    cr_assert_eq(ar_rules_replace(t.s, NULL, &l, NULL, t.a, 0, NULL, &r), AR_OK, "%s", ar_last_error());
    cr_assert_not(r.found);
    cr_assert_eq(r.contested, 0);
    cr_assert_eq(r.n, 1);
    cr_assert_eq(r.members[0].p.id, t.b);
    cr_assert_eq(r.members[0].stage, 0);
    cr_assert_eq(r.members[0].first_unit, 0);
    cr_assert_eq(r.members[0].last_unit, 2);
    cr_assert_eq(r.members[0].flops_per_step, 2 * UNIT_FLOPS);
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    cr_assert_eq(ar_store_lease_members(t.s, l.id, &mem, &nm), AR_OK);
    cr_assert_eq(nm, 1);
    cr_assert_eq(mem[0].provider_id, t.b);
    ar_free(mem);
    cr_assert_eq(lease_of(t.s, l.id).plan, 1);
    /* a step under the new plan: b alone, both layers */
    ar_step_settlement paid;
    ar_stage_usage u = {.stage = 0, .provider_id = t.b, .flops = 0};
    cr_assert_eq(ar_rules_settle_step(t.s, &l, 0, &u, 1, false, 0, &paid), AR_OK, "%s", ar_last_error());
    cr_assert_eq(paid.paid, 2 * UNIT_COST);
    /* asked again: still no replacement, nothing done twice */
    cr_assert_eq(ar_rules_replace(t.s, NULL, &l, NULL, t.a, 0, NULL, &r), AR_OK, "%s", ar_last_error());
    cr_assert(r.again);
    cr_assert_not(r.found);
    assert_books(t.s);
    ar_store_close(t.s);
}

Test(market_rules, a_loss_claim_is_checked_before_anything_moves)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    ar_step_settlement paid;
    for (int64_t step = 0; step < 4; step++)
        cr_assert_eq(settle(&t, step, &paid), AR_OK, "%s", ar_last_error());
    ar_lease l = lease_of(t.s, t.lease.lease_id);
    fake_net net = {.up = {true, true, true}};
    ar_market_policy pol = {.allow_loopback = true, .probe = fake_probe, .probe_ctx = &net, .claim_quiet_s = 3600};
    size_t rows = ledger_rows(t.s);
    double rel = reliability(t.s, t.owner_b);

    /* b answers the market: the claim is false, nothing changes, it counts */
    ar_market_replacement r;
    cr_assert_eq(ar_rules_replace(t.s, &pol, &l, t.lease.token, t.b, 0, "lost", &r), AR_ELIMIT);
    cr_assert(strstr(ar_last_error(), "answered the market's Hello"), "%s", ar_last_error());
    cr_assert(strstr(ar_last_error(), "nothing was reversed"), "%s", ar_last_error());
    cr_assert_eq(net.calls, 1);
    cr_assert_eq(ledger_rows(t.s), rows);
    cr_assert_float_eq(reliability(t.s, t.owner_b), rel, 1e-12);
    cr_assert(provider(t.s, t.b).online);
    ar_account renter;
    cr_assert_eq(ar_store_account_get(t.s, t.renter, &renter), AR_OK);
    cr_assert_eq(renter.false_claims, 1);
    cr_assert_eq(renter.confirmed_claims, 0);

    /* b does not answer, but it still sends heartbeats: not confirmed yet */
    net.up[1] = false;
    cr_assert_eq(ar_rules_replace(t.s, &pol, &l, t.lease.token, t.b, 0, "lost", &r), AR_OK, "%s", ar_last_error());
    cr_assert(r.unconfirmed);
    cr_assert(r.retry_after_s >= 1);
    cr_assert_not(r.found);
    cr_assert_eq(ledger_rows(t.s), rows);
    cr_assert(provider(t.s, t.b).online);
    cr_assert_eq(ar_store_account_get(t.s, t.renter, &renter), AR_OK);
    cr_assert_eq(renter.false_claims, 1);
    /* its heartbeats stop too (the sweep marks it offline): confirmed */
    cr_assert_eq(ar_store_provider_mark_offline(t.s, t.b), AR_OK);
    cr_assert_eq(ar_rules_replace(t.s, &pol, &l, t.lease.token, t.b, 2, "lost", &r), AR_OK, "%s", ar_last_error());
    cr_assert_not(r.unconfirmed);
    cr_assert(r.found);
    cr_assert_eq(r.contested, 2);
    cr_assert_eq(ar_store_account_get(t.s, t.renter, &renter), AR_OK);
    cr_assert_eq(renter.confirmed_claims, 1);

    /* more false claims: at AR_MAX_FALSE_CLAIMS the account may make no more, nor lease */
    l = lease_of(t.s, t.lease.lease_id);
    for (int i = 1; i < AR_MAX_FALSE_CLAIMS; i++)
        cr_assert_eq(ar_rules_replace(t.s, &pol, &l, t.lease.token, t.a, 0, "lost", &r), AR_ELIMIT);
    int calls = net.calls;
    cr_assert_eq(ar_rules_replace(t.s, &pol, &l, t.lease.token, t.a, 0, "lost", &r), AR_ELIMIT);
    cr_assert(strstr(ar_last_error(), "it may make no more"), "%s", ar_last_error());
    cr_assert_eq(net.calls, calls, "refused before the market dials anyone");
    ar_market_lease_request q = ask(1, 1, 2);
    ar_market_lease got;
    bool too_few;
    cr_assert_eq(ar_rules_acquire(t.s, &pol, t.renter, &q, &got, &too_few), AR_ELIMIT);
    cr_assert(strstr(ar_last_error(), "takes no more leases"), "%s", ar_last_error());
    assert_books(t.s);
    ar_store_close(t.s);
}

Test(market_rules, an_audit_failure_gives_back_what_escrow_holds_and_confirms_a_claim)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    ar_step_settlement paid;
    for (int64_t step = 0; step < 5; step++)
        cr_assert_eq(settle(&t, step, &paid), AR_OK, "%s", ar_last_error());
    ar_lease l = lease_of(t.s, t.lease.lease_id);
    /* a's work up to step 1 verified: released at once; b's step 0 */
    int released = -1;
    cr_assert_eq(ar_rules_audit_passed(t.s, &l, t.a, 1, &released), AR_OK, "%s", ar_last_error());
    cr_assert_eq(released, 2);
    cr_assert_eq(balance(t.s, t.owner_a), 2 * UNIT_COST);
    cr_assert_eq(ar_rules_audit_passed(t.s, &l, t.b, 0, NULL), AR_OK);
    /* an audit of b at step 3 failed (the market confirmed it): what escrow
     * holds for b in this job goes back to the renter */
    int64_t back = -1;
    cr_assert_eq(ar_rules_audit_failed(t.s, &l, t.b, 3, 1, "{\"step\": 3, \"stage\": 1}", &back), AR_OK, "%s",
                 ar_last_error());
    cr_assert_eq(back, 4 * UNIT_COST);
    cr_assert_eq(pending(t.s, t.owner_b), 0);
    cr_assert_eq(balance(t.s, t.owner_b), UNIT_COST);
    cr_assert_float_eq(reliability(t.s, t.owner_b), 0, 1e-12);
    cr_assert_eq(balance(t.s, t.renter), AR_CREDITS(100) - 6 * UNIT_COST);
    /* a loss claim against it holds, though its worker answers */
    fake_net net = {.up = {true, true, true}};
    ar_market_policy pol = {.allow_loopback = true, .probe = fake_probe, .probe_ctx = &net};
    ar_market_replacement r;
    cr_assert_eq(ar_rules_replace(t.s, &pol, &l, NULL, t.b, 3, "audit failed", &r), AR_OK, "%s", ar_last_error());
    cr_assert(r.found);
    cr_assert_eq(net.calls, 1); /* the replacement checked, not b */
    assert_books(t.s);
    ar_store_close(t.s);
}

Test(market_rules, a_resume_reverses_nothing_and_without_enough_providers_marks_the_job_failed)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    ar_step_settlement paid;
    for (int64_t step = 0; step < 3; step++)
        cr_assert_eq(settle(&t, step, &paid), AR_OK, "%s", ar_last_error());
    size_t rows = ledger_rows(t.s);
    ar_market_lease_request q = ask(4, 10, 4);
    q.resume_job = t.lease.job_id;
    q.kept_steps = 2;
    ar_market_lease got;
    bool too_few = false;
    cr_assert_eq(ar_rules_acquire(t.s, NULL, t.renter, &q, &got, &too_few), AR_ELIMIT);
    cr_assert(too_few);
    cr_assert(strstr(ar_last_error(), "4 providers asked for"), "%s", ar_last_error());
    ar_job j = job_of(t.s, t.lease.job_id);
    cr_assert_eq(j.status, AR_JOB_FAILED);
    cr_assert_eq(j.step, 2);
    cr_assert_eq(j.spent, 6 * UNIT_COST); /* step 2 is not kept by the checkpoint, but it was done */
    cr_assert_eq(ledger_rows(t.s), rows);
    /* resumed again with what is free, it runs from its checkpoint */
    q = ask(2, 10, 2);
    q.resume_job = t.lease.job_id;
    q.kept_steps = 2;
    cr_assert_eq(ar_rules_acquire(t.s, NULL, t.renter, &q, &got, &too_few), AR_OK, "%s", ar_last_error());
    cr_assert_eq(got.job_id, t.lease.job_id);
    j = job_of(t.s, t.lease.job_id);
    cr_assert_eq(j.status, AR_JOB_RUNNING);
    cr_assert_eq(j.step, 2);
    cr_assert_eq(ledger_rows(t.s), rows);
    /* a finished job resumed from step 0, refused for too few: still done, nothing reversed */
    ar_lease l2 = lease_of(t.s, got.lease_id);
    cr_assert_eq(ar_rules_release(t.s, NULL, &l2, AR_JOB_DONE, 3, NULL), AR_OK);
    q = ask(4, 10, 4);
    q.resume_job = t.lease.job_id;
    cr_assert_eq(ar_rules_acquire(t.s, NULL, t.renter, &q, &got, &too_few), AR_ELIMIT);
    j = job_of(t.s, t.lease.job_id);
    cr_assert_eq(j.status, AR_JOB_DONE);
    cr_assert_eq(j.step, 3);
    cr_assert_eq(ledger_rows(t.s), rows);
    /* another renter's job cannot be resumed */
    int64_t other = new_account(t.s, "other", AR_CREDITS(100));
    q = ask(2, 10, 2);
    q.resume_job = t.lease.job_id;
    cr_assert_eq(ar_rules_acquire(t.s, NULL, other, &q, &got, &too_few), AR_ENOTFOUND);
    cr_assert_not(too_few);
    assert_books(t.s);
    ar_store_close(t.s);
}

/* ---- release, registration, progress ----------------------------------------------------- */

Test(market_rules, release_ends_the_lease_and_the_job)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    ar_step_settlement paid;
    cr_assert_eq(settle(&t, 0, &paid), AR_OK, "%s", ar_last_error());
    ar_lease l = lease_of(t.s, t.lease.lease_id);
    int64_t spent = -1;
    cr_assert_eq(ar_rules_release(t.s, NULL, &l, AR_JOB_DONE, 1, &spent), AR_OK, "%s", ar_last_error());
    cr_assert_eq(spent, 2 * UNIT_COST);
    ar_job j = job_of(t.s, l.job_id);
    cr_assert_eq(j.status, AR_JOB_DONE);
    cr_assert_eq(j.step, 1);
    cr_assert(lease_of(t.s, l.id).released);
    bool leased = true;
    cr_assert_eq(ar_store_provider_leased(t.s, t.a, &leased), AR_OK);
    cr_assert_not(leased);
    /* the default window holds the pay a while after the end */
    ar_market_policy dflt = {.escrow_window_s = AR_ESCROW_DEFAULT_WINDOW_S};
    int n = -1;
    cr_assert_eq(ar_rules_settle_escrow(t.s, &dflt, (int64_t)time(NULL), &n), AR_OK);
    cr_assert_eq(n, 0);
    cr_assert_eq(ar_rules_settle_escrow(t.s, &dflt, (int64_t)time(NULL) + AR_ESCROW_DEFAULT_WINDOW_S, &n), AR_OK);
    cr_assert_eq(n, 2);
    cr_assert_eq(balance(t.s, t.owner_a), UNIT_COST);
    assert_books(t.s);
    ar_store_close(t.s);
}

Test(market_rules, reliability_is_the_accounts_whatever_address_it_registers)
{
    ar_store *s = open_db();
    int64_t owner = new_account(s, "owner", 0);
    int64_t id = new_provider(s, owner, 5001, 100, (int64_t)1 << 30, AR_CREDITS(1));
    cr_assert_float_eq(provider(s, id).reliability, AR_RELIABILITY_NEW, 1e-12);
    /* lost once in a lease */
    int64_t renter = new_account(s, "renter", AR_CREDITS(10));
    ar_market_lease got;
    bool too_few;
    ar_market_lease_request q = ask(1, 1, 2);
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_OK, "%s", ar_last_error());
    ar_lease l = lease_of(s, got.lease_id);
    ar_market_replacement r;
    cr_assert_eq(ar_store_provider_mark_offline(s, id), AR_OK);
    cr_assert_eq(ar_rules_replace(s, NULL, &l, NULL, id, 0, NULL, &r), AR_OK, "%s", ar_last_error());
    const double lost = AR_RELIABILITY_NEW * AR_RELIABILITY_AFTER_LOSS;
    /* back with a new profile at the same address: same id, the account's record */
    int64_t again = new_provider(s, owner, 5001, 200, (int64_t)1 << 30, AR_CREDITS(2));
    cr_assert_eq(again, id);
    ar_provider p = provider(s, id);
    cr_assert_float_eq(p.reliability, lost, 1e-12);
    cr_assert_float_eq(p.gflops, 200, 1e-12);
    cr_assert(p.online);
    /* at another address, spelled another way: another provider, the same record */
    ar_provider other_p = {.account_id = owner, .gflops = 100, .mem_bytes = (int64_t)1 << 30, .cores = 4};
    snprintf(other_p.address, sizeof other_p.address, "localhost:5001");
    int64_t other = 0;
    cr_assert_eq(ar_rules_register_provider(s, &other_p, &other), AR_OK, "%s", ar_last_error());
    cr_assert_neq(other, id);
    cr_assert_float_eq(provider(s, other).reliability, lost, 1e-12);
    /* a new account starts below an established one */
    int64_t vet = new_account(s, "veteran", 0);
    cr_assert_eq(ar_store_account_set_reliability(s, vet, 0.9), AR_OK);
    cr_assert_eq(ar_store_account_set_reliability(s, vet, 1.5), AR_EINVAL);
    int64_t newbie = new_account(s, "newbie", 0);
    cr_assert(reliability(s, newbie) < reliability(s, vet));
    ar_store_close(s);
}

/* ---- speed ------------------------------------------------------------------------------ */

Test(market_rules, speed_is_the_claim_until_observed_then_what_was_observed)
{
    ar_provider p = {.id = 1, .account_id = 1, .gflops = 100};
    cr_assert_float_eq(ar_rules_speed(&p), 100, 1e-9);
    /* 1e11 FLOPs in 10 busy seconds: 10 GFLOP/s, the prior worth 1e8 of them */
    p.obs_flops = 1e11;
    p.obs_busy_s = 10;
    p.obs_claim_flops = 10 * 100e9;
    p.acct_obs_flops = p.obs_flops;
    p.acct_obs_claim_flops = p.obs_claim_flops;
    double v = ar_rules_speed(&p);
    cr_assert(v > 9.9 && v < 10.1, "%g", v);
    /* a new provider of an account whose claims held up at a tenth starts at a tenth of its claim */
    ar_provider fresh = {.id = 2, .account_id = 1, .gflops = 100, .acct_obs_flops = 1e11, .acct_obs_claim_flops = 1e12};
    cr_assert_float_eq(ar_rules_speed(&fresh), 10, 1e-9);
}

Test(market_rules, a_provider_far_slower_than_its_claim_loses_rank)
{
    const int64_t G = (int64_t)1 << 30;
    ar_provider ps[] = {
        /* claims the most speed, for nothing; observed at 1 GFLOP/s */
        {.id = 1, .account_id = 1, .gflops = 1e9, .mem_bytes = G, .price_per_tflop = 0, .reliability = 1,
         .obs_flops = 1e11, .obs_busy_s = 100, .obs_claim_flops = 100 * 1e18, .acct_obs_flops = 1e11,
         .acct_obs_claim_flops = 100 * 1e18},
        /* honest and dear: claims 50, observed 5 (a tenth, as the market's claims go) */
        {.id = 2, .account_id = 2, .gflops = 50, .mem_bytes = G, .price_per_tflop = AR_CREDITS(400), .reliability = 1,
         .obs_flops = 5e11, .obs_busy_s = 100, .obs_claim_flops = 100 * 50e9, .acct_obs_flops = 5e11,
         .acct_obs_claim_flops = 100 * 50e9},
        /* honest, not observed yet */
        {.id = 3, .account_id = 3, .gflops = 5, .mem_bytes = G, .price_per_tflop = AR_CREDITS(400), .reliability = 1},
    };
    ar_ranked rk[3];
    ar_rules_rank(ps, 3, rk);
    cr_assert_eq(rk[2].p->id, 1, "the liar ranks last, price 0 or not");
    cr_assert(rk[2].score < 1e-6 * rk[1].score, "%g vs %g", rk[2].score, rk[1].score);
    /* alone, judged against nobody else's claims, it still loses to an unobserved one */
    ar_provider two[2] = {ps[0], ps[2]};
    ar_rules_rank(two, 2, rk);
    cr_assert_eq(rk[0].p->id, 3);
    /* without observations the claim is all there is: it would win */
    two[0].obs_flops = two[0].obs_busy_s = two[0].obs_claim_flops = 0;
    two[0].acct_obs_flops = two[0].acct_obs_claim_flops = 0;
    ar_rules_rank(two, 2, rk);
    cr_assert_eq(rk[0].p->id, 1);
}

Test(market_rules, progress_reports_are_observations_of_each_members_speed)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    ar_lease l = lease_of(t.s, t.lease.lease_id);
    ar_market_progress_report r = {.live = {.step = 10, .total_steps = 100, .items_per_s = 1, .unit = "samples",
                                            .eta_s = 1, .wall_s = 2}};
    ar_stage_time times[2] = {{.step = 10, .stage = 0, .wall_s = 2, .busy_s = 1.0},
                              {.step = 10, .stage = 1, .wall_s = 2, .busy_s = 1.5}};
    r.times = times;
    r.n_times = 2;
    cr_assert_eq(ar_rules_report_progress(t.s, &l, &r), AR_OK, "%s", ar_last_error());
    /* the driver's counters start with the lease: 10 steps in 1 s of a's busy time */
    cr_assert_float_eq(provider(t.s, t.a).obs_flops, 10.0 * UNIT_FLOPS, 1);
    cr_assert_float_eq(provider(t.s, t.a).obs_busy_s, 1.0, 1e-9);
    /* 10 more steps: a busy 3 s more, b 6 s more */
    r.live.step = 20;
    r.live.wall_s = times[0].wall_s = times[1].wall_s = 10;
    times[0].busy_s = 4.0;
    times[1].busy_s = 7.5;
    cr_assert_eq(ar_rules_report_progress(t.s, &l, &r), AR_OK, "%s", ar_last_error());
    ar_provider a = provider(t.s, t.a), b = provider(t.s, t.b);
    cr_assert_float_eq(a.obs_flops, 20.0 * UNIT_FLOPS, 1);
    cr_assert_float_eq(a.obs_busy_s, 4.0, 1e-9);
    cr_assert_float_eq(a.obs_claim_flops, 4.0 * 100e9, 1);
    cr_assert_float_eq(b.obs_busy_s, 7.5, 1e-9);
    double va = ar_rules_speed(&a), vb = ar_rules_speed(&b);
    cr_assert(va > 29 && va < 31, "%g", va); /* 1.2e11 FLOPs in 4 s */
    cr_assert(vb > 15.5 && vb < 16.5, "%g", vb);
    /* nonsense (busy beyond the wall time), or going back, observes nothing */
    r.live.step = 30;
    r.live.wall_s = times[0].wall_s = times[1].wall_s = 11;
    times[0].busy_s = 100;
    times[1].busy_s = 8.0;
    cr_assert_eq(ar_rules_report_progress(t.s, &l, &r), AR_OK, "%s", ar_last_error());
    cr_assert_float_eq(provider(t.s, t.a).obs_busy_s, 4.0, 1e-9);
    cr_assert_float_eq(provider(t.s, t.b).obs_busy_s, 8.0, 1e-9);
    r.live.step = 25;
    times[1].busy_s = 9.0;
    cr_assert_eq(ar_rules_report_progress(t.s, &l, &r), AR_OK, "%s", ar_last_error());
    cr_assert_float_eq(provider(t.s, t.b).obs_busy_s, 8.0, 1e-9);
    ar_store_close(t.s);
}

Test(market_rules, a_renters_word_about_its_own_providers_is_no_observation)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t own = new_provider(s, renter, 5001, 100, (int64_t)1 << 30, 0);
    ar_market_lease_request q = ask(1, 10, 2);
    ar_market_lease got;
    bool too_few;
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_OK, "%s", ar_last_error());
    ar_lease l = lease_of(s, got.lease_id);
    ar_stage_time t = {.step = 10, .stage = 0, .wall_s = 2, .busy_s = 1};
    ar_market_progress_report r = {.live = {.step = 10, .total_steps = 10, .unit = "samples", .wall_s = 2},
                                   .times = &t, .n_times = 1};
    cr_assert_eq(ar_rules_report_progress(s, &l, &r), AR_OK, "%s", ar_last_error());
    cr_assert_float_eq(provider(s, own).obs_busy_s, 0, 1e-12);
    ar_store_close(s);
}

/* The links of the sample plan: the driver's, measured, and one between the stages. */
static const ar_market_plan_link SAMPLE_LINKS[2] = {
    {.stage = 0, .from = "driver", .to = "127.0.0.1:5001", .down_mb_s = 2.5, .up_mb_s = 1.25, .rtt_ms = 40.5,
     .compress = "none", .predicted_down_mb = 0.5, .predicted_up_mb = 0.25},
    {.stage = 1, .from = "127.0.0.1:5001", .to = "127.0.0.1:5002", .down_mb_s = 10, .up_mb_s = 10, .rtt_ms = 50,
     .compress = "int8", .predicted_down_mb = 0.625, .predicted_up_mb = 0.5, .down_mb = 0.625, .up_mb = 0.5,
     .down_raw_mb = 2.5, .up_raw_mb = 2}};

/* A two-stage plan, the second stage a tensor-parallel pair. */
static void sample_plan(ar_market_plan_stage st[2], ar_market_plan *plan)
{
    st[0] = (ar_market_plan_stage){.first_unit = 0, .last_unit = 2, .layers = "embedding, block 0",
                                   .predicted_ms = 1.5, .n_members = 1};
    st[0].members[0] = (ar_market_plan_member){.provider_id = 3, .device = "127.0.0.1:5001", .relayed = true};
    st[1] = (ar_market_plan_stage){.first_unit = 2, .last_unit = 3, .layers = "block 1 \"x\"",
                                   .predicted_ms = 2, .n_members = 2};
    st[1].members[0] = (ar_market_plan_member){.provider_id = 4, .device = "127.0.0.1:5002", .share = "heads 0-1",
                                               .head_begin = 0, .head_end = 2, .hidden_begin = 0, .hidden_end = 0};
    st[1].members[1] = (ar_market_plan_member){.provider_id = 0, .device = "h:1", .share = "heads 2-3",
                                               .head_begin = 2, .head_end = 4, .hidden_begin = 64, .hidden_end = 128};
    *plan = (ar_market_plan){.model = "gpt", .schedule = "1f1b", .micro_batches = 4, .predicted_bubble = 0.25,
                             .n_stages = 2, .stages = st, .n_links = 2, .links = SAMPLE_LINKS};
}

static const char *SAMPLE_PLAN_JSON =
    "{\"model\":\"gpt\",\"micro_batches\":4,\"schedule\":\"1f1b\",\"predicted_bubble\":0.25,\"stages\":["
    "{\"stage\":0,\"first_unit\":0,\"last_unit\":2,\"layers\":\"embedding, block 0\",\"predicted_ms\":1.5,"
    "\"members\":[{\"provider_id\":3,\"device\":\"127.0.0.1:5001\",\"edge\":\"relayed\"}]},"
    "{\"stage\":1,\"first_unit\":2,\"last_unit\":3,\"layers\":\"block 1 \\\"x\\\"\",\"predicted_ms\":2,"
    "\"members\":[{\"provider_id\":4,\"device\":\"127.0.0.1:5002\",\"edge\":\"direct\",\"share\":\"heads 0-1\",\"heads\":[0,2]},"
    "{\"provider_id\":0,\"device\":\"h:1\",\"edge\":\"direct\",\"share\":\"heads 2-3\",\"heads\":[2,4],\"hidden\":[64,128]}]}],"
    "\"links\":[{\"stage\":0,\"from\":\"driver\",\"to\":\"127.0.0.1:5001\",\"down_mb_s\":2.5,\"up_mb_s\":1.25,"
    "\"rtt_ms\":40.5,\"compress\":\"none\",\"predicted_mb\":[0.5,0.25],\"moved_mb\":[0,0],\"moved_raw_mb\":[0,0]},"
    "{\"stage\":1,\"from\":\"127.0.0.1:5001\",\"to\":\"127.0.0.1:5002\",\"down_mb_s\":10,\"up_mb_s\":10,"
    "\"rtt_ms\":50,\"compress\":\"int8\",\"predicted_mb\":[0.625,0.5],\"moved_mb\":[0.625,0.5],"
    "\"moved_raw_mb\":[2.5,2]}]}";

Test(market_rules, the_dashboards_plan_json)
{
    ar_market_plan_stage st[2];
    ar_market_plan plan;
    sample_plan(st, &plan);
    char *json = ar_dashboard_plan_json(&plan);
    cr_assert_not_null(json);
    cr_assert_str_eq(json, SAMPLE_PLAN_JSON);
    free(json);
}

Test(market_rules, progress_keeps_the_plan_until_a_new_one_comes)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    ar_market_plan_stage st[2];
    ar_market_plan plan;
    sample_plan(st, &plan);
    ar_stage_time times[1] = {{.step = 3, .stage = 0, .wall_s = 2, .busy_s = 1.5, .idle_s = 0.5}};
    ar_market_progress_report r = {.live = {.step = 3, .total_steps = 10, .items_per_s = 100, .unit = "samples",
                                            .eta_s = 7, .wall_s = 2},
                                   .times = times, .n_times = 1, .has_val = true, .val_step = 3, .val_loss = 1.25,
                                   .plan = &plan};
    ar_lease l = lease_of(t.s, t.lease.lease_id);
    cr_assert_eq(ar_rules_report_progress(t.s, &l, &r), AR_OK, "%s", ar_last_error());
    r.plan = NULL;
    r.live.step = 4;
    r.has_val = false;
    cr_assert_eq(ar_rules_report_progress(t.s, &l, &r), AR_OK, "%s", ar_last_error());
    ar_job_live live;
    cr_assert_eq(ar_store_job_live_get(t.s, t.lease.job_id, &live), AR_OK, "%s", ar_last_error());
    cr_assert_eq(live.step, 4);
    cr_assert_str_eq(live.unit, "samples");
    cr_assert_not_null(live.plan);
    cr_assert_str_eq(live.plan, SAMPLE_PLAN_JSON);
    ar_store_job_live_clear(&live);
    ar_job_point *val = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_job_val(t.s, t.lease.job_id, &val, &n), AR_OK);
    cr_assert_eq(n, 1);
    cr_assert_float_eq(val[0].loss, 1.25, 1e-12);
    ar_free(val);
    ar_store_close(t.s);
}

/* ---- money ---------------------------------------------------------------------------- */

Test(market_rules, credits_as_text_and_back)
{
    const int64_t amounts[] = {0, 1, 999999, AR_CREDITS(1), AR_CREDITS(12) + 345678, AR_CREDITS(1000000000000LL),
                               INT64_MAX};
    char buf[32];
    for (size_t i = 0; i < sizeof amounts / sizeof amounts[0]; i++) {
        int64_t back = -1;
        ar_credits_text(amounts[i], buf, sizeof buf);
        cr_assert_eq(ar_credits_parse(buf, INT64_MAX, &back), AR_OK, "%s: %s", buf, ar_last_error());
        cr_assert_eq(back, amounts[i], "%s read back as %lld", buf, (long long)back);
    }
    cr_assert_str_eq(ar_credits_text(-1, buf, sizeof buf), "-0.000001");
    cr_assert_str_eq(ar_credits_text(INT64_MIN, buf, sizeof buf), "-9223372036854.775808");
    int64_t v = -1;
    cr_assert_eq(ar_credits_parse("12", AR_CREDITS(100), &v), AR_OK);
    cr_assert_eq(v, AR_CREDITS(12));
    cr_assert_eq(ar_credits_parse(".5", AR_CREDITS(100), &v), AR_OK);
    cr_assert_eq(v, 500000);
    cr_assert_eq(ar_credits_parse("3.", AR_CREDITS(100), &v), AR_OK);
    cr_assert_eq(v, AR_CREDITS(3));
    const char *bad[] = {"", ".", "-1", "1.0000001", "1e3", "1,5", " 1", "0x10", "1.2.3"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_expect_eq(ar_credits_parse(bad[i], AR_CREDITS(100), &v), AR_EINVAL, "\"%s\"", bad[i]);
    cr_assert_eq(ar_credits_parse("100.000001", AR_CREDITS(100), &v), AR_ELIMIT);
    cr_assert_eq(ar_credits_parse("99999999999999999999999", AR_CREDITS(100), &v), AR_ELIMIT);
    cr_assert_eq(ar_credits_parse("100", AR_CREDITS(100), &v), AR_OK);
}

Test(market_rules, cost_is_flops_times_price_rounded_to_a_micro_credit)
{
    int64_t c = -1;
    cr_assert_eq(ar_flops_cost(TF, AR_CREDITS(2), &c), AR_OK);
    cr_assert_eq(c, AR_CREDITS(2));
    cr_assert_eq(ar_flops_cost(499999, 1000000, &c), AR_OK); /* 0.499999 micro-credits */
    cr_assert_eq(c, 0);
    cr_assert_eq(ar_flops_cost(500000, 1000000, &c), AR_OK); /* half rounds up */
    cr_assert_eq(c, 1);
    cr_assert_eq(ar_flops_cost(1, -1, &c), AR_EINVAL);
    cr_assert_eq(ar_flops_cost(INT64_MAX, INT64_MAX, &c), AR_ELIMIT);
}

/* ---- tickets --------------------------------------------------------------------------- */

Test(market_rules, each_member_gets_its_own_ticket_which_opens_nothing_else)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    const char *ta = t.lease.providers[0].ticket, *tb = t.lease.providers[1].ticket;
    cr_assert_eq(strlen(ta), AR_TOKEN_LEN - 1);
    cr_assert_eq(strlen(tb), AR_TOKEN_LEN - 1);
    cr_assert_str_neq(ta, tb);
    cr_assert_str_neq(ta, t.lease.token);
    /* each opens its own provider's worker, with the lease's member addresses */
    ar_market_ticket_check got;
    cr_assert_eq(ar_rules_check_ticket(t.s, t.a, ta, &got), AR_OK, "%s", ar_last_error());
    cr_assert_eq(got.lease.id, t.lease.lease_id);
    cr_assert_eq(got.lease.job_id, t.lease.job_id);
    cr_assert_eq(got.n, 2);
    cr_assert_str_eq(got.addresses[0], "127.0.0.1:5001");
    cr_assert_str_eq(got.addresses[1], "127.0.0.1:5002");
    /* and what it is paid to hold: its units of the lease's model, in its micro-batches */
    cr_assert(got.has_plan);
    cr_assert_eq(got.first_unit, 0);
    cr_assert_eq(got.last_unit, 1);
    cr_assert_eq(got.mb_rows, MB_ROWS);
    cr_assert_eq(got.micro_batches, 1);
    char *spec = NULL, digest[AR_TOKEN_LEN];
    cr_assert_eq(ar_store_lease_spec(t.s, t.lease.lease_id, &spec), AR_OK);
    cr_assert_eq(ar_rules_sha256_hex(spec, digest), AR_OK);
    free(spec);
    cr_assert_str_eq(got.spec_sha256, digest);
    cr_assert_eq(ar_rules_check_ticket(t.s, t.b, tb, &got), AR_OK, "%s", ar_last_error());
    cr_assert_eq(got.first_unit, 1);
    cr_assert_eq(got.last_unit, 2);
    /* not the other provider's */
    cr_assert_eq(ar_rules_check_ticket(t.s, t.b, ta, &got), AR_EINVAL);
    cr_assert_eq(ar_rules_check_ticket(t.s, t.a, tb, &got), AR_EINVAL);
    /* the lease token is no ticket, and a ticket is no lease token: it moves no money */
    cr_assert_eq(ar_rules_check_ticket(t.s, t.a, t.lease.token, &got), AR_ENOTFOUND);
    ar_lease l;
    cr_assert_eq(ar_store_lease_auth(t.s, ta, &l), AR_ENOTFOUND);
    cr_assert_eq(ar_store_lease_auth(t.s, tb, &l), AR_ENOTFOUND);
    int64_t id;
    cr_assert_eq(ar_store_account_auth(t.s, ta, &id), AR_ENOTFOUND);
    /* a made-up ticket, or one of the right shape: unknown */
    char fake[AR_TOKEN_LEN];
    memset(fake, 'a', AR_TOKEN_LEN - 1);
    fake[AR_TOKEN_LEN - 1] = '\0';
    cr_assert_eq(ar_rules_check_ticket(t.s, t.a, fake, &got), AR_ENOTFOUND);
    cr_assert_eq(ar_rules_check_ticket(t.s, t.a, "", &got), AR_ENOTFOUND);
    /* only the lease token's holder gets tickets issued */
    char ticket[AR_TOKEN_LEN];
    cr_assert_eq(ar_store_ticket_issue(t.s, t.lease.lease_id, t.a, ta, ticket), AR_ENOTFOUND);
    cr_assert_eq(ar_store_ticket_issue(t.s, t.lease.lease_id, t.spare, t.lease.token, ticket), AR_ENOTFOUND);
    cr_assert_eq(ar_store_ticket_issue(t.s, t.lease.lease_id, t.a, t.lease.token, ticket), AR_OK);
    cr_assert_str_eq(ticket, ta); /* the same ticket again */
    /* released, the lease's tickets open nothing */
    l = lease_of(t.s, t.lease.lease_id);
    cr_assert_eq(ar_rules_release(t.s, NULL, &l, AR_JOB_DONE, 0, NULL), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_rules_check_ticket(t.s, t.a, ta, &got), AR_ENOTFOUND);
    ar_store_close(t.s);
}

Test(market_rules, a_replacement_gets_a_ticket_and_the_lost_members_ticket_dies)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    char lost_ticket[AR_TOKEN_LEN];
    memcpy(lost_ticket, t.lease.providers[1].ticket, sizeof lost_ticket);
    ar_lease l = lease_of(t.s, t.lease.lease_id);
    ar_market_replacement r, again;
    cr_assert_eq(ar_store_provider_mark_offline(t.s, t.b), AR_OK); /* its heartbeats stopped */
    cr_assert_eq(ar_rules_replace(t.s, NULL, &l, t.lease.token, t.b, 0, "lost", &r), AR_OK, "%s", ar_last_error());
    cr_assert(r.found);
    cr_assert_eq(strlen(r.replacement.ticket), AR_TOKEN_LEN - 1);
    ar_market_ticket_check got;
    cr_assert_eq(ar_rules_check_ticket(t.s, t.spare, r.replacement.ticket, &got), AR_OK, "%s", ar_last_error());
    cr_assert_str_eq(got.addresses[1], "127.0.0.1:5003");
    cr_assert_eq(ar_rules_check_ticket(t.s, t.b, lost_ticket, &got), AR_ENOTFOUND);
    /* asked again (the answer was lost): the same replacement, the same ticket */
    cr_assert_eq(ar_rules_replace(t.s, NULL, &l, t.lease.token, t.b, 0, "lost", &again), AR_OK, "%s",
                 ar_last_error());
    cr_assert(again.again);
    cr_assert_str_eq(again.replacement.ticket, r.replacement.ticket);
    /* without the lease token there is no ticket to give */
    cr_assert_eq(ar_rules_replace(t.s, NULL, &l, NULL, t.b, 0, "lost", &again), AR_OK, "%s", ar_last_error());
    cr_assert_str_eq(again.replacement.ticket, "");
    ar_store_close(t.s);
}

Test(market_rules, tickets_derive_from_the_lease_token_and_bind_one_lease_and_provider)
{
    char a[AR_TOKEN_LEN], b[AR_TOKEN_LEN], c[AR_TOKEN_LEN], d[AR_TOKEN_LEN];
    const char *tok1 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const char *tok2 = "1123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    cr_assert_eq(ar_store_ticket_derive(tok1, 1, 2, a), AR_OK);
    cr_assert_eq(ar_store_ticket_derive(tok1, 2, 1, b), AR_OK);
    cr_assert_eq(ar_store_ticket_derive(tok2, 1, 2, c), AR_OK);
    cr_assert_eq(ar_store_ticket_derive(tok1, 1, 2, d), AR_OK);
    cr_assert_str_neq(a, b);
    cr_assert_str_neq(a, c);
    cr_assert_str_eq(a, d);
    cr_assert_eq(ar_store_ticket_derive("short", 1, 2, a), AR_EINVAL);
}

/* ---- admitting providers ------------------------------------------------------------------ */

Test(market_rules, addresses_renters_must_not_be_sent_to_are_refused)
{
    char why[300];
    static const struct {
        const char *address;
        bool loopback_ok;
        const char *words; /* NULL: accepted */
    } cases[] = {
        {"10.0.0.7:7001", false, NULL},
        {"192.168.1.20:7001", false, NULL},
        {"8.8.8.8:65535", false, NULL},
        {"[2001:db8::7]:7001", false, NULL},
        {"[fd12:3456::1]:7001", false, NULL}, /* a private (ULA) network: fine */
        {"127.0.0.1:7001", true, NULL},
        {"localhost:7001", true, NULL},
        {"[::1]:7001", true, NULL},
        {"127.0.0.1:7001", false, "loopback"},
        {"127.3.4.5:7001", false, "loopback"},
        {"[::1]:7001", false, "loopback"},
        {"localhost:7001", false, "loopback"}, /* a name: what it resolves to */
        {"[::ffff:127.0.0.1]:7001", false, "loopback"},
        {"169.254.169.254:7001", true, "link-local"},
        {"[fe80::1]:7001", true, "link-local"},
        {"[febf::1]:7001", true, "link-local"},
        {"[::ffff:169.254.169.254]:7001", true, "link-local"},
        {"[64:ff9b::a9fe:a9fe]:7001", true, "link-local"},
        {"[fd00:ec2::254]:7001", true, "metadata"},
        {"224.0.0.1:7001", true, "multicast"},
        {"239.255.255.250:7001", true, "multicast"},
        {"[ff02::1]:7001", true, "multicast"},
        {"0.0.0.0:7001", true, "unspecified"},
        {"0.1.2.3:7001", true, "unspecified"},
        {"[::]:7001", true, "unspecified"},
        {"255.255.255.255:7001", true, "reserved"},
        {"240.0.0.1:7001", true, "reserved"},
        {"10.0.0.7:1023", false, "port 1023"},
        {"10.0.0.7:22", false, "port 22"},
        {"10.0.0.7:0", false, "port 0"},
        {"10.0.0.7:65536", false, "1..65535"},
        {"10.0.0.7:x", false, "1..65535"},
        {"10.0.0.7", false, "HOST:PORT"},
        {"fe80::1:7001", true, "brackets"},
        {"[fe80::1:7001", true, "unterminated"},
        {"[]:7001", true, "empty"},
        {"no-such-host.invalid:7001", true, "does not resolve"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc = ar_rules_check_address(cases[i].address, cases[i].loopback_ok, why, sizeof why);
        if (!cases[i].words) {
            cr_expect_eq(rc, AR_OK, "%s: %s", cases[i].address, why);
        } else {
            cr_expect_eq(rc, AR_EINVAL, "%s accepted", cases[i].address);
            cr_expect(rc != AR_EINVAL || strstr(why, cases[i].words), "%s: \"%s\" lacks \"%s\"", cases[i].address,
                      why, cases[i].words);
        }
    }
    cr_assert(ar_rules_host_is_loopback("127.0.0.1:0"));
    cr_assert(ar_rules_host_is_loopback("[::1]:7000"));
    cr_assert(ar_rules_host_is_loopback("localhost:7000"));
    cr_assert_not(ar_rules_host_is_loopback("0.0.0.0:7000"));
    cr_assert_not(ar_rules_host_is_loopback("10.0.0.7:7000"));
}

static int64_t admit(ar_store *s, const ar_market_policy *pol, int64_t account, int port, ar_reach *reach)
{
    ar_provider p = {.account_id = account, .gflops = 100, .mem_bytes = (int64_t)1 << 30, .cores = 2,
                     .price_per_tflop = AR_CREDITS(1)};
    snprintf(p.address, sizeof p.address, "127.0.0.1:%d", port);
    int64_t id = 0;
    cr_assert_eq(ar_rules_admit_provider(s, pol, &p, &id, reach), AR_OK, "%s", ar_last_error());
    return id;
}

Test(market_rules, an_account_registers_at_most_its_limit_of_providers)
{
    ar_store *s = open_db();
    int64_t alice = new_account(s, "alice", 0), bob = new_account(s, "bob", 0);
    ar_market_policy pol = {.max_providers_per_account = 3, .allow_loopback = true};
    int64_t first = admit(s, &pol, alice, 5001, NULL);
    admit(s, &pol, alice, 5002, NULL);
    admit(s, &pol, alice, 5003, NULL);
    ar_provider p = {.account_id = alice, .gflops = 100, .mem_bytes = 1 << 30, .cores = 2};
    snprintf(p.address, sizeof p.address, "127.0.0.1:5004");
    int64_t id = 0;
    cr_assert_eq(ar_rules_admit_provider(s, &pol, &p, &id, NULL), AR_ELIMIT);
    cr_assert(strstr(ar_last_error(), "3 providers registered"), "%s", ar_last_error());
    /* re-registering an address it has is a restart, not a new provider */
    cr_assert_eq(admit(s, &pol, alice, 5001, NULL), first);
    /* the limit is per account */
    admit(s, &pol, bob, 5004, NULL);
    /* the default limit */
    ar_market_policy dflt = {.allow_loopback = true};
    for (int i = 0; i < AR_MARKET_DEFAULT_MAX_PROVIDERS - 1; i++)
        admit(s, &dflt, bob, 6000 + i, NULL);
    snprintf(p.address, sizeof p.address, "127.0.0.1:7000");
    p.account_id = bob;
    cr_assert_eq(ar_rules_admit_provider(s, &dflt, &p, &id, NULL), AR_ELIMIT);
    /* and a refused address writes nothing */
    snprintf(p.address, sizeof p.address, "169.254.169.254:7000");
    p.account_id = new_account(s, "carol", 0);
    cr_assert_eq(ar_rules_admit_provider(s, &dflt, &p, &id, NULL), AR_EINVAL);
    cr_assert(strstr(ar_last_error(), "link-local"), "%s", ar_last_error());
    pol.allow_loopback = false;
    snprintf(p.address, sizeof p.address, "127.0.0.1:7000");
    cr_assert_eq(ar_rules_admit_provider(s, &pol, &p, &id, NULL), AR_EINVAL);
    ar_provider *all = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_provider_list(s, false, &all, &n), AR_OK);
    cr_assert_eq(n, 3 + 1 + AR_MARKET_DEFAULT_MAX_PROVIDERS - 1);
    ar_free(all);
    ar_store_close(s);
}

Test(market_rules, reachability_moves_between_states_as_checks_answer)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100)), alice = new_account(s, "alice", 0);
    fake_net net = {0};
    ar_market_policy pol = {.allow_loopback = true, .probe = fake_probe, .probe_ctx = &net};

    /* registered before its worker is up: unreachable, not leased */
    ar_reach reach = AR_REACH_OK;
    int64_t id = admit(s, &pol, alice, 5001, &reach);
    cr_assert_eq(reach, AR_REACH_UNREACHABLE);
    cr_assert_eq(net.calls, 1);
    ar_provider p = provider(s, id);
    cr_assert_eq(p.reach, AR_REACH_UNREACHABLE);
    cr_assert_eq(p.reach_failures, 1);
    cr_assert_str_eq(ar_reach_name(p.reach), "unreachable");
    cr_assert_not(ar_rules_leasable(&pol, &p));
    cr_assert(ar_rules_leasable(NULL, &p)); /* a market that does not check */

    /* a lease considers it, checks again, fails again: too few */
    ar_market_lease_request q = ask(1, 1, 2);
    ar_market_lease got;
    bool too_few = false;
    cr_assert_eq(ar_rules_acquire(s, &pol, renter, &q, &got, &too_few), AR_ELIMIT);
    cr_assert(too_few);
    cr_assert(strstr(ar_last_error(), "1 more the market cannot reach"), "%s", ar_last_error());
    cr_assert_eq(net.calls, 2);
    p = provider(s, id);
    cr_assert_eq(p.reach_failures, 2);
    /* failures in a row: checked again after 2, 4, 8 ... up to AR_REACH_RETRY_S seconds */
    cr_assert_not(ar_rules_reach_due(&p, p.reach_checked + 1));
    cr_assert(ar_rules_reach_due(&p, p.reach_checked + 2));
    ar_provider worse = p;
    worse.reach_failures = 4;
    cr_assert_not(ar_rules_reach_due(&worse, p.reach_checked + 7));
    cr_assert(ar_rules_reach_due(&worse, p.reach_checked + 8));
    worse.reach_failures = 40;
    cr_assert_not(ar_rules_reach_due(&worse, p.reach_checked + AR_REACH_RETRY_S - 1));
    cr_assert(ar_rules_reach_due(&worse, p.reach_checked + AR_REACH_RETRY_S));

    /* its worker comes up; a registration again checks at once and it is leased */
    net.up[0] = true;
    cr_assert_eq(admit(s, &pol, alice, 5001, &reach), id);
    cr_assert_eq(reach, AR_REACH_OK);
    p = provider(s, id);
    cr_assert_eq(p.reach_failures, 0);
    cr_assert_not(ar_rules_reach_due(&p, p.reach_checked + 1000));
    cr_assert_eq(ar_rules_acquire(s, &pol, renter, &q, &got, &too_few), AR_OK, "%s", ar_last_error());
    cr_assert_eq(got.providers[0].p.id, id);
    cr_assert_eq(net.calls, 3); /* a reachable provider is not checked by the lease */

    /* a second provider, up only once the lease checks it: registered, then its worker starts */
    net.up[1] = false;
    int64_t late = admit(s, &pol, alice, 5002, &reach);
    cr_assert_eq(reach, AR_REACH_UNREACHABLE);
    net.up[1] = true;
    cr_assert_eq(ar_rules_acquire(s, &pol, renter, &q, &got, &too_few), AR_OK, "%s", ar_last_error());
    cr_assert_eq(got.providers[0].p.id, late);
    cr_assert_eq(provider(s, late).reach, AR_REACH_OK);

    /* a reachable one that stops answering: the check says so */
    p = provider(s, late);
    net.up[1] = false;
    cr_assert_eq(ar_rules_check_reach(s, &pol, &p), AR_OK);
    cr_assert_eq(provider(s, late).reach, AR_REACH_UNREACHABLE);
    ar_store_close(s);
}

Test(market_rules, a_worker_reached_only_through_the_relay_is_leased_as_relayed)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100)), alice = new_account(s, "alice", 0);
    fake_net net = {0};
    ar_market_policy pol = {.allow_loopback = true, .probe = fake_probe, .probe_ctx = &net,
                            .relay_probe = fake_relay_probe};
    /* behind a router: no direct answer; not attached to the relay yet */
    ar_reach reach = AR_REACH_OK;
    int64_t id = admit(s, &pol, alice, 5001, &reach);
    cr_assert_eq(reach, AR_REACH_UNREACHABLE);
    cr_assert_eq(net.calls, 1);
    cr_assert_eq(net.relay_calls, 1);
    /* attached: the next check finds it through the relay */
    net.attached[0] = true;
    ar_provider p = provider(s, id);
    cr_assert(ar_rules_reach_due(&p, p.reach_checked));
    cr_assert_eq(ar_rules_check_reach(s, &pol, &p), AR_OK);
    p = provider(s, id);
    cr_assert_eq(p.reach, AR_REACH_RELAYED);
    cr_assert_str_eq(ar_reach_name(p.reach), "relayed");
    cr_assert_eq(p.reach_failures, 0);
    cr_assert(ar_rules_leasable(&pol, &p));
    /* a market without a relay does not lease it (it could not reach it) */
    ar_market_policy no_relay = pol;
    no_relay.relay_probe = NULL;
    cr_assert_not(ar_rules_leasable(&no_relay, &p));
    /* leased as relayed, without another check */
    int calls = net.calls + net.relay_calls;
    ar_market_lease_request q = ask(1, 1, 2);
    ar_market_lease got;
    bool too_few = false;
    cr_assert_eq(ar_rules_acquire(s, &pol, renter, &q, &got, &too_few), AR_OK, "%s", ar_last_error());
    cr_assert_eq(got.providers[0].p.id, id);
    cr_assert_eq(got.providers[0].p.reach, AR_REACH_RELAYED);
    cr_assert_eq(net.calls + net.relay_calls, calls);
    /* checked again only after AR_REACH_RETRY_S, through the relay first */
    cr_assert_not(ar_rules_reach_due(&p, p.reach_checked + AR_REACH_RETRY_S - 1));
    cr_assert(ar_rules_reach_due(&p, p.reach_checked + AR_REACH_RETRY_S));
    cr_assert_eq(ar_rules_check_reach(s, &pol, &p), AR_OK);
    cr_assert_eq(net.calls + net.relay_calls, calls + 1);
    cr_assert_eq(provider(s, id).reach, AR_REACH_RELAYED);
    /* its router opened a port: direct from the next check that misses the relay */
    net.attached[0] = false;
    net.up[0] = true;
    p = provider(s, id);
    cr_assert_eq(ar_rules_check_reach(s, &pol, &p), AR_OK);
    cr_assert_eq(provider(s, id).reach, AR_REACH_OK);
    /* gone from both: unreachable */
    net.up[0] = false;
    p = provider(s, id);
    cr_assert_eq(ar_rules_check_reach(s, &pol, &p), AR_OK);
    cr_assert_eq(provider(s, id).reach, AR_REACH_UNREACHABLE);
    ar_store_close(s);
}

Test(market_rules, a_replacement_is_a_provider_the_market_reaches)
{
    two_stages t;
    lease_two(&t, AR_CREDITS(100), 0);
    fake_net net = {0};
    ar_market_policy pol = {.allow_loopback = true, .probe = fake_probe, .probe_ctx = &net};
    /* b (port 5002) is gone; the spare (port 5003) does not answer either:
     * no replacement, the lease re-planned over a */
    ar_lease l = lease_of(t.s, t.lease.lease_id);
    ar_market_replacement r;
    cr_assert_eq(ar_store_provider_mark_offline(t.s, t.b), AR_OK);
    cr_assert_eq(ar_rules_replace(t.s, &pol, &l, t.lease.token, t.b, 0, "lost", &r), AR_OK, "%s", ar_last_error());
    cr_assert_not(r.found);
    cr_assert_eq(r.n, 1);
    cr_assert_eq(net.calls, 2); /* b, then the spare */
    cr_assert_eq(provider(t.s, t.spare).reach, AR_REACH_UNREACHABLE);
    ar_store_close(t.s);
}

/* ---- audits by replay ------------------------------------------------------------- */

/* A failed audit moves money only when the market's own replay of the
 * evidence confirms it: evidence that replays to what the provider
 * committed, or that is not the provider's own material, is a false claim
 * and moves nothing; a replay that differs from the provider's commitment
 * gives its held earnings back to the renter and drops its reliability. */
Test(market_rules, a_failed_audit_moves_money_only_when_the_markets_replay_confirms_it)
{
    static const char *SPEC = "{\"type\": \"mlp\", \"inputs\": 6, \"hidden\": [5], \"classes\": 3, "
                              "\"activation\": \"relu\", \"dropout\": 0.0}";
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t owner_a = new_account(s, "a", 0), owner_b = new_account(s, "b", 0);
    const int64_t G = (int64_t)1 << 30;
    /* a tiny model: priced high enough that its steps cost something */
    int64_t a = new_provider(s, owner_a, 5001, 100, 2 * G, AR_CREDITS(1000000));
    int64_t b = new_provider(s, owner_b, 5002, 100, G, AR_CREDITS(1000000));
    ar_market_lease_request q = ask(2, 10, 2);
    q.model_spec = SPEC;
    q.mb_rows = 4;
    q.micro_batches = 2;
    ar_market_lease got;
    bool too_few;
    cr_assert_eq(ar_rules_acquire(s, NULL, renter, &q, &got, &too_few), AR_OK, "%s", ar_last_error());
    cr_assert_eq(got.providers[0].p.id, a);
    ar_lease l = lease_of(s, got.lease_id);

    /* provider a's stage 0 (unit 0) and one honest step's material */
    ar_model_spec spec;
    cr_assert_eq(ar_spec_parse(SPEC, strlen(SPEC), "test", &spec), AR_OK);
    ar_optim_config oc = {.kind = AR_OPT_ADAMW, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f};
    ar_stage st;
    cr_assert_eq(ar_stage_create(&st, &spec, 0, 1, 4, 1, 42, &oc), AR_OK, "%s", ar_last_error());
    ar_audit_material m = {.step = 0, .M = 2, .opt_step = 0, .param_floats = st.param_floats, .has_update = 1,
                           .lr = 1e-2f, .scale = 1.0f};
    m.params = ar_calloc((size_t)st.param_floats, sizeof(float));
    m.m = ar_calloc((size_t)st.param_floats, sizeof(float));
    m.v = ar_calloc((size_t)st.param_floats, sizeof(float));
    m.mb = calloc(2, sizeof *m.mb);
    memcpy(m.params, st.mem_params, sizeof(float) * (size_t)st.param_floats);
    for (int i = 0; i < 2; i++) {
        ar_audit_mb *mb = &m.mb[i];
        mb->rows = 4;
        mb->act_bytes = 4 * 6 * sizeof(float);
        mb->act = malloc(mb->act_bytes);
        mb->ntargets = 4;
        mb->targets = malloc(4 * sizeof(int32_t));
        mb->grad_bytes = 4 * 5 * sizeof(float);
        mb->grad = malloc(mb->grad_bytes);
        for (int j = 0; j < 24; j++)
            ((float *)mb->act)[j] = (float)((j * 7 + i) % 13) / 13.0f - 0.5f;
        for (int j = 0; j < 20; j++)
            mb->grad[j] = (float)((j * 5 + i) % 11) / 110.0f - 0.05f;
        for (int j = 0; j < 4; j++)
            mb->targets[j] = (j + i) % 3;
        mb->loss = 1.0 + i;
    }
    ar_step_digests honest;
    uint8_t after[32];
    cr_assert_eq(ar_audit_replay(&st, &m, 42, &honest, after), AR_OK, "%s", ar_last_error());
    void *ev_bytes;
    size_t ev_n;
    cr_assert_eq(ar_audit_material_encode(&m, &ev_bytes, &ev_n), AR_OK);
    ar_audit_evidence ev = {.material = ev_bytes, .material_bytes = ev_n, .optim = oc, .seed = 42};

    /* steps 0 and 1 paid with a's honest commitments (1's state: 0's after);
     * steps 2 and 3 with a cheat's: its ACT out of step 2 is not the replay's */
    for (int64_t step = 0; step < 4; step++) {
        ar_step_digests d = honest;
        if (step % 2 == 1)
            memcpy(d.d[AR_DIGEST_STATE], after, 32);
        if (step == 2)
            d.d[AR_DIGEST_ACT_OUT][0] ^= 1;
        ar_stage_usage u[2] = {{.stage = 0, .provider_id = a, .has_digests = true},
                               {.stage = 1, .provider_id = b}};
        memcpy(u[0].digests, &d, sizeof d);
        ar_step_settlement paid;
        cr_assert_eq(ar_rules_settle_step(s, &l, step, u, 2, false, 0, &paid), AR_OK, "%s", ar_last_error());
    }
    int64_t held_a = pending(s, owner_a), before = balance(s, renter);
    cr_assert(held_a > 0);
    size_t rows = ledger_rows(s);
    bool confirmed = true;
    int64_t back = -1;

    /* the step after not reported yet: nothing to compare with */
    cr_assert_eq(ar_rules_audit_claim(s, &l, a, 3, 0, &ev, &confirmed, &back), AR_ENOTFOUND);
    /* not the member at that stage */
    cr_assert_eq(ar_rules_audit_claim(s, &l, b, 0, 0, &ev, &confirmed, &back), AR_EINVAL);
    /* an honest step: the replay reproduces the commitments */
    cr_assert_eq(ar_rules_audit_claim(s, &l, a, 0, 0, &ev, &confirmed, &back), AR_ELIMIT);
    cr_assert(strstr(ar_last_error(), "reproduces every digest"), "%s", ar_last_error());
    cr_assert_not(confirmed);
    /* material that is not what the provider committed to */
    float kept0 = m.params[0];
    m.params[0] += 1.0f;
    void *forged;
    size_t forged_n;
    cr_assert_eq(ar_audit_material_encode(&m, &forged, &forged_n), AR_OK);
    m.params[0] = kept0;
    ar_audit_evidence fake = ev;
    fake.material = forged;
    fake.material_bytes = forged_n;
    cr_assert_eq(ar_rules_audit_claim(s, &l, a, 0, 0, &fake, &confirmed, &back), AR_ELIMIT);
    cr_assert(strstr(ar_last_error(), "not what the provider committed"), "%s", ar_last_error());
    free(forged);
    /* nothing moved, and the renter has two false claims */
    cr_assert_eq(ledger_rows(s), rows);
    cr_assert_eq(pending(s, owner_a), held_a);
    ar_account acc;
    cr_assert_eq(ar_store_account_get(s, renter, &acc), AR_OK);
    cr_assert_eq(acc.false_claims, 2);

    /* the cheat's step 2: confirmed, its held earnings back with the renter */
    m.step = 2;
    void *ev2;
    size_t ev2_n;
    cr_assert_eq(ar_audit_material_encode(&m, &ev2, &ev2_n), AR_OK);
    ar_audit_evidence cheat = ev;
    cheat.material = ev2;
    cheat.material_bytes = ev2_n;
    cr_assert_eq(ar_rules_audit_claim(s, &l, a, 2, 0, &cheat, &confirmed, &back), AR_OK, "%s", ar_last_error());
    cr_assert(confirmed);
    cr_assert_eq(back, held_a);
    cr_assert_eq(pending(s, owner_a), 0);
    cr_assert_eq(balance(s, owner_a), 0);
    cr_assert_eq(balance(s, renter), before + held_a);
    cr_assert_float_eq(reliability(s, owner_a), 0.0, 1e-12);
    bool on_record = false;
    cr_assert_eq(ar_store_audit_failed(s, l.job_id, a, &on_record), AR_OK);
    cr_assert(on_record);
    assert_books(s);

    free(ev2);
    free(ev_bytes);
    ar_audit_material_free(&m);
    ar_stage_destroy(&st);
    ar_store_close(s);
}
