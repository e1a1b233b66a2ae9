/* The market store on SQLite: the only file that speaks SQL (store.h says
 * what the store promises; a PostgreSQL backend would be a sibling file).
 *
 * The database is opened in WAL mode (readers never block the one writer,
 * and a killed process leaves a database that the next open recovers), with
 * foreign keys on, synchronous=FULL (a commit is on disk before it returns:
 * this is money) and a busy timeout so that several connections, threads or
 * processes, queue for the write lock instead of failing.
 *
 * Every change that writes more than one row runs in BEGIN IMMEDIATE ...
 * COMMIT (IMMEDIATE takes the write lock first, so the balance we read is the
 * balance we update) and is rolled back on any error. Ledger rows are
 * append-only (triggers refuse UPDATE and DELETE): a payment is undone by a
 * reversal transfer, never by editing history.
 *
 * Paid once, into escrow: usage has one row per payment, never deleted,
 * with its state: 'held' (escrow holds it for the provider), 'contested'
 * (held; its provider was lost, see below), 'released' (paid out to the
 * provider) or 'reversed' (given back to the renter).
 *   - a payment is made once per (lease, plan, step, stage, provider): the
 *     same report again (a retry, a report replayed after a market restart,
 *     the same provider redoing the step after a rollback) is a no-op,
 *     AR_USAGE_DUP, nothing written;
 *   - a lease member lost (ar_store_lease_replace: the rules confirmed the
 *     claim) has its held payments for the steps the job redoes contested;
 *     a contested payment is reversed (escrow -> renter) when its step is
 *     paid to another provider at the stage that took over its work, in the
 *     same transaction as that payment: what is not redone stays paid;
 *   - held and contested payments are released (escrow -> provider) when
 *     the work is verified (an audit) or the job's settling window has
 *     passed (ar_store_escrow_release); nothing released is ever reversed.
 * A job's `spent` is the sum of its payments not reversed.
 *
 * A reported step (ar_store_step_settle) is one transaction: the lease's
 * members, every stage's payment, the job's spent counter and step, the
 * loss; each stage in a savepoint of its own, so that a stage refused for
 * money undoes only itself. Reported steps and heartbeats are committed in
 * groups (group_write): each is a savepoint of its group's transaction and
 * its caller returns once the group is committed. */
#include "market/store.h"

#include "core/digest.h"

#include "arceus.h"
#include "market/money.h"
#include "market/rules.h"
#include "core/core.h"

#include <inttypes.h>
#include <math.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Prepared statements are kept, one per SQL text, and reset for the next
 * use: under load (bench/market_load.py) parsing and planning the same
 * dozen statements again for every call cost more than running them. The
 * store's statements are all string literals, found by their address (and
 * their text checked). A statement already in use (one query run inside
 * another of the same text) is prepared afresh and finalized after. */
#define STMT_CACHE 128

typedef struct {
    const char *sql; /* NULL: a free slot */
    sqlite3_stmt *st;
    int in_use;
} cached_stmt;

typedef struct write_op write_op;

struct ar_store {
    sqlite3 *db;
    pthread_mutex_t mu; /* one call at a time on this connection */
    int64_t mint_id;
    cached_stmt stmts[STMT_CACHE];
    /* group commit (group_write): the writes waiting for the next group,
     * and whether a group is being written */
    pthread_mutex_t group_mu;
    write_op *queue, **queue_tail;
    int writing;
    /* a second connection (query_only) for the reads every call makes
     * first (a token, a provider): they need not wait behind a group's
     * commit and its sync; NULL in the reader itself */
    ar_store *reader;
    int64_t escrow_id; /* holds every payment until it is released or reversed */
};

/* The connection for a hot read: the reader when there is one. */
static ar_store *reads(ar_store *s)
{
    return s->reader ? s->reader : s;
}

/* ---- schema ---------------------------------------------------------------- */

/* Ordered migrations: migrations[i] takes the schema from version i to i+1.
 * Append new ones; never edit one that has shipped. */
static const char *const migrations[] = {
    /* 1: the tables */
    "CREATE TABLE accounts ("
    "  id INTEGER PRIMARY KEY,"
    "  name TEXT NOT NULL UNIQUE,"
    "  token_hash TEXT UNIQUE,"
    "  system INTEGER NOT NULL DEFAULT 0,"
    "  balance INTEGER NOT NULL DEFAULT 0,"
    "  created INTEGER NOT NULL,"
    "  CHECK (system = 1 OR balance >= 0));"
    "INSERT INTO accounts (name, system, created)"
    "  VALUES ('mint', 1, CAST(strftime('%s','now') AS INTEGER));"
    "CREATE TABLE providers ("
    "  id INTEGER PRIMARY KEY,"
    "  account_id INTEGER NOT NULL REFERENCES accounts(id),"
    "  address TEXT NOT NULL,"
    "  gflops REAL NOT NULL,"
    "  mem_bytes INTEGER NOT NULL,"
    "  cores INTEGER NOT NULL,"
    "  price_per_tflop INTEGER NOT NULL CHECK (price_per_tflop >= 0),"
    "  reliability REAL NOT NULL CHECK (reliability >= 0 AND reliability <= 1),"
    "  online INTEGER NOT NULL DEFAULT 1,"
    "  last_heartbeat INTEGER NOT NULL,"
    "  UNIQUE (account_id, address));"
    "CREATE TABLE jobs ("
    "  id INTEGER PRIMARY KEY,"
    "  renter_id INTEGER NOT NULL REFERENCES accounts(id),"
    "  status TEXT NOT NULL,"
    "  spec TEXT NOT NULL,"
    "  created INTEGER NOT NULL,"
    "  step INTEGER NOT NULL DEFAULT 0,"
    "  max_credits INTEGER NOT NULL DEFAULT 0,"
    "  spent INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE leases ("
    "  id INTEGER PRIMARY KEY,"
    "  job_id INTEGER NOT NULL REFERENCES jobs(id),"
    "  token_hash TEXT NOT NULL UNIQUE,"
    "  estimate INTEGER NOT NULL,"
    "  created INTEGER NOT NULL,"
    "  released INTEGER);"
    "CREATE TABLE lease_members ("
    "  lease_id INTEGER NOT NULL REFERENCES leases(id),"
    "  provider_id INTEGER NOT NULL REFERENCES providers(id),"
    "  stage INTEGER NOT NULL,"
    "  flops_per_step INTEGER NOT NULL,"
    "  price_per_tflop INTEGER NOT NULL,"
    "  PRIMARY KEY (lease_id, stage));"
    "CREATE TABLE transfers ("
    "  id INTEGER PRIMARY KEY,"
    "  reason TEXT NOT NULL,"
    "  created INTEGER NOT NULL);"
    "CREATE TABLE ledger ("
    "  id INTEGER PRIMARY KEY,"
    "  transfer_id INTEGER NOT NULL REFERENCES transfers(id),"
    "  account_id INTEGER NOT NULL REFERENCES accounts(id),"
    "  amount INTEGER NOT NULL,"
    "  reason TEXT NOT NULL,"
    "  job_id INTEGER REFERENCES jobs(id),"
    "  step INTEGER,"
    "  created INTEGER NOT NULL);"
    "CREATE TABLE usage ("
    "  job_id INTEGER NOT NULL REFERENCES jobs(id),"
    "  step INTEGER NOT NULL,"
    "  stage INTEGER NOT NULL,"
    "  provider_id INTEGER NOT NULL REFERENCES providers(id),"
    "  flops INTEGER NOT NULL,"
    "  amount INTEGER NOT NULL,"
    "  transfer_id INTEGER REFERENCES transfers(id),"
    "  created INTEGER NOT NULL,"
    "  PRIMARY KEY (job_id, step, stage));",
    /* 2: indexes for the common lookups; the ledger is append-only */
    "CREATE INDEX ledger_account ON ledger (account_id);"
    "CREATE INDEX ledger_transfer ON ledger (transfer_id);"
    "CREATE INDEX providers_online ON providers (online);"
    "CREATE INDEX jobs_renter ON jobs (renter_id);"
    "CREATE INDEX leases_job ON leases (job_id);"
    "CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger"
    "  BEGIN SELECT RAISE(ABORT, 'ledger rows are append-only'); END;"
    "CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger"
    "  BEGIN SELECT RAISE(ABORT, 'ledger rows are append-only'); END;",
    /* 3: each job's training loss per step, as the driver reports it */
    "CREATE TABLE job_progress ("
    "  job_id INTEGER NOT NULL REFERENCES jobs(id),"
    "  step INTEGER NOT NULL,"
    "  loss REAL NOT NULL,"
    "  created INTEGER NOT NULL,"
    "  PRIMARY KEY (job_id, step));",
    /* 4: what the dashboard shows of a running job: validation losses, the
     * driver's latest snapshot (throughput, ETA, the plan as the JSON the
     * market built from the checked report) and each stage's busy and idle
     * time sampled along the run; and the usage of a provider by time */
    "CREATE TABLE job_val ("
    "  job_id INTEGER NOT NULL REFERENCES jobs(id),"
    "  step INTEGER NOT NULL,"
    "  loss REAL NOT NULL,"
    "  created INTEGER NOT NULL,"
    "  PRIMARY KEY (job_id, step));"
    "CREATE TABLE job_live ("
    "  job_id INTEGER PRIMARY KEY REFERENCES jobs(id),"
    "  step INTEGER NOT NULL,"
    "  total_steps INTEGER NOT NULL,"
    "  items_per_s REAL NOT NULL,"
    "  items_unit TEXT NOT NULL,"
    "  eta_s REAL NOT NULL,"
    "  wall_s REAL NOT NULL,"
    "  plan TEXT,"
    "  updated INTEGER NOT NULL);"
    "CREATE TABLE job_stage_time ("
    "  job_id INTEGER NOT NULL REFERENCES jobs(id),"
    "  step INTEGER NOT NULL,"
    "  stage INTEGER NOT NULL,"
    "  wall_s REAL NOT NULL,"
    "  busy_s REAL NOT NULL,"
    "  idle_s REAL NOT NULL,"
    "  PRIMARY KEY (job_id, step, stage));"
    "CREATE INDEX usage_provider ON usage (provider_id, created);",
    /* 5: how each lost lease member was settled, so that a ReplaceProvider
     * asked again (its answer lost with a market that died) gets the same
     * answer instead of a refusal */
    "CREATE TABLE lease_replacements ("
    "  lease_id INTEGER NOT NULL REFERENCES leases(id),"
    "  lost_provider_id INTEGER NOT NULL REFERENCES providers(id),"
    "  stage INTEGER NOT NULL,"
    "  kept_steps INTEGER NOT NULL,"
    "  replacement_id INTEGER NOT NULL," /* 0: none was free */
    "  reversed INTEGER NOT NULL,"
    "  created INTEGER NOT NULL,"
    "  PRIMARY KEY (lease_id, lost_provider_id));",
    /* 6: the market's own checks of a provider's worker, kept apart from
     * what the provider claims (its row): whether a Hello reached it, when,
     * and how many checks in a row failed; and each lease member's ticket
     * (its hash), the one thing the member's worker is given. IF NOT EXISTS:
     * a database that went back to an older version keeps these tables */
    "CREATE TABLE IF NOT EXISTS provider_reach ("
    "  provider_id INTEGER PRIMARY KEY REFERENCES providers(id),"
    "  state INTEGER NOT NULL,"
    "  checked INTEGER NOT NULL,"
    "  failures INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS lease_tickets ("
    "  lease_id INTEGER NOT NULL REFERENCES leases(id),"
    "  provider_id INTEGER NOT NULL REFERENCES providers(id),"
    "  ticket_hash TEXT NOT NULL UNIQUE,"
    "  created INTEGER NOT NULL,"
    "  PRIMARY KEY (lease_id, provider_id));",
    /* 7: what each provider last said of its owner's rules (arceus provide
     * --when, --hours, --on-battery): not to be leased now, why, since when.
     * Apart from its row, like the market's own checks */
    "CREATE TABLE IF NOT EXISTS provider_availability ("
    "  provider_id INTEGER PRIMARY KEY REFERENCES providers(id),"
    "  unavailable INTEGER NOT NULL,"
    "  why TEXT NOT NULL,"
    "  changed INTEGER NOT NULL);",
    /* 8: a graceful leave: the providers that said they are leaving their
     * lease (since when), and each place handed over, so that a HandOver
     * asked again gets the same answer. Apart from the providers' rows and
     * the loss settlements (lease_replacements): a leave is not a loss */
    "CREATE TABLE IF NOT EXISTS provider_leaving ("
    "  provider_id INTEGER PRIMARY KEY REFERENCES providers(id),"
    "  since INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS lease_handovers ("
    "  lease_id INTEGER NOT NULL REFERENCES leases(id),"
    "  leaver_id INTEGER NOT NULL REFERENCES providers(id),"
    "  stage INTEGER NOT NULL,"
    "  step INTEGER NOT NULL,"
    "  replacement_id INTEGER NOT NULL REFERENCES providers(id),"
    "  created INTEGER NOT NULL,"
    "  PRIMARY KEY (lease_id, leaver_id));",
    /* 9: money that means something (docs/DESIGN.md, "The market").
     *   - Reliability and the count of loss claims belong to the account,
     *     not to an address: a provider cannot shed a penalty by registering
     *     its address spelled differently. An account starts at 0.5, below
     *     one with a record (existing accounts keep their providers' worst).
     *   - The escrow account holds every payment until it is released to
     *     its provider (or reversed to its renter); usage rows keep the state
     *     of each payment and are never deleted. A payment is once per
     *     (lease, plan, step, stage, provider): a lease's plan number grows
     *     when the market re-plans it.
     *   - A lease keeps the plan it was priced from: the model spec, the
     *     micro-batch shape, and each member's units and verified step.
     *   - What renters' drivers observed of each provider's speed, and the
     *     last sample of each lease stage it is computed from.
     *   - Audit failures with their evidence. */
    "ALTER TABLE accounts ADD COLUMN reliability REAL NOT NULL DEFAULT 0.5"
    "  CHECK (reliability >= 0 AND reliability <= 1);"
    "ALTER TABLE accounts ADD COLUMN false_claims INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE accounts ADD COLUMN confirmed_claims INTEGER NOT NULL DEFAULT 0;"
    "UPDATE accounts SET reliability ="
    "  (SELECT MIN(p.reliability) FROM providers p WHERE p.account_id = accounts.id)"
    "  WHERE EXISTS (SELECT 1 FROM providers p WHERE p.account_id = accounts.id);"
    "INSERT INTO accounts (name, system, created)"
    "  VALUES ('escrow', 1, CAST(strftime('%s','now') AS INTEGER));"
    "ALTER TABLE jobs ADD COLUMN ended INTEGER;"
    "ALTER TABLE jobs ADD COLUMN last_paid INTEGER;"
    "UPDATE jobs SET ended = created WHERE status IN ('done', 'failed', 'cancelled');"
    "ALTER TABLE leases ADD COLUMN spec TEXT;"
    "ALTER TABLE leases ADD COLUMN mb_rows INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE leases ADD COLUMN micro_batches INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE leases ADD COLUMN schedule INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE leases ADD COLUMN plan INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE lease_members ADD COLUMN first_unit INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE lease_members ADD COLUMN last_unit INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE lease_members ADD COLUMN verified_step INTEGER NOT NULL DEFAULT -1;"
    "CREATE TABLE usage_v7 ("
    "  id INTEGER PRIMARY KEY,"
    "  job_id INTEGER NOT NULL REFERENCES jobs(id),"
    "  lease_id INTEGER REFERENCES leases(id),"
    "  plan INTEGER NOT NULL DEFAULT 0,"
    "  step INTEGER NOT NULL,"
    "  stage INTEGER NOT NULL,"
    "  provider_id INTEGER NOT NULL REFERENCES providers(id),"
    "  flops INTEGER NOT NULL,"
    "  amount INTEGER NOT NULL,"
    "  transfer_id INTEGER REFERENCES transfers(id),"
    "  state TEXT NOT NULL CHECK (state IN ('held', 'contested', 'released', 'reversed')),"
    "  taken_stage INTEGER," /* contested: the stage whose redo reverses it (-1: any) */
    "  settled INTEGER,"     /* when it was released or reversed */
    "  created INTEGER NOT NULL);"
    /* what schema 6 paid went straight to its provider: released */
    "INSERT INTO usage_v7 (job_id, lease_id, plan, step, stage, provider_id, flops, amount, transfer_id,"
    "  state, settled, created)"
    "  SELECT u.job_id, (SELECT MAX(l.id) FROM leases l WHERE l.job_id = u.job_id), 0, u.step, u.stage,"
    "  u.provider_id, u.flops, u.amount, u.transfer_id, 'released', u.created, u.created FROM usage u;"
    "DROP TABLE usage;"
    "ALTER TABLE usage_v7 RENAME TO usage;"
    "CREATE INDEX usage_provider ON usage (provider_id, created);"
    "CREATE INDEX usage_job ON usage (job_id, step);"
    "CREATE INDEX usage_held ON usage (job_id) WHERE state IN ('held', 'contested');"
    "CREATE UNIQUE INDEX usage_once ON usage (lease_id, plan, step, stage, provider_id)"
    "  WHERE state != 'reversed';"
    "CREATE TABLE provider_speed ("
    "  provider_id INTEGER PRIMARY KEY REFERENCES providers(id),"
    "  flops REAL NOT NULL,"       /* FLOPs observed */
    "  busy_s REAL NOT NULL,"      /* in this many busy seconds */
    "  claim_flops REAL NOT NULL);" /* what its claim promised in them */
    "CREATE TABLE stage_samples ("
    "  lease_id INTEGER NOT NULL REFERENCES leases(id),"
    "  stage INTEGER NOT NULL,"
    "  provider_id INTEGER NOT NULL REFERENCES providers(id),"
    "  step INTEGER NOT NULL,"
    "  busy_s REAL NOT NULL,"
    "  wall_s REAL NOT NULL,"
    "  PRIMARY KEY (lease_id, stage));"
    "CREATE TABLE audit_failures ("
    "  id INTEGER PRIMARY KEY,"
    "  job_id INTEGER NOT NULL REFERENCES jobs(id),"
    "  lease_id INTEGER NOT NULL REFERENCES leases(id),"
    "  provider_id INTEGER NOT NULL REFERENCES providers(id),"
    "  step INTEGER NOT NULL,"
    "  stage INTEGER NOT NULL,"
    "  evidence TEXT NOT NULL,"
    "  returned INTEGER NOT NULL," /* micro-credits given back to the renter */
    "  created INTEGER NOT NULL);",
    /* 9 -> 10: what each stage committed for each step it was paid for (audits
     * by replay compare a replay with them); 320 hex digits a row */
    "CREATE TABLE stage_digests ("
    "  job_id INTEGER NOT NULL REFERENCES jobs(id),"
    "  step INTEGER NOT NULL,"
    "  stage INTEGER NOT NULL,"
    "  provider_id INTEGER NOT NULL REFERENCES providers(id),"
    "  digests TEXT NOT NULL,"
    "  PRIMARY KEY (job_id, step, stage, provider_id));",
};
_Static_assert(sizeof migrations / sizeof migrations[0] == AR_STORE_SCHEMA_VERSION,
               "one migration per schema version");

