/* The relay (net/relay.h): passes and credentials, the CONNECT parser, the
 * splice, the relay server's event loop and its circuits.
 *
 * One thread runs the event loop (epoll): it accepts, reads every request
 * and control line (each bounded in size and in time), checks passes and
 * limits and pairs a client's tunnel with the data connection its provider
 * dialled back. Each paired circuit then gets a thread of its own that only
 * splices (splice(2) through a pipe each way: the bytes stay in the kernel),
 * so a busy circuit never holds up the loop or another circuit. */
#include "net/relay.h"

#include "core/core.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* A request (CONNECT and its headers, or one line) must arrive whole within
 * this, in at most REQUEST_MAX bytes: an honest client sends it at once. */
#define REQUEST_S 5.0
#define REQUEST_MAX 4096
#define LINE_MAX_BYTES 512
/* A provider asked to dial back must do so within this. */
#define DIAL_BACK_S 10.0
/* Connections the loop holds before they are circuits or controls: beyond
 * this the oldest request still arriving is dropped (as the servers' pools
 * push out their oldest waiting call). */
#define MAX_PENDING 4096
/* Failed circuit requests per client host: as the worker's limiter (net.h) */
#define FAIL_HOSTS 1024
/* Pipe buffers of a circuit: one large write goes through in few calls. */
#define SPLICE_PIPE_BYTES (1 << 20)

static const char PASS_CONTEXT[] = "arceus relay pass v1\n";
static const char CREDENTIAL_CONTEXT[] = "arceus relay provider v1\n";
static const char LINE_PREFIX[] = "ARCEUS-RELAY 1 ";

/* ---- keys, passes, credentials ------------------------------------------------ */

int ar_relay_key_load(const char *path, unsigned char key[AR_RELAY_KEY_BYTES])
{
    struct stat st;
    if (stat(path, &st) != 0)
        return ar_fail(AR_EIO, "relay secret %s: %s", path, strerror(errno));
    if (st.st_mode & (S_IRWXG | S_IRWXO))
        return ar_fail(AR_EINVAL, "relay secret %s may be read by others than its owner (mode %03o): "
                       "chmod 600 it", path, (unsigned)(st.st_mode & 0777));
    char *text;
    size_t len;
    if (ar_read_file(path, &text, &len) != AR_OK)
        return ar_fail(AR_EIO, "relay secret: %s", ar_last_error());
    int rc = AR_OK;
    if (len < AR_RELAY_KEY_BYTES)
        rc = ar_fail(AR_EINVAL, "relay secret %s holds %zu bytes: at least %d, please (head -c 32 "
                     "/dev/urandom > %s)", path, len, AR_RELAY_KEY_BYTES, path);
    else
        SHA256((const unsigned char *)text, len, key);
    OPENSSL_cleanse(text, len);
    ar_free(text);
    return rc;
}

int ar_relay_key_random(unsigned char key[AR_RELAY_KEY_BYTES])
{
    if (RAND_bytes(key, AR_RELAY_KEY_BYTES) != 1)
        return ar_fail(AR_EINTERNAL, "no random bytes for the relay key (OpenSSL RAND_bytes failed)");
    return AR_OK;
}

