/* The Market service (proto/arceus.proto): the server's handlers and its
 * offline sweep (the client side of the RPCs is market_client.c).
 *
 * A handler reads one request, checks the token, then every field (sizes,
 * ranges, strings), and only then calls the market's rules
 * (market/rules.h) or, for a plain read, the store (market/store.h): what
 * reaches the database is always well formed, and a bad request costs a
 * status, never a crash. Which providers a renter gets, what work costs and
 * how it is paid are the rules' business, not this file's. */
#include "net/market.h"

#include "arceus.h"
#include "arceus.pb-c.h"
#include "core/core.h"
#include "net/net_internal.h"
#include "net/relay.h"
#include "net/remote.h"
#include "train/plan.h"

#include <ctype.h>
#include <openssl/crypto.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Requests are small; anything bigger is not one of ours. */
#define MAX_REQUEST_BYTES (64u << 10)
/* The evidence of a failed audit (ReportAudit): a stage's state (3x its
 * parameters) and its step's inputs. The server's gRPC limit is this; every
 * other method is held to MAX_REQUEST_BYTES as gRPC hands its request over.
 * A larger stage cannot be confirmed by this market yet. */
#define MAX_EVIDENCE_BYTES ((size_t)16 << 20)

struct ar_market {
    ar_server *server;
    ar_store *store;
    int offline_after_s;
    /* whom it admits and what it leases; probe_ctx is the market */
    ar_market_policy policy;
    double reach_timeout_s;
    /* its relay (net/relay.h; relay "" when none): the address providers and
     * renters dial, the key its passes and credentials are made with, and
     * the relay itself when it runs inside the market */
    char relay[AR_ADDR_MAX];
    unsigned char relay_key[AR_RELAY_KEY_BYTES];
    ar_relay *relay_server;
    pthread_t sweeper;
    int sweeper_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stopping;
};

/* ---- server: helpers -------------------------------------------------------- */