/* ---- small helpers ----------------------------------------------------------- */

static int db_fail(ar_store *s, const char *what)
{
    return ar_fail(AR_EIO, "db: %s: %s", what, sqlite3_errmsg(s->db));
}

static int64_t now_s(void)
{
    return (int64_t)time(NULL);
}

static void lock(ar_store *s)
{
    pthread_mutex_lock(&s->mu);
}

static void unlock(ar_store *s)
{
    pthread_mutex_unlock(&s->mu);
}

/* ---- statements, kept for reuse -------------------------------------------- */

static cached_stmt *stmt_slot(ar_store *s, const char *sql)
{
    size_t h = ((uintptr_t)sql >> 3) % STMT_CACHE;
    for (size_t i = 0; i < STMT_CACHE; i++) {
        cached_stmt *c = &s->stmts[(h + i) % STMT_CACHE];
        if (!c->sql || c->sql == sql)
            return c;
    }
    return NULL; /* full: not kept */
}

/* A statement for sql, ready to bind: a kept one reset, or a new one. */
static int stmt_get(ar_store *s, const char *sql, sqlite3_stmt **st)
{
    cached_stmt *c = stmt_slot(s, sql);
    if (c && c->sql && !c->in_use && strcmp(sqlite3_sql(c->st), sql) == 0) {
        c->in_use = 1;
        *st = c->st;
        return SQLITE_OK;
    }
    if (c && !c->sql) {
        int rc = sqlite3_prepare_v3(s->db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
        if (rc == SQLITE_OK && *st) {
            *c = (cached_stmt){.sql = sql, .st = *st, .in_use = 1};
        }
        return rc;
    }
    return sqlite3_prepare_v2(s->db, sql, -1, st, NULL);
}

/* Done with a statement: a kept one is reset (which also ends the read it
 * may hold open) and its bindings cleared; any other is finalized. */
static void done(ar_store *s, sqlite3_stmt *st)
{
    if (!st)
        return;
    for (size_t i = 0; i < STMT_CACHE; i++)
        if (s->stmts[i].st == st) {
            sqlite3_reset(st);
            sqlite3_clear_bindings(st);
            s->stmts[i].in_use = 0;
            return;
        }
    sqlite3_finalize(st);
}

static void stmts_free(ar_store *s)
{
    for (size_t i = 0; i < STMT_CACHE; i++)
        if (s->stmts[i].st)
            sqlite3_finalize(s->stmts[i].st);
    memset(s->stmts, 0, sizeof s->stmts);
}

/* One statement that returns no rows (BEGIN, COMMIT, a savepoint). */
static int exec_sql(ar_store *s, const char *sql, const char *what)
{
    sqlite3_stmt *st;
    if (stmt_get(s, sql, &st) != SQLITE_OK)
        return db_fail(s, what);
    int rc = sqlite3_step(st);
    done(s, st);
    if (rc != SQLITE_DONE && rc != SQLITE_ROW)
        return db_fail(s, what);
    return AR_OK;
}

static int tx_begin(ar_store *s)
{
    return exec_sql(s, "BEGIN IMMEDIATE", "begin");
}

/* Safe to call whatever state the connection is in; keeps ar_last_error. */
static void tx_rollback(ar_store *s)
{
    if (!sqlite3_get_autocommit(s->db))
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
}

static int tx_commit(ar_store *s)
{
    int rc = exec_sql(s, "COMMIT", "commit");
    if (rc < 0)
        tx_rollback(s);
    return rc;
}

/* ---- group commit ---------------------------------------------------------- *
 *
 * The writes that come with every Heartbeat and every reported step
 * (ar_store_provider_beat, ar_store_step_settle) are committed in
 * groups: a write joins a queue; when no group is being written, its caller
 * becomes the writer, takes every write queued so far (its own included),
 * runs each in a savepoint of one transaction and commits once; every
 * caller of the group returns only after that commit (synchronous=FULL: on
 * disk), so nothing that was answered can be lost. Writes that come while a
 * group is being committed queue for the next one, whose first caller then
 * writes it. A write that fails is rolled back to its savepoint alone, and
 * its caller gets its error; a failed commit fails the whole group. With a
 * commit per call the market spent most of its time on the log's writes and
 * locks (under bench/market_load.py: about 2 pwrite and 1.5 fcntl calls for
 * each call served); a group of n shares one. */

/* At most this many writes in one group, so that reads waiting for the
 * connection are not held up long behind a very large one. */
#define GROUP_MAX 128

struct write_op {
    int (*fn)(ar_store *s, void *arg); /* in the group's transaction, lock held; < 0: undone */
    void *arg;
    int rc;        /* the caller's result */
    char err[512]; /* its message when rc < 0 (the writer's thread ran it) */
    int done;      /* written (or failed) */
    int lead;      /* this caller writes the next group */
    pthread_cond_t cv;
    write_op *next;
};

static void op_failed(write_op *o, int rc, const char *why)
{
    o->rc = rc;
    snprintf(o->err, sizeof o->err, "%s", why);
}

/* Run a group in one transaction; the store's lock is taken here. */
static void group_run(ar_store *s, write_op *group)
{
    lock(s);
    int rc = exec_sql(s, "BEGIN IMMEDIATE", "begin");
    for (write_op *o = group; o && rc == 0; o = o->next) {
        if ((rc = exec_sql(s, "SAVEPOINT op", "savepoint")) < 0)
            break;
        int orc = o->fn(s, o->arg);
        if (sqlite3_get_autocommit(s->db)) {
            /* SQLite ended the transaction itself (an I/O error, a full
             * disk): every write of the group so far is gone with it */
            if (orc < 0)
                op_failed(o, orc, ar_last_error());
            rc = ar_fail(AR_EIO, "db: a write ended its group's transaction: %s",
                         orc < 0 ? o->err : "no error reported");
            break;
        }
        if (orc < 0) {
            op_failed(o, orc, ar_last_error());
            rc = exec_sql(s, "ROLLBACK TO op", "roll back a write");
        } else {
            o->rc = orc;
        }
        if (rc == 0)
            rc = exec_sql(s, "RELEASE op", "release a write");
    }
    if (rc == 0)
        rc = tx_commit(s); /* rolls back when it fails */
    else
        tx_rollback(s);
    if (rc < 0) {
        char why[512];
        snprintf(why, sizeof why, "%s", ar_last_error());
        for (write_op *o = group; o; o = o->next)
            if (o->rc >= 0)
                op_failed(o, rc, why);
    }
    unlock(s);
}

/* Run fn(s, arg) in the next group commit and return its result once the
 * group is committed (the policy above). fn must not call the store. */
static int group_write(ar_store *s, int (*fn)(ar_store *, void *), void *arg)
{
    write_op op = {.fn = fn, .arg = arg};
    pthread_cond_init(&op.cv, NULL);
    pthread_mutex_lock(&s->group_mu);
    *s->queue_tail = &op;
    s->queue_tail = &op.next;
    if (!s->writing) {
        s->writing = 1;
        op.lead = 1;
    }
    while (!op.done && !op.lead)
        pthread_cond_wait(&op.cv, &s->group_mu);
    if (!op.done) {
        /* this caller writes: the queue's first GROUP_MAX writes (its own is first) */
        write_op *group = s->queue, *last = group;
        for (int n = 1; n < GROUP_MAX && last->next; n++)
            last = last->next;
        s->queue = last->next;
        if (!s->queue)
            s->queue_tail = &s->queue;
        last->next = NULL;
        pthread_mutex_unlock(&s->group_mu);
        group_run(s, group);
        pthread_mutex_lock(&s->group_mu);
        for (write_op *o = group, *next; o; o = next) {
            next = o->next; /* o belongs to a waiting caller, who may leave once done */
            o->done = 1;
            if (o != &op)
                pthread_cond_signal(&o->cv);
        }
        if (s->queue) { /* the next group's first caller writes it */
            s->queue->lead = 1;
            pthread_cond_signal(&s->queue->cv);
        } else {
            s->writing = 0;
        }
    }
    pthread_mutex_unlock(&s->group_mu);
    pthread_cond_destroy(&op.cv);
    return op.rc < 0 ? ar_fail(op.rc, "%s", op.err) : op.rc;
}

/* Ends a write transaction: commit on success, roll back on failure. */
static int tx_end(ar_store *s, int rc)
{
    if (rc < 0) {
        tx_rollback(s);
        return rc;
    }
    return tx_commit(s);
}

/* Prepare `sql` and bind its parameters by a type string: 'i' int64, 'd'
 * double, 't' text (a NULL pointer binds NULL), 'n' NULL (no argument). */
static int vprep(ar_store *s, sqlite3_stmt **st, const char *sql, const char *types, va_list ap)
{
    *st = NULL;
    if (stmt_get(s, sql, st) != SQLITE_OK)
        return ar_fail(AR_EIO, "db: prepare \"%.60s\": %s", sql, sqlite3_errmsg(s->db));
    for (int i = 0; types && types[i]; i++) {
        int rc;
        switch (types[i]) {
        case 'i': rc = sqlite3_bind_int64(*st, i + 1, va_arg(ap, int64_t)); break;
        case 'd': rc = sqlite3_bind_double(*st, i + 1, va_arg(ap, double)); break;
        case 't': {
            const char *t = va_arg(ap, const char *);
            rc = t ? sqlite3_bind_text(*st, i + 1, t, -1, SQLITE_TRANSIENT)
                   : sqlite3_bind_null(*st, i + 1);
            break;
        }
        case 'n': rc = sqlite3_bind_null(*st, i + 1); break;
        default: rc = SQLITE_MISUSE; break;
        }
        if (rc != SQLITE_OK) {
            int err = ar_fail(AR_EIO, "db: bind %d of \"%.60s\": %s", i + 1, sql,
                              sqlite3_errmsg(s->db));
            done(s, *st);
            *st = NULL;
            return err;
        }
    }
    return AR_OK;
}

static int prep(ar_store *s, sqlite3_stmt **st, const char *sql, const char *types, ...)
{
    va_list ap;
    va_start(ap, types);
    int rc = vprep(s, st, sql, types, ap);
    va_end(ap);
    return rc;
}

/* One step: 1 a row, 0 done, < 0 an error. */
static int step(ar_store *s, sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        return 1;
    if (rc == SQLITE_DONE)
        return 0;
    return ar_fail(AR_EIO, "db: step \"%.60s\": %s", sqlite3_sql(st), sqlite3_errmsg(s->db));
}

/* Run a statement that returns no rows we need; *changes_out may be NULL. */
static int run(ar_store *s, int *changes_out, const char *sql, const char *types, ...)
{
    sqlite3_stmt *st;
    va_list ap;
    va_start(ap, types);
    int rc = vprep(s, &st, sql, types, ap);
    va_end(ap);
    if (rc < 0)
        return rc;
    while ((rc = step(s, st)) > 0) {
    }
    if (rc == 0 && changes_out)
        *changes_out = sqlite3_changes(s->db);
    done(s, st);
    return rc;
}

/* The first column of the first row as int64; AR_ENOTFOUND when no row. */
static int query_i64(ar_store *s, int64_t *out, const char *sql, const char *types, ...)
{
    sqlite3_stmt *st;
    va_list ap;
    va_start(ap, types);
    int rc = vprep(s, &st, sql, types, ap);
    va_end(ap);
    if (rc < 0)
        return rc;
    rc = step(s, st);
    if (rc > 0) {
        *out = sqlite3_column_int64(st, 0);
        rc = AR_OK;
    } else if (rc == 0) {
        rc = AR_ENOTFOUND; /* the caller words the message */
    }
    done(s, st);
    return rc;
}

static void copy_text(char *dst, size_t cap, sqlite3_stmt *st, int col)
{
    const unsigned char *t = sqlite3_column_text(st, col);
    snprintf(dst, cap, "%s", t ? (const char *)t : "");
}

/* Grow a heap array to hold one more element. */
static int grow(void **arr, size_t *cap, size_t n, size_t elem)
{
    if (n < *cap)
        return AR_OK;
    size_t ncap = *cap ? *cap * 2 : 16;
    if (ncap > SIZE_MAX / elem)
        return ar_fail(AR_ENOMEM, "db: result too large");
    void *p = realloc(*arr, ncap * elem);
    if (!p)
        return ar_fail(AR_ENOMEM, "db: out of memory for %zu rows", ncap);
    *arr = p;
    *cap = ncap;
    return AR_OK;
}

/* Reads one row of a list query into an item; AR_OK or an error. */
typedef int (*row_reader)(sqlite3_stmt *st, void *item);

/* Every row of a query as a malloc'd array of elem-byte items (*out, *n;
 * NULL and 0 when there are none), each filled by read. On an error nothing
 * is returned: the items read so far are freed with free_items (NULL: plain
 * free, for items that own nothing). Takes the store's lock. */
static int list_rows(ar_store *s, size_t elem, row_reader read, void (*free_items)(void *, size_t), void **out,
                     size_t *n, const char *sql, const char *types, ...)
{
    *out = NULL;
    *n = 0;
    void *arr = NULL;
    size_t cap = 0, cnt = 0;
    sqlite3_stmt *st;
    va_list ap;
    va_start(ap, types);
    lock(s);
    int rc = vprep(s, &st, sql, types, ap);
    va_end(ap);
    if (rc == 0) {
        while ((rc = step(s, st)) > 0) {
            if ((rc = grow(&arr, &cap, cnt, elem)) < 0)
                break;
            rc = read(st, (char *)arr + cnt * elem);
            cnt++; /* counted even on failure: free_items sees what it may own */
            if (rc < 0)
                break;
        }
        done(s, st);
    }
    unlock(s);
    if (rc < 0) {
        if (free_items)
            free_items(arr, cnt);
        else
            free(arr);
        return rc;
    }
    *out = arr;
    *n = cnt;
    return AR_OK;
}

/* The first row of a query, read into item; AR_ENOTFOUND (no message: the
 * caller words it) when there is none. The caller holds the store's lock, so
 * that it may read inside a transaction. */
static int one_row(ar_store *s, row_reader read, void *item, const char *sql, const char *types, ...)
{
    sqlite3_stmt *st;
    va_list ap;
    va_start(ap, types);
    int rc = vprep(s, &st, sql, types, ap);
    va_end(ap);
    if (rc < 0)
        return rc;
    rc = step(s, st);
    if (rc > 0)
        rc = read(st, item);
    else if (rc == 0)
        rc = AR_ENOTFOUND;
    done(s, st);
    return rc;
}

/* ---- tokens ----------------------------------------------------------------- */

static void to_hex(const unsigned char *b, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = '\0';
}

static int token_hash(const char *token, char out[AR_TOKEN_LEN])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (!EVP_Digest(token, strlen(token), md, &len, EVP_sha256(), NULL) || len != 32)
        return ar_fail(AR_EINTERNAL, "sha256 failed");
    to_hex(md, 32, out);
    return AR_OK;
}

static int token_new(char token[AR_TOKEN_LEN], char hash[AR_TOKEN_LEN])
{
    unsigned char b[32];
    if (RAND_bytes(b, sizeof b) != 1)
        return ar_fail(AR_EINTERNAL, "no random bytes for a token");
    to_hex(b, sizeof b, token);
    OPENSSL_cleanse(b, sizeof b);
    return token_hash(token, hash);
}

/* The row whose token_hash equals the hash of `token`. The lookup goes through
 * the index on the hash: its timing depends on the SHA-256 of the guess, which
 * tells an attacker nothing about the real token; the final equality is still
 * checked in constant time. */
