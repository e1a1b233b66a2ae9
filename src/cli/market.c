/* arceus market / providers / ledger: the market server and its clients.
 *
 * Money is micro-credits everywhere inside; here, at the edge, it is read
 * (AR_OPTION_CREDITS) and printed as credits with 6 decimals (exact: no
 * floating point). */
#include "cli/cli.h"
#include "cli/json.h"
#include "core/core.h"
#include "market/http.h"
#include "market/store.h"
#include "net/market.h"
#include "net/relay.h"

#include <inttypes.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- arceus market ----------------------------------------------------------------- */

typedef struct {
    const char *listen, *db, *http;
    const char *relay, *relay_at, *relay_secret;
    int offline_after, max_providers, escrow_window;
    float reach_timeout;
    int adding;           /* arceus market add-account NAME */
    const char *account;  /* its NAME */
    int64_t credits;      /* micro-credits */
    unsigned given;
    ar_cli_tls tls;
} market_opts;

#define MARKET(member) AR_OPTION_AT(market_opts, member)
#define GIVEN_CREDITS 1u

static const ar_option market_options[] = {
    {.name = "listen", .kind = AR_OPTION_HOSTPORT, MARKET(listen), .metavar = "HOST:PORT",
     .help = "address to listen on, e.g. 127.0.0.1:7000"},
    {.name = "db", .kind = AR_OPTION_STRING, MARKET(db), .metavar = "PATH",
     .help = "the SQLite database file (created if missing)"},
    {.name = "http", .kind = AR_OPTION_HOSTPORT, MARKET(http), .metavar = "HOST:PORT",
     .help = "serve the dashboard there, e.g. 127.0.0.1:8080 (port 0: any)"},
    {.name = "offline-after", .kind = AR_OPTION_INT, MARKET(offline_after), .lo = 1, .hi = 86400,
     .metavar = "S", .def = AR_OPTION_STR(AR_MARKET_DEFAULT_OFFLINE_AFTER_S),
     .help = "a provider silent for S seconds is offline"},
    {.name = "max-providers-per-account", .kind = AR_OPTION_INT, MARKET(max_providers), .lo = 1,
     .hi = AR_MARKET_MAX_PROVIDERS_LIMIT, .metavar = "N", .def = AR_OPTION_STR(AR_MARKET_DEFAULT_MAX_PROVIDERS),
     .help = "providers one account may register"},
    {.name = "reach-timeout", .kind = AR_OPTION_FLOAT, MARKET(reach_timeout), .flo = 0, .fhi = 60,
     .metavar = "S", .def = "2",
     .help = "seconds the market waits for a provider's worker to answer its Hello; a worker it cannot "
             "reach is not leased (0: no checks, for a market that cannot reach its providers). A "
             "worker's address must not be link-local, multicast or unspecified, nor loopback unless the "
             "market listens on loopback, and its port must be 1024 or above"},
    {.name = "escrow-window", .kind = AR_OPTION_INT, MARKET(escrow_window), .lo = 0, .hi = 365 * 86400,
     .metavar = "S", .def = AR_OPTION_STR(AR_ESCROW_DEFAULT_WINDOW_S),
     .help = "what renters pay for a step is held in escrow, pending, until audits verify it or S seconds "
             "after its job ends; then it is the provider's to spend (0: as soon as the job ends)"},
    {.name = "relay", .kind = AR_OPTION_HOSTPORT, MARKET(relay), .metavar = "HOST:PORT",
     .help = "run a relay there, inside the market, for providers it cannot dial (behind a home router "
             "or a firewall): they keep a connection open to it and renters reach them through it. "
             "HOST is what providers and renters dial, so not 0.0.0.0"},
    {.name = "relay-at", .kind = AR_OPTION_HOSTPORT, MARKET(relay_at), .metavar = "HOST:PORT",
     .help = "use the relay run apart there (arceus relay --listen HOST:PORT), with --relay-secret"},
    {.name = "relay-secret", .kind = AR_OPTION_STRING, MARKET(relay_secret), .metavar = "FILE",
     .help = "the key the market shares with its relay (at least 32 bytes, readable by its owner only): "
             "required with --relay-at; with --relay, passes outlive a restart of the market (without it "
             "a random key is drawn at each start)"},
    {.name = "credits", .kind = AR_OPTION_CREDITS, MARKET(credits), .lo = 0,
     .hi = AR_CREDITS(1000000000000LL), .metavar = "N", .def = "0", .given_bit = GIVEN_CREDITS,
     .help = "add-account: opening credits"},
    {0},
};