static ProtobufCMessage *read_request(ar_rpc *rpc, const ProtobufCMessageDescriptor *d)
{
    return net_rpc_read_request(rpc, d, MAX_REQUEST_BYTES);
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

/* The status of a store's or a rule's error code: the caller's fault or ours. */
static int status_of(int rc)
{
    return rc == AR_ENOTFOUND ? AR_STATUS_NOT_FOUND
           : rc == AR_EINVAL  ? AR_STATUS_INVALID_ARGUMENT
           : rc == AR_ELIMIT  ? AR_STATUS_FAILED_PRECONDITION
                              : AR_STATUS_INTERNAL;
}

/* A store or rule failure as a status; a refusal (the caller's fault) is
 * prefixed with the method's name when `method` is not NULL. */
static void rule_error(ar_rpc *rpc, int rc, const char *method)
{
    int code = status_of(rc);
    if (code == AR_STATUS_INTERNAL) {
        ar_log(AR_LOG_ERROR, "market: %s", ar_last_error());
        method = NULL;
    }
    if (method)
        ar_rpc_finish(rpc, code, "%s: %s", method, ar_last_error());
    else
        ar_rpc_finish(rpc, code, "%s", ar_last_error());
}

static void store_error(ar_rpc *rpc, int rc)
{
    rule_error(rpc, rc, NULL);
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

/* The market's check of a provider's worker (the rules' ar_reach_probe): a
 * Hello answered within the deadline by a worker of our protocol version.
 * The market dials with the CA it was given (--tls-ca), as any client. */
static bool reach_probe(void *ctx, const char *address)
{
    const ar_market *m = ctx;
    ar_client *c = NULL;
    int rc = ar_client_open(address, &c);
    if (rc == AR_OK)
        rc = ar_remote_probe(c, m->reach_timeout_s);
    if (rc != AR_OK)
        ar_log(AR_LOG_DEBUG, "market: worker %s not reached: %s", address, ar_last_error());
    ar_client_close(c);
    return rc == AR_OK;
}

/* The same through the market's relay, with a pass of its own (lease 0) that
 * lasts as long as the check may. */
static bool relay_probe(void *ctx, int64_t provider_id, const char *address)
{
    const ar_market *m = ctx;
    char pass[AR_RELAY_PASS_MAX];
    ar_relay_pass(m->relay_key, provider_id, 0, (int64_t)time(NULL) + AR_RELAY_PROBE_PASS_S, pass);
    ar_client *c = NULL;
    int rc = ar_client_open_relayed(address, m->relay, pass, &c);
    if (rc == AR_OK)
        rc = ar_remote_probe(c, m->reach_timeout_s);
    if (rc != AR_OK)
        ar_log(AR_LOG_DEBUG, "market: worker %s not reached through relay %s: %s", address, m->relay,
               ar_last_error());
    ar_client_close(c);
    return rc == AR_OK;
}

/* For the relay inside the market: a pass opens circuits only while its
 * lease is live and holds the provider (lease 0: the market's own checks). */
static int relay_lease_live(void *ctx, int64_t provider_id, int64_t lease_id)
{
    ar_market *m = ctx;
    if (lease_id == 0)
        return 1;
    ar_lease l;
    ar_lease_member *members = NULL;
    size_t n = 0;
    int live = 0;
    if (ar_store_lease_get(m->store, lease_id, &l) == AR_OK && !l.released &&
        ar_store_lease_members(m->store, lease_id, &members, &n) == AR_OK)
        for (size_t i = 0; i < n && !live; i++)
            live = members[i].provider_id == provider_id;
    ar_free(members);
    return live;
}

/* A relayed member's relay and pass (net/relay.h), for its renter. */
static void relay_fill(const ar_market *m, int64_t lease_id, ar_market_leased *l)
{
    l->relay[0] = l->relay_pass[0] = '\0';
    if (!m->relay[0] || l->p.reach != AR_REACH_RELAYED)
        return;
    snprintf(l->relay, sizeof l->relay, "%s", m->relay);
    ar_relay_pass(m->relay_key, l->p.id, lease_id, (int64_t)time(NULL) + AR_RELAY_PASS_S, l->relay_pass);
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
    int64_t id;
    ar_reach reach = AR_REACH_UNCHECKED;
    /* where renters will be sent, how many providers the account has, and
     * whether the market reaches the worker: the rules' */
    int rc = ar_rules_admit_provider(m->store, &m->policy, &p, &id, &reach);
    if (rc != AR_OK) {
        rule_error(rpc, rc, rc == AR_EINVAL || rc == AR_ELIMIT ? "RegisterProvider" : NULL);
        goto out;
    }
    Arceus__RegisterProviderReply r = ARCEUS__REGISTER_PROVIDER_REPLY__INIT;
    r.provider_id = id;
    r.offline_after_s = (uint32_t)m->offline_after_s;
    r.reach = (char *)ar_reach_name(reach);
    char credential[AR_RELAY_CREDENTIAL_HEX + 1] = "";
    if (m->relay[0]) {
        ar_relay_credential(m->relay_key, id, p.address, credential);
        r.relay = m->relay;
        r.relay_credential = credential;
    }
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
    if (rc == AR_OK && req->unavailable && strlen(req->unavailable_why) >= AR_WHY_MAX) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "unavailable_why: at most %d bytes", AR_WHY_MAX - 1);
        goto out;
    }
    /* online now; the owner's rules: a provider unavailable now is not
     * leased (a lease it is in already goes on); a graceful leave: its
     * renter may hand its place over (HandOver). One write */
    if (rc == AR_OK) {
        rc = ar_store_provider_beat(m->store, req->provider_id, req->unavailable, req->unavailable_why,
                                    req->leaving);
        if (rc == AR_EINVAL) {
            ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "%s", ar_last_error());
            goto out;
        }
        if (rc == AR_OK && req->unavailable != p.unavailable)
            ar_log(AR_LOG_INFO, "market: provider %lld is %s%s%s", (long long)p.id,
                   req->unavailable ? "unavailable" : "available again", req->unavailable ? ": " : "",
                   req->unavailable ? req->unavailable_why : "");
    }
    if (rc == AR_OK && req->leaving != (p.leaving_since != 0))
        ar_log(AR_LOG_INFO, "market: provider %lld %s", (long long)p.id,
               req->leaving ? "is leaving its lease" : "is no longer leaving");
    /* a provider the market could not reach is checked again as it beats
     * (its own call waits for the check, no one else's) */
    if (rc == AR_OK && ar_rules_reach_due(&p, (int64_t)time(NULL)))
        rc = ar_rules_check_reach(m->store, &m->policy, &p);
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
    r.reach = (char *)ar_reach_name(p.reach);
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
        pi.reach = (char *)ar_reach_name(ps[i].reach);
        pi.unavailable = ps[i].unavailable;
        pi.unavailable_why = ps[i].unavailable_why;
        pi.speed_gflops = ar_rules_speed(&ps[i]);
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
    int64_t balance, pending = 0;
    if ((rc = ar_store_ledger_list(m->store, account, &rows, &n)) != AR_OK ||
        (rc = ar_store_account_balance(m->store, account, &balance)) != AR_OK ||
        (rc = ar_store_account_pending(m->store, account, &pending)) != AR_OK) {
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
    r.pending = pending;
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
    int64_t pending = 0;
    int rc = ar_store_account_get(m->store, account, &me);
    if (rc == AR_OK)
        rc = ar_store_account_pending(m->store, account, &pending);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    Arceus__BalanceReply r = ARCEUS__BALANCE_REPLY__INIT;
    r.account = me.name;
    r.balance = me.balance;
    r.pending = pending;
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

/* A leased provider as the reply shows it; pp is its profile's storage. */
static void leased_msg(const ar_market_leased *l, Arceus__ProviderProfile *pp, Arceus__LeasedProvider *out)
{
    Arceus__ProviderProfile prof = ARCEUS__PROVIDER_PROFILE__INIT;
    prof.gflops = l->p.gflops;
    prof.mem_bytes = (uint64_t)l->p.mem_bytes;
    prof.cores = (uint32_t)l->p.cores;
    prof.price_per_tflop = l->p.price_per_tflop;
    *pp = prof;
    Arceus__LeasedProvider x = ARCEUS__LEASED_PROVIDER__INIT;
    x.provider_id = l->p.id;
    x.account = (char *)l->account;
    x.address = (char *)l->p.address;
    x.profile = pp;
    x.reliability = l->p.reliability;
    x.flops_per_step = l->flops_per_step;
    x.ticket = (char *)l->ticket;
    x.stage = (uint32_t)l->stage;
    x.first_unit = (uint32_t)l->first_unit;
    x.last_unit = (uint32_t)l->last_unit;
    x.speed_gflops = l->speed_gflops;
    x.relay = (char *)l->relay;
    x.relay_pass = (char *)l->relay_pass;
    *out = x;
}

static void on_acquire(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__AcquireLeaseRequest *req =
        (Arceus__AcquireLeaseRequest *)read_request(rpc, &arceus__acquire_lease_request__descriptor);
    if (!req)
        return;
    int64_t renter;
    ar_market_lease *lease = NULL;
    if (authenticate(m, rpc, req->token, &renter) != 0)
        goto out;
    if (req->devices < 1 || req->devices > AR_MARKET_MAX_DEVICES || req->est_steps < 1 ||
        req->est_steps > 1000000000LL || req->max_credits < 0 || req->max_credits > AR_CREDITS(1000000000000LL) ||
        req->flops_per_step < 1 || req->flops_per_step > AR_MARKET_MAX_STAGE_FLOPS ||
        req->min_mem_bytes > (uint64_t)AR_MARKET_MAX_MEM || strlen(req->spec) > 4096 ||
        req->resume_job_id < 0 || req->kept_steps < 0 || req->kept_steps > 1000000000000LL ||
        req->n_stage_units > AR_MARKET_MAX_DEVICES) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT,
                      "AcquireLease arguments out of range (devices %u of 1..%d, est_steps %lld, "
                      "flops_per_step %lld, max_credits %lld, spec of %zu characters, resume_job_id %lld, "
                      "kept_steps %lld, a split of %zu stages)",
                      req->devices, AR_MARKET_MAX_DEVICES, (long long)req->est_steps,
                      (long long)req->flops_per_step, (long long)req->max_credits, strlen(req->spec),
                      (long long)req->resume_job_id, (long long)req->kept_steps, req->n_stage_units);
        goto out;
    }
    /* the lease fixes the price from the model itself: a driver that sends
     * no model is older than this market, and would pay what it reports */
    if (!req->model_spec[0] || req->micro_batch_rows == 0 || req->micro_batches == 0) {
        ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION,
                      "AcquireLease: this market prices every step from the model itself and pays exactly that; "
                      "the request carries no model_spec, micro_batch_rows and micro_batches (an arceus older than "
                      "this market?): upgrade arceus to lease here");
        goto out;
    }
    if (strlen(req->model_spec) > AR_MARKET_MAX_SPEC_BYTES || req->micro_batch_rows > AR_MARKET_MAX_MB_ROWS ||
        req->micro_batches > AR_MARKET_MAX_MICRO_BATCHES || req->schedule > 1) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT,
                      "AcquireLease: model_spec of %zu bytes (at most %d), micro-batches of %u rows (at most %d), %u "
                      "micro-batches (at most %d) or schedule %u (0 GPipe, 1 1F1B) out of range",
                      strlen(req->model_spec), AR_MARKET_MAX_SPEC_BYTES, req->micro_batch_rows, AR_MARKET_MAX_MB_ROWS,
                      req->micro_batches, AR_MARKET_MAX_MICRO_BATCHES, req->schedule);
        goto out;
    }
    if (!(lease = calloc(1, sizeof *lease))) {
        ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory for a lease");
        goto out;
    }
    ar_market_lease_request q = {.devices = req->devices, .max_credits = req->max_credits,
                                 .est_steps = req->est_steps, .spec = req->spec,
                                 .flops_per_step = req->flops_per_step, .min_mem_bytes = (int64_t)req->min_mem_bytes,
                                 .resume_job = req->resume_job_id, .kept_steps = req->kept_steps,
                                 .model_spec = req->model_spec, .mb_rows = (int)req->micro_batch_rows,
                                 .micro_batches = (int)req->micro_batches, .schedule = (int)req->schedule,
                                 .stage_units = req->stage_units, .n_stage_units = req->n_stage_units};
    bool too_few = false;
    int rc = ar_rules_acquire(m->store, &m->policy, renter, &q, lease, &too_few);
    if (rc != AR_OK) {
        if (too_few)
            ar_rpc_finish(rpc, AR_STATUS_RESOURCE_EXHAUSTED, "%s", ar_last_error());
        else
            store_error(rpc, rc);
        goto out;
    }
    Arceus__LeasedProvider lp[AR_MARKET_MAX_DEVICES], *lpp[AR_MARKET_MAX_DEVICES];
    Arceus__ProviderProfile prof[AR_MARKET_MAX_DEVICES];
    for (size_t i = 0; i < lease->n; i++) {
        relay_fill(m, lease->lease_id, &lease->providers[i]);
        leased_msg(&lease->providers[i], &prof[i], &lp[i]);
        lpp[i] = &lp[i];
    }
    Arceus__AcquireLeaseReply r = ARCEUS__ACQUIRE_LEASE_REPLY__INIT;
    r.job_id = lease->job_id;
    r.lease_id = lease->lease_id;
    r.lease_token = lease->token;
    r.estimate = lease->estimate;
    r.n_providers = lease->n;
    r.providers = lpp;
    net_rpc_reply(rpc, &r.base);
