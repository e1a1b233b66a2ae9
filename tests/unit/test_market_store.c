/* The market store on a real SQLite file: schema migrations, WAL, accounts and
 * tokens, the double-entry ledger (sum zero, no overdraft, paid once), leases
 * and their up-front estimate, providers, jobs, two writers at once, and a
 * writer killed with SIGKILL in the middle of its transfers. */
#include "market/rules.h"
#include "market/store.h"

#include "arceus.h"
#include "core/core.h"

#include <criterion/criterion.h>
#include <math.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static char tmpdir[256];
static char dbpath[512];

static void mk_tmp(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/ar_test_market_XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
    snprintf(dbpath, sizeof dbpath, "%s/market.db", tmpdir);
}

static void rm_tmp(void)
{
    char p[600];
    const char *sfx[] = {"", "-wal", "-shm", "-journal"};
    for (size_t i = 0; i < sizeof sfx / sizeof sfx[0]; i++) {
        snprintf(p, sizeof p, "%s%s", dbpath, sfx[i]);
        unlink(p);
    }
    rmdir(tmpdir);
}

TestSuite(market_store, .init = mk_tmp, .fini = rm_tmp);

static ar_store *open_db(void)
{
    ar_store *s = NULL;
    int rc = ar_store_open(dbpath, &s);
    cr_assert_eq(rc, 0, "open: %s", ar_last_error());
    return s;
}

static int64_t balance(ar_store *s, int64_t id)
{
    int64_t b = 0;
    cr_assert_eq(ar_store_account_balance(s, id, &b), 0, "%s", ar_last_error());
    return b;
}

/* What escrow holds for an account's providers. */
static int64_t pending(ar_store *s, int64_t id)
{
    int64_t v = -1;
    cr_assert_eq(ar_store_account_pending(s, id, &v), 0, "%s", ar_last_error());
    return v;
}

/* The job ends and its escrow is released (a settling window of 0). */
static int end_and_settle(ar_store *s, int64_t job)
{
    int n = -1;
    cr_assert_eq(ar_store_job_update(s, job, AR_JOB_DONE, 0), 0, "%s", ar_last_error());
    cr_assert_eq(ar_store_escrow_release(s, (int64_t)time(NULL), 0, &n), 0, "%s", ar_last_error());
    return n;
}

static void assert_books(ar_store *s, int64_t *transfers)
{
    int64_t sum = 1;
    cr_assert_eq(ar_store_ledger_sum(s, &sum), 0, "%s", ar_last_error());
    cr_assert_eq(sum, 0, "ledger sums to %lld", (long long)sum);
    cr_assert_eq(ar_store_ledger_check(s, transfers), 0, "%s", ar_last_error());
}

static size_t ledger_rows(ar_store *s)
{
    ar_ledger_row *rows = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_ledger_list(s, 0, &rows, &n), 0, "%s", ar_last_error());
    ar_free(rows);
    return n;
}

static int64_t new_account(ar_store *s, const char *name, int64_t micro)
{
    char tok[AR_TOKEN_LEN];
    int64_t id = 0;
    cr_assert_eq(ar_store_account_create(s, name, micro, tok, &id), 0, "%s", ar_last_error());
    return id;
}

static int64_t new_provider(ar_store *s, int64_t account, const char *addr, int64_t price)
{
    ar_provider p = {.account_id = account, .gflops = 100, .mem_bytes = 1 << 30, .cores = 4,
                     .price_per_tflop = price, .reliability = 0.9};
    snprintf(p.address, sizeof p.address, "%s", addr);
    int64_t id = 0;
    cr_assert_eq(ar_store_provider_register(s, &p, &id), 0, "%s", ar_last_error());
    return id;
}

static int64_t new_job(ar_store *s, int64_t renter, int64_t max_credits)
{
    int64_t id = 0;
    cr_assert_eq(ar_store_job_create(s, renter, "{\"model\":\"mlp\"}", max_credits, &id), 0, "%s",
                 ar_last_error());
    return id;
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        *len = 0;
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    cr_assert_not_null(buf);
    *len = fread(buf, 1, (size_t)n, f);
    fclose(f);
    return buf;
}

static bool contains(const char *hay, size_t n, const char *needle)
{
    return memmem(hay, n, needle, strlen(needle)) != NULL;
}

/* ---- schema --------------------------------------------------------------- */

Test(market_store, migrations_fresh_then_idempotent_reopen)
{
    ar_store *s = open_db();
    int v = -1;
    cr_assert_eq(ar_store_schema_version(s, &v), 0);
    cr_assert_eq(v, AR_STORE_SCHEMA_VERSION);
    int64_t alice = new_account(s, "alice", AR_CREDITS(5));
    ar_store_close(s);

    for (int i = 0; i < 2; i++) {
        s = open_db();
        cr_assert_eq(ar_store_schema_version(s, &v), 0);
        cr_assert_eq(v, AR_STORE_SCHEMA_VERSION);
        /* no migration ran twice: one mint, one escrow, the data survived */
        ar_account *accs = NULL;
        size_t n = 0;
        cr_assert_eq(ar_store_account_list(s, &accs, &n), 0);
        cr_assert_eq(n, 3);
        int sys = 0;
        for (size_t k = 0; k < n; k++)
            sys += accs[k].system;
        cr_assert_eq(sys, 2);
        ar_free(accs);
        cr_assert_eq(balance(s, alice), AR_CREDITS(5));
        assert_books(s, NULL);
        ar_store_close(s);
    }
}

Test(market_store, wal_mode_on)
{
    ar_store *s = open_db();
    new_account(s, "alice", 1);
    /* a WAL database has file format versions 2/2 at header bytes 18 and 19 */
    unsigned char hdr[100];
    FILE *f = fopen(dbpath, "rb");
    cr_assert_not_null(f);
    cr_assert_eq(fread(hdr, 1, sizeof hdr, f), sizeof hdr);
    fclose(f);
    cr_assert_eq(memcmp(hdr, "SQLite format 3", 15), 0);
    cr_assert_eq(hdr[18], 2);
    cr_assert_eq(hdr[19], 2);
    char wal[600];
    snprintf(wal, sizeof wal, "%s-wal", dbpath);
    struct stat st;
    cr_assert_eq(stat(wal, &st), 0, "no write-ahead log next to the database");
    ar_store_close(s);
}

Test(market_store, open_bad_path_is_an_error)
{
    ar_store *s = NULL;
    cr_assert_eq(ar_store_open("/nonexistent-dir/x/market.db", &s), AR_EIO);
    cr_assert_null(s);
    cr_assert(strstr(ar_last_error(), "db:") != NULL, "%s", ar_last_error());
}

/* The store's own checks, seen from outside it: raw SQL on the file plays a
 * newer binary and a tamperer. */
static void raw_sql(const char *sql, int want)
{
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open(dbpath, &db), SQLITE_OK);
    int rc = sqlite3_exec(db, sql, NULL, NULL, NULL);
    cr_assert_eq(rc, want, "%s: %s", sql, sqlite3_errmsg(db));
    sqlite3_close(db);
}

Test(market_store, newer_schema_refused_and_tampering_detected)
{
    ar_store *s = open_db();
    int64_t a = new_account(s, "a", AR_CREDITS(1));
    ar_store_close(s);

    /* ledger rows are append-only */
    raw_sql("UPDATE ledger SET amount = amount * 2", SQLITE_CONSTRAINT);
    raw_sql("DELETE FROM ledger", SQLITE_CONSTRAINT);
    /* a lone row breaks the books, and the audit says so */
    char sql[256];
    snprintf(sql, sizeof sql,
             "INSERT INTO ledger (transfer_id, account_id, amount, reason, created)"
             " VALUES (1, %lld, 5, 'forged', 0)", (long long)a);
    raw_sql(sql, SQLITE_OK);
    s = open_db();
    int64_t sum = 0;
    cr_assert_eq(ar_store_ledger_sum(s, &sum), 0);
    cr_assert_eq(sum, 5);
    cr_assert_eq(ar_store_ledger_check(s, NULL), AR_EINTERNAL);
    ar_store_close(s);

    /* a database from a newer build is not opened (nor migrated down) */
    raw_sql("UPDATE schema_version SET version = 99", SQLITE_OK);
    s = NULL;
    cr_assert_eq(ar_store_open(dbpath, &s), AR_EFORMAT);
    cr_assert_null(s);
    cr_assert(strstr(ar_last_error(), "99") != NULL, "%s", ar_last_error());
}

/* ---- accounts -------------------------------------------------------------- */