static int token_lookup(ar_store *s, const char *sql, const char *token, int64_t *id_out)
{
    char hash[AR_TOKEN_LEN];
    if (!token || strlen(token) != AR_TOKEN_LEN - 1)
        return ar_fail(AR_ENOTFOUND, "unknown token");
    int rc = token_hash(token, hash);
    if (rc < 0)
        return rc;
    sqlite3_stmt *st;
    if ((rc = prep(s, &st, sql, "t", hash)) < 0)
        return rc;
    rc = step(s, st);
    if (rc > 0) {
        const unsigned char *stored = sqlite3_column_text(st, 1);
        if (stored && sqlite3_column_bytes(st, 1) == AR_TOKEN_LEN - 1 &&
            CRYPTO_memcmp(stored, hash, AR_TOKEN_LEN - 1) == 0) {
            *id_out = sqlite3_column_int64(st, 0);
            rc = AR_OK;
        } else {
            rc = ar_fail(AR_ENOTFOUND, "unknown token");
        }
    } else if (rc == 0) {
        rc = ar_fail(AR_ENOTFOUND, "unknown token");
    }
    done(s, st);
    return rc;
}

/* ---- money ------------------------------------------------------------------------ */

static double credits(int64_t micro)
{
    return (double)micro / (double)AR_MICRO_PER_CREDIT;
}

static int balance_of(ar_store *s, int64_t account_id, int64_t *bal, bool *system)
{
    sqlite3_stmt *st;
    int rc = prep(s, &st, "SELECT balance, system FROM accounts WHERE id = ?", "i", account_id);
    if (rc < 0)
        return rc;
    rc = step(s, st);
    if (rc > 0) {
        *bal = sqlite3_column_int64(st, 0);
        if (system)
            *system = sqlite3_column_int(st, 1) != 0;
        rc = AR_OK;
    } else if (rc == 0) {
        rc = ar_fail(AR_ENOTFOUND, "no account %" PRId64, account_id);
    }
    done(s, st);
    return rc;
}

/* One transfer of `amount` (> 0) from one account to another: a transfers row,
 * two ledger rows, two balance updates. Must run inside a write transaction.
 * job_id <= 0 and step < 0 are stored as NULL. */
static int transfer(ar_store *s, int64_t from, int64_t to, int64_t amount, const char *reason,
                    int64_t job_id, int64_t stepno, int64_t *transfer_id_out)
{
    if (amount <= 0)
        return ar_fail(AR_EINTERNAL, "transfer of %" PRId64, amount);
    int64_t bal;
    int rc = balance_of(s, from, &bal, NULL);
    if (rc < 0)
        return rc;
    /* only the mint goes below zero: the escrow pays out what it holds */
    bool mint = from == s->mint_id;
    if (mint && bal < INT64_MIN + amount)
        return ar_fail(AR_ELIMIT, "the mint's balance would overflow");
    if (!mint && bal < amount)
        return ar_fail(AR_ELIMIT,
                       "account %" PRId64 " has %.6f credits, %.6f needed (%s)", from,
                       credits(bal), credits(amount), reason);
    int64_t to_bal;
    bool to_sys;
    if ((rc = balance_of(s, to, &to_bal, &to_sys)) < 0)
        return rc;
    if (to_bal > INT64_MAX - amount)
        return ar_fail(AR_ELIMIT, "balance of account %" PRId64 " would overflow", to);

    int64_t t = now_s();
    if ((rc = run(s, NULL, "INSERT INTO transfers (reason, created) VALUES (?, ?)", "ti", reason,
                  t)) < 0)
        return rc;
    int64_t tid = sqlite3_last_insert_rowid(s->db);
    const char *ins = "INSERT INTO ledger (transfer_id, account_id, amount, reason, job_id, step,"
                      " created) VALUES (?, ?, ?, ?, ?, ?, ?)";
    int64_t legs[2][2] = {{from, -amount}, {to, amount}};
    for (int i = 0; i < 2; i++) {
        sqlite3_stmt *st;
        if ((rc = prep(s, &st, ins, "iiit", tid, legs[i][0], legs[i][1], reason)) < 0)
            return rc;
        int brc = job_id > 0 ? sqlite3_bind_int64(st, 5, job_id) : sqlite3_bind_null(st, 5);
        if (brc == SQLITE_OK)
            brc = stepno >= 0 ? sqlite3_bind_int64(st, 6, stepno) : sqlite3_bind_null(st, 6);
        if (brc == SQLITE_OK)
            brc = sqlite3_bind_int64(st, 7, t);
        rc = brc == SQLITE_OK ? step(s, st) : db_fail(s, "bind ledger row");
        done(s, st);
        if (rc < 0)
            return rc;
        int changes = 0;
        if ((rc = run(s, &changes, "UPDATE accounts SET balance = balance + ? WHERE id = ?", "ii",
                      legs[i][1], legs[i][0])) < 0)
            return rc;
        if (changes != 1)
            return ar_fail(AR_EINTERNAL, "balance of account %" PRId64 " not updated",
                           legs[i][0]);
    }
    if (transfer_id_out)
        *transfer_id_out = tid;
    return AR_OK;
}

/* ---- open / close / migrate ----------------------------------------------------- */

static int migrate(ar_store *s)
{
    int rc = tx_begin(s);
    if (rc < 0)
        return rc;
    rc = exec_sql(s, "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
                  "create schema_version");
    int64_t v = 0;
    if (rc == 0) {
        rc = query_i64(s, &v, "SELECT version FROM schema_version", NULL);
        if (rc == AR_ENOTFOUND) {
            v = 0;
            rc = run(s, NULL, "INSERT INTO schema_version (version) VALUES (0)", NULL);
        }
    }
    if (rc == 0 && (v < 0 || v > AR_STORE_SCHEMA_VERSION))
        rc = ar_fail(AR_EFORMAT,
                     "db: schema version %" PRId64 " is not one this build knows (1..%d)", v,
                     AR_STORE_SCHEMA_VERSION);
    for (int64_t i = v; rc == 0 && i < AR_STORE_SCHEMA_VERSION; i++) {
        char what[64];
        snprintf(what, sizeof what, "migration %" PRId64, i + 1);
        if (sqlite3_exec(s->db, migrations[i], NULL, NULL, NULL) != SQLITE_OK) /* many statements */
            rc = db_fail(s, what);
        if (rc == 0)
            rc = run(s, NULL, "UPDATE schema_version SET version = ?", "i", i + 1);
    }
    return tx_end(s, rc);
}

/* One connection, migrated. */
static int open_conn(const char *path, ar_store **out)
{
    *out = NULL;
    if (!path || !*path)
        return ar_fail(AR_EINVAL, "db: no path");
    ar_store *s = calloc(1, sizeof *s);
    if (!s)
        return ar_fail(AR_ENOMEM, "db: out of memory");
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
        free(s);
        return ar_fail(AR_EINTERNAL, "db: mutex init failed");
    }
    if (pthread_mutex_init(&s->group_mu, NULL) != 0) {
        pthread_mutex_destroy(&s->mu);
        free(s);
        return ar_fail(AR_EINTERNAL, "db: mutex init failed");
    }
    s->queue_tail = &s->queue;
    int rc;
    if (sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) !=
        SQLITE_OK) {
        rc = s->db ? ar_fail(AR_EIO, "db: open %s: %s", path, sqlite3_errmsg(s->db))
                   : ar_fail(AR_ENOMEM, "db: open %s: out of memory", path);
        goto fail;
    }
    sqlite3_extended_result_codes(s->db, 1);
    if (sqlite3_busy_timeout(s->db, 10000) != SQLITE_OK) {
        rc = db_fail(s, "busy timeout");
        goto fail;
    }
    /* WAL: the mode is persistent in the file; asking again is cheap */
    sqlite3_stmt *st;
    if ((rc = prep(s, &st, "PRAGMA journal_mode = WAL", NULL)) < 0)
        goto fail;
    rc = step(s, st);
    if (rc > 0) {
        const unsigned char *mode = sqlite3_column_text(st, 0);
        rc = mode && strcmp((const char *)mode, "wal") == 0
                 ? AR_OK
                 : ar_fail(AR_EIO, "db: %s: journal mode is %s, not wal", path,
                           mode ? (const char *)mode : "?");
    } else if (rc == 0) {
        rc = ar_fail(AR_EIO, "db: %s: journal_mode gave no answer", path);
    }
    done(s, st);
    if (rc < 0)
        goto fail;
    if ((rc = exec_sql(s, "PRAGMA foreign_keys = ON", "foreign keys")) < 0 ||
        (rc = exec_sql(s, "PRAGMA synchronous = FULL", "synchronous")) < 0)
        goto fail;
    if ((rc = migrate(s)) < 0)
        goto fail;
    if ((rc = query_i64(s, &s->mint_id, "SELECT id FROM accounts WHERE system = 1 AND name = 'mint'",
                        NULL)) < 0) {
        if (rc == AR_ENOTFOUND)
            rc = ar_fail(AR_EFORMAT, "db: %s: no mint account", path);
        goto fail;
    }
    if ((rc = query_i64(s, &s->escrow_id, "SELECT id FROM accounts WHERE system = 1 AND name = 'escrow'",
                        NULL)) < 0) {
        if (rc == AR_ENOTFOUND)
            rc = ar_fail(AR_EFORMAT, "db: %s: no escrow account", path);
        goto fail;
    }
    *out = s;
    return AR_OK;
fail:
    stmts_free(s);
    sqlite3_close(s->db);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->group_mu);
    free(s);
    return rc;
}

int ar_store_open(const char *path, ar_store **out)
{
    int rc = open_conn(path, out);
    if (rc < 0)
        return rc;
    ar_store *r = NULL;
    if ((rc = open_conn(path, &r)) < 0 || (rc = exec_sql(r, "PRAGMA query_only = ON", "query only")) < 0) {
        ar_store_close(r);
        ar_store_close(*out);
        *out = NULL;
        return rc;
    }
    (*out)->reader = r;
    return AR_OK;
}

void ar_store_close(ar_store *s)
{
    if (!s)
        return;
    ar_store_close(s->reader);
    /* close_v2 never fails for a busy connection: we finalize every statement */
    stmts_free(s);
    sqlite3_close_v2(s->db);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->group_mu);
    free(s);
}

int ar_store_schema_version(ar_store *s, int *version)
{
    int64_t v = 0;
    lock(s);
    int rc = query_i64(s, &v, "SELECT version FROM schema_version", NULL);
    unlock(s);
    if (rc == AR_ENOTFOUND)
        return ar_fail(AR_EFORMAT, "db: no schema version");
    if (rc == 0)
        *version = (int)v;
    return rc;
}

/* ---- accounts ---------------------------------------------------------------------- */

#define ACCOUNT_COLS "id, name, balance, created, system, reliability, confirmed_claims, false_claims"

static void read_account(sqlite3_stmt *st, ar_account *a)
{
    memset(a, 0, sizeof *a);
    a->id = sqlite3_column_int64(st, 0);
    copy_text(a->name, sizeof a->name, st, 1);
    a->balance = sqlite3_column_int64(st, 2);
    a->created = sqlite3_column_int64(st, 3);
    a->system = sqlite3_column_int(st, 4) != 0;
    a->reliability = sqlite3_column_double(st, 5);
    a->confirmed_claims = sqlite3_column_int64(st, 6);
    a->false_claims = sqlite3_column_int64(st, 7);
}

static bool name_ok(const char *name)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n >= AR_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c <= ' ' || c == 0x7f)
            return false;
    }
    return true;
}

int ar_store_account_create(ar_store *s, const char *name, int64_t initial_credits,
                            char token_out[AR_TOKEN_LEN], int64_t *id_out)
{
    if (!name_ok(name))
        return ar_fail(AR_EINVAL, "account name must be 1..%d printable characters, no spaces",
                       AR_NAME_MAX - 1);
    if (initial_credits < 0)
        return ar_fail(AR_EINVAL, "initial credits must not be negative");
    char token[AR_TOKEN_LEN], hash[AR_TOKEN_LEN];
    int rc = token_new(token, hash);
    if (rc < 0)
        return rc;
    lock(s);
    if ((rc = tx_begin(s)) < 0)
        goto out;
    int64_t existing;
    rc = query_i64(s, &existing, "SELECT id FROM accounts WHERE name = ?", "t", name);
    if (rc == 0)
        rc = ar_fail(AR_EINVAL, "account %s exists", name);
    else if (rc == AR_ENOTFOUND)
        rc = run(s, NULL, "INSERT INTO accounts (name, token_hash, created) VALUES (?, ?, ?)",
                 "tti", name, hash, now_s());
    int64_t id = sqlite3_last_insert_rowid(s->db);
    if (rc == 0 && initial_credits > 0)
        rc = transfer(s, s->mint_id, id, initial_credits, "mint", 0, -1, NULL);
    rc = tx_end(s, rc);
    if (rc == 0) {
        memcpy(token_out, token, AR_TOKEN_LEN);
        if (id_out)
            *id_out = id;
    }
out:
    unlock(s);
    OPENSSL_cleanse(token, sizeof token);
    return rc;
}

int ar_store_account_auth(ar_store *s, const char *token, int64_t *id_out)
{
    s = reads(s);
    lock(s);
    int rc = token_lookup(
        s, "SELECT id, token_hash FROM accounts WHERE token_hash = ? AND system = 0", token,
        id_out);
    unlock(s);
    return rc;
}

int ar_store_account_balance(ar_store *s, int64_t account_id, int64_t *micro_out)
{
    lock(s);
    int rc = balance_of(s, account_id, micro_out, NULL);
    unlock(s);
    return rc;
}

static int account_row(sqlite3_stmt *st, void *item)
{
    read_account(st, item);
    return AR_OK;
}

int ar_store_account_get(ar_store *s, int64_t account_id, ar_account *out)
{
    lock(s);
    int rc = one_row(s, account_row, out, "SELECT " ACCOUNT_COLS " FROM accounts WHERE id = ?", "i",
                     account_id);
    unlock(s);
    return rc == AR_ENOTFOUND ? ar_fail(rc, "no account %" PRId64, account_id) : rc;
}

int ar_store_account_find(ar_store *s, const char *name, ar_account *out)
{
    lock(s);
    int rc = one_row(s, account_row, out, "SELECT " ACCOUNT_COLS " FROM accounts WHERE name = ?", "t",
                     name ? name : "");
    unlock(s);
    return rc == AR_ENOTFOUND ? ar_fail(rc, "no account %s", name ? name : "") : rc;
}

int ar_store_account_mint(ar_store *s, int64_t account_id, int64_t micro)
{
    if (micro <= 0)
        return ar_fail(AR_EINVAL, "mint a positive amount");
    if (account_id == s->mint_id)
        return ar_fail(AR_EINVAL, "cannot mint to the mint");
    lock(s);
    int rc = tx_begin(s);
    if (rc == 0)
        rc = tx_end(s, transfer(s, s->mint_id, account_id, micro, "mint", 0, -1, NULL));
    unlock(s);
    return rc;
}

int ar_store_account_list(ar_store *s, ar_account **out, size_t *n)
{
    return list_rows(s, sizeof **out, account_row, NULL, (void **)out, n,
                     "SELECT " ACCOUNT_COLS " FROM accounts ORDER BY id", NULL);
}

/* What escrow holds for an account's providers (the caller holds the lock). */
#define PENDING_SQL                                                                                \
    "SELECT COALESCE(SUM(u.amount), 0) FROM usage u JOIN providers p ON p.id = u.provider_id"      \
    " WHERE p.account_id = ? AND u.state IN ('held', 'contested')"

int ar_store_account_pending(ar_store *s, int64_t account_id, int64_t *micro_out)
{
    lock(s);
    int rc = query_i64(s, micro_out, PENDING_SQL, "i", account_id);
    unlock(s);
    return rc;
}

int ar_store_account_set_reliability(ar_store *s, int64_t account_id, double reliability)
{
    if (!(reliability >= 0 && reliability <= 1))
        return ar_fail(AR_EINVAL, "reliability %g is not in 0..1", reliability);
    int changes = 0;
    lock(s);
    int rc = run(s, &changes, "UPDATE accounts SET reliability = ? WHERE id = ? AND system = 0", "di", reliability,
                 account_id);
    unlock(s);
    return rc == 0 && changes != 1 ? ar_fail(AR_ENOTFOUND, "no account %" PRId64, account_id) : rc;
}

int ar_store_account_claim(ar_store *s, int64_t account_id, bool confirmed)
{
    int changes = 0;
    lock(s);
    int rc = run(s, &changes,
                 confirmed ? "UPDATE accounts SET confirmed_claims = confirmed_claims + 1 WHERE id = ? AND system = 0"
                           : "UPDATE accounts SET false_claims = false_claims + 1 WHERE id = ? AND system = 0",
                 "i", account_id);
    unlock(s);
    return rc == 0 && changes != 1 ? ar_fail(AR_ENOTFOUND, "no account %" PRId64, account_id) : rc;
}

/* ---- providers ------------------------------------------------------------------------ */

/* A provider's row with the market's reach checks (none yet: unchecked),
 * its account's reliability, what it last said of its owner's rules, and
 * what was observed of its speed and of its account's providers' speed.
 * (providers.reliability is schema 6's and unused: reliability is the
 * account's.) */
