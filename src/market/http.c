/* The market's web dashboard: the JSON API and the embedded page (http.h).
 *
 * libmicrohttpd runs one thread that polls the sockets and calls handle()
 * for each request; the handler answers at once (every request is a GET
 * without a body), so the store is only used from that thread, through the
 * dashboard's own connection.
 *
 * Every answer is built with cJSON from what the store returns: strings from
 * the database (account names, specs, addresses) reach the page as JSON
 * strings, and the page inserts them as text, never as HTML. */
#include "market/http.h"

#include "arceus.h"
#include "core/core.h"
#include "market/rules.h"
#include "market/store.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Series longer than this are thinned (evenly, keeping the last point)
 * before they are sent: a chart has no use for more points than pixels. */
#define MAX_SERIES_POINTS 1000
#define LEDGER_DEFAULT_ROWS 100
#define LEDGER_MAX_ROWS 1000

struct ar_http {
    struct MHD_Daemon *daemon;
    ar_store *store;
    int offline_after_s;
};

/* ---- answers ------------------------------------------------------------------ */

static enum MHD_Result send_body(struct MHD_Connection *conn, unsigned code, const char *type, void *body,
                                 size_t size, enum MHD_ResponseMemoryMode mode, bool api)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(size, body, mode);
    if (!r) {
        if (mode == MHD_RESPMEM_MUST_FREE)
            free(body);
        return MHD_NO;
    }
    /* the page's own files and its API only: no other origin, no framing */
    MHD_add_response_header(r, "Content-Type", type);
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "Content-Security-Policy",
                            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'");
    MHD_add_response_header(r, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(r, "Cache-Control", api ? "no-store" : "no-cache");
    enum MHD_Result rc = MHD_queue_response(conn, code, r);
    MHD_destroy_response(r);
    return rc;
}

/* Send a JSON document and free it; NULL (memory ran out) is a 500. */
static enum MHD_Result send_json(struct MHD_Connection *conn, unsigned code, cJSON *doc)
{
    char *text = doc ? cJSON_PrintUnformatted(doc) : NULL;
    cJSON_Delete(doc);
    if (!text) {
        static char oom[] = "{\"error\":\"out of memory\"}";
        return send_body(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "application/json", oom, strlen(oom),
                         MHD_RESPMEM_PERSISTENT, true);
    }
    return send_body(conn, code, "application/json", text, strlen(text), MHD_RESPMEM_MUST_FREE, true);
}