Test(market_store, account_create_auth_and_only_the_hash_is_stored)
{
    ar_store *s = open_db();
    char tok[AR_TOKEN_LEN];
    int64_t id = 0;
    cr_assert_eq(ar_store_account_create(s, "alice", AR_CREDITS(10), tok, &id), 0, "%s",
                 ar_last_error());
    cr_assert_eq(strlen(tok), 64);
    cr_assert_eq(strspn(tok, "0123456789abcdef"), 64);

    int64_t got = 0;
    cr_assert_eq(ar_store_account_auth(s, tok, &got), 0, "%s", ar_last_error());
    cr_assert_eq(got, id);

    char wrong[AR_TOKEN_LEN];
    memcpy(wrong, tok, sizeof wrong);
    wrong[10] = wrong[10] == 'a' ? 'b' : 'a';
    cr_assert_eq(ar_store_account_auth(s, wrong, &got), AR_ENOTFOUND);
    cr_assert_eq(ar_store_account_auth(s, "", &got), AR_ENOTFOUND);
    cr_assert_eq(ar_store_account_auth(s, NULL, &got), AR_ENOTFOUND);
    cr_assert_eq(ar_store_account_auth(s, "abc", &got), AR_ENOTFOUND);

    /* names: unique, printable */
    char tok2[AR_TOKEN_LEN];
    cr_assert_eq(ar_store_account_create(s, "alice", 0, tok2, NULL), AR_EINVAL);
    cr_assert_eq(ar_store_account_create(s, "mint", 0, tok2, NULL), AR_EINVAL);
    cr_assert_eq(ar_store_account_create(s, "a b", 0, tok2, NULL), AR_EINVAL);
    cr_assert_eq(ar_store_account_create(s, "", 0, tok2, NULL), AR_EINVAL);
    cr_assert_eq(ar_store_account_create(s, "bob", -1, tok2, NULL), AR_EINVAL);

    ar_account a;
    cr_assert_eq(ar_store_account_find(s, "alice", &a), 0);
    cr_assert_eq(a.id, id);
    cr_assert_eq(a.balance, AR_CREDITS(10));
    cr_assert_eq(ar_store_account_find(s, "nobody", &a), AR_ENOTFOUND);
    ar_store_close(s);

    /* the file holds the SHA-256 of the token, never the token */
    unsigned char md[32];
    unsigned int mdlen = 0;
    cr_assert(EVP_Digest(tok, 64, md, &mdlen, EVP_sha256(), NULL));
    char hash[65];
    for (int i = 0; i < 32; i++)
        snprintf(hash + 2 * i, 3, "%02x", md[i]);
    size_t n = 0;
    char *bytes = slurp(dbpath, &n);
    cr_assert_not_null(bytes);
    cr_assert(!contains(bytes, n, tok), "the token is in the database file");
    cr_assert(contains(bytes, n, hash), "the token's hash is not in the database file");
    free(bytes);
}

Test(market_store, mint_keeps_the_sum_zero)
{
    ar_store *s = open_db();
    int64_t a = new_account(s, "a", AR_CREDITS(100));
    int64_t b = new_account(s, "b", AR_CREDITS(250));
    new_account(s, "c", 0); /* nothing minted: no transfer */
    cr_assert_eq(ar_store_account_mint(s, a, 7), 0);
    cr_assert_eq(ar_store_account_mint(s, a, 0), AR_EINVAL);
    int64_t transfers = 0;
    assert_books(s, &transfers);
    cr_assert_eq(transfers, 3);
    cr_assert_eq(ledger_rows(s), 6);
    ar_account mint;
    cr_assert_eq(ar_store_account_find(s, "mint", &mint), 0);
    cr_assert(mint.system);
    cr_assert_eq(mint.balance, -(AR_CREDITS(350) + 7));
    cr_assert_eq(balance(s, a), AR_CREDITS(100) + 7);
    cr_assert_eq(balance(s, b), AR_CREDITS(250));
    /* the mint cannot log in */
    int64_t got;
    cr_assert_eq(ar_store_account_auth(s, "", &got), AR_ENOTFOUND);
    ar_store_close(s);
}

/* ---- money ------------------------------------------------------------------- */

Test(market_store, cost_is_integer_and_rounded)
{
    int64_t c = -1;
    cr_assert_eq(ar_flops_cost(1000000000000LL, AR_CREDITS(2), &c), 0);
    cr_assert_eq(c, AR_CREDITS(2));
    cr_assert_eq(ar_flops_cost(1500000LL, 1000000, &c), 0); /* 1.5e6 FLOPs at 1 credit/TFLOP */
    cr_assert_eq(c, 2);                                      /* 1.5 micro-credits, rounded */
    cr_assert_eq(ar_flops_cost(0, AR_CREDITS(2), &c), 0);
    cr_assert_eq(c, 0);
    cr_assert_eq(ar_flops_cost(-1, 1, &c), AR_EINVAL);
    cr_assert_eq(ar_flops_cost(INT64_MAX, INT64_MAX, &c), AR_ELIMIT);
}

Test(market_store, usage_transfers_balance_and_sum_zero)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(1000));
    int64_t pa = new_account(s, "pa", 0), pb = new_account(s, "pb", 0);
    int64_t p0 = new_provider(s, pa, "10.0.0.1:7000", AR_CREDITS(2));
    int64_t p1 = new_provider(s, pb, "10.0.0.2:7000", AR_CREDITS(3));
    int64_t job = new_job(s, renter, 0);
    const int64_t tf = 1000000000000LL;

    for (int64_t stp = 1; stp <= 10; stp++) {
        ar_usage_result r;
        cr_assert_eq(ar_store_usage_record(s, job, stp, p0, 0, 2 * tf, AR_CREDITS(2), &r), 0,
                     "%s", ar_last_error());
        cr_assert_eq(r, AR_USAGE_PAID);
        cr_assert_eq(ar_store_usage_record(s, job, stp, p1, 1, tf, AR_CREDITS(3), &r), 0, "%s",
                     ar_last_error());
        cr_assert_eq(r, AR_USAGE_PAID);
        int64_t sum = 1;
        cr_assert_eq(ar_store_ledger_sum(s, &sum), 0);
        cr_assert_eq(sum, 0);
    }
    cr_assert_eq(pending(s, pa), AR_CREDITS(40));
    cr_assert_eq(pending(s, pb), AR_CREDITS(30));
    cr_assert_eq(balance(s, renter), AR_CREDITS(1000 - 70));
    ar_job j;
    cr_assert_eq(ar_store_job_get(s, job, &j), 0);
    cr_assert_eq(j.spent, AR_CREDITS(70));
    ar_store_job_clear(&j);

    /* the renter's ledger: one mint row and twenty payments */
    ar_ledger_row *rows = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_ledger_list(s, renter, &rows, &n), 0);
    cr_assert_eq(n, 21);
    cr_assert_str_eq(rows[0].reason, "mint");
    cr_assert_eq(rows[0].job_id, 0);
    cr_assert_eq(rows[0].step, -1);
    cr_assert_str_eq(rows[1].reason, "usage");
    cr_assert_eq(rows[1].job_id, job);
    cr_assert_eq(rows[1].step, 1);
    cr_assert_eq(rows[1].amount, -AR_CREDITS(4));
    ar_free(rows);
    int64_t transfers = 0;
    assert_books(s, &transfers);
    cr_assert_eq(transfers, 21);
    ar_store_close(s);
}

Test(market_store, same_work_reported_twice_is_paid_once_into_escrow)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t pa = new_account(s, "pa", 0);
    int64_t p0 = new_provider(s, pa, "h:1", AR_CREDITS(1));
    int64_t job = new_job(s, renter, 0);
    const int64_t tf = 1000000000000LL;
    ar_usage_result r;
    cr_assert_eq(ar_store_usage_record(s, job, 1, p0, 0, tf, AR_CREDITS(1), &r), 0);
    cr_assert_eq(r, AR_USAGE_PAID);
    size_t rows = ledger_rows(s);
    ar_store_close(s);

    /* a replay, also after a restart of the market */
    s = open_db();
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(ar_store_usage_record(s, job, 1, p0, 0, tf, AR_CREDITS(1), &r), 0);
        cr_assert_eq(r, AR_USAGE_DUP);
    }
    cr_assert_eq(ledger_rows(s), rows);
    /* held in escrow: the provider's, not yet spendable */
    cr_assert_eq(balance(s, pa), 0);
    cr_assert_eq(pending(s, pa), AR_CREDITS(1));
    cr_assert_eq(balance(s, renter), AR_CREDITS(99));
    assert_books(s, NULL);
    cr_assert_eq(end_and_settle(s, job), 1);
    cr_assert_eq(balance(s, pa), AR_CREDITS(1));
    cr_assert_eq(pending(s, pa), 0);
    assert_books(s, NULL);
    ar_store_close(s);
}

Test(market_store, another_provider_doing_the_same_work_is_paid_besides_and_reverses_nothing)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t pa = new_account(s, "pa", 0), pb = new_account(s, "pb", 0);
    int64_t p0 = new_provider(s, pa, "h:1", AR_CREDITS(1));
    int64_t p1 = new_provider(s, pb, "h:2", AR_CREDITS(2));
    int64_t job = new_job(s, renter, 0);
    const int64_t tf = 1000000000000LL;
    ar_usage_result r;
    cr_assert_eq(ar_store_usage_record(s, job, 5, p0, 0, tf, AR_CREDITS(1), &r), 0);
    cr_assert_eq(r, AR_USAGE_PAID);
    /* stage 0 of step 5 done again by p1: p0's work was not contested, so
     * it stays p0's; p1 is paid for its own */
    cr_assert_eq(ar_store_usage_record(s, job, 5, p1, 0, tf, AR_CREDITS(2), &r), 0, "%s", ar_last_error());
    cr_assert_eq(r, AR_USAGE_PAID);
    cr_assert_eq(pending(s, pa), AR_CREDITS(1));
    cr_assert_eq(pending(s, pb), AR_CREDITS(2));
    cr_assert_eq(balance(s, renter), AR_CREDITS(97));
    cr_assert_eq(ar_store_usage_record(s, job, 5, p1, 0, tf, AR_CREDITS(2), &r), 0);
    cr_assert_eq(r, AR_USAGE_DUP);
    ar_job j;
    cr_assert_eq(ar_store_job_get(s, job, &j), 0);
    cr_assert_eq(j.spent, AR_CREDITS(3));
    ar_store_job_clear(&j);
    int64_t transfers = 0;
    assert_books(s, &transfers);
    cr_assert_eq(transfers, 3); /* mint, usage, usage */
    ar_store_close(s);
}

