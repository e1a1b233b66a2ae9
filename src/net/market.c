/* The Market service (proto/arceus.proto) over the store (market/store.h):
 * the server's handlers and its offline sweep (the client side of the RPCs
 * is market_client.c).
 *
 * A handler reads one request, checks the token, then every field (sizes,
 * ranges, strings), and only then calls the store: what reaches the database
 * is always well formed, and a bad request costs a status, never a crash. */
#include "net/market.h"

#include "arceus.h"
#include "arceus.pb-c.h"
#include "core/core.h"
#include "net/net_internal.h"
#include "train/plan.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Requests are small; anything bigger is not one of ours. */
#define MAX_REQUEST_BYTES (64u << 10)

struct ar_market {
    ar_server *server;
    ar_store *store;
    int offline_after_s;
    pthread_t sweeper;
    int sweeper_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stopping;
    /* AcquireLease: choosing free providers and leasing them is one step,
     * so that two renters asking at once never get the same provider */
    pthread_mutex_t acquire_mu;
};

/* ---- server: helpers -------------------------------------------------------- */

/* Read and unpack the one request of a unary call; NULL (status sent) when
 * there is none or it does not parse. */
static ProtobufCMessage *read_request(ar_rpc *rpc, const ProtobufCMessageDescriptor *d)
{
    void *data;
    size_t len;
    if (ar_rpc_read(rpc, &data, &len) != AR_OK) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "%s without a request", d->short_name);
        return NULL;
    }
    if (len > MAX_REQUEST_BYTES) {
        free(data);
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "%s of %zu bytes: the limit is %u", d->short_name,
                      len, MAX_REQUEST_BYTES);
        return NULL;
    }
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, len, data);
    free(data);
    if (!m)
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "malformed %s", d->short_name);
    return m;
}

/* Room for a reply's repeated message field of n items: the items (size
 * bytes each, zeroed) and the array of pointers to them that protobuf-c
 * takes, in one block whose start is *ptrs; free(*ptrs) releases both.
 * 0, or -1 with INTERNAL sent. */
static int reply_list(ar_rpc *rpc, size_t n, size_t size, void **items, void ***ptrs)
{
    size_t count = n ? n : 1, each = sizeof **ptrs + size;
    void **p = count <= SIZE_MAX / each ? calloc(count, each) : NULL;
    if (!p) {
        ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory for a reply of %zu items", n);
        return -1;
    }
    /* the pointers first, then the items: protobuf-c messages need no more
     * than a pointer's alignment */
    char *first = (char *)(p + count);
    for (size_t i = 0; i < n; i++)
        p[i] = first + i * size;
    *items = first;
    *ptrs = p;
    return 0;
}

/* A store failure as a status: the caller's fault or ours. */
static void store_error(ar_rpc *rpc, int rc)
{
    int code = rc == AR_ENOTFOUND ? AR_STATUS_NOT_FOUND
               : rc == AR_EINVAL  ? AR_STATUS_INVALID_ARGUMENT
               : rc == AR_ELIMIT  ? AR_STATUS_FAILED_PRECONDITION
                                  : AR_STATUS_INTERNAL;
    if (code == AR_STATUS_INTERNAL)
        ar_log(AR_LOG_ERROR, "market: %s", ar_last_error());
    ar_rpc_finish(rpc, code, "%s", ar_last_error());
}

/* The account of a token, or UNAUTHENTICATED (status sent) and -1. */
static int authenticate(ar_market *m, ar_rpc *rpc, const char *token, int64_t *account_id)
{
    size_t n = token ? strlen(token) : 0;
    if (n == 0) {
        ar_rpc_finish(rpc, AR_STATUS_UNAUTHENTICATED,
                      "no account token: pass --token (arceus market add-account prints one)");
        return -1;
    }
    bool hex = n == AR_TOKEN_LEN - 1;
    for (size_t i = 0; hex && i < n; i++)
        hex = isxdigit((unsigned char)token[i]) != 0;
    if (!hex) {
        ar_log(AR_LOG_WARN, "market: malformed token from %s", ar_rpc_peer(rpc));
        ar_rpc_finish(rpc, AR_STATUS_UNAUTHENTICATED, "malformed account token: expected %d hex characters",
                      AR_TOKEN_LEN - 1);
        return -1;
    }
    int rc = ar_store_account_auth(m->store, token, account_id);
    if (rc == AR_ENOTFOUND) {
        ar_log(AR_LOG_WARN, "market: unknown token from %s", ar_rpc_peer(rpc));
        ar_rpc_finish(rpc, AR_STATUS_UNAUTHENTICATED, "unknown account token");
        return -1;
    }
    if (rc != AR_OK) {
        store_error(rpc, rc);
        return -1;
    }
    return 0;
}

/* "HOST:PORT" (HOST a name, an IPv4 address or a bracketed IPv6 one), port
 * 1..65535, no spaces or commas (addresses end up in comma lists). */
static bool address_ok(const char *a, char *why, size_t why_size)
{
    size_t n = strlen(a);
    if (n == 0 || n >= AR_ADDR_MAX) {
        snprintf(why, why_size, "worker address must be 1..%d characters", AR_ADDR_MAX - 1);
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)a[i];
        if (!(isalnum(c) || c == '.' || c == '-' || c == '_' || c == ':' || c == '[' || c == ']')) {
            snprintf(why, why_size, "worker address \"%.64s\" has a character not allowed in HOST:PORT",
                     a);
            return false;
        }
    }
    const char *colon = strrchr(a, ':');
    if (!colon || colon == a || !colon[1] || strlen(colon + 1) > 5) {
        snprintf(why, why_size, "worker address \"%.64s\" is not HOST:PORT", a);
        return false;
    }
    long port = 0;
    for (const char *p = colon + 1; *p; p++) {
        if (!isdigit((unsigned char)*p)) {
            snprintf(why, why_size, "worker address \"%.64s\": the port is not a number", a);
            return false;
        }
        port = port * 10 + (*p - '0');
    }
    if (port < 1 || port > 65535) {
        snprintf(why, why_size, "worker address \"%.64s\": port %ld out of range 1..65535", a, port);
        return false;
    }
    if (a[0] == '[' && colon[-1] != ']') {
        snprintf(why, why_size, "worker address \"%.64s\": unterminated [IPv6] host", a);
        return false;
    }
    return true;
}

static bool profile_ok(const Arceus__ProviderProfile *p, char *why, size_t why_size)
{
    if (!p) {
        snprintf(why, why_size, "RegisterProvider without a profile");
        return false;
    }
    if (!isfinite(p->gflops) || p->gflops <= 0 || p->gflops > AR_MARKET_MAX_GFLOPS) {
        snprintf(why, why_size, "profile gflops %g out of range (0, %g]", p->gflops, AR_MARKET_MAX_GFLOPS);
        return false;
    }
    if (p->mem_bytes == 0 || p->mem_bytes > (uint64_t)AR_MARKET_MAX_MEM) {
        snprintf(why, why_size, "profile mem_bytes %llu out of range 1..%lld",
                 (unsigned long long)p->mem_bytes, (long long)AR_MARKET_MAX_MEM);
        return false;
    }
    if (p->cores < 1 || p->cores > AR_MARKET_MAX_CORES) {
        snprintf(why, why_size, "profile cores %u out of range 1..%d", p->cores, AR_MARKET_MAX_CORES);
        return false;
    }
    if (p->price_per_tflop < 0 || p->price_per_tflop > AR_MARKET_MAX_PRICE) {
        snprintf(why, why_size, "profile price_per_tflop %lld out of range 0..%lld micro-credits",
                 (long long)p->price_per_tflop, (long long)AR_MARKET_MAX_PRICE);
        return false;
    }
    return true;
}