out:
    free(lease);
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
    if (authenticate_lease(m, rpc, req->lease_token, &lease) != 0)
        goto out;
    if (req->step < 0 || req->step > 1000000000000LL || req->n_stages > AR_MARKET_MAX_DEVICES) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "ReportUsage: step %lld or %zu stages out of range",
                      (long long)req->step, req->n_stages);
        goto out;
    }
    ar_stage_usage stages[AR_MARKET_MAX_DEVICES];
    for (size_t i = 0; i < req->n_stages; i++) {
        const Arceus__StageUsage *u = req->stages[i];
        if (u->stage >= AR_MARKET_MAX_DEVICES || u->flops < 0 || u->flops > AR_MARKET_MAX_STAGE_FLOPS) {
            ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT,
                          "ReportUsage: stage %u (provider %lld, %lld FLOPs): stage or FLOPs out of range", u->stage,
                          (long long)u->provider_id, (long long)u->flops);
            goto out;
        }
        if (u->digests.len != 0 && u->digests.len != AR_STAGE_DIGEST_BYTES) {
            ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "ReportUsage: stage %u digests of %zu bytes, not 0 or %d",
                          u->stage, u->digests.len, AR_STAGE_DIGEST_BYTES);
            goto out;
        }
        stages[i] = (ar_stage_usage){.stage = (int)u->stage, .provider_id = u->provider_id, .flops = u->flops,
                                     .has_digests = u->digests.len != 0};
        if (u->digests.len)
            memcpy(stages[i].digests, u->digests.data, AR_STAGE_DIGEST_BYTES);
    }
    /* whether each stage belongs to the lease, and its FLOPs are the plan's,
     * is the rule's to check */
    ar_step_settlement paid;
    int rc = ar_rules_settle_step(m->store, &lease, req->step, stages, req->n_stages,
                                  req->has_loss && isfinite(req->loss), req->loss, &paid);
    if (rc != AR_OK) {
        rule_error(rpc, rc, rc == AR_EINVAL ? "ReportUsage" : NULL);
        goto out;
    }
    Arceus__ReportUsageReply r = ARCEUS__REPORT_USAGE_REPLY__INIT;
    r.paid = paid.paid;
    r.spent = paid.spent;
    r.balance = paid.balance;
    net_rpc_reply(rpc, &r.base);
