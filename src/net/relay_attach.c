/* A provider's side of the relay (net/relay.h): the control connection kept
 * open from behind the provider's router, and the data connections dialled
 * back for each circuit, which the worker serves as if it had accepted them.
 *
 * Everything here dials out: that is the point (a router lets a machine dial
 * anywhere and lets nothing in). One thread keeps the control connection up,
 * reconnecting with a backoff that doubles from RECONNECT_MIN_S to
 * RECONNECT_MAX_S; each DIAL gets a short-lived thread that connects, names
 * its circuit and hands the socket to the worker. */
#include "net/relay.h"

#include "core/core.h"
#include "market/rules.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CONNECT_S 5.0
/* A stage waiting to be dialled back directly falls back on the relay after
 * a few seconds (net/relay_reverse.c): no use trying longer here. */
#define DIAL_BACK_DIRECT_S 3.0
#define RECONNECT_MIN_S 0.25
#define RECONNECT_MAX_S 8.0
/* Data connections being dialled at once: a relay asking for more is
 * ignored (its clients time out) rather than obeyed without bound. */
#define MAX_DIALS 32

struct ar_relay_attach {
    char relay[256];
    int64_t provider;
    char address[256];
    char credential[AR_RELAY_CREDENTIAL_HEX + 1];
    ar_relay_adopt_fn adopt;
    void *adopt_ctx;
    pthread_t thread;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC */
    int stopping, attached, dials, refused;
};

int ar_net_resolve(const char *hostport, int passive, struct addrinfo **res)
{
    char host[256];
    const char *colon = strrchr(hostport, ':');
    if (!colon || colon == hostport || (size_t)(colon - hostport) >= sizeof host)
        return ar_fail(AR_EINVAL, "%s is not HOST:PORT", hostport);
    memcpy(host, hostport, (size_t)(colon - hostport));
    host[colon - hostport] = '\0';
    char *h = host;
    if (h[0] == '[' && h[strlen(h) - 1] == ']') { /* an IPv6 address: [::1]:7000 */
        h[strlen(h) - 1] = '\0';
        h++;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = passive ? AI_PASSIVE : 0};
    *res = NULL;
    int gai = getaddrinfo(h[0] || !passive ? h : NULL, colon + 1, &hints, res);
    if (gai != 0 || !*res) {
        if (*res)
            freeaddrinfo(*res);
        *res = NULL;
        return ar_fail(AR_EIO, "cannot resolve %s: %s", hostport, gai != 0 ? gai_strerror(gai) : "no address");
    }
    return AR_OK;
}

int ar_net_dial(const char *hostport, double timeout_s)
{
    struct addrinfo *res;
    if (ar_net_resolve(hostport, 0, &res) != AR_OK)
        return -1;
    int fd = -1, err = 0;
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int rc = connect(fd, a->ai_addr, a->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            socklen_t sl = sizeof err;
            if (poll(&p, 1, (int)(timeout_s * 1000)) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl) == 0)
                rc = err == 0 ? 0 : -1;
            else
                err = ETIMEDOUT;
        } else if (rc != 0) {
            err = errno;
        }
        if (rc != 0) {
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0) {
        ar_fail(AR_ECLOSED, "cannot connect to %s: %s", hostport, strerror(err ? err : ECONNREFUSED));
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    return fd;
}

static int send_all(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t k = send(fd, s, n, MSG_NOSIGNAL);
        if (k <= 0) {
            if (k < 0 && errno == EINTR)
                continue;
            return -1;
        }
        s += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Sleep up to seconds unless stopped: 1 when stopping. */
static int pause_unless_stopped(ar_relay_attach *a, double seconds)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long ns = ts.tv_nsec + (long long)(seconds * 1e9);
    ts.tv_sec += ns / 1000000000LL;
    ts.tv_nsec = ns % 1000000000LL;
    pthread_mutex_lock(&a->mu);
    while (!a->stopping && pthread_cond_timedwait(&a->cv, &a->mu, &ts) != ETIMEDOUT) {
    }
    int stop = a->stopping;
    pthread_mutex_unlock(&a->mu);
    return stop;
}

typedef struct {
    ar_relay_attach *a;
    uint64_t circuit;
    char nonce[33];
    char target[300]; /* "" : the relay (a circuit); else the stage to dial back directly */
} dial_job;