static void hmac_hex(const unsigned char key[AR_RELAY_KEY_BYTES], const char *context, const char *msg,
                     char out[65])
{
    /* context || msg in one buffer: both are short and bounded */
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    char buf[512];
    int n = snprintf(buf, sizeof buf, "%s%s", context, msg);
    if (n < 0 || (size_t)n >= sizeof buf ||
        !HMAC(EVP_sha256(), key, AR_RELAY_KEY_BYTES, (const unsigned char *)buf, (size_t)n, md, &len) ||
        len != 32) {
        out[0] = '\0'; /* matches nothing: a MAC is 64 digits */
        return;
    }
    for (unsigned i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

void ar_relay_pass(const unsigned char key[AR_RELAY_KEY_BYTES], int64_t provider, int64_t lease, int64_t expiry,
                   char out[AR_RELAY_PASS_MAX])
{
    char user[72], mac[65];
    snprintf(user, sizeof user, "%" PRId64 ".%" PRId64 ".%" PRId64, provider, lease, expiry);
    hmac_hex(key, PASS_CONTEXT, user, mac);
    snprintf(out, AR_RELAY_PASS_MAX, "%s:%s", user, mac);
}

void ar_relay_credential(const unsigned char key[AR_RELAY_KEY_BYTES], int64_t provider, const char *address,
                         char out[AR_RELAY_CREDENTIAL_HEX + 1])
{
    char msg[300];
    snprintf(msg, sizeof msg, "%" PRId64 "\n%.255s", provider, address);
    hmac_hex(key, CREDENTIAL_CONTEXT, msg, out);
}

int ar_relay_pass_wellformed(const char *pass)
{
    size_t n = pass ? strnlen(pass, AR_RELAY_PASS_MAX) : 0;
    if (n == 0 || n >= AR_RELAY_PASS_MAX)
        return 0;
    int colons = 0;
    for (size_t i = 0; i < n; i++) {
        char c = pass[i];
        if (c == ':')
            colons++;
        else if (!isdigit((unsigned char)c) && c != '.' && !(c >= 'a' && c <= 'f'))
            return 0;
    }
    return colons == 1;
}

/* A decimal number of 1..19 digits (no sign) at *p, up to `end`; advances. */
static int parse_num(const char **p, char end, int64_t *out)
{
    const char *s = *p;
    int64_t v = 0;
    int digits = 0;
    while (isdigit((unsigned char)*s)) {
        if (++digits > 18)
            return 0;
        v = v * 10 + (*s - '0');
        s++;
    }
    if (digits == 0 || *s != end)
        return 0;
    *out = v;
    *p = s + 1;
    return 1;
}

int ar_relay_pass_check(const unsigned char key[AR_RELAY_KEY_BYTES], const char *pass, int64_t now,
                        int64_t *provider, int64_t *lease)
{
    if (!ar_relay_pass_wellformed(pass))
        return ar_fail(AR_EINVAL, "not a relay pass");
    const char *p = pass;
    int64_t pid, lid, expiry;
    if (!parse_num(&p, '.', &pid) || !parse_num(&p, '.', &lid) || !parse_num(&p, ':', &expiry) ||
        strlen(p) != 64 || pid <= 0)
        return ar_fail(AR_EINVAL, "a malformed relay pass");
    char user[72], mac[65];
    size_t ulen = (size_t)(p - 1 - pass);
    memcpy(user, pass, ulen);
    user[ulen] = '\0';
    hmac_hex(key, PASS_CONTEXT, user, mac);
    if (strlen(mac) != 64 || CRYPTO_memcmp(mac, p, 64) != 0)
        return ar_fail(AR_EINVAL, "a relay pass this relay did not issue (wrong MAC)");
    if (expiry <= now)
        return ar_fail(AR_EINVAL, "an expired relay pass (provider %" PRId64 ", lease %" PRId64 ")", pid, lid);
    *provider = pid;
    *lease = lid;
    return AR_OK;
}

/* ---- parsing ------------------------------------------------------------------- */

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    return c == '+' ? 62 : c == '/' ? 63 : -1;
}

/* Standard base64 (padding optional) of at most out_size - 1 bytes. */
static int b64_decode(const char *in, size_t n, char *out, size_t out_size)
{
    while (n > 0 && in[n - 1] == '=')
        n--;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64_value((unsigned char)in[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (o + 1 >= out_size)
                return -1;
            out[o++] = (char)((acc >> bits) & 0xff);
        }
    }
    out[o] = '\0';
    return (int)o;
}

static int target_char(unsigned char c)
{
    return isalnum(c) || c == '.' || c == '-' || c == '_' || c == ':' || c == '[' || c == ']';
}

int ar_relay_parse_connect(const char *buf, size_t len, ar_relay_connect *out)
{
    memset(out, 0, sizeof *out);
    if (len < 8 || memcmp(buf, "CONNECT ", 8) != 0)
        return ar_fail(AR_EINVAL, "not a CONNECT request");
    /* the request line: CONNECT target HTTP/1.x */
    size_t i = 8, t = 0;
    while (i < len && buf[i] != ' ') {
        if (!target_char((unsigned char)buf[i]) || t + 1 >= sizeof out->target)
            return ar_fail(AR_EINVAL, "a CONNECT target that is not HOST:PORT");
        out->target[t++] = buf[i++];
    }
    if (t == 0 || len - i < 11 || memcmp(buf + i, " HTTP/1.", 8) != 0 || (buf[i + 8] != '0' && buf[i + 8] != '1') ||
        buf[i + 9] != '\r' || buf[i + 10] != '\n')
        return ar_fail(AR_EINVAL, "a malformed CONNECT request line");
    i += 11;
    /* headers until the empty line; only Proxy-Authorization matters */
    for (;;) {
        if (len - i < 2)
            return ar_fail(AR_EINVAL, "a CONNECT request without its empty line");
        if (buf[i] == '\r' && buf[i + 1] == '\n')
            return i + 2 == len ? AR_OK : ar_fail(AR_EINVAL, "bytes after a CONNECT request's empty line");
        size_t e = i;
        while (e + 1 < len && !(buf[e] == '\r' && buf[e + 1] == '\n')) {
            unsigned char c = (unsigned char)buf[e];
            if (c < 0x20 && c != '\t')
                return ar_fail(AR_EINVAL, "a control character in a CONNECT header");
            e++;
        }
        if (e + 1 >= len)
            return ar_fail(AR_EINVAL, "an unterminated CONNECT header");
        static const char name[] = "proxy-authorization:";
        size_t nl = sizeof name - 1;
        if (e - i > nl && strncasecmp(buf + i, name, nl) == 0) {
            size_t v = i + nl;
            while (v < e && (buf[v] == ' ' || buf[v] == '\t'))
                v++;
            if (e - v < 6 || strncasecmp(buf + v, "basic ", 6) != 0)
                return ar_fail(AR_EINVAL, "a Proxy-Authorization that is not Basic");
            v += 6;
            while (v < e && buf[v] == ' ')
                v++;
            size_t end = e;
            while (end > v && (buf[end - 1] == ' ' || buf[end - 1] == '\t'))
                end--;
            if (out->pass[0] || b64_decode(buf + v, end - v, out->pass, sizeof out->pass) <= 0 ||
                !ar_relay_pass_wellformed(out->pass)) {
                out->pass[0] = '\0';
                return ar_fail(AR_EINVAL, "a Proxy-Authorization that is not one relay pass");
            }
        }
        i = e + 2;
    }
}

/* ---- splicing -------------------------------------------------------------------- */

static void set_blocking(int fd, int blocking)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, blocking ? fl & ~O_NONBLOCK : fl | O_NONBLOCK);
}