/* "add-account", first and before any --listen, then its NAME */
static int market_positional(void *opts, const char *arg)
{
    market_opts *o = opts;
    if (!o->adding && !o->listen && !strcmp(arg, "add-account")) {
        o->adding = 1;
        return 0;
    }
    if (o->adding && !o->account) {
        o->account = arg;
        return 0;
    }
    return -1;
}

static int run_market(void *opts);

const ar_cmd_spec ar_market_cmd = {
    .name = "market",
    .summary = "run the market server; add-account creates an account",
    .usage = "--listen HOST:PORT --db PATH [--http HOST:PORT] [--offline-after S]\n"
             "[--max-providers-per-account N] [--reach-timeout S] [--escrow-window S]\n"
             "[--relay HOST:PORT | --relay-at HOST:PORT --relay-secret FILE]\n"
             "add-account NAME [--credits N] --db PATH",
    .description =
        "Run the market: the gRPC Market service over a SQLite database (created if missing). Providers "
        "register and send heartbeats; renters list providers and read their ledger. Every call needs an "
        "account token. Prints \"arceus market: listening on HOST:PORT\" once ready (port 0 picks a free "
        "port and prints it). SIGINT or SIGTERM stops it cleanly.\n\n"
        "--http serves the web dashboard and its JSON API (README.md): the market's overview for anyone, "
        "an account's jobs, providers and ledger for its token. Prints \"arceus market: dashboard on "
        "http://HOST:PORT/\" once ready.\n\n"
        "add-account creates an account (credits minted to it, 0 by default) and prints its token once: "
        "the database keeps only the token's hash.",
    .sections = (const ar_option_section[]){
        {NULL, market_options, 0},
        {"TLS", ar_cli_tls_server_options, offsetof(market_opts, tls)},
        {"TLS, checking its providers' workers", ar_cli_tls_client_options, offsetof(market_opts, tls)},
        {0},
    },
    .positional = market_positional,
    .given_mask = offsetof(market_opts, given),
    .opts_size = sizeof(market_opts),
    .run = run_market,
};

static int add_account(const char *name, const char *db, int64_t credits)
{
    if (!db) {
        ar_cli_error("market", "add-account needs --db PATH (the market's database)");
        return 2;
    }
    ar_store *s;
    if (ar_store_open(db, &s) != AR_OK) {
        ar_cli_error("market", "%s", ar_last_error());
        return 1;
    }
    char token[AR_TOKEN_LEN], buf[48];
    int64_t id;
    int rc = ar_store_account_create(s, name, credits, token, &id);
    ar_store_close(s);
    if (rc != AR_OK) {
        ar_cli_error("market", "add-account: %s", ar_last_error());
        return rc == AR_EINVAL ? 2 : 1;
    }
    printf("account %s created (id %lld) with %s credits\n", name, (long long)id,
           ar_credits_text(credits, buf, sizeof buf));
    printf("token: %s\n", token);
    fflush(stdout);
    fprintf(stderr, "arceus market: keep this token: it is shown only now (the market stores its hash)\n");
    memset(token, 0, sizeof token);
    return 0;
}