out:
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
    Arceus__ReleaseLeaseReply r = ARCEUS__RELEASE_LEASE_REPLY__INIT;
    int rc = ar_rules_release(m->store, &m->policy, &lease, st, req->step, &r.spent);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    net_rpc_reply(rpc, &r.base);
out:
    arceus__release_lease_request__free_unpacked(req, NULL);
}

static void on_replace(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__ReplaceProviderRequest *req =
        (Arceus__ReplaceProviderRequest *)read_request(rpc, &arceus__replace_provider_request__descriptor);
    if (!req)
        return;
    ar_lease lease;
    ar_market_replacement *done = NULL;
    if (authenticate_lease(m, rpc, req->lease_token, &lease) != 0)
        goto out;
    if (req->kept_steps < 0 || req->kept_steps > 1000000000000LL || strlen(req->reason) > 256) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "ReplaceProvider: kept_steps %lld or a reason of %zu "
                      "characters out of range", (long long)req->kept_steps, strlen(req->reason));
        goto out;
    }
    if (!(done = calloc(1, sizeof *done))) {
        ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory");
        goto out;
    }
    int rc = ar_rules_replace(m->store, &m->policy, &lease, req->lease_token, req->lost_provider_id,
                              req->kept_steps, req->reason, done);
    if (rc != AR_OK) {
        rule_error(rpc, rc, rc == AR_EINVAL || rc == AR_ELIMIT ? "ReplaceProvider" : NULL);
        goto out;
    }
    if (done->unconfirmed) {
        /* nothing changed: the driver asks again */
        ar_rpc_finish(rpc, AR_STATUS_ABORTED,
                      "ReplaceProvider: provider %lld does not answer the market, but its heartbeats have not "
                      "stopped: the loss is not confirmed yet; ask again in %.0f s",
                      (long long)req->lost_provider_id, done->retry_after_s);
        goto out;
    }
    Arceus__ProviderProfile prof, mprof[AR_MARKET_MAX_DEVICES];
    Arceus__LeasedProvider lp, mlp[AR_MARKET_MAX_DEVICES], *mptr[AR_MARKET_MAX_DEVICES];
    Arceus__ReplaceProviderReply r = ARCEUS__REPLACE_PROVIDER_REPLY__INIT;
    if (done->found) {
        relay_fill(m, lease.id, &done->replacement);
        leased_msg(&done->replacement, &prof, &lp);
        r.replacement = &lp;
    }
    for (size_t i = 0; i < done->n; i++) {
        relay_fill(m, lease.id, &done->members[i]);
        leased_msg(&done->members[i], &mprof[i], &mlp[i]);
        mlp[i].ticket = ""; /* each member's ticket went out with its lease or its replacement */
        mptr[i] = &mlp[i];
    }
    r.n_members = done->n;
    r.members = mptr;
    r.reversed = 0;
    r.contested = done->contested;
    r.spent = done->spent;
    net_rpc_reply(rpc, &r.base);