#define PROVIDER_COLS                                                                              \
    "p.id, p.account_id, p.address, p.gflops, p.mem_bytes, p.cores, p.price_per_tflop,"            \
    " acc.reliability, p.online, p.last_heartbeat, COALESCE(r.state, 0), COALESCE(r.checked, 0),"  \
    " COALESCE(r.failures, 0), COALESCE(a.unavailable, 0), COALESCE(a.why, ''), COALESCE(a.changed, 0)," \
    " COALESCE(lv.since, 0), COALESCE(v.flops, 0), COALESCE(v.busy_s, 0), COALESCE(v.claim_flops, 0),"  \
    " (SELECT COALESCE(SUM(w.flops), 0) FROM provider_speed w JOIN providers q ON q.id = w.provider_id"  \
    "  WHERE q.account_id = p.account_id),"                                                        \
    " (SELECT COALESCE(SUM(w.claim_flops), 0) FROM provider_speed w JOIN providers q ON q.id = w.provider_id" \
    "  WHERE q.account_id = p.account_id)"
#define PROVIDER_FROM                                                                              \
    " FROM providers p JOIN accounts acc ON acc.id = p.account_id"                                 \
    " LEFT JOIN provider_reach r ON r.provider_id = p.id"                                          \
    " LEFT JOIN provider_availability a ON a.provider_id = p.id"                                   \
    " LEFT JOIN provider_leaving lv ON lv.provider_id = p.id"                                      \
    " LEFT JOIN provider_speed v ON v.provider_id = p.id"

static void read_provider(sqlite3_stmt *st, ar_provider *p)
{
    memset(p, 0, sizeof *p);
    p->id = sqlite3_column_int64(st, 0);
    p->account_id = sqlite3_column_int64(st, 1);
    copy_text(p->address, sizeof p->address, st, 2);
    p->gflops = sqlite3_column_double(st, 3);
    p->mem_bytes = sqlite3_column_int64(st, 4);
    p->cores = sqlite3_column_int(st, 5);
    p->price_per_tflop = sqlite3_column_int64(st, 6);
    p->reliability = sqlite3_column_double(st, 7);
    p->online = sqlite3_column_int(st, 8) != 0;
    p->last_heartbeat = sqlite3_column_int64(st, 9);
    int reach = sqlite3_column_int(st, 10);
    p->reach = reach == AR_REACH_OK || reach == AR_REACH_UNREACHABLE || reach == AR_REACH_RELAYED ? (ar_reach)reach
                                                                                                   : AR_REACH_UNCHECKED;
    p->reach_checked = sqlite3_column_int64(st, 11);
    p->reach_failures = sqlite3_column_int(st, 12);
    p->unavailable = sqlite3_column_int(st, 13) != 0;
    copy_text(p->unavailable_why, sizeof p->unavailable_why, st, 14);
    p->availability_changed = sqlite3_column_int64(st, 15);
    p->leaving_since = sqlite3_column_int64(st, 16);
    p->obs_flops = sqlite3_column_double(st, 17);
    p->obs_busy_s = sqlite3_column_double(st, 18);
    p->obs_claim_flops = sqlite3_column_double(st, 19);
    p->acct_obs_flops = sqlite3_column_double(st, 20);
    p->acct_obs_claim_flops = sqlite3_column_double(st, 21);
}

const char *ar_reach_name(ar_reach r)
{
    return r == AR_REACH_OK ? "direct" : r == AR_REACH_RELAYED ? "relayed" : r == AR_REACH_UNREACHABLE ? "unreachable" : "unchecked";
}

int ar_store_provider_register(ar_store *s, const ar_provider *p, int64_t *id_out)
{
    if (!p->address[0] || memchr(p->address, '\0', sizeof p->address) == NULL)
        return ar_fail(AR_EINVAL, "provider needs an address");
    if (!(p->gflops >= 0) || p->mem_bytes < 0 || p->cores < 0 || p->price_per_tflop < 0)
        return ar_fail(AR_EINVAL, "provider profile has a negative value");
    lock(s);
    int rc = tx_begin(s);
    if (rc < 0)
        goto out;
    int64_t acc;
    rc = query_i64(s, &acc, "SELECT id FROM accounts WHERE id = ? AND system = 0", "i",
                   p->account_id);
    if (rc == AR_ENOTFOUND)
        rc = ar_fail(rc, "no account %" PRId64, p->account_id);
    /* an upsert: a provider that restarts keeps its id (and its history) */
    if (rc == 0)
        rc = run(s, NULL,
                 "INSERT INTO providers (account_id, address, gflops, mem_bytes, cores,"
                 " price_per_tflop, reliability, online, last_heartbeat)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)"
                 " ON CONFLICT (account_id, address) DO UPDATE SET gflops = excluded.gflops,"
                 " mem_bytes = excluded.mem_bytes, cores = excluded.cores,"
                 " price_per_tflop = excluded.price_per_tflop, online = 1,"
                 " last_heartbeat = excluded.last_heartbeat",
                 "itdiiidi", p->account_id, p->address, p->gflops, p->mem_bytes,
                 (int64_t)p->cores, p->price_per_tflop, 1.0, now_s());
    int64_t id = 0;
    if (rc == 0) {
        rc = query_i64(s, &id, "SELECT id FROM providers WHERE account_id = ? AND address = ?",
                       "it", p->account_id, p->address);
        if (rc == AR_ENOTFOUND)
            rc = ar_fail(AR_EINTERNAL, "registered provider not found");
    }
    rc = tx_end(s, rc);
    if (rc == 0 && id_out)
        *id_out = id;
out:
    unlock(s);
    return rc;
}

static int provider_set(ar_store *s, int64_t id, const char *sql, const char *what)
{
    int changes = 0;
    lock(s);
    int rc = run(s, &changes, sql, "ii", now_s(), id);
    unlock(s);
    if (rc == 0 && changes != 1)
        rc = ar_fail(AR_ENOTFOUND, "%s: no provider %" PRId64, what, id);
    return rc;
}

/* Why a provider is unavailable, as the store keeps it: AR_OK or AR_EINVAL. */
static int why_ok(const char *why)
{
    size_t len = strlen(why);
    if (len >= AR_WHY_MAX)
        return ar_fail(AR_EINVAL, "why a provider is unavailable: %zu bytes, at most %d", len, AR_WHY_MAX - 1);
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)why[i] < 0x20 || why[i] == 0x7f)
            return ar_fail(AR_EINVAL, "why a provider is unavailable has a control character");
    return AR_OK;
}

/* The availability upsert: the time changes with the state, not with every
 * heartbeat saying it. Lock held. */
static int availability_write(ar_store *s, int64_t provider_id, bool unavailable, const char *why)
{
    return run(s, NULL,
               "INSERT INTO provider_availability (provider_id, unavailable, why, changed)"
               " VALUES (?1, ?2, ?3, ?4)"
               " ON CONFLICT (provider_id) DO UPDATE SET"
               " changed = CASE WHEN unavailable = ?2 THEN changed ELSE ?4 END,"
               " unavailable = ?2, why = ?3",
               "iiti", provider_id, (int64_t)unavailable, why, now_s());
}

/* Whether a provider is leaving: the time the leave began stays while
 * every heartbeat says it again. Lock held. */
static int leaving_write(ar_store *s, int64_t provider_id, bool leaving)
{
    if (leaving)
        return run(s, NULL, "INSERT OR IGNORE INTO provider_leaving (provider_id, since) VALUES (?, ?)", "ii",
                   provider_id, now_s());
    return run(s, NULL, "DELETE FROM provider_leaving WHERE provider_id = ?", "i", provider_id);
}

typedef struct {
    int64_t provider_id;
    bool says; /* a Heartbeat's: also keep what it says of its availability and leave */
    bool unavailable;
    const char *why;
    bool leaving;
    int changes;
} heartbeat_write;

static int heartbeat_body(ar_store *s, void *arg)
{
    heartbeat_write *w = arg;
    int rc = run(s, &w->changes, "UPDATE providers SET online = 1, last_heartbeat = ? WHERE id = ?", "ii",
                 now_s(), w->provider_id);
    if (rc == 0 && w->changes == 1 && w->says)
        rc = availability_write(s, w->provider_id, w->unavailable, w->why);
    if (rc == 0 && w->changes == 1 && w->says)
        rc = leaving_write(s, w->provider_id, w->leaving);
    return rc;
}

static int heartbeat(ar_store *s, heartbeat_write *w)
{
    int rc = group_write(s, heartbeat_body, w);
    if (rc == 0 && w->changes != 1)
        rc = ar_fail(AR_ENOTFOUND, "heartbeat: no provider %" PRId64, w->provider_id);
    return rc;
}

int ar_store_provider_heartbeat(ar_store *s, int64_t provider_id)
{
    return heartbeat(s, &(heartbeat_write){.provider_id = provider_id});
}

int ar_store_provider_beat(ar_store *s, int64_t provider_id, bool unavailable, const char *why, bool leaving)
{
    why = unavailable && why ? why : "";
    int rc = why_ok(why);
    if (rc != AR_OK)
        return rc;
    return heartbeat(s, &(heartbeat_write){.provider_id = provider_id, .says = true, .unavailable = unavailable,
                                           .why = why, .leaving = leaving});
}

int ar_store_provider_mark_offline(ar_store *s, int64_t provider_id)
{
    /* the time is bound but unused: one helper for both updates */
    return provider_set(s, provider_id,
                        "UPDATE providers SET online = 0 WHERE ?1 IS NOT NULL AND id = ?2",
                        "mark offline");
}

int ar_store_provider_set_availability(ar_store *s, int64_t provider_id, bool unavailable, const char *why)
{
    why = unavailable && why ? why : "";
    int rc = why_ok(why);
    if (rc != AR_OK)
        return rc;
    lock(s);
    int64_t exists = 0;
    rc = query_i64(s, &exists, "SELECT COUNT(*) FROM providers WHERE id = ?", "i", provider_id);
    if (rc == 0 && !exists)
        rc = ar_fail(AR_ENOTFOUND, "availability: no provider %" PRId64, provider_id);
    if (rc == 0)
        rc = availability_write(s, provider_id, unavailable, why);
    unlock(s);
    return rc;
}

int ar_store_provider_set_leaving(ar_store *s, int64_t provider_id, bool leaving)
{
    lock(s);
    int64_t exists = 0;
    int rc = query_i64(s, &exists, "SELECT COUNT(*) FROM providers WHERE id = ?", "i", provider_id);
    if (rc == 0 && !exists)
        rc = ar_fail(AR_ENOTFOUND, "leaving: no provider %" PRId64, provider_id);
    if (rc == 0)
        rc = leaving_write(s, provider_id, leaving);
    unlock(s);
    return rc;
}

int ar_store_provider_expire(ar_store *s, int64_t max_age_s, int *count_out)
{
    int changes = 0;
    lock(s);
    int rc = run(s, &changes,
                 "UPDATE providers SET online = 0 WHERE online = 1 AND last_heartbeat < ?", "i",
                 now_s() - max_age_s);
    unlock(s);
    if (rc == 0 && count_out)
        *count_out = changes;
    return rc;
}

static int provider_row(sqlite3_stmt *st, void *item)
{
    read_provider(st, item);
    return AR_OK;
}

int ar_store_provider_get(ar_store *s, int64_t provider_id, ar_provider *out)
{
    s = reads(s);
    lock(s);
    int rc = one_row(s, provider_row, out, "SELECT " PROVIDER_COLS PROVIDER_FROM " WHERE p.id = ?", "i",
                     provider_id);
    unlock(s);
    return rc == AR_ENOTFOUND ? ar_fail(rc, "no provider %" PRId64, provider_id) : rc;
}

int ar_store_provider_list(ar_store *s, bool online_only, ar_provider **out, size_t *n)
{
    return list_rows(s, sizeof **out, provider_row, NULL, (void **)out, n,
                     "SELECT " PROVIDER_COLS PROVIDER_FROM " WHERE p.online = 1 OR ? = 0 ORDER BY p.id", "i",
                     (int64_t)online_only);
}

int ar_store_provider_set_reach(ar_store *s, int64_t provider_id, ar_reach reach)
{
    if (reach != AR_REACH_UNCHECKED && reach != AR_REACH_OK && reach != AR_REACH_UNREACHABLE && reach != AR_REACH_RELAYED)
        return ar_fail(AR_EINVAL, "reach state %d is not one of the store's", (int)reach);
    lock(s);
    int64_t exists = 0;
    int rc = query_i64(s, &exists, "SELECT COUNT(*) FROM providers WHERE id = ?", "i", provider_id);
    if (rc == 0 && !exists)
        rc = ar_fail(AR_ENOTFOUND, "set reach: no provider %" PRId64, provider_id);
    /* a success clears the count of failures in a row; a failure adds one */
    if (rc == 0)
        rc = run(s, NULL,
                 "INSERT INTO provider_reach (provider_id, state, checked, failures) VALUES (?1, ?2, ?3, ?4)"
                 " ON CONFLICT (provider_id) DO UPDATE SET state = ?2, checked = ?3,"
                 " failures = CASE WHEN ?4 = 1 THEN failures + 1 ELSE 0 END",
                 "iiii", provider_id, (int64_t)reach, now_s(), (int64_t)(reach == AR_REACH_UNREACHABLE));
    unlock(s);
    return rc;
}

int ar_store_provider_observe(ar_store *s, int64_t provider_id, double flops, double busy_s, double claim_flops)
{
    if (!(isfinite(flops) && flops >= 0 && isfinite(busy_s) && busy_s >= 0 && isfinite(claim_flops) &&
          claim_flops >= 0))
        return ar_fail(AR_EINVAL, "an observation of %g FLOPs in %g s (claimed %g) is not finite and >= 0", flops,
                       busy_s, claim_flops);
    lock(s);
    int rc = run(s, NULL,
                 "INSERT INTO provider_speed (provider_id, flops, busy_s, claim_flops) VALUES (?1, ?2, ?3, ?4)"
                 " ON CONFLICT (provider_id) DO UPDATE SET flops = flops + ?2, busy_s = busy_s + ?3,"
                 " claim_flops = claim_flops + ?4",
                 "iddd", provider_id, flops, busy_s, claim_flops);
    unlock(s);
    return rc;
}

int ar_store_speed_totals(ar_store *s, double *flops, double *claim_flops)
{
    sqlite3_stmt *st;
    lock(s);
    int rc = prep(s, &st, "SELECT COALESCE(SUM(flops), 0), COALESCE(SUM(claim_flops), 0) FROM provider_speed", NULL);
    if (rc == 0) {
        rc = step(s, st);
        if (rc > 0) {
            *flops = sqlite3_column_double(st, 0);
            *claim_flops = sqlite3_column_double(st, 1);
            rc = AR_OK;
        } else if (rc == 0) {
            rc = ar_fail(AR_EINTERNAL, "db: the speed totals gave no row");
        }
        done(s, st);
    }
    unlock(s);
    return rc;
}

static int sample_row(sqlite3_stmt *st, void *item)
{
    ar_stage_sample *x = item;
    x->provider_id = sqlite3_column_int64(st, 0);
    x->step = sqlite3_column_int64(st, 1);
    x->busy_s = sqlite3_column_double(st, 2);
    x->wall_s = sqlite3_column_double(st, 3);
    return AR_OK;
}

int ar_store_stage_sample_swap(ar_store *s, int64_t lease_id, int stage, const ar_stage_sample *now,
                               ar_stage_sample *prev, bool *had)
{
    *had = false;
    memset(prev, 0, sizeof *prev);
    lock(s);
    int rc = tx_begin(s);
    if (rc == 0) {
        rc = one_row(s, sample_row, prev,
                     "SELECT provider_id, step, busy_s, wall_s FROM stage_samples WHERE lease_id = ? AND stage = ?",
                     "ii", lease_id, (int64_t)stage);
        *had = rc == 0;
        if (rc == AR_ENOTFOUND)
            rc = AR_OK;
        if (rc == 0)
            rc = run(s, NULL,
                     "INSERT OR REPLACE INTO stage_samples (lease_id, stage, provider_id, step, busy_s, wall_s)"
                     " VALUES (?, ?, ?, ?, ?, ?)",
                     "iiiidd", lease_id, (int64_t)stage, now->provider_id, now->step, now->busy_s, now->wall_s);
        rc = tx_end(s, rc);
    }
    unlock(s);
    return rc;
}

int ar_store_provider_leased(ar_store *s, int64_t provider_id, bool *out)
{
    *out = false;
    sqlite3_stmt *st;
    lock(s);
    int rc = prep(s, &st,
                  "SELECT 1 FROM lease_members m JOIN leases l ON l.id = m.lease_id"
                  " WHERE m.provider_id = ? AND l.released IS NULL LIMIT 1",
                  "i", provider_id);
    if (rc == 0) {
        rc = step(s, st);
        if (rc > 0) {
            *out = true;
            rc = AR_OK;
        }
        done(s, st);
    }
    unlock(s);
    return rc < 0 ? rc : AR_OK;
}

/* ---- jobs --------------------------------------------------------------------------- */

static const char *const job_status_names[] = {"queued", "running", "done", "failed",
                                               "cancelled"};

const char *ar_job_status_name(ar_job_status st)
{
    if ((unsigned)st < sizeof job_status_names / sizeof job_status_names[0])
        return job_status_names[st];
    return "unknown";
}

int ar_job_status_parse(const char *name, ar_job_status *out)
{
    for (size_t i = 0; name && i < sizeof job_status_names / sizeof job_status_names[0]; i++)
        if (strcmp(name, job_status_names[i]) == 0) {
            *out = (ar_job_status)i;
            return AR_OK;
        }
    return ar_fail(AR_EINVAL, "unknown job status '%s'", name ? name : "");
}