static enum MHD_Result send_error(struct MHD_Connection *conn, unsigned code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static enum MHD_Result send_error(struct MHD_Connection *conn, unsigned code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cJSON *doc = cJSON_CreateObject();
    if (doc && !cJSON_AddStringToObject(doc, "error", msg)) {
        cJSON_Delete(doc);
        doc = NULL;
    }
    return send_json(conn, code, doc);
}

/* A store failure: ours, logged, a 500 (a missing row was handled before). */
static enum MHD_Result send_store_error(struct MHD_Connection *conn)
{
    ar_log(AR_LOG_ERROR, "dashboard: %s", ar_last_error());
    return send_error(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "the market's database failed: %s", ar_last_error());
}

/* ---- JSON helpers ----------------------------------------------------------------- */

/* Builders that remember whether memory ran out: a document is built with
 * them, then sent or replaced by a 500 once, at the end (send_built). */
typedef struct {
    bool oom;
} build;

/* The document built with b, or the 500 of send_json when memory ran out
 * while building it. */
static enum MHD_Result send_built(struct MHD_Connection *conn, cJSON *doc, const build *b)
{
    if (b->oom) {
        cJSON_Delete(doc);
        doc = NULL;
    }
    return send_json(conn, MHD_HTTP_OK, doc);
}

static cJSON *add_num(build *b, cJSON *obj, const char *key, double v)
{
    cJSON *x = obj ? cJSON_AddNumberToObject(obj, key, isfinite(v) ? v : 0) : NULL;
    b->oom = b->oom || !x;
    return x;
}

static cJSON *add_str(build *b, cJSON *obj, const char *key, const char *v)
{
    cJSON *x = obj ? cJSON_AddStringToObject(obj, key, v ? v : "") : NULL;
    b->oom = b->oom || !x;
    return x;
}

static cJSON *add_bool(build *b, cJSON *obj, const char *key, bool v)
{
    cJSON *x = obj ? cJSON_AddBoolToObject(obj, key, v) : NULL;
    b->oom = b->oom || !x;
    return x;
}

static cJSON *add_array(build *b, cJSON *obj, const char *key)
{
    cJSON *x = obj ? cJSON_AddArrayToObject(obj, key) : NULL;
    b->oom = b->oom || !x;
    return x;
}

static cJSON *add_object(build *b, cJSON *obj, const char *key)
{
    cJSON *x = obj ? cJSON_AddObjectToObject(obj, key) : NULL;
    b->oom = b->oom || !x;
    return x;
}

/* Append a new object to an array; NULL when memory ran out. */
static cJSON *push_object(build *b, cJSON *arr)
{
    cJSON *x = arr ? cJSON_CreateObject() : NULL;
    if (x && !cJSON_AddItemToArray(arr, x)) {
        cJSON_Delete(x);
        x = NULL;
    }
    b->oom = b->oom || !x;
    return x;
}

/* Append [a, b] (or [a, b, c] when n is 3) to an array. */
static void push_tuple(build *b, cJSON *arr, const double *v, int n)
{
    double w[3];
    for (int i = 0; i < n; i++)
        w[i] = isfinite(v[i]) ? v[i] : 0;
    cJSON *x = arr ? cJSON_CreateDoubleArray(w, n) : NULL;
    if (x && !cJSON_AddItemToArray(arr, x)) {
        cJSON_Delete(x);
        x = NULL;
    }
    b->oom = b->oom || !x;
}

/* Money leaves as exact text, "-12.345678" credits: a double would round
 * large amounts of micro-credits. */
static void add_credits(build *b, cJSON *obj, const char *key, int64_t micro)
{
    char text[48];
    add_str(b, obj, key, ar_credits_text(micro, text, sizeof text));
}

/* Indices of at most MAX_SERIES_POINTS of n, evenly, always the last. */
static size_t thin_stride(size_t n)
{
    return n <= MAX_SERIES_POINTS ? 1 : (n + MAX_SERIES_POINTS - 1) / MAX_SERIES_POINTS;
}

static bool keep_index(size_t i, size_t n, size_t stride)
{
    return i % stride == 0 || i + 1 == n;
}

/* ---- requests ---------------------------------------------------------------------- */

/* A non-negative integer query argument, or `def` when absent; -1 when it is
 * not a number in 0..max. */
static int64_t query_int(struct MHD_Connection *conn, const char *key, int64_t def, int64_t max)
{
    const char *v = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, key);
    if (!v)
        return def;
    if (!*v || strlen(v) > 18)
        return -1;
    int64_t x = 0;
    for (const char *p = v; *p; p++) {
        if (!isdigit((unsigned char)*p))
            return -1;
        x = x * 10 + (*p - '0');
    }
    return x <= max ? x : -1;
}

/* The account of the request's bearer token: 0 and *account set, or an
 * answer (401, or 500) already queued in *sent and -1. */
static int authenticate(ar_http *h, struct MHD_Connection *conn, int64_t *account, enum MHD_Result *sent)
{
    const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    const char *prefix = "Bearer ";
    if (!auth || strncmp(auth, prefix, strlen(prefix)) != 0) {
        *sent = send_error(conn, MHD_HTTP_UNAUTHORIZED,
                           "this needs your account token (Authorization: Bearer TOKEN; arceus market "
                           "add-account prints it)");
        return -1;
    }
    const char *token = auth + strlen(prefix);
    size_t n = strlen(token);
    bool hex = n == AR_TOKEN_LEN - 1;
    for (size_t i = 0; hex && i < n; i++)
        hex = isxdigit((unsigned char)token[i]) != 0;
    if (!hex) {
        *sent = send_error(conn, MHD_HTTP_UNAUTHORIZED, "malformed account token: expected %d hex characters",
                           AR_TOKEN_LEN - 1);
        return -1;
    }
    int rc = ar_store_account_auth(h->store, token, account);
    if (rc == AR_ENOTFOUND) {
        *sent = send_error(conn, MHD_HTTP_UNAUTHORIZED, "unknown account token");
        return -1;
    }
    if (rc != AR_OK) {
        *sent = send_store_error(conn);
        return -1;
    }
    return 0;
}