/* One DIAL: connect back, name the circuit, give the socket to the worker. */
static void *dial_main(void *arg)
{
    dial_job *j = arg;
    ar_relay_attach *a = j->a;
    int fd = j->target[0] ? ar_net_dial(j->target, DIAL_BACK_DIRECT_S) : ar_net_dial(a->relay, CONNECT_S);
    if (fd >= 0) {
        char line[96];
        int n = snprintf(line, sizeof line, "ARCEUS-RELAY 1 DATA %" PRIu64 " %s\n", j->circuit, j->nonce);
        if (send_all(fd, line, (size_t)n) != 0) {
            ar_log(AR_LOG_WARN, "relay: circuit %" PRIu64 ": the relay closed the connection", j->circuit);
            close(fd);
        } else if (a->adopt(a->adopt_ctx, fd) != AR_OK) { /* (which owns fd, also on failure) */
            ar_log(AR_LOG_WARN, "relay: circuit %" PRIu64 " not served: %s", j->circuit, ar_last_error());
        }
    } else if (j->target[0]) {
        ar_log(AR_LOG_WARN, "relay: cannot dial the previous stage at %s directly (%s): it goes through the "
               "relay instead", j->target, ar_last_error());
    } else {
        ar_log(AR_LOG_WARN, "relay: cannot dial back for circuit %" PRIu64 ": %s", j->circuit, ar_last_error());
    }
    if (fd >= 0 && j->target[0])
        ar_log(AR_LOG_INFO, "relay: dialled the previous stage at %s directly", j->target);
    pthread_mutex_lock(&a->mu);
    a->dials--;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    free(j);
    return NULL;
}

/* DIAL CIRCUIT NONCE (to the relay), or DIALTO HOST:PORT NONCE (direct:
 * direct set). */
static void start_dial(ar_relay_attach *a, const char *args, int direct)
{
    dial_job *j = calloc(1, sizeof *j);
    int used = 0;
    if (!j)
        return;
    j->a = a;
    int ok = direct ? sscanf(args, "%299s %32s%n", j->target, j->nonce, &used) == 2
                    : sscanf(args, "%" SCNu64 " %32s%n", &j->circuit, j->nonce, &used) == 2;
    if (!ok || args[used] != '\0' || strlen(j->nonce) != 32) {
        ar_log(AR_LOG_WARN, "relay: a malformed %s from the relay: ignored", direct ? "DIALTO" : "DIAL");
        free(j);
        return;
    }
    /* the relay names the address its asker came from; still, this machine
     * dials out only to an address a worker may have (not loopback unless
     * the relay is, nor link-local, multicast, ...): whoever sits between
     * us and the relay cannot point us at our own network's services */
    char why[200];
    if (direct && ar_rules_check_address(j->target, ar_rules_host_is_loopback(a->relay), why, sizeof why) != AR_OK) {
        ar_log(AR_LOG_WARN, "relay: DIALTO %.64s refused: %s", j->target, why);
        free(j);
        return;
    }
    pthread_mutex_lock(&a->mu);
    int room = a->dials < MAX_DIALS && !a->stopping;
    if (room)
        a->dials++;
    pthread_mutex_unlock(&a->mu);
    if (!room) {
        ar_log(AR_LOG_WARN, "relay: %d circuits being dialled already: circuit %" PRIu64 " ignored", MAX_DIALS,
               j->circuit);
        free(j);
        return;
    }
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &at, dial_main, j) != 0) {
        pthread_mutex_lock(&a->mu);
        a->dials--;
        pthread_mutex_unlock(&a->mu);
        free(j);
    }
    pthread_attr_destroy(&at);
}

/* One control session on a connected socket: until it fails, the relay goes
 * quiet or we stop. 1 when the relay took us (it answered OK). */
static int control_session(ar_relay_attach *a, int fd, int *refused)
{
    char line[600];
    int n = snprintf(line, sizeof line, "ARCEUS-RELAY 1 CONTROL %" PRId64 " %s %s\n", a->provider, a->address,
                     a->credential);
    if (n <= 0 || (size_t)n >= sizeof line || send_all(fd, line, (size_t)n) != 0)
        return 0;
    char in[1024];
    size_t have = 0;
    int ok = 0;
    double heard = ar_now(), pinged = heard, ping_s = AR_RELAY_PING_S;
    for (;;) {
        pthread_mutex_lock(&a->mu);
        int stop = a->stopping;
        pthread_mutex_unlock(&a->mu);
        if (stop)
            break;
        double now = ar_now();
        if (now - heard > (ok ? 3 * ping_s : CONNECT_S)) {
            ar_log(AR_LOG_WARN, "relay %s: %s for %.0f s", a->relay, ok ? "silent" : "no answer to CONTROL",
                   now - heard);
            break;
        }
        if (ok && now - pinged >= ping_s) {
            pinged = now;
            if (send_all(fd, "PING\n", 5) != 0)
                break;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 250) <= 0)
            continue;
        ssize_t k = recv(fd, in + have, sizeof in - 1 - have, 0);
        if (k <= 0)
            break;
        have += (size_t)k;
        char *nl;
        int bad = 0;
        while (!bad && (nl = memchr(in, '\n', have)) != NULL) {
            *nl = '\0';
            heard = ar_now();
            if (!ok && !strncmp(in, "OK ", 3)) {
                int s = atoi(in + 3);
                ping_s = s >= 1 && s <= 3600 ? s : AR_RELAY_PING_S;
                ok = 1;
                pthread_mutex_lock(&a->mu);
                a->attached = 1;
                pthread_mutex_unlock(&a->mu);
                ar_log(AR_LOG_INFO, "relay %s: attached as provider %" PRId64 " (worker %s)", a->relay, a->provider,
                       a->address);
            } else if (!strncmp(in, "NO ", 3) || !strcmp(in, "NO")) {
                ar_log(AR_LOG_WARN, "relay %s refused provider %" PRId64 ": %.200s", a->relay, a->provider, in + 2);
                *refused = 1;
                bad = 1;
            } else if (ok && !strcmp(in, "PING")) {
                /* the relay is alive: noted above */
            } else if (ok && !strncmp(in, "DIAL ", 5)) {
                start_dial(a, in + 5, 0);
            } else if (ok && !strncmp(in, "DIALTO ", 7)) {
                start_dial(a, in + 7, 1);
            } else {
                ar_log(AR_LOG_WARN, "relay %s sent what a relay does not send: reconnecting", a->relay);
                bad = 1;
            }
            size_t used = (size_t)(nl - in) + 1;
            memmove(in, in + used, have - used);
            have -= used;
        }
        if (bad || have >= sizeof in - 1)
            break;
    }
    pthread_mutex_lock(&a->mu);
    a->attached = 0;
    pthread_mutex_unlock(&a->mu);
    return ok;
}