#define JOB_COLS "id, renter_id, status, spec, created, step, max_credits, spent"

static int read_job(sqlite3_stmt *st, ar_job *j)
{
    memset(j, 0, sizeof *j);
    j->id = sqlite3_column_int64(st, 0);
    j->renter_id = sqlite3_column_int64(st, 1);
    const unsigned char *status = sqlite3_column_text(st, 2);
    if (ar_job_status_parse(status ? (const char *)status : "", &j->status) < 0)
        return ar_fail(AR_EFORMAT, "db: job %" PRId64 " has status '%s'", j->id,
                       status ? (const char *)status : "");
    const unsigned char *spec = sqlite3_column_text(st, 3);
    j->spec = strdup(spec ? (const char *)spec : "");
    if (!j->spec)
        return ar_fail(AR_ENOMEM, "db: out of memory for a job spec");
    j->created = sqlite3_column_int64(st, 4);
    j->step = sqlite3_column_int64(st, 5);
    j->max_credits = sqlite3_column_int64(st, 6);
    j->spent = sqlite3_column_int64(st, 7);
    return AR_OK;
}

void ar_store_job_clear(ar_job *j)
{
    if (j) {
        free(j->spec);
        j->spec = NULL;
    }
}

void ar_store_jobs_free(ar_job *jobs, size_t n)
{
    for (size_t i = 0; jobs && i < n; i++)
        free(jobs[i].spec);
    free(jobs);
}

int ar_store_job_create(ar_store *s, int64_t renter_id, const char *spec, int64_t max_credits,
                        int64_t *id_out)
{
    if (max_credits < 0)
        return ar_fail(AR_EINVAL, "max credits must not be negative");
    lock(s);
    int rc = tx_begin(s);
    if (rc < 0)
        goto out;
    int64_t acc;
    rc = query_i64(s, &acc, "SELECT id FROM accounts WHERE id = ? AND system = 0", "i", renter_id);
    if (rc == AR_ENOTFOUND)
        rc = ar_fail(rc, "no account %" PRId64, renter_id);
    if (rc == 0)
        rc = run(s, NULL,
                 "INSERT INTO jobs (renter_id, status, spec, created, max_credits)"
                 " VALUES (?, 'queued', ?, ?, ?)",
                 "itii", renter_id, spec ? spec : "", now_s(), max_credits);
    int64_t id = sqlite3_last_insert_rowid(s->db);
    rc = tx_end(s, rc);
    if (rc == 0 && id_out)
        *id_out = id;
out:
    unlock(s);
    return rc;
}

int ar_store_job_update(ar_store *s, int64_t job_id, ar_job_status status, int64_t stepno)
{
    if ((unsigned)status >= sizeof job_status_names / sizeof job_status_names[0] || stepno < 0)
        return ar_fail(AR_EINVAL, "bad job status %d or step %" PRId64, (int)status, stepno);
    int changes = 0;
    bool ends = status == AR_JOB_DONE || status == AR_JOB_FAILED || status == AR_JOB_CANCELLED;
    lock(s);
    /* the end of a job starts its escrow's settling window (the first end:
     * a job released twice does not move it) */
    int rc = ends ? run(s, &changes, "UPDATE jobs SET status = ?, step = ?, ended = COALESCE(ended, ?) WHERE id = ?",
                        "tiii", job_status_names[status], stepno, now_s(), job_id)
                  : run(s, &changes, "UPDATE jobs SET status = ?, step = ?, ended = NULL WHERE id = ?", "tii",
                        job_status_names[status], stepno, job_id);
    unlock(s);
    if (rc == 0 && changes != 1)
        rc = ar_fail(AR_ENOTFOUND, "no job %" PRId64, job_id);
    return rc;
}

static int job_row(sqlite3_stmt *st, void *item)
{
    return read_job(st, item);
}

/* Who pays for a job, its cap and what it has spent (read in a transaction). */
typedef struct {
    int64_t renter_id, max_credits, spent;
} job_money;

static int job_money_row(sqlite3_stmt *st, void *item)
{
    job_money *m = item;
    m->renter_id = sqlite3_column_int64(st, 0);
    m->max_credits = sqlite3_column_int64(st, 1);
    m->spent = sqlite3_column_int64(st, 2);
    return AR_OK;
}

static int job_money_get(ar_store *s, int64_t job_id, job_money *out)
{
    int rc = one_row(s, job_money_row, out, "SELECT renter_id, max_credits, spent FROM jobs WHERE id = ?", "i",
                     job_id);
    return rc == AR_ENOTFOUND ? ar_fail(rc, "no job %" PRId64, job_id) : rc;
}

int ar_store_job_get(ar_store *s, int64_t job_id, ar_job *out)
{
    memset(out, 0, sizeof *out);
    lock(s);
    int rc = one_row(s, job_row, out, "SELECT " JOB_COLS " FROM jobs WHERE id = ?", "i", job_id);
    unlock(s);
    if (rc == AR_ENOTFOUND)
        rc = ar_fail(rc, "no job %" PRId64, job_id);
    if (rc < 0)
        ar_store_job_clear(out);
    return rc;
}


static void jobs_free(void *jobs, size_t n)
{
    ar_store_jobs_free(jobs, n);
}

int ar_store_job_list(ar_store *s, int64_t renter_id, ar_job **out, size_t *n)
{
    return list_rows(s, sizeof **out, job_row, jobs_free, (void **)out, n,
                     "SELECT " JOB_COLS " FROM jobs WHERE ?1 <= 0 OR renter_id = ?1 ORDER BY id", "i", renter_id);
}

/* AR_OK when job_id names a job; the caller holds the lock */
static int job_exists(ar_store *s, int64_t job_id)
{
    int64_t id;
    int rc = query_i64(s, &id, "SELECT id FROM jobs WHERE id = ?", "i", job_id);
    if (rc == AR_ENOTFOUND)
        rc = ar_fail(rc, "no job %" PRId64, job_id);
    return rc;
}

int ar_store_job_progress_record(ar_store *s, int64_t job_id, int64_t stepno, double loss)
{
    if (stepno < 0 || !isfinite(loss))
        return ar_fail(AR_EINVAL, "bad progress: step %" PRId64 ", loss %g", stepno, loss);
    lock(s);
    int rc = job_exists(s, job_id);
    if (rc == 0)
        rc = run(s, NULL,
                 "INSERT OR REPLACE INTO job_progress (job_id, step, loss, created) VALUES (?, ?, ?, ?)",
                 "iidi", job_id, stepno, loss, now_s());
    unlock(s);
    return rc;
}

/* (step, loss) rows of `sql`, which takes the job id and a step to start after */
static int point_row(sqlite3_stmt *st, void *item)
{
    ar_job_point *p = item;
    p->step = sqlite3_column_int64(st, 0);
    p->loss = sqlite3_column_double(st, 1);
    return AR_OK;
}

static int job_points(ar_store *s, const char *sql, int64_t job_id, int64_t after_step,
                      ar_job_point **out, size_t *n)
{
    return list_rows(s, sizeof **out, point_row, NULL, (void **)out, n, sql, "ii", job_id, after_step);
}

int ar_store_job_progress(ar_store *s, int64_t job_id, ar_job_point **out, size_t *n)
{
    return ar_store_job_progress_since(s, job_id, -1, out, n);
}

int ar_store_job_progress_since(ar_store *s, int64_t job_id, int64_t after_step,
                                ar_job_point **out, size_t *n)
{
    return job_points(s, "SELECT step, loss FROM job_progress WHERE job_id = ? AND step > ? ORDER BY step",
                      job_id, after_step, out, n);
}

/* ---- a running job as its driver sees it ---------------------------------------------- */

int ar_store_job_val_record(ar_store *s, int64_t job_id, int64_t stepno, double loss)
{
    if (stepno < 0 || !isfinite(loss))
        return ar_fail(AR_EINVAL, "bad validation loss: step %" PRId64 ", loss %g", stepno, loss);
    lock(s);
    int rc = job_exists(s, job_id);
    if (rc == 0)
        rc = run(s, NULL, "INSERT OR REPLACE INTO job_val (job_id, step, loss, created) VALUES (?, ?, ?, ?)",
                 "iidi", job_id, stepno, loss, now_s());
    unlock(s);
    return rc;
}

int ar_store_job_val(ar_store *s, int64_t job_id, ar_job_point **out, size_t *n)
{
    return job_points(s, "SELECT step, loss FROM job_val WHERE job_id = ? AND step > ? ORDER BY step", job_id,
                      -1, out, n);
}

static bool finite_nonneg(double x)
{
    return isfinite(x) && x >= 0;
}

int ar_store_job_live_set(ar_store *s, int64_t job_id, const ar_job_live *l, const ar_stage_time *t,
                          size_t n)
{
    if (l->step < 0 || l->total_steps < 0 || !finite_nonneg(l->items_per_s) || !finite_nonneg(l->eta_s) ||
        !finite_nonneg(l->wall_s) || strnlen(l->unit, AR_UNIT_MAX) >= AR_UNIT_MAX)
        return ar_fail(AR_EINVAL, "bad job snapshot: step %" PRId64 " of %" PRId64 ", %g items/s, eta %g s, wall %g s",
                       l->step, l->total_steps, l->items_per_s, l->eta_s, l->wall_s);
    for (size_t i = 0; i < n; i++)
        if (t[i].step < 0 || t[i].stage < 0 || !finite_nonneg(t[i].wall_s) || !finite_nonneg(t[i].busy_s) ||
            !finite_nonneg(t[i].idle_s))
            return ar_fail(AR_EINVAL, "bad stage time: stage %d at step %" PRId64 ", busy %g s, idle %g s",
                           t[i].stage, t[i].step, t[i].busy_s, t[i].idle_s);
    lock(s);
    int rc = tx_begin(s);
    if (rc < 0)
        goto out;
    rc = job_exists(s, job_id);
    if (rc == 0)
        rc = run(s, NULL,
                 "INSERT INTO job_live (job_id, step, total_steps, items_per_s, items_unit, eta_s, wall_s, plan, updated)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                 " ON CONFLICT (job_id) DO UPDATE SET step = excluded.step, total_steps = excluded.total_steps,"
                 " items_per_s = excluded.items_per_s, items_unit = excluded.items_unit, eta_s = excluded.eta_s,"
                 " wall_s = excluded.wall_s, plan = COALESCE(excluded.plan, job_live.plan), updated = excluded.updated",
                 "iiidtddti", job_id, l->step, l->total_steps, l->items_per_s, l->unit, l->eta_s, l->wall_s, l->plan,
                 now_s());
    for (size_t i = 0; rc == 0 && i < n; i++)
        rc = run(s, NULL,
                 "INSERT OR REPLACE INTO job_stage_time (job_id, step, stage, wall_s, busy_s, idle_s)"
                 " VALUES (?, ?, ?, ?, ?, ?)",
                 "iiiddd", job_id, t[i].step, (int64_t)t[i].stage, t[i].wall_s, t[i].busy_s, t[i].idle_s);
    rc = tx_end(s, rc);
out:
    unlock(s);
    return rc;
}

void ar_store_job_live_clear(ar_job_live *l)
{
    if (l) {
        free(l->plan);
        l->plan = NULL;
    }
}

int ar_store_job_live_get(ar_store *s, int64_t job_id, ar_job_live *out)
{
    memset(out, 0, sizeof *out);
    sqlite3_stmt *st;
    lock(s);
    int rc = prep(s, &st,
                  "SELECT step, total_steps, items_per_s, items_unit, eta_s, wall_s, plan, updated"
                  " FROM job_live WHERE job_id = ?",
                  "i", job_id);
    if (rc == 0) {
        rc = step(s, st);
        if (rc > 0) {
            out->step = sqlite3_column_int64(st, 0);
            out->total_steps = sqlite3_column_int64(st, 1);
            out->items_per_s = sqlite3_column_double(st, 2);
            copy_text(out->unit, sizeof out->unit, st, 3);
            out->eta_s = sqlite3_column_double(st, 4);
            out->wall_s = sqlite3_column_double(st, 5);
            const unsigned char *plan = sqlite3_column_text(st, 6);
            out->updated = sqlite3_column_int64(st, 7);
            rc = AR_OK;
            if (plan && !(out->plan = strdup((const char *)plan)))
                rc = ar_fail(AR_ENOMEM, "db: out of memory for a job plan");
        } else if (rc == 0) {
            rc = ar_fail(AR_ENOTFOUND, "job %" PRId64 " has reported no progress", job_id);
        }
        done(s, st);
    }
    unlock(s);
    if (rc < 0)
        ar_store_job_live_clear(out);
    return rc;
}

static int stage_time_row(sqlite3_stmt *st, void *item)
{
    ar_stage_time *t = item;
    t->step = sqlite3_column_int64(st, 0);
    t->stage = sqlite3_column_int(st, 1);
    t->wall_s = sqlite3_column_double(st, 2);
    t->busy_s = sqlite3_column_double(st, 3);
    t->idle_s = sqlite3_column_double(st, 4);
    return AR_OK;
}

int ar_store_job_stage_times(ar_store *s, int64_t job_id, ar_stage_time **out, size_t *n)
{
    return list_rows(s, sizeof **out, stage_time_row, NULL, (void **)out, n,
                     "SELECT step, stage, wall_s, busy_s, idle_s FROM job_stage_time WHERE job_id = ?"
                     " ORDER BY step, stage",
                     "i", job_id);
}

/* ---- market-wide figures ------------------------------------------------------------ */

int ar_store_totals(ar_store *s, ar_market_totals *out)
{
    memset(out, 0, sizeof *out);
    sqlite3_stmt *st;
    lock(s);
    /* one statement, so the figures are of one moment */
    int rc = prep(s, &st,
                  "SELECT (SELECT COUNT(*) FROM providers),"
                  " (SELECT COUNT(*) FROM providers WHERE online = 1),"
                  " (SELECT COALESCE(SUM(gflops), 0) FROM providers WHERE online = 1),"
                  " (SELECT COUNT(*) FROM jobs),"
                  " (SELECT COUNT(*) FROM jobs WHERE status = 'running'),"
                  " (SELECT COALESCE(SUM(amount), 0) FROM usage WHERE state != 'reversed'),"
                  " (SELECT COUNT(*) FROM usage WHERE state != 'reversed')",
                  NULL);
    if (rc == 0) {
        rc = step(s, st);
        if (rc > 0) {
            out->providers = sqlite3_column_int64(st, 0);
            out->providers_online = sqlite3_column_int64(st, 1);
            out->gflops_online = sqlite3_column_double(st, 2);
            out->jobs = sqlite3_column_int64(st, 3);
            out->jobs_running = sqlite3_column_int64(st, 4);
            out->credits_moved = sqlite3_column_int64(st, 5);
            out->steps_paid = sqlite3_column_int64(st, 6);
            rc = AR_OK;
        } else if (rc == 0) {
            rc = ar_fail(AR_EINTERNAL, "db: the totals query gave no row");
        }
        done(s, st);
    }
    unlock(s);
    return rc;
}

static int earning_row(sqlite3_stmt *st, void *item)
{
    ar_earning *e = item;
    e->provider_id = sqlite3_column_int64(st, 0);
    e->time = sqlite3_column_int64(st, 1);
    e->amount = sqlite3_column_int64(st, 2);
    e->steps = sqlite3_column_int64(st, 3);
    return AR_OK;
}

int ar_store_provider_earnings(ar_store *s, int64_t account_id, ar_earning **out, size_t *n)
{
    return list_rows(s, sizeof **out, earning_row, NULL, (void **)out, n,
                     "SELECT u.provider_id, u.created, SUM(u.amount), COUNT(*) FROM usage u"
                     " JOIN providers p ON p.id = u.provider_id WHERE p.account_id = ? AND u.state != 'reversed'"
                     " GROUP BY u.provider_id, u.created ORDER BY u.provider_id, u.created",
                     "i", account_id);
}

/* ---- leases ------------------------------------------------------------------------- */