static int run_market(void *opts)
{
    const market_opts *o = opts;
    const char *listen = o->listen, *db = o->db, *http = o->http;
    int offline_after = o->offline_after;
    if (o->adding) {
        if (!o->account) {
            ar_cli_error("market", "add-account needs a NAME (see arceus market --help)");
            return 2;
        }
        if (listen || http) {
            ar_cli_error("market", "add-account takes no --%s", listen ? "listen" : "http");
            return 2;
        }
        return add_account(o->account, db, o->credits);
    }
    if (o->given & GIVEN_CREDITS) {
        ar_cli_error("market", "--credits goes with add-account");
        return 2;
    }
    if (!listen) {
        ar_cli_error("market", "--listen HOST:PORT is required (for example 127.0.0.1:7000)");
        return 2;
    }
    if (!db) {
        ar_cli_error("market", "--db PATH is required (the SQLite database, created if missing)");
        return 2;
    }
    if (ar_cli_tls_setup("market", &o->tls) != 0)
        return 2;
    if (o->relay && o->relay_at) {
        ar_cli_error("market", "--relay runs a relay inside the market, --relay-at names one run apart: one of them");
        return 2;
    }
    if (o->relay_at && !o->relay_secret) {
        ar_cli_error("market", "--relay-at needs --relay-secret FILE, the key the relay was started with");
        return 2;
    }
    const char *relay_addr = o->relay ? o->relay : o->relay_at;
    if (relay_addr && (!strncmp(relay_addr, "0.0.0.0:", 8) || !strncmp(relay_addr, "[::]:", 5) ||
                       relay_addr[0] == ':')) {
        ar_cli_error("market", "--relay%s %s: give the address providers and renters dial, not the wildcard",
                     o->relay ? "" : "-at", relay_addr);
        return 2;
    }
    if (relay_addr && !(o->reach_timeout > 0)) {
        ar_cli_error("market", "a relay is for providers the market cannot dial, which --reach-timeout 0 "
                               "does not check: give a reach timeout");
        return 2;
    }
    unsigned char key[AR_RELAY_KEY_BYTES];
    if (o->relay_secret && ar_relay_key_load(o->relay_secret, key) != AR_OK) {
        ar_cli_error("market", "%s", ar_last_error());
        return 2;
    }
    /* signals are taken by sigwait below, in this thread only: block them
     * before any other thread (gRPC's, the sweep) exists */
    ar_cli_block_stop_signals();
    ar_market_config c = {.listen = listen, .db_path = db, .offline_after_s = offline_after,
                          .max_providers_per_account = o->max_providers,
                          .reach_timeout_s = o->reach_timeout > 0 ? o->reach_timeout : -1,
                          .escrow_window_s = o->escrow_window,
                          .relay_listen = o->relay, .relay_at = o->relay_at,
                          .relay_key = o->relay_secret ? key : NULL};
    ar_market *m;
    char addr[200];
    int mrc = ar_market_start(&c, &m, addr, sizeof addr);
    OPENSSL_cleanse(key, sizeof key);
    if (mrc != AR_OK) {
        ar_cli_error("market", "%s", ar_last_error());
        return 1;
    }
    /* the dashboard after the market: the database exists and is migrated */
    ar_http *h = NULL;
    char haddr[300];
    int hrc = http ? ar_http_start(http, db, offline_after, &h, haddr, sizeof haddr) : AR_OK;
    if (hrc != AR_OK) {
        ar_cli_error("market", "%s", ar_last_error());
        ar_market_stop(m);
        return hrc == AR_EINVAL ? 2 : 1;
    }
    printf("arceus market: listening on %s\n", addr);
    if (ar_market_relay(m)[0])
        printf("arceus market: relay %s %s\n", o->relay ? "on" : "at", ar_market_relay(m));
    if (h)
        printf("arceus market: dashboard on http://%s/\n", haddr);
    fflush(stdout);
    ar_cli_wait_stop_signal("market");
    ar_http_stop(h);
    ar_market_stop(m);
    return 0;
}

/* ---- the market's clients: the options and steps they share --------------------------- */

typedef struct {
    ar_cli_market m;
    const char *arg; /* ledger's ACCOUNT, job's ID */
    int all;         /* providers --all */
    int json;        /* --json: one JSON document instead of the table */
    int summary;     /* ledger --summary */
    ar_cli_tls tls;
} client_opts;

#define CLIENT(member) AR_OPTION_AT(client_opts, member)

/* every client's sections begin with these, and end with TLS */
#define CLIENT_MARKET_SECTION {NULL, ar_cli_market_options, offsetof(client_opts, m)}
#define CLIENT_TLS_SECTION {"TLS", ar_cli_tls_client_options, offsetof(client_opts, tls)}

#define JSON_OPTION                                                                                         \
    {.name = "json", .kind = AR_OPTION_FLAG, CLIENT(json),                                                  \
     .help = "print one JSON document instead of the table (its fields are listed above)"}

static const ar_option json_options[] = {JSON_OPTION, {0}};
#define CLIENT_JSON_SECTION {NULL, json_options, 0}

/* ledger's ACCOUNT, job's ID: one argument at most */
static int client_arg(void *opts, const char *arg)
{
    client_opts *o = opts;
    if (o->arg)
        return -1;
    o->arg = arg;
    return 0;
}

/* What a client command does with the dialled market: its call, then print
 * the answer. AR_OK, or the call's error (ar_last_error says what). */
typedef int (*client_call)(ar_client *c, const client_opts *o);

/* TLS, dialling the market, the call and its error: the exit code. check
 * (may be NULL) refuses what the table cannot see (exit 2). */
static int run_client(const char *cmd, const client_opts *o, int (*check)(const client_opts *o),
                      client_call call)
{
    if (ar_cli_tls_setup(cmd, &o->tls) != 0 || (check && check(o) != 0))
        return 2;
    ar_client *c;
    if (ar_client_open(o->m.market, &c) != AR_OK) {
        ar_cli_error(cmd, "%s", ar_last_error());
        return 1;
    }
    int rc = call(c, o);
    ar_client_close(c);
    if (rc != AR_OK) {
        ar_cli_error(cmd, "%s", ar_last_error());
        return 1;
    }
    return 0;
}