/* ---- GET /api/overview (public) -------------------------------------------------------- */

static enum MHD_Result get_overview(ar_http *h, struct MHD_Connection *conn)
{
    ar_market_totals t;
    if (ar_store_totals(h->store, &t) != AR_OK)
        return send_store_error(conn);
    build b = {0};
    cJSON *doc = cJSON_CreateObject();
    add_num(&b, doc, "providers", (double)t.providers);
    add_num(&b, doc, "providers_online", (double)t.providers_online);
    add_num(&b, doc, "gflops_online", t.gflops_online);
    add_num(&b, doc, "jobs", (double)t.jobs);
    add_num(&b, doc, "jobs_running", (double)t.jobs_running);
    add_credits(&b, doc, "credits_moved", t.credits_moved);
    add_num(&b, doc, "work_paid", (double)t.steps_paid);
    add_num(&b, doc, "offline_after_s", h->offline_after_s);
    add_num(&b, doc, "time", (double)time(NULL));
    return send_built(conn, doc, &b);
}

/* ---- GET /api/me -------------------------------------------------------------------- */

static enum MHD_Result get_me(ar_http *h, struct MHD_Connection *conn, int64_t account)
{
    ar_account me;
    int64_t pending = 0;
    if (ar_store_account_get(h->store, account, &me) != AR_OK ||
        ar_store_account_pending(h->store, account, &pending) != AR_OK)
        return send_store_error(conn);
    build b = {0};
    cJSON *doc = cJSON_CreateObject();
    add_str(&b, doc, "account", me.name);
    add_credits(&b, doc, "balance", me.balance);
    add_credits(&b, doc, "pending", pending);
    add_num(&b, doc, "reliability", me.reliability);
    return send_built(conn, doc, &b);
}

/* ---- GET /api/providers ------------------------------------------------------------------ */

/* Every provider's public profile; the caller's own also with what each
 * earned and when (cumulative credits by time: held in escrow or released
 * to it). Another account's earnings are its ledger's business, not the
 * caller's. */