int ar_store_lease_create(ar_store *s, int64_t job_id, int64_t renter_id,
                          const ar_lease_member *members, size_t n_members, int64_t est_steps,
                          int64_t max_credits, const ar_lease_plan *plan, char token_out[AR_TOKEN_LEN],
                          int64_t *lease_id_out, int64_t *estimate_out)
{
    if (n_members == 0 || !members)
        return ar_fail(AR_EINVAL, "a lease needs at least one provider");
    if (est_steps < 0 || max_credits < 0)
        return ar_fail(AR_EINVAL, "negative step estimate or max credits");
    for (size_t i = 0; i < n_members; i++)
        for (size_t k = 0; k < i; k++)
            if (members[k].stage == members[i].stage)
                return ar_fail(AR_EINVAL, "stage %d leased twice", members[i].stage);
    /* the rule that prices every plan (rules.h), so the estimate is the quote */
    int64_t per_step = 0, estimate = 0;
    int rc = ar_rules_price_plan(members, n_members, est_steps, &per_step, &estimate);
    if (rc < 0)
        return rc;

    char token[AR_TOKEN_LEN], hash[AR_TOKEN_LEN];
    rc = token_new(token, hash);
    if (rc < 0)
        return rc;
    lock(s);
    if ((rc = tx_begin(s)) < 0)
        goto out;
    job_money job = {0};
    rc = job_money_get(s, job_id, &job);
    if (rc == 0 && job.renter_id != renter_id)
        rc = ar_fail(AR_EINVAL, "job %" PRId64 " does not belong to account %" PRId64, job_id,
                     renter_id);
    int64_t balance = 0;
    if (rc == 0)
        rc = balance_of(s, renter_id, &balance, NULL);
    /* the budget: the balance, the lease's cap, and what the job may still spend */
    if (rc == 0 && estimate > balance)
        rc = ar_fail(AR_ELIMIT,
                     "lease refused: estimated cost %.6f credits (%" PRId64
                     " steps x %.6f per step) exceeds the balance of %.6f credits",
                     credits(estimate), est_steps, credits(per_step), credits(balance));
    if (rc == 0 && max_credits > 0 && estimate > max_credits)
        rc = ar_fail(AR_ELIMIT,
                     "lease refused: estimated cost %.6f credits (%" PRId64
                     " steps x %.6f per step) exceeds max credits %.6f",
                     credits(estimate), est_steps, credits(per_step), credits(max_credits));
    if (rc == 0 && job.max_credits > 0 && estimate > job.max_credits - job.spent)
        rc = ar_fail(AR_ELIMIT,
                     "lease refused: estimated cost %.6f credits (%" PRId64
                     " steps x %.6f per step) exceeds the %.6f credits job %" PRId64
                     " may still spend",
                     credits(estimate), est_steps, credits(per_step),
                     credits(job.max_credits - job.spent), job_id);
    for (size_t i = 0; rc == 0 && i < n_members; i++) {
        int64_t online;
        rc = query_i64(s, &online, "SELECT online FROM providers WHERE id = ?", "i",
                       members[i].provider_id);
        if (rc == AR_ENOTFOUND)
            rc = ar_fail(rc, "no provider %" PRId64, members[i].provider_id);
        else if (rc == 0 && !online)
            rc = ar_fail(AR_EINVAL, "provider %" PRId64 " is offline", members[i].provider_id);
    }
    if (rc == 0)
        rc = run(s, NULL,
                 "INSERT INTO leases (job_id, token_hash, estimate, created, spec, mb_rows, micro_batches, schedule)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 "itiitiii", job_id, hash, estimate, now_s(), plan ? plan->spec : NULL,
                 (int64_t)(plan ? plan->mb_rows : 0), (int64_t)(plan ? plan->micro_batches : 0),
                 (int64_t)(plan ? plan->schedule : 0));
    int64_t lease_id = sqlite3_last_insert_rowid(s->db);
    for (size_t i = 0; rc == 0 && i < n_members; i++)
        rc = run(s, NULL,
                 "INSERT INTO lease_members (lease_id, provider_id, stage, flops_per_step,"
                 " price_per_tflop, first_unit, last_unit) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 "iiiiiii", lease_id, members[i].provider_id, (int64_t)members[i].stage,
                 members[i].flops_per_step, members[i].price_per_tflop, (int64_t)members[i].first_unit,
                 (int64_t)members[i].last_unit);
    rc = tx_end(s, rc);
    if (rc == 0) {
        memcpy(token_out, token, AR_TOKEN_LEN);
        if (lease_id_out)
            *lease_id_out = lease_id;
    }
    if (estimate_out)
        *estimate_out = estimate; /* also on refusal: the caller may show it */
out:
    unlock(s);
    OPENSSL_cleanse(token, sizeof token);
    return rc;
}

static int lease_row(sqlite3_stmt *st, void *item)
{
    ar_lease *l = item;
    memset(l, 0, sizeof *l);
    l->id = sqlite3_column_int64(st, 0);
    l->job_id = sqlite3_column_int64(st, 1);
    l->renter_id = sqlite3_column_int64(st, 2);
    l->created = sqlite3_column_int64(st, 3);
    l->released = sqlite3_column_int(st, 4) != 0;
    l->estimate = sqlite3_column_int64(st, 5);
    l->has_plan = sqlite3_column_int(st, 6) != 0;
    l->mb_rows = sqlite3_column_int(st, 7);
    l->micro_batches = sqlite3_column_int(st, 8);
    l->schedule = sqlite3_column_int(st, 9);
    l->plan = sqlite3_column_int64(st, 10);
    return AR_OK;
}

static int lease_read(ar_store *s, int64_t lease_id, ar_lease *out)
{
    int rc = one_row(s, lease_row, out,
                     "SELECT l.id, l.job_id, j.renter_id, l.created, l.released IS NOT NULL,"
                     " l.estimate, l.spec IS NOT NULL, l.mb_rows, l.micro_batches, l.schedule, l.plan"
                     " FROM leases l JOIN jobs j ON j.id = l.job_id WHERE l.id = ?",
                     "i", lease_id);
    return rc == AR_ENOTFOUND ? ar_fail(rc, "no lease %" PRId64, lease_id) : rc;
}

int ar_store_lease_auth(ar_store *s, const char *token, ar_lease *out)
{
    int64_t id;
    s = reads(s);
    lock(s);
    int rc = token_lookup(
        s, "SELECT id, token_hash FROM leases WHERE token_hash = ? AND released IS NULL", token,
        &id);
    if (rc == 0)
        rc = lease_read(s, id, out);
    unlock(s);
    return rc;
}

int ar_store_lease_get(ar_store *s, int64_t lease_id, ar_lease *out)
{
    lock(s);
    int rc = lease_read(s, lease_id, out);
    unlock(s);
    return rc;
}

static int text_row(sqlite3_stmt *st, void *item)
{
    char **out = item;
    const unsigned char *t = sqlite3_column_text(st, 0);
    if (t && !(*out = strdup((const char *)t)))
        return ar_fail(AR_ENOMEM, "db: out of memory for a text");
    return AR_OK;
}

int ar_store_lease_spec(ar_store *s, int64_t lease_id, char **out)
{
    *out = NULL;
    lock(s);
    int rc = one_row(s, text_row, out, "SELECT spec FROM leases WHERE id = ?", "i", lease_id);
    unlock(s);
    return rc == AR_ENOTFOUND ? ar_fail(rc, "no lease %" PRId64, lease_id) : rc;
}

/* A lease's members by stage, each read by member_row. */
#define MEMBERS_SQL                                                                                \
    "SELECT provider_id, stage, flops_per_step, price_per_tflop, first_unit, last_unit, verified_step" \
    " FROM lease_members WHERE lease_id = ? ORDER BY stage"

static int member_row(sqlite3_stmt *st, void *item)
{
    ar_lease_member *m = item;
    m->provider_id = sqlite3_column_int64(st, 0);
    m->stage = sqlite3_column_int(st, 1);
    m->flops_per_step = sqlite3_column_int64(st, 2);
    m->price_per_tflop = sqlite3_column_int64(st, 3);
    m->first_unit = sqlite3_column_int(st, 4);
    m->last_unit = sqlite3_column_int(st, 5);
    m->verified_step = sqlite3_column_int64(st, 6);
    return AR_OK;
}

int ar_store_lease_members(ar_store *s, int64_t lease_id, ar_lease_member **out, size_t *n)
{
    return list_rows(s, sizeof **out, member_row, NULL, (void **)out, n, MEMBERS_SQL, "i", lease_id);
}

int ar_store_lease_release(ar_store *s, int64_t lease_id)
{
    int changes = 0;
    lock(s);
    int rc = run(s, &changes,
                 "UPDATE leases SET released = COALESCE(released, ?) WHERE id = ?", "ii", now_s(),
                 lease_id);
    unlock(s);
    if (rc == 0 && changes != 1)
        rc = ar_fail(AR_ENOTFOUND, "no lease %" PRId64, lease_id);
    return rc;
}

/* ---- tickets ------------------------------------------------------------------------ */

int ar_store_ticket_derive(const char *lease_token, int64_t lease_id, int64_t provider_id,
                           char ticket_out[AR_TOKEN_LEN])
{
    if (!lease_token || strlen(lease_token) != AR_TOKEN_LEN - 1)
        return ar_fail(AR_EINVAL, "a ticket needs the lease token");
    /* what the ticket is for, in a fixed layout: a ticket of one (lease,
     * provider) pair says nothing about another's */
    static const char label[16] = {'a', 'r', 'c', 'e', 'u', 's', ' ', 't', 'i', 'c', 'k', 'e', 't', ' ', 'v', '1'};
    unsigned char msg[32];
    memcpy(msg, label, sizeof label);
    for (int i = 0; i < 8; i++) {
        msg[16 + i] = (unsigned char)((uint64_t)lease_id >> (8 * i));
        msg[24 + i] = (unsigned char)((uint64_t)provider_id >> (8 * i));
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (!HMAC(EVP_sha256(), lease_token, AR_TOKEN_LEN - 1, msg, sizeof msg, md, &len) || len != 32)
        return ar_fail(AR_EINTERNAL, "HMAC-SHA256 failed");
    to_hex(md, 32, ticket_out);
    OPENSSL_cleanse(md, sizeof md);
    return AR_OK;
}

int ar_store_ticket_issue(ar_store *s, int64_t lease_id, int64_t provider_id, const char *lease_token,
                          char ticket_out[AR_TOKEN_LEN])
{
    char ticket[AR_TOKEN_LEN], hash[AR_TOKEN_LEN];
    int rc = ar_store_ticket_derive(lease_token, lease_id, provider_id, ticket);
    if (rc < 0 || (rc = token_hash(ticket, hash)) < 0)
        goto out;
    lock(s);
    if ((rc = tx_begin(s)) < 0) {
        unlock(s);
        goto out;
    }
    /* only the holder of this lease's token gets tickets for it, and only for
     * a member of it */
    int64_t lid = 0, member = 0;
    rc = token_lookup(s, "SELECT id, token_hash FROM leases WHERE token_hash = ? AND released IS NULL",
                      lease_token, &lid);
    if (rc == 0 && lid != lease_id)
        rc = ar_fail(AR_ENOTFOUND, "the lease token is not lease %" PRId64 "'s", lease_id);
    if (rc == 0)
        rc = query_i64(s, &member, "SELECT COUNT(*) FROM lease_members WHERE lease_id = ? AND provider_id = ?", "ii",
                       lease_id, provider_id);
    if (rc == 0 && !member)
        rc = ar_fail(AR_ENOTFOUND, "provider %" PRId64 " is not in lease %" PRId64, provider_id, lease_id);
    if (rc == 0)
        rc = run(s, NULL,
                 "INSERT OR REPLACE INTO lease_tickets (lease_id, provider_id, ticket_hash, created)"
                 " VALUES (?, ?, ?, ?)",
                 "iiti", lease_id, provider_id, hash, now_s());
    rc = tx_end(s, rc);
    unlock(s);
    if (rc == 0)
        memcpy(ticket_out, ticket, AR_TOKEN_LEN);
out:
    OPENSSL_cleanse(ticket, sizeof ticket);
    return rc;
}

int ar_store_ticket_auth(ar_store *s, const char *ticket, int64_t *lease_id, int64_t *provider_id)
{
    int64_t row = 0;
    lock(s);
    /* the ticket's lease must be live and the provider still one of its
     * members (a member replaced after a loss holds a dead ticket) */
    int rc = token_lookup(s,
                          "SELECT t.rowid, t.ticket_hash FROM lease_tickets t"
                          " JOIN leases l ON l.id = t.lease_id"
                          " JOIN lease_members m ON m.lease_id = t.lease_id AND m.provider_id = t.provider_id"
                          " WHERE t.ticket_hash = ? AND l.released IS NULL",
                          ticket, &row);
    if (rc == 0)
        rc = query_i64(s, lease_id, "SELECT lease_id FROM lease_tickets WHERE rowid = ?", "i", row);
    if (rc == 0)
        rc = query_i64(s, provider_id, "SELECT provider_id FROM lease_tickets WHERE rowid = ?", "i", row);
    unlock(s);
    return rc == AR_ENOTFOUND ? ar_fail(rc, "unknown ticket, or its lease was released or its provider left it") : rc;
}

/* ---- usage ------------------------------------------------------------------------- */

static int provider_account(ar_store *s, int64_t provider_id, int64_t *account_id)
{
    int rc = query_i64(s, account_id, "SELECT account_id FROM providers WHERE id = ?", "i",
                       provider_id);
    return rc == AR_ENOTFOUND ? ar_fail(rc, "no provider %" PRId64, provider_id) : rc;
}

/* A payment escrow holds (or held), as the settling code reads it. */
typedef struct {
    int64_t id, job_id, step, amount, payee, renter;
} held_row;

static int held_read(sqlite3_stmt *st, void *item)
{
    held_row *h = item;
    h->id = sqlite3_column_int64(st, 0);
    h->job_id = sqlite3_column_int64(st, 1);
    h->step = sqlite3_column_int64(st, 2);
    h->amount = sqlite3_column_int64(st, 3);
    h->payee = sqlite3_column_int64(st, 4);
    h->renter = sqlite3_column_int64(st, 5);
    return AR_OK;
}

#define HELD_COLS "u.id, u.job_id, u.step, u.amount, p.account_id, j.renter_id"
#define HELD_FROM " FROM usage u JOIN providers p ON p.id = u.provider_id JOIN jobs j ON j.id = u.job_id"

/* The rows a query (HELD_COLS HELD_FROM ...) selects, read whole before any
 * of them is changed; lock held, inside a transaction. */
static int held_rows(ar_store *s, held_row **out, size_t *n, const char *sql, const char *types, ...)
{
    *out = NULL;
    *n = 0;
    size_t cap = 0;
    sqlite3_stmt *st;
    va_list ap;
    va_start(ap, types);
    int rc = vprep(s, &st, sql, types, ap);
    va_end(ap);
    while (rc == 0 && (rc = step(s, st)) > 0)
        if ((rc = grow((void **)out, &cap, *n, sizeof **out)) == 0)
            rc = held_read(st, &(*out)[(*n)++]);
    if (st)
        done(s, st);
    if (rc < 0) {
        free(*out);
        *out = NULL;
        *n = 0;
    }
    return rc < 0 ? rc : AR_OK;
}

/* Escrow gives a held payment back to the renter: the work is not paid
 * (its provider was lost and the step redone by another, or an audit
 * caught it). Lock held, inside a transaction. */
static int held_reverse(ar_store *s, const held_row *h)
{
    int rc = h->amount > 0 ? transfer(s, s->escrow_id, h->renter, h->amount, "reversal", h->job_id, h->step, NULL) : 0;
    if (rc == 0)
        rc = run(s, NULL, "UPDATE usage SET state = 'reversed', settled = ? WHERE id = ?", "ii", now_s(), h->id);
    if (rc == 0)
        rc = run(s, NULL, "UPDATE jobs SET spent = spent - ? WHERE id = ?", "ii", h->amount, h->job_id);
    return rc;
}

/* Escrow pays a held payment out to its provider: the work stands. Work
 * paid by another account raises the provider account's reliability (work
 * it paid itself proves nothing), unless an audit ever caught it. */
static int held_release(ar_store *s, const held_row *h)
{
    int rc = h->amount > 0 ? transfer(s, s->escrow_id, h->payee, h->amount, "release", h->job_id, h->step, NULL) : 0;
    if (rc == 0)
        rc = run(s, NULL, "UPDATE usage SET state = 'released', settled = ? WHERE id = ?", "ii", now_s(), h->id);
    if (rc == 0 && h->payee != h->renter)
        rc = run(s, NULL,
                 "UPDATE accounts SET reliability = 1.0 - (1.0 - reliability) * ? WHERE id = ? AND NOT EXISTS"
                 " (SELECT 1 FROM audit_failures f JOIN providers q ON q.id = f.provider_id"
                 "  WHERE q.account_id = accounts.id)",
                 "di", AR_RELIABILITY_GROWTH, h->payee);
    return rc;
}

/* Reverses or releases every row of a list (lock held, in a transaction). */
static int held_settle_all(ar_store *s, const held_row *rows, size_t n, bool release, int64_t *sum)
{
    int rc = AR_OK;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        rc = release ? held_release(s, &rows[i]) : held_reverse(s, &rows[i]);
        if (sum)
            *sum += rows[i].amount;
    }
    return rc;
}

/* Pays one stage of one step (the policy at the top of this file): inside a
 * write transaction, lock held. *cost_out gets the cost of the work,
 * *reversed_out counts the contested payments this redo reverses. On
 * AR_ELIMIT nothing of this stage has been written. */