Test(market_store, escrow_releases_at_the_end_of_the_window_or_when_verified)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t pa = new_account(s, "pa", 0);
    int64_t p0 = new_provider(s, pa, "h:1", AR_CREDITS(1));
    int64_t job = new_job(s, renter, 0);
    const int64_t tf = 1000000000000LL;
    ar_lease_member m = {.provider_id = p0, .stage = 0, .flops_per_step = tf, .price_per_tflop = AR_CREDITS(1),
                         .first_unit = 0, .last_unit = 1, .verified_step = -1};
    char tok[AR_TOKEN_LEN];
    int64_t lease = 0;
    cr_assert_eq(ar_store_lease_create(s, job, renter, &m, 1, 10, 0, NULL, tok, &lease, NULL), 0, "%s",
                 ar_last_error());
    for (int64_t stp = 0; stp < 6; stp++)
        cr_assert_eq(ar_store_usage_record(s, job, stp, p0, 0, tf, AR_CREDITS(1), NULL), 0);
    int n = -1;
    int64_t now = (int64_t)time(NULL);
    /* running: nothing is due */
    cr_assert_eq(ar_store_escrow_release(s, now, 0, &n), 0);
    cr_assert_eq(n, 0);
    cr_assert_eq(pending(s, pa), AR_CREDITS(6));
    /* an audit verified steps 0-2: those are released at once, the rest held */
    cr_assert_eq(ar_store_member_verified(s, lease, p0, 2, &n), 0, "%s", ar_last_error());
    cr_assert_eq(n, 3);
    cr_assert_eq(balance(s, pa), AR_CREDITS(3));
    cr_assert_eq(pending(s, pa), AR_CREDITS(3));
    cr_assert_eq(ar_store_member_verified(s, lease, p0, 1, &n), 0); /* it only grows */
    cr_assert_eq(n, 0);
    cr_assert_eq(ar_store_member_verified(s, lease, 999, 1, &n), AR_ENOTFOUND);
    /* a late report of work already verified is the provider's at once */
    cr_assert_eq(ar_store_member_verified(s, lease, p0, 7, &n), 0);
    cr_assert_eq(n, 3);
    cr_assert_eq(ar_store_usage_record(s, job, 6, p0, 0, tf, AR_CREDITS(1), NULL), 0, "%s", ar_last_error());
    cr_assert_eq(balance(s, pa), AR_CREDITS(7));
    cr_assert_eq(pending(s, pa), 0);
    cr_assert_eq(ar_store_usage_record(s, job, 8, p0, 0, tf, AR_CREDITS(1), NULL), 0);
    cr_assert_eq(pending(s, pa), AR_CREDITS(1));
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    cr_assert_eq(ar_store_lease_members(s, lease, &mem, &nm), 0);
    cr_assert_eq(mem[0].verified_step, 7);
    ar_free(mem);
    /* the job ends: held until its window has passed */
    cr_assert_eq(ar_store_job_update(s, job, AR_JOB_DONE, 6), 0);
    cr_assert_eq(ar_store_escrow_release(s, now, 3600, &n), 0);
    cr_assert_eq(n, 0);
    /* the store stamped the end with its own clock, maybe a second or more
     * after `now` on a loaded machine: a window after the clock now has passed */
    cr_assert_eq(ar_store_escrow_release(s, (int64_t)time(NULL) + 3600, 3600, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(balance(s, pa), AR_CREDITS(8));
    cr_assert_eq(pending(s, pa), 0);
    /* work paid by another account raised the provider account's reliability */
    ar_account acc;
    cr_assert_eq(ar_store_account_get(s, pa, &acc), 0);
    cr_assert_float_eq(acc.reliability, 1 - (1 - AR_RELIABILITY_NEW) * pow(AR_RELIABILITY_GROWTH, 8), 1e-9);
    cr_assert_eq(ar_store_escrow_release(s, now, -1, &n), AR_EINVAL);
    assert_books(s, NULL);
    ar_store_close(s);
}

Test(market_store, an_audit_failure_gives_the_renter_back_what_escrow_holds_for_the_provider)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t pa = new_account(s, "pa", 0);
    int64_t p0 = new_provider(s, pa, "h:1", AR_CREDITS(1));
    int64_t job = new_job(s, renter, 0);
    const int64_t tf = 1000000000000LL;
    ar_lease_member m = {.provider_id = p0, .stage = 0, .flops_per_step = tf, .price_per_tflop = AR_CREDITS(1),
                         .first_unit = 0, .last_unit = 1, .verified_step = -1};
    char tok[AR_TOKEN_LEN];
    int64_t lease = 0, back = -1;
    cr_assert_eq(ar_store_lease_create(s, job, renter, &m, 1, 10, 0, NULL, tok, &lease, NULL), 0);
    for (int64_t stp = 0; stp < 5; stp++)
        cr_assert_eq(ar_store_usage_record(s, job, stp, p0, 0, tf, AR_CREDITS(1), NULL), 0);
    cr_assert_eq(ar_store_member_verified(s, lease, p0, 1, NULL), 0); /* steps 0-1 are its */
    bool failed = true;
    cr_assert_eq(ar_store_audit_failed(s, job, p0, &failed), 0);
    cr_assert(!failed);
    ar_audit_failure f = {.lease_id = lease, .provider_id = p0, .step = 3, .stage = 0,
                          .evidence = "{\"step\": 3, \"output\": \"sha256 of what it sent\"}"};
    ar_audit_failure stranger = f;
    stranger.provider_id = 999;
    cr_assert_eq(ar_store_audit_failure(s, &stranger, NULL), AR_ENOTFOUND);
    cr_assert_eq(ar_store_audit_failure(s, &f, &back), 0, "%s", ar_last_error());
    cr_assert_eq(back, AR_CREDITS(3));
    cr_assert_eq(balance(s, renter), AR_CREDITS(98));
    cr_assert_eq(balance(s, pa), AR_CREDITS(2));
    cr_assert_eq(pending(s, pa), 0);
    cr_assert_eq(ar_store_audit_failed(s, job, p0, &failed), 0);
    cr_assert(failed);
    ar_account acc;
    cr_assert_eq(ar_store_account_get(s, pa, &acc), 0);
    cr_assert_float_eq(acc.reliability, 0.0, 1e-12);
    /* and it stays at 0: a caught cheat earns no reliability back */
    cr_assert_eq(ar_store_usage_record(s, job, 5, p0, 0, tf, AR_CREDITS(1), NULL), 0);
    cr_assert_eq(end_and_settle(s, job), 1);
    cr_assert_eq(ar_store_account_get(s, pa, &acc), 0);
    cr_assert_float_eq(acc.reliability, 0.0, 1e-12);
    ar_job j;
    cr_assert_eq(ar_store_job_get(s, job, &j), 0);
    cr_assert_eq(j.spent, AR_CREDITS(3));
    ar_store_job_clear(&j);
    assert_books(s, NULL);
    ar_store_close(s);
}

/* Two stages leased, steps 0..5 paid; at step 6 stage 1's provider is lost
 * and the job goes back to its checkpoint of 4 steps. */
static int64_t lease_two_and_pay(ar_store *s, int64_t renter, int64_t p0, int64_t p1, int64_t *job_out)
{
    const int64_t tf = 1000000000000LL;
    int64_t job = new_job(s, renter, 0);
    ar_lease_member m[2] = {
        {.provider_id = p0, .stage = 0, .flops_per_step = tf, .price_per_tflop = AR_CREDITS(1), .first_unit = 0,
         .last_unit = 1, .verified_step = -1},
        {.provider_id = p1, .stage = 1, .flops_per_step = tf, .price_per_tflop = AR_CREDITS(1), .first_unit = 1,
         .last_unit = 2, .verified_step = -1}};
    char tok[AR_TOKEN_LEN];
    int64_t lease = 0;
    cr_assert_eq(ar_store_lease_create(s, job, renter, m, 2, 6, 0, NULL, tok, &lease, NULL), 0, "%s", ar_last_error());
    for (int64_t stp = 0; stp < 6; stp++)
        for (int st = 0; st < 2; st++)
            cr_assert_eq(ar_store_usage_record(s, job, stp, st ? p1 : p0, st, tf, AR_CREDITS(1), NULL), 0);
    *job_out = job;
    return lease;
}

