/* A stage that can be dialled reaching a next stage that cannot (net/relay.h,
 * "reverse"): rather than through the relay, the next stage dials back.
 *
 * gRPC is the client here and knows only how to open an HTTP CONNECT tunnel
 * through a proxy, so the tunnel is opened to a proxy of this process's own
 * on loopback (one per relay). For each tunnel it draws a nonce, asks the
 * relay (with the same pass a circuit needs) to have the next stage's
 * provider dial this machine's meeting point, and splices the tunnel to the
 * connection that comes in with that nonce. When none comes within
 * WAIT_DIRECT_S (a firewall in between), it passes the tunnel's request on to
 * the relay itself, and the stage is reached through the relay as any other.
 * Either way gRPC's HTTP/2 and TLS run end to end inside the tunnel.
 *
 * The proxies and the meeting point live as long as the process (a
 * provider's worker), on threads of their own. */
#include "net/relay.h"

#include "core/core.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* How long a tunnel waits for the next stage to dial back before it goes
 * through the relay: a dial within one network takes milliseconds. */
#define WAIT_DIRECT_S 3.0
#define REQUEST_S 5.0
#define REQUEST_MAX 4096
/* Tunnels, and arrivals at the meeting point, handled at once: apart, so
 * that strangers holding the meeting point's slots cannot stop tunnels from
 * falling back on the relay. */
#define MAX_HANDLERS 64

typedef struct pending {
    char nonce[33];
    int fd; /* the next stage's connection once it came; -1 until then */
    struct pending *next;
} pending;

typedef struct proxy {
    char relay[256];
    int port; /* 127.0.0.1:port */
    struct proxy *next;
} proxy;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int meet_port; /* 0: not listening yet */
    proxy *proxies;
    pending *pending;
    int handlers[2]; /* tunnels, arrivals */
} g = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, NULL, NULL, {0, 0}};

enum { TUNNELS = 0, ARRIVALS = 1 };

static int listen_any(const char *ip, int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    inet_pton(AF_INET, ip, &a.sin_addr);
    socklen_t sl = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &sl) != 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

/* Read until `end` is seen (included), at most size - 1 bytes, within
 * timeout_s; byte by byte when one_by_one (what follows belongs to someone
 * else). The length read, or -1. */
static ssize_t read_until(int fd, char *buf, size_t size, const char *end, double timeout_s, int one_by_one)
{
    size_t n = 0, el = strlen(end);
    double deadline = ar_now() + timeout_s;
    while (n + 1 < size) {
        double left = deadline - ar_now();
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (left <= 0 || poll(&p, 1, (int)(left * 1000) + 1) != 1)
            return -1;
        ssize_t k = recv(fd, buf + n, one_by_one ? 1 : size - 1 - n, 0);
        if (k <= 0)
            return -1;
        n += (size_t)k;
        buf[n] = '\0';
        if (n >= el && memmem(buf, n, end, el))
            return (ssize_t)n;
    }
    return -1;
}

static int handler_slot(int kind)
{
    pthread_mutex_lock(&g.mu);
    int ok = g.handlers[kind] < MAX_HANDLERS;
    if (ok)
        g.handlers[kind]++;
    pthread_mutex_unlock(&g.mu);
    return ok;
}

static void handler_done(int kind)
{
    pthread_mutex_lock(&g.mu);
    g.handlers[kind]--;
    pthread_mutex_unlock(&g.mu);
}

static int spawn(void *(*fn)(void *), void *arg)
{
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    int ok = pthread_create(&t, &at, fn, arg) == 0;
    pthread_attr_destroy(&at);
    return ok;
}

/* ---- the meeting point: next stages dialling back ----------------------------------- */

static void *arrival_main(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char line[128];
    /* byte by byte: the worker's first bytes follow the line */
    ssize_t n = read_until(fd, line, sizeof line, "\n", REQUEST_S, 1);
    char nonce[40] = "";
    int used = 0, taken = 0;
    if (n > 0 && sscanf(line, "ARCEUS-RELAY 1 DATA 0 %32s%n", nonce, &used) == 1 && line[used] == '\n' &&
        strlen(nonce) == 32) {
        pthread_mutex_lock(&g.mu);
        for (pending *p = g.pending; p && !taken; p = p->next)
            if (p->fd < 0 && CRYPTO_memcmp(p->nonce, nonce, 32) == 0) {
                p->fd = fd;
                taken = 1;
                pthread_cond_broadcast(&g.cv);
            }
        pthread_mutex_unlock(&g.mu);
    }
    if (!taken) {
        ar_log(AR_LOG_DEBUG, "relay: a connection to the meeting point for no waiting tunnel: closed");
        close(fd);
    }
    handler_done(ARRIVALS);
    return NULL;
}

static void *meet_main(void *arg)
{
    int ls = (int)(intptr_t)arg;
    for (;;) {
        int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) {
                struct timespec ts = {0, 50 * 1000000L};
                nanosleep(&ts, NULL);
                continue;
            }
            return NULL;
        }
        if (!handler_slot(ARRIVALS)) {
            close(fd);
            continue;
        }
        if (!spawn(arrival_main, (void *)(intptr_t)fd)) {
            close(fd);
            handler_done(ARRIVALS);
        }
    }
}

/* ---- the proxies: this process's channels' tunnels ---------------------------------- */

typedef struct {
    const proxy *p;
    int fd; /* gRPC's end */
} tunnel_job;