double ar_net_splice(int a, int b, const volatile int *stop)
{
    /* a peer that vanished makes a write fail with EPIPE; the signal that
     * comes with it is kept pending on this thread instead of killing the
     * process */
    sigset_t pipe_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, NULL);
    int fds[2] = {a, b};
    int pipes[2][2] = {{-1, -1}, {-1, -1}};
    double moved = 0;
    for (int d = 0; d < 2; d++) {
        if (pipe2(pipes[d], O_NONBLOCK | O_CLOEXEC) != 0)
            goto out;
        fcntl(pipes[d][1], F_SETPIPE_SZ, SPLICE_PIPE_BYTES); /* a smaller pipe works too */
    }
    set_blocking(a, 0);
    set_blocking(b, 0);
    /* what arrives goes on at once: Nagle's delay on a spliced stream of
     * small HTTP/2 frames would add up to tens of ms a message (not TCP:
     * ignored) */
    int on = 1;
    setsockopt(a, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    size_t held[2] = {0, 0}; /* bytes in each direction's pipe */
    int reading[2] = {1, 1}; /* direction d: from fds[d] to fds[1 - d] */
    int shut[2] = {0, 0};
    int cap = fcntl(pipes[0][1], F_GETPIPE_SZ);
    size_t pipe_cap = cap > 0 ? (size_t)cap : 65536;
    for (;;) {
        if (shut[0] && shut[1])
            break;
        if (stop && *stop)
            break;
        struct pollfd p[2];
        for (int i = 0; i < 2; i++) {
            p[i].fd = fds[i];
            p[i].events = 0;
            p[i].revents = 0;
            if (reading[i] && held[i] < pipe_cap)
                p[i].events |= POLLIN;
            if (held[1 - i] > 0)
                p[i].events |= POLLOUT;
        }
        int n = poll(p, 2, 1000);
        if (n < 0 && errno != EINTR)
            break;
        int failed = 0;
        for (int d = 0; d < 2 && !failed; d++) {
            int src = fds[d], dst = fds[1 - d];
            if (reading[d] && held[d] < pipe_cap) {
                ssize_t k = splice(src, NULL, pipes[d][1], NULL, pipe_cap - held[d], SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
                if (k > 0)
                    held[d] += (size_t)k;
                else if (k == 0)
                    reading[d] = 0; /* end of src's stream */
                else if (errno != EAGAIN && errno != EINTR)
                    failed = 1;
            }
            while (!failed && held[d] > 0) {
                ssize_t k = splice(pipes[d][0], NULL, dst, NULL, held[d], SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
                if (k > 0) {
                    held[d] -= (size_t)k;
                    moved += (double)k;
                } else {
                    if (k < 0 && errno != EAGAIN && errno != EINTR)
                        failed = 1;
                    break;
                }
            }
            if (!failed && !reading[d] && held[d] == 0 && !shut[d]) {
                shutdown(dst, SHUT_WR); /* pass the end of the stream on */
                shut[d] = 1;
            }
        }
        if (failed)
            break;
    }
out:
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < 2; k++)
            if (pipes[d][k] >= 0)
                close(pipes[d][k]);
    return moved;
}

/* ---- the relay server --------------------------------------------------------------- */

enum { C_NEW, C_CONTROL, C_WAIT };

typedef struct rconn {
    int fd;
    int kind;
    char host[64]; /* the peer's host: what limits count (an IPv6 address's /64) */
    char ip[64];   /* the peer's own address, to be dialled back ("[v6]" in brackets) */
    char in[REQUEST_MAX + 1];
    size_t in_len;
    double since, deadline;
    /* a control connection */
    int64_t provider;
    char address[256];
    double heard, pinged;
    /* a client's tunnel waiting for its provider to dial back */
    uint64_t circuit;
    char nonce[33];
    int64_t want;
    struct rconn *prev, *next;
} rconn;

typedef struct circuit {
    ar_relay *relay;
    int client, provider;
    int64_t provider_id;
    char host[64];
    char to_client[REQUEST_MAX], to_provider[REQUEST_MAX]; /* leftovers read with the requests */
    size_t n_to_client, n_to_provider;
    struct circuit *prev, *next;
} circuit;

typedef struct {
    char host[64]; /* "" : free */
    double window_at, last, blocked_until;
    int failures;
} fail_host;

struct ar_relay {
    ar_relay_config cfg;
    int listen_fd, epfd, wake_fd;
    pthread_t loop;
    int loop_started;
    volatile int stopping;
    rconn *conns; /* owned by the loop thread */
    rconn *dead;  /* closed during this round of events: freed after it */
    int npending;
    uint64_t next_circuit;
    pthread_mutex_t mu; /* guards what follows */
    pthread_cond_t cv;
    circuit *circuits;
    int ncircuits;
    ar_relay_stats stats;
    fail_host fails[FAIL_HOSTS];
    double stats_logged_at, refusal_logged_at;
    long stats_logged_refused, stats_logged_circuits, stats_logged_providers;
};

static int listen_sock = 0, wake_sock = 1; /* epoll tags (addresses, not data) */

static void peer_host(int fd, char host[64], char ip[64])
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    snprintf(host, 64, "?");
    snprintf(ip, 64, "?");
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) != 0)
        return;
    if (ss.ss_family == AF_INET) {
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, 64);
        snprintf(ip, 64, "%s", host);
    } else if (ss.ss_family == AF_INET6) {
        /* one machine usually holds a whole /64: count it as one host */
        struct in6_addr a = ((struct sockaddr_in6 *)&ss)->sin6_addr;
        char full[INET6_ADDRSTRLEN];
        if (inet_ntop(AF_INET6, &a, full, sizeof full))
            snprintf(ip, 64, "[%s]", full);
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (!memcmp(a.s6_addr, mapped, 12)) {
            inet_ntop(AF_INET, a.s6_addr + 12, host, 64);
            snprintf(ip, 64, "%s", host);
            return;
        }
        memset(a.s6_addr + 8, 0, 8);
        char t[INET6_ADDRSTRLEN];
        if (inet_ntop(AF_INET6, &a, t, sizeof t))
            snprintf(host, 64, "%s/64", t);
    }
}

static void keepalive(int fd)
{
    /* a peer that vanished without a word (its machine lost power, a NAT
     * forgot the mapping) is found within about a minute and a half */
    int on = 1, idle = 30, intvl = 10, cnt = 6;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
}

/* Send a short message without waiting: a peer whose socket buffer cannot
 * take a few hundred bytes is not reading. 0, or -1. */