out:
    free(done);
    arceus__replace_provider_request__free_unpacked(req, NULL);
}

static void on_report_audit(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__ReportAuditRequest *req = (Arceus__ReportAuditRequest *)net_rpc_read_request(
        rpc, &arceus__report_audit_request__descriptor, MAX_EVIDENCE_BYTES + 4096);
    if (!req)
        return;
    ar_lease lease;
    if (authenticate_lease(m, rpc, req->lease_token, &lease) != 0)
        goto out;
    if (req->step < 0 || req->step > 1000000000000LL || req->stage >= 4096 ||
        (req->passed && req->material.len) || (!req->passed && !req->material.len)) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "ReportAudit: step %lld, stage %u, or %s out of range",
                      (long long)req->step, req->stage,
                      req->passed ? "evidence with a pass" : "a failure without evidence");
        goto out;
    }
    Arceus__ReportAuditReply r = ARCEUS__REPORT_AUDIT_REPLY__INIT;
    int rc;
    if (req->passed) {
        /* the renter's word is enough to pay a provider sooner */
        int released = 0;
        ar_lease_member *mem = NULL;
        size_t nm = 0;
        bool member = false;
        if ((rc = ar_store_lease_members(m->store, lease.id, &mem, &nm)) == AR_OK) {
            for (size_t i = 0; i < nm; i++)
                member = member || (mem[i].provider_id == req->provider_id && mem[i].stage == (int)req->stage);
            ar_free(mem);
            rc = member ? ar_rules_audit_passed(m->store, &lease, req->provider_id, req->step, &released)
                        : ar_fail(AR_EINVAL, "provider %lld is not the lease's member at stage %u",
                                  (long long)req->provider_id, req->stage);
        }
        r.released = released;
    } else {
        ar_audit_evidence ev = {.material = req->material.data, .material_bytes = req->material.len,
                                .optim = {.kind = (int)(req->optimizer < 8 ? req->optimizer : 8), .beta1 = req->beta1,
                                          .beta2 = req->beta2, .eps = req->eps, .weight_decay = req->weight_decay},
                                .seed = req->seed};
        bool confirmed = false;
        rc = ar_rules_audit_claim(m->store, &lease, req->provider_id, req->step, (int)req->stage, &ev, &confirmed,
                                  &r.returned);
        r.confirmed = confirmed;
    }
    if (rc == AR_ELIMIT) {
        ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "ReportAudit: %s", ar_last_error());
        goto out;
    }
    if (rc != AR_OK) {
        rule_error(rpc, rc, rc == AR_EINVAL || rc == AR_ENOTFOUND ? "ReportAudit" : NULL);
        goto out;
    }
    net_rpc_reply(rpc, &r.base);
out:
    arceus__report_audit_request__free_unpacked(req, NULL);
}

static void on_hand_over(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__HandOverRequest *req =
        (Arceus__HandOverRequest *)read_request(rpc, &arceus__hand_over_request__descriptor);
    if (!req)
        return;
    ar_lease lease;
    if (authenticate_lease(m, rpc, req->lease_token, &lease) != 0)
        goto out;
    if (req->step < 0 || req->step > 1000000000000LL || req->min_mem_bytes > (uint64_t)AR_MARKET_MAX_MEM) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "HandOver: step %lld or min_mem_bytes %llu out of range",
                      (long long)req->step, (unsigned long long)req->min_mem_bytes);
        goto out;
    }
    ar_market_handover done;
    int rc = ar_rules_hand_over(m->store, &m->policy, &lease, req->lease_token, req->provider_id, req->step,
                                (int64_t)req->min_mem_bytes, &done);
    if (rc != AR_OK) {
        rule_error(rpc, rc, rc == AR_EINVAL || rc == AR_ELIMIT ? "HandOver" : NULL);
        goto out;
    }
    Arceus__ProviderProfile prof;
    Arceus__LeasedProvider lp;
    Arceus__HandOverReply r = ARCEUS__HAND_OVER_REPLY__INIT;
    if (done.found) {
        relay_fill(m, lease.id, &done.replacement);
        leased_msg(&done.replacement, &prof, &lp);
        r.replacement = &lp;
    }
    r.spent = done.spent;
    net_rpc_reply(rpc, &r.base);