Test(market_store, a_lost_provider_gives_back_only_the_steps_redone_by_another)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t pa = new_account(s, "pa", 0), pb = new_account(s, "pb", 0), pc = new_account(s, "pc", 0);
    int64_t p0 = new_provider(s, pa, "h:1", AR_CREDITS(1));
    int64_t p1 = new_provider(s, pb, "h:2", AR_CREDITS(1));
    int64_t p2 = new_provider(s, pc, "h:3", AR_CREDITS(2));
    int64_t job;
    int64_t lease = lease_two_and_pay(s, renter, p0, p1, &job);
    size_t rows = ledger_rows(s);
    const int64_t tf = 1000000000000LL;

    /* not a member: refused, nothing written */
    ar_lease_member with = {.provider_id = p2, .flops_per_step = tf, .price_per_tflop = AR_CREDITS(2)};
    cr_assert_eq(ar_store_lease_replace(s, lease, p2, 4, &with, NULL, 0, NULL), AR_ENOTFOUND);
    cr_assert_eq(ledger_rows(s), rows);
    ar_lease_replacement done;
    cr_assert_eq(ar_store_lease_replacement(s, lease, p1, &done), AR_ENOTFOUND);

    /* p1 verified up to step 4: its step 4 stays its own, step 5 is contested */
    cr_assert_eq(ar_store_member_verified(s, lease, p1, 4, NULL), 0);
    int contested = -1;
    cr_assert_eq(ar_store_lease_replace(s, lease, p1, 4, &with, NULL, 0, &contested), 0, "%s", ar_last_error());
    cr_assert_eq(contested, 1);
    cr_assert_eq(ledger_rows(s), rows + 2 * 5); /* the 5 verified steps released, nothing reversed */
    cr_assert_eq(pending(s, pa), AR_CREDITS(6));
    cr_assert_eq(balance(s, pb) + pending(s, pb), AR_CREDITS(6));
    cr_assert_eq(balance(s, renter), AR_CREDITS(88));
    ar_provider lost;
    cr_assert_eq(ar_store_provider_get(s, p1, &lost), 0);
    cr_assert(!lost.online);
    cr_assert_float_eq(lost.reliability, AR_RELIABILITY_AFTER_LOSS * (1 - (1 - AR_RELIABILITY_NEW) *
                                                                          pow(AR_RELIABILITY_GROWTH, 5)), 1e-9);
    ar_account acc;
    cr_assert_eq(ar_store_account_get(s, renter, &acc), 0);
    cr_assert_eq(acc.confirmed_claims, 1);
    ar_lease_member *mem = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_lease_members(s, lease, &mem, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_eq(mem[1].provider_id, p2);
    cr_assert_eq(mem[1].stage, 1);
    cr_assert_eq(mem[1].first_unit, 1);
    cr_assert_eq(mem[1].last_unit, 2);
    cr_assert_eq(mem[1].flops_per_step, tf); /* the place's FLOPs, its own price */
    cr_assert_eq(mem[1].price_per_tflop, AR_CREDITS(2));
    cr_assert_eq(mem[1].verified_step, -1);
    ar_free(mem);
    /* the settlement is kept for a driver that asks again */
    cr_assert_eq(ar_store_lease_replacement(s, lease, p1, &done), 0, "%s", ar_last_error());
    cr_assert_eq(done.stage, 1);
    cr_assert_eq(done.kept_steps, 4);
    cr_assert_eq(done.replacement_id, p2);
    cr_assert_eq(done.contested, 1);
    cr_assert_eq(ar_store_lease_replacement(s, lease, p0, &done), AR_ENOTFOUND);
    /* the redo of step 4 by p2 reverses nothing (step 4 was verified); of
     * step 5, p1's payment for it */
    ar_step_settlement x;
    ar_usage_result r;
    cr_assert_eq(ar_store_usage_record(s, job, 4, p2, 1, tf, AR_CREDITS(2), &r), 0);
    cr_assert_eq(r, AR_USAGE_PAID);
    cr_assert_eq(balance(s, renter), AR_CREDITS(86));
    cr_assert_eq(ar_store_usage_record(s, job, 5, p2, 1, tf, AR_CREDITS(2), &r), 0);
    cr_assert_eq(balance(s, renter), AR_CREDITS(85)); /* paid 2, got 1 back */
    cr_assert_eq(balance(s, pb) + pending(s, pb), AR_CREDITS(5));
    cr_assert_eq(pending(s, pc), AR_CREDITS(4));
    (void)x;
    ar_job j;
    cr_assert_eq(ar_store_job_get(s, job, &j), 0);
    cr_assert_eq(j.spent, AR_CREDITS(15));
    ar_store_job_clear(&j);

    /* no replacement: the lease is re-planned over p0 alone, a new plan */
    ar_lease_member alone = {.provider_id = p0, .stage = 0, .flops_per_step = 2 * tf, .price_per_tflop = AR_CREDITS(1),
                             .first_unit = 0, .last_unit = 2};
    ar_lease_member bad = alone;
    bad.stage = 1;
    cr_assert_eq(ar_store_lease_replace(s, lease, p2, 5, NULL, &bad, 1, NULL), AR_EINVAL);
    cr_assert_eq(ar_store_lease_replace(s, lease, p2, 5, NULL, &alone, 1, &contested), 0, "%s", ar_last_error());
    cr_assert_eq(contested, 1); /* p2's step 5 */
    cr_assert_eq(ar_store_lease_members(s, lease, &mem, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(mem[0].provider_id, p0);
    cr_assert_eq(mem[0].last_unit, 2);
    cr_assert_eq(mem[0].flops_per_step, 2 * tf);
    ar_free(mem);
    ar_lease l;
    cr_assert_eq(ar_store_lease_get(s, lease, &l), 0);
    cr_assert_eq(l.plan, 1);
    /* p0 redoes step 5 under the new plan: paid afresh, p2's step 5 reversed */
    cr_assert_eq(ar_store_usage_record(s, job, 5, p0, 0, 2 * tf, AR_CREDITS(1), &r), 0);
    cr_assert_eq(r, AR_USAGE_PAID);
    cr_assert_eq(pending(s, pc), AR_CREDITS(2));
    cr_assert_eq(ar_store_lease_replacement(s, lease, p2, &done), 0, "%s", ar_last_error());
    cr_assert_eq(done.replacement_id, 0);
    cr_assert_eq(done.kept_steps, 5);
    cr_assert_eq(ar_store_lease_replace(s, lease, p0, -1, NULL, NULL, 0, NULL), AR_EINVAL);
    cr_assert_eq(ar_store_lease_release(s, lease), 0);
    cr_assert_eq(ar_store_lease_replace(s, lease, p0, 0, NULL, NULL, 0, NULL), AR_ENOTFOUND);
    assert_books(s, NULL);
    /* what was never redone stays the provider's: released at the end */
    end_and_settle(s, job);
    cr_assert_eq(pending(s, pb), 0);
    cr_assert_eq(balance(s, pb), AR_CREDITS(5));
    assert_books(s, NULL);
    ar_store_close(s);
}

Test(market_store, a_resumed_job_ends_its_old_lease_and_reverses_nothing)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t other = new_account(s, "other", AR_CREDITS(100));
    int64_t pa = new_account(s, "pa", 0);
    int64_t p0 = new_provider(s, pa, "h:1", AR_CREDITS(1));
    int64_t p1 = new_provider(s, pa, "h:2", AR_CREDITS(1));
    int64_t job;
    int64_t lease = lease_two_and_pay(s, renter, p0, p1, &job);
    size_t rows = ledger_rows(s);
    cr_assert_eq(ar_store_job_resume(s, job, other, 4, NULL), AR_ENOTFOUND);
    cr_assert_eq(ar_store_job_resume(s, job, renter, -2, NULL), AR_EINVAL);
    cr_assert_eq(ledger_rows(s), rows);
    bool leased = false;
    cr_assert_eq(ar_store_provider_leased(s, p0, &leased), 0);
    cr_assert(leased);

    ar_job_status before = AR_JOB_QUEUED;
    cr_assert_eq(ar_store_job_update(s, job, AR_JOB_DONE, 6), 0);
    cr_assert_eq(ar_store_job_resume(s, job, renter, 0, &before), 0, "%s", ar_last_error());
    cr_assert_eq(before, AR_JOB_DONE);
    cr_assert_eq(ledger_rows(s), rows); /* nothing reversed */
    cr_assert_eq(pending(s, pa), AR_CREDITS(12));
    cr_assert_eq(ar_store_provider_leased(s, p0, &leased), 0);
    cr_assert(!leased, "the old lease ended");
    ar_lease l;
    cr_assert_eq(ar_store_lease_get(s, lease, &l), 0);
    cr_assert(l.released);
    ar_job j;
    cr_assert_eq(ar_store_job_get(s, job, &j), 0);
    cr_assert_eq(j.spent, AR_CREDITS(12));
    ar_store_job_clear(&j);
    assert_books(s, NULL);
    ar_store_close(s);
}

Test(market_store, overdraft_refused_and_nothing_written)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(3));
    int64_t pa = new_account(s, "pa", 0);
    int64_t p0 = new_provider(s, pa, "h:1", AR_CREDITS(1));
    int64_t job = new_job(s, renter, 0);
    const int64_t tf = 1000000000000LL;
    cr_assert_eq(ar_store_usage_record(s, job, 1, p0, 0, 2 * tf, AR_CREDITS(1), NULL), 0);
    size_t rows = ledger_rows(s);
    cr_assert_eq(ar_store_usage_record(s, job, 2, p0, 0, 2 * tf, AR_CREDITS(1), NULL), AR_ELIMIT);
    cr_assert(strstr(ar_last_error(), "credits") != NULL, "%s", ar_last_error());
    cr_assert_eq(ledger_rows(s), rows);
    cr_assert_eq(balance(s, renter), AR_CREDITS(1));
    cr_assert_eq(pending(s, pa), AR_CREDITS(2));
    ar_job j;
    cr_assert_eq(ar_store_job_get(s, job, &j), 0);
    cr_assert_eq(j.spent, AR_CREDITS(2));
    ar_store_job_clear(&j);
    /* no usage row was left behind: after a top-up the same work is paid, not a dup */
    cr_assert_eq(ar_store_account_mint(s, renter, AR_CREDITS(10)), 0);
    ar_usage_result r;
    cr_assert_eq(ar_store_usage_record(s, job, 2, p0, 0, 2 * tf, AR_CREDITS(1), &r), 0);
    cr_assert_eq(r, AR_USAGE_PAID);

    /* the job's own cap */
    int64_t capped = new_job(s, renter, AR_CREDITS(1));
    cr_assert_eq(ar_store_usage_record(s, capped, 1, p0, 0, 2 * tf, AR_CREDITS(1), NULL),
                 AR_ELIMIT);
    cr_assert_eq(ar_store_job_get(s, capped, &j), 0);
    cr_assert_eq(j.spent, 0);
    ar_store_job_clear(&j);

    assert_books(s, NULL);
    ar_store_close(s);
}

