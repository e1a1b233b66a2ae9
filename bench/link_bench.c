/* Link throughput on loopback: frames through the gRPC Pipe link against raw
 * TCP with the same message sizes, measured in the same run (DESIGN.md §7:
 * raw TCP 2.4 GB/s at 1 MiB here). One stream each; the receiver consumes
 * every message and answers once at the end, so the time covers delivery.
 *
 * By default each receiver runs in a process of its own (this program run
 * again with --serve), as two pipeline stages do; --same-process keeps both
 * ends in one process, where one gRPC event loop then serves both of them.
 *
 * usage: link_bench [--quick] [--same-process]   one line per size, then JSON */
#include "core/core.h"
#include "net/net.h"
#include "train/frame.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- raw TCP ----------------------------------------------------------- */

typedef struct {
    int listen_fd;
    size_t size;
    int count;
    int owned; /* each message into a fresh malloc'd buffer, then freed (as a
                * transport that hands over owned messages must), instead of
                * one reused buffer */
} tcp_job;

static int read_full(int fd, void *buf, size_t n)
{
    char *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void *tcp_receiver(void *arg)
{
    tcp_job *j = arg;
    int fd = accept(j->listen_fd, NULL, NULL);
    if (fd < 0)
        return NULL;
    char *buf = malloc(j->size);
    for (int i = 0; buf && i < j->count; i++) {
        uint64_t len;
        if (read_full(fd, &len, sizeof len) != 0 || len != j->size)
            break;
        char *dst = j->owned ? malloc(len) : buf;
        int bad = !dst || read_full(fd, dst, len) != 0;
        if (j->owned)
            free(dst);
        if (bad)
            break;
    }
    char ack = 1;
    write_full(fd, &ack, 1);
    free(buf);
    close(fd);
    return NULL;
}

static int two_processes = 1;

/* Run this program again as the receiving end: it prints its port, serves
 * one sender, exits. */
static pid_t spawn_receiver(const char *kind, size_t size, int count, int *port)
{
    int p[2];
    if (pipe(p) != 0)
        return -1;
    char sz[32], cnt[32];
    snprintf(sz, sizeof sz, "%zu", size);
    snprintf(cnt, sizeof cnt, "%d", count);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(p[1], 1);
        close(p[0]);
        close(p[1]);
        execl("/proc/self/exe", "link_bench", "--serve", kind, sz, cnt, (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    FILE *f = fdopen(p[0], "r");
    int ok = f && fscanf(f, "%d", port) == 1;
    if (f)
        fclose(f);
    if (pid < 0 || !ok) {
        if (pid > 0)
            waitpid(pid, NULL, 0);
        return -1;
    }
    return pid;
}

static int tcp_listen(int *port)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 1) != 0 ||
        getsockname(ls, (struct sockaddr *)&a, &alen) != 0)
        return -1;
    *port = ntohs(a.sin_port);
    return ls;
}

static double tcp_rate(size_t size, int count, int owned)
{
    if (two_processes) {
        int port;
        pid_t pid = spawn_receiver(owned ? "tcp-owned" : "tcp", size, count, &port);
        if (pid < 0)
            return -1;
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        double rate = -1;
        if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            char *buf = malloc(size);
            if (buf) {
                memset(buf, 1, size);
                double t0 = ar_now();
                int sent = 1;
                for (int i = 0; i < count && sent; i++) {
                    uint64_t len = size;
                    sent = write_full(fd, &len, sizeof len) == 0 && write_full(fd, buf, size) == 0;
                }
                char ack;
                if (sent && read_full(fd, &ack, 1) == 0)
                    rate = (double)size * count / (ar_now() - t0);
                free(buf);
            }
        }
        if (fd >= 0)
            close(fd);
        waitpid(pid, NULL, 0);
        return rate;
    }
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 1) != 0 ||
        getsockname(ls, (struct sockaddr *)&a, &alen) != 0)
        return -1;
    tcp_job j = {ls, size, count, owned};
    pthread_t t;
    pthread_create(&t, NULL, tcp_receiver, &j);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* written before the clock, like a payload a stage has just computed
     * (calloc'd pages never written read as the shared zero page) */
    char *buf = malloc(size);
    if (buf)
        memset(buf, 1, size);
    double t0 = ar_now();
    for (int i = 0; i < count; i++) {
        uint64_t len = size;
        if (write_full(fd, &len, sizeof len) != 0 || write_full(fd, buf, size) != 0)
            break;
    }
    char ack;
    int ok = read_full(fd, &ack, 1) == 0;
    double dt = ar_now() - t0;
    pthread_join(t, NULL);
    close(fd);
    close(ls);
    free(buf);
    return ok ? (double)size * count / dt : -1;
}

