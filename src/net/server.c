/* gRPC servers (a thread per call, so a handler may block) and the client
 * side of unary and streaming calls. */
#include "net/net_internal.h"

#include "core/core.h"

#include <grpc/grpc_security.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HANDLERS 16
/* Peer hosts with calls open at once; a call from one more is refused. */
#define MAX_PEERS 256

/* The calls open from one peer host (the address without its port: one
 * client may open many connections), per method: what the per-peer limits
 * count. */
typedef struct {
    char host[128];
    int total;
    int calls[MAX_HANDLERS];
} peer_calls;

struct ar_rpc {
    ar_server *server;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    char method[128];
    char peer[128];
    int handler;        /* index into the server's handlers, -1 when unknown */
    peer_calls *counted; /* the entry this call is counted in, NULL when none */
    char refused[400];  /* over a limit: the handler is not run, this is the status */
    int quiet;          /* a failed authentication: the limiter logs it, not ar_rpc_finish */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int md_sent, close_started, status_sent, status_done;
    int cancelled;
    net_tag status_tag;
    ar_link *link;
};

struct ar_server {
    grpc_server *srv;
    struct {
        char method[128];
        ar_rpc_fn fn;
        void *user;
        int max_per_peer; /* calls of this method open from one peer host; 0: no limit */
        size_t max_message; /* bytes of one request message; 0: the server's gRPC limit */
    } handlers[MAX_HANDLERS];
    int nhandlers;
    int max_calls_per_peer; /* calls of any method open from one peer host */
    peer_calls *peers[MAX_PEERS];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int active;    /* handler threads running */
    int stopping;
    ar_rpc *pending; /* the call being requested */
    net_tag req_tag;
    /* failed authentications per peer host (auth_*): a table made at the
     * first failure, under auth_mu */
    pthread_mutex_t auth_mu;
    struct auth_host *auth;
};

static ar_rpc *rpc_new(void)
{
    ar_rpc *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    grpc_call_details_init(&r->details);
    grpc_metadata_array_init(&r->md);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    return r;
}