/* ---- leases ------------------------------------------------------------------ */

Test(market_store, lease_refused_up_front_with_the_estimate)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(10));
    int64_t pa = new_account(s, "pa", 0);
    int64_t p0 = new_provider(s, pa, "h:1", AR_CREDITS(2));
    int64_t p1 = new_provider(s, pa, "h:2", AR_CREDITS(2));
    int64_t job = new_job(s, renter, 0);
    const int64_t tf = 1000000000000LL;
    ar_lease_member m[2] = {{.provider_id = p0, .stage = 0, .flops_per_step = tf, .price_per_tflop = AR_CREDITS(2)},
                            {.provider_id = p1, .stage = 1, .flops_per_step = tf / 2, .price_per_tflop = AR_CREDITS(2)}};
    char tok[AR_TOKEN_LEN];
    int64_t lease = 0, est = 0;
    size_t rows = ledger_rows(s);

    /* 3 credits a step: 4 steps are 12, more than the balance of 10 */
    cr_assert_eq(ar_store_lease_create(s, job, renter, m, 2, 4, 0, NULL, tok, &lease, &est), AR_ELIMIT);
    cr_assert_eq(est, AR_CREDITS(12));
    cr_assert(strstr(ar_last_error(), "estimated cost 12.000000 credits") != NULL, "%s",
              ar_last_error());
    cr_assert(strstr(ar_last_error(), "balance") != NULL, "%s", ar_last_error());
    /* within the balance but over the renter's max */
    cr_assert_eq(ar_store_lease_create(s, job, renter, m, 2, 3, AR_CREDITS(8), NULL, tok, &lease, &est),
                 AR_ELIMIT);
    cr_assert(strstr(ar_last_error(), "estimated cost 9.000000 credits") != NULL, "%s",
              ar_last_error());
    cr_assert(strstr(ar_last_error(), "max credits 8.000000") != NULL, "%s", ar_last_error());
    cr_assert_eq(ledger_rows(s), rows);

    /* a lease that fits */
    cr_assert_eq(ar_store_lease_create(s, job, renter, m, 2, 3, 0, NULL, tok, &lease, &est), 0, "%s",
                 ar_last_error());
    cr_assert_eq(est, AR_CREDITS(9));
    ar_lease l;
    cr_assert_eq(ar_store_lease_auth(s, tok, &l), 0, "%s", ar_last_error());
    cr_assert_eq(l.id, lease);
    cr_assert_eq(l.job_id, job);
    cr_assert_eq(l.renter_id, renter);
    cr_assert(!l.released);
    ar_lease_member *got = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_lease_members(s, lease, &got, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_eq(got[1].provider_id, p1);
    cr_assert_eq(got[1].flops_per_step, tf / 2);
    ar_free(got);
    /* the account token is not a lease token and the other way round */
    int64_t who;
    cr_assert_eq(ar_store_account_auth(s, tok, &who), AR_ENOTFOUND);
    cr_assert_eq(ar_store_lease_release(s, lease), 0);
    cr_assert_eq(ar_store_lease_auth(s, tok, &l), AR_ENOTFOUND);
    cr_assert_eq(ar_store_lease_get(s, lease, &l), 0);
    cr_assert(l.released);
    cr_assert_eq(ar_store_lease_release(s, 999), AR_ENOTFOUND);

    /* not the renter's job; a stage twice; an offline provider */
    int64_t other = new_account(s, "other", AR_CREDITS(100));
    cr_assert_eq(ar_store_lease_create(s, job, other, m, 2, 1, 0, NULL, tok, NULL, NULL), AR_EINVAL);
    ar_lease_member twice[2] = {{.provider_id = p0, .stage = 0, .flops_per_step = tf, .price_per_tflop = 1},
                                {.provider_id = p1, .stage = 0, .flops_per_step = tf, .price_per_tflop = 1}};
    cr_assert_eq(ar_store_lease_create(s, job, renter, twice, 2, 1, 0, NULL, tok, NULL, NULL),
                 AR_EINVAL);
    cr_assert_eq(ar_store_provider_mark_offline(s, p1), 0);
    cr_assert_eq(ar_store_lease_create(s, job, renter, m, 2, 1, 0, NULL, tok, NULL, NULL), AR_EINVAL);
    cr_assert(strstr(ar_last_error(), "offline") != NULL, "%s", ar_last_error());
    ar_store_close(s);
}

/* ---- providers and jobs --------------------------------------------------------- */