static void *attach_main(void *arg)
{
    ar_relay_attach *a = arg;
    double backoff = RECONNECT_MIN_S;
    int down_logged = 0;
    for (;;) {
        pthread_mutex_lock(&a->mu);
        int stop = a->stopping;
        pthread_mutex_unlock(&a->mu);
        if (stop)
            break;
        int fd = ar_net_dial(a->relay, CONNECT_S), refused = 0, was_ok = 0;
        if (fd < 0) {
            if (!down_logged)
                ar_log(AR_LOG_WARN, "relay %s unreachable (%s): retrying with backoff up to %.0f s", a->relay,
                       ar_last_error(), RECONNECT_MAX_S);
            down_logged = 1;
        } else {
            was_ok = control_session(a, fd, &refused);
            close(fd);
            pthread_mutex_lock(&a->mu);
            a->refused = refused;
            pthread_mutex_unlock(&a->mu);
            pthread_mutex_lock(&a->mu);
            stop = a->stopping;
            pthread_mutex_unlock(&a->mu);
            if (stop)
                break;
            if (was_ok) {
                ar_log(AR_LOG_WARN, "relay %s: control connection lost: reconnecting", a->relay);
                down_logged = 0;
                backoff = RECONNECT_MIN_S;
            }
        }
        /* a refusal is the relay's considered answer (a credential of
         * another market's key): no reason to ask again soon */
        double wait = refused ? RECONNECT_MAX_S : backoff;
        if (!was_ok)
            backoff = backoff * 2 < RECONNECT_MAX_S ? backoff * 2 : RECONNECT_MAX_S;
        if (pause_unless_stopped(a, wait))
            break;
    }
    return NULL;
}

int ar_relay_attach_start(const char *relay, int64_t provider_id, const char *address, const char *credential,
                          ar_relay_adopt_fn adopt, void *ctx, ar_relay_attach **out)
{
    if (!relay || strlen(relay) >= 256 || !address || strlen(address) >= 256 || provider_id <= 0 || !credential ||
        strlen(credential) != AR_RELAY_CREDENTIAL_HEX || !adopt)
        return ar_fail(AR_EINVAL, "a relay attachment needs the relay, the provider id, its address and its "
                                  "credential");
    ar_relay_attach *a = calloc(1, sizeof *a);
    if (!a)
        return ar_fail(AR_ENOMEM, "out of memory");
    snprintf(a->relay, sizeof a->relay, "%s", relay);
    snprintf(a->address, sizeof a->address, "%s", address);
    snprintf(a->credential, sizeof a->credential, "%s", credential);
    a->provider = provider_id;
    a->adopt = adopt;
    a->adopt_ctx = ctx;
    pthread_mutex_init(&a->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&a->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&a->thread, NULL, attach_main, a) != 0) {
        ar_relay_attach_stop(a);
        return ar_fail(AR_EINTERNAL, "cannot start the relay's control thread");
    }
    a->started = 1;
    *out = a;
    return AR_OK;
}

int ar_relay_attached(ar_relay_attach *a)
{
    if (!a)
        return 0;
    pthread_mutex_lock(&a->mu);
    int v = a->attached;
    pthread_mutex_unlock(&a->mu);
    return v;
}

int ar_relay_attach_refused(ar_relay_attach *a)
{
    if (!a)
        return 0;
    pthread_mutex_lock(&a->mu);
    int v = a->refused;
    pthread_mutex_unlock(&a->mu);
    return v;
}

void ar_relay_attach_stop(ar_relay_attach *a)
{
    if (!a)
        return;
    pthread_mutex_lock(&a->mu);
    a->stopping = 1;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    if (a->started)
        pthread_join(a->thread, NULL);
    /* dials in flight end within their connect timeout */
    pthread_mutex_lock(&a->mu);
    while (a->dials > 0)
        pthread_cond_wait(&a->cv, &a->mu);
    pthread_mutex_unlock(&a->mu);
    pthread_mutex_destroy(&a->mu);
    pthread_cond_destroy(&a->cv);
    free(a);
}