/* ---- gRPC Pipe link ---------------------------------------------------- */

typedef struct {
    int count;
    int received;
} pipe_job;

static void on_pipe(ar_rpc *rpc, void *user)
{
    pipe_job *j = user;
    ar_link *l;
    if (ar_rpc_link(rpc, "bench server", AR_NET_DEFAULT_MAX_FRAME, &l) != AR_OK) {
        ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "%s", ar_last_error());
        return;
    }
    for (j->received = 0; j->received < j->count; j->received++) {
        ar_frame f;
        if (ar_link_recv(l, &f, 60) != AR_OK)
            break;
        ar_frame_free(&f);
    }
    ar_frame ack = {.kind = AR_FRAME_SYNC};
    ar_link_send(l, &ack);
    ar_rpc_finish(rpc, AR_STATUS_OK, "done");
}

static double grpc_rate(size_t size, int count)
{
    pipe_job j = {.count = count};
    ar_server *srv = NULL;
    int port;
    pid_t pid = -1;
    if (two_processes) {
        if ((pid = spawn_receiver("grpc", size, count, &port)) < 0)
            return -1;
        j.received = count; /* the receiver acknowledges only after all of them */
    } else if (ar_server_create("127.0.0.1:0", NULL, &srv, &port) != AR_OK ||
               ar_server_handle(srv, "/arceus.Worker/Pipe", on_pipe, &j) != AR_OK ||
               ar_server_start(srv) != AR_OK) {
        return -1;
    }
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    ar_client *c;
    ar_link *l;
    if (ar_client_open(addr, &c) != AR_OK || ar_client_pipe(c, "bench client", AR_NET_DEFAULT_MAX_FRAME, &l) != AR_OK) {
        if (pid > 0)
            waitpid(pid, NULL, 0);
        return -1;
    }
    /* payloads are prepared (and written, as by the compute that made them)
     * before the clock starts: the link takes them over */
    void **bufs = calloc((size_t)count, sizeof *bufs);
    for (int i = 0; i < count; i++) {
        bufs[i] = malloc(size);
        memset(bufs[i], 1, size);
    }
    double t0 = ar_now();
    for (int i = 0; i < count; i++) {
        ar_frame f = {.kind = AR_FRAME_ACT, .step = 0, .mb = 0, .nmb = 1, .rows = 1,
                      .dtype = AR_DT_U8, .ndim = 1, .shape = {(int64_t)size}, .data = bufs[i],
                      .nbytes = size};
        if (ar_link_send(l, &f) != AR_OK)
            break;
    }
    ar_frame ack;
    int ok = ar_link_recv(l, &ack, 120) == AR_OK;
    double dt = ar_now() - t0;
    if (ok)
        ar_frame_free(&ack);
    ar_net_link_finish(l, 10);
    ar_link_destroy(l);
    ar_client_close(c);
    if (srv)
        ar_server_destroy(srv);
    if (pid > 0)
        waitpid(pid, NULL, 0);
    free(bufs);
    return ok && j.received == count ? (double)size * count / dt : -1;
}