out:
    arceus__hand_over_request__free_unpacked(req, NULL);
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
    ar_market_ticket_check *got = NULL;
    char *addrs[AR_MARKET_MAX_DEVICES];
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
    /* (the words "lease token" stay in these messages: the ticket is what a
     * provider's Load carries in place of the lease token older drivers
     * sent) */
    if (!token_hex(req->ticket)) {
        ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED,
                      "malformed lease token: a provider's ticket is %d hex characters", AR_TOKEN_LEN - 1);
        goto out;
    }
    if (!(got = calloc(1, sizeof *got))) {
        ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory");
        goto out;
    }
    rc = ar_rules_check_ticket(m->store, req->provider_id, req->ticket, got);
    if (rc == AR_ENOTFOUND || rc == AR_EINVAL) {
        ar_log(AR_LOG_WARN, "market: provider %lld's ticket refused: %s", (long long)req->provider_id,
               ar_last_error());
        ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED, "%s: %s",
                      rc == AR_ENOTFOUND ? "unknown or released lease token" : "not this provider's lease token",
                      ar_last_error());
        goto out;
    }
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    for (size_t i = 0; i < got->n; i++)
        addrs[i] = got->addresses[i];
    Arceus__CheckLeaseReply r = ARCEUS__CHECK_LEASE_REPLY__INIT;
    r.job_id = got->lease.job_id;
    r.lease_id = got->lease.id;
    r.n_member_addresses = got->n;
    r.member_addresses = addrs;
    r.has_plan = got->has_plan;
    r.first_unit = (uint32_t)got->first_unit;
    r.last_unit = (uint32_t)got->last_unit;
    r.spec_sha256 = got->spec_sha256;
    r.micro_batch_rows = (uint32_t)got->mb_rows;
    r.micro_batches = (uint32_t)got->micro_batches;
    net_rpc_reply(rpc, &r.base);
out:
    free(got);
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
    /* the links: one per stage at most, in order, from the driver or a
     * device, with figures and megabytes that are numbers a page can show */
    if (p->n_links > p->n_stages) {
        snprintf(why, why_size, "plan: %zu links for %zu stages", p->n_links, p->n_stages);
        return false;
    }
    for (size_t i = 0; i < p->n_links; i++) {
        const Arceus__PlanLink *l = p->links[i];
        char bad[160];
        const char *c = l->compress;
        bool figures = finite_nonneg(l->down_mb_s) && finite_nonneg(l->up_mb_s) && finite_nonneg(l->rtt_ms) &&
                       l->down_mb_s < 1e9 && l->up_mb_s < 1e9 && l->rtt_ms < 1e7;
        bool mb = finite_nonneg(l->predicted_down_mb) && finite_nonneg(l->predicted_up_mb) &&
                  finite_nonneg(l->down_mb) && finite_nonneg(l->up_mb) && finite_nonneg(l->down_raw_mb) &&
                  finite_nonneg(l->up_raw_mb) && l->predicted_down_mb < 1e9 && l->predicted_up_mb < 1e9 &&
                  l->down_mb < 1e9 && l->up_mb < 1e9 && l->down_raw_mb < 1e9 && l->up_raw_mb < 1e9;
        if (l->stage != i || !figures || !mb || (strcmp(c, "none") && strcmp(c, "bf16") && strcmp(c, "int8"))) {
            snprintf(why, why_size, "plan: link %zu (into stage %u, compression %.16s) out of order or range", i,
                     l->stage, c);
            return false;
        }
        if ((i > 0 || strcmp(l->from, "driver") != 0) && !address_ok(l->from, bad, sizeof bad)) {
            snprintf(why, why_size, "plan: link %zu from: %s", i, bad);
            return false;
        }
        if (!address_ok(l->to, bad, sizeof bad)) {
            snprintf(why, why_size, "plan: link %zu to: %s", i, bad);
            return false;
        }
    }
    return true;
}

/* A checked plan as the market's plain struct (the dashboard's JSON is
 * built from it in src/market): stages[] is the caller's room for
 * p->n_stages stages; the texts point into the request. */