static enum MHD_Result get_providers(ar_http *h, struct MHD_Connection *conn, int64_t account)
{
    ar_provider *ps = NULL;
    ar_earning *earn = NULL;
    size_t n = 0, ne = 0;
    if (ar_store_provider_list(h->store, false, &ps, &n) != AR_OK ||
        ar_store_provider_earnings(h->store, account, &earn, &ne) != AR_OK) {
        ar_free(ps);
        return send_store_error(conn);
    }
    build b = {0};
    cJSON *doc = cJSON_CreateObject();
    cJSON *arr = add_array(&b, doc, "providers");
    int failed = 0;
    for (size_t i = 0; i < n && !b.oom; i++) {
        const ar_provider *p = &ps[i];
        ar_account owner;
        if (ar_store_account_get(h->store, p->account_id, &owner) != AR_OK) {
            failed = 1;
            break;
        }
        cJSON *o = push_object(&b, arr);
        add_num(&b, o, "id", (double)p->id);
        add_str(&b, o, "account", owner.name);
        add_str(&b, o, "address", p->address);
        add_num(&b, o, "gflops", p->gflops);
        add_num(&b, o, "speed_gflops", ar_rules_speed(p)); /* what renters observed, the claim until then */
        add_num(&b, o, "mem_bytes", (double)p->mem_bytes);
        add_num(&b, o, "cores", p->cores);
        add_credits(&b, o, "price_per_tflop", p->price_per_tflop);
        add_num(&b, o, "reliability", p->reliability);
        add_bool(&b, o, "online", p->online);
        /* the owner's rules, as its last heartbeat said them */
        add_bool(&b, o, "available", !p->unavailable);
        add_str(&b, o, "unavailable_why", p->unavailable ? p->unavailable_why : "");
        add_num(&b, o, "last_heartbeat", (double)p->last_heartbeat);
        add_str(&b, o, "reach", ar_reach_name(p->reach));
        bool mine = p->account_id == account;
        add_bool(&b, o, "mine", mine);
        if (!mine)
            continue;
        /* this provider's rows of earn[] (sorted by provider, then time) */
        size_t first = 0, count = 0;
        while (first < ne && earn[first].provider_id != p->id)
            first++;
        while (first + count < ne && earn[first + count].provider_id == p->id)
            count++;
        int64_t total = 0, work = 0;
        cJSON *series = add_array(&b, o, "earnings");
        size_t stride = thin_stride(count);
        for (size_t k = 0; k < count; k++) {
            total += earn[first + k].amount;
            work += earn[first + k].steps;
            if (keep_index(k, count, stride)) {
                double v[2] = {(double)earn[first + k].time, (double)total / (double)AR_MICRO_PER_CREDIT};
                push_tuple(&b, series, v, 2);
            }
        }
        add_credits(&b, o, "earned", total);
        add_num(&b, o, "work_paid", (double)work);
    }
    ar_free(ps);
    ar_free(earn);
    if (failed) {
        cJSON_Delete(doc);
        return send_store_error(conn);
    }
    return send_built(conn, doc, &b);
}

/* ---- GET /api/jobs and /api/jobs/ID --------------------------------------------------------- */

static void job_fields(build *b, cJSON *o, const ar_job *j)
{
    add_num(b, o, "id", (double)j->id);
    add_str(b, o, "status", ar_job_status_name(j->status));
    add_str(b, o, "spec", j->spec);
    add_num(b, o, "created", (double)j->created);
    add_num(b, o, "step", (double)j->step);
    add_credits(b, o, "max_credits", j->max_credits);
    add_credits(b, o, "spent", j->spent);
}

static enum MHD_Result get_jobs(ar_http *h, struct MHD_Connection *conn, int64_t account)
{
    ar_job *jobs = NULL;
    size_t n = 0;
    if (ar_store_job_list(h->store, account, &jobs, &n) != AR_OK)
        return send_store_error(conn);
    build b = {0};
    cJSON *doc = cJSON_CreateObject();
    cJSON *arr = add_array(&b, doc, "jobs");
    for (size_t i = n; i-- > 0 && !b.oom;) /* newest first */
        job_fields(&b, push_object(&b, arr), &jobs[i]);
    ar_store_jobs_free(jobs, n);
    return send_built(conn, doc, &b);
}

/* A loss curve as [completed steps, loss] pairs. Training losses are stored
 * by 0-based step: the point of step s is after s + 1 steps. */
static void add_points(build *b, cJSON *o, const char *key, const ar_job_point *p, size_t n, int64_t step_offset,
                       bool thin)
{
    cJSON *arr = add_array(b, o, key);
    size_t stride = thin ? thin_stride(n) : 1;
    for (size_t i = 0; i < n && !b->oom; i++)
        if (keep_index(i, n, stride)) {
            double v[2] = {(double)(p[i].step + step_offset), p[i].loss};
            push_tuple(b, arr, v, 2);
        }
}

/* Each stage's busy and idle seconds sampled along the run, as
 * {"step": S, "wall_s": W, "busy": [..], "idle": [..]} per sample (thinned:
 * the values are totals since the start, so any subset stays exact). */