Test(market_store, providers_register_heartbeat_offline_list)
{
    ar_store *s = open_db();
    int64_t acc = new_account(s, "host", 0);
    int64_t a = new_provider(s, acc, "10.0.0.1:7000", 5);
    int64_t b = new_provider(s, acc, "10.0.0.2:7000", 6);
    cr_assert_neq(a, b);
    /* re-registering keeps the id and updates the profile */
    cr_assert_eq(new_provider(s, acc, "10.0.0.1:7000", 9), a);
    ar_provider p;
    cr_assert_eq(ar_store_provider_get(s, a, &p), 0);
    cr_assert_eq(p.price_per_tflop, 9);
    cr_assert_str_eq(p.address, "10.0.0.1:7000");
    cr_assert_eq(p.cores, 4);
    cr_assert_eq(p.mem_bytes, 1 << 30);
    cr_assert_float_eq(p.gflops, 100, 1e-9);
    /* its account's record, not its claim: a new account's */
    cr_assert_float_eq(p.reliability, AR_RELIABILITY_NEW, 1e-9);
    cr_assert(p.online);

    ar_provider *list = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_provider_list(s, true, &list, &n), 0);
    cr_assert_eq(n, 2);
    ar_free(list);
    cr_assert_eq(ar_store_provider_mark_offline(s, b), 0);
    cr_assert_eq(ar_store_provider_list(s, true, &list, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(list[0].id, a);
    ar_free(list);
    cr_assert_eq(ar_store_provider_list(s, false, &list, &n), 0);
    cr_assert_eq(n, 2);
    ar_free(list);
    cr_assert_eq(ar_store_provider_heartbeat(s, b), 0);
    cr_assert_eq(ar_store_provider_get(s, b, &p), 0);
    cr_assert(p.online);
    cr_assert_eq(ar_store_provider_heartbeat(s, 999), AR_ENOTFOUND);
    cr_assert_eq(ar_store_provider_mark_offline(s, 999), AR_ENOTFOUND);

    /* silent ones expire: every heartbeat is older than "now + 10 s" */
    int count = -1;
    cr_assert_eq(ar_store_provider_expire(s, 3600, &count), 0);
    cr_assert_eq(count, 0);
    cr_assert_eq(ar_store_provider_expire(s, -10, &count), 0);
    cr_assert_eq(count, 2);
    cr_assert_eq(ar_store_provider_list(s, true, &list, &n), 0);
    cr_assert_eq(n, 0);
    ar_free(list);

    /* bad profiles and unknown accounts are refused */
    ar_provider bad = {.account_id = acc, .gflops = -1};
    snprintf(bad.address, sizeof bad.address, "x:1");
    cr_assert_eq(ar_store_provider_register(s, &bad, NULL), AR_EINVAL);
    bad.gflops = 1;
    bad.account_id = 999;
    cr_assert_eq(ar_store_provider_register(s, &bad, NULL), AR_ENOTFOUND);
    ar_store_close(s);
}

Test(market_store, a_provider_unavailable_by_its_owners_rules_is_not_free)
{
    ar_store *s = open_db();
    int64_t acc = new_account(s, "host", 0);
    int64_t a = new_provider(s, acc, "10.0.0.1:7000", 5);
    int64_t b = new_provider(s, acc, "10.0.0.2:7000", 6);
    ar_provider p;
    cr_assert_eq(ar_store_provider_get(s, a, &p), 0);
    cr_assert(!p.unavailable && p.unavailable_why[0] == '\0' && p.availability_changed == 0);

    cr_assert_eq(ar_store_provider_set_availability(s, a, true, "outside hours 22:00-07:00"), 0, "%s",
                 ar_last_error());
    cr_assert_eq(ar_store_provider_get(s, a, &p), 0);
    cr_assert(p.unavailable);
    cr_assert_str_eq(p.unavailable_why, "outside hours 22:00-07:00");
    int64_t since = p.availability_changed;
    cr_assert_gt(since, 0);
    /* still listed online, but not free to lease */
    ar_provider *ps = NULL;
    ar_ranked *ranked = NULL;
    size_t n = 0, busy = 0;
    cr_assert_eq(ar_rules_free_providers(s, 0, &ps, &ranked, &n, &busy), 0, "%s", ar_last_error());
    cr_assert_eq(n, 1);
    cr_assert_eq(ranked[0].p->id, b);
    ar_free(ps);
    ar_free(ranked);
    /* the same word again, with another why: the time of the change stays */
    cr_assert_eq(ar_store_provider_set_availability(s, a, true, "on battery"), 0);
    cr_assert_eq(ar_store_provider_get(s, a, &p), 0);
    cr_assert_str_eq(p.unavailable_why, "on battery");
    cr_assert_eq(p.availability_changed, since);
    /* available again: free, no why */
    cr_assert_eq(ar_store_provider_set_availability(s, a, false, "ignored"), 0);
    cr_assert_eq(ar_store_provider_get(s, a, &p), 0);
    cr_assert(!p.unavailable && p.unavailable_why[0] == '\0');
    cr_assert_eq(ar_rules_free_providers(s, 0, &ps, &ranked, &n, &busy), 0);
    cr_assert_eq(n, 2);
    ar_free(ps);
    ar_free(ranked);

    /* bad words are refused and change nothing */
    char longwhy[AR_WHY_MAX + 1];
    memset(longwhy, 'x', sizeof longwhy - 1);
    longwhy[sizeof longwhy - 1] = '\0';
    cr_assert_eq(ar_store_provider_set_availability(s, a, true, longwhy), AR_EINVAL);
    cr_assert_eq(ar_store_provider_set_availability(s, a, true, "bad\x1b[2J"), AR_EINVAL);
    cr_assert_eq(ar_store_provider_set_availability(s, 999, true, "x"), AR_ENOTFOUND);
    cr_assert_eq(ar_store_provider_get(s, a, &p), 0);
    cr_assert(!p.unavailable);

    /* a Heartbeat's write: online, the availability and the leave it says, in one */
    cr_assert_eq(ar_store_provider_mark_offline(s, a), 0);
    cr_assert_eq(ar_store_provider_beat(s, a, true, "on battery", true), 0, "%s", ar_last_error());
    cr_assert_eq(ar_store_provider_get(s, a, &p), 0);
    cr_assert(p.online && p.unavailable && p.leaving_since > 0);
    cr_assert_str_eq(p.unavailable_why, "on battery");
    cr_assert_eq(ar_store_provider_beat(s, a, true, "on battery", false), 0, "%s", ar_last_error());
    cr_assert_eq(ar_store_provider_get(s, a, &p), 0);
    cr_assert_eq(p.leaving_since, 0);
    /* a bad why: refused, and none of it written */
    cr_assert_eq(ar_store_provider_mark_offline(s, a), 0);
    cr_assert_eq(ar_store_provider_beat(s, a, false, "x", false), 0);
    cr_assert_eq(ar_store_provider_mark_offline(s, a), 0);
    cr_assert_eq(ar_store_provider_beat(s, a, true, "bad\x1b[2J", true), AR_EINVAL);
    cr_assert_eq(ar_store_provider_get(s, a, &p), 0);
    cr_assert(!p.online && !p.unavailable && p.leaving_since == 0);
    cr_assert_eq(ar_store_provider_beat(s, 999, false, NULL, false), AR_ENOTFOUND);
    ar_store_close(s);
}

Test(market_store, jobs_create_update_list)
{
    ar_store *s = open_db();
    int64_t a = new_account(s, "a", 0), b = new_account(s, "b", 0);
    int64_t j1 = new_job(s, a, AR_CREDITS(5));
    int64_t j2 = new_job(s, b, 0);
    int64_t j3 = new_job(s, a, 0);
    ar_job j;
    cr_assert_eq(ar_store_job_get(s, j1, &j), 0);
    cr_assert_eq(j.status, AR_JOB_QUEUED);
    cr_assert_eq(j.renter_id, a);
    cr_assert_str_eq(j.spec, "{\"model\":\"mlp\"}");
    cr_assert_eq(j.max_credits, AR_CREDITS(5));
    cr_assert_eq(j.step, 0);
    ar_store_job_clear(&j);
    cr_assert_eq(ar_store_job_update(s, j1, AR_JOB_RUNNING, 42), 0);
    cr_assert_eq(ar_store_job_get(s, j1, &j), 0);
    cr_assert_eq(j.status, AR_JOB_RUNNING);
    cr_assert_eq(j.step, 42);
    ar_store_job_clear(&j);
    cr_assert_eq(ar_store_job_update(s, 999, AR_JOB_DONE, 1), AR_ENOTFOUND);
    cr_assert_eq(ar_store_job_get(s, 999, &j), AR_ENOTFOUND);
    cr_assert_eq(ar_store_job_create(s, 999, "{}", 0, NULL), AR_ENOTFOUND);

    ar_job *list = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_job_list(s, a, &list, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_eq(list[0].id, j1);
    cr_assert_eq(list[1].id, j3);
    ar_store_jobs_free(list, n);
    cr_assert_eq(ar_store_job_list(s, 0, &list, &n), 0);
    cr_assert_eq(n, 3);
    cr_assert_eq(list[1].id, j2);
    ar_store_jobs_free(list, n);

    ar_job_status st;
    cr_assert_eq(ar_job_status_parse("cancelled", &st), 0);
    cr_assert_eq(st, AR_JOB_CANCELLED);
    cr_assert_str_eq(ar_job_status_name(AR_JOB_FAILED), "failed");
    cr_assert_eq(ar_job_status_parse("bogus", &st), AR_EINVAL);
    ar_store_close(s);
}

Test(market_store, job_progress_keeps_the_loss_per_step)
{
    ar_store *s = open_db();
    int64_t a = new_account(s, "a", 0);
    int64_t j1 = new_job(s, a, 0), j2 = new_job(s, a, 0);
    ar_job_point *pts = NULL;
    size_t n = 9;
    cr_assert_eq(ar_store_job_progress(s, j1, &pts, &n), 0);
    cr_assert_eq(n, 0);
    ar_free(pts);
    /* out of order, one step redone after a resume, another job's apart */
    cr_assert_eq(ar_store_job_progress_record(s, j1, 1, 2.0), 0, "%s", ar_last_error());
    cr_assert_eq(ar_store_job_progress_record(s, j1, 0, 2.5), 0);
    cr_assert_eq(ar_store_job_progress_record(s, j1, 2, 1.75), 0);
    cr_assert_eq(ar_store_job_progress_record(s, j1, 1, 1.9), 0);
    cr_assert_eq(ar_store_job_progress_record(s, j2, 0, 9.0), 0);
    cr_assert_eq(ar_store_job_progress_record(s, 999, 0, 1.0), AR_ENOTFOUND);
    cr_assert_eq(ar_store_job_progress_record(s, j1, -1, 1.0), AR_EINVAL);
    cr_assert_eq(ar_store_job_progress_record(s, j1, 3, 0.0 / 0.0), AR_EINVAL);
    cr_assert_eq(ar_store_job_progress(s, j1, &pts, &n), 0);
    cr_assert_eq(n, 3);
    const double want[] = {2.5, 1.9, 1.75};
    for (size_t i = 0; i < 3; i++) {
        cr_assert_eq(pts[i].step, (int64_t)i);
        cr_assert_float_eq(pts[i].loss, want[i], 1e-12);
    }
    ar_free(pts);
    ar_store_close(s);
}

/* ---- two writers ------------------------------------------------------------------ */

enum { PER_THREAD = 200 };

typedef struct {
    int64_t job, provider;
    int stage;
    int failures;
    char err[256];
} writer_arg;

static void *writer(void *p)
{
    writer_arg *w = p;
    ar_store *s = NULL; /* its own connection */
    if (ar_store_open(dbpath, &s) < 0) {
        w->failures = PER_THREAD;
        snprintf(w->err, sizeof w->err, "%s", ar_last_error());
        return NULL;
    }
    for (int64_t stp = 1; stp <= PER_THREAD; stp++)
        if (ar_store_usage_record(s, w->job, stp, w->provider, w->stage, 1000000, 1000000,
                                  NULL) < 0) {
            w->failures++;
            snprintf(w->err, sizeof w->err, "%s", ar_last_error());
        }
    ar_store_close(s);
    return NULL;
}

Test(market_store, two_connections_two_threads)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(1));
    int64_t pa = new_account(s, "pa", 0), pb = new_account(s, "pb", 0);
    int64_t p0 = new_provider(s, pa, "h:1", 1000000);
    int64_t p1 = new_provider(s, pb, "h:2", 1000000);
    int64_t job = new_job(s, renter, 0);
    ar_store_close(s);

    writer_arg w[2] = {{job, p0, 0, 0, ""}, {job, p1, 1, 0, ""}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, writer, &w[i]), 0);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(w[i].failures, 0, "writer %d: %s", i, w[i].err);

    s = open_db();
    int64_t transfers = 0;
    assert_books(s, &transfers);
    cr_assert_eq(transfers, 1 + 2 * PER_THREAD);
    cr_assert_eq(ledger_rows(s), 2 * (1 + 2 * PER_THREAD));
    /* each transfer is 1e6 FLOPs at 1 credit/TFLOP = 1 micro-credit */
    cr_assert_eq(pending(s, pa), PER_THREAD);
    cr_assert_eq(pending(s, pb), PER_THREAD);
    cr_assert_eq(balance(s, renter), AR_CREDITS(1) - 2 * PER_THREAD);
    ar_store_close(s);
}