/* ---- arceus providers ------------------------------------------------------------------ */

static const char *mem_str(int64_t bytes, char *buf, size_t size)
{
    double b = (double)bytes;
    if (b >= (double)(1LL << 30))
        snprintf(buf, size, "%.1f GiB", b / (double)(1LL << 30));
    else
        snprintf(buf, size, "%.0f MiB", b / (double)(1LL << 20));
    return buf;
}

static const ar_option providers_options[] = {
    {.name = "all", .kind = AR_OPTION_FLAG, CLIENT(all), .help = "offline providers too"},
    JSON_OPTION,
    {0},
};

static int providers_json(const ar_market_provider *ps, size_t n)
{
    ar_cli_json j;
    ar_cli_json_begin(&j);
    cJSON *arr = ar_cli_json_array(&j, j.root, "providers");
    for (size_t i = 0; i < n && !j.oom; i++) {
        const ar_provider *p = &ps[i].p;
        cJSON *o = ar_cli_json_push(&j, arr);
        ar_cli_json_num(&j, o, "id", (double)p->id);
        ar_cli_json_str(&j, o, "account", ps[i].account);
        ar_cli_json_str(&j, o, "address", p->address);
        ar_cli_json_num(&j, o, "gflops", p->gflops);
        ar_cli_json_num(&j, o, "speed_gflops", ps[i].speed_gflops);
        ar_cli_json_num(&j, o, "mem_bytes", (double)p->mem_bytes);
        ar_cli_json_num(&j, o, "cores", p->cores);
        ar_cli_json_credits(&j, o, "price_per_tflop", p->price_per_tflop);
        ar_cli_json_num(&j, o, "reliability", p->reliability);
        ar_cli_json_bool(&j, o, "online", p->online);
        ar_cli_json_num(&j, o, "last_heartbeat", (double)p->last_heartbeat);
        ar_cli_json_str(&j, o, "worker", ar_reach_name(p->reach));
        ar_cli_json_bool(&j, o, "available", !p->unavailable);
        ar_cli_json_str(&j, o, "unavailable_why", p->unavailable ? p->unavailable_why : "");
    }
    return ar_cli_json_end(&j);
}

static int providers_call(ar_client *c, const client_opts *o)
{
    ar_market_provider *ps;
    size_t n;
    int rc = ar_market_providers(c, o->m.token, o->all, &ps, &n, NULL);
    if (rc != AR_OK)
        return rc;
    if (o->json) {
        rc = providers_json(ps, n);
        free(ps);
        return rc;
    }
    if (n == 0) {
        printf("no providers %s\n", o->all ? "registered" : "online");
    } else {
        printf("%-5s %-16s %-24s %9s %9s %10s %5s %14s %11s %-11s %s\n", "ID", "ACCOUNT", "ADDRESS", "GFLOP/S",
               "OBSERVED", "MEMORY", "CORES", "CREDITS/TFLOP", "RELIABILITY", "WORKER", "LAST SEEN");
        int64_t now = (int64_t)time(NULL);
        for (size_t i = 0; i < n; i++) {
            const ar_provider *p = &ps[i].p;
            char mem[32], price[48], seen[48 + 4 * AR_WHY_MAX], account[4 * 64], address[4 * AR_ADDR_MAX];
            char why[4 * AR_WHY_MAX];
            long long ago = (long long)(now - p->last_heartbeat);
            /* its owner's rules, as it said them: not leased now, and why */
            snprintf(seen, sizeof seen, "%llds ago%s%s%s", ago < 0 ? 0 : ago, p->online ? "" : " (offline)",
                     p->unavailable ? " (unavailable: " : "",
                     p->unavailable ? ar_cli_safe_text(p->unavailable_why, why, sizeof why) : "");
            if (p->unavailable)
                strncat(seen, ")", sizeof seen - strlen(seen) - 1);
            /* names and addresses are whatever their owners registered */
            printf("%-5lld %-16s %-24s %9.1f %9.1f %10s %5d %14s %11.2f %-11s %s\n", (long long)p->id,
                   ar_cli_safe_text(ps[i].account, account, sizeof account),
                   ar_cli_safe_text(p->address, address, sizeof address), p->gflops, ps[i].speed_gflops,
                   mem_str(p->mem_bytes, mem, sizeof mem), p->cores,
                   ar_credits_text(p->price_per_tflop, price, sizeof price), p->reliability,
                   ar_reach_name(p->reach), seen);
        }
    }
    free(ps);
    return AR_OK;
}