static void add_timeline(build *b, cJSON *o, const ar_stage_time *t, size_t n)
{
    cJSON *arr = add_array(b, o, "timeline");
    size_t samples = 0;
    for (size_t i = 0; i < n; i++)
        samples += i == 0 || t[i].step != t[i - 1].step;
    size_t stride = thin_stride(samples), k = 0;
    for (size_t i = 0; i < n && !b->oom; k++) {
        size_t j = i;
        while (j < n && t[j].step == t[i].step)
            j++;
        if (keep_index(k, samples, stride)) {
            cJSON *s = push_object(b, arr);
            add_num(b, s, "step", (double)t[i].step);
            add_num(b, s, "wall_s", t[i].wall_s);
            cJSON *busy = add_array(b, s, "busy"), *idle = add_array(b, s, "idle");
            for (size_t q = i; q < j && !b->oom; q++) {
                cJSON *x = cJSON_CreateNumber(t[q].busy_s), *y = cJSON_CreateNumber(t[q].idle_s);
                bool ok = x && y && busy && idle && cJSON_AddItemToArray(busy, x);
                if (!ok)
                    cJSON_Delete(x);
                ok = ok && cJSON_AddItemToArray(idle, y);
                if (!ok) {
                    cJSON_Delete(y);
                    b->oom = true;
                }
            }
        }
        i = j;
    }
}

/* The job's latest snapshot and plan (null before its first report). */
static int add_live(build *b, cJSON *o, const ar_job_live *l, bool have)
{
    if (!have) {
        b->oom = b->oom || !cJSON_AddNullToObject(o, "live") || !cJSON_AddNullToObject(o, "plan");
        return AR_OK;
    }
    cJSON *live = add_object(b, o, "live");
    add_num(b, live, "step", (double)l->step);
    add_num(b, live, "total_steps", (double)l->total_steps);
    add_num(b, live, "items_per_s", l->items_per_s);
    add_str(b, live, "unit", l->unit);
    add_num(b, live, "eta_s", l->eta_s);
    add_num(b, live, "wall_s", l->wall_s);
    add_num(b, live, "updated", (double)l->updated);
    cJSON *plan = l->plan ? cJSON_Parse(l->plan) : NULL;
    if (l->plan && !plan)
        return ar_fail(AR_EFORMAT, "the stored plan is not JSON");
    if (!plan)
        b->oom = b->oom || !cJSON_AddNullToObject(o, "plan");
    else if (!cJSON_AddItemToObject(o, "plan", plan)) {
        cJSON_Delete(plan);
        b->oom = true;
    }
    return AR_OK;
}

static enum MHD_Result get_job(ar_http *h, struct MHD_Connection *conn, int64_t account, int64_t job_id)
{
    /* since=N: only the training losses after N completed steps (polling) */
    int64_t since = query_int(conn, "since", 0, INT64_MAX / 2);
    if (since < 0)
        return send_error(conn, MHD_HTTP_BAD_REQUEST, "since must be a number of steps");
    ar_job job;
    int rc = ar_store_job_get(h->store, job_id, &job);
    if (rc == AR_ENOTFOUND)
        return send_error(conn, MHD_HTTP_NOT_FOUND, "no job %" PRId64, job_id);
    if (rc != AR_OK)
        return send_store_error(conn);
    if (job.renter_id != account) {
        ar_store_job_clear(&job);
        ar_log(AR_LOG_WARN, "dashboard: account %" PRId64 " asked for job %" PRId64 " of another account: refused",
               account, job_id);
        return send_error(conn, MHD_HTTP_FORBIDDEN, "job %" PRId64 " belongs to another account", job_id);
    }
    ar_job_point *loss = NULL, *val = NULL;
    ar_stage_time *times = NULL;
    size_t nl = 0, nv = 0, nt = 0;
    ar_job_live live = {0};
    bool have_live = false;
    if ((rc = ar_store_job_progress_since(h->store, job_id, since - 1, &loss, &nl)) == AR_OK &&
        (rc = ar_store_job_val(h->store, job_id, &val, &nv)) == AR_OK &&
        (rc = ar_store_job_stage_times(h->store, job_id, &times, &nt)) == AR_OK) {
        rc = ar_store_job_live_get(h->store, job_id, &live);
        have_live = rc == AR_OK;
        if (rc == AR_ENOTFOUND)
            rc = AR_OK;
    }
    build b = {0};
    cJSON *doc = NULL;
    if (rc == AR_OK) {
        doc = cJSON_CreateObject();
        job_fields(&b, add_object(&b, doc, "job"), &job);
        /* polling asks for the points it lacks, all of them; a first load of
         * a long run gets them thinned */
        add_points(&b, doc, "loss", loss, nl, 1, since == 0);
        add_points(&b, doc, "val_loss", val, nv, 0, false);
        add_timeline(&b, doc, times, nt);
        if (doc)
            rc = add_live(&b, doc, &live, have_live);
    }
    ar_store_job_clear(&job);
    ar_store_job_live_clear(&live);
    ar_free(loss);
    ar_free(val);
    ar_free(times);
    if (rc != AR_OK) {
        cJSON_Delete(doc);
        return send_store_error(conn);
    }
    return send_built(conn, doc, &b);
}