static int send_now(int fd, const char *msg, size_t n)
{
    ssize_t k = send(fd, msg, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    return k == (ssize_t)n ? 0 : -1;
}

static void conn_close(ar_relay *r, rconn *c)
{
    if (c->kind == C_CONTROL) {
        ar_log(AR_LOG_INFO, "relay: provider %" PRId64 " (%s) detached", c->provider, c->host);
        pthread_mutex_lock(&r->mu);
        r->stats.providers--;
        pthread_mutex_unlock(&r->mu);
    } else {
        r->npending--;
    }
    epoll_ctl(r->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    if (c->prev)
        c->prev->next = c->next;
    else
        r->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    /* an event for it may still be in this round's batch */
    c->prev = NULL;
    c->next = r->dead;
    r->dead = c;
}

static void free_dead(ar_relay *r)
{
    while (r->dead) {
        rconn *c = r->dead;
        r->dead = c->next;
        free(c);
    }
}

/* The failure table's entry of host (made when `make`); mu held. */
static fail_host *fail_entry(ar_relay *r, const char *host, int make, double now)
{
    fail_host *oldest = NULL;
    for (int i = 0; i < FAIL_HOSTS; i++) {
        fail_host *e = &r->fails[i];
        if (e->host[0] && !strcmp(e->host, host))
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

static int host_blocked(ar_relay *r, const char *host, double now)
{
    pthread_mutex_lock(&r->mu);
    fail_host *e = fail_entry(r, host, 0, now);
    int blocked = e && e->blocked_until > now;
    pthread_mutex_unlock(&r->mu);
    return blocked;
}

/* A refused circuit request: counted (stat points into r->stats), answered
 * with `status` (NULL: closed without a word), and when `auth` (no valid
 * pass) counted against the host like a failed authentication at a worker
 * (AR_AUTH_MAX_FAILURES in AR_AUTH_WINDOW_S block it for AR_AUTH_BLOCK_S).
 * Logged once per burst per host. Closes c. */
static void refuse(ar_relay *r, rconn *c, long *stat, const char *status, int auth, const char *why)
{
    double now = ar_now();
    int log = 0, blocked = 0;
    pthread_mutex_lock(&r->mu);
    r->stats.refused++;
    (*stat)++;
    if (auth) {
        fail_host *e = fail_entry(r, c->host, 1, now);
        if (now - e->window_at > AR_AUTH_WINDOW_S) { /* a new burst */
            e->window_at = now;
            e->failures = 0;
        }
        log = e->failures == 0;
        e->last = now;
        if (++e->failures == AR_AUTH_MAX_FAILURES) {
            e->blocked_until = now + AR_AUTH_BLOCK_S;
            blocked = 1;
        }
    } else if (now - r->refusal_logged_at >= 1.0) {
        /* limits and absent providers: at most a line a second */
        r->refusal_logged_at = now;
        log = 1;
    }
    pthread_mutex_unlock(&r->mu);
    if (blocked)
        ar_log(AR_LOG_WARN, "relay: %d refused circuit requests from %s within %.0f s (the last: %s): its "
               "requests are refused for %.0f s", AR_AUTH_MAX_FAILURES, c->host, AR_AUTH_WINDOW_S, why,
               AR_AUTH_BLOCK_S);
    else if (log)
        ar_log(AR_LOG_WARN, "relay: request from %s refused: %s", c->host, why);
    if (status) {
        char msg[300];
        int n = snprintf(msg, sizeof msg, "HTTP/1.1 %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", status);
        send_now(c->fd, msg, (size_t)n);
    }
    conn_close(r, c);
}

static rconn *find_control(ar_relay *r, int64_t provider)
{
    for (rconn *c = r->conns; c; c = c->next)
        if (c->kind == C_CONTROL && c->provider == provider)
            return c;
    return NULL;
}

/* Circuits open or waiting to be, to provider (or from host); mu not held. */
static void count_circuits(ar_relay *r, int64_t provider, const char *host, int *to_provider, int *from_host,
                           int *all)
{
    *to_provider = *from_host = *all = 0;
    for (rconn *c = r->conns; c; c = c->next)
        if (c->kind == C_WAIT) {
            (*all)++;
            *to_provider += c->want == provider;
            *from_host += !strcmp(c->host, host);
        }
    pthread_mutex_lock(&r->mu);
    for (circuit *k = r->circuits; k; k = k->next) {
        (*all)++;
        *to_provider += k->provider_id == provider;
        *from_host += !strcmp(k->host, host);
    }
    pthread_mutex_unlock(&r->mu);
}

static void on_connect(ar_relay *r, rconn *c, size_t request_len)
{
    ar_relay_connect req;
    int rc = ar_relay_parse_connect(c->in, request_len, &req);
    /* what came after the request (gRPC sends nothing before the answer,
     * but a client may) goes to the provider first */
    memmove(c->in, c->in + request_len, c->in_len - request_len);
    c->in_len -= request_len;
    double now = ar_now();
    if (host_blocked(r, c->host, now))
        return refuse(r, c, &r->stats.refused_limit, "429 Too Many Requests", 0, "a blocked host");
    if (rc != AR_OK)
        return refuse(r, c, &r->stats.refused_other, "400 Bad Request", 1, ar_last_error());
    if (!req.pass[0])
        return refuse(r, c, &r->stats.refused_pass, "407 Proxy Authentication Required", 1, "no pass");
    int64_t provider, lease;
    if (ar_relay_pass_check(r->cfg.key, req.pass, (int64_t)time(NULL), &provider, &lease) != AR_OK)
        return refuse(r, c, &r->stats.refused_pass, "403 Forbidden", 1, ar_last_error());
    if (r->cfg.lease_live && !r->cfg.lease_live(r->cfg.lease_ctx, provider, lease))
        return refuse(r, c, &r->stats.refused_pass, "403 Forbidden", 1, "the pass's lease has ended");
    rconn *ctl = find_control(r, provider);
    if (!ctl)
        return refuse(r, c, &r->stats.refused_absent, "404 Not Found", 0, "the provider is not attached");
    if (strcmp(ctl->address, req.target) != 0)
        return refuse(r, c, &r->stats.refused_pass, "403 Forbidden", 1,
                      "the pass's provider serves another address than the one asked for");
    int to_provider, from_host, all;
    count_circuits(r, provider, c->host, &to_provider, &from_host, &all);
    if (to_provider >= r->cfg.per_provider || from_host >= r->cfg.per_client || all >= r->cfg.circuits)
        return refuse(r, c, &r->stats.refused_limit, "429 Too Many Requests", 0,
                      to_provider >= r->cfg.per_provider ? "the provider's circuits are at their limit"
                      : from_host >= r->cfg.per_client  ? "the host's circuits are at their limit"
                                                         : "the relay's circuits are at their limit");
    unsigned char raw[16];
    if (RAND_bytes(raw, sizeof raw) != 1)
        return refuse(r, c, &r->stats.refused_other, "500 Internal Server Error", 0, "no random bytes");
    for (int i = 0; i < 16; i++)
        snprintf(c->nonce + 2 * i, 3, "%02x", raw[i]);
    c->kind = C_WAIT;
    c->want = provider;
    c->circuit = ++r->next_circuit;
    c->deadline = now + DIAL_BACK_S;
    char line[96];
    int n = snprintf(line, sizeof line, "DIAL %" PRIu64 " %s\n", c->circuit, c->nonce);
    if (send_now(ctl->fd, line, (size_t)n) != 0) {
        conn_close(r, ctl); /* a provider that does not read its control connection */
        return refuse(r, c, &r->stats.refused_absent, "502 Bad Gateway", 0, "the provider's control connection failed");
    }
}

static void *circuit_main(void *arg)
{
    circuit *k = arg;
    ar_relay *r = k->relay;
    set_blocking(k->client, 1);
    set_blocking(k->provider, 1);
    static const char ok[] = "HTTP/1.1 200 Connection established\r\n\r\n";
    double moved = 0;
    int sent = send(k->client, ok, sizeof ok - 1, MSG_NOSIGNAL) == (ssize_t)(sizeof ok - 1) &&
               (k->n_to_client == 0 || send(k->client, k->to_client, k->n_to_client, MSG_NOSIGNAL) == (ssize_t)k->n_to_client) &&
               (k->n_to_provider == 0 ||
                send(k->provider, k->to_provider, k->n_to_provider, MSG_NOSIGNAL) == (ssize_t)k->n_to_provider);
    if (sent)
        moved = ar_net_splice(k->client, k->provider, &r->stopping);
    pthread_mutex_lock(&r->mu);
    close(k->client);
    close(k->provider);
    if (k->prev)
        k->prev->next = k->next;
    else
        r->circuits = k->next;
    if (k->next)
        k->next->prev = k->prev;
    r->ncircuits--;
    r->stats.circuits_open--;
    r->stats.bytes += moved;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    free(k);
    return NULL;
}

/* The provider dialled back for circuit `id`: pair it with the waiting
 * client and hand both to a thread of their own. */
static void on_data(ar_relay *r, rconn *d, const char *args, size_t line_len)
{
    uint64_t id = 0;
    char nonce[64];
    int used = 0;
    if (sscanf(args, "%" SCNu64 " %40s%n", &id, nonce, &used) != 2 || args[used] != '\0' || strlen(nonce) != 32)
        return refuse(r, d, &r->stats.refused_other, NULL, 1, "a malformed DATA line");
    rconn *w = NULL;
    for (rconn *c = r->conns; c && !w; c = c->next)
        if (c->kind == C_WAIT && c->circuit == id)
            w = c;
    if (!w || CRYPTO_memcmp(w->nonce, nonce, 32) != 0)
        return refuse(r, d, &r->stats.refused_other, NULL, 1, "a DATA line for no waiting circuit");
    circuit *k = calloc(1, sizeof *k);
    if (!k) {
        conn_close(r, d);
        return refuse(r, w, &r->stats.refused_other, "500 Internal Server Error", 0, "out of memory");
    }
    k->relay = r;
    k->provider_id = w->want;
    snprintf(k->host, sizeof k->host, "%s", w->host);
    /* what the worker sent behind the DATA line, and what the client sent
     * behind its request, are the streams' first bytes */
    k->n_to_client = d->in_len - line_len;
    memcpy(k->to_client, d->in + line_len, k->n_to_client);
    k->n_to_provider = w->in_len;
    memcpy(k->to_provider, w->in, w->in_len);
    /* the two sockets leave the loop (conn_close closes them: dup first) */
    k->client = dup(w->fd);
    k->provider = dup(d->fd);
    conn_close(r, w);
    conn_close(r, d);
    if (k->client < 0 || k->provider < 0) {
        if (k->client >= 0)
            close(k->client);
        if (k->provider >= 0)
            close(k->provider);
        free(k);
        return;
    }
    pthread_mutex_lock(&r->mu);
    k->next = r->circuits;
    if (k->next)
        k->next->prev = k;
    r->circuits = k;
    r->ncircuits++;
    r->stats.circuits++;
    r->stats.circuits_open++;
    pthread_mutex_unlock(&r->mu);
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 256 << 10);
    if (pthread_create(&t, &at, circuit_main, k) != 0) {
        ar_log(AR_LOG_ERROR, "relay: cannot start a circuit's thread");
        /* circuit_main's ending, here */
        shutdown(k->client, SHUT_RDWR);
        k->n_to_client = k->n_to_provider = 0;
        pthread_mutex_lock(&r->mu);
        r->stats.circuits_open--;
        if (k->prev)
            k->prev->next = k->next;
        else
            r->circuits = k->next;
        if (k->next)
            k->next->prev = k->prev;
        r->ncircuits--;
        pthread_mutex_unlock(&r->mu);
        close(k->client);
        close(k->provider);
        free(k);
    }
    pthread_attr_destroy(&at);
}

/* A stage that can be dialled (its worker is direct) wants its next stage,
 * a relayed one: instead of a circuit through the relay, the relay asks the
 * next stage's provider to dial the asking host back directly, at the port
 * it names (a meeting point it listens on), and says OK. The same pass opens
 * it; the address dialled is the one the request came from, so nobody can
 * point a provider at a third party. The asker falls back on an ordinary
 * circuit if the dial does not come. */
static void on_reverse(ar_relay *r, rconn *c, const char *args)
{
    char pass[AR_RELAY_PASS_MAX], nonce[64];
    unsigned port = 0;
    int used = 0;
    if (sscanf(args, "%159s %u %40s%n", pass, &port, nonce, &used) != 3 || args[used] != '\0' || port < 1024 ||
        port > 65535 || strlen(nonce) != 32 || strspn(nonce, "0123456789abcdef") != 32)
        return refuse(r, c, &r->stats.refused_other, NULL, 1, "a malformed REVERSE line");
    double now = ar_now();
    if (host_blocked(r, c->host, now))
        return refuse(r, c, &r->stats.refused_limit, NULL, 0, "a blocked host");
    int64_t provider, lease;
    if (ar_relay_pass_check(r->cfg.key, pass, (int64_t)time(NULL), &provider, &lease) != AR_OK)
        return refuse(r, c, &r->stats.refused_pass, NULL, 1, ar_last_error());
    if (r->cfg.lease_live && !r->cfg.lease_live(r->cfg.lease_ctx, provider, lease))
        return refuse(r, c, &r->stats.refused_pass, NULL, 1, "the pass's lease has ended");
    rconn *ctl = find_control(r, provider);
    if (!ctl)
        return refuse(r, c, &r->stats.refused_absent, NULL, 0, "the provider is not attached");
    char line[160];
    int n = snprintf(line, sizeof line, "DIALTO %s:%u %s\n", c->ip, port, nonce);
    if (n <= 0 || (size_t)n >= sizeof line || send_now(ctl->fd, line, (size_t)n) != 0) {
        if (n > 0 && (size_t)n < sizeof line)
            conn_close(r, ctl);
        return refuse(r, c, &r->stats.refused_absent, NULL, 0, "the provider's control connection failed");
    }
    pthread_mutex_lock(&r->mu);
    r->stats.reversed++;
    pthread_mutex_unlock(&r->mu);
    send_now(c->fd, "OK\n", 3);
    conn_close(r, c);
}

static int address_ok(const char *a)
{
    size_t n = strlen(a);
    if (n == 0 || n > 255)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!target_char((unsigned char)a[i]))
            return 0;
    return strchr(a, ':') != NULL;
}

static void on_control(ar_relay *r, rconn *c, const char *args)
{
    int64_t provider = 0;
    char address[300], cred[80];
    int used = 0;
    if (sscanf(args, "%" SCNd64 " %299s %79s%n", &provider, address, cred, &used) != 3 || args[used] != '\0' ||
        provider <= 0 || !address_ok(address) || strlen(cred) != AR_RELAY_CREDENTIAL_HEX) {
        pthread_mutex_lock(&r->mu);
        r->stats.controls_refused++;
        pthread_mutex_unlock(&r->mu);
        send_now(c->fd, "NO malformed CONTROL line\n", 26);
        return conn_close(r, c);
    }
    char want[AR_RELAY_CREDENTIAL_HEX + 1];
    ar_relay_credential(r->cfg.key, provider, address, want);
    int hosts = 0, all = 0;
    for (rconn *o = r->conns; o; o = o->next)
        if (o->kind == C_CONTROL) {
            all++;
            hosts += !strcmp(o->host, c->host);
        }
    const char *no = CRYPTO_memcmp(want, cred, AR_RELAY_CREDENTIAL_HEX) != 0 ? "a credential this relay did not issue"
                     : hosts >= AR_RELAY_CONTROLS_PER_HOST                   ? "too many providers from this host"
                     : all >= AR_RELAY_MAX_CONTROLS                          ? "too many providers"
                                                                             : NULL;
    if (no) {
        pthread_mutex_lock(&r->mu);
        r->stats.controls_refused++;
        pthread_mutex_unlock(&r->mu);
        ar_log(AR_LOG_WARN, "relay: control connection from %s for provider %" PRId64 " refused: %s", c->host,
               provider, no);
        char msg[120];
        int n = snprintf(msg, sizeof msg, "NO %s\n", no);
        send_now(c->fd, msg, (size_t)n);
        return conn_close(r, c);
    }
    /* the provider again (it reconnected before we saw the old connection
     * die): the new connection wins */
    rconn *old = find_control(r, provider);
    if (old) {
        send_now(old->fd, "NO replaced by a newer control connection\n", 42);
        conn_close(r, old);
    }
    char ok[32];
    int n = snprintf(ok, sizeof ok, "OK %d\n", AR_RELAY_PING_S);
    if (send_now(c->fd, ok, (size_t)n) != 0)
        return conn_close(r, c);
    r->npending--;
    c->kind = C_CONTROL;
    c->provider = provider;
    snprintf(c->address, sizeof c->address, "%.255s", address);
    c->heard = c->pinged = ar_now();
    c->in_len = 0;
    pthread_mutex_lock(&r->mu);
    r->stats.providers++;
    pthread_mutex_unlock(&r->mu);
    ar_log(AR_LOG_INFO, "relay: provider %" PRId64 " (%s, worker %s) attached", provider, c->host, address);
}

/* What a new connection sent so far: a CONNECT request, or one line of ours. */
static void on_new(ar_relay *r, rconn *c)
{
    size_t n = c->in_len;
    c->in[n] = '\0';
    size_t cl = n < 8 ? n : 8, ll = n < sizeof LINE_PREFIX - 1 ? n : sizeof LINE_PREFIX - 1;
    if (!memcmp(c->in, "CONNECT ", cl) && n >= 1) {
        if (n < 8)
            return;
        const char *end = memmem(c->in, n, "\r\n\r\n", 4);
        if (end)
            return on_connect(r, c, (size_t)(end - c->in) + 4);
        if (n >= REQUEST_MAX)
            return refuse(r, c, &r->stats.refused_other, "431 Request Header Fields Too Large", 1,
                          "a CONNECT request over 4 KiB");
        return;
    }
    if (!memcmp(c->in, LINE_PREFIX, ll)) {
        char *nl = memchr(c->in, '\n', n);
        if (!nl) {
            if (n >= LINE_MAX_BYTES)
                return refuse(r, c, &r->stats.refused_other, NULL, 1, "a line over 512 bytes");
            return;
        }
        size_t line_len = (size_t)(nl - c->in) + 1;
        if (line_len > LINE_MAX_BYTES)
            return refuse(r, c, &r->stats.refused_other, NULL, 1, "a line over 512 bytes");
        char line[LINE_MAX_BYTES + 1];
        memcpy(line, c->in, line_len - 1);
        line[line_len - 1] = '\0';
        const char *rest = line + sizeof LINE_PREFIX - 1;
        if (!strncmp(rest, "CONTROL ", 8)) {
            if (line_len != n) /* a provider sends nothing before OK */
                return refuse(r, c, &r->stats.refused_other, NULL, 1, "bytes after a CONTROL line");
            return on_control(r, c, rest + 8);
        }
        if (!strncmp(rest, "DATA ", 5))
            return on_data(r, c, rest + 5, line_len);
        if (!strncmp(rest, "REVERSE ", 8)) {
            if (line_len != n)
                return refuse(r, c, &r->stats.refused_other, NULL, 1, "bytes after a REVERSE line");
            return on_reverse(r, c, rest + 8);
        }
        return refuse(r, c, &r->stats.refused_other, NULL, 1, "an unknown request line");
    }
    refuse(r, c, &r->stats.refused_other, NULL, 1, "not a request the relay speaks");
}

static void on_control_input(ar_relay *r, rconn *c)
{
    for (;;) {
        char *nl = memchr(c->in, '\n', c->in_len);
        if (!nl) {
            if (c->in_len >= LINE_MAX_BYTES) {
                ar_log(AR_LOG_WARN, "relay: provider %" PRId64 " sent a line over 512 bytes: dropped", c->provider);
                conn_close(r, c);
            }
            return;
        }
        size_t len = (size_t)(nl - c->in) + 1;
        int ping = len == 5 && !memcmp(c->in, "PING\n", 5);
        if (!ping) {
            ar_log(AR_LOG_WARN, "relay: provider %" PRId64 " sent what a provider does not send: dropped",
                   c->provider);
            return conn_close(r, c);
        }
        c->heard = ar_now();
        memmove(c->in, c->in + len, c->in_len - len);
        c->in_len -= len;
    }
}

static void on_readable(ar_relay *r, rconn *c)
{
    size_t room = REQUEST_MAX - c->in_len;
    if (room == 0) {
        if (c->kind == C_NEW)
            return refuse(r, c, &r->stats.refused_other, NULL, 1, "a request over 4 KiB");
        return conn_close(r, c); /* a waiting client sending more than a request */
    }
    ssize_t k = recv(c->fd, c->in + c->in_len, room, 0);
    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR)) {
        if (c->kind == C_WAIT)
            ar_log(AR_LOG_DEBUG, "relay: a client left before its circuit opened");
        return conn_close(r, c);
    }
    if (k < 0)
        return;
    c->in_len += (size_t)k;
    if (c->kind == C_NEW)
        on_new(r, c);
    else if (c->kind == C_CONTROL)
        on_control_input(r, c);
    /* C_WAIT: kept, sent to the provider first */
}