/* ---- server: handlers --------------------------------------------------------- */

static void on_register(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__RegisterProviderRequest *req =
        (Arceus__RegisterProviderRequest *)read_request(rpc, &arceus__register_provider_request__descriptor);
    if (!req)
        return;
    int64_t account;
    char why[200];
    if (authenticate(m, rpc, req->token, &account) != 0)
        goto out;
    if (!address_ok(req->address, why, sizeof why) || !profile_ok(req->profile, why, sizeof why)) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "%s", why);
        goto out;
    }
    ar_provider p = {0};
    p.account_id = account;
    snprintf(p.address, sizeof p.address, "%s", req->address);
    p.gflops = req->profile->gflops;
    p.mem_bytes = (int64_t)req->profile->mem_bytes;
    p.cores = (int)req->profile->cores;
    p.price_per_tflop = req->profile->price_per_tflop;
    /* reliability is the market's record, not the provider's claim: a
     * re-registration keeps it, a new provider starts at 1 */
    p.reliability = 1.0;
    ar_provider *all = NULL;
    size_t n = 0;
    int rc = ar_store_provider_list(m->store, false, &all, &n);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        if (all[i].account_id == account && strcmp(all[i].address, p.address) == 0)
            p.reliability = all[i].reliability;
    ar_free(all);
    int64_t id;
    if ((rc = ar_store_provider_register(m->store, &p, &id)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    ar_log(AR_LOG_INFO, "market: provider %lld at %s registered (%.1f GFLOP/s, %d cores)", (long long)id,
           p.address, p.gflops, p.cores);
    Arceus__RegisterProviderReply r = ARCEUS__REGISTER_PROVIDER_REPLY__INIT;
    r.provider_id = id;
    r.offline_after_s = (uint32_t)m->offline_after_s;
    net_rpc_reply(rpc, &r.base);
out:
    arceus__register_provider_request__free_unpacked(req, NULL);
}

static void on_heartbeat(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__HeartbeatRequest *req =
        (Arceus__HeartbeatRequest *)read_request(rpc, &arceus__heartbeat_request__descriptor);
    if (!req)
        return;
    int64_t account;
    if (authenticate(m, rpc, req->token, &account) != 0)
        goto out;
    if (req->provider_id <= 0) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "provider_id %lld is not a provider id",
                      (long long)req->provider_id);
        goto out;
    }
    ar_provider p;
    int rc = ar_store_provider_get(m->store, req->provider_id, &p);
    if (rc == AR_OK && p.account_id != account) {
        ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED, "provider %lld belongs to another account",
                      (long long)req->provider_id);
        goto out;
    }
    if (rc == AR_OK)
        rc = ar_store_provider_heartbeat(m->store, req->provider_id);
    if (rc == AR_ENOTFOUND) {
        ar_rpc_finish(rpc, AR_STATUS_NOT_FOUND, "no provider %lld (register first)",
                      (long long)req->provider_id);
        goto out;
    }
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    Arceus__HeartbeatReply r = ARCEUS__HEARTBEAT_REPLY__INIT;
    net_rpc_reply(rpc, &r.base);
out:
    arceus__heartbeat_request__free_unpacked(req, NULL);
}

static void on_list_providers(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__ListProvidersRequest *req =
        (Arceus__ListProvidersRequest *)read_request(rpc, &arceus__list_providers_request__descriptor);
    if (!req)
        return;
    int64_t account;
    ar_provider *ps = NULL;
    size_t n = 0;
    Arceus__ProviderInfo *infos = NULL, **ptrs = NULL;
    Arceus__ProviderProfile *profiles = NULL;
    ar_account *names = NULL;
    if (authenticate(m, rpc, req->token, &account) != 0)
        goto out;
    int rc = ar_store_provider_list(m->store, !req->include_offline, &ps, &n);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    if (reply_list(rpc, n, sizeof *infos, (void **)&infos, (void ***)&ptrs) != 0)
        goto out;
    profiles = calloc(n ? n : 1, sizeof *profiles);
    names = calloc(n ? n : 1, sizeof *names);
    if (!profiles || !names) {
        ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if ((rc = ar_store_account_get(m->store, ps[i].account_id, &names[i])) != AR_OK) {
            store_error(rpc, rc);
            goto out;
        }
        Arceus__ProviderProfile pp = ARCEUS__PROVIDER_PROFILE__INIT;
        pp.gflops = ps[i].gflops;
        pp.mem_bytes = (uint64_t)ps[i].mem_bytes;
        pp.cores = (uint32_t)ps[i].cores;
        pp.price_per_tflop = ps[i].price_per_tflop;
        profiles[i] = pp;
        Arceus__ProviderInfo pi = ARCEUS__PROVIDER_INFO__INIT;
        pi.id = ps[i].id;
        pi.account = names[i].name;
        pi.address = ps[i].address;
        pi.profile = &profiles[i];
        pi.reliability = ps[i].reliability;
        pi.online = ps[i].online;
        pi.last_heartbeat = ps[i].last_heartbeat;
        infos[i] = pi;
    }
    Arceus__ListProvidersReply r = ARCEUS__LIST_PROVIDERS_REPLY__INIT;
    r.n_providers = n;
    r.providers = ptrs;
    net_rpc_reply(rpc, &r.base);
out:
    free(ptrs); /* and infos */
    free(profiles);
    free(names);
    ar_free(ps);
    arceus__list_providers_request__free_unpacked(req, NULL);
}