static int run_providers(void *opts)
{
    return run_client("providers", opts, NULL, providers_call);
}

const ar_cmd_spec ar_providers_cmd = {
    .name = "providers",
    .summary = "list the providers online at a market",
    .usage = "--market HOST:PORT --token T [--all] [--json]",
    .description = "List the providers online at a market: their worker address, claimed speed and the speed "
                   "the market estimates from what renters observed (the claim until then), memory, cores, "
                   "price (credits per TFLOP) and reliability (their account's). A provider whose owner's rules "
                   "say it is not to be used now (arceus provide --when, --hours, --on-battery) is shown "
                   "\"(unavailable: WHY)\" and is not leased.\n\n"
                   "--json prints {\"providers\": [...]}, each provider an object with id, account, address, "
                   "gflops (claimed GFLOP/s), speed_gflops (the market's estimate from observations), "
                   "mem_bytes (memory offered), cores, price_per_tflop (credits per TFLOP, a string with 6 "
                   "decimals), reliability (0..1, its account's), online (true or false), last_heartbeat (unix "
                   "seconds), worker (the market's last check of its worker: unchecked, reachable or "
                   "unreachable), available (false while its owner's rules say not now: arceus provide --when, "
                   "--hours, --on-battery) and unavailable_why (why, or \"\").",
    .sections = (const ar_option_section[]){
        CLIENT_MARKET_SECTION, {NULL, providers_options, 0}, CLIENT_TLS_SECTION, {0}},
    .opts_size = sizeof(client_opts),
    .run = run_providers,
};

/* ---- arceus ledger --------------------------------------------------------------------- */

/* One reason's rows in a ledger: how many, and their sum. */
typedef struct {
    char reason[AR_REASON_MAX];
    size_t rows;
    int64_t credits; /* micro-credits */
} reason_total;

/* The rows' totals by reason, in the order each reason first appears:
 * *out malloc'd (NULL and 0 for no rows); AR_OK or AR_ENOMEM. Whatever
 * reasons the market writes (mint, usage, reversal today) are counted: the
 * client need not know them. */
static int totals_by_reason(const ar_ledger_row *rows, size_t n, reason_total **out, size_t *n_out)
{
    reason_total *t = NULL;
    size_t k = 0, cap = 0;
    for (size_t i = 0; i < n; i++) {
        size_t r = 0;
        while (r < k && strcmp(t[r].reason, rows[i].reason) != 0)
            r++;
        if (r == k) {
            if (k == cap) {
                size_t ncap = cap ? 2 * cap : 8;
                reason_total *nt = realloc(t, ncap * sizeof *nt);
                if (!nt) {
                    free(t);
                    return ar_fail(AR_ENOMEM, "out of memory summing the ledger");
                }
                t = nt;
                cap = ncap;
            }
            memset(&t[k], 0, sizeof t[k]);
            snprintf(t[k].reason, sizeof t[k].reason, "%s", rows[i].reason);
            k++;
        }
        t[r].rows++;
        t[r].credits += rows[i].amount;
    }
    *out = t;
    *n_out = k;
    return AR_OK;
}

/* "+1.500000" for what came in, "-0.250000" for what went out */
static const char *signed_credits(int64_t micro, char *buf, size_t size)
{
    if (size < 2)
        return "";
    ar_credits_text(micro, buf + 1, size - 1);
    buf[0] = '+';
    return micro >= 0 ? buf : buf + 1;
}

static int ledger_json(const client_opts *o, const char *account, const ar_ledger_row *rows, size_t n,
                       const reason_total *t, size_t nt, int64_t balance, int64_t pending)
{
    ar_cli_json j;
    ar_cli_json_begin(&j);
    ar_cli_json_str(&j, j.root, "account", account);
    ar_cli_json_credits(&j, j.root, "balance", balance);
    ar_cli_json_credits(&j, j.root, "pending", pending);
    ar_cli_json_num(&j, j.root, "rows_total", (double)n);
    cJSON *by = ar_cli_json_object(&j, j.root, "by_reason");
    for (size_t i = 0; i < nt && !j.oom; i++) {
        cJSON *r = ar_cli_json_object(&j, by, t[i].reason);
        ar_cli_json_num(&j, r, "rows", (double)t[i].rows);
        ar_cli_json_credits(&j, r, "credits", t[i].credits);
    }
    if (!o->summary) {
        cJSON *arr = ar_cli_json_array(&j, j.root, "rows");
        for (size_t i = 0; i < n && !j.oom; i++) {
            const ar_ledger_row *r = &rows[i];
            cJSON *x = ar_cli_json_push(&j, arr);
            ar_cli_json_num(&j, x, "id", (double)r->id);
            ar_cli_json_num(&j, x, "transfer", (double)r->transfer_id);
            ar_cli_json_num(&j, x, "time", (double)r->created);
            ar_cli_json_str(&j, x, "reason", r->reason);
            if (r->job_id > 0)
                ar_cli_json_num(&j, x, "job", (double)r->job_id);
            else
                ar_cli_json_null(&j, x, "job");
            if (r->step >= 0)
                ar_cli_json_num(&j, x, "step", (double)r->step);
            else
                ar_cli_json_null(&j, x, "step");
            ar_cli_json_credits(&j, x, "amount", r->amount);
        }
    }
    return ar_cli_json_end(&j);
}

