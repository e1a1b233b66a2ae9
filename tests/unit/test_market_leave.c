/* A graceful leave at the market (market/rules.h, ar_rules_hand_over; the
 * store's provider_leaving and lease_handovers), called directly over a
 * real SQLite file: a provider that says it is leaving is leased to no one;
 * its renter may hand its place over, which is not a loss (no payment
 * moves, the leaver stays online and as reliable); only the provider's own
 * word opens it; asked again, the same answer; none free, nothing changes. */
#include "market/money.h"
#include "market/rules.h"
#include "market/store.h"

#include "arceus.h"
#include "core/core.h"
#include "tmpfiles.h"

#include <criterion/criterion.h>
#include <string.h>

TestSuite(market_leave, .init = tmp_make, .fini = tmp_remove);

static const int64_t TF = 1000000000000LL;

typedef struct {
    ar_store *s;
    int64_t renter, owner[3];
    int64_t a, b, spare; /* a: stage 0, b: stage 1, spare: free, dearer */
    ar_market_lease lease;
    ar_lease l;
    int64_t f0, f1; /* each stage's FLOPs per step, as the market planned them */
} leased;

/* what `flops` cost at `price` micro-credits per TFLOP */
static int64_t cost(int64_t flops, int64_t price)
{
    int64_t c = -1;
    cr_assert_eq(ar_flops_cost(flops, price, &c), AR_OK);
    return c;
}

static int64_t account(ar_store *s, const char *name, int64_t micro)
{
    char tok[AR_TOKEN_LEN];
    int64_t id = 0;
    cr_assert_eq(ar_store_account_create(s, name, micro, tok, &id), AR_OK, "%s", ar_last_error());
    return id;
}

static int64_t provider_of(ar_store *s, int64_t owner, int port, int64_t price)
{
    ar_provider p = {.account_id = owner, .gflops = 100, .mem_bytes = (int64_t)1 << 30, .cores = 4,
                     .price_per_tflop = price};
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

static size_t ledger_rows(ar_store *s)
{
    ar_ledger_row *rows = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_ledger_list(s, 0, &rows, &n), AR_OK, "%s", ar_last_error());
    ar_free(rows);
    return n;
}

static int64_t member_at(ar_store *s, int64_t lease, int stage)
{
    ar_lease_member *mem = NULL;
    size_t n = 0;
    int64_t id = 0;
    cr_assert_eq(ar_store_lease_members(s, lease, &mem, &n), AR_OK, "%s", ar_last_error());
    for (size_t i = 0; i < n; i++)
        if (mem[i].stage == stage)
            id = mem[i].provider_id;
    ar_free(mem);
    return id;
}

/* Two providers at 1 credit per TFLOP leased for 1 TFLOP per stage and
 * step, a third free at 2; four steps paid. */
static void lease_two(leased *t)
{
    cr_assert_eq(ar_store_open(tmp_path("market.db"), &t->s), AR_OK, "%s", ar_last_error());
    t->renter = account(t->s, "renter", AR_CREDITS(100));
    const char *names[3] = {"a", "b", "spare"};
    for (int i = 0; i < 3; i++)
        t->owner[i] = account(t->s, names[i], 0);
    t->a = provider_of(t->s, t->owner[0], 5001, AR_CREDITS(1));
    t->b = provider_of(t->s, t->owner[1], 5002, AR_CREDITS(1));
    t->spare = provider_of(t->s, t->owner[2], 5003, AR_CREDITS(2));
    /* the market plans and prices the lease from the model: three 1000-wide layers */
    ar_market_lease_request q = {.devices = 2, .est_steps = 10, .flops_per_step = 2 * TF, .spec = "mlp, a test",
                                 .model_spec = "{\"type\": \"mlp\", \"inputs\": 1000, \"hidden\": [1000, 1000],"
                                               " \"classes\": 1000, \"activation\": \"relu\", \"dropout\": 0.0}",
                                 .mb_rows = 64, .micro_batches = 1};
    bool too_few;
    cr_assert_eq(ar_rules_acquire(t->s, NULL, t->renter, &q, &t->lease, &too_few), AR_OK, "%s", ar_last_error());
    cr_assert_eq(t->lease.providers[1].p.id, t->b);
    cr_assert_eq(ar_store_lease_get(t->s, t->lease.lease_id, &t->l), AR_OK);
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    cr_assert_eq(ar_store_lease_members(t->s, t->lease.lease_id, &mem, &nm), AR_OK);
    cr_assert_eq(nm, 2);
    t->f0 = mem[0].flops_per_step;
    t->f1 = mem[1].flops_per_step;
    ar_free(mem);
    for (int64_t step = 0; step < 4; step++) {
        ar_stage_usage u[2] = {{.stage = 0, .provider_id = t->a}, {.stage = 1, .provider_id = t->b}} /* 0: the plan's FLOPs */;
        ar_step_settlement paid;
        cr_assert_eq(ar_rules_settle_step(t->s, &t->l, step, u, 2, false, 0, &paid), AR_OK, "%s", ar_last_error());
    }
}