/* ---- a writer killed mid-way -------------------------------------------------------- */

static bool read_full(int fd, void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r <= 0)
            return false;
        got += (size_t)r;
    }
    return true;
}

Test(market_store, sigkill_mid_transfers_loses_and_duplicates_nothing)
{
    ar_store *s = open_db();
    int64_t renter = new_account(s, "renter", AR_CREDITS(1000));
    int64_t pa = new_account(s, "pa", 0);
    int64_t p0 = new_provider(s, pa, "h:1", AR_CREDITS(1));
    int64_t job = new_job(s, renter, 0);
    ar_store_close(s); /* no connection crosses the fork */

    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        close(fds[0]);
        ar_store *cs = NULL;
        if (ar_store_open(dbpath, &cs) < 0)
            _exit(2);
        /* report each step once it is committed */
        for (int64_t stp = 1; stp < 1000000; stp++) {
            if (ar_store_usage_record(cs, job, stp, p0, 0, 1000000, 1000000, NULL) < 0)
                _exit(3);
            if (write(fds[1], &stp, sizeof stp) != (ssize_t)sizeof stp)
                _exit(4);
        }
        _exit(0);
    }
    close(fds[1]);
    int64_t last = 0;
    while (last < 60)
        cr_assert(read_full(fds[0], &last, sizeof last), "the writer died early");
    cr_assert_eq(kill(pid, SIGKILL), 0);
    int status = 0;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    int64_t v;
    while (read_full(fds[0], &v, sizeof v))
        last = v;
    close(fds[0]);

    /* the market restarts on the same database */
    s = open_db();
    int64_t transfers = 0;
    assert_books(s, &transfers); /* every transfer exactly two rows, sum zero */
    int64_t paid = transfers - 1; /* less the mint */
    /* every reported commit is there; at most the one in flight also committed */
    cr_assert(paid == last || paid == last + 1, "paid %lld, last reported %lld",
              (long long)paid, (long long)last);
    cr_assert_eq(pending(s, pa), paid);
    ar_job j;
    cr_assert_eq(ar_store_job_get(s, job, &j), 0);
    cr_assert_eq(j.spent, paid);
    ar_store_job_clear(&j);
    /* the driver replays its last report: paid once */
    ar_usage_result r;
    cr_assert_eq(ar_store_usage_record(s, job, paid, p0, 0, 1000000, 1000000, &r), 0);
    cr_assert_eq(r, AR_USAGE_DUP);
    cr_assert_eq(ar_store_usage_record(s, job, paid + 1, p0, 0, 1000000, 1000000, &r), 0);
    cr_assert_eq(r, AR_USAGE_PAID);
    assert_books(s, NULL);
    ar_store_close(s);
}

/* ---- the dashboard's data ------------------------------------------------------- */

Test(market_store, credits_text_is_exact)
{
    char b[48];
    cr_assert_str_eq(ar_credits_text(0, b, sizeof b), "0.000000");
    cr_assert_str_eq(ar_credits_text(-1, b, sizeof b), "-0.000001");
    cr_assert_str_eq(ar_credits_text(AR_CREDITS(12) + 345678, b, sizeof b), "12.345678");
    /* beyond a double's 15-16 digits, still exact */
    cr_assert_str_eq(ar_credits_text(INT64_MAX, b, sizeof b), "9223372036854.775807");
    cr_assert_str_eq(ar_credits_text(INT64_MIN, b, sizeof b), "-9223372036854.775808");
}