static void on_ledger(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__LedgerRequest *req = (Arceus__LedgerRequest *)read_request(rpc, &arceus__ledger_request__descriptor);
    if (!req)
        return;
    int64_t account;
    ar_account me;
    ar_ledger_row *rows = NULL;
    size_t n = 0;
    Arceus__LedgerRow *lr = NULL, **ptrs = NULL;
    if (authenticate(m, rpc, req->token, &account) != 0)
        goto out;
    if (strlen(req->account) >= AR_NAME_MAX) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "account name longer than %d characters",
                      AR_NAME_MAX - 1);
        goto out;
    }
    int rc = ar_store_account_get(m->store, account, &me);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    /* an unknown name gets the same answer as another's: whether an account
     * exists is not the caller's business */
    if (req->account[0] && strcmp(req->account, me.name) != 0) {
        ar_log(AR_LOG_WARN, "market: account %s asked for the ledger of %s: refused", me.name, req->account);
        ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED,
                      "account %s may read only its own ledger, not that of %s", me.name, req->account);
        goto out;
    }
    int64_t balance;
    if ((rc = ar_store_ledger_list(m->store, account, &rows, &n)) != AR_OK ||
        (rc = ar_store_account_balance(m->store, account, &balance)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    if (reply_list(rpc, n, sizeof *lr, (void **)&lr, (void ***)&ptrs) != 0)
        goto out;
    for (size_t i = 0; i < n; i++) {
        Arceus__LedgerRow row = ARCEUS__LEDGER_ROW__INIT;
        row.id = rows[i].id;
        row.transfer_id = rows[i].transfer_id;
        row.amount = rows[i].amount;
        row.reason = rows[i].reason;
        row.job_id = rows[i].job_id;
        row.step = rows[i].step;
        row.created = rows[i].created;
        lr[i] = row;
    }
    Arceus__LedgerReply r = ARCEUS__LEDGER_REPLY__INIT;
    r.account = me.name;
    r.n_rows = n;
    r.rows = ptrs;
    r.balance = balance;
    net_rpc_reply(rpc, &r.base);
out:
    free(ptrs); /* and lr */
    ar_free(rows);
    arceus__ledger_request__free_unpacked(req, NULL);
}

static void on_balance(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__BalanceRequest *req = (Arceus__BalanceRequest *)read_request(rpc, &arceus__balance_request__descriptor);
    if (!req)
        return;
    int64_t account;
    ar_account me;
    if (authenticate(m, rpc, req->token, &account) != 0)
        goto out;
    int rc = ar_store_account_get(m->store, account, &me);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    Arceus__BalanceReply r = ARCEUS__BALANCE_REPLY__INIT;
    r.account = me.name;
    r.balance = me.balance;
    net_rpc_reply(rpc, &r.base);
out:
    arceus__balance_request__free_unpacked(req, NULL);
}

/* ---- server: leases ----------------------------------------------------------- */

static bool token_hex(const char *t)
{
    size_t n = t ? strlen(t) : 0;
    if (n != AR_TOKEN_LEN - 1)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)t[i]))
            return false;
    return true;
}

/* The live lease of a lease token, or UNAUTHENTICATED (status sent) and -1. */
static int authenticate_lease(ar_market *m, ar_rpc *rpc, const char *token, ar_lease *out)
{
    if (!token_hex(token)) {
        ar_rpc_finish(rpc, AR_STATUS_UNAUTHENTICATED, "missing or malformed lease token: expected %d hex characters",
                      AR_TOKEN_LEN - 1);
        return -1;
    }
    int rc = ar_store_lease_auth(m->store, token, out);
    if (rc == AR_ENOTFOUND) {
        ar_rpc_finish(rpc, AR_STATUS_UNAUTHENTICATED, "unknown or released lease token");
        return -1;
    }
    if (rc != AR_OK) {
        store_error(rpc, rc);
        return -1;
    }
    return 0;
}

/* How the market picks N providers among the online ones.
 *
 * A provider offering less memory than the request's min_mem_bytes is left
 * out. The others are ranked by
 *
 *     score = reliability^2 * (gflops / best_gflops) / (price + p0) * (min_price + p0)
 *
 * i.e. speed per credit, each factor normalised to the best candidate: a
 * provider twice as fast at the same price scores twice as high, one twice as
 * expensive at the same speed half as high. p0 = 1 credit per TFLOP keeps
 * free providers from scoring infinitely and damps tiny price differences.
 * Reliability is squared: the pipeline stalls on any one stage, so an
 * unreliable member costs the whole job, not just its share. Ties go to more
 * memory, then to the older registration (lower id). The N best are leased,
 * in the order of their scores. */
typedef struct {
    const ar_provider *p;
    double score;
} ranked;

static int rank_cmp(const void *a, const void *b)
{
    const ranked *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    if (x->p->mem_bytes != y->p->mem_bytes)
        return x->p->mem_bytes > y->p->mem_bytes ? -1 : 1;
    return x->p->id < y->p->id ? -1 : x->p->id > y->p->id;
}

/* The free online providers offering at least min_mem bytes, best first:
 * (*rk)[0..*k) point into *ps (both the caller's to free, also on failure);
 * *busy counts those left out because a live lease holds them. Called with
 * acquire_mu held. */
static int rank_free(ar_market *m, uint64_t min_mem, ar_provider **ps, ranked **rk, size_t *k, size_t *busy)
{
    size_t n = 0;
    *rk = NULL;
    *k = *busy = 0;
    int rc = ar_store_provider_list(m->store, true, ps, &n);
    if (rc != AR_OK)
        return rc;
    if (!(*rk = calloc(n ? n : 1, sizeof **rk)))
        return ar_fail(AR_ENOMEM, "out of memory");
    double best_gflops = 0;
    int64_t min_price = INT64_MAX;
    for (size_t i = 0; i < n; i++) {
        const ar_provider *p = &(*ps)[i];
        if ((uint64_t)p->mem_bytes < min_mem)
            continue;
        /* a worker hosts one stage: a provider leased to a live job is not free */
        bool leased = false;
        if ((rc = ar_store_provider_leased(m->store, p->id, &leased)) != AR_OK)
            return rc;
        if (leased) {
            (*busy)++;
            continue;
        }
        (*rk)[(*k)++].p = p;
        if (p->gflops > best_gflops)
            best_gflops = p->gflops;
        if (p->price_per_tflop < min_price)
            min_price = p->price_per_tflop;
    }
    const double p0 = (double)AR_MICRO_PER_CREDIT;
    for (size_t i = 0; i < *k; i++) {
        const ar_provider *p = (*rk)[i].p;
        double rel = p->reliability < 0 ? 0 : p->reliability > 1 ? 1 : p->reliability;
        (*rk)[i].score = rel * rel * (best_gflops > 0 ? p->gflops / best_gflops : 1) * ((double)min_price + p0) /
                         ((double)p->price_per_tflop + p0);
    }
    qsort(*rk, *k, sizeof **rk, rank_cmp);
    return AR_OK;
}

/* A leased provider as the reply shows it; pp is its profile's storage. */
static void leased_msg(const ar_provider *p, const char *account, int64_t flops_per_step,
                       Arceus__ProviderProfile *pp, Arceus__LeasedProvider *l)
{
    Arceus__ProviderProfile prof = ARCEUS__PROVIDER_PROFILE__INIT;
    prof.gflops = p->gflops;
    prof.mem_bytes = (uint64_t)p->mem_bytes;
    prof.cores = (uint32_t)p->cores;
    prof.price_per_tflop = p->price_per_tflop;
    *pp = prof;
    Arceus__LeasedProvider x = ARCEUS__LEASED_PROVIDER__INIT;
    x.provider_id = p->id;
    x.account = (char *)account;
    x.address = (char *)p->address;
    x.profile = pp;
    x.reliability = p->reliability;
    x.flops_per_step = flops_per_step;
    *l = x;
}