static void on_accept(ar_relay *r)
{
    for (;;) {
        int fd = accept4(r->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        if (r->npending >= MAX_PENDING) {
            /* push out the oldest request still arriving */
            rconn *oldest = NULL;
            for (rconn *c = r->conns; c; c = c->next)
                if (c->kind == C_NEW && (!oldest || c->since < oldest->since))
                    oldest = c;
            if (oldest) {
                pthread_mutex_lock(&r->mu);
                r->stats.refused++;
                r->stats.refused_other++;
                pthread_mutex_unlock(&r->mu);
                conn_close(r, oldest);
            }
            if (r->npending >= MAX_PENDING) {
                close(fd);
                continue;
            }
        }
        rconn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->kind = C_NEW;
        c->since = ar_now();
        c->deadline = c->since + REQUEST_S;
        peer_host(fd, c->host, c->ip);
        keepalive(fd);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
            close(fd);
            free(c);
            continue;
        }
        c->next = r->conns;
        if (c->next)
            c->next->prev = c;
        r->conns = c;
        r->npending++;
    }
}

static void log_stats_if_changed(ar_relay *r, int force)
{
    ar_relay_stats s;
    ar_relay_get_stats(r, &s);
    double now = ar_now();
    if (!force && (now - r->stats_logged_at < 5 ||
                   (s.refused == r->stats_logged_refused && s.circuits == r->stats_logged_circuits &&
                    s.providers == r->stats_logged_providers)))
        return;
    r->stats_logged_at = now;
    r->stats_logged_refused = s.refused;
    r->stats_logged_circuits = s.circuits;
    r->stats_logged_providers = s.providers;
    char text[400];
    ar_relay_stats_text(&s, text, sizeof text);
    ar_log(AR_LOG_INFO, "relay: %s", text);
}