static int usage_pay(ar_store *s, int64_t job_id, int64_t lease_id, int64_t plan, int64_t stepno,
                     int64_t provider_id, int stage, int64_t flops, int64_t price_per_tflop,
                     ar_usage_result *result_out, int64_t *cost_out, int *reversed_out)
{
    *reversed_out = 0;
    if (stepno < 0 || stage < 0)
        return ar_fail(AR_EINVAL, "bad step %" PRId64 " or stage %d", stepno, stage);
    int64_t cost = 0;
    int rc = ar_flops_cost(flops, price_per_tflop, &cost);
    if (rc < 0)
        return rc;
    job_money job = {0};
    rc = job_money_get(s, job_id, &job);
    int64_t payee = 0, paid = 0;
    if (rc == 0)
        rc = provider_account(s, provider_id, &payee);
    /* paid once per (lease, plan, step, stage, provider) */
    if (rc == 0)
        rc = query_i64(s, &paid,
                       "SELECT COUNT(*) FROM usage WHERE job_id = ? AND lease_id IS NULLIF(?, 0) AND plan = ?"
                       " AND step = ? AND stage = ? AND provider_id = ? AND state != 'reversed'",
                       "iiiiii", job_id, lease_id > 0 ? lease_id : (int64_t)0, plan, stepno, (int64_t)stage,
                       provider_id);
    if (rc < 0)
        return rc;
    *cost_out = cost;
    if (paid) {
        *result_out = AR_USAGE_DUP; /* paid already: write nothing */
        return AR_OK;
    }
    /* a lost provider's contested payments for this step, whose work this
     * stage has taken over: the step is redone and paid to someone else */
    held_row *back = NULL;
    size_t n_back = 0;
    int64_t refund = 0;
    rc = held_rows(s, &back, &n_back,
                   "SELECT " HELD_COLS HELD_FROM " WHERE u.job_id = ? AND u.step = ? AND u.state = 'contested'"
                   " AND u.provider_id != ? AND (u.taken_stage = -1 OR u.taken_stage = ?) ORDER BY u.id",
                   "iiii", job_id, stepno, provider_id, (int64_t)stage);
    for (size_t i = 0; rc == 0 && i < n_back; i++)
        refund += back[i].amount;
    int64_t new_spent = job.spent - refund + cost;
    /* checked before anything is written, like the balance in transfer() */
    if (rc == 0 && job.max_credits > 0 && new_spent > job.max_credits)
        rc = ar_fail(AR_ELIMIT, "job %" PRId64 " would spend %.6f credits, more than its max of %.6f", job_id,
                     credits(new_spent), credits(job.max_credits));
    if (rc == 0)
        rc = held_settle_all(s, back, n_back, false, NULL);
    free(back);
    if (rc < 0)
        return rc;
    *reversed_out = (int)n_back;
    *result_out = AR_USAGE_PAID;
    int64_t tid = 0;
    if (cost > 0)
        rc = transfer(s, job.renter_id, s->escrow_id, cost, "usage", job_id, stepno, &tid);
    if (rc == 0) {
        sqlite3_stmt *ins;
        rc = prep(s, &ins,
                  "INSERT INTO usage (job_id, lease_id, plan, step, stage, provider_id, flops, amount,"
                  " transfer_id, state, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'held', ?)",
                  "i", job_id);
        if (rc == 0) {
            int brc = lease_id > 0 ? sqlite3_bind_int64(ins, 2, lease_id) : sqlite3_bind_null(ins, 2);
            int64_t vals[] = {plan, stepno, stage, provider_id, flops, cost};
            for (int k = 0; brc == SQLITE_OK && k < 6; k++)
                brc = sqlite3_bind_int64(ins, 3 + k, vals[k]);
            if (brc == SQLITE_OK)
                brc = tid ? sqlite3_bind_int64(ins, 9, tid) : sqlite3_bind_null(ins, 9);
            if (brc == SQLITE_OK)
                brc = sqlite3_bind_int64(ins, 10, now_s());
            rc = brc == SQLITE_OK ? step(s, ins) : db_fail(s, "bind usage row");
            done(s, ins);
        }
    }
    int64_t usage_id = rc == 0 ? sqlite3_last_insert_rowid(s->db) : 0;
    if (rc == 0)
        rc = run(s, NULL, "UPDATE jobs SET spent = spent + ?, last_paid = ? WHERE id = ?", "iii", cost, now_s(),
                 job_id);
    /* work its member's audits already verified (a late report) is the
     * provider's at once */
    int64_t verified = -1;
    if (rc == 0 && lease_id > 0) {
        rc = query_i64(s, &verified, "SELECT verified_step FROM lease_members WHERE lease_id = ? AND provider_id = ?",
                       "ii", lease_id, provider_id);
        if (rc == AR_ENOTFOUND) {
            rc = AR_OK;
            verified = -1;
        }
    }
    if (rc == 0 && stepno <= verified) {
        held_row h = {.id = usage_id, .job_id = job_id, .step = stepno, .amount = cost, .payee = payee,
                      .renter = job.renter_id};
        rc = held_release(s, &h);
    }
    return rc;
}

int ar_store_usage_record(ar_store *s, int64_t job_id, int64_t stepno, int64_t provider_id,
                          int stage, int64_t flops, int64_t price_per_tflop,
                          ar_usage_result *result_out)
{
    ar_usage_result result = AR_USAGE_PAID;
    int64_t cost = 0, lease_id = 0, plan = 0;
    int reversed = 0;
    lock(s);
    int rc = tx_begin(s);
    if (rc == 0) {
        /* the job's latest lease and its plan, if it has one */
        rc = query_i64(s, &lease_id, "SELECT id FROM leases WHERE job_id = ? ORDER BY id DESC LIMIT 1", "i", job_id);
        if (rc == 0)
            rc = query_i64(s, &plan, "SELECT plan FROM leases WHERE id = ?", "i", lease_id);
        if (rc == AR_ENOTFOUND)
            rc = AR_OK;
        if (rc == 0)
            rc = usage_pay(s, job_id, lease_id, plan, stepno, provider_id, stage, flops, price_per_tflop, &result,
                           &cost, &reversed);
        rc = tx_end(s, rc);
    }
    unlock(s);
    if (rc == 0 && result_out)
        *result_out = result;
    return rc;
}

/* The stages of a step, paid in order inside the step's transaction. Each
 * stage runs in a savepoint: a stage refused for money (AR_ELIMIT) is undone
 * alone and ends the step, the stages before it stay paid. */
static int step_pay(ar_store *s, const ar_lease *lease, const ar_step_report *r, const int64_t *prices,
                    const int64_t *flops, ar_step_settlement *out)
{
    for (size_t i = 0; i < r->n_stages; i++) {
        const ar_stage_usage *u = &r->stages[i];
        ar_usage_result res = AR_USAGE_PAID;
        int64_t cost = 0;
        int reversed = 0;
        int rc = exec_sql(s, "SAVEPOINT stage", "savepoint");
        if (rc < 0)
            return rc;
        rc = usage_pay(s, lease->job_id, lease->id, lease->plan, r->step, u->provider_id, u->stage, flops[i],
                       prices[i], &res, &cost, &reversed);
        if (rc == AR_ELIMIT) {
            char why[512];
            snprintf(why, sizeof why, "%s", ar_last_error());
            int undo = exec_sql(s, "ROLLBACK TO stage", "roll back a stage");
            if (undo == 0)
                undo = exec_sql(s, "RELEASE stage", "release a stage");
            return undo < 0 ? undo : ar_fail(AR_ELIMIT, "%s", why);
        }
        if (rc == 0)
            rc = exec_sql(s, "RELEASE stage", "release a stage");
        if (rc < 0)
            return rc;
        if (res != AR_USAGE_DUP)
            out->paid += cost;
        out->duplicates += res == AR_USAGE_DUP;
        out->reversed += reversed;
    }
    return AR_OK;
}

typedef struct {
    const ar_step_report *r;
    ar_step_check check;
    void *ctx;
    int64_t *prices, *flops;
    ar_step_settlement *out;
    bool short_of_money; /* a stage was refused for money: refusal says why */
    char refusal[512];
} settle_write;

/* The step's transaction (a group commit's savepoint): what
 * ar_store_step_settle promises. */
static int settle_body(ar_store *s, void *arg)
{
    settle_write *w = arg;
    const ar_step_report *r = w->r;
    ar_step_settlement *out = w->out;
    ar_lease_member *members = NULL;
    size_t n_members = 0, cap = 0;
    ar_lease lease;
    int rc = lease_read(s, r->lease_id, &lease);
    if (rc == 0 && lease.released)
        rc = ar_fail(AR_ENOTFOUND, "lease %" PRId64 " was released", r->lease_id);
    sqlite3_stmt *st = NULL;
    if (rc == 0)
        rc = prep(s, &st, MEMBERS_SQL, "i", r->lease_id);
    while (rc == 0 && (rc = step(s, st)) > 0)
        if ((rc = grow((void **)&members, &cap, n_members, sizeof *members)) == 0)
            rc = member_row(st, &members[n_members++]);
    done(s, st);
    /* every stage is checked before any is paid */
    if (rc == 0)
        rc = w->check(w->ctx, members, n_members, r->stages, r->n_stages, w->prices, w->flops);
    free(members);
    if (rc == 0)
        rc = step_pay(s, &lease, r, w->prices, w->flops, out);
    /* a stage refused for money ends the step short: what was paid before it
     * is committed, the step is not counted as done */
    if (rc == AR_ELIMIT) {
        w->short_of_money = true;
        snprintf(w->refusal, sizeof w->refusal, "%s", ar_last_error());
        rc = AR_OK;
    }
    /* the commitments of the stages paid for: the first report stands, so a
     * renter cannot rewrite what a provider committed */
    for (size_t i = 0; rc == 0 && !w->short_of_money && i < r->n_stages; i++) {
        const ar_stage_usage *u = &r->stages[i];
        if (!u->has_digests)
            continue;
        char hex[2 * AR_STAGE_DIGEST_BYTES + 1];
        for (int k = 0; k < AR_STAGE_DIGEST_BYTES / 32; k++)
            ar_digest_hex(u->digests + 32 * k, hex + 64 * k);
        rc = run(s, NULL, "INSERT OR IGNORE INTO stage_digests (job_id, step, stage, provider_id, digests)"
                 " VALUES (?, ?, ?, ?, ?)", "iiiit", lease.job_id, r->step, (int64_t)u->stage, u->provider_id, hex);
    }
    if (rc == 0 && !w->short_of_money && r->has_loss && isfinite(r->loss))
        rc = run(s, NULL, "INSERT OR REPLACE INTO job_progress (job_id, step, loss, created) VALUES (?, ?, ?, ?)",
                 "iidi", lease.job_id, r->step, r->loss, now_s());
    if (rc == 0 && !w->short_of_money)
        rc = run(s, NULL, "UPDATE jobs SET status = ?, step = ?, ended = NULL WHERE id = ?", "tii",
                 ar_job_status_name(AR_JOB_RUNNING), r->step + 1, lease.job_id);
    if (rc == 0)
        rc = query_i64(s, &out->spent, "SELECT spent FROM jobs WHERE id = ?", "i", lease.job_id);
    if (rc == 0)
        rc = balance_of(s, lease.renter_id, &out->balance, NULL);
    return rc;
}

int ar_store_step_settle(ar_store *s, const ar_step_report *r, ar_step_check check, void *ctx,
                         ar_step_settlement *out)
{
    memset(out, 0, sizeof *out);
    if (r->step < 0 || r->n_stages == 0 || !r->stages || !check)
        return ar_fail(AR_EINVAL, "a step report needs a step >= 0 (not %" PRId64 "), stages and a check",
                       r->step);
    int64_t *prices = calloc(2 * r->n_stages, sizeof *prices), *flops = prices + r->n_stages;
    if (!prices)
        return ar_fail(AR_ENOMEM, "out of memory for %zu stages", r->n_stages);
    settle_write w = {.r = r, .check = check, .ctx = ctx, .prices = prices, .flops = flops, .out = out};
    int rc = group_write(s, settle_body, &w);
    if (rc == 0 && w.short_of_money)
        rc = ar_fail(AR_ELIMIT, "%s", w.refusal);
    free(prices);
    return rc;
}

/* The lost member's verified step (-1 when none): lock held. */
static int member_verified_step(ar_store *s, int64_t lease_id, int64_t provider_id, int64_t *out)
{
    int rc = query_i64(s, out, "SELECT verified_step FROM lease_members WHERE lease_id = ? AND provider_id = ?",
                       "ii", lease_id, provider_id);
    return rc == AR_ENOTFOUND ? ar_fail(rc, "provider %" PRId64 " is not in lease %" PRId64, provider_id, lease_id)
                              : rc;
}

/* The members of a re-plan: stages 0..n-1 in order, each a provider of the
 * lease once, with units and FLOPs. */
static int replan_ok(const ar_lease_member *m, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (m[i].stage != (int)i || m[i].flops_per_step < 0 || m[i].first_unit < 0 || m[i].last_unit <= m[i].first_unit)
            return ar_fail(AR_EINVAL, "re-plan: member %zu (stage %d, units %d-%d) out of order or range", i,
                           m[i].stage, m[i].first_unit, m[i].last_unit);
        for (size_t k = 0; k < i; k++)
            if (m[k].provider_id == m[i].provider_id)
                return ar_fail(AR_EINVAL, "re-plan: provider %" PRId64 " placed twice", m[i].provider_id);
    }
    return AR_OK;
}

int ar_store_lease_replace(ar_store *s, int64_t lease_id, int64_t lost_provider_id, int64_t kept_steps,
                           const ar_lease_member *replacement, const ar_lease_member *replan, size_t n_replan,
                           int *contested_out)
{
    if (kept_steps < 0)
        return ar_fail(AR_EINVAL, "kept steps %" PRId64 " below zero", kept_steps);
    if (!replacement && n_replan > 0 && replan_ok(replan, n_replan) != AR_OK)
        return AR_EINVAL;
    lock(s);
    int rc = tx_begin(s);
    if (rc < 0)
        goto out;
    ar_lease lease;
    int64_t stage = 0, verified = -1, lost_account = 0;
    rc = lease_read(s, lease_id, &lease);
    if (rc == 0 && lease.released)
        rc = ar_fail(AR_ENOTFOUND, "no live lease %" PRId64, lease_id);
    if (rc == 0) {
        rc = query_i64(s, &stage, "SELECT stage FROM lease_members WHERE lease_id = ? AND provider_id = ?",
                       "ii", lease_id, lost_provider_id);
        if (rc == AR_ENOTFOUND)
            rc = ar_fail(rc, "provider %" PRId64 " is not in lease %" PRId64, lost_provider_id, lease_id);
    }
    if (rc == 0)
        rc = member_verified_step(s, lease_id, lost_provider_id, &verified);
    if (rc == 0)
        rc = provider_account(s, lost_provider_id, &lost_account);
    /* the loss counts against the account until it proves itself again */
    if (rc == 0)
        rc = run(s, NULL, "UPDATE providers SET online = 0 WHERE id = ?", "i", lost_provider_id);
    if (rc == 0)
        rc = run(s, NULL, "UPDATE accounts SET reliability = reliability * ? WHERE id = ?", "di",
                 AR_RELIABILITY_AFTER_LOSS, lost_account);
    if (rc == 0)
        rc = run(s, NULL, "UPDATE accounts SET confirmed_claims = confirmed_claims + 1 WHERE id = ?", "i",
                 lease.renter_id);
    /* its work after the checkpoint and after what audits verified is
     * contested: reversed only when redone and paid to someone else */
    int contested = 0;
    if (rc == 0)
        rc = run(s, &contested,
                 "UPDATE usage SET state = 'contested', taken_stage = ? WHERE job_id = ? AND provider_id = ?"
                 " AND state = 'held' AND step >= ? AND step > ?",
                 "iiiii", replacement ? stage : (int64_t)-1, lease.job_id, lost_provider_id, kept_steps, verified);
    if (rc == 0 && replacement) {
        rc = run(s, NULL,
                 "UPDATE lease_members SET provider_id = ?, price_per_tflop = ?, verified_step = -1"
                 " WHERE lease_id = ? AND stage = ?",
                 "iiii", replacement->provider_id, replacement->price_per_tflop, lease_id, stage);
    } else if (rc == 0) {
        /* a new plan over those left: each keeps its verified step */
        int64_t *kept_verified = calloc(n_replan ? n_replan : 1, sizeof *kept_verified);
        if (!kept_verified)
            rc = ar_fail(AR_ENOMEM, "out of memory for a re-plan");
        for (size_t i = 0; rc == 0 && i < n_replan; i++) {
            rc = member_verified_step(s, lease_id, replan[i].provider_id, &kept_verified[i]);
            if (rc == 0 && replan[i].provider_id == lost_provider_id)
                rc = ar_fail(AR_EINVAL, "re-plan: the lost provider %" PRId64 " is in it", lost_provider_id);
        }
        if (rc == 0)
            rc = run(s, NULL, "DELETE FROM lease_members WHERE lease_id = ?", "i", lease_id);
        for (size_t i = 0; rc == 0 && i < n_replan; i++)
            rc = run(s, NULL,
                     "INSERT INTO lease_members (lease_id, provider_id, stage, flops_per_step, price_per_tflop,"
                     " first_unit, last_unit, verified_step) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     "iiiiiiii", lease_id, replan[i].provider_id, (int64_t)replan[i].stage, replan[i].flops_per_step,
                     replan[i].price_per_tflop, (int64_t)replan[i].first_unit, (int64_t)replan[i].last_unit,
                     kept_verified[i]);
        free(kept_verified);
        if (rc == 0)
            rc = run(s, NULL, "UPDATE leases SET plan = plan + 1 WHERE id = ?", "i", lease_id);
    }
    /* the lost provider's ticket dies with its place */
    if (rc == 0)
        rc = run(s, NULL, "DELETE FROM lease_tickets WHERE lease_id = ? AND provider_id = ?", "ii", lease_id,
                 lost_provider_id);
    /* a provider lost twice in one lease (it came back as another's
     * replacement) keeps its latest settlement */
    if (rc == 0)
        rc = run(s, NULL,
                 "INSERT OR REPLACE INTO lease_replacements (lease_id, lost_provider_id, stage, kept_steps,"
                 " replacement_id, reversed, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 "iiiiiii", lease_id, lost_provider_id, stage, kept_steps,
                 replacement ? replacement->provider_id : (int64_t)0, (int64_t)contested, now_s());
    if (rc == 0 && contested_out)
        *contested_out = contested;
    rc = tx_end(s, rc);
out:
    unlock(s);
    return rc;
}