/* ---- GET /api/ledger ------------------------------------------------------------------------- */

/* The caller's ledger: balance, totals by reason, the newest `limit` rows.
 * ?account=NAME other than the caller's own is refused, as by the gRPC
 * Ledger: an account reads only its own. */
static enum MHD_Result get_ledger(ar_http *h, struct MHD_Connection *conn, int64_t account)
{
    int64_t limit = query_int(conn, "limit", LEDGER_DEFAULT_ROWS, LEDGER_MAX_ROWS);
    if (limit < 0)
        return send_error(conn, MHD_HTTP_BAD_REQUEST, "limit must be 0..%d rows", LEDGER_MAX_ROWS);
    ar_account me;
    if (ar_store_account_get(h->store, account, &me) != AR_OK)
        return send_store_error(conn);
    const char *asked = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "account");
    if (asked && *asked && strcmp(asked, me.name) != 0) {
        ar_log(AR_LOG_WARN, "dashboard: account %s asked for another account's ledger: refused", me.name);
        return send_error(conn, MHD_HTTP_FORBIDDEN, "account %s may read only its own ledger", me.name);
    }
    ar_ledger_row *rows = NULL;
    size_t n = 0;
    int64_t balance = 0, pending = 0;
    if (ar_store_ledger_list(h->store, account, &rows, &n) != AR_OK ||
        ar_store_account_balance(h->store, account, &balance) != AR_OK ||
        ar_store_account_pending(h->store, account, &pending) != AR_OK) {
        ar_free(rows);
        return send_store_error(conn);
    }
    /* totals by reason: what was minted, paid (into escrow), earned (released
     * from it to the account's providers), reversed (given back to it) */
    int64_t minted = 0, paid = 0, earned = 0, reversed = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t a = rows[i].amount;
        if (!strcmp(rows[i].reason, "mint"))
            minted += a;
        else if (!strcmp(rows[i].reason, "usage"))
            paid += a;
        else if (!strcmp(rows[i].reason, "release"))
            earned += a;
        else
            reversed += a;
    }
    build b = {0};
    cJSON *doc = cJSON_CreateObject();
    add_str(&b, doc, "account", me.name);
    add_credits(&b, doc, "balance", balance);
    /* earned, and held until audits verify it or its job's settling window passes */
    add_credits(&b, doc, "pending", pending);
    add_num(&b, doc, "rows_total", (double)n);
    cJSON *tot = add_object(&b, doc, "totals");
    add_credits(&b, tot, "minted", minted);
    add_credits(&b, tot, "paid", paid);
    add_credits(&b, tot, "earned", earned);
    add_credits(&b, tot, "reversed", reversed);
    cJSON *arr = add_array(&b, doc, "rows");
    for (size_t i = n, k = 0; i-- > 0 && k < (size_t)limit && !b.oom; k++) {
        const ar_ledger_row *r = &rows[i];
        cJSON *o = push_object(&b, arr);
        add_num(&b, o, "id", (double)r->id);
        add_num(&b, o, "transfer", (double)r->transfer_id);
        add_num(&b, o, "time", (double)r->created);
        add_str(&b, o, "reason", r->reason);
        add_num(&b, o, "job", (double)r->job_id);
        add_num(&b, o, "step", (double)r->step);
        add_credits(&b, o, "amount", r->amount);
    }
    ar_free(rows);
    return send_built(conn, doc, &b);
}