static void plan_from(const Arceus__JobPlan *p, ar_market_plan_stage *stages, ar_market_plan_link *links,
                      ar_market_plan *out)
{
    for (size_t i = 0; i < p->n_links; i++) {
        const Arceus__PlanLink *l = p->links[i];
        links[i] = (ar_market_plan_link){.stage = (int)l->stage, .from = l->from, .to = l->to,
                                         .down_mb_s = l->down_mb_s, .up_mb_s = l->up_mb_s, .rtt_ms = l->rtt_ms,
                                         .compress = l->compress, .predicted_down_mb = l->predicted_down_mb,
                                         .predicted_up_mb = l->predicted_up_mb, .down_mb = l->down_mb,
                                         .up_mb = l->up_mb, .down_raw_mb = l->down_raw_mb, .up_raw_mb = l->up_raw_mb};
    }
    for (size_t i = 0; i < p->n_stages; i++) {
        const Arceus__PlanStage *st = p->stages[i];
        ar_market_plan_stage *q = &stages[i];
        *q = (ar_market_plan_stage){.first_unit = (int)st->first_unit, .last_unit = (int)st->last_unit,
                                    .layers = st->layers, .predicted_ms = st->predicted_ms,
                                    .n_members = (int)st->n_members};
        for (size_t k = 0; k < st->n_members; k++) {
            const Arceus__PlanMember *pm = st->members[k];
            q->members[k] = (ar_market_plan_member){
                .provider_id = pm->provider_id, .device = pm->device, .share = pm->share,
                .head_begin = (int)pm->head_begin, .head_end = (int)pm->head_end,
                .hidden_begin = (int)pm->hidden_begin, .hidden_end = (int)pm->hidden_end,
                .relayed = pm->relayed};
        }
    }
    *out = (ar_market_plan){.model = p->model, .schedule = p->schedule, .micro_batches = (int)p->micro_batches,
                            .predicted_bubble = p->predicted_bubble, .n_stages = p->n_stages, .stages = stages,
                            .n_links = p->n_links, .links = links};
}

static void on_report_progress(ar_rpc *rpc, void *user)
{
    ar_market *m = user;
    Arceus__ReportProgressRequest *req =
        (Arceus__ReportProgressRequest *)read_request(rpc, &arceus__report_progress_request__descriptor);
    if (!req)
        return;
    ar_lease lease;
    ar_market_plan_stage *stages = NULL;
    ar_market_plan_link *links = NULL;
    char why[300];
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
    ar_market_plan plan;
    if (req->plan) {
        stages = calloc(req->plan->n_stages, sizeof *stages);
        links = calloc(req->plan->n_links ? req->plan->n_links : 1, sizeof *links);
        if (!stages || !links) {
            ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "ReportProgress: out of memory for the plan");
            goto out;
        }
        plan_from(req->plan, stages, links, &plan);
    }
    ar_market_progress_report report = {
        .live = {.step = req->step, .total_steps = req->total_steps, .items_per_s = req->items_per_s,
                 .eta_s = req->eta_s, .wall_s = req->wall_s},
        .times = times, .n_times = req->n_timings, .has_val = req->has_val_loss, .val_step = req->val_step,
        .val_loss = req->val_loss, .plan = req->plan ? &plan : NULL};
    snprintf(report.live.unit, sizeof report.live.unit, "%s", req->items_unit);
    int rc = ar_rules_report_progress(m->store, &lease, &report);
    if (rc != AR_OK) {
        store_error(rpc, rc);
        goto out;
    }
    Arceus__ReportProgressReply r = ARCEUS__REPORT_PROGRESS_REPLY__INIT;
    net_rpc_reply(rpc, &r.base);