static int replacement_row(sqlite3_stmt *st, void *item)
{
    ar_lease_replacement *r = item;
    r->stage = sqlite3_column_int(st, 0);
    r->kept_steps = sqlite3_column_int64(st, 1);
    r->replacement_id = sqlite3_column_int64(st, 2);
    r->contested = sqlite3_column_int(st, 3);
    return AR_OK;
}

int ar_store_lease_replacement(ar_store *s, int64_t lease_id, int64_t lost_provider_id,
                               ar_lease_replacement *out)
{
    lock(s);
    int rc = one_row(s, replacement_row, out,
                     "SELECT stage, kept_steps, replacement_id, reversed FROM lease_replacements"
                     " WHERE lease_id = ? AND lost_provider_id = ?",
                     "ii", lease_id, lost_provider_id);
    unlock(s);
    return rc == AR_ENOTFOUND
               ? ar_fail(rc, "provider %" PRId64 " was not lost in lease %" PRId64, lost_provider_id, lease_id)
               : rc;
}

int ar_store_lease_hand_over(ar_store *s, int64_t lease_id, int64_t leaver_id, int64_t step,
                             const ar_lease_member *replacement)
{
    if (step < 0)
        return ar_fail(AR_EINVAL, "step %" PRId64 " below zero", step);
    lock(s);
    int rc = tx_begin(s);
    if (rc < 0)
        goto out;
    int64_t job_id = 0, stage = 0, leaving = 0;
    rc = query_i64(s, &job_id, "SELECT job_id FROM leases WHERE id = ? AND released IS NULL", "i", lease_id);
    if (rc == AR_ENOTFOUND)
        rc = ar_fail(rc, "no live lease %" PRId64, lease_id);
    if (rc == 0) {
        rc = query_i64(s, &stage, "SELECT stage FROM lease_members WHERE lease_id = ? AND provider_id = ?",
                       "ii", lease_id, leaver_id);
        if (rc == AR_ENOTFOUND)
            rc = ar_fail(rc, "provider %" PRId64 " is not in lease %" PRId64, leaver_id, lease_id);
    }
    /* the provider's own word, from its heartbeats, not the renter's */
    if (rc == 0)
        rc = query_i64(s, &leaving, "SELECT COUNT(*) FROM provider_leaving WHERE provider_id = ?", "i", leaver_id);
    if (rc == 0 && !leaving)
        rc = ar_fail(AR_ELIMIT, "provider %" PRId64 " has not said it is leaving: a member that stopped "
                     "answering is a loss (ReplaceProvider)", leaver_id);
    if (rc == 0)
        rc = run(s, NULL,
                 "UPDATE lease_members SET provider_id = ?, price_per_tflop = ?, verified_step = -1"
                 " WHERE lease_id = ? AND stage = ?",
                 "iiii", replacement->provider_id, replacement->price_per_tflop, lease_id, stage);
    if (rc == 0)
        rc = run(s, NULL, "DELETE FROM lease_tickets WHERE lease_id = ? AND provider_id = ?", "ii", lease_id,
                 leaver_id);
    if (rc == 0)
        rc = run(s, NULL,
                 "INSERT OR REPLACE INTO lease_handovers (lease_id, leaver_id, stage, step, replacement_id,"
                 " created) VALUES (?, ?, ?, ?, ?, ?)",
                 "iiiiii", lease_id, leaver_id, stage, step, replacement->provider_id, now_s());
    rc = tx_end(s, rc);
out:
    unlock(s);
    return rc;
}

static int handover_row(sqlite3_stmt *st, void *item)
{
    ar_lease_handover *h = item;
    h->stage = sqlite3_column_int(st, 0);
    h->step = sqlite3_column_int64(st, 1);
    h->replacement_id = sqlite3_column_int64(st, 2);
    return AR_OK;
}

int ar_store_lease_handover(ar_store *s, int64_t lease_id, int64_t leaver_id, ar_lease_handover *out)
{
    lock(s);
    int rc = one_row(s, handover_row, out,
                     "SELECT stage, step, replacement_id FROM lease_handovers WHERE lease_id = ? AND leaver_id = ?",
                     "ii", lease_id, leaver_id);
    unlock(s);
    return rc == AR_ENOTFOUND
               ? ar_fail(rc, "provider %" PRId64 " handed over no place in lease %" PRId64, leaver_id, lease_id)
               : rc;
}

int ar_store_job_resume(ar_store *s, int64_t job_id, int64_t renter_id, int64_t kept_steps,
                        ar_job_status *status_out)
{
    if (kept_steps < 0)
        return ar_fail(AR_EINVAL, "kept steps %" PRId64 " below zero", kept_steps);
    ar_job job;
    lock(s);
    int rc = tx_begin(s);
    if (rc < 0)
        goto out;
    rc = one_row(s, job_row, &job, "SELECT " JOB_COLS " FROM jobs WHERE id = ?", "i", job_id);
    if (rc == 0) {
        if (job.renter_id != renter_id)
            rc = AR_ENOTFOUND;
        if (status_out)
            *status_out = job.status;
        ar_store_job_clear(&job);
    }
    if (rc == AR_ENOTFOUND)
        rc = ar_fail(AR_ENOTFOUND, "no job %" PRId64 " of this account", job_id);
    /* the driver that held them is gone: its leases end here */
    if (rc == 0)
        rc = run(s, NULL, "UPDATE leases SET released = ? WHERE job_id = ? AND released IS NULL", "ii", now_s(),
                 job_id);
    rc = tx_end(s, rc);
out:
    unlock(s);
    return rc;
}

/* ---- escrow and audits ----------------------------------------------------------------- */

int ar_store_escrow_release(ar_store *s, int64_t now, int64_t window_s, int *released_out)
{
    if (window_s < 0)
        return ar_fail(AR_EINVAL, "escrow window %" PRId64 " s below zero", window_s);
    int64_t abandoned = window_s > AR_ESCROW_ABANDONED_S ? window_s : AR_ESCROW_ABANDONED_S;
    held_row *rows = NULL;
    size_t n = 0;
    lock(s);
    int rc = tx_begin(s);
    /* the held payments of jobs that ended and whose settling window has
     * passed, or that were abandoned (running, no payment for a long time);
     * the partial index on held payments by job keeps a sweep from reading
     * what was settled long ago (verified work is released when it is
     * verified, or paid) */
    if (rc == 0)
        rc = held_rows(s, &rows, &n,
                       "SELECT " HELD_COLS HELD_FROM
                       " WHERE u.state IN ('held', 'contested') AND u.job_id IN (SELECT id FROM jobs WHERE"
                       "  (ended IS NOT NULL AND ended + ?1 <= ?2) OR (ended IS NULL AND last_paid + ?3 <= ?2))"
                       " ORDER BY u.id",
                       "iii", window_s, now, abandoned);
    if (rc == 0)
        rc = held_settle_all(s, rows, n, true, NULL);
    rc = tx_end(s, rc);
    unlock(s);
    free(rows);
    if (rc == 0 && released_out)
        *released_out = (int)n;
    return rc;
}

int ar_store_member_verified(ar_store *s, int64_t lease_id, int64_t provider_id, int64_t step,
                             int *released_out)
{
    if (step < 0)
        return ar_fail(AR_EINVAL, "verified step %" PRId64 " below zero", step);
    held_row *rows = NULL;
    size_t n = 0;
    int changes = 0;
    lock(s);
    int rc = tx_begin(s);
    if (rc == 0)
        rc = run(s, &changes,
                 "UPDATE lease_members SET verified_step = MAX(verified_step, ?) WHERE lease_id = ? AND provider_id = ?",
                 "iii", step, lease_id, provider_id);
    if (rc == 0 && changes != 1)
        rc = ar_fail(AR_ENOTFOUND, "provider %" PRId64 " is not in lease %" PRId64, provider_id, lease_id);
    if (rc == 0)
        rc = held_rows(s, &rows, &n,
                       "SELECT " HELD_COLS HELD_FROM " WHERE u.job_id = (SELECT job_id FROM leases WHERE id = ?)"
                       " AND u.provider_id = ? AND u.state = 'held' AND u.step <= ? ORDER BY u.id",
                       "iii", lease_id, provider_id, step);
    if (rc == 0)
        rc = held_settle_all(s, rows, n, true, NULL);
    rc = tx_end(s, rc);
    unlock(s);
    free(rows);
    if (rc == 0 && released_out)
        *released_out = (int)n;
    return rc;
}

int ar_store_stage_digests(ar_store *s, int64_t job_id, int64_t at_step, int stage, int64_t provider_id,
                           uint8_t out[AR_STAGE_DIGEST_BYTES])
{
    lock(s);
    sqlite3_stmt *st = NULL;
    int rc = prep(s, &st, "SELECT digests FROM stage_digests WHERE job_id = ? AND step = ? AND stage = ? AND provider_id = ?",
                  "iiii", job_id, at_step, (int64_t)stage, provider_id);
    if (rc == 0 && (rc = step(s, st)) == 0)
        rc = ar_fail(AR_ENOTFOUND, "no digests of job %" PRId64 " step %" PRId64 " stage %d", job_id, at_step, stage);
    if (rc > 0) {
        const char *hex = (const char *)sqlite3_column_text(st, 0);
        rc = hex && strlen(hex) == 2 * AR_STAGE_DIGEST_BYTES ? AR_OK : ar_fail(AR_EFORMAT, "stored digests malformed");
        for (int i = 0; rc == AR_OK && i < AR_STAGE_DIGEST_BYTES; i++) {
            unsigned v;
            if (sscanf(hex + 2 * i, "%2x", &v) != 1)
                rc = ar_fail(AR_EFORMAT, "stored digests malformed");
            out[i] = (uint8_t)v;
        }
    }
    done(s, st); /* cached: reset, never finalized here */
    unlock(s);
    return rc;
}

int ar_store_audit_failure(ar_store *s, const ar_audit_failure *f, int64_t *returned_out)
{
    if (f->step < 0 || f->stage < 0 || !f->evidence || strlen(f->evidence) > 65536)
        return ar_fail(AR_EINVAL, "an audit failure needs a step and stage >= 0 and its evidence (at most 64 KiB)");
    held_row *rows = NULL;
    size_t n = 0;
    int64_t returned = 0, served = 0, account = 0;
    ar_lease lease;
    lock(s);
    int rc = tx_begin(s);
    if (rc == 0)
        rc = lease_read(s, f->lease_id, &lease);
    if (rc == 0)
        rc = query_i64(s, &served,
                       "SELECT (SELECT COUNT(*) FROM lease_members WHERE lease_id = ?1 AND provider_id = ?2)"
                       " + (SELECT COUNT(*) FROM usage WHERE job_id = ?3 AND provider_id = ?2)",
                       "iii", f->lease_id, f->provider_id, lease.job_id);
    if (rc == 0 && !served)
        rc = ar_fail(AR_ENOTFOUND, "provider %" PRId64 " never served lease %" PRId64, f->provider_id, f->lease_id);
    if (rc == 0)
        rc = provider_account(s, f->provider_id, &account);
    if (rc == 0)
        rc = held_rows(s, &rows, &n,
                       "SELECT " HELD_COLS HELD_FROM " WHERE u.job_id = ? AND u.provider_id = ?"
                       " AND u.state IN ('held', 'contested') ORDER BY u.id",
                       "ii", lease.job_id, f->provider_id);
    if (rc == 0)
        rc = held_settle_all(s, rows, n, false, &returned);
    if (rc == 0)
        rc = run(s, NULL,
                 "INSERT INTO audit_failures (job_id, lease_id, provider_id, step, stage, evidence, returned, created)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 "iiiiitii", lease.job_id, f->lease_id, f->provider_id, f->step, (int64_t)f->stage, f->evidence,
                 returned, now_s());
    if (rc == 0)
        rc = run(s, NULL, "UPDATE accounts SET reliability = 0 WHERE id = ?", "i", account);
    rc = tx_end(s, rc);
    unlock(s);
    free(rows);
    if (rc == 0 && returned_out)
        *returned_out = returned;
    return rc;
}

int ar_store_audit_failed(ar_store *s, int64_t job_id, int64_t provider_id, bool *out)
{
    int64_t n = 0;
    lock(s);
    int rc = query_i64(s, &n, "SELECT COUNT(*) FROM audit_failures WHERE job_id = ? AND provider_id = ?", "ii",
                       job_id, provider_id);
    unlock(s);
    *out = rc == 0 && n > 0;
    return rc;
}

/* ---- ledger ---------------------------------------------------------------------------- */

static int ledger_row(sqlite3_stmt *st, void *item)
{
    ar_ledger_row *r = item;
    memset(r, 0, sizeof *r);
    r->id = sqlite3_column_int64(st, 0);
    r->transfer_id = sqlite3_column_int64(st, 1);
    r->account_id = sqlite3_column_int64(st, 2);
    r->amount = sqlite3_column_int64(st, 3);
    copy_text(r->reason, sizeof r->reason, st, 4);
    r->job_id = sqlite3_column_int64(st, 5);
    r->step = sqlite3_column_int64(st, 6);
    r->created = sqlite3_column_int64(st, 7);
    return AR_OK;
}

int ar_store_ledger_list(ar_store *s, int64_t account_id, ar_ledger_row **out, size_t *n)
{
    return list_rows(s, sizeof **out, ledger_row, NULL, (void **)out, n,
                     "SELECT id, transfer_id, account_id, amount, reason, COALESCE(job_id, 0),"
                     " COALESCE(step, -1), created FROM ledger"
                     " WHERE ?1 <= 0 OR account_id = ?1 ORDER BY id",
                     "i", account_id);
}

int ar_store_ledger_sum(ar_store *s, int64_t *sum_out)
{
    lock(s);
    /* total() sums in floating point and would hide an overflow; SUM() of
     * integers raises one */
    int rc = query_i64(s, sum_out, "SELECT COALESCE(SUM(amount), 0) FROM ledger", NULL);
    unlock(s);
    return rc;
}

int ar_store_ledger_check(ar_store *s, int64_t *transfers_out)
{
    lock(s);
    /* one read transaction: every query sees the same snapshot */
    int rc = exec_sql(s, "BEGIN", "begin");
    if (rc < 0)
        goto out;
    int64_t v = 0;
    rc = query_i64(s, &v, "SELECT COALESCE(SUM(amount), 0) FROM ledger", NULL);
    if (rc == 0 && v != 0)
        rc = ar_fail(AR_EINTERNAL, "ledger: rows sum to %" PRId64 ", not 0", v);
    if (rc == 0) {
        rc = query_i64(s, &v,
                       "SELECT transfer_id FROM ledger GROUP BY transfer_id"
                       " HAVING COUNT(*) != 2 OR SUM(amount) != 0 LIMIT 1",
                       NULL);
        rc = rc == 0 ? ar_fail(AR_EINTERNAL, "ledger: transfer %" PRId64 " is not two rows"
                                             " that cancel", v)
             : rc == AR_ENOTFOUND ? AR_OK : rc;
    }
    if (rc == 0) {
        rc = query_i64(s, &v,
                       "SELECT t.id FROM transfers t WHERE NOT EXISTS"
                       " (SELECT 1 FROM ledger l WHERE l.transfer_id = t.id) LIMIT 1",
                       NULL);
        rc = rc == 0 ? ar_fail(AR_EINTERNAL, "ledger: transfer %" PRId64 " has no rows", v)
             : rc == AR_ENOTFOUND ? AR_OK : rc;
    }
    if (rc == 0) {
        rc = query_i64(s, &v,
                       "SELECT a.id FROM accounts a WHERE a.balance !="
                       " (SELECT COALESCE(SUM(l.amount), 0) FROM ledger l"
                       "  WHERE l.account_id = a.id) LIMIT 1",
                       NULL);
        rc = rc == 0 ? ar_fail(AR_EINTERNAL,
                               "ledger: balance of account %" PRId64 " differs from its rows", v)
             : rc == AR_ENOTFOUND ? AR_OK : rc;
    }
    if (rc == 0) {
        rc = query_i64(s, &v, "SELECT id FROM accounts WHERE id != ? AND balance < 0 LIMIT 1", "i", s->mint_id);
        rc = rc == 0 ? ar_fail(AR_EINTERNAL, "ledger: account %" PRId64 " is below zero", v)
             : rc == AR_ENOTFOUND ? AR_OK : rc;
    }
    /* escrow holds exactly the payments not yet released or reversed */
    int64_t held = 0, escrow = 0;
    if (rc == 0)
        rc = query_i64(s, &held, "SELECT COALESCE(SUM(amount), 0) FROM usage WHERE state IN ('held', 'contested')",
                       NULL);
    if (rc == 0)
        rc = balance_of(s, s->escrow_id, &escrow, NULL);
    if (rc == 0 && held != escrow)
        rc = ar_fail(AR_EINTERNAL, "ledger: escrow holds %" PRId64 " micro-credits, its payments %" PRId64, escrow,
                     held);
    int64_t count = 0;
    if (rc == 0)
        rc = query_i64(s, &count, "SELECT COUNT(*) FROM transfers", NULL);
    if (rc < 0)
        tx_rollback(s);
    else
        rc = exec_sql(s, "COMMIT", "end read");
    if (rc == 0 && transfers_out)
        *transfers_out = count;
out:
    unlock(s);
    return rc;
}