/* ---- routing ------------------------------------------------------------------------------------ */

/* "/api/jobs/123" -> 123; -1 when the rest is not a job id */
static int64_t job_id_of(const char *rest)
{
    if (!*rest || strlen(rest) > 18)
        return -1;
    int64_t id = 0;
    for (const char *p = rest; *p; p++) {
        if (!isdigit((unsigned char)*p))
            return -1;
        id = id * 10 + (*p - '0');
    }
    return id > 0 ? id : -1;
}

static enum MHD_Result serve_api(ar_http *h, struct MHD_Connection *conn, const char *url)
{
    if (!strcmp(url, "/api/overview"))
        return get_overview(h, conn);
    static const char jobs_prefix[] = "/api/jobs/";
    bool known = !strcmp(url, "/api/me") || !strcmp(url, "/api/providers") || !strcmp(url, "/api/jobs") ||
                 !strcmp(url, "/api/ledger") || !strncmp(url, jobs_prefix, sizeof jobs_prefix - 1);
    if (!known)
        return send_error(conn, MHD_HTTP_NOT_FOUND, "no such API: %.100s", url);
    int64_t account;
    enum MHD_Result sent;
    if (authenticate(h, conn, &account, &sent) != 0)
        return sent;
    if (!strcmp(url, "/api/me"))
        return get_me(h, conn, account);
    if (!strcmp(url, "/api/providers"))
        return get_providers(h, conn, account);
    if (!strcmp(url, "/api/jobs"))
        return get_jobs(h, conn, account);
    if (!strcmp(url, "/api/ledger"))
        return get_ledger(h, conn, account);
    int64_t id = job_id_of(url + sizeof jobs_prefix - 1);
    if (id < 0)
        return send_error(conn, MHD_HTTP_NOT_FOUND, "no such job: %.40s", url + sizeof jobs_prefix - 1);
    return get_job(h, conn, account, id);
}

static enum MHD_Result serve_file(struct MHD_Connection *conn, const char *url)
{
    const char *path = !strcmp(url, "/") ? "/index.html" : url;
    for (const ar_web_file *f = ar_web_files; f->path; f++)
        if (!strcmp(f->path, path))
            return send_body(conn, MHD_HTTP_OK, f->type, (void *)f->data, f->size, MHD_RESPMEM_PERSISTENT, false);
    static char missing[] = "not found\n";
    return send_body(conn, MHD_HTTP_NOT_FOUND, "text/plain; charset=utf-8", missing, strlen(missing),
                     MHD_RESPMEM_PERSISTENT, false);
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                              const char *version, const char *upload_data, size_t *upload_data_size,
                              void **con_cls)
{
    ar_http *h = cls;
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return send_error(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "the dashboard answers GET only");
    /* a GET with a body: we read none, so the request is refused */
    if (*upload_data_size != 0)
        return MHD_NO;
    if (!strncmp(url, "/api/", 5))
        return serve_api(h, conn, url);
    return serve_file(conn, url);
}

/* ---- start and stop ----------------------------------------------------------------------------- */

/* A port number, 0..65535; -1 when it is not one */
static int parse_port(const char *p)
{
    if (!*p || strlen(p) > 5)
        return -1;
    int v = 0;
    for (; *p; p++) {
        if (!isdigit((unsigned char)*p))
            return -1;
        v = v * 10 + (*p - '0');
    }
    return v <= 65535 ? v : -1;
}

/* The dashboard's connections (serve_on). */
#define HTTP_IDLE_S 10
#define HTTP_PER_IP 16
#define HTTP_CONNECTION_BYTES (32u << 10)
#define HTTP_MAX_CONNECTIONS 1000u