static void on_acquire(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__AcquireLeaseRequest *req =
        (Arceus__AcquireLeaseRequest *)read_request(rpc, &arceus__acquire_lease_request__descriptor);
    if (!req)
        return;
    int64_t renter;
    ar_provider *ps = NULL;
    ranked *rk = NULL;
    int64_t job_id = 0;
    int acquiring = 0;
    /* a resumed job whose new lease then cannot be made (too few providers)
     * is marked failed, not left "running" without a lease; a later
     * --resume brings it back */
    int resumed = 0, settled = 0;
    if (authenticate(m, rpc, req->token, &renter) != 0)
        goto out;
    if (req->devices < 1 || req->devices > AR_MARKET_MAX_DEVICES || req->est_steps < 1 ||
        req->est_steps > 1000000000LL || req->max_credits < 0 || req->max_credits > AR_CREDITS(1000000000000LL) ||
        req->flops_per_step < 1 || req->flops_per_step > AR_MARKET_MAX_STAGE_FLOPS ||
        req->min_mem_bytes > (uint64_t)AR_MARKET_MAX_MEM || strlen(req->spec) > 4096 ||
        req->resume_job_id < 0 || req->kept_steps < 0 || req->kept_steps > 1000000000000LL) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT,
                      "AcquireLease arguments out of range (devices %u of 1..%d, est_steps %lld, "
                      "flops_per_step %lld, max_credits %lld, spec of %zu characters, resume_job_id %lld, "
                      "kept_steps %lld)",
                      req->devices, AR_MARKET_MAX_DEVICES, (long long)req->est_steps,
                      (long long)req->flops_per_step, (long long)req->max_credits, strlen(req->spec),
                      (long long)req->resume_job_id, (long long)req->kept_steps);
        goto out;
    }
    pthread_mutex_lock(&m->acquire_mu);
    acquiring = 1;
    int rc;
    if (req->resume_job_id > 0) {
        /* a new driver for the same job: the old one's leases end (their
         * providers are free again) and its work after the checkpoint is
         * unpaid, since it is redone */
        int reversed = 0;
        if ((rc = ar_store_job_resume(m->store, req->resume_job_id, renter, req->kept_steps, &reversed)) != AR_OK) {
            store_error(rpc, rc);
            goto out;
        }
        ar_log(AR_LOG_INFO, "market: job %lld resumes from step %lld (%d payments after it reversed)",
               (long long)req->resume_job_id, (long long)req->kept_steps, reversed);
        resumed = 1;
    }
    size_t k = 0, busy = 0;
    if ((rc = rank_free(m, req->min_mem_bytes, &ps, &rk, &k, &busy)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    if (k < req->devices) {
        char busy_note[96] = "";
        if (busy)
            snprintf(busy_note, sizeof busy_note, ", %zu more leased to other jobs", busy);
        ar_rpc_finish(rpc, AR_STATUS_RESOURCE_EXHAUSTED,
                      "%u providers asked for, %zu online%s%s: try fewer --devices or later",
                      req->devices, k, busy ? " and free" : req->min_mem_bytes ? " with enough memory" : "",
                      busy_note);
        goto out;
    }
    size_t N = req->devices;
    ar_lease_member members[AR_MARKET_MAX_DEVICES];
    Arceus__LeasedProvider lp[AR_MARKET_MAX_DEVICES], *lpp[AR_MARKET_MAX_DEVICES];
    Arceus__ProviderProfile prof[AR_MARKET_MAX_DEVICES];
    ar_account names[AR_MARKET_MAX_DEVICES];
    /* the estimate splits the model's FLOPs in proportion to speed, as the
     * driver's planner roughly will */
    double gsum = 0;
    for (size_t i = 0; i < N; i++)
        gsum += rk[i].p->gflops;
    int64_t left = req->flops_per_step;
    for (size_t i = 0; i < N; i++) {
        const ar_provider *p = rk[i].p;
        int64_t share = i + 1 == N ? left : (int64_t)llround((double)req->flops_per_step * p->gflops / gsum);
        if (share > left)
            share = left;
        left -= share;
        members[i] = (ar_lease_member){.provider_id = p->id, .stage = (int)i, .flops_per_step = share,
                                       .price_per_tflop = p->price_per_tflop};
        if ((rc = ar_store_account_get(m->store, p->account_id, &names[i])) != AR_OK) {
            store_error(rpc, rc);
            goto out;
        }
    }
    if (req->resume_job_id > 0)
        job_id = req->resume_job_id;
    else if ((rc = ar_store_job_create(m->store, renter, req->spec, req->max_credits, &job_id)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    char token[AR_TOKEN_LEN];
    int64_t lease_id = 0, estimate = 0;
    rc = ar_store_lease_create(m->store, job_id, renter, members, N, req->est_steps, req->max_credits,
                               token, &lease_id, &estimate);
    if (rc != AR_OK) {
        char why[600];
        snprintf(why, sizeof why, "%s", ar_last_error());
        /* the refused job stays on record, cancelled, with nothing spent */
        if (ar_store_job_update(m->store, job_id, AR_JOB_CANCELLED, 0) != AR_OK)
            ar_log(AR_LOG_ERROR, "market: job %lld: %s", (long long)job_id, ar_last_error());
        ar_log(AR_LOG_INFO, "market: job %lld: %s", (long long)job_id, why);
        ar_fail(rc, "%s", why);
        store_error(rpc, rc);
        settled = 1;
        goto out;
    }
    settled = 1; /* a lease exists: the job is not left without one */
    if ((rc = ar_store_job_update(m->store, job_id, AR_JOB_RUNNING, resumed ? req->kept_steps : 0)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    ar_log(AR_LOG_INFO, "market: job %lld leases %zu providers (lease %lld, estimate %lld micro-credits)",
           (long long)job_id, N, (long long)lease_id, (long long)estimate);
    for (size_t i = 0; i < N; i++) {
        leased_msg(rk[i].p, names[i].name, members[i].flops_per_step, &prof[i], &lp[i]);
        lpp[i] = &lp[i];
    }
    Arceus__AcquireLeaseReply r = ARCEUS__ACQUIRE_LEASE_REPLY__INIT;
    r.job_id = job_id;
    r.lease_id = lease_id;
    r.lease_token = token;
    r.estimate = estimate;
    r.n_providers = N;
    r.providers = lpp;
    net_rpc_reply(rpc, &r.base);
out:
    if (resumed && !settled) {
        if (ar_store_job_update(m->store, req->resume_job_id, AR_JOB_FAILED, req->kept_steps) != AR_OK)
            ar_log(AR_LOG_ERROR, "market: job %lld: %s", (long long)req->resume_job_id, ar_last_error());
        else
            ar_log(AR_LOG_INFO, "market: job %lld could not resume (no lease): marked failed",
                   (long long)req->resume_job_id);
    }
    if (acquiring)
        pthread_mutex_unlock(&m->acquire_mu);
    free(rk);
    ar_free(ps);
    arceus__acquire_lease_request__free_unpacked(req, NULL);
}

static void on_report(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__ReportUsageRequest *req =
        (Arceus__ReportUsageRequest *)read_request(rpc, &arceus__report_usage_request__descriptor);
    if (!req)
        return;
    ar_lease lease;
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    if (authenticate_lease(m, rpc, req->lease_token, &lease) != 0)
        goto out;
    if (req->step < 0 || req->step > 1000000000000LL || req->n_stages < 1 ||
        req->n_stages > AR_MARKET_MAX_DEVICES) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "ReportUsage: step %lld or %zu stages out of range",
                      (long long)req->step, req->n_stages);
        goto out;
    }
    int rc = ar_store_lease_members(m->store, lease.id, &mem, &nm);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    /* check every stage before paying any */
    int64_t price[AR_MARKET_MAX_DEVICES];
    for (size_t i = 0; i < req->n_stages; i++) {
        const Arceus__StageUsage *u = req->stages[i];
        bool member = false;
        for (size_t j = 0; j < nm; j++)
            if (mem[j].provider_id == u->provider_id) {
                member = true;
                price[i] = mem[j].price_per_tflop;
            }
        bool dup = false;
        for (size_t j = 0; j < i; j++)
            dup = dup || req->stages[j]->stage == u->stage || req->stages[j]->provider_id == u->provider_id;
        if (!member || dup || u->stage >= nm || u->flops < 1 || u->flops > AR_MARKET_MAX_STAGE_FLOPS) {
            ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT,
                          "ReportUsage: stage %u (provider %lld, %lld FLOPs): %s", u->stage,
                          (long long)u->provider_id, (long long)u->flops,
                          !member ? "the provider is not in the lease"
                          : dup   ? "stage or provider reported twice"
                                  : "stage or FLOPs out of range");
            goto out;
        }
    }
    int64_t paid = 0;
    for (size_t i = 0; i < req->n_stages; i++) {
        const Arceus__StageUsage *u = req->stages[i];
        ar_usage_result res;
        if ((rc = ar_store_usage_record(m->store, lease.job_id, req->step, u->provider_id, (int)u->stage,
                                        u->flops, price[i], &res)) != AR_OK) {
            store_error(rpc, rc);
            goto out;
        }
        int64_t cost = 0;
        if (res != AR_USAGE_DUP && ar_flops_cost(u->flops, price[i], &cost) == AR_OK)
            paid += cost;
    }
    if (req->has_loss && isfinite(req->loss) &&
        (rc = ar_store_job_progress_record(m->store, lease.job_id, req->step, req->loss)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    ar_job job;
    int64_t balance = 0;
    if ((rc = ar_store_job_update(m->store, lease.job_id, AR_JOB_RUNNING, req->step + 1)) != AR_OK ||
        (rc = ar_store_job_get(m->store, lease.job_id, &job)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    int64_t spent = job.spent;
    ar_store_job_clear(&job);
    if ((rc = ar_store_account_balance(m->store, lease.renter_id, &balance)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    Arceus__ReportUsageReply r = ARCEUS__REPORT_USAGE_REPLY__INIT;
    r.paid = paid;
    r.spent = spent;
    r.balance = balance;
    net_rpc_reply(rpc, &r.base);
out:
    ar_free(mem);
    arceus__report_usage_request__free_unpacked(req, NULL);
}

static void on_release(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__ReleaseLeaseRequest *req =
        (Arceus__ReleaseLeaseRequest *)read_request(rpc, &arceus__release_lease_request__descriptor);
    if (!req)
        return;
    ar_lease lease;
    ar_job_status st;
    if (authenticate_lease(m, rpc, req->lease_token, &lease) != 0)
        goto out;
    if (ar_job_status_parse(req->status, &st) != AR_OK ||
        (st != AR_JOB_DONE && st != AR_JOB_FAILED && st != AR_JOB_CANCELLED) || req->step < 0 ||
        req->step > 1000000000000LL) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT,
                      "ReleaseLease: status \"%.32s\" (done, failed or cancelled) or step %lld out of range",
                      req->status, (long long)req->step);
        goto out;
    }
    int rc;
    ar_job job;
    if ((rc = ar_store_lease_release(m->store, lease.id)) != AR_OK ||
        (rc = ar_store_job_update(m->store, lease.job_id, st, req->step)) != AR_OK ||
        (rc = ar_store_job_get(m->store, lease.job_id, &job)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    ar_log(AR_LOG_INFO, "market: job %lld %s after %lld steps, lease %lld released (%lld micro-credits spent)",
           (long long)lease.job_id, ar_job_status_name(st), (long long)req->step, (long long)lease.id,
           (long long)job.spent);
    Arceus__ReleaseLeaseReply r = ARCEUS__RELEASE_LEASE_REPLY__INIT;
    r.spent = job.spent;
    ar_store_job_clear(&job);
    net_rpc_reply(rpc, &r.base);
out:
    arceus__release_lease_request__free_unpacked(req, NULL);
}

/* The answer to a ReplaceProvider: the provider that took the lost one's
 * place (NULL: none was free), the payments reversed and what the job has
 * spent now. */
static void replace_reply(ar_market *m, ar_rpc *rpc, int64_t job_id, const ar_provider *with,
                          const char *account, int64_t flops_per_step, int reversed)
{
    ar_job job;
    int rc = ar_store_job_get(m->store, job_id, &job);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        return;
    }
    Arceus__ProviderProfile prof;
    Arceus__LeasedProvider lp;
    Arceus__ReplaceProviderReply r = ARCEUS__REPLACE_PROVIDER_REPLY__INIT;
    if (with) {
        leased_msg(with, account, flops_per_step, &prof, &lp);
        r.replacement = &lp;
    }
    r.reversed = reversed;
    r.spent = job.spent;
    ar_store_job_clear(&job);
    net_rpc_reply(rpc, &r.base);
}

/* A ReplaceProvider for a provider no longer in the lease. Asked again by a
 * driver that never got the answer (the market died after settling the loss,
 * before replying), with the same kept steps, it gets the same answer and
 * nothing is done twice: no second reliability penalty, no second reversal,
 * no second replacement. Anything else is refused. */
static void replace_again(ar_market *m, ar_rpc *rpc, const ar_lease *lease,
                          const Arceus__ReplaceProviderRequest *req, const ar_lease_member *mem, size_t nm)
{
    ar_lease_replacement done;
    int rc = ar_store_lease_replacement(m->store, lease->id, req->lost_provider_id, &done);
    if (rc == AR_ENOTFOUND || (rc == AR_OK && done.kept_steps != req->kept_steps)) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "ReplaceProvider: provider %lld is not in the lease",
                      (long long)req->lost_provider_id);
        return;
    }
    if (rc != AR_OK) {
        store_error(rpc, rc);
        return;
    }
    const ar_lease_member *now = NULL;
    for (size_t i = 0; i < nm; i++)
        if (mem[i].stage == done.stage && mem[i].provider_id == done.replacement_id)
            now = &mem[i];
    if (done.replacement_id != 0 && !now) {
        ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION,
                      "ReplaceProvider: provider %lld was replaced by provider %lld, which has left the lease since",
                      (long long)req->lost_provider_id, (long long)done.replacement_id);
        return;
    }
    ar_provider with;
    ar_account name = {0};
    if (now && ((rc = ar_store_provider_get(m->store, now->provider_id, &with)) != AR_OK ||
                (rc = ar_store_account_get(m->store, with.account_id, &name)) != AR_OK)) {
        store_error(rpc, rc);
        return;
    }
    ar_log(AR_LOG_WARN, "market: job %lld asked again about lost provider %lld: answered as before (%s %lld)",
           (long long)lease->job_id, (long long)req->lost_provider_id, now ? "replaced by provider" : "no replacement",
           (long long)done.replacement_id);
    replace_reply(m, rpc, lease->job_id, now ? &with : NULL, name.name, now ? now->flops_per_step : 0,
                  done.reversed);
}

static void on_replace(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__ReplaceProviderRequest *req =
        (Arceus__ReplaceProviderRequest *)read_request(rpc, &arceus__replace_provider_request__descriptor);
    if (!req)
        return;
    ar_lease lease;
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    ar_provider *ps = NULL;
    ranked *rk = NULL;
    int acquiring = 0;
    if (authenticate_lease(m, rpc, req->lease_token, &lease) != 0)
        goto out;
    if (req->kept_steps < 0 || req->kept_steps > 1000000000000LL || strlen(req->reason) > 256) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "ReplaceProvider: kept_steps %lld or a reason of %zu "
                      "characters out of range", (long long)req->kept_steps, strlen(req->reason));
        goto out;
    }
    int rc = ar_store_lease_members(m->store, lease.id, &mem, &nm);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    const ar_lease_member *lost = NULL;
    for (size_t i = 0; i < nm; i++)
        if (mem[i].provider_id == req->lost_provider_id)
            lost = &mem[i];
    if (!lost) {
        replace_again(m, rpc, &lease, req, mem, nm);
        goto out;
    }
    /* choosing the replacement and leasing it is one step, as in AcquireLease */
    pthread_mutex_lock(&m->acquire_mu);
    acquiring = 1;
    size_t k = 0, busy = 0;
    if ((rc = rank_free(m, 0, &ps, &rk, &k, &busy)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    ar_lease_member with = {0};
    ar_account name = {0};
    if (k > 0) {
        with = (ar_lease_member){.provider_id = rk[0].p->id, .stage = lost->stage,
                                 .flops_per_step = lost->flops_per_step,
                                 .price_per_tflop = rk[0].p->price_per_tflop};
        if ((rc = ar_store_account_get(m->store, rk[0].p->account_id, &name)) != AR_OK) {
            store_error(rpc, rc);
            goto out;
        }
    }
    int reversed = 0;
    if ((rc = ar_store_lease_replace(m->store, lease.id, req->lost_provider_id, req->kept_steps,
                                     k > 0 ? &with : NULL, &reversed)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    char instead[64] = "no free provider to replace it";
    if (k > 0)
        snprintf(instead, sizeof instead, "provider %lld replaces it", (long long)with.provider_id);
    ar_log(AR_LOG_WARN, "market: job %lld lost provider %lld (%.256s): marked offline, reliability lowered, "
           "%d payments from step %lld on reversed; %s", (long long)lease.job_id,
           (long long)req->lost_provider_id, req->reason, reversed, (long long)req->kept_steps, instead);
    replace_reply(m, rpc, lease.job_id, k > 0 ? rk[0].p : NULL, name.name, with.flops_per_step, reversed);
out:
    if (acquiring)
        pthread_mutex_unlock(&m->acquire_mu);
    free(rk);
    ar_free(ps);
    ar_free(mem);
    arceus__replace_provider_request__free_unpacked(req, NULL);
}

/* ---- server: jobs --------------------------------------------------------------- */

static void job_info(const ar_job *j, Arceus__JobInfo *ji)
{
    Arceus__JobInfo x = ARCEUS__JOB_INFO__INIT;
    x.id = j->id;
    x.status = (char *)ar_job_status_name(j->status);
    x.spec = j->spec ? j->spec : "";
    x.created = j->created;
    x.step = j->step;
    x.max_credits = j->max_credits;
    x.spent = j->spent;
    *ji = x;
}

static void on_list_jobs(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__ListJobsRequest *req =
        (Arceus__ListJobsRequest *)read_request(rpc, &arceus__list_jobs_request__descriptor);
    if (!req)
        return;
    int64_t account;
    ar_job *jobs = NULL;
    size_t n = 0;
    Arceus__JobInfo *ji = NULL, **ptrs = NULL;
    if (authenticate(m, rpc, req->token, &account) != 0)
        goto out;
    int rc = ar_store_job_list(m->store, account, &jobs, &n);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    if (reply_list(rpc, n, sizeof *ji, (void **)&ji, (void ***)&ptrs) != 0)
        goto out;
    for (size_t i = 0; i < n; i++)
        job_info(&jobs[i], &ji[i]);
    Arceus__ListJobsReply r = ARCEUS__LIST_JOBS_REPLY__INIT;
    r.n_jobs = n;
    r.jobs = ptrs;
    net_rpc_reply(rpc, &r.base);
out:
    free(ptrs); /* and ji */
    ar_store_jobs_free(jobs, n);
    arceus__list_jobs_request__free_unpacked(req, NULL);
}

static void on_get_job(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__GetJobRequest *req =
        (Arceus__GetJobRequest *)read_request(rpc, &arceus__get_job_request__descriptor);
    if (!req)
        return;
    int64_t account;
    ar_job job = {0};
    ar_job_point *pts = NULL;
    size_t n = 0;
    Arceus__LossPoint *lp = NULL, **ptrs = NULL;
    if (authenticate(m, rpc, req->token, &account) != 0)
        goto out;
    int rc = ar_store_job_get(m->store, req->job_id, &job);
    if (rc == AR_ENOTFOUND) {
        ar_rpc_finish(rpc, AR_STATUS_NOT_FOUND, "no job %lld", (long long)req->job_id);
        goto out;
    }
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    if (job.renter_id != account) {
        ar_log(AR_LOG_WARN, "market: account %lld asked for job %lld of another account: refused",
               (long long)account, (long long)req->job_id);
        ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED, "job %lld belongs to another account",
                      (long long)req->job_id);
        goto out;
    }
    if ((rc = ar_store_job_progress(m->store, job.id, &pts, &n)) != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    if (reply_list(rpc, n, sizeof *lp, (void **)&lp, (void ***)&ptrs) != 0)
        goto out;
    for (size_t i = 0; i < n; i++) {
        Arceus__LossPoint x = ARCEUS__LOSS_POINT__INIT;
        x.step = pts[i].step;
        x.loss = pts[i].loss;
        lp[i] = x;
    }
    Arceus__JobInfo ji;
    job_info(&job, &ji);
    Arceus__GetJobReply r = ARCEUS__GET_JOB_REPLY__INIT;
    r.job = &ji;
    r.n_losses = n;
    r.losses = ptrs;
    net_rpc_reply(rpc, &r.base);
out:
    free(ptrs); /* and lp */
    ar_free(pts);
    ar_store_job_clear(&job);
    arceus__get_job_request__free_unpacked(req, NULL);
}

static void on_check_lease(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__CheckLeaseRequest *req =
        (Arceus__CheckLeaseRequest *)read_request(rpc, &arceus__check_lease_request__descriptor);
    if (!req)
        return;
    int64_t account;
    ar_provider p;
    ar_lease lease;
    ar_lease_member *mem = NULL;
    size_t nm = 0;
    if (authenticate(m, rpc, req->token, &account) != 0)
        goto out;
    int rc = ar_store_provider_get(m->store, req->provider_id, &p);
    if (rc == AR_ENOTFOUND || (rc == AR_OK && p.account_id != account)) {
        ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED, "provider %lld is not one of this account's",
                      (long long)req->provider_id);
        goto out;
    }
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    if (!token_hex(req->lease_token)) {
        ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED, "malformed lease token");
        goto out;
    }
    rc = ar_store_lease_auth(m->store, req->lease_token, &lease);
    if (rc == AR_ENOTFOUND) {
        ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED, "unknown or released lease token");
        goto out;
    }
    if (rc == AR_OK)
        rc = ar_store_lease_members(m->store, lease.id, &mem, &nm);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    bool member = false;
    for (size_t i = 0; i < nm; i++)
        member = member || mem[i].provider_id == req->provider_id;
    if (!member) {
        ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED, "lease %lld does not include provider %lld",
                      (long long)lease.id, (long long)req->provider_id);
        goto out;
    }
    Arceus__CheckLeaseReply r = ARCEUS__CHECK_LEASE_REPLY__INIT;
    r.job_id = lease.job_id;
    r.lease_id = lease.id;
    net_rpc_reply(rpc, &r.base);
out:
    ar_free(mem);
    arceus__check_lease_request__free_unpacked(req, NULL);
}

/* ---- server: progress for the dashboard ------------------------------------------- */

#define MAX_LAYERS_TEXT 128
#define MAX_MODEL_TEXT 256

static bool finite_nonneg(double x)
{
    return isfinite(x) && x >= 0;
}

/* Whether the plan of a ReportProgress is well formed: stages in order,
 * contiguous unit ranges, 1..AR_PLAN_MAX_GROUP members with HOST:PORT
 * devices, texts and numbers in range. */
static bool plan_ok(const Arceus__JobPlan *p, char *why, size_t why_size)
{
    if (p->n_stages < 1 || p->n_stages > AR_MARKET_MAX_DEVICES || p->micro_batches < 1 ||
        p->micro_batches > 1000000 || !(p->predicted_bubble >= 0 && p->predicted_bubble <= 1) ||
        strlen(p->schedule) > 16 || strlen(p->model) > MAX_MODEL_TEXT) {
        snprintf(why, why_size, "plan: %zu stages (1..%d), %u micro-batches, bubble %g or a text out of range",
                 p->n_stages, AR_MARKET_MAX_DEVICES, p->micro_batches, p->predicted_bubble);
        return false;
    }
    for (size_t i = 0; i < p->n_stages; i++) {
        const Arceus__PlanStage *st = p->stages[i];
        if (st->stage != i || st->first_unit >= st->last_unit || st->last_unit > 100000 ||
            (i > 0 && st->first_unit != p->stages[i - 1]->last_unit) || strlen(st->layers) > MAX_LAYERS_TEXT ||
            !finite_nonneg(st->predicted_ms) || st->n_members < 1 || st->n_members > AR_PLAN_MAX_GROUP) {
            snprintf(why, why_size, "plan: stage %zu (units %u-%u, %zu members) out of order or range", i,
                     st->first_unit, st->last_unit, st->n_members);
            return false;
        }
        for (size_t k = 0; k < st->n_members; k++) {
            const Arceus__PlanMember *m = st->members[k];
            char bad[160];
            if (!address_ok(m->device, bad, sizeof bad)) {
                snprintf(why, why_size, "plan: stage %zu member %zu: %s", i, k, bad);
                return false;
            }
            if (m->provider_id < 0 || m->head_end < m->head_begin || m->head_end > 100000 ||
                m->hidden_end < m->hidden_begin || m->hidden_end > 10000000 || strlen(m->share) >= AR_PLAN_SHARE_TEXT) {
                snprintf(why, why_size, "plan: stage %zu member %zu: provider id, heads, hidden units or share out of range",
                         i, k);
                return false;
            }
        }
    }
    return true;
}

/* obj[key] = [begin, end] when the range is not empty */
static bool add_range(cJSON *obj, const char *key, uint32_t begin, uint32_t end)
{
    if (end <= begin)
        return true;
    double v[2] = {begin, end};
    cJSON *a = cJSON_CreateDoubleArray(v, 2);
    if (a && cJSON_AddItemToObject(obj, key, a))
        return true;
    cJSON_Delete(a);
    return false;
}

/* A checked plan as the JSON document the dashboard serves (built here from
 * checked fields: nothing the driver wrote reaches the page unparsed); NULL
 * when memory runs out. */
static char *plan_json(const Arceus__JobPlan *p)
{
    cJSON *root = cJSON_CreateObject(), *stages = NULL;
    bool ok = root && cJSON_AddStringToObject(root, "model", p->model) &&
              cJSON_AddNumberToObject(root, "micro_batches", p->micro_batches) &&
              cJSON_AddStringToObject(root, "schedule", p->schedule) &&
              cJSON_AddNumberToObject(root, "predicted_bubble", p->predicted_bubble) &&
              (stages = cJSON_AddArrayToObject(root, "stages"));
    for (size_t i = 0; ok && i < p->n_stages; i++) {
        const Arceus__PlanStage *st = p->stages[i];
        cJSON *js = cJSON_CreateObject(), *members = NULL;
        ok = js && cJSON_AddItemToArray(stages, js);
        if (!ok) {
            cJSON_Delete(js);
            break;
        }
        ok = cJSON_AddNumberToObject(js, "stage", st->stage) && cJSON_AddNumberToObject(js, "first_unit", st->first_unit) &&
             cJSON_AddNumberToObject(js, "last_unit", st->last_unit) && cJSON_AddStringToObject(js, "layers", st->layers) &&
             cJSON_AddNumberToObject(js, "predicted_ms", st->predicted_ms) &&
             (members = cJSON_AddArrayToObject(js, "members"));
        for (size_t k = 0; ok && k < st->n_members; k++) {
            const Arceus__PlanMember *m = st->members[k];
            cJSON *jm = cJSON_CreateObject();
            ok = jm && cJSON_AddItemToArray(members, jm);
            if (!ok) {
                cJSON_Delete(jm);
                break;
            }
            ok = cJSON_AddNumberToObject(jm, "provider_id", (double)m->provider_id) &&
                 cJSON_AddStringToObject(jm, "device", m->device);
            /* a share only for a member of a tensor-parallel group */
            if (ok && m->share[0])
                ok = cJSON_AddStringToObject(jm, "share", m->share) &&
                     add_range(jm, "heads", m->head_begin, m->head_end) &&
                     add_range(jm, "hidden", m->hidden_begin, m->hidden_end);
        }
    }
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return text;
}

static void on_report_progress(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__ReportProgressRequest *req =
        (Arceus__ReportProgressRequest *)read_request(rpc, &arceus__report_progress_request__descriptor);
    if (!req)
        return;
    ar_lease lease;
    char *plan = NULL, why[300];
    if (authenticate_lease(m, rpc, req->lease_token, &lease) != 0)
        goto out;
    bool unit_ok = !strcmp(req->items_unit, "tokens") || !strcmp(req->items_unit, "samples");
    if (req->step < 0 || req->step > 1000000000000LL || req->total_steps < 0 || req->total_steps > 1000000000000LL ||
        !finite_nonneg(req->items_per_s) || !finite_nonneg(req->eta_s) || !finite_nonneg(req->wall_s) || !unit_ok ||
        req->n_timings > AR_MARKET_MAX_DEVICES ||
        (req->has_val_loss && (req->val_step < 0 || req->val_step > 1000000000000LL || !isfinite(req->val_loss)))) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT,
                      "ReportProgress: step %lld of %lld, %g %.16s/s, eta %g s, %zu stage timings or the "
                      "validation loss out of range",
                      (long long)req->step, (long long)req->total_steps, req->items_per_s, req->items_unit,
                      req->eta_s, req->n_timings);
        goto out;
    }
    ar_stage_time times[AR_MARKET_MAX_DEVICES];
    for (size_t i = 0; i < req->n_timings; i++) {
        const Arceus__StageTiming *t = req->timings[i];
        if (t->stage >= AR_MARKET_MAX_DEVICES || !finite_nonneg(t->busy_s) || !finite_nonneg(t->idle_s)) {
            ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "ReportProgress: stage %u timing (busy %g s, idle %g s) out of range",
                          t->stage, t->busy_s, t->idle_s);
            goto out;
        }
        times[i] = (ar_stage_time){.step = req->step, .stage = (int)t->stage, .wall_s = req->wall_s,
                                   .busy_s = t->busy_s, .idle_s = t->idle_s};
    }
    if (req->plan && !plan_ok(req->plan, why, sizeof why)) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "ReportProgress: %s", why);
        goto out;
    }
    if (req->plan && !(plan = plan_json(req->plan))) {
        ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "ReportProgress: out of memory for the plan");
        goto out;
    }
    ar_job_live live = {.step = req->step, .total_steps = req->total_steps, .items_per_s = req->items_per_s,
                        .eta_s = req->eta_s, .wall_s = req->wall_s, .plan = plan};
    snprintf(live.unit, sizeof live.unit, "%s", req->items_unit);
    int rc = ar_store_job_live_set(m->store, lease.job_id, &live, times, req->n_timings);
    if (rc == AR_OK && req->has_val_loss)
        rc = ar_store_job_val_record(m->store, lease.job_id, req->val_step, req->val_loss);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    Arceus__ReportProgressReply r = ARCEUS__REPORT_PROGRESS_REPLY__INIT;
    net_rpc_reply(rpc, &r.base);
