/* gRPC servers (each running call has a thread, so a handler may block;
 * the threads are kept and reused) and the client side of unary and
 * streaming calls. */
#include "net/net_internal.h"

#include "core/core.h"

#include "net/relay.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <fcntl.h>
#include <grpc/grpc_posix.h>
#include <grpc/grpc_security.h>
#include <openssl/crypto.h>
#include <sys/socket.h>
#include <unistd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_HANDLERS 16
/* Buckets of the table of peer hosts with calls open (chained: the table
 * holds one entry per host with a call, whatever their number; the pools'
 * limits bound the calls, and so the entries). */
#define PEER_BUCKETS 1024
/* How often the watchdog looks for calls past a deadline. */
#define WATCHDOG_PERIOD_S 0.25
/* Handler threads are reused: starting one per call cost the market more
 * than the calls themselves (2,000 providers and 100 renters,
 * bench/market_load.py: clone, the stack's page faults and every library's
 * thread-local storage zeroed, OpenBLAS's 60 KiB of it, were most of the
 * market's CPU time, SQLite under 20%). A thread that has finished a call
 * waits this long for the next one, and at most IDLE_THREADS wait at once;
 * the others end. The running pool still bounds the threads that run
 * handlers, so a handler may block as before. */
#define IDLE_THREAD_S 30.0
#define IDLE_THREADS 64

/* The calls open from one peer host (net_peer_host: one client may open
 * many connections), per method: what the per-peer limits count. */
/* A handler thread, while it waits for a call to run (the server's idle
 * list, guarded by its mu). */
typedef struct handler_thread {
    pthread_cond_t cv;
    struct ar_rpc *call; /* handed over by run_locked; NULL: none yet */
    struct handler_thread *next;
} handler_thread;

typedef struct peer_calls {
    char host[128];
    int total;   /* calls open, in any state */
    int waiting; /* of them, counted in the waiting pool */
    int running; /* of them, counted in the running pool */
    int calls[MAX_HANDLERS];
    struct peer_calls *next; /* in its bucket */
} peer_calls;

/* Where a call stands (the server's lists, guarded by its mu): waiting for
 * its first request message, without a thread; running its handler on a
 * thread; ending (a status on its way, no thread: refused, dropped, past
 * its request deadline). */
enum { POOL_NONE, POOL_WAITING, POOL_RUNNING, POOL_ENDING, NPOOLS };
/* What a running handler waits on, for the watchdog. */
enum { WAIT_NONE, WAIT_READ, WAIT_WRITE, WAIT_FINISH };
/* What the watchdog reports, summed over one of its rounds (one log line
 * per kind and round rather than one per call: an attack would flood the
 * log). */
enum { EV_REQUEST_LATE, EV_WAITING_FULL, EV_RUNNING_FULL, EV_RUNNING_PUSHED, EV_READ_IDLE, EV_WRITE_STALL,
       EV_STREAM_IDLE, NEVENTS };

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
    /* admission and deadlines (admit.c's part of this file: guarded by the
     * server's mu unless atomic) */
    int pool;          /* POOL_* */
    int in_count;      /* counted in its pool's figures and its host's */
    int holds;         /* the first read, a detached status, the thread: freed at 0 */
    int detached;      /* no thread: the status batch's completion drops a hold */
    int dropped;       /* the server ended it (deadline, pushed out): once only */
    double since;      /* when it entered its pool (ar_now) */
    struct ar_rpc *prev, *next;
    net_tag first_tag;
    grpc_byte_buffer *first; /* the request, read before the handler runs (NULL: none came) */
    grpc_byte_buffer *reply; /* a unary reply on its way (rpc_reply_finish) */
    int have_first;
    atomic_int wait_kind;       /* WAIT_* */
    atomic_llong wait_since_ms; /* when that wait began */
    atomic_llong active_ms;     /* a stream's last message either way */
    atomic_llong send_ms;       /* a stream's send in flight since; 0: none */
    atomic_int timed_out;       /* the watchdog ended a read: not the client's end */
    int hard_cancelled;         /* ending: its status took too long, cancelled */
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
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int active;    /* handler threads running a call */
    int threads;   /* handler threads alive, running a call or idle */
    handler_thread *idle; /* the threads waiting for a call, the latest first */
    int nidle;
    int stopping;
    /* where a TLS server's adopted sockets are spliced to (ar_server_adopt):
     * its own listening address, the wildcard as loopback; and how many
     * such splices run */
    char local[300];
    int splices;
    volatile int splices_stop;
    ar_rpc *pending; /* the call being requested */
    net_tag req_tag;
    /* failed authentications per peer host (auth_*): a table made at the
     * first failure, under auth_mu */
    pthread_mutex_t auth_mu;
    struct auth_host *auth;
    /* admission and deadlines: the peer hosts with calls, the pools (lists
     * oldest first; counts of the calls counted in them), the deadlines,
     * per method: a stream's idle limit (> 0: its handler runs at once) and
     * its first message's deadline (0: request_s) */
    peer_calls *peers[PEER_BUCKETS];
    struct {
        ar_rpc *head, *tail;
        int n;
    } pools[NPOOLS];
    int nwaiting, nrunning;
    double request_s, idle_s, write_s;
    double stream_idle_s[MAX_HANDLERS], first_s[MAX_HANDLERS];
    char name[64];
    pthread_t watchdog;
    int watchdog_started, watchdog_stop;
    pthread_cond_t watchdog_cv;
    int events[NEVENTS]; /* what the watchdog will report */
    char event_example[NEVENTS][220];
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
    if (r->first)
        grpc_byte_buffer_destroy(r->first);
    if (r->reply)
        grpc_byte_buffer_destroy(r->reply);
    grpc_call_details_destroy(&r->details);
    grpc_metadata_array_destroy(&r->md);
    if (r->call)
        grpc_call_unref(r->call);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