Test(market_leave, a_provider_leaving_is_leased_to_no_one_until_it_says_otherwise)
{
    ar_store *s = NULL;
    cr_assert_eq(ar_store_open(tmp_path("market.db"), &s), AR_OK);
    int64_t p = provider_of(s, account(s, "a", 0), 5001, AR_CREDITS(1));
    cr_assert_eq(provider(s, p).leaving_since, 0);
    cr_assert_eq(ar_store_provider_set_leaving(s, p, true), AR_OK, "%s", ar_last_error());
    int64_t since = provider(s, p).leaving_since;
    cr_assert_gt(since, 0);
    /* every heartbeat says it again: the leave began when it began */
    cr_assert_eq(ar_store_provider_set_leaving(s, p, true), AR_OK);
    cr_assert_eq(provider(s, p).leaving_since, since);
    ar_provider *ps = NULL;
    ar_ranked *ranked = NULL;
    size_t n = 9;
    cr_assert_eq(ar_rules_free_providers(s, 0, &ps, &ranked, &n, NULL), AR_OK);
    cr_assert_eq(n, 0);
    ar_free(ps);
    ar_free(ranked);
    cr_assert_eq(ar_store_provider_set_leaving(s, p, false), AR_OK);
    cr_assert_eq(provider(s, p).leaving_since, 0);
    cr_assert_eq(ar_rules_free_providers(s, 0, &ps, &ranked, &n, NULL), AR_OK);
    cr_assert_eq(n, 1);
    ar_free(ps);
    ar_free(ranked);
    cr_assert_eq(ar_store_provider_set_leaving(s, 999, true), AR_ENOTFOUND);
    ar_store_close(s);
}

