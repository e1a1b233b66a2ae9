/* wan_relay: an emulated WAN link between two parties, for the benchmarks
 * and tests (docs/DESIGN.md, "Slow links").
 *
 *   wan_relay --listen 127.0.0.1:0 --to 127.0.0.1:5001 --delay-ms 20 --rate-mbit 20
 *             [--up-delay-ms D] [--up-rate-mbit R]
 *
 * Accepts TCP connections on --listen and forwards each to --to, holding
 * every byte back by a one-way delay and a rate cap per direction: "down" is
 * what the connecting party sends (a driver's or a stage's frames to the
 * next stage), "up" what comes back; --up-* default to the down settings.
 * Prints "wan_relay: listening on HOST:PORT" once it accepts.
 *
 * The kernel of the machines this runs on has no netem, so the link lives in
 * user space. A byte read from one side goes through the model of a link: a
 * serializer per direction that all connections share (one home connection,
 * however many TCP streams gRPC opens over it) sends a segment in
 * bytes / rate after the previous one left, and the segment arrives `delay`
 * after it left. Segments are at most SEGMENT bytes, so a small message
 * never waits behind a big read for longer than a packet train would.
 * While a direction holds more than its buffer (what the link can carry in
 * BUFFER_S, at least MIN_BUFFER bytes), the relay stops reading that side:
 * TCP's own flow control then holds the sender back, as a full router queue
 * would. The wait is ppoll's, to the nanosecond: on an idle machine the
 * round trip comes within a few hundred microseconds of twice the delay.
 *
 * Single-threaded, poll-driven; connections are independent except for
 * sharing each direction's serializer. Nothing here is part of arceus. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SEGMENT 4096
#define BUFFER_S 0.25
#define MIN_BUFFER (256 * 1024)
#define MAX_CONNS 256
#define READ_CHUNK 65536

typedef struct segment {
    double deliver_at;
    size_t len, off;
    struct segment *next;
    unsigned char data[];
} segment;

/* One direction of one connection: bytes read from `from`, to be written to `to`. */
typedef struct {
    int from, to;
    segment *head, *tail;
    size_t queued;    /* bytes read and not yet written */
    int eof;          /* `from` reached its end: shut `to` down once the queue drains */
    int shut;         /* done */
} flow;

typedef struct {
    int used;
    flow f[2]; /* 0: down (client -> target), 1: up (target -> client) */
} conn;

typedef struct {
    double delay_s, rate_Bps; /* bytes per second */
    double last_departure;    /* when the serializer frees up */
    size_t buffer;
} direction;

static direction dirs[2];
static volatile sig_atomic_t stopping;

static void on_signal(int sig)
{
    (void)sig;
    stopping = 1;
}
static conn conns[MAX_CONNS];

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    fprintf(stderr, "wan_relay: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int split_hostport(const char *s, char *host, size_t hsize, char *port, size_t psize)
{
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= hsize || strlen(colon + 1) >= psize || colon == s)
        return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    snprintf(port, psize, "%s", colon + 1);
    return 0;
}