static void rpc_wait_begin(ar_rpc *r, int kind);
static void rpc_wait_end(ar_rpc *r);
static void detached_status_done(ar_rpc *r);

static void on_status(net_tag *t, int ok)
{
    ar_rpc *r = (ar_rpc *)((char *)t - offsetof(ar_rpc, status_tag));
    (void)ok;
    pthread_mutex_lock(&r->mu);
    r->status_done = 1;
    int detached = r->detached;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    if (detached) /* no thread waits for it: the call may end now */
        detached_status_done(r);
}

/* Start the batch that ends a call with a status, and with a last message
 * before it when reply is not NULL (a unary reply: one batch, one trip
 * through the event loop, instead of one for the message and one for the
 * status). 1 when this started it. */
static int send_status_async(ar_rpc *r, int code, const char *msg, grpc_byte_buffer *reply)
{
    pthread_mutex_lock(&r->mu);
    if (r->status_sent) {
        pthread_mutex_unlock(&r->mu);
        return 0;
    }
    r->status_sent = 1;
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    grpc_slice details = grpc_slice_from_copied_string(msg ? msg : "");
    if (!r->md_sent) { /* a status-only reply still carries initial metadata */
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        r->md_sent = 1;
    }
    if (reply) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = reply;
        n++;
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
    int started = grpc_call_start_batch(r->call, ops, n, &r->status_tag, NULL) == GRPC_CALL_OK;
    if (!started)
        r->status_done = 1;
    pthread_mutex_unlock(&r->mu);
    grpc_slice_unref(details);
    return started;
}

int net_rpc_send_status_async(ar_rpc *r, int code, const char *msg)
{
    return send_status_async(r, code, msg, NULL);
}

/* Wait until the status batch completes: a client that reads nothing may
 * hold it back, and the watchdog then cancels the call after the write
 * timeout, which completes the batch. */
static void wait_status(ar_rpc *r)
{
    rpc_wait_begin(r, WAIT_FINISH);
    pthread_mutex_lock(&r->mu);
    while (!r->status_done)
        pthread_cond_wait(&r->cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
    rpc_wait_end(r);
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
    wait_status(r);
}

/* A unary call's reply and its OK status, in one batch. The handler does
 * not wait for it to go out: the call ends when it has (rpc_run). */
static void rpc_reply_finish(ar_rpc *r, const void *data, size_t len)
{
    grpc_slice s = grpc_slice_from_copied_buffer(data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    if (send_status_async(r, AR_STATUS_OK, NULL, bb))
        r->reply = bb; /* kept until the batch has completed: freed with the call */
    else
        grpc_byte_buffer_destroy(bb);
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

/* The client's next message, into *bb (NULL at the end of its stream). */
static int receive_message(ar_rpc *r, grpc_byte_buffer **bb)
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
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n].data.recv_message.recv_message = bb;
    n++;
    rpc_wait_begin(r, WAIT_READ);
    int ok = net_batch(r->call, ops, n, -1);
    rpc_wait_end(r);
    if (atomic_load(&r->timed_out)) {
        /* the watchdog sent DEADLINE_EXCEEDED: not the end of the client's stream */
        if (*bb)
            grpc_byte_buffer_destroy(*bb);
        *bb = NULL;
        return ar_fail(AR_ELIMIT, "%s: no message from %s within %.0f s", r->method, r->peer,
                       r->server->idle_s);
    }
    if (!ok)
        return ar_fail(AR_ECLOSED, "%s: the call was cancelled", r->method);
    return AR_OK;
}

int ar_rpc_read(ar_rpc *r, void **data, size_t *len)
{
    *data = NULL;
    *len = 0;
    grpc_byte_buffer *bb = NULL;
    if (r->have_first) {
        /* the request the server waited for before running the handler */
        r->have_first = 0;
        bb = r->first;
        r->first = NULL;
    } else {
        int rc = receive_message(r, &bb);
        if (rc != AR_OK)
            return rc;
    }
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

ProtobufCMessage *net_rpc_read_request(ar_rpc *rpc, const ProtobufCMessageDescriptor *d, size_t max_bytes)
{
    void *data;
    size_t len;
    if (ar_rpc_read(rpc, &data, &len) != AR_OK) {
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "%s without a request", d->short_name);
        return NULL;
    }
    if (max_bytes > 0 && len > max_bytes) {
        free(data);
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "%s of %zu bytes: the limit is %zu", d->short_name, len,
                      max_bytes);
        return NULL;
    }
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, len, data);
    free(data);
    if (!m)
        ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "malformed %s", d->short_name);
    return m;
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
    rpc_wait_begin(r, WAIT_WRITE);
    int ok = net_batch(r->call, ops, n, -1);
    rpc_wait_end(r);
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
    /* a method that is not a stream (ar_server_stream_method) had its first
     * message read before the handler ran: the link takes it */
    int have_first = r->have_first;
    grpc_byte_buffer *first = r->first;
    r->have_first = 0;
    r->first = NULL;
    r->link = net_link_new(r->call, 1, name, max_frame, r, first, have_first);
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
static void *handler_main(void *arg);