static void ledger_rows(const ar_ledger_row *rows, size_t n)
{
    printf("%-7s %-8s %-20s %-9s %6s %6s %20s\n", "ID", "TRANSFER", "TIME (UTC)", "REASON", "JOB", "STEP",
           "CREDITS");
    for (size_t i = 0; i < n; i++) {
        const ar_ledger_row *r = &rows[i];
        char when[32] = "?", job[24] = "-", step[24] = "-", amount[48], reason[4 * AR_REASON_MAX];
        time_t t = (time_t)r->created;
        struct tm tm;
        if (gmtime_r(&t, &tm))
            strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
        if (r->job_id > 0)
            snprintf(job, sizeof job, "%lld", (long long)r->job_id);
        if (r->step >= 0)
            snprintf(step, sizeof step, "%lld", (long long)r->step);
        printf("%-7lld %-8lld %-20s %-9s %6s %6s %20s\n", (long long)r->id, (long long)r->transfer_id, when,
               ar_cli_safe_text(r->reason, reason, sizeof reason), job, step,
               signed_credits(r->amount, amount, sizeof amount));
    }
}

static int ledger_call(ar_client *c, const client_opts *o)
{
    ar_ledger_row *rows;
    size_t n;
    int64_t balance, pending = 0;
    char account[AR_NAME_MAX];
    int rc = ar_market_ledger(c, o->m.token, o->arg, account, &rows, &n, &balance, &pending, NULL);
    if (rc != AR_OK)
        return rc;
    reason_total *t = NULL;
    size_t nt = 0;
    rc = totals_by_reason(rows, n, &t, &nt);
    if (rc == AR_OK && o->json) {
        rc = ledger_json(o, account, rows, n, t, nt, balance, pending);
    } else if (rc == AR_OK) {
        char name[4 * AR_NAME_MAX], b[48];
        ar_cli_safe_text(account, name, sizeof name);
        if (o->summary) {
            printf("ledger of %s: %zu row%s\n", name, n, n == 1 ? "" : "s");
            printf("  %-10s %8s %20s\n", "REASON", "ROWS", "CREDITS");
            for (size_t i = 0; i < nt; i++) {
                char reason[4 * AR_REASON_MAX], amount[48];
                printf("  %-10s %8zu %20s\n", ar_cli_safe_text(t[i].reason, reason, sizeof reason), t[i].rows,
                       signed_credits(t[i].credits, amount, sizeof amount));
            }
        } else {
            printf("ledger of %s\n", name);
            ledger_rows(rows, n);
        }
        printf("balance: %s credits\n", ar_credits_text(balance, b, sizeof b));
        /* earned, and held until the work is verified or its job's settling window passes */
        printf("pending: %s credits (held in escrow)\n", ar_credits_text(pending, b, sizeof b));
    }
    free(t);
    free(rows);
    return rc;
}

static int run_ledger(void *opts)
{
    return run_client("ledger", opts, NULL, ledger_call);
}

static const ar_option ledger_options[] = {
    {.name = "summary", .kind = AR_OPTION_FLAG, CLIENT(summary),
     .help = "one line per reason (rows and credits) instead of every row"},
    JSON_OPTION,
    {0},
};

const ar_cmd_spec ar_ledger_cmd = {
    .name = "ledger",
    .summary = "print your credit ledger and balance at a market",
    .usage = "[ACCOUNT] --market HOST:PORT --token T [--summary] [--json]",
    .description = "Print an account's ledger at a market, one row per credit movement (+ received, - paid), "
                   "and its balance, in credits: spendable, and pending (what its providers earned that the "
                   "market's escrow still holds, until audits verify the work or its job's settling window "
                   "passes). An account may read only its own ledger: ACCOUNT defaults "
                   "to the token's account, and any other is refused. --summary prints, instead of the rows, "
                   "how many there are of each reason (mint, usage, release, reversal) and what they add up "
                   "to.\n\n"
                   "--json prints one object: account, balance, pending, rows_total, by_reason (for each reason an "
                   "object with rows and credits, their sum) and, without --summary, rows (oldest first, each "
                   "with id, transfer, time in unix seconds, reason, job and step, null when none, and "
                   "amount). Credits are strings with 6 decimals, exact: \"-0.250000\".",
    .sections = (const ar_option_section[]){CLIENT_MARKET_SECTION, {NULL, ledger_options, 0}, CLIENT_TLS_SECTION,
                                            {0}},
    .positional = client_arg,
    .opts_size = sizeof(client_opts),
    .run = run_ledger,
};