/* Deadlines: requests that did not arrive, providers that did not dial back,
 * control connections gone quiet; pings due. */
static void on_tick(ar_relay *r)
{
    double now = ar_now();
    rconn *next;
    for (rconn *c = r->conns; c; c = next) {
        next = c->next;
        if (c->kind == C_NEW && now > c->deadline) {
            refuse(r, c, &r->stats.refused_other, NULL, 0, "its request did not arrive within 5 s");
        } else if (c->kind == C_WAIT && now > c->deadline) {
            refuse(r, c, &r->stats.refused_timeout, "504 Gateway Timeout", 0, "the provider did not dial back");
        } else if (c->kind == C_CONTROL) {
            if (now - c->heard > 3 * AR_RELAY_PING_S) {
                ar_log(AR_LOG_WARN, "relay: provider %" PRId64 " silent for %d s: dropped", c->provider,
                       3 * AR_RELAY_PING_S);
                conn_close(r, c);
            } else if (now - c->pinged >= AR_RELAY_PING_S) {
                c->pinged = now;
                if (send_now(c->fd, "PING\n", 5) != 0)
                    conn_close(r, c);
            }
        }
    }
    log_stats_if_changed(r, 0);
}

static void *loop_main(void *arg)
{
    ar_relay *r = arg;
    struct epoll_event evs[64];
    double last_tick = 0;
    while (!r->stopping) {
        int n = epoll_wait(r->epfd, evs, 64, 250);
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p == &listen_sock) {
                on_accept(r);
            } else if (p == &wake_sock) {
                uint64_t v;
                if (read(r->wake_fd, &v, sizeof v) < 0) {
                    /* nothing to do: the loop looks at stopping */
                }
            } else {
                rconn *c = p;
                if (c->fd >= 0) /* (closed earlier in this batch: its memory waits for free_dead) */
                    on_readable(r, c);
            }
        }
        free_dead(r);
        double now = ar_now();
        if (now - last_tick >= 0.25) {
            last_tick = now;
            on_tick(r);
            free_dead(r);
        }
    }
    while (r->conns)
        conn_close(r, r->conns);
    free_dead(r);
    return NULL;
}