/* At most HTTP_MAX_CONNECTIONS, and at most a quarter of the process's file
 * descriptors: the rest are the market's gRPC connections and database. */
static unsigned connection_limit(void)
{
    struct rlimit rl;
    unsigned limit = HTTP_MAX_CONNECTIONS;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur / 4 < limit)
        limit = rl.rlim_cur / 4 > 64 ? (unsigned)(rl.rlim_cur / 4) : 64;
    return limit;
}

/* Serve on "HOST:PORT" ([v6]:PORT too): libmicrohttpd binds the first of
 * the host's addresses that works and owns that socket; *port gets the
 * real port. */
static int serve_on(ar_http *h, const char *listen_addr, int *port)
{
    char host[256];
    const char *colon = strrchr(listen_addr, ':');
    size_t hl = colon ? (size_t)(colon - listen_addr) : 0;
    if (!colon || hl == 0 || hl >= sizeof host || parse_port(colon + 1) < 0)
        return ar_fail(AR_EINVAL, "--http %s: expected HOST:PORT with a port 0..65535", listen_addr);
    memcpy(host, listen_addr, hl);
    host[hl] = '\0';
    if (hl > 2 && host[0] == '[' && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = '\0';
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    int g = getaddrinfo(host, colon + 1, &hints, &res);
    if (g != 0)
        return ar_fail(AR_EINVAL, "--http %s: %s", listen_addr, gai_strerror(g));
    int err = 0;
    unsigned limit = connection_limit();
    for (struct addrinfo *a = res; a && !h->daemon; a = a->ai_next) {
        /* One internal thread polls every connection (epoll where there is),
         * so a slow socket costs a descriptor and its buffer, never a
         * thread. Slow or idle sockets must not lock out a browser: a
         * connection quiet for 10 s is closed (a browser reconnects at
         * once), one address holds at most 16 at once (a browser opens about
         * 6 per site), and the daemon many (connection_limit): 300 slow
         * sockets from as many addresses leave room for an honest one. A
         * connection's buffer, 32 KiB, bounds the request line, the headers
         * and any body read (the dashboard reads none: a GET with a body is
         * closed, other methods are refused from the headers). */
        unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | (a->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0);
        errno = 0;
        h->daemon = MHD_start_daemon(flags, 0, NULL, NULL, handle, h, MHD_OPTION_SOCK_ADDR, a->ai_addr,
                                     MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)HTTP_IDLE_S,
                                     MHD_OPTION_CONNECTION_LIMIT, limit,
                                     MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)HTTP_PER_IP,
                                     MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HTTP_CONNECTION_BYTES,
                                     MHD_OPTION_END);
        err = errno;
    }
    freeaddrinfo(res);
    if (!h->daemon)
        return ar_fail(AR_EIO, "--http %s: cannot serve there%s%s", listen_addr, err ? ": " : "",
                       err ? strerror(err) : "");
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_BIND_PORT);
    *port = info ? info->port : 0;
    return AR_OK;
}

int ar_http_start(const char *listen_addr, const char *db_path, int offline_after_s, ar_http **out, char *addr,
                  size_t addr_size)
{
    *out = NULL;
    ar_http *h = calloc(1, sizeof *h);
    if (!h)
        return ar_fail(AR_ENOMEM, "out of memory");
    h->offline_after_s = offline_after_s;
    int port = 0;
    int rc = ar_store_open(db_path, &h->store);
    if (rc == AR_OK)
        rc = serve_on(h, listen_addr, &port);
    if (rc != AR_OK) {
        ar_http_stop(h);
        return rc;
    }
    const char *colon = strrchr(listen_addr, ':');
    snprintf(addr, addr_size, "%.*s:%d", (int)(colon - listen_addr), listen_addr, port);
    *out = h;
    return AR_OK;
}

void ar_http_stop(ar_http *h)
{
    if (!h)
        return;
    if (h->daemon)
        MHD_stop_daemon(h->daemon); /* joins its thread, closes its sockets */
    ar_store_close(h->store);
    free(h);
}