Test(market_store, validation_losses_and_training_losses_since_a_step)
{
    ar_store *s = open_db();
    int64_t a = new_account(s, "a", 0);
    int64_t j = new_job(s, a, 0);
    for (int64_t st = 0; st < 5; st++)
        cr_assert_eq(ar_store_job_progress_record(s, j, st, 3.0 - (double)st * 0.5), 0, "%s", ar_last_error());
    ar_job_point *pts = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_job_progress_since(s, j, 2, &pts, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_eq(pts[0].step, 3);
    cr_assert_eq(pts[1].step, 4);
    cr_assert_float_eq(pts[1].loss, 1.0, 1e-12);
    ar_free(pts);
    cr_assert_eq(ar_store_job_progress_since(s, j, -1, &pts, &n), 0);
    cr_assert_eq(n, 5);
    ar_free(pts);

    cr_assert_eq(ar_store_job_val_record(s, j, 4, 2.25), 0, "%s", ar_last_error());
    cr_assert_eq(ar_store_job_val_record(s, j, 2, 2.5), 0);
    cr_assert_eq(ar_store_job_val_record(s, j, 4, 2.0), 0); /* evaluated again after a resume */
    cr_assert_eq(ar_store_job_val_record(s, 999, 1, 1.0), AR_ENOTFOUND);
    cr_assert_eq(ar_store_job_val_record(s, j, -1, 1.0), AR_EINVAL);
    cr_assert_eq(ar_store_job_val_record(s, j, 1, 1.0 / 0.0), AR_EINVAL);
    cr_assert_eq(ar_store_job_val(s, j, &pts, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_eq(pts[0].step, 2);
    cr_assert_float_eq(pts[0].loss, 2.5, 1e-12);
    cr_assert_eq(pts[1].step, 4);
    cr_assert_float_eq(pts[1].loss, 2.0, 1e-12);
    ar_free(pts);
    ar_store_close(s);
}

Test(market_store, job_snapshot_replaces_the_last_and_keeps_the_plan)
{
    ar_store *s = open_db();
    int64_t a = new_account(s, "a", 0);
    int64_t j = new_job(s, a, 0), other = new_job(s, a, 0);
    ar_job_live l;
    cr_assert_eq(ar_store_job_live_get(s, j, &l), AR_ENOTFOUND);

    ar_job_live in = {.step = 10, .total_steps = 100, .items_per_s = 5000, .unit = "samples", .eta_s = 9,
                      .wall_s = 1.5, .plan = "{\"stages\":[]}"};
    ar_stage_time t[2] = {{.step = 10, .stage = 0, .wall_s = 1.5, .busy_s = 1.0, .idle_s = 0.5},
                          {.step = 10, .stage = 1, .wall_s = 1.5, .busy_s = 0.75, .idle_s = 0.75}};
    cr_assert_eq(ar_store_job_live_set(s, j, &in, t, 2), 0, "%s", ar_last_error());
    /* the next snapshot without a plan keeps the plan */
    in.step = 20;
    in.plan = NULL;
    in.eta_s = 8;
    t[0].step = t[1].step = 20;
    t[0].wall_s = t[1].wall_s = 3.0;
    t[0].busy_s = 2.0;
    cr_assert_eq(ar_store_job_live_set(s, j, &in, t, 2), 0, "%s", ar_last_error());
    cr_assert_eq(ar_store_job_live_get(s, j, &l), 0, "%s", ar_last_error());
    cr_assert_eq(l.step, 20);
    cr_assert_eq(l.total_steps, 100);
    cr_assert_float_eq(l.eta_s, 8, 1e-12);
    cr_assert_str_eq(l.unit, "samples");
    cr_assert_not_null(l.plan);
    cr_assert_str_eq(l.plan, "{\"stages\":[]}");
    ar_store_job_live_clear(&l);
    cr_assert_null(l.plan);
    cr_assert_eq(ar_store_job_live_get(s, other, &l), AR_ENOTFOUND);

    /* the timeline keeps every sample, by step then stage; the same step again replaces its sample */
    t[0].busy_s = 2.5;
    cr_assert_eq(ar_store_job_live_set(s, j, &in, t, 1), 0);
    ar_stage_time *got = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_job_stage_times(s, j, &got, &n), 0);
    cr_assert_eq(n, 4);
    cr_assert_eq(got[0].step, 10);
    cr_assert_eq(got[1].stage, 1);
    cr_assert_eq(got[2].step, 20);
    cr_assert_eq(got[2].stage, 0);
    cr_assert_float_eq(got[2].busy_s, 2.5, 1e-12);
    cr_assert_float_eq(got[3].idle_s, 0.75, 1e-12);
    ar_free(got);

    /* what does not make sense is refused and writes nothing */
    ar_job_live bad = in;
    bad.items_per_s = -1;
    cr_assert_eq(ar_store_job_live_set(s, j, &bad, NULL, 0), AR_EINVAL);
    bad = in;
    bad.eta_s = 0.0 / 0.0;
    cr_assert_eq(ar_store_job_live_set(s, j, &bad, NULL, 0), AR_EINVAL);
    ar_stage_time neg = {.step = 30, .stage = 0, .wall_s = 1, .busy_s = -1, .idle_s = 0};
    cr_assert_eq(ar_store_job_live_set(s, j, &in, &neg, 1), AR_EINVAL);
    cr_assert_eq(ar_store_job_live_set(s, 999, &in, NULL, 0), AR_ENOTFOUND);
    cr_assert_eq(ar_store_job_stage_times(s, j, &got, &n), 0);
    cr_assert_eq(n, 4);
    ar_free(got);
    ar_store_close(s);
}

Test(market_store, totals_and_a_providers_earnings)
{
    ar_store *s = open_db();
    ar_market_totals t;
    cr_assert_eq(ar_store_totals(s, &t), 0, "%s", ar_last_error());
    cr_assert_eq(t.providers, 0);
    cr_assert_eq(t.credits_moved, 0);
    int64_t renter = new_account(s, "renter", AR_CREDITS(100));
    int64_t pa = new_account(s, "pa", 0), pb = new_account(s, "pb", 0);
    int64_t p0 = new_provider(s, pa, "10.0.0.1:7000", AR_CREDITS(1));
    int64_t p1 = new_provider(s, pa, "10.0.0.1:7001", AR_CREDITS(2));
    int64_t p2 = new_provider(s, pb, "10.0.0.2:7000", AR_CREDITS(3));
    int64_t job = new_job(s, renter, 0), done = new_job(s, renter, 0);
    const int64_t tf = 1000000000000LL;
    ar_lease_member m[3];
    for (int i = 0; i < 3; i++)
        m[i] = (ar_lease_member){.provider_id = i == 0 ? p0 : i == 1 ? p1 : p2, .stage = i, .flops_per_step = tf,
                                 .price_per_tflop = AR_CREDITS(i + 1), .first_unit = i, .last_unit = i + 1};
    char tok[AR_TOKEN_LEN];
    int64_t lease = 0;
    cr_assert_eq(ar_store_lease_create(s, job, renter, m, 3, 3, 0, NULL, tok, &lease, NULL), 0, "%s", ar_last_error());
    cr_assert_eq(ar_store_provider_mark_offline(s, p2), 0);
    cr_assert_eq(ar_store_job_update(s, job, AR_JOB_RUNNING, 0), 0);
    cr_assert_eq(ar_store_job_update(s, done, AR_JOB_DONE, 0), 0);
    for (int64_t st = 0; st < 3; st++) {
        cr_assert_eq(ar_store_usage_record(s, job, st, p0, 0, tf, AR_CREDITS(1), NULL), 0, "%s", ar_last_error());
        cr_assert_eq(ar_store_usage_record(s, job, st, p1, 1, tf, AR_CREDITS(2), NULL), 0);
        cr_assert_eq(ar_store_usage_record(s, job, st, p2, 2, tf, AR_CREDITS(3), NULL), 0);
    }
    /* an audit caught p2: its payments are reversed, and no longer count as moved */
    ar_audit_failure f = {.lease_id = lease, .provider_id = p2, .step = 2, .stage = 2, .evidence = "digests"};
    cr_assert_eq(ar_store_audit_failure(s, &f, NULL), 0, "%s", ar_last_error());
    cr_assert_eq(ar_store_totals(s, &t), 0);
    cr_assert_eq(t.providers, 3);
    cr_assert_eq(t.providers_online, 2);
    cr_assert_float_eq(t.gflops_online, 200, 1e-9);
    cr_assert_eq(t.jobs, 2);
    cr_assert_eq(t.jobs_running, 1);
    cr_assert_eq(t.credits_moved, AR_CREDITS(9));
    cr_assert_eq(t.steps_paid, 6);

    /* pa's earnings: its two providers only, never pb's */
    ar_earning *e = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_provider_earnings(s, pa, &e, &n), 0, "%s", ar_last_error());
    cr_assert(n >= 2, "%zu rows", n);
    int64_t by[3] = {0}, work = 0;
    for (size_t i = 0; i < n; i++) {
        cr_assert(e[i].provider_id == p0 || e[i].provider_id == p1);
        cr_assert(i == 0 || e[i].provider_id > e[i - 1].provider_id ||
                  (e[i].provider_id == e[i - 1].provider_id && e[i].time > e[i - 1].time));
        by[e[i].provider_id == p0 ? 0 : 1] += e[i].amount;
        work += e[i].steps;
    }
    cr_assert_eq(by[0], AR_CREDITS(3));
    cr_assert_eq(by[1], AR_CREDITS(6));
    cr_assert_eq(work, 6);
    cr_assert_eq(by[0] + by[1], pending(s, pa));
    ar_free(e);
    cr_assert_eq(ar_store_provider_earnings(s, renter, &e, &n), 0);
    cr_assert_eq(n, 0);
    ar_free(e);
    assert_books(s, NULL);
    ar_store_close(s);
}

Test(market_store, schema_3_database_is_migrated_to_the_current_schema_keeping_its_data)
{
    ar_store *s = open_db();
    int64_t a = new_account(s, "a", AR_CREDITS(3));
    int64_t j = new_job(s, a, 0);
    cr_assert_eq(ar_store_job_progress_record(s, j, 0, 1.5), 0);
    ar_store_close(s);
    /* back to what a schema-3 market left (schema 7's changes undone first) */
    raw_sql("DROP TABLE stage_digests; DROP TABLE audit_failures; DROP TABLE stage_samples; DROP TABLE provider_speed;"
            " ALTER TABLE accounts DROP COLUMN reliability; ALTER TABLE accounts DROP COLUMN false_claims;"
            " ALTER TABLE accounts DROP COLUMN confirmed_claims; DELETE FROM accounts WHERE name = 'escrow';"
            " ALTER TABLE jobs DROP COLUMN ended; ALTER TABLE jobs DROP COLUMN last_paid; ALTER TABLE leases DROP COLUMN spec;"
            " ALTER TABLE leases DROP COLUMN mb_rows; ALTER TABLE leases DROP COLUMN micro_batches;"
            " ALTER TABLE leases DROP COLUMN schedule; ALTER TABLE leases DROP COLUMN plan;"
            " ALTER TABLE lease_members DROP COLUMN first_unit; ALTER TABLE lease_members DROP COLUMN last_unit;"
            " ALTER TABLE lease_members DROP COLUMN verified_step; DROP TABLE usage;"
            " CREATE TABLE usage (job_id INTEGER NOT NULL REFERENCES jobs(id), step INTEGER NOT NULL,"
            "  stage INTEGER NOT NULL, provider_id INTEGER NOT NULL REFERENCES providers(id),"
            "  flops INTEGER NOT NULL, amount INTEGER NOT NULL, transfer_id INTEGER REFERENCES transfers(id),"
            "  created INTEGER NOT NULL, PRIMARY KEY (job_id, step, stage));"
            " DROP TABLE provider_reach; DROP TABLE lease_tickets;"
            " DROP TABLE job_val; DROP TABLE job_live; DROP TABLE job_stage_time;"
            " DROP TABLE lease_replacements; UPDATE schema_version SET version = 3",
            SQLITE_OK);
    s = open_db();
    int v = 0;
    cr_assert_eq(ar_store_schema_version(s, &v), 0);
    cr_assert_eq(v, AR_STORE_SCHEMA_VERSION);
    cr_assert_eq(balance(s, a), AR_CREDITS(3));
    ar_job_point *pts = NULL;
    size_t n = 0;
    cr_assert_eq(ar_store_job_progress(s, j, &pts, &n), 0);
    cr_assert_eq(n, 1);
    ar_free(pts);
    cr_assert_eq(ar_store_job_val_record(s, j, 1, 1.25), 0, "%s", ar_last_error());
    ar_job_live l = {.step = 1, .total_steps = 2, .unit = "tokens"};
    cr_assert_eq(ar_store_job_live_set(s, j, &l, NULL, 0), 0, "%s", ar_last_error());
    ar_lease_replacement d; /* schema 5's table is there, and empty */
    cr_assert_eq(ar_store_lease_replacement(s, 1, 1, &d), AR_ENOTFOUND, "%s", ar_last_error());
    /* schema 7: the escrow exists and the account has the market's record */
    ar_account acc;
    cr_assert_eq(ar_store_account_find(s, "escrow", &acc), 0, "%s", ar_last_error());
    cr_assert(acc.system);
    cr_assert_eq(ar_store_account_get(s, a, &acc), 0);
    cr_assert_float_eq(acc.reliability, AR_RELIABILITY_NEW, 1e-12);
    assert_books(s, NULL);
    ar_store_close(s);
}