void ar_relay_get_stats(ar_relay *r, ar_relay_stats *out)
{
    pthread_mutex_lock(&r->mu);
    *out = r->stats;
    pthread_mutex_unlock(&r->mu);
}

void ar_relay_stats_text(const ar_relay_stats *s, char *buf, size_t size)
{
    snprintf(buf, size,
             "%ld provider%s attached, %ld circuit%s open (%ld opened, %.1f MB spliced), %ld circuit "
             "request%s refused (%ld without a valid pass, %ld for absent providers, %ld over limits, %ld "
             "not dialled back, %ld malformed), %ld control connection%s refused, %ld stage%s dialled back directly",
             s->providers, s->providers == 1 ? "" : "s", s->circuits_open, s->circuits_open == 1 ? "" : "s",
             s->circuits, s->bytes / 1e6, s->refused, s->refused == 1 ? "" : "s", s->refused_pass,
             s->refused_absent, s->refused_limit, s->refused_timeout, s->refused_other, s->controls_refused,
             s->controls_refused == 1 ? "" : "s", s->reversed, s->reversed == 1 ? "" : "s");
}

/* A listening TCP socket on HOST:PORT (names resolved; the first address
 * that binds). */
static int listen_on(const char *hostport, int *port_out)
{
    struct addrinfo *res;
    if (ar_net_resolve(hostport, 1, &res) != AR_OK)
        return ar_fail(AR_EINVAL, "relay: %s", ar_last_error());
    int fd = -1;
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        int on = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
        if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 512) != 0) {
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0)
        return ar_fail(AR_EIO, "relay: cannot listen on %s (address in use or invalid)", hostport);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    *port_out = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                               : ((struct sockaddr_in *)&ss)->sin_port);
    return fd;
}