/* ---- arceus jobs ----------------------------------------------------------------------- */

static const char *utc_str(int64_t unix_s, char *buf, size_t size)
{
    time_t t = (time_t)unix_s;
    struct tm tm;
    snprintf(buf, size, "?");
    if (gmtime_r(&t, &tm))
        strftime(buf, size, "%Y-%m-%d %H:%M:%S", &tm);
    return buf;
}

/* A job's fields, as jobs --json and job --json write them. */
static void job_json_fields(ar_cli_json *j, cJSON *o, const ar_job *job)
{
    ar_cli_json_num(j, o, "id", (double)job->id);
    ar_cli_json_str(j, o, "status", ar_job_status_name(job->status));
    ar_cli_json_num(j, o, "step", (double)job->step);
    ar_cli_json_credits(j, o, "spent", job->spent);
    if (job->max_credits > 0)
        ar_cli_json_credits(j, o, "max_credits", job->max_credits);
    else
        ar_cli_json_null(j, o, "max_credits");
    ar_cli_json_num(j, o, "created", (double)job->created);
    ar_cli_json_str(j, o, "spec", job->spec);
}

static int jobs_call(ar_client *c, const client_opts *o)
{
    ar_job *jobs;
    size_t n;
    int rc = ar_market_jobs(c, o->m.token, &jobs, &n, NULL);
    if (rc != AR_OK)
        return rc;
    if (o->json) {
        ar_cli_json j;
        ar_cli_json_begin(&j);
        cJSON *arr = ar_cli_json_array(&j, j.root, "jobs");
        for (size_t i = 0; i < n && !j.oom; i++)
            job_json_fields(&j, ar_cli_json_push(&j, arr), &jobs[i]);
        rc = ar_cli_json_end(&j);
    } else if (n == 0) {
        printf("no jobs\n");
    } else {
        printf("%-6s %-10s %8s %20s %-20s %s\n", "ID", "STATUS", "STEP", "CREDITS SPENT", "CREATED (UTC)",
               "SPEC");
        for (size_t i = 0; i < n; i++) {
            char spent[48], when[32], spec[1024];
            printf("%-6lld %-10s %8lld %20s %-20s %s\n", (long long)jobs[i].id,
                   ar_job_status_name(jobs[i].status), (long long)jobs[i].step,
                   ar_credits_text(jobs[i].spent, spent, sizeof spent),
                   utc_str(jobs[i].created, when, sizeof when), ar_cli_safe_text(jobs[i].spec, spec, sizeof spec));
        }
    }
    ar_store_jobs_free(jobs, n);
    return rc;
}

static int run_jobs(void *opts)
{
    return run_client("jobs", opts, NULL, jobs_call);
}

const ar_cmd_spec ar_jobs_cmd = {
    .name = "jobs",
    .summary = "list your training jobs at a market",
    .usage = "--market HOST:PORT --token T [--json]",
    .description = "List your account's training jobs at a market: id, status, completed steps, credits "
                   "spent, when each was created (UTC) and what it trains.\n\n"
                   "--json prints {\"jobs\": [...]}, each job an object with id, status (running, done, "
                   "failed, ...), step (completed steps), spent and max_credits (credits as strings with 6 "
                   "decimals; max_credits null when the job has no cap), created (unix seconds) and spec.",
    .sections = (const ar_option_section[]){CLIENT_MARKET_SECTION, CLIENT_JSON_SECTION, CLIENT_TLS_SECTION, {0}},
    .opts_size = sizeof(client_opts),
    .run = run_jobs,
};

/* ---- arceus job ID --------------------------------------------------------------------- */

#define SPARK_WIDTH 60

/* The losses as at most SPARK_WIDTH characters of ▁▂▃▄▅▆▇█ (each the mean
 * of its group of steps), scaled between the lowest and highest. */