out:
    free(stages);
    free(links);
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
        /* and what escrow holds past its settling window goes to its providers */
        if (ar_rules_settle_escrow(m->store, &m->policy, (int64_t)time(NULL), NULL) != AR_OK)
            ar_log(AR_LOG_ERROR, "market: escrow: %s", ar_last_error());
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
    if (c->max_providers_per_account < 0 || c->max_providers_per_account > AR_MARKET_MAX_PROVIDERS_LIMIT)
        return ar_fail(AR_EINVAL, "max providers per account %d out of range 1..%d", c->max_providers_per_account,
                       AR_MARKET_MAX_PROVIDERS_LIMIT);
    if (!(c->reach_timeout_s <= 60))
        return ar_fail(AR_EINVAL, "reach timeout %g s out of range (at most 60)", c->reach_timeout_s);
    if (c->escrow_window_s < 0 || c->escrow_window_s > 365LL * 86400)
        return ar_fail(AR_EINVAL, "escrow window %lld s out of range 0..%lld", (long long)c->escrow_window_s,
                       365LL * 86400);
    if (c->relay_listen && c->relay_at)
        return ar_fail(AR_EINVAL, "a market's relay runs inside it (--relay) or apart (--relay-at), not both");
    if (c->relay_at && !c->relay_key)
        return ar_fail(AR_EINVAL, "a relay run apart (--relay-at) needs the key it shares with the market "
                                  "(--relay-secret FILE)");
    ar_market *m = calloc(1, sizeof *m);
    if (!m)
        return ar_fail(AR_ENOMEM, "out of memory");
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    m->offline_after_s = c->offline_after_s > 0 ? c->offline_after_s : AR_MARKET_DEFAULT_OFFLINE_AFTER_S;
    m->reach_timeout_s = c->reach_timeout_s > 0 ? c->reach_timeout_s : AR_MARKET_DEFAULT_REACH_TIMEOUT_S;
    /* a market on loopback serves this machine only (tests, the demo): its
     * providers' workers are on loopback too */
    /* a provider beats more often than offline_after_s: a third of it
     * without a beat is a stopped heart (at most AR_CLAIM_QUIET_S) */
    double quiet = m->offline_after_s / 3.0;
    int rc = AR_OK;
    if (c->relay_key)
        memcpy(m->relay_key, c->relay_key, sizeof m->relay_key);
    else if (c->relay_listen)
        rc = ar_relay_key_random(m->relay_key);
    if (rc != AR_OK) {
        ar_market_stop(m);
        return rc;
    }
    /* a relay is no use to a market that checks nothing */
    int with_relay = (c->relay_listen || c->relay_at) && c->reach_timeout_s >= 0;
    m->policy = (ar_market_policy){.max_providers_per_account = c->max_providers_per_account,
                                   .allow_loopback = ar_rules_host_is_loopback(c->listen),
                                   .probe = c->reach_timeout_s < 0 ? NULL : reach_probe,
                                   .probe_ctx = m,
                                   .claim_quiet_s = quiet < AR_CLAIM_QUIET_S ? (quiet > 1 ? quiet : 1) : AR_CLAIM_QUIET_S,
                                   .escrow_window_s = c->escrow_window_s,
                                   .relay_probe = with_relay ? relay_probe : NULL};
    rc = ar_store_open(c->db_path, &m->store);
    if (rc != AR_OK) {
        ar_market_stop(m);
        return rc;
    }
    if (c->relay_listen && with_relay) {
        ar_relay_config rc_cfg = {.listen = c->relay_listen, .lease_live = relay_lease_live, .lease_ctx = m};
        memcpy(rc_cfg.key, m->relay_key, sizeof rc_cfg.key);
        rc = ar_relay_start(&rc_cfg, &m->relay_server, m->relay, sizeof m->relay);
        OPENSSL_cleanse(rc_cfg.key, sizeof rc_cfg.key);
        if (rc != AR_OK) {
            ar_market_stop(m);
            return rc;
        }
    } else if (c->relay_at && with_relay) {
        snprintf(m->relay, sizeof m->relay, "%s", c->relay_at);
    }
    int port = 0;
    if ((rc = ar_server_create(c->listen, &(ar_server_limits){.max_message = MAX_EVIDENCE_BYTES + 4096}, &m->server,
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
    ar_server_handle(m->server, "/arceus.Market/HandOver", on_hand_over, m);
    ar_server_handle(m->server, "/arceus.Market/ReportProgress", on_report_progress, m);
    ar_server_handle(m->server, "/arceus.Market/ReportAudit", on_report_audit, m);
    ar_server_limit_message(m->server, "/arceus.Market/ReportAudit", MAX_EVIDENCE_BYTES + 4096);
    /* every request but an audit's evidence is small */
    static const char *const small[] = {
        "/arceus.Market/RegisterProvider", "/arceus.Market/Heartbeat", "/arceus.Market/ListProviders",
        "/arceus.Market/Ledger", "/arceus.Market/Balance", "/arceus.Market/AcquireLease",
        "/arceus.Market/ReportUsage", "/arceus.Market/ReleaseLease", "/arceus.Market/CheckLease",
        "/arceus.Market/ListJobs", "/arceus.Market/GetJob", "/arceus.Market/ReplaceProvider",
        "/arceus.Market/HandOver", "/arceus.Market/ReportProgress"};
    for (size_t i = 0; i < sizeof small / sizeof small[0]; i++)
        ar_server_limit_message(m->server, small[i], MAX_REQUEST_BYTES);
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

const char *ar_market_relay(const ar_market *m)
{
    return m->relay;
}

void ar_market_stop(ar_market *m)
{
    if (!m)
        return;
    if (m->server)
        ar_server_destroy(m->server); /* cancels the calls, waits for the handlers */
    ar_relay_stop(m->relay_server);
    if (m->sweeper_started) {
        pthread_mutex_lock(&m->mu);
        m->stopping = 1;
        pthread_cond_broadcast(&m->cv);
        pthread_mutex_unlock(&m->mu);
        pthread_join(m->sweeper, NULL);
    }
    ar_store_close(m->store);
    pthread_mutex_destroy(&m->mu);
    pthread_cond_destroy(&m->cv);
    OPENSSL_cleanse(m->relay_key, sizeof m->relay_key);
    free(m);
}