int ar_relay_start(const ar_relay_config *c, ar_relay **out, char *addr, size_t addr_size)
{
    if (!c->listen)
        return ar_fail(AR_EINVAL, "the relay needs a listen address");
    if (c->per_provider < 0 || c->per_client < 0 || c->circuits < 0)
        return ar_fail(AR_EINVAL, "relay limits must not be negative");
    ar_relay *r = calloc(1, sizeof *r);
    if (!r)
        return ar_fail(AR_ENOMEM, "out of memory for the relay");
    r->cfg = *c;
    r->cfg.per_provider = c->per_provider ? c->per_provider : AR_RELAY_DEFAULT_PER_PROVIDER;
    r->cfg.per_client = c->per_client ? c->per_client : AR_RELAY_DEFAULT_PER_CLIENT;
    r->cfg.circuits = c->circuits ? c->circuits : AR_RELAY_DEFAULT_CIRCUITS;
    r->listen_fd = r->epfd = r->wake_fd = -1;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    int port = 0, rc;
    if ((rc = listen_on(c->listen, &port)) < 0) {
        ar_relay_stop(r);
        return rc;
    }
    r->listen_fd = rc;
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event le = {.events = EPOLLIN, .data.ptr = &listen_sock},
                       we = {.events = EPOLLIN, .data.ptr = &wake_sock};
    if (r->epfd < 0 || r->wake_fd < 0 || epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->listen_fd, &le) != 0 ||
        epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->wake_fd, &we) != 0) {
        ar_relay_stop(r);
        return ar_fail(AR_EIO, "relay: epoll: %s", strerror(errno));
    }
    if (pthread_create(&r->loop, NULL, loop_main, r) != 0) {
        ar_relay_stop(r);
        return ar_fail(AR_EINTERNAL, "relay: cannot start its thread");
    }
    r->loop_started = 1;
    const char *colon = strrchr(c->listen, ':');
    snprintf(addr, addr_size, "%.*s:%d", (int)(colon - c->listen), c->listen, port);
    *out = r;
    return AR_OK;
}

void ar_relay_stop(ar_relay *r)
{
    if (!r)
        return;
    r->stopping = 1;
    if (r->loop_started) {
        uint64_t one = 1;
        if (write(r->wake_fd, &one, sizeof one) < 0) {
            /* the loop wakes within its 250 ms timeout anyway */
        }
        pthread_join(r->loop, NULL);
        log_stats_if_changed(r, 1);
    }
    /* the circuits' threads see `stopping` within a second; shutting their
     * sockets makes them see it now */
    pthread_mutex_lock(&r->mu);
    for (circuit *k = r->circuits; k; k = k->next) {
        shutdown(k->client, SHUT_RDWR);
        shutdown(k->provider, SHUT_RDWR);
    }
    while (r->ncircuits > 0)
        pthread_cond_wait(&r->cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
    if (r->listen_fd >= 0)
        close(r->listen_fd);
    if (r->epfd >= 0)
        close(r->epfd);
    if (r->wake_fd >= 0)
        close(r->wake_fd);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    OPENSSL_cleanse(r->cfg.key, sizeof r->cfg.key);
    free(r);
}