static int resolve(const char *hostport, struct sockaddr_storage *ss, socklen_t *len)
{
    char host[256], port[32];
    if (split_hostport(hostport, host, sizeof host, port, sizeof port) != 0)
        return -1;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
    if (getaddrinfo(host, port, &hints, &res) != 0)
        return -1;
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static void nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        die("fcntl");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void flow_free(flow *f)
{
    segment *s = f->head;
    while (s) {
        segment *n = s->next;
        free(s);
        s = n;
    }
    f->head = f->tail = NULL;
    f->queued = 0;
}

static void conn_close(conn *c)
{
    flow_free(&c->f[0]);
    flow_free(&c->f[1]);
    close(c->f[0].from);
    close(c->f[0].to);
    c->used = 0;
}

/* Bytes just read on flow f (direction d) enter the link model. */
static int enqueue(flow *f, direction *d, const unsigned char *buf, size_t n, double now)
{
    for (size_t at = 0; at < n;) {
        size_t len = n - at < SEGMENT ? n - at : SEGMENT;
        segment *s = malloc(sizeof *s + len);
        if (!s)
            return -1;
        memcpy(s->data, buf + at, len);
        s->len = len;
        s->off = 0;
        s->next = NULL;
        double start = d->last_departure > now ? d->last_departure : now;
        double left = start + (double)len / d->rate_Bps;
        d->last_departure = left;
        s->deliver_at = left + d->delay_s;
        if (f->tail)
            f->tail->next = s;
        else
            f->head = s;
        f->tail = s;
        f->queued += len;
        at += len;
    }
    return 0;
}

/* Write what has arrived. -1: the connection is gone. */
static int deliver(flow *f, double now)
{
    while (f->head && f->head->deliver_at <= now) {
        segment *s = f->head;
        ssize_t w = send(f->to, s->data + s->off, s->len - s->off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            return -1;
        }
        s->off += (size_t)w;
        f->queued -= (size_t)w;
        if (s->off < s->len)
            return 0;
        f->head = s->next;
        if (!f->head)
            f->tail = NULL;
        free(s);
    }
    if (!f->head && f->eof && !f->shut) {
        shutdown(f->to, SHUT_WR);
        f->shut = 1;
    }
    return 0;
}

static int read_flow(flow *f, direction *d, double now)
{
    static unsigned char buf[READ_CHUNK];
    for (;;) {
        if (f->queued >= d->buffer)
            return 0;
        ssize_t r = recv(f->from, buf, sizeof buf, 0);
        if (r > 0) {
            if (enqueue(f, d, buf, (size_t)r, now) != 0)
                return -1;
            continue;
        }
        if (r == 0) {
            f->eof = 1;
            return 0;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        if (errno == EINTR)
            continue;
        return -1;
    }
}

static double parse_num(const char *opt, const char *v, double lo, double hi)
{
    char *end;
    double x = strtod(v, &end);
    if (*v == '\0' || *end != '\0' || !(x >= lo && x <= hi)) {
        fprintf(stderr, "wan_relay: %s: expected a number in [%g, %g], got \"%s\"\n", opt, lo, hi, v);
        exit(2);
    }
    return x;
}

static void usage(void)
{
    fprintf(stderr, "usage: wan_relay --listen HOST:PORT --to HOST:PORT --delay-ms D --rate-mbit R\n"
                    "                 [--up-delay-ms D] [--up-rate-mbit R]\n"
                    "Forward TCP connections from --listen to --to through an emulated link: a one-way\n"
                    "delay and a rate cap per direction (down: what the connecting side sends; up: the\n"
                    "replies; the --up-* settings default to the down ones).\n");
}

int main(int argc, char **argv)
{
    const char *listen_at = NULL, *to = NULL;
    double delay_ms = -1, rate = -1, up_delay_ms = -1, up_rate = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage();
            return 0;
        }
        if (!v) {
            usage();
            return 2;
        }
        if (strcmp(a, "--listen") == 0)
            listen_at = v;
        else if (strcmp(a, "--to") == 0)
            to = v;
        else if (strcmp(a, "--delay-ms") == 0)
            delay_ms = parse_num(a, v, 0, 10000);
        else if (strcmp(a, "--rate-mbit") == 0)
            rate = parse_num(a, v, 0.01, 100000);
        else if (strcmp(a, "--up-delay-ms") == 0)
            up_delay_ms = parse_num(a, v, 0, 10000);
        else if (strcmp(a, "--up-rate-mbit") == 0)
            up_rate = parse_num(a, v, 0.01, 100000);
        else {
            usage();
            return 2;
        }
        i++;
    }
    if (!listen_at || !to || delay_ms < 0 || rate < 0) {
        usage();
        return 2;
    }
    dirs[0].delay_s = delay_ms / 1e3;
    dirs[0].rate_Bps = rate * 1e6 / 8;
    dirs[1].delay_s = (up_delay_ms >= 0 ? up_delay_ms : delay_ms) / 1e3;
    dirs[1].rate_Bps = (up_rate >= 0 ? up_rate : rate) * 1e6 / 8;
    for (int d = 0; d < 2; d++) {
        double b = dirs[d].rate_Bps * BUFFER_S;
        dirs[d].buffer = b > MIN_BUFFER ? (size_t)b : MIN_BUFFER;
    }
    signal(SIGPIPE, SIG_IGN);
    /* SIGTERM and SIGINT end it with status 0: the tests stop it so */
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    struct sockaddr_storage la, ta;
    socklen_t llen, tlen;
    if (resolve(listen_at, &la, &llen) != 0 || resolve(to, &ta, &tlen) != 0) {
        fprintf(stderr, "wan_relay: cannot resolve --listen %s or --to %s\n", listen_at, to);
        return 2;
    }
    int lfd = socket(la.ss_family, SOCK_STREAM, 0);
    int one = 1;
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(lfd, (struct sockaddr *)&la, llen) < 0 || listen(lfd, 64) < 0)
        die("listen");
    nonblock(lfd);
    struct sockaddr_storage bound;
    socklen_t blen = sizeof bound;
    getsockname(lfd, (struct sockaddr *)&bound, &blen);
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (bound.ss_family == AF_INET) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&bound;
        inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host);
        port = ntohs(s4->sin_port);
    } else {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&bound;
        inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host);
        port = ntohs(s6->sin6_port);
    }
    printf("wan_relay: listening on %s:%d (to %s, down %.3g ms %.4g Mbit/s, up %.3g ms %.4g Mbit/s)\n", host,
           port, to, dirs[0].delay_s * 1e3, dirs[0].rate_Bps * 8 / 1e6, dirs[1].delay_s * 1e3,
           dirs[1].rate_Bps * 8 / 1e6);
    fflush(stdout);

    struct pollfd pfd[1 + 2 * MAX_CONNS];
    while (!stopping) {
        double now = now_s();
        /* what is due, and the next time something is */
        double next = -1;
        for (int i = 0; i < MAX_CONNS; i++) {
            conn *c = &conns[i];
            if (!c->used)
                continue;
            int gone = 0;
            for (int d = 0; d < 2 && !gone; d++)
                gone = deliver(&c->f[d], now) != 0;
            if (gone || (c->f[0].shut && c->f[1].shut)) {
                conn_close(c);
                continue;
            }
            for (int d = 0; d < 2; d++)
                if (c->f[d].head && (next < 0 || c->f[d].head->deliver_at < next))
                    next = c->f[d].head->deliver_at;
        }
        int n = 0;
        pfd[n++] = (struct pollfd){.fd = lfd, .events = POLLIN};
        int slot[2 * MAX_CONNS];
        for (int i = 0; i < MAX_CONNS; i++) {
            conn *c = &conns[i];
            if (!c->used)
                continue;
            /* side 0 is the client, side 1 the target: each is read for one
             * flow and written for the other */
            for (int side = 0; side < 2; side++) {
                flow *rd = &c->f[side], *wr = &c->f[1 - side];
                short ev = 0;
                if (!rd->eof && rd->queued < dirs[side].buffer)
                    ev |= POLLIN;
                if (wr->head && wr->head->deliver_at <= now)
                    ev |= POLLOUT; /* due but the socket was full */
                slot[n - 1] = i;
                /* a side that has ended reports POLLHUP for ever: leave it
                 * out unless there is something to write to it */
                int fd = rd->eof && !(ev & POLLOUT) ? -1 : rd->from;
                pfd[n++] = (struct pollfd){.fd = fd, .events = ev};
            }
        }
        struct timespec ts, *tsp = NULL;
        if (next >= 0) {
            double wait = next - now_s();
            if (wait < 0)
                wait = 0;
            ts.tv_sec = (time_t)wait;
            ts.tv_nsec = (long)((wait - (double)ts.tv_sec) * 1e9);
            tsp = &ts;
        }
        int pr = ppoll(pfd, (nfds_t)n, tsp, NULL);
        if (pr < 0) {
            if (errno == EINTR)
                continue;
            die("ppoll");
        }
        if (stopping)
            break;
        now = now_s();
        if (pfd[0].revents & POLLIN) {
            for (;;) {
                int cfd = accept(lfd, NULL, NULL);
                if (cfd < 0)
                    break;
                int k = 0;
                while (k < MAX_CONNS && conns[k].used)
                    k++;
                int tfd = k < MAX_CONNS ? socket(ta.ss_family, SOCK_STREAM, 0) : -1;
                if (tfd < 0 || connect(tfd, (struct sockaddr *)&ta, tlen) < 0) {
                    fprintf(stderr, "wan_relay: cannot reach %s for a new connection: %s\n", to,
                            k < MAX_CONNS ? strerror(errno) : "too many connections");
                    if (tfd >= 0)
                        close(tfd);
                    close(cfd);
                    continue;
                }
                nonblock(cfd);
                nonblock(tfd);
                conn *c = &conns[k];
                memset(c, 0, sizeof *c);
                c->used = 1;
                c->f[0].from = cfd;
                c->f[0].to = tfd;
                c->f[1].from = tfd;
                c->f[1].to = cfd;
            }
        }
        for (int p = 1; p < n; p++) {
            if (!pfd[p].revents)
                continue;
            conn *c = &conns[slot[p - 1]];
            if (!c->used)
                continue;
            int side = (p - 1) % 2; /* the sides of a connection come in order */
            if ((pfd[p].revents & (POLLIN | POLLHUP | POLLERR)) &&
                read_flow(&c->f[side], &dirs[side], now) != 0) {
                conn_close(c);
                continue;
            }
            if ((pfd[p].revents & POLLOUT) && deliver(&c->f[1 - side], now) != 0)
                conn_close(c);
        }
    }
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].used)
            conn_close(&conns[i]);
    close(lfd);
    return 0;
}