/* ---- admission: peer hosts, the pools of calls, deadlines ---------------
 *
 * A server that gives every call a thread at once and then waits on its
 * client for as long as the client likes is locked up by clients that open
 * calls and send nothing. So (net.h): a call first waits for its request
 * without a thread, within a deadline; the pools of waiting and running
 * calls are bounded, and room is made by pushing out the oldest waiting
 * call, or a running call of the host that holds the most; every wait of a
 * handler on its client is bounded, and a watchdog thread cancels the
 * calls past a deadline. */

/* A call pushed out, or refused, waits this long at most for its status to
 * go out before it is cancelled outright. */
#define ENDING_S 5.0


static int64_t now_ms(void)
{
    return (int64_t)(ar_now() * 1000.0);
}

static void rpc_wait_begin(ar_rpc *r, int kind)
{
    atomic_store(&r->wait_since_ms, now_ms());
    atomic_store(&r->wait_kind, kind);
}

static void rpc_wait_end(ar_rpc *r)
{
    atomic_store(&r->wait_kind, WAIT_NONE);
}

void net_rpc_note(ar_rpc *r, int what)
{
    int64_t ms = now_ms();
    if (what == NET_RPC_SEND_BEGIN) {
        atomic_store(&r->send_ms, ms);
        return;
    }
    if (what == NET_RPC_SEND_END)
        atomic_store(&r->send_ms, 0);
    atomic_store(&r->active_ms, ms);
}

void net_peer_host(const char *peer, char *host, size_t size)
{
    if (!strncmp(peer, "ipv6:", 5)) {
        /* "[addr]:port", the brackets perhaps %-encoded, a zone after '%' */
        char a[128];
        size_t n = 0;
        for (const char *p = peer + 5; *p && n + 1 < sizeof a; p++) {
            if (p[0] == '%' && p[1] == '5' && (p[2] == 'B' || p[2] == 'b' || p[2] == 'D' || p[2] == 'd')) {
                a[n++] = p[2] == 'B' || p[2] == 'b' ? '[' : ']';
                p += 2;
            } else {
                a[n++] = *p;
            }
        }
        a[n] = '\0';
        char *addr = a, *end;
        if (a[0] == '[' && (end = strchr(a, ']')) != NULL) {
            addr = a + 1;
            *end = '\0';
        }
        char *zone = strchr(addr, '%');
        if (zone)
            *zone = '\0';
        struct in6_addr in;
        if (inet_pton(AF_INET6, addr, &in) == 1) {
            const unsigned char *b = in.s6_addr;
            static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
            if (!memcmp(b, mapped, sizeof mapped)) {
                snprintf(host, size, "ipv4:%u.%u.%u.%u", b[12], b[13], b[14], b[15]);
                return;
            }
            /* a machine is usually given a whole /64: all of it is one host */
            memset(in.s6_addr + 8, 0, 8);
            char text[INET6_ADDRSTRLEN];
            if (inet_ntop(AF_INET6, &in, text, sizeof text)) {
                snprintf(host, size, "ipv6:%s/64", text);
                return;
            }
        }
    }
    /* "ipv4:127.0.0.1:5432" -> "ipv4:127.0.0.1" */
    snprintf(host, size, "%s", peer);
    char *colon = strrchr(host, ':');
    if (colon && colon > host && strchr(host, ':') != colon)
        *colon = '\0';
}

static unsigned host_bucket(const char *host)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)host; *p; p++)
        h = (h ^ *p) * 16777619u;
    return h % PEER_BUCKETS;
}

/* A host's entry, made when there is none; NULL when out of memory. s->mu held. */
static peer_calls *peer_get_locked(ar_server *s, const char *host)
{
    unsigned b = host_bucket(host);
    for (peer_calls *p = s->peers[b]; p; p = p->next)
        if (!strcmp(p->host, host))
            return p;
    peer_calls *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    snprintf(p->host, sizeof p->host, "%s", host);
    p->next = s->peers[b];
    s->peers[b] = p;
    return p;
}

/* Forget a peer host that has no call open. s->mu held. */
static void drop_peer_locked(ar_server *s, peer_calls *p)
{
    for (peer_calls **at = &s->peers[host_bucket(p->host)]; *at; at = &(*at)->next)
        if (*at == p) {
            *at = p->next;
            break;
        }
    free(p);
}

/* Count a new call against its peer's limits, or say why it is refused
 * (r->refused). Each running call holds a thread: without these limits one
 * client could hold any number of threads (a Pipe waits up to 10 s for the
 * stage). s->mu held. */