Test(market_leave, a_hand_over_is_not_a_loss_and_asked_again_answers_the_same)
{
    leased t;
    lease_two(&t);
    size_t rows = ledger_rows(t.s);
    ar_market_handover h;
    /* the renter's word alone: refused, nothing changes */
    cr_assert_eq(ar_rules_hand_over(t.s, NULL, &t.l, NULL, t.b, 4, 0, &h), AR_ELIMIT);
    cr_assert(strstr(ar_last_error(), "has not said it is leaving"), "%s", ar_last_error());
    cr_assert_eq(member_at(t.s, t.l.id, 1), t.b);

    ar_account b_before;
    cr_assert_eq(ar_store_account_get(t.s, t.owner[1], &b_before), AR_OK);
    cr_assert_eq(ar_store_provider_set_leaving(t.s, t.b, true), AR_OK);
    cr_assert_eq(ar_rules_hand_over(t.s, NULL, &t.l, NULL, t.b, 4, 0, &h), AR_OK, "%s", ar_last_error());
    cr_assert(h.found);
    cr_assert_not(h.again);
    cr_assert_eq(h.replacement.p.id, t.spare);
    cr_assert_str_eq(h.replacement.account, "spare");
    cr_assert_eq(h.replacement.flops_per_step, t.f1);
    cr_assert_eq(h.spent, 4 * (cost(t.f0, AR_CREDITS(1)) + cost(t.f1, AR_CREDITS(1))));
    cr_assert_eq(member_at(t.s, t.l.id, 1), t.spare);
    /* not a loss: no payment moved, the leaver keeps its four steps' pay,
     * is online and as reliable as before */
    cr_assert_eq(ledger_rows(t.s), rows);
    int64_t b_balance = -1;
    int64_t b_pending = -1;
    cr_assert_eq(ar_store_account_balance(t.s, t.owner[1], &b_balance), AR_OK);
    cr_assert_eq(ar_store_account_pending(t.s, t.owner[1], &b_pending), AR_OK);
    cr_assert_eq(b_balance + b_pending, 4 * cost(t.f1, AR_CREDITS(1))); /* held in escrow or released */
    ar_provider b = provider(t.s, t.b);
    cr_assert(b.online);
    ar_account b_after; /* reliability is the account's */
    cr_assert_eq(ar_store_account_get(t.s, t.owner[1], &b_after), AR_OK);
    cr_assert_geq(b_after.reliability, b_before.reliability);

    /* the answer lost, asked again: the same, nothing done twice */
    ar_market_handover again;
    cr_assert_eq(ar_rules_hand_over(t.s, NULL, &t.l, NULL, t.b, 4, 0, &again), AR_OK, "%s", ar_last_error());
    cr_assert(again.again && again.found);
    cr_assert_eq(again.replacement.p.id, t.spare);
    cr_assert_eq(ledger_rows(t.s), rows);
    /* never in the lease: refused */
    cr_assert_eq(ar_rules_hand_over(t.s, NULL, &t.l, NULL, 999, 4, 0, &again), AR_EINVAL);

    /* the newcomer is paid from here, at its price; the leaver is no member */
    ar_stage_usage u[2] = {{.stage = 0, .provider_id = t.a}, {.stage = 1, .provider_id = t.spare}};
    ar_step_settlement paid;
    cr_assert_eq(ar_rules_settle_step(t.s, &t.l, 4, u, 2, false, 0, &paid), AR_OK, "%s", ar_last_error());
    cr_assert_eq(paid.paid, cost(t.f0, AR_CREDITS(1)) + cost(t.f1, AR_CREDITS(2)));
    ar_stage_usage old[2] = {{.stage = 0, .provider_id = t.a}, {.stage = 1, .provider_id = t.b}};
    cr_assert_neq(ar_rules_settle_step(t.s, &t.l, 5, old, 2, false, 0, &paid), AR_OK);
    int64_t sum = 1;
    cr_assert_eq(ar_store_ledger_sum(t.s, &sum), AR_OK);
    cr_assert_eq(sum, 0);
    cr_assert_eq(ar_store_ledger_check(t.s, NULL), AR_OK, "%s", ar_last_error());
    ar_store_close(t.s);
}

Test(market_leave, no_free_provider_or_too_little_memory_changes_nothing)
{
    leased t;
    lease_two(&t);
    cr_assert_eq(ar_store_provider_set_leaving(t.s, t.b, true), AR_OK);
    ar_market_handover h;
    /* the free one offers 1 GiB: too little for a stage of 2 */
    cr_assert_eq(ar_rules_hand_over(t.s, NULL, &t.l, NULL, t.b, 4, (int64_t)2 << 30, &h), AR_OK, "%s",
                 ar_last_error());
    cr_assert_not(h.found);
    cr_assert_eq(member_at(t.s, t.l.id, 1), t.b);
    /* the free one leaving too: no one */
    cr_assert_eq(ar_store_provider_set_leaving(t.s, t.spare, true), AR_OK);
    cr_assert_eq(ar_rules_hand_over(t.s, NULL, &t.l, NULL, t.b, 4, 0, &h), AR_OK, "%s", ar_last_error());
    cr_assert_not(h.found);
    cr_assert_eq(member_at(t.s, t.l.id, 1), t.b);
    ar_lease_handover done;
    cr_assert_eq(ar_store_lease_handover(t.s, t.l.id, t.b, &done), AR_ENOTFOUND);
    /* back, and found on a later try */
    cr_assert_eq(ar_store_provider_set_leaving(t.s, t.spare, false), AR_OK);
    cr_assert_eq(ar_rules_hand_over(t.s, NULL, &t.l, NULL, t.b, 4, 0, &h), AR_OK, "%s", ar_last_error());
    cr_assert(h.found);
    cr_assert_eq(member_at(t.s, t.l.id, 1), t.spare);
    ar_store_close(t.s);
}