/* The receiving process: --serve tcp|tcp-owned|grpc SIZE COUNT */
static int serve(const char *kind, size_t size, int count)
{
    int port;
    if (strcmp(kind, "grpc") == 0) {
        pipe_job j = {.count = count};
        ar_server *srv;
        if (ar_net_init() != AR_OK || ar_server_create("127.0.0.1:0", NULL, &srv, &port) != AR_OK ||
            ar_server_handle(srv, "/arceus.Worker/Pipe", on_pipe, &j) != AR_OK ||
            ar_server_start(srv) != AR_OK)
            return 1;
        printf("%d\n", port);
        fflush(stdout);
        /* the handler acknowledges after the last frame; wait for it */
        double t0 = ar_now();
        while (j.received < count && ar_now() - t0 < 300)
            usleep(1000);
        usleep(50000); /* let the acknowledgement and the status go out */
        ar_server_destroy(srv);
        ar_net_shutdown();
        return 0;
    }
    int ls = tcp_listen(&port);
    if (ls < 0)
        return 1;
    printf("%d\n", port);
    fflush(stdout);
    tcp_job j = {ls, size, count, strcmp(kind, "tcp-owned") == 0};
    tcp_receiver(&j);
    close(ls);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "--serve") == 0)
        return serve(argv[2], (size_t)strtoull(argv[3], NULL, 10), atoi(argv[4]));
    int quick = 0;
    const char *only = NULL; /* --only tcp|grpc SIZE: one measurement, for profiling */
    size_t only_size = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else if (strcmp(argv[i], "--same-process") == 0) {
            two_processes = 0;
        } else if (strcmp(argv[i], "--only") == 0 && i + 2 < argc) {
            only = argv[i + 1];
            only_size = (size_t)strtoull(argv[i + 2], NULL, 0);
            i += 2;
        } else {
            fprintf(stderr, "usage: link_bench [--quick] [--same-process] [--only tcp|grpc BYTES]\n");
            return 2;
        }
    }
    if (ar_net_init() != AR_OK) {
        fprintf(stderr, "link_bench: %s\n", ar_last_error());
        return 1;
    }
    size_t sizes[] = {64 << 10, 1 << 20, 16 << 20};
    long total = quick ? (64L << 20) : (512L << 20); /* bytes per measurement */
    if (only) {
        int count = (int)(total / (long)only_size);
        double r = strcmp(only, "tcp") == 0 ? tcp_rate(only_size, count, 0) : grpc_rate(only_size, count);
        printf("%s %zu bytes: %.2f GB/s\n", only, only_size, r / 1e9);
        ar_net_shutdown();
        return r > 0 ? 0 : 1;
    }
    /* raw TCP: the receiver reads into one reused buffer (the ratio's
     * baseline); raw TCP owned: into a fresh malloc'd buffer per message */
    printf("receivers in %s\n", two_processes ? "a process of their own" : "the sender's process");
    printf("%-8s %12s %12s %12s %7s %7s\n", "size", "raw TCP", "TCP owned", "gRPC link", "ratio",
           "/owned");
    char json[1024] = "";
    int ok = 1;
    for (int i = 0; i < 3; i++) {
        int count = (int)(total / (long)sizes[i]);
        if (count < 8)
            count = 8;
        /* best of 3 for each, interleaved, since the machine is shared */
        double tcp = 0, owned = 0, grpc = 0;
        for (int r = 0; r < 3; r++) {
            double a = tcp_rate(sizes[i], count, 0), o = tcp_rate(sizes[i], count, 1);
            double b = grpc_rate(sizes[i], count);
            tcp = a > tcp ? a : tcp;
            owned = o > owned ? o : owned;
            grpc = b > grpc ? b : grpc;
        }
        if (tcp <= 0 || owned <= 0 || grpc <= 0)
            ok = 0;
        char label[16];
        snprintf(label, sizeof label, sizes[i] >= (1 << 20) ? "%zu MiB" : "%zu KiB",
                 sizes[i] >= (1 << 20) ? sizes[i] >> 20 : sizes[i] >> 10);
        printf("%-8s %7.2f GB/s %7.2f GB/s %7.2f GB/s %6.2fx %6.2fx\n", label, tcp / 1e9, owned / 1e9,
               grpc / 1e9, grpc / tcp, grpc / owned);
        size_t n = strlen(json);
        snprintf(json + n, sizeof json - n,
                 "%s{\"bytes\": %zu, \"tcp\": %.0f, \"tcp_owned\": %.0f, \"grpc\": %.0f, \"ratio\": %.3f, "
                 "\"ratio_owned\": %.3f}",
                 i ? ", " : "", sizes[i], tcp, owned, grpc, grpc / tcp, grpc / owned);
    }
    printf("{\"two_processes\": %d, \"link\": [%s]}\n", two_processes, json);
    ar_net_shutdown();
    return ok ? 0 : 1;
}