static void admit_locked(ar_server *s, ar_rpc *r)
{
    char host[128];
    net_peer_host(r->peer, host, sizeof host);
    peer_calls *p = peer_get_locked(s, host);
    if (!p) {
        snprintf(r->refused, sizeof r->refused, "the server is out of memory: try again later");
        return;
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

static void note_locked(ar_server *s, int ev, const ar_rpc *r)
{
    if (s->events[ev]++ == 0)
        snprintf(s->event_example[ev], sizeof s->event_example[ev], "%.100s from %.100s", r->method,
                 r->counted ? r->counted->host : r->peer);
}

static void pool_add_locked(ar_server *s, ar_rpc *r, int pool)
{
    r->pool = pool;
    r->since = ar_now();
    r->next = NULL;
    r->prev = s->pools[pool].tail;
    if (r->prev)
        r->prev->next = r;
    else
        s->pools[pool].head = r;
    s->pools[pool].tail = r;
    s->pools[pool].n++;
}

/* Stop counting a call in its pool's figures and its host's: it is on its
 * way out, and makes room at once. s->mu held. */
static void uncount_locked(ar_server *s, ar_rpc *r)
{
    if (!r->in_count)
        return;
    r->in_count = 0;
    if (r->pool == POOL_WAITING) {
        s->nwaiting--;
        r->counted->waiting--;
    } else if (r->pool == POOL_RUNNING) {
        s->nrunning--;
        r->counted->running--;
    }
}

static void pool_remove_locked(ar_server *s, ar_rpc *r)
{
    if (r->pool == POOL_NONE)
        return;
    uncount_locked(s, r);
    if (r->prev)
        r->prev->next = r->next;
    else
        s->pools[r->pool].head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        s->pools[r->pool].tail = r->prev;
    s->pools[r->pool].n--;
    r->pool = POOL_NONE;
    r->prev = r->next = NULL;
}

/* Drop one hold on a call; the last ends it. s->mu held. */
static void put_locked(ar_server *s, ar_rpc *r)
{
    if (--r->holds > 0)
        return;
    pool_remove_locked(s, r);
    release_locked(s, r);
    rpc_free(r);
    pthread_cond_broadcast(&s->cv);
}

/* End a call that has no thread with a status (a refusal, a deadline, a
 * push-out): it moves to the ending pool until the status is out. s->mu
 * held; r may be freed on return when it had no other hold. */
static void end_with_status_locked(ar_server *s, ar_rpc *r, int code, const char *msg, int log)
{
    if (log)
        ar_log(AR_LOG_WARN, "%s from %s: %s", r->method, r->peer, msg);
    pool_remove_locked(s, r);
    pool_add_locked(s, r, POOL_ENDING);
    r->dropped = 1;
    r->holds++;
    pthread_mutex_lock(&r->mu);
    r->detached = 1;
    pthread_mutex_unlock(&r->mu);
    if (!net_rpc_send_status_async(r, code, msg))
        put_locked(s, r); /* no batch, so no completion to wait for */
}

static void detached_status_done(ar_rpc *r)
{
    ar_server *s = r->server;
    pthread_mutex_lock(&s->mu);
    put_locked(s, r);
    pthread_mutex_unlock(&s->mu);
}

/* Run the call's handler on a thread of its own, if the running pool has
 * room or room can be made: a host with fewer running calls than the
 * busiest host's pushes out the oldest of the busiest's, so that hosts
 * holding many calls cannot lock out one holding few. s->mu held. */
static void run_locked(ar_server *s, ar_rpc *r)
{
    if (s->nrunning >= AR_SERVER_MAX_RUNNING) {
        ar_rpc *victim = NULL;
        for (ar_rpc *x = s->pools[POOL_RUNNING].head; x; x = x->next)
            if (x->in_count && (!victim || x->counted->running > victim->counted->running))
                victim = x;
        if (!victim || victim->counted->running <= r->counted->running + 1) {
            char msg[300];
            snprintf(msg, sizeof msg, "the server runs %d calls, its limit, and %.100s holds as many as "
                     "any client: try again later", s->nrunning, r->counted->host);
            note_locked(s, EV_RUNNING_FULL, r);
            end_with_status_locked(s, r, AR_STATUS_RESOURCE_EXHAUSTED, msg, 0);
            return;
        }
        note_locked(s, EV_RUNNING_PUSHED, victim);
        victim->dropped = 1;
        uncount_locked(s, victim);
        /* its handler's waits complete at once, and it ends */
        grpc_call_cancel_with_status(victim->call, GRPC_STATUS_RESOURCE_EXHAUSTED,
                                     "pushed out: the server runs its limit of calls and this client "
                                     "holds the most", NULL);
    }
    pool_add_locked(s, r, POOL_RUNNING);
    r->in_count = 1;
    s->nrunning++;
    r->counted->running++;
    atomic_store(&r->active_ms, now_ms());
    r->holds++;
    s->active++;
    handler_thread *idle = s->idle;
    if (idle) {
        s->idle = idle->next;
        s->nidle--;
        idle->call = r;
        pthread_cond_signal(&idle->cv);
        return;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t th;
    if (pthread_create(&th, &attr, handler_main, r) != 0) {
        s->active--;
        ar_log(AR_LOG_ERROR, "cannot start a thread for %s from %s: the call is cancelled", r->method, r->peer);
        grpc_call_cancel(r->call, NULL);
        put_locked(s, r);
    } else {
        s->threads++;
    }
    pthread_attr_destroy(&attr);
}

/* The first request message is in (or the client closed its side without
 * one): the handler may run. */
static void on_first(net_tag *t, int ok)
{
    ar_rpc *r = (ar_rpc *)((char *)t - offsetof(ar_rpc, first_tag));
    ar_server *s = r->server;
    pthread_mutex_lock(&s->mu);
    if (!ok || r->dropped || s->stopping) {
        /* the client cancelled, gRPC refused the message (over the size
         * limit), or the server dropped the call (its status is on its way) */
        if (!r->dropped)
            grpc_call_cancel(r->call, NULL);
    } else {
        pool_remove_locked(s, r);
        r->have_first = 1;
        run_locked(s, r);
    }
    put_locked(s, r); /* the first read's hold */
    pthread_mutex_unlock(&s->mu);
}

/* Wait for the call's first request message without a thread. The waiting
 * pool is bounded: when it is full, its oldest call is pushed out. An honest
 * client sends its request with the call, so its calls leave the pool
 * within a round trip (a burst of them may wait together for a moment: one
 * host's share of the pool is bounded by the calls it may open, not
 * separately), while a stalled call grows old there. s->mu held. */
static void wait_request_locked(ar_server *s, ar_rpc *r)
{
    peer_calls *p = r->counted;
    if (s->nwaiting >= AR_SERVER_MAX_WAITING) {
        ar_rpc *victim = s->pools[POOL_WAITING].head;
        while (victim && !victim->in_count)
            victim = victim->next;
        if (victim) {
            char msg[300];
            snprintf(msg, sizeof msg, "pushed out: %d calls were waiting for their requests, the "
                     "server's limit", s->nwaiting);
            note_locked(s, EV_WAITING_FULL, victim);
            end_with_status_locked(s, victim, AR_STATUS_RESOURCE_EXHAUSTED, msg, 0);
        }
    }
    pool_add_locked(s, r, POOL_WAITING);
    r->in_count = 1;
    s->nwaiting++;
    p->waiting++;
    r->holds++;
    r->first_tag.cb = on_first;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &r->first;
    if (grpc_call_start_batch(r->call, &op, 1, &r->first_tag, NULL) != GRPC_CALL_OK) {
        ar_log(AR_LOG_ERROR, "%s from %s: cannot read the request: the call is cancelled", r->method, r->peer);
        grpc_call_cancel(r->call, NULL);
        put_locked(s, r);
    }
}

/* The watchdog's round: cancel the calls past a deadline (net.h), then say
 * what it did. s->mu held. */
static void sweep_locked(ar_server *s)
{
    double now = ar_now();
    int64_t ms = now_ms();
    char msg[200];
    ar_rpc *next;
    for (ar_rpc *r = s->pools[POOL_WAITING].head; r; r = next) {
        next = r->next;
        double limit = s->first_s[r->handler] > 0 ? s->first_s[r->handler] : s->request_s;
        if (r->in_count && now - r->since > limit) {
            snprintf(msg, sizeof msg, "no request within %.0f s", limit);
            note_locked(s, EV_REQUEST_LATE, r);
            end_with_status_locked(s, r, AR_STATUS_DEADLINE_EXCEEDED, msg, 0);
        }
    }
    for (ar_rpc *r = s->pools[POOL_RUNNING].head; r; r = r->next) {
        if (r->dropped)
            continue;
        int kind = atomic_load(&r->wait_kind);
        double waited = (double)(ms - atomic_load(&r->wait_since_ms)) / 1000.0;
        double idle = s->stream_idle_s[r->handler];
        int64_t send = atomic_load(&r->send_ms);
        if (kind == WAIT_READ && waited > s->idle_s) {
            /* a status the client can read: its stream just went quiet */
            r->dropped = 1;
            atomic_store(&r->timed_out, 1);
            snprintf(msg, sizeof msg, "no message from the client within %.0f s", s->idle_s);
            note_locked(s, EV_READ_IDLE, r);
            net_rpc_send_status_async(r, AR_STATUS_DEADLINE_EXCEEDED, msg);
        } else if ((kind == WAIT_WRITE || kind == WAIT_FINISH) && waited > s->write_s) {
            /* the client reads nothing, so a status would not get through */
            r->dropped = 1;
            snprintf(msg, sizeof msg, "the client took nothing for %.0f s", s->write_s);
            note_locked(s, EV_WRITE_STALL, r);
            grpc_call_cancel_with_status(r->call, GRPC_STATUS_DEADLINE_EXCEEDED, msg, NULL);
        } else if (idle > 0 && ((double)(ms - atomic_load(&r->active_ms)) / 1000.0 > idle ||
                                (send && (double)(ms - send) / 1000.0 > idle))) {
            r->dropped = 1;
            snprintf(msg, sizeof msg, "stream idle for %.0f s", idle);
            note_locked(s, EV_STREAM_IDLE, r);
            grpc_call_cancel_with_status(r->call, GRPC_STATUS_DEADLINE_EXCEEDED, msg, NULL);
        }
    }
    for (ar_rpc *r = s->pools[POOL_ENDING].head; r; r = r->next)
        if (!r->hard_cancelled && now - r->since > ENDING_S) {
            r->hard_cancelled = 1;
            grpc_call_cancel(r->call, NULL);
        }
    static const char *const what[NEVENTS] = {
        [EV_REQUEST_LATE] = "cancelled (DEADLINE_EXCEEDED): no request within the deadline",
        [EV_WAITING_FULL] = "pushed out of the full pool of calls waiting for their requests",
        [EV_RUNNING_FULL] = "refused: the pool of running calls is full",
        [EV_RUNNING_PUSHED] = "pushed out of the full pool of running calls (their host held the most)",
        [EV_READ_IDLE] = "cancelled (DEADLINE_EXCEEDED): the client's stream went quiet",
        [EV_WRITE_STALL] = "cancelled (DEADLINE_EXCEEDED): the client reads nothing",
        [EV_STREAM_IDLE] = "cancelled (DEADLINE_EXCEEDED): the stream was idle too long",
    };
    for (int e = 0; e < NEVENTS; e++)
        if (s->events[e]) {
            ar_log(AR_LOG_WARN, "server %s: %d call%s %s (%s%s)", s->name, s->events[e],
                   s->events[e] == 1 ? "" : "s", what[e], s->event_example[e], s->events[e] > 1 ? ", ..." : "");
            s->events[e] = 0;
        }
}

static void *watchdog_main(void *arg)
{
    ar_server *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->watchdog_stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += (long)(WATCHDOG_PERIOD_S * 1e9);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&s->watchdog_cv, &s->mu, &ts);
        if (!s->watchdog_stop)
            sweep_locked(s);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int ar_server_stream_method(ar_server *s, const char *method, double idle_s)
{
    for (int i = 0; i < s->nhandlers; i++)
        if (strcmp(s->handlers[i].method, method) == 0) {
            s->stream_idle_s[i] = idle_s > 0 ? idle_s : s->idle_s;
            return AR_OK;
        }
    return ar_fail(AR_EINVAL, "no handler for %s to make a stream", method);
}

int ar_server_request_timeout(ar_server *s, const char *method, double first_s)
{
    for (int i = 0; i < s->nhandlers; i++)
        if (strcmp(s->handlers[i].method, method) == 0) {
            s->first_s[i] = first_s;
            return AR_OK;
        }
    return ar_fail(AR_EINVAL, "no handler for %s to give a request timeout", method);
}

static void server_deadlines_init(ar_server *s, const ar_server_limits *limits)
{
    pthread_cond_init(&s->watchdog_cv, NULL);
    s->request_s = limits && limits->request_timeout_s > 0 ? limits->request_timeout_s
                                                           : AR_SERVER_DEFAULT_REQUEST_S;
    s->idle_s = limits && limits->idle_timeout_s > 0 ? limits->idle_timeout_s : AR_SERVER_DEFAULT_IDLE_S;
    s->write_s = limits && limits->write_timeout_s > 0 ? limits->write_timeout_s : AR_SERVER_DEFAULT_WRITE_S;
}

static int watchdog_start(ar_server *s)
{
    if (pthread_create(&s->watchdog, NULL, watchdog_main, s) != 0)
        return ar_fail(AR_EINTERNAL, "cannot start the server's watchdog thread");
    s->watchdog_started = 1;
    return AR_OK;
}

static void watchdog_stop(ar_server *s)
{
    if (!s->watchdog_started)
        return;
    pthread_mutex_lock(&s->mu);
    s->watchdog_stop = 1;
    pthread_cond_broadcast(&s->watchdog_cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->watchdog, NULL);
    s->watchdog_started = 0;
}

/* Calls the server still holds, with a thread or without. */
static int server_calls_left_locked(const ar_server *s)
{
    return s->pools[POOL_WAITING].n + s->pools[POOL_RUNNING].n + s->pools[POOL_ENDING].n;
}

/* ---- calls: threads and requests ------------------------------------------- */

/* Run a call's handler and end the call; on the thread the call was given.
 * A call without a stream is left to end when its status is out (a
 * detached status, like a refused call's), so that the thread does not
 * wait a round trip through the event loop for it: each such wait and
 * wake-up cost about as much as the market's whole handling of a
 * Heartbeat. */
static void rpc_run(ar_rpc *r)
{
    ar_server *s = r->server;
    s->handlers[r->handler].fn(r, s->handlers[r->handler].user);
    if (r->link) {
        ar_rpc_finish(r, AR_STATUS_OK, NULL); /* nothing if the handler did */
        /* the status is out: cancelling completes the link's last batches */
        grpc_call_cancel(r->call, NULL);
        net_link_release(r->link);
    } else {
        net_rpc_send_status_async(r, AR_STATUS_OK, NULL); /* nothing if the handler did */
    }
    pthread_mutex_lock(&s->mu);
    if (!r->link) {
        pthread_mutex_lock(&r->mu);
        int pending = !r->status_done;
        r->detached = pending; /* on_status ends the call */
        pthread_mutex_unlock(&r->mu);
        if (pending) {
            /* the status's hold; the ending pool's deadline cancels a call
             * whose client takes nothing */
            r->holds++;
            pool_remove_locked(s, r);
            pool_add_locked(s, r, POOL_ENDING);
        }
    }
    put_locked(s, r); /* the thread's hold */
    s->active--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* A handler thread: runs the call it was started for, then waits (idle)
 * for the next one that run_locked hands it, until IDLE_THREAD_S pass with
 * none, IDLE_THREADS others wait already, or the server stops. */
static void *handler_main(void *arg)
{
    ar_rpc *r = arg;
    ar_server *s = r->server;
    handler_thread self = {.call = NULL, .next = NULL};
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&self.cv, &ca);
    pthread_condattr_destroy(&ca);
    while (r) {
        rpc_run(r);
        r = NULL;
        pthread_mutex_lock(&s->mu);
        if (!s->stopping && s->nidle < IDLE_THREADS) {
            self.call = NULL;
            self.next = s->idle;
            s->idle = &self;
            s->nidle++;
            struct timespec until;
            clock_gettime(CLOCK_MONOTONIC, &until);
            until.tv_sec += (time_t)IDLE_THREAD_S;
            while (!self.call && !s->stopping)
                if (pthread_cond_timedwait(&self.cv, &s->mu, &until) != 0)
                    break;
            r = self.call;
            if (!r) { /* still on the idle list: leave it */
                for (handler_thread **at = &s->idle; *at; at = &(*at)->next)
                    if (*at == &self) {
                        *at = self.next;
                        s->nidle--;
                        break;
                    }
            }
        }
        if (!r) {
            /* the last touch of s: ar_server_destroy waits for threads == 0 */
            s->threads--;
            pthread_cond_broadcast(&s->cv);
        }
        pthread_mutex_unlock(&s->mu);
    }
    pthread_cond_destroy(&self.cv);
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
    if (r->refused[0]) {
        end_with_status_locked(s, r, AR_STATUS_RESOURCE_EXHAUSTED, r->refused, 1);
    } else if (r->handler < 0) {
        char msg[200];
        snprintf(msg, sizeof msg, "no method %.150s", r->method);
        end_with_status_locked(s, r, AR_STATUS_UNIMPLEMENTED, msg, 1);
    } else if (s->stream_idle_s[r->handler] > 0) {
        run_locked(s, r); /* a stream: the client may have nothing to send yet */
    } else {
        wait_request_locked(s, r);
    }
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

/* The address a process reaches its own server at: the host it listens on,
 * the wildcard as loopback. */
static void local_address(const char *addr, int port, char *out, size_t size)
{
    const char *colon = strrchr(addr, ':');
    int hl = colon ? (int)(colon - addr) : (int)strlen(addr);
    if (hl == 0 || (hl == 7 && !strncmp(addr, "0.0.0.0", 7)))
        snprintf(out, size, "127.0.0.1:%d", port);
    else if ((hl == 4 && !strncmp(addr, "[::]", 4)) || (hl == 2 && !strncmp(addr, "::", 2)))
        snprintf(out, size, "[::1]:%d", port);
    else
        snprintf(out, size, "%.*s:%d", hl, addr, port);
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
    server_deadlines_init(s, limits);
    /* What the server's connections may hold at once (docs/DESIGN.md,
     * "Security model"). gRPC 1.51 reads a message whole, at the speed it
     * comes, whatever its size, before any limit applies: the flow-control
     * window grows with the message's declared length. Its memory is
     * charged to the server's resource quota, though, and past the quota
     * gRPC reclaims: idle connections are closed, then streams cancelled
     * ("Buffers full", one at a time until it is under again). Default: one
     * largest message being assembled and one more behind it on a stream,
     * plus 64 MiB for everything else (connections' read buffers, calls). */
    size_t max_message = limits ? limits->max_message : 0;
    size_t buffered = limits && limits->max_buffered ? limits->max_buffered
                      : max_message              ? 2 * max_message + ((size_t)64 << 20)
                                                 : 0;
    grpc_resource_quota *quota = NULL;
    if (buffered) {
        char name[80];
        snprintf(name, sizeof name, "server %.60s", addr);
        quota = grpc_resource_quota_create(name);
        grpc_resource_quota_resize(quota, buffered);
    }
    grpc_arg args[NET_NARGS + 1];
    grpc_channel_args ca;
    net_server_args(max_message, quota, args, &ca);
    s->srv = grpc_server_create(&ca, NULL); /* copies the arguments, and holds the quota */
    if (quota)
        grpc_resource_quota_unref(quota);
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
        pthread_cond_destroy(&s->watchdog_cv);
        free(s);
        ar_net_shutdown();
        if (net_tls_server_on())
            return ar_fail(AR_EIO, "cannot listen on %s with TLS (address in use or invalid, or "
                                   "the certificate and key are not a matching pair)", addr);
        return ar_fail(AR_EIO, "cannot listen on %s (address in use or invalid)", addr);
    }
    snprintf(s->name, sizeof s->name, "%.40s (port %d)", addr, p);
    local_address(addr, p, s->local, sizeof s->local);
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
    if (watchdog_start(s) != AR_OK)
        return AR_EINTERNAL;
    grpc_server_start(s->srv);
    pthread_mutex_lock(&s->mu);
    request_next_locked(s);
    int ok = s->pending != NULL;
    pthread_mutex_unlock(&s->mu);
    return ok ? AR_OK : ar_fail(AR_EINTERNAL, "the server cannot accept calls");
}

typedef struct {
    ar_server *s;
    int outside, inside;
} adopted_splice;

static void *adopted_splice_main(void *arg)
{
    adopted_splice *j = arg;
    ar_server *s = j->s;
    ar_net_splice(j->outside, j->inside, &s->splices_stop);
    close(j->outside);
    close(j->inside);
    free(j);
    pthread_mutex_lock(&s->mu);
    s->splices--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* A connection to the server's own address (blocking), or -1. */
static int dial_self(const ar_server *s)
{
    return ar_net_dial(s->local, 5.0);
}

int ar_server_adopt(ar_server *s, int fd)
{
    pthread_mutex_lock(&s->mu);
    int stopping = s->stopping;
    if (!stopping && net_tls_server_on())
        s->splices++;
    pthread_mutex_unlock(&s->mu);
    if (stopping) {
        close(fd);
        return ar_fail(AR_ECLOSED, "the server is stopping");
    }
    if (!net_tls_server_on()) {
        /* gRPC's own sockets are non-blocking; so must this one be */
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
            close(fd);
            return ar_fail(AR_EIO, "cannot make an adopted socket non-blocking");
        }
        grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
        grpc_server_add_channel_from_fd(s->srv, fd, creds);
        grpc_server_credentials_release(creds);
        return AR_OK;
    }
    /* TLS ends at the server's own port, where it ends for every client */
    adopted_splice *j = calloc(1, sizeof *j);
    int inside = j ? dial_self(s) : -1;
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    int ok = inside >= 0;
    if (ok) {
        *j = (adopted_splice){.s = s, .outside = fd, .inside = inside};
        ok = pthread_create(&t, &at, adopted_splice_main, j) == 0;
    }
    pthread_attr_destroy(&at);
    if (ok)
        return AR_OK;
    if (inside >= 0)
        close(inside);
    close(fd);
    free(j);
    pthread_mutex_lock(&s->mu);
    s->splices--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return ar_fail(AR_EIO, "cannot reach the server's own address %s for an adopted connection", s->local);
}

void ar_server_destroy(ar_server *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    s->splices_stop = 1;
    pthread_mutex_unlock(&s->mu);
    net_waiter w;
    net_waiter_init(&w);
    grpc_server_shutdown_and_notify(s->srv, ar_net_cq, &w);
    grpc_server_cancel_all_calls(s->srv);
    net_waiter_wait(&w, NULL, -1);
    net_waiter_destroy(&w);
    pthread_mutex_lock(&s->mu);
    for (handler_thread *t = s->idle; t; t = t->next) /* stopping is set: they end */
        pthread_cond_signal(&t->cv);
    while (s->active > 0 || s->threads > 0 || s->pending || server_calls_left_locked(s) || s->splices > 0)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    watchdog_stop(s);
    grpc_server_destroy(s->srv);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->auth_mu);
    free(s->auth);
    pthread_cond_destroy(&s->watchdog_cv);
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
    net_peer_host(r->peer, host, sizeof host);
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
    net_peer_host(r->peer, host, sizeof host);
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

int ar_client_open_relayed(const char *addr, const char *relay, const char *pass, ar_client **out)
{
    /* both go into a URL: only the characters of a pass and of HOST:PORT */
    size_t rl = relay ? strlen(relay) : 0;
    for (size_t i = 0; i < rl; i++) {
        unsigned char ch = (unsigned char)relay[i];
        if (!isalnum(ch) && ch != '.' && ch != '-' && ch != '_' && ch != ':' && ch != '[' && ch != ']')
            rl = 0;
    }
    if (rl == 0 || rl > 255 || !strchr(relay, ':'))
        return ar_fail(AR_EINVAL, "relay address \"%.64s\" is not HOST:PORT", relay ? relay : "");
    if (!ar_relay_pass_wellformed(pass))
        return ar_fail(AR_EINVAL, "not a relay pass");
    int rc = ar_net_init();
    if (rc != AR_OK)
        return rc;
    ar_client *c = calloc(1, sizeof *c);
    if (!c) {
        ar_net_shutdown();
        return ar_fail(AR_ENOMEM, "out of memory for a channel");
    }
    snprintf(c->addr, sizeof c->addr, "%s", addr);
    /* the usual arguments, and the relay as this channel's HTTP CONNECT proxy
     * (gRPC sends the URL's user part as Proxy-Authorization: Basic) */
    const grpc_channel_args *base = net_channel_args();
    grpc_arg args[NET_NARGS + 1];
    memcpy(args, base->args, base->num_args * sizeof *args);
    char proxy[400];
    snprintf(proxy, sizeof proxy, "http://%s@%s", pass, relay);
    args[base->num_args].type = GRPC_ARG_STRING;
    args[base->num_args].key = (char *)GRPC_ARG_HTTP_PROXY;
    args[base->num_args].value.string = proxy;
    grpc_channel_args ca = {.num_args = base->num_args + 1, .args = args};
    grpc_channel_credentials *creds = net_channel_credentials();
    c->ch = creds ? grpc_channel_create(addr, creds, &ca) : NULL; /* copies the arguments */
    if (creds)
        grpc_channel_credentials_release(creds);
    OPENSSL_cleanse(proxy, sizeof proxy);
    if (!c->ch) {
        free(c);
        ar_net_shutdown();
        return ar_fail(AR_EINVAL, "%s: cannot create a channel through relay %s", addr, relay);
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
    ar_link *l = net_link_new(call, 0, name, max_frame, NULL, NULL, 0);
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
    rpc_reply_finish(rpc, buf, n);
    free(buf);
}