static void *tunnel_main(void *arg)
{
    tunnel_job *j = arg;
    int gfd = j->fd, other = -1, direct = 0;
    char req[REQUEST_MAX + 1];
    ssize_t n = read_until(gfd, req, sizeof req, "\r\n\r\n", REQUEST_S, 0);
    ar_relay_connect c;
    if (n <= 0 || ar_relay_parse_connect(req, (size_t)n, &c) != AR_OK || !c.pass[0])
        goto out;
    pending me = {.fd = -1};
    unsigned char raw[16];
    if (RAND_bytes(raw, sizeof raw) != 1)
        goto out;
    for (int i = 0; i < 16; i++)
        snprintf(me.nonce + 2 * i, 3, "%02x", raw[i]);
    pthread_mutex_lock(&g.mu);
    me.next = g.pending;
    g.pending = &me;
    int meet_port = g.meet_port;
    pthread_mutex_unlock(&g.mu);
    /* ask the relay to have the next stage dial us */
    int rfd = ar_net_dial(j->p->relay, REQUEST_S);
    int asked = 0;
    if (rfd >= 0) {
        char line[300], answer[128];
        int k = snprintf(line, sizeof line, "ARCEUS-RELAY 1 REVERSE %s %d %s\n", c.pass, meet_port, me.nonce);
        asked = k > 0 && (size_t)k < sizeof line && send(rfd, line, (size_t)k, MSG_NOSIGNAL) == k &&
                read_until(rfd, answer, sizeof answer, "\n", REQUEST_S, 0) > 0 && !strncmp(answer, "OK\n", 3);
        OPENSSL_cleanse(line, sizeof line);
        close(rfd);
    }
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)WAIT_DIRECT_S;
    pthread_mutex_lock(&g.mu);
    while (asked && me.fd < 0 && pthread_cond_timedwait(&g.cv, &g.mu, &until) != ETIMEDOUT) {
    }
    for (pending **pp = &g.pending; *pp; pp = &(*pp)->next)
        if (*pp == &me) {
            *pp = me.next;
            break;
        }
    other = me.fd;
    pthread_mutex_unlock(&g.mu);
    if (other >= 0) {
        static const char ok[] = "HTTP/1.1 200 Connection established\r\n\r\n";
        direct = send(gfd, ok, sizeof ok - 1, MSG_NOSIGNAL) == (ssize_t)(sizeof ok - 1);
        ar_log(AR_LOG_INFO, "relay: %s dialled back directly", c.target);
    } else {
        /* no dial came: through the relay, with the request as gRPC made it
         * (its answer goes back to gRPC as the relay gives it) */
        ar_log(AR_LOG_INFO, "relay: %s did not dial back%s: reaching it through the relay", c.target,
               asked ? "" : " (the relay did not ask it)");
        other = ar_net_dial(j->p->relay, REQUEST_S);
        direct = other >= 0 && send(other, req, (size_t)n, MSG_NOSIGNAL) == n;
    }
    if (direct)
        ar_net_splice(gfd, other, NULL);
    if (other >= 0)
        close(other);
out:
    OPENSSL_cleanse(req, sizeof req);
    close(gfd);
    free(j);
    handler_done(TUNNELS);
    return NULL;
}

typedef struct {
    proxy *p;
    int ls;
} proxy_job;

static void *accept_main(void *arg)
{
    proxy_job *pj = arg;
    for (;;) {
        int fd = accept4(pj->ls, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) {
                struct timespec ts = {0, 50 * 1000000L};
                nanosleep(&ts, NULL);
                continue;
            }
            return NULL;
        }
        tunnel_job *j = calloc(1, sizeof *j);
        if (!j || !handler_slot(TUNNELS)) {
            free(j);
            close(fd);
            continue;
        }
        *j = (tunnel_job){.p = pj->p, .fd = fd};
        if (!spawn(tunnel_main, j)) {
            free(j);
            close(fd);
            handler_done(TUNNELS);
        }
    }
}

/* The loopback proxy for `relay` (started, with the meeting point, at the
 * first need); its port, or -1. g.mu held. */
static int proxy_for(const char *relay)
{
    if (!g.meet_port) {
        int port = 0, ls = listen_any("0.0.0.0", &port);
        if (ls < 0 || !spawn(meet_main, (void *)(intptr_t)ls)) {
            if (ls >= 0)
                close(ls);
            ar_fail(AR_EIO, "cannot listen for next stages dialling back: %s", strerror(errno));
            return -1;
        }
        g.meet_port = port;
    }
    for (proxy *p = g.proxies; p; p = p->next)
        if (!strcmp(p->relay, relay))
            return p->port;
    proxy *p = calloc(1, sizeof *p);
    proxy_job *pj = calloc(1, sizeof *pj);
    int port = 0, ls = p && pj ? listen_any("127.0.0.1", &port) : -1;
    if (ls < 0) {
        free(p);
        free(pj);
        ar_fail(AR_EIO, "cannot listen on loopback for tunnels to relay %s", relay);
        return -1;
    }
    snprintf(p->relay, sizeof p->relay, "%s", relay);
    p->port = port;
    *pj = (proxy_job){.p = p, .ls = ls};
    if (!spawn(accept_main, pj)) {
        close(ls);
        free(p);
        free(pj);
        ar_fail(AR_EINTERNAL, "cannot start a thread for tunnels to relay %s", relay);
        return -1;
    }
    p->next = g.proxies;
    g.proxies = p;
    return port;
}

int ar_client_open_reversed(const char *addr, const char *relay, const char *pass, ar_client **out)
{
    if (!relay || strlen(relay) >= 256 || !ar_relay_pass_wellformed(pass))
        return ar_fail(AR_EINVAL, "a reversed channel needs a relay address and a pass");
    pthread_mutex_lock(&g.mu);
    int port = proxy_for(relay);
    pthread_mutex_unlock(&g.mu);
    if (port < 0)
        return AR_EIO;
    char local[64];
    snprintf(local, sizeof local, "127.0.0.1:%d", port);
    return ar_client_open_relayed(addr, local, pass, out);
}