static void rpc_free(ar_rpc *r)
{
    grpc_call_details_destroy(&r->details);
    grpc_metadata_array_destroy(&r->md);
    if (r->call)
        grpc_call_unref(r->call);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

static void on_status(net_tag *t, int ok)
{
    ar_rpc *r = (ar_rpc *)((char *)t - offsetof(ar_rpc, status_tag));
    (void)ok;
    pthread_mutex_lock(&r->mu);
    r->status_done = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

void net_rpc_send_status_async(ar_rpc *r, int code, const char *msg)
{
    pthread_mutex_lock(&r->mu);
    if (r->status_sent) {
        pthread_mutex_unlock(&r->mu);
        return;
    }
    r->status_sent = 1;
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    grpc_slice details = grpc_slice_from_copied_string(msg ? msg : "");
    if (!r->md_sent) { /* a status-only reply still carries initial metadata */
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        r->md_sent = 1;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = (grpc_status_code)code;
    ops[n].data.send_status_from_server.status_details = &details;
    n++;
    if (!r->close_started) {
        ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        ops[n].data.recv_close_on_server.cancelled = &r->cancelled;
        n++;
        r->close_started = 1;
    }
    r->status_tag.cb = on_status;
    if (grpc_call_start_batch(r->call, ops, n, &r->status_tag, NULL) != GRPC_CALL_OK)
        r->status_done = 1;
    pthread_mutex_unlock(&r->mu);
    grpc_slice_unref(details);
}

void ar_rpc_finish(ar_rpc *r, int code, const char *fmt, ...)
{
    char msg[1024] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
    }
    if (code != AR_STATUS_OK)
        ar_log(r->quiet ? AR_LOG_DEBUG : AR_LOG_WARN, "%s from %s: %s", r->method, r->peer, msg);
    if (r->link)
        net_link_drain(r->link, 30);
    net_rpc_send_status_async(r, code, msg);
    pthread_mutex_lock(&r->mu);
    while (!r->status_done)
        pthread_cond_wait(&r->cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
}

/* A request over its method's own limit (ar_server_limit_message) is
 * refused as soon as gRPC hands it over: it is neither copied nor decoded
 * (a 200 MiB Hello used to be held four times: gRPC's buffer, the flat copy,
 * protobuf-c's copy of the unknown field). The status is sent here, so every
 * handler answers the same way. 1 when refused. */
static int message_over_limit(ar_rpc *r, grpc_byte_buffer *bb)
{
    size_t max = r->handler >= 0 ? r->server->handlers[r->handler].max_message : 0;
    size_t n = grpc_byte_buffer_length(bb);
    if (max == 0 || n <= max)
        return 0;
    ar_rpc_finish(r, AR_STATUS_RESOURCE_EXHAUSTED, "%s request of %zu bytes: the limit is %zu", r->method, n,
                  max);
    ar_fail(AR_ELIMIT, "%s request of %zu bytes: the limit is %zu", r->method, n, max);
    return 1;
}

int ar_rpc_read(ar_rpc *r, void **data, size_t *len)
{
    *data = NULL;
    *len = 0;
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    grpc_byte_buffer *bb = NULL;
    pthread_mutex_lock(&r->mu);
    if (!r->md_sent) {
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        r->md_sent = 1;
    }
    pthread_mutex_unlock(&r->mu);
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n].data.recv_message.recv_message = &bb;
    n++;
    if (!net_batch(r->call, ops, n, -1))
        return ar_fail(AR_ECLOSED, "%s: the call was cancelled", r->method);
    if (!bb)
        return AR_ECLOSED;
    if (message_over_limit(r, bb)) {
        grpc_byte_buffer_destroy(bb);
        return AR_ELIMIT;
    }
    int rc = net_buffer_flatten(bb, data, len);
    grpc_byte_buffer_destroy(bb);
    return rc;
}

int ar_rpc_write(ar_rpc *r, const void *data, size_t len)
{
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    pthread_mutex_lock(&r->mu);
    if (!r->md_sent) {
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        r->md_sent = 1;
    }
    pthread_mutex_unlock(&r->mu);
    grpc_slice s = grpc_slice_from_copied_buffer(data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = bb;
    n++;
    int ok = net_batch(r->call, ops, n, -1);
    grpc_byte_buffer_destroy(bb);
    return ok ? AR_OK : ar_fail(AR_ECLOSED, "%s: the client went away", r->method);
}

int ar_rpc_link(ar_rpc *r, const char *name, size_t max_frame, ar_link **out)
{
    pthread_mutex_lock(&r->mu);
    if (r->md_sent || r->close_started || r->link) {
        pthread_mutex_unlock(&r->mu);
        return ar_fail(AR_EINVAL, "ar_rpc_link: the call is already in use");
    }
    r->md_sent = 1;
    r->close_started = 1;
    pthread_mutex_unlock(&r->mu);
    r->link = net_link_new(r->call, 1, name, max_frame, r);
    if (!r->link)
        return AR_ENOMEM;
    *out = r->link;
    return AR_OK;
}

const char *ar_rpc_peer(const ar_rpc *r)
{
    return r->peer;
}

/* ---- the server --------------------------------------------------------- */

static void request_next_locked(ar_server *s);

/* "ipv4:127.0.0.1:5432" -> "ipv4:127.0.0.1" */
static void peer_host(const char *peer, char *host, size_t size)
{
    snprintf(host, size, "%s", peer);
    char *colon = strrchr(host, ':');
    if (colon && colon > host && strchr(host, ':') != colon)
        *colon = '\0';
}

/* Forget a peer host that has no call open. s->mu held. */
static void drop_peer_locked(ar_server *s, peer_calls *p)
{
    for (int i = 0; i < MAX_PEERS; i++)
        if (s->peers[i] == p)
            s->peers[i] = NULL;
    free(p);
}

/* Count a new call against its peer's limits, or say why it is refused
 * (r->refused). Each call runs on its own thread: without these limits one
 * client could hold any number of threads (a Pipe waits up to 10 s for the
 * stage). s->mu held. */
static void admit_locked(ar_server *s, ar_rpc *r)
{
    char host[128];
    peer_host(r->peer, host, sizeof host);
    peer_calls *p = NULL;
    int free_slot = -1;
    for (int i = 0; i < MAX_PEERS; i++) {
        if (s->peers[i] && strcmp(s->peers[i]->host, host) == 0) {
            p = s->peers[i];
            break;
        }
        if (!s->peers[i] && free_slot < 0)
            free_slot = i;
    }
    if (!p) {
        if (free_slot < 0 || !(p = calloc(1, sizeof *p))) {
            snprintf(r->refused, sizeof r->refused, "the server has calls open from %d peers, its "
                     "limit: try again later", MAX_PEERS);
            return;
        }
        snprintf(p->host, sizeof p->host, "%s", host);
        s->peers[free_slot] = p;
    }
    int h = r->handler;
    if (s->max_calls_per_peer > 0 && p->total >= s->max_calls_per_peer)
        snprintf(r->refused, sizeof r->refused, "%d calls open from %s already, the limit per client",
                 p->total, host);
    else if (h >= 0 && s->handlers[h].max_per_peer > 0 && p->calls[h] >= s->handlers[h].max_per_peer)
        snprintf(r->refused, sizeof r->refused, "%d %s calls open from %s already, the limit per "
                 "client", p->calls[h], r->method, host);
    if (r->refused[0]) {
        if (p->total == 0) /* the entry was made for this call */
            drop_peer_locked(s, p);
        return;
    }
    p->total++;
    if (h >= 0)
        p->calls[h]++;
    r->counted = p;
}

static void release_locked(ar_server *s, ar_rpc *r)
{
    peer_calls *p = r->counted;
    if (!p)
        return;
    p->total--;
    if (r->handler >= 0)
        p->calls[r->handler]--;
    if (p->total == 0)
        drop_peer_locked(s, p);
    r->counted = NULL;
}

static void *rpc_main(void *arg)
{
    ar_rpc *r = arg;
    ar_server *s = r->server;
    if (r->refused[0])
        ar_rpc_finish(r, AR_STATUS_RESOURCE_EXHAUSTED, "%s", r->refused);
    else if (r->handler >= 0)
        s->handlers[r->handler].fn(r, s->handlers[r->handler].user);
    else
        ar_rpc_finish(r, AR_STATUS_UNIMPLEMENTED, "no method %s", r->method);
    ar_rpc_finish(r, AR_STATUS_OK, NULL); /* nothing if the handler did */
    if (r->link) {
        /* the status is out: cancelling completes the link's last batches */
        grpc_call_cancel(r->call, NULL);
        net_link_release(r->link);
    }
    pthread_mutex_lock(&s->mu);
    release_locked(s, r);
    pthread_mutex_unlock(&s->mu);
    rpc_free(r);
    pthread_mutex_lock(&s->mu);
    s->active--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static void on_request(net_tag *t, int ok)
{
    ar_server *s = (ar_server *)((char *)t - offsetof(ar_server, req_tag));
    pthread_mutex_lock(&s->mu);
    ar_rpc *r = s->pending;
    s->pending = NULL;
    if (!ok || s->stopping) {
        if (ok && r->call)
            grpc_call_cancel(r->call, NULL);
        rpc_free(r);
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        return;
    }
    r->server = s;
    size_t ml = GRPC_SLICE_LENGTH(r->details.method);
    if (ml >= sizeof r->method)
        ml = sizeof r->method - 1;
    memcpy(r->method, GRPC_SLICE_START_PTR(r->details.method), ml);
    r->method[ml] = '\0';
    char *peer = grpc_call_get_peer(r->call);
    snprintf(r->peer, sizeof r->peer, "%s", peer ? peer : "?");
    gpr_free(peer);
    r->handler = -1;
    for (int i = 0; i < s->nhandlers; i++)
        if (strcmp(s->handlers[i].method, r->method) == 0)
            r->handler = i;
    admit_locked(s, r);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t th;
    s->active++;
    if (pthread_create(&th, &attr, rpc_main, r) != 0) {
        s->active--;
        release_locked(s, r);
        grpc_call_cancel(r->call, NULL);
        rpc_free(r);
    }
    pthread_attr_destroy(&attr);
    request_next_locked(s);
    pthread_mutex_unlock(&s->mu);
}

static void request_next_locked(ar_server *s)
{
    ar_rpc *r = rpc_new();
    if (!r) {
        ar_log(AR_LOG_ERROR, "out of memory: the server stops accepting calls");
        return;
    }
    s->pending = r;
    grpc_call_error e = grpc_server_request_call(s->srv, &r->call, &r->details, &r->md, ar_net_cq,
                                                 ar_net_cq, &s->req_tag);
    if (e != GRPC_CALL_OK) {
        s->pending = NULL;
        rpc_free(r);
        ar_log(AR_LOG_ERROR, "grpc_server_request_call failed (%d)", (int)e);
    }
}

int ar_server_create(const char *addr, const ar_server_limits *limits, ar_server **out, int *port)
{
    int rc = ar_net_init();
    if (rc != AR_OK)
        return rc;
    ar_server *s = calloc(1, sizeof *s);
    if (!s) {
        ar_net_shutdown();
        return ar_fail(AR_ENOMEM, "out of memory for a server");
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_mutex_init(&s->auth_mu, NULL);
    s->req_tag.cb = on_request;
    s->max_calls_per_peer = limits && limits->max_calls_per_peer ? limits->max_calls_per_peer
                                                                 : AR_SERVER_DEFAULT_CALLS_PER_PEER;
    grpc_arg args[NET_NARGS];
    grpc_channel_args ca;
    net_server_args(limits ? limits->max_message : 0, args, &ca);
    s->srv = grpc_server_create(&ca, NULL); /* copies the arguments */
    grpc_server_register_completion_queue(s->srv, ar_net_cq, NULL);
    grpc_server_credentials *creds = net_server_credentials();
    int p = creds ? grpc_server_add_http2_port(s->srv, addr, creds) : 0;
    if (creds)
        grpc_server_credentials_release(creds);
    if (p <= 0) {
        grpc_server_destroy(s->srv);
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->auth_mu);
        free(s);
        ar_net_shutdown();
        if (net_tls_server_on())
            return ar_fail(AR_EIO, "cannot listen on %s with TLS (address in use or invalid, or "
                                   "the certificate and key are not a matching pair)", addr);
        return ar_fail(AR_EIO, "cannot listen on %s (address in use or invalid)", addr);
    }
    *port = p;
    *out = s;
    return AR_OK;
}

int ar_server_handle(ar_server *s, const char *method, ar_rpc_fn fn, void *user)
{
    if (s->nhandlers >= MAX_HANDLERS)
        return ar_fail(AR_ELIMIT, "too many handlers");
    snprintf(s->handlers[s->nhandlers].method, sizeof s->handlers[0].method, "%s", method);
    s->handlers[s->nhandlers].fn = fn;
    s->handlers[s->nhandlers].user = user;
    s->handlers[s->nhandlers].max_per_peer = 0;
    s->handlers[s->nhandlers].max_message = 0;
    s->nhandlers++;
    return AR_OK;
}

int ar_server_limit_method(ar_server *s, const char *method, int max_per_peer)
{
    for (int i = 0; i < s->nhandlers; i++)
        if (strcmp(s->handlers[i].method, method) == 0) {
            s->handlers[i].max_per_peer = max_per_peer;
            return AR_OK;
        }
    return ar_fail(AR_EINVAL, "no handler for %s to limit", method);
}

int ar_server_limit_message(ar_server *s, const char *method, size_t max_bytes)
{
    for (int i = 0; i < s->nhandlers; i++)
        if (strcmp(s->handlers[i].method, method) == 0) {
            s->handlers[i].max_message = max_bytes;
            return AR_OK;
        }
    return ar_fail(AR_EINVAL, "no handler for %s to limit", method);
}

int ar_server_start(ar_server *s)
{
    grpc_server_start(s->srv);
    pthread_mutex_lock(&s->mu);
    request_next_locked(s);
    int ok = s->pending != NULL;
    pthread_mutex_unlock(&s->mu);
    return ok ? AR_OK : ar_fail(AR_EINTERNAL, "the server cannot accept calls");
}

void ar_server_destroy(ar_server *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_mutex_unlock(&s->mu);
    net_waiter w;
    net_waiter_init(&w);
    grpc_server_shutdown_and_notify(s->srv, ar_net_cq, &w);
    grpc_server_cancel_all_calls(s->srv);
    net_waiter_wait(&w, NULL, -1);
    net_waiter_destroy(&w);
    pthread_mutex_lock(&s->mu);
    while (s->active > 0 || s->pending)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    grpc_server_destroy(s->srv);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->auth_mu);
    free(s->auth);
    free(s);
    ar_net_shutdown();
}

/* ---- failed authentications, per peer host ------------------------------ */

/* Hosts remembered at once. A full table forgets the host whose last failure
 * is oldest, so one attacker spread over many addresses costs a fixed amount
 * of memory (and can at worst make the limiter forget some hosts early). */
#define AUTH_HOSTS 1024

struct auth_host {
    char host[128];   /* "" : a free slot */
    double window_at; /* when the current burst's first failure came */
    double last;      /* the latest failure */
    double blocked_until;
    int failures;     /* in the current window */
};

/* The entry of host, made (or taken from the stalest) when make is set;
 * NULL when none. s->auth_mu held. */
static struct auth_host *auth_entry_locked(ar_server *s, const char *host, int make, double now)
{
    if (!s->auth) {
        if (!make || !(s->auth = calloc(AUTH_HOSTS, sizeof *s->auth)))
            return NULL;
    }
    struct auth_host *oldest = NULL;
    for (int i = 0; i < AUTH_HOSTS; i++) {
        struct auth_host *e = &s->auth[i];
        if (e->host[0] && strcmp(e->host, host) == 0)
            return e;
        if (!oldest || !e->host[0] || (oldest->host[0] && e->last < oldest->last))
            oldest = e;
    }
    if (!make)
        return NULL;
    memset(oldest, 0, sizeof *oldest);
    snprintf(oldest->host, sizeof oldest->host, "%s", host);
    oldest->window_at = now;
    return oldest;
}

int ar_rpc_auth_refused(ar_rpc *r)
{
    ar_server *s = r->server;
    char host[128];
    peer_host(r->peer, host, sizeof host);
    double now = ar_now(), left = 0;
    pthread_mutex_lock(&s->auth_mu);
    struct auth_host *e = auth_entry_locked(s, host, 0, now);
    if (e && e->blocked_until > now)
        left = e->blocked_until - now;
    pthread_mutex_unlock(&s->auth_mu);
    if (left <= 0)
        return 0;
    r->quiet = 1; /* the block was logged when it began */
    ar_rpc_finish(r, AR_STATUS_RESOURCE_EXHAUSTED,
                  "too many failed authentications from %s: try again in %.0f s", host, left + 0.5);
    return 1;
}

void ar_rpc_auth_failed(ar_rpc *r, const char *what)
{
    ar_server *s = r->server;
    char host[128];
    peer_host(r->peer, host, sizeof host);
    double now = ar_now();
    int first = 0, blocked = 0, failures = 0;
    pthread_mutex_lock(&s->auth_mu);
    struct auth_host *e = auth_entry_locked(s, host, 1, now);
    if (e) {
        if (now - e->window_at > AR_AUTH_WINDOW_S) { /* a new burst */
            e->window_at = now;
            e->failures = 0;
        }
        first = e->failures == 0;
        e->failures++;
        e->last = now;
        failures = e->failures;
        if (e->failures == AR_AUTH_MAX_FAILURES) {
            e->blocked_until = now + AR_AUTH_BLOCK_S;
            blocked = 1;
        }
    }
    pthread_mutex_unlock(&s->auth_mu);
    r->quiet = 1;
    if (!e)
        ar_log(AR_LOG_WARN, "%s from %s: %s (out of memory for the failure table)", r->method, r->peer, what);
    else if (blocked)
        ar_log(AR_LOG_WARN, "%d failed authentications from %s within %.0f s (the last: %s): its calls "
               "that need a secret are refused for %.0f s", failures, host, AR_AUTH_WINDOW_S, what,
               AR_AUTH_BLOCK_S);
    else if (first)
        ar_log(AR_LOG_WARN, "failed authentication from %s: %s %s", host, r->method, what);
}

/* ---- clients ------------------------------------------------------------ */

struct ar_client {
    grpc_channel *ch;
    char addr[256];
};

int ar_client_open(const char *addr, ar_client **out)
{
    int rc = ar_net_init();
    if (rc != AR_OK)
        return rc;
    ar_client *c = calloc(1, sizeof *c);
    if (!c) {
        ar_net_shutdown();
        return ar_fail(AR_ENOMEM, "out of memory for a channel");
    }
    snprintf(c->addr, sizeof c->addr, "%s", addr);
    grpc_channel_credentials *creds = net_channel_credentials();
    c->ch = creds ? grpc_channel_create(addr, creds, net_channel_args()) : NULL;
    if (creds)
        grpc_channel_credentials_release(creds);
    if (!c->ch) {
        free(c);
        ar_net_shutdown();
        return ar_fail(AR_EINVAL, "%s: cannot create a channel", addr);
    }
    *out = c;
    return AR_OK;
}

void ar_client_close(ar_client *c)
{
    if (!c)
        return;
    grpc_channel_destroy(c->ch);
    free(c);
    ar_net_shutdown();
}

const char *ar_client_addr(const ar_client *c)
{
    return c->addr;
}

static grpc_call *new_call(ar_client *c, const char *method, double timeout_s)
{
    grpc_slice m = grpc_slice_from_copied_string(method);
    grpc_call *call = grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, ar_net_cq, m,
                                               NULL, net_deadline(timeout_s), NULL);
    grpc_slice_unref(m);
    return call;
}

/* Turn a finished call's status into our error code. */
static int status_result(ar_client *c, const char *method, grpc_status_code code,
                         grpc_slice details, int *status)
{
    if (status)
        *status = (int)code;
    if (code == GRPC_STATUS_OK)
        return AR_OK;
    char *d = grpc_slice_to_c_string(details);
    int rc;
    if (code == GRPC_STATUS_UNAVAILABLE || code == GRPC_STATUS_DEADLINE_EXCEEDED)
        rc = ar_fail(AR_ECLOSED, "%s: %s: unreachable or not answering (%s)%s", c->addr, method, d,
                     net_tls_client_on()
                         ? "; TLS is on: if it uses another CA or its certificate does not cover "
                           "this address, the handshake fails"
                         : "; if it uses TLS, pass its CA with --tls-ca");
    else
        rc = ar_fail(AR_EPROTO, "%s: %s", c->addr, d);
    gpr_free(d);
    return rc;
}

static grpc_byte_buffer *buffer_of(const void *data, size_t len)
{
    grpc_slice s = grpc_slice_from_copied_buffer(data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

int ar_client_unary(ar_client *c, const char *method, const void *req, size_t len, void **reply,
                    size_t *reply_len, double timeout_s, int *status)
{
    *reply = NULL;
    *reply_len = 0;
    grpc_call *call = new_call(c, method, timeout_s);
    if (!call)
        return ar_fail(AR_EINTERNAL, "%s: cannot create a call", c->addr);
    grpc_byte_buffer *out = buffer_of(req, len), *in = NULL;
    grpc_metadata_array imd, tmd;
    grpc_metadata_array_init(&imd);
    grpc_metadata_array_init(&tmd);
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = out;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &imd;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &in;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.status = &code;
    ops[5].data.recv_status_on_client.status_details = &details;
    ops[5].data.recv_status_on_client.trailing_metadata = &tmd;
    net_batch(call, ops, 6, -1); /* the deadline is the call's */
    int rc = status_result(c, method, code, details, status);
    if (rc == AR_OK && in)
        rc = net_buffer_flatten(in, reply, reply_len);
    else if (rc == AR_OK)
        rc = ar_fail(AR_EPROTO, "%s: %s: no reply", c->addr, method);
    if (in)
        grpc_byte_buffer_destroy(in);
    grpc_byte_buffer_destroy(out);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&imd);
    grpc_metadata_array_destroy(&tmd);
    grpc_call_unref(call);
    return rc;
}

static int finish_call(ar_client *c, grpc_call *call, const char *method, int *status)
{
    grpc_metadata_array tmd;
    grpc_metadata_array_init(&tmd);
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    op.data.recv_status_on_client.status = &code;
    op.data.recv_status_on_client.status_details = &details;
    op.data.recv_status_on_client.trailing_metadata = &tmd;
    net_batch(call, &op, 1, -1);
    int rc = status_result(c, method, code, details, status);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&tmd);
    return rc;
}

int ar_client_read_stream(ar_client *c, const char *method, const void *req, size_t len,
                          int (*on_msg)(void *user, const void *data, size_t len), void *user,
                          double timeout_s, int *status)
{
    grpc_call *call = new_call(c, method, timeout_s);
    if (!call)
        return ar_fail(AR_EINTERNAL, "%s: cannot create a call", c->addr);
    grpc_byte_buffer *out = buffer_of(req, len);
    grpc_metadata_array imd;
    grpc_metadata_array_init(&imd);
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = out;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &imd;
    int ok = net_batch(call, ops, 4, -1);
    int user_rc = AR_OK;
    char user_err[512] = "";
    while (ok) {
        grpc_byte_buffer *in = NULL;
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_RECV_MESSAGE;
        ops[0].data.recv_message.recv_message = &in;
        if (!net_batch(call, ops, 1, -1) || !in)
            break;
        void *data;
        size_t n;
        user_rc = net_buffer_flatten(in, &data, &n);
        grpc_byte_buffer_destroy(in);
        if (user_rc == AR_OK) {
            user_rc = on_msg(user, data, n);
            free(data);
        }
        if (user_rc != AR_OK) {
            snprintf(user_err, sizeof user_err, "%s", ar_last_error());
            grpc_call_cancel(call, NULL);
            break;
        }
    }
    int rc = finish_call(c, call, method, status);
    if (user_rc != AR_OK)
        rc = ar_fail(user_rc, "%s", user_err);
    grpc_byte_buffer_destroy(out);
    grpc_metadata_array_destroy(&imd);
    grpc_call_unref(call);
    return rc;
}

int ar_client_write_stream(ar_client *c, const char *method,
                           int (*next)(void *user, const void **data, size_t *len), void *user,
                           void **reply, size_t *reply_len, double timeout_s, int *status)
{
    *reply = NULL;
    *reply_len = 0;
    grpc_call *call = new_call(c, method, timeout_s);
    if (!call)
        return ar_fail(AR_EINTERNAL, "%s: cannot create a call", c->addr);
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    int ok = net_batch(call, ops, 1, -1);
    for (;;) {
        const void *data;
        size_t n;
        if (!ok || next(user, &data, &n) != 0)
            break;
        grpc_byte_buffer *bb = buffer_of(data, n);
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_SEND_MESSAGE;
        ops[0].data.send_message.send_message = bb;
        ok = net_batch(call, ops, 1, -1);
        grpc_byte_buffer_destroy(bb);
    }
    grpc_metadata_array imd, tmd;
    grpc_metadata_array_init(&imd);
    grpc_metadata_array_init(&tmd);
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_byte_buffer *in = NULL;
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (ok)
        ops[n++].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[n++].data.recv_initial_metadata.recv_initial_metadata = &imd;
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n++].data.recv_message.recv_message = &in;
    ops[n].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[n].data.recv_status_on_client.status = &code;
    ops[n].data.recv_status_on_client.status_details = &details;
    ops[n].data.recv_status_on_client.trailing_metadata = &tmd;
    n++;
    net_batch(call, ops, n, -1);
    int rc = status_result(c, method, code, details, status);
    if (rc == AR_OK && in)
        rc = net_buffer_flatten(in, reply, reply_len);
    if (in)
        grpc_byte_buffer_destroy(in);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&imd);
    grpc_metadata_array_destroy(&tmd);
    grpc_call_unref(call);
    return rc;
}

int ar_client_pipe_session(ar_client *c, const char *name, size_t max_frame, const char *session,
                           ar_link **out)
{
    grpc_call *call = new_call(c, "/arceus.Worker/Pipe", -1);
    if (!call)
        return ar_fail(AR_EINTERNAL, "%s: cannot create a call", c->addr);
    ar_link *l = net_link_new(call, 0, name, max_frame, NULL);
    grpc_call_unref(call); /* the link holds its own reference */
    if (!l)
        return AR_ENOMEM;
    if (session && session[0])
        net_link_set_session(l, session);
    *out = l;
    return AR_OK;
}

int ar_client_pipe(ar_client *c, const char *name, size_t max_frame, ar_link **out)
{
    return ar_client_pipe_session(c, name, max_frame, NULL, out);
}

void net_rpc_reply(ar_rpc *rpc, const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory");
        return;
    }
    protobuf_c_message_pack(m, buf);
    if (ar_rpc_write(rpc, buf, n) == AR_OK)
        ar_rpc_finish(rpc, AR_STATUS_OK, NULL);
    free(buf);
}
