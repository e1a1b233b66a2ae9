/* arceus market / providers / ledger: the market server and its clients.
 *
 * Money is micro-credits everywhere inside; here, at the edge, it is read
 * and printed as credits with 6 decimals (exact: no floating point). */
#include "cli/cli.h"
#include "core/core.h"
#include "market/http.h"
#include "market/store.h"
#include "net/market.h"

#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- money at the edge ----------------------------------------------------------- */

/* "N" or "N.DDDDDD" (at most 6 decimals, at most 1e12 credits) -> micro */
static int parse_credits(const char *cmd, const char *opt, const char *s, int64_t *out)
{
    if (ar_parse_credits(s, AR_CREDITS(1000000000000LL), out) == 0)
        return 0;
    ar_cli_error(cmd, "--%s expects credits like 100 or 0.25 (0..1e12, at most 6 decimals), got \"%s\"",
                 opt, s);
    return -1;
}

/* ---- arceus market ----------------------------------------------------------------- */

void ar_help_market(void)
{
    printf("usage: arceus market --listen HOST:PORT --db PATH [--http HOST:PORT] [--offline-after S]\n"
           "                     [--max-providers-per-account N] [--reach-timeout S]\n"
           "       arceus market add-account NAME [--credits N] --db PATH\n"
           "\n"
           "Run the market: the gRPC Market service over a SQLite database (created if\n"
           "missing). Providers register and send heartbeats; renters list providers\n"
           "and read their ledger. Every call needs an account token. Prints\n"
           "\"arceus market: listening on HOST:PORT\" once ready (port 0 picks a free\n"
           "port and prints it). SIGINT or SIGTERM stops it cleanly.\n"
           "\n"
           "--http serves the web dashboard and its JSON API (README.md): the market's\n"
           "overview for anyone, an account's jobs, providers and ledger for its token.\n"
           "Prints \"arceus market: dashboard on http://HOST:PORT/\" once ready.\n"
           "\n"
           "add-account creates an account (credits minted to it, 0 by default) and\n"
           "prints its token once: the database keeps only the token's hash.\n"
           "\n"
           "options:\n"
           "  --listen HOST:PORT   address to listen on, e.g. 127.0.0.1:7000\n"
           "  --db PATH            the SQLite database file\n"
           "  --http HOST:PORT     serve the dashboard there, e.g. 127.0.0.1:8080 (port 0: any)\n"
           "  --offline-after S    a provider silent for S seconds is offline (%d)\n"
           "  --max-providers-per-account N\n"
           "                       providers one account may register (%d)\n"
           "  --reach-timeout S    seconds the market waits for a provider's worker to answer\n"
           "                       its Hello; a worker it cannot reach is not leased (%g;\n"
           "                       0: no checks, for a market that cannot reach its providers)\n"
           "                       A worker's address must not be link-local, multicast or\n"
           "                       unspecified, nor loopback unless the market listens on\n"
           "                       loopback, and its port must be 1024 or above.\n"
           "  --credits N          add-account: opening credits, up to 6 decimals (0)\n"
           AR_CLI_TLS_SERVER_HELP
           "                       (--tls-ca: to check its providers' TLS workers)\n",
           AR_MARKET_DEFAULT_OFFLINE_AFTER_S, AR_MARKET_DEFAULT_MAX_PROVIDERS, AR_MARKET_DEFAULT_REACH_TIMEOUT_S);
}

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