static void print_sparkline(const ar_job_point *p, size_t n)
{
    static const char *const bars[] = {"▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"};
    size_t w = n < SPARK_WIDTH ? n : SPARK_WIDTH;
    double v[SPARK_WIDTH], lo = 0, hi = 0;
    for (size_t i = 0; i < w; i++) {
        size_t a = i * n / w, b = (i + 1) * n / w;
        double s = 0;
        for (size_t k = a; k < b; k++)
            s += p[k].loss;
        v[i] = s / (double)(b - a);
        if (i == 0 || v[i] < lo)
            lo = v[i];
        if (i == 0 || v[i] > hi)
            hi = v[i];
    }
    for (size_t i = 0; i < w; i++) {
        int k = hi > lo ? (int)((v[i] - lo) / (hi - lo) * 7.0 + 0.5) : 0;
        fputs(bars[k < 0 ? 0 : k > 7 ? 7 : k], stdout);
    }
    putchar('\n');
}

/* the job id: a positive number */
static int job_id(const char *s, int64_t *id)
{
    char *end = NULL;
    long long v = s ? strtoll(s, &end, 10) : 0;
    if (!s || !*s || *end || v < 1)
        return -1;
    *id = (int64_t)v;
    return 0;
}

static int job_check(const client_opts *o)
{
    int64_t id;
    if (job_id(o->arg, &id) == 0)
        return 0;
    ar_cli_error("job", "expects a job id (a number from arceus jobs), got \"%s\"", o->arg ? o->arg : "");
    return -1;
}

static int job_call(ar_client *c, const client_opts *o)
{
    int64_t id = 0;
    job_id(o->arg, &id); /* job_check has passed it */
    ar_job job;
    ar_job_point *pts;
    size_t n;
    int rc = ar_market_job(c, o->m.token, id, &job, &pts, &n, NULL);
    if (rc != AR_OK)
        return rc;
    if (o->json) {
        ar_cli_json j;
        ar_cli_json_begin(&j);
        job_json_fields(&j, ar_cli_json_object(&j, j.root, "job"), &job);
        cJSON *arr = ar_cli_json_array(&j, j.root, "loss");
        for (size_t i = 0; i < n && !j.oom; i++) {
            cJSON *p = ar_cli_json_push(&j, arr);
            ar_cli_json_num(&j, p, "step", (double)pts[i].step + 1);
            ar_cli_json_num(&j, p, "loss", pts[i].loss);
        }
        rc = ar_cli_json_end(&j);
        ar_free(pts);
        ar_store_job_clear(&job);
        return rc;
    }
    char spent[48], cap[48], when[32], spec[1024];
    printf("job %lld\n", (long long)job.id);
    printf("  status:   %s\n", ar_job_status_name(job.status));
    printf("  step:     %lld\n", (long long)job.step);
    printf("  spent:    %s credits", ar_credits_text(job.spent, spent, sizeof spent));
    if (job.max_credits > 0)
        printf(" (of at most %s)", ar_credits_text(job.max_credits, cap, sizeof cap));
    printf("\n  created:  %s UTC\n", utc_str(job.created, when, sizeof when));
    printf("  spec:     %s\n", ar_cli_safe_text(job.spec, spec, sizeof spec));
    if (n == 0) {
        printf("  loss:     none reported yet\n");
    } else {
        printf("  loss:     %.4f (step %lld) -> %.4f (step %lld), %zu steps reported\n", pts[0].loss,
               (long long)pts[0].step + 1, pts[n - 1].loss, (long long)pts[n - 1].step + 1, n);
        printf("  curve:    ");
        print_sparkline(pts, n);
    }
    ar_free(pts);
    ar_store_job_clear(&job);
    return AR_OK;
}

static int run_job(void *opts)
{
    return run_client("job", opts, job_check, job_call);
}

const ar_cmd_spec ar_job_cmd = {
    .name = "job",
    .summary = "show one job: status, step, credits spent, loss curve",
    .usage = "ID --market HOST:PORT --token T [--json]",
    .description = "Show one of your jobs at a market: its status, completed steps, credits spent and its "
                   "training loss curve as a text sparkline (one character per step, or per group of steps "
                   "for a long run), from the losses the driver reported step by step. Another account's "
                   "job is refused.\n\n"
                   "--json prints {\"job\": {...}, \"loss\": [...]}: the job's fields as arceus jobs --json "
                   "writes them, and every reported training loss as {\"step\": N, \"loss\": X}, N the "
                   "steps completed (1 for the first).",
    .sections = (const ar_option_section[]){CLIENT_MARKET_SECTION, CLIENT_JSON_SECTION, CLIENT_TLS_SECTION, {0}},
    .positional = client_arg,
    .opts_size = sizeof(client_opts),
    .run = run_job,
};