out:
    cJSON_free(plan);
    arceus__report_progress_request__free_unpacked(req, NULL);
}

/* ---- server: the offline sweep -------------------------------------------------- */

/* Every period, mark offline the providers silent for offline_after_s: a
 * provider that vanishes leaves the online list within about
 * offline_after_s + 2 periods. */
static void *sweep_main(void *arg)
{
    ar_market *m = arg;
    int period = m->offline_after_s / 4;
    if (period < 1)
        period = 1;
    pthread_mutex_lock(&m->mu);
    while (!m->stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += period;
        pthread_cond_timedwait(&m->cv, &m->mu, &ts);
        if (m->stopping)
            break;
        pthread_mutex_unlock(&m->mu);
        int count = 0;
        if (ar_store_provider_expire(m->store, m->offline_after_s, &count) != AR_OK)
            ar_log(AR_LOG_ERROR, "market: offline sweep: %s", ar_last_error());
        else if (count > 0)
            ar_log(AR_LOG_INFO, "market: %d provider%s silent for over %d s marked offline", count,
                   count == 1 ? "" : "s", m->offline_after_s);
        pthread_mutex_lock(&m->mu);
    }
    pthread_mutex_unlock(&m->mu);
    return NULL;
}

int ar_market_start(const ar_market_config *c, ar_market **out, char *addr, size_t addr_size)
{
    if (!c->listen || !c->db_path)
        return ar_fail(AR_EINVAL, "the market needs a listen address and a database path");
    if (c->offline_after_s < 0 || c->offline_after_s > 86400)
        return ar_fail(AR_EINVAL, "offline-after %d s out of range 1..86400", c->offline_after_s);
    ar_market *m = calloc(1, sizeof *m);
    if (!m)
        return ar_fail(AR_ENOMEM, "out of memory");
    pthread_mutex_init(&m->mu, NULL);
    pthread_mutex_init(&m->acquire_mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    m->offline_after_s = c->offline_after_s > 0 ? c->offline_after_s : AR_MARKET_DEFAULT_OFFLINE_AFTER_S;
    int rc = ar_store_open(c->db_path, &m->store);
    if (rc != AR_OK) {
        ar_market_stop(m);
        return rc;
    }
    int port = 0;
    if ((rc = ar_server_create(c->listen, &(ar_server_limits){.max_message = MAX_REQUEST_BYTES}, &m->server,
                                &port)) != AR_OK) {
        ar_market_stop(m);
        return rc;
    }
    ar_server_handle(m->server, "/arceus.Market/RegisterProvider", on_register, m);
    ar_server_handle(m->server, "/arceus.Market/Heartbeat", on_heartbeat, m);
    ar_server_handle(m->server, "/arceus.Market/ListProviders", on_list_providers, m);
    ar_server_handle(m->server, "/arceus.Market/Ledger", on_ledger, m);
    ar_server_handle(m->server, "/arceus.Market/Balance", on_balance, m);
    ar_server_handle(m->server, "/arceus.Market/AcquireLease", on_acquire, m);
    ar_server_handle(m->server, "/arceus.Market/ReportUsage", on_report, m);
    ar_server_handle(m->server, "/arceus.Market/ReleaseLease", on_release, m);
    ar_server_handle(m->server, "/arceus.Market/CheckLease", on_check_lease, m);
    ar_server_handle(m->server, "/arceus.Market/ListJobs", on_list_jobs, m);
    ar_server_handle(m->server, "/arceus.Market/GetJob", on_get_job, m);
    ar_server_handle(m->server, "/arceus.Market/ReplaceProvider", on_replace, m);
    ar_server_handle(m->server, "/arceus.Market/ReportProgress", on_report_progress, m);
    if (pthread_create(&m->sweeper, NULL, sweep_main, m) != 0) {
        ar_market_stop(m);
        return ar_fail(AR_EINTERNAL, "cannot start the offline sweep thread");
    }
    m->sweeper_started = 1;
    if ((rc = ar_server_start(m->server)) != AR_OK) {
        ar_market_stop(m);
        return rc;
    }
    const char *colon = strrchr(c->listen, ':');
    int hl = colon ? (int)(colon - c->listen) : (int)strlen(c->listen);
    snprintf(addr, addr_size, "%.*s:%d", hl, c->listen, port);
    *out = m;
    return AR_OK;
}

void ar_market_stop(ar_market *m)
{
    if (!m)
        return;
    if (m->server)
        ar_server_destroy(m->server); /* cancels the calls, waits for the handlers */
    if (m->sweeper_started) {
        pthread_mutex_lock(&m->mu);
        m->stopping = 1;
        pthread_cond_broadcast(&m->cv);
        pthread_mutex_unlock(&m->mu);
        pthread_join(m->sweeper, NULL);
    }
    ar_store_close(m->store);
    pthread_mutex_destroy(&m->mu);
    pthread_mutex_destroy(&m->acquire_mu);
    pthread_cond_destroy(&m->cv);
    free(m);
}