int ar_cmd_market(int argc, char **argv)
{
    const char *listen = NULL, *db = NULL, *account = NULL, *http = NULL;
    int offline_after = AR_MARKET_DEFAULT_OFFLINE_AFTER_S, adding = 0, have_credits = 0;
    int max_providers = AR_MARKET_DEFAULT_MAX_PROVIDERS;
    float reach_timeout = (float)AR_MARKET_DEFAULT_REACH_TIMEOUT_S;
    int64_t credits = 0;
    ar_cli_tls tls = {0};
    ar_args a;
    ar_args_init(&a, argc, argv);
    const char *name;
    int positional;
    while ((name = ar_args_next(&a, &positional))) {
        int rc = 0;
        if (positional) {
            if (!adding && !listen && !strcmp(name, "add-account")) {
                adding = 1;
                continue;
            }
            if (adding && !account) {
                account = name;
                continue;
            }
            ar_cli_error("market", "unexpected argument \"%s\" (see arceus market --help)", name);
            return 2;
        }
        if (!strcmp(name, "listen"))
            rc = ar_args_string(&a, &listen);
        else if (!strcmp(name, "db"))
            rc = ar_args_string(&a, &db);
        else if (!strcmp(name, "http"))
            rc = ar_args_string(&a, &http);
        else if (!strcmp(name, "offline-after"))
            rc = ar_args_int(&a, 1, 86400, &offline_after);
        else if (!strcmp(name, "max-providers-per-account"))
            rc = ar_args_int(&a, 1, AR_MARKET_MAX_PROVIDERS_LIMIT, &max_providers);
        else if (!strcmp(name, "reach-timeout"))
            rc = ar_args_float(&a, 0, 60, &reach_timeout);
        else if (!strcmp(name, "credits")) {
            const char *v;
            rc = ar_args_string(&a, &v);
            if (rc == 0)
                rc = parse_credits("market", "credits", v, &credits);
            have_credits = 1;
        } else if (!ar_cli_tls_option(&a, name, 1, &tls, &rc))
            rc = ar_args_unknown(&a);
        if (rc != 0)
            return 2;
    }
    if (adding) {
        if (!account) {
            ar_cli_error("market", "add-account needs a NAME (see arceus market --help)");
            return 2;
        }
        if (listen || http) {
            ar_cli_error("market", "add-account takes no --%s", listen ? "listen" : "http");
            return 2;
        }
        return add_account(account, db, credits);
    }
    if (have_credits) {
        ar_cli_error("market", "--credits goes with add-account");
        return 2;
    }
    if (!listen || !strchr(listen, ':')) {
        ar_cli_error("market", "--listen HOST:PORT is required (for example 127.0.0.1:7000)");
        return 2;
    }
    if (!db) {
        ar_cli_error("market", "--db PATH is required (the SQLite database, created if missing)");
        return 2;
    }
    if (http && !strchr(http, ':')) {
        ar_cli_error("market", "--http expects HOST:PORT (for example 127.0.0.1:8080), got \"%s\"", http);
        return 2;
    }
    if (ar_cli_tls_setup("market", &tls) != 0)
        return 2;
    /* signals are taken by sigwait below, in this thread only: block them
     * before any other thread (gRPC's, the sweep) exists */
    ar_cli_block_stop_signals();
    ar_market_config c = {.listen = listen, .db_path = db, .offline_after_s = offline_after,
                          .max_providers_per_account = max_providers,
                          .reach_timeout_s = reach_timeout > 0 ? reach_timeout : -1};
    ar_market *m;
    char addr[200];
    if (ar_market_start(&c, &m, addr, sizeof addr) != AR_OK) {
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
    if (h)
        printf("arceus market: dashboard on http://%s/\n", haddr);
    fflush(stdout);
    ar_cli_wait_stop_signal("market");
    ar_http_stop(h);
    ar_market_stop(m);
    return 0;
}

/* ---- the clients: arceus providers, arceus ledger -------------------------------------- */

typedef struct {
    const char *market, *token, *account;
    int all;
    ar_cli_tls tls;
} client_opts;

/* --market and --token (or $ARCEUS_TOKEN), plus the command's own options */
static int parse_client(const char *cmd, int argc, char **argv, client_opts *o, int takes_account)
{
    memset(o, 0, sizeof *o);
    ar_args a;
    ar_args_init(&a, argc, argv);
    const char *name;
    int positional;
    while ((name = ar_args_next(&a, &positional))) {
        int rc = 0;
        if (positional) {
            if (takes_account && !o->account) {
                o->account = name;
                continue;
            }
            ar_cli_error(cmd, "unexpected argument \"%s\" (see arceus %s --help)", name, cmd);
            return 2;
        }
        if (!strcmp(name, "market"))
            rc = ar_args_string(&a, &o->market);
        else if (!strcmp(name, "token"))
            rc = ar_args_string(&a, &o->token);
        else if (!takes_account && !strcmp(name, "all"))
            o->all = 1;
        else if (!ar_cli_tls_option(&a, name, 0, &o->tls, &rc))
            rc = ar_args_unknown(&a);
        if (rc != 0)
            return 2;
    }
    if (!o->market || !strchr(o->market, ':')) {
        ar_cli_error(cmd, "--market HOST:PORT is required (the address arceus market listens on)");
        return 2;
    }
    if (!o->token)
        o->token = getenv("ARCEUS_TOKEN");
    if (!o->token || !*o->token) {
        ar_cli_error(cmd, "--token T is required (or $ARCEUS_TOKEN; arceus market add-account prints one)");
        return 2;
    }
    if (ar_cli_tls_setup(cmd, &o->tls) != 0)
        return 2;
    return 0;
}

static const char *mem_str(int64_t bytes, char *buf, size_t size)
{
    double b = (double)bytes;
    if (b >= (double)(1LL << 30))
        snprintf(buf, size, "%.1f GiB", b / (double)(1LL << 30));
    else
        snprintf(buf, size, "%.0f MiB", b / (double)(1LL << 20));
    return buf;
}

void ar_help_providers(void)
{
    printf("usage: arceus providers --market HOST:PORT --token T [--all]\n"
           "\n"
           "List the providers online at a market: their worker address, measured\n"
           "speed, memory, cores, price (credits per TFLOP) and reliability.\n"
           "\n"
           "options:\n"
           "  --market HOST:PORT   the market (arceus market --listen ...)\n"
           "  --token T            your account token (default: $ARCEUS_TOKEN)\n"
           "  --all                offline providers too\n"
           AR_CLI_TLS_CLIENT_HELP);
}

int ar_cmd_providers(int argc, char **argv)
{
    client_opts o;
    int rc = parse_client("providers", argc, argv, &o, 0);
    if (rc != 0)
        return rc;
    ar_client *c;
    if (ar_client_open(o.market, &c) != AR_OK) {
        ar_cli_error("providers", "%s", ar_last_error());
        return 1;
    }
    ar_market_provider *ps;
    size_t n;
    rc = ar_market_providers(c, o.token, o.all, &ps, &n, NULL);
    ar_client_close(c);
    if (rc != AR_OK) {
        ar_cli_error("providers", "%s", ar_last_error());
        return 1;
    }
    if (n == 0) {
        printf("no providers %s\n", o.all ? "registered" : "online");
    } else {
        printf("%-5s %-16s %-24s %9s %10s %5s %14s %11s %-11s %s\n", "ID", "ACCOUNT", "ADDRESS", "GFLOP/S",
               "MEMORY", "CORES", "CREDITS/TFLOP", "RELIABILITY", "WORKER", "LAST SEEN");
        int64_t now = (int64_t)time(NULL);
        for (size_t i = 0; i < n; i++) {
            const ar_provider *p = &ps[i].p;
            char mem[32], price[48], seen[48];
            long long ago = (long long)(now - p->last_heartbeat);
            snprintf(seen, sizeof seen, "%llds ago%s", ago < 0 ? 0 : ago, p->online ? "" : " (offline)");
            printf("%-5lld %-16s %-24s %9.1f %10s %5d %14s %11.2f %-11s %s\n", (long long)p->id, ps[i].account,
                   p->address, p->gflops, mem_str(p->mem_bytes, mem, sizeof mem), p->cores,
                   ar_credits_text(p->price_per_tflop, price, sizeof price), p->reliability,
                   ar_reach_name(p->reach), seen);
        }
    }
    free(ps);
    return 0;
}

void ar_help_ledger(void)
{
    printf("usage: arceus ledger [ACCOUNT] --market HOST:PORT --token T\n"
           "\n"
           "Print an account's ledger at a market, one row per credit movement\n"
           "(+ received, - paid), and its balance, in credits. An account may read\n"
           "only its own ledger: ACCOUNT defaults to the token's account, and any\n"
           "other is refused.\n"
           "\n"
           "options:\n"
           "  --market HOST:PORT   the market (arceus market --listen ...)\n"
           "  --token T            your account token (default: $ARCEUS_TOKEN)\n"
           AR_CLI_TLS_CLIENT_HELP);
}

int ar_cmd_ledger(int argc, char **argv)
{
    client_opts o;
    int rc = parse_client("ledger", argc, argv, &o, 1);
    if (rc != 0)
        return rc;
    ar_client *c;
    if (ar_client_open(o.market, &c) != AR_OK) {
        ar_cli_error("ledger", "%s", ar_last_error());
        return 1;
    }
    ar_ledger_row *rows;
    size_t n;
    int64_t balance;
    char account[AR_NAME_MAX];
    rc = ar_market_ledger(c, o.token, o.account, account, &rows, &n, &balance, NULL);
    ar_client_close(c);
    if (rc != AR_OK) {
        ar_cli_error("ledger", "%s", ar_last_error());
        return 1;
    }
    printf("ledger of %s\n", account);
    printf("%-7s %-8s %-20s %-9s %6s %6s %20s\n", "ID", "TRANSFER", "TIME (UTC)", "REASON", "JOB", "STEP",
           "CREDITS");
    for (size_t i = 0; i < n; i++) {
        const ar_ledger_row *r = &rows[i];
        char when[32] = "?", job[24] = "-", step[24] = "-", amount[48];
        time_t t = (time_t)r->created;
        struct tm tm;
        if (gmtime_r(&t, &tm))
            strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
        if (r->job_id > 0)
            snprintf(job, sizeof job, "%lld", (long long)r->job_id);
        if (r->step >= 0)
            snprintf(step, sizeof step, "%lld", (long long)r->step);
        ar_credits_text(r->amount, amount + 1, sizeof amount - 1);
        amount[0] = r->amount >= 0 ? '+' : ' ';
        printf("%-7lld %-8lld %-20s %-9s %6s %6s %20s\n", (long long)r->id, (long long)r->transfer_id, when,
               r->reason, job, step, r->amount >= 0 ? amount : amount + 1);
    }
    char b[48];
    printf("balance: %s credits\n", ar_credits_text(balance, b, sizeof b));
    free(rows);
    return 0;
}

/* ---- the clients: arceus jobs, arceus job ID ------------------------------------------------ */

static const char *utc_str(int64_t unix_s, char *buf, size_t size)
{
    time_t t = (time_t)unix_s;
    struct tm tm;
    snprintf(buf, size, "?");
    if (gmtime_r(&t, &tm))
        strftime(buf, size, "%Y-%m-%d %H:%M:%S", &tm);
    return buf;
}

void ar_help_jobs(void)
{
    printf("usage: arceus jobs --market HOST:PORT --token T\n"
           "\n"
           "List your account's training jobs at a market: id, status, completed\n"
           "steps, credits spent, when each was created (UTC) and what it trains.\n"
           "\n"
           "options:\n"
           "  --market HOST:PORT   the market (arceus market --listen ...)\n"
           "  --token T            your account token (default: $ARCEUS_TOKEN)\n"
           AR_CLI_TLS_CLIENT_HELP);
}

int ar_cmd_jobs(int argc, char **argv)
{
    client_opts o;
    int rc = parse_client("jobs", argc, argv, &o, 0);
    if (rc != 0)
        return rc;
    if (o.all) {
        ar_cli_error("jobs", "unknown option --all (see arceus jobs --help)");
        return 2;
    }
    ar_client *c;
    if (ar_client_open(o.market, &c) != AR_OK) {
        ar_cli_error("jobs", "%s", ar_last_error());
        return 1;
    }
    ar_job *jobs;
    size_t n;
    rc = ar_market_jobs(c, o.token, &jobs, &n, NULL);
    ar_client_close(c);
    if (rc != AR_OK) {
        ar_cli_error("jobs", "%s", ar_last_error());
        return 1;
    }
    if (n == 0) {
        printf("no jobs\n");
    } else {
        printf("%-6s %-10s %8s %20s %-20s %s\n", "ID", "STATUS", "STEP", "CREDITS SPENT", "CREATED (UTC)",
               "SPEC");
        for (size_t i = 0; i < n; i++) {
            char spent[48], when[32];
            printf("%-6lld %-10s %8lld %20s %-20s %s\n", (long long)jobs[i].id,
                   ar_job_status_name(jobs[i].status), (long long)jobs[i].step,
                   ar_credits_text(jobs[i].spent, spent, sizeof spent),
                   utc_str(jobs[i].created, when, sizeof when), jobs[i].spec ? jobs[i].spec : "");
        }
    }
    ar_store_jobs_free(jobs, n);
    return 0;
}

void ar_help_job(void)
{
    printf("usage: arceus job ID --market HOST:PORT --token T\n"
           "\n"
           "Show one of your jobs at a market: its status, completed steps, credits\n"
           "spent and its training loss curve as a text sparkline (one character per\n"
           "step, or per group of steps for a long run), from the losses the driver\n"
           "reported step by step. Another account's job is refused.\n"
           "\n"
           "options:\n"
           "  --market HOST:PORT   the market (arceus market --listen ...)\n"
           "  --token T            your account token (default: $ARCEUS_TOKEN)\n"
           AR_CLI_TLS_CLIENT_HELP);
}

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

int ar_cmd_job(int argc, char **argv)
{
    client_opts o;
    int rc = parse_client("job", argc, argv, &o, 1);
    if (rc != 0)
        return rc;
    char *end = NULL;
    long long id = o.account ? strtoll(o.account, &end, 10) : 0;
    if (!o.account || !*o.account || *end || id < 1) {
        ar_cli_error("job", "expects a job id (a number from arceus jobs), got \"%s\"",
                     o.account ? o.account : "");
        return 2;
    }
    ar_client *c;
    if (ar_client_open(o.market, &c) != AR_OK) {
        ar_cli_error("job", "%s", ar_last_error());
        return 1;
    }
    ar_job job;
    ar_job_point *pts;
    size_t n;
    rc = ar_market_job(c, o.token, (int64_t)id, &job, &pts, &n, NULL);
    ar_client_close(c);
    if (rc != AR_OK) {
        ar_cli_error("job", "%s", ar_last_error());
        return 1;
    }
    char spent[48], cap[48], when[32];
    printf("job %lld\n", (long long)job.id);
    printf("  status:   %s\n", ar_job_status_name(job.status));
    printf("  step:     %lld\n", (long long)job.step);
    printf("  spent:    %s credits", ar_credits_text(job.spent, spent, sizeof spent));
    if (job.max_credits > 0)
        printf(" (of at most %s)", ar_credits_text(job.max_credits, cap, sizeof cap));
    printf("\n  created:  %s UTC\n", utc_str(job.created, when, sizeof when));
    printf("  spec:     %s\n", job.spec ? job.spec : "");
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
    return 0;
}
