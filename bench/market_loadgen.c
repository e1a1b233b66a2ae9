/* The clients of bench/market_load.py: simulated providers heartbeating and
 * renters reporting steps against one market, from one thread and one gRPC
 * completion queue, so that the bench measures the market and not a Python
 * event loop sharing the market's two cores (the asyncio clients this
 * replaces used half a core at 1,400 calls/s, and their own scheduling
 * delays were counted as the market's latency).
 *
 * market_load.py sets the market up (accounts, providers, leases) and runs
 * this with the clients on stdin, one a line:
 *     H TOKEN PROVIDER_ID                a provider: a Heartbeat every 5 s
 *     R LEASE_TOKEN PROVIDER_ID STEP     a renter: ReportUsage of STEP, STEP+1, ...
 *                                        every 0.1 s, one stage on PROVIDER_ID
 * A provider waits for its call before it sleeps to its next beat; a renter
 * reports its next step when it is due, or at once when it is behind (the
 * driver's reporter does the same), and reports a failed step again. Each
 * client's first call comes at a random moment within its period.
 *
 * The clients are spread over --sources connections, each from a loopback
 * address of its own (127.N.y.z, N = --source-net): the socket is bound
 * before it connects and handed to gRPC (grpc_channel_create_from_fd), so
 * the market sees that many client hosts, as it would see many machines.
 *
 * Prints one JSON object: per RPC kind the calls due in the window
 * (offered), made and answered OK, their latency p50/p99/max (from starting
 * the call to its status), errors and the first one, how late calls started
 * against their schedule (the generator's own lag, which should stay near
 * zero), this process's CPU time, and each renter's next step in input order
 * (what the market must have paid).
 *
 * usage: market_loadgen --target HOST:PORT [--seconds 60] [--sources 64] [--source-net 30] < clients */
#include "arceus.pb-c.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_posix.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { HEARTBEAT, REPORT, NKINDS };
static const char *const kind_name[NKINDS] = {"Heartbeat", "ReportUsage"};
static const double period_s[NKINDS] = {5.0, 0.1};
#define CALL_TIMEOUT_S 30.0

typedef struct {
    double *xs;
    size_t n, cap;
} series;

typedef struct client {
    int kind;
    char token[80];
    int64_t provider_id;
    int64_t step; /* a renter's next step */
    double next;  /* when its next call is due */
    int channel;
    size_t heap_at;
    /* the call in flight */
    grpc_call *call;
    grpc_byte_buffer *request, *reply;
    grpc_metadata_array initial_md, trailing_md;
    grpc_status_code status;
    grpc_slice details;
    double started;
} client;

static struct {
    series latency[NKINDS], lag[NKINDS];
    long offered[NKINDS], calls[NKINDS], errors[NKINDS];
    char first_error[NKINDS][300];
} stats;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *fmt, const char *arg)
{
    fprintf(stderr, "market_loadgen: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n");
    exit(1);
}

static void push(series *s, double x)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 4096;
        s->xs = realloc(s->xs, s->cap * sizeof *s->xs);
        if (!s->xs)
            die("out of memory%s", "");
    }
    s->xs[s->n++] = x;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The q-quantile as market_load.py computed it before: xs[int(q * n)]. */
static double quantile(series *s, double q)
{
    if (s->n == 0)
        return -1;
    size_t i = (size_t)(q * (double)s->n);
    return s->xs[i < s->n ? i : s->n - 1];
}

/* ---- the schedule: a binary heap of clients by their next call -------- */

static client **heap;
static size_t heap_n;

static void heap_swap(size_t a, size_t b)
{
    client *t = heap[a];
    heap[a] = heap[b];
    heap[b] = t;
    heap[a]->heap_at = a;
    heap[b]->heap_at = b;
}

static void heap_push(client *c)
{
    size_t i = heap_n++;
    heap[i] = c;
    c->heap_at = i;
    while (i > 0 && heap[(i - 1) / 2]->next > heap[i]->next) {
        heap_swap(i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}

static client *heap_pop(void)
{
    client *top = heap[0];
    heap[0] = heap[--heap_n];
    heap[0]->heap_at = 0;
    for (size_t i = 0;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < heap_n && heap[l]->next < heap[m]->next)
            m = l;
        if (r < heap_n && heap[r]->next < heap[m]->next)
            m = r;
        if (m == i)
            break;
        heap_swap(i, m);
        i = m;
    }
    return top;
}

/* ---- connections -------------------------------------------------------- */

/* A channel over a socket connected to target from 127.net.y.z. */
static grpc_channel *connect_from(const char *target, int net, int i)
{
    char host[256];
    snprintf(host, sizeof host, "%s", target);
    char *colon = strrchr(host, ':');
    if (!colon)
        die("--target %s is not HOST:PORT", target);
    *colon = '\0';
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &to.sin_addr) != 1)
        die("--target %s: the host must be an IPv4 address", target);
    char src[32];
    snprintf(src, sizeof src, "127.%d.%d.%d", net, 1 + i / 250, 1 + i % 250);
    struct sockaddr_in from = {.sin_family = AF_INET};
    inet_pton(AF_INET, src, &from.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&from, sizeof from) != 0 ||
        connect(fd, (struct sockaddr *)&to, sizeof to) != 0)
        die("cannot connect from %s", src);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create_from_fd(target, fd, creds, NULL);
    grpc_channel_credentials_release(creds);
    if (!ch)
        die("no channel from %s", src);
    return ch;
}

/* ---- calls --------------------------------------------------------------- */

static grpc_channel **channels;
static void *registered[NKINDS * 1024]; /* per channel and kind */
static grpc_completion_queue *cq;
static int inflight;

static grpc_byte_buffer *request_of(client *c)
{
    size_t n;
    uint8_t buf[512];
    if (c->kind == HEARTBEAT) {
        Arceus__HeartbeatRequest r = ARCEUS__HEARTBEAT_REQUEST__INIT;
        r.token = c->token;
        r.provider_id = c->provider_id;
        n = arceus__heartbeat_request__pack(&r, buf);
    } else {
        Arceus__StageUsage u = ARCEUS__STAGE_USAGE__INIT;
        u.stage = 0;
        u.provider_id = c->provider_id;
        u.flops = 0; /* the lease's plan fixes them */
        Arceus__StageUsage *us[1] = {&u};
        Arceus__ReportUsageRequest r = ARCEUS__REPORT_USAGE_REQUEST__INIT;
        r.lease_token = c->token;
        r.step = c->step;
        r.n_stages = 1;
        r.stages = us;
        n = arceus__report_usage_request__pack(&r, buf);
    }
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)buf, n);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

static void start_call(client *c, double now)
{
    push(&stats.lag[c->kind], now - c->next);
    gpr_timespec deadline =
        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis((int64_t)(CALL_TIMEOUT_S * 1000), GPR_TIMESPAN));
    c->call = grpc_channel_create_registered_call(channels[c->channel], NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                                  registered[c->channel * NKINDS + c->kind], deadline, NULL);
    c->request = request_of(c);
    c->reply = NULL;
    grpc_metadata_array_init(&c->initial_md);
    grpc_metadata_array_init(&c->trailing_md);
    c->details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = c->request;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &c->initial_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &c->reply;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.status = &c->status;
    ops[5].data.recv_status_on_client.status_details = &c->details;
    ops[5].data.recv_status_on_client.trailing_metadata = &c->trailing_md;
    c->started = now_s();
    if (grpc_call_start_batch(c->call, ops, 6, c, NULL) != GRPC_CALL_OK)
        die("grpc_call_start_batch failed%s", "");
    inflight++;
}

/* The call completed: count it and schedule the client's next one. */
static void end_call(client *c, int ok)
{
    double t = now_s();
    inflight--;
    if (ok && c->status == GRPC_STATUS_OK && c->reply) {
        stats.calls[c->kind]++;
        push(&stats.latency[c->kind], t - c->started);
        if (c->kind == REPORT)
            c->step++;
    } else {
        if (stats.errors[c->kind]++ == 0) {
            char *d = grpc_slice_to_c_string(c->details);
            snprintf(stats.first_error[c->kind], sizeof stats.first_error[0], "status %d: %s", (int)c->status,
                     d);
            gpr_free(d);
        }
    }
    if (c->reply)
        grpc_byte_buffer_destroy(c->reply);
    grpc_byte_buffer_destroy(c->request);
    grpc_slice_unref(c->details);
    grpc_metadata_array_destroy(&c->initial_md);
    grpc_metadata_array_destroy(&c->trailing_md);
    grpc_call_unref(c->call);
    c->call = NULL;
    /* a provider sleeps to its next beat after the call; a renter's next
     * step is due a period after the last one was due, at once if late */
    c->next += period_s[c->kind];
    if (c->kind == HEARTBEAT && c->next < t)
        c->next = t;
    heap_push(c);
}

/* ---- JSON out ------------------------------------------------------------ */

static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

int main(int argc, char **argv)
{
    const char *target = NULL;
    double seconds = 60;
    int sources = 64, net = 30;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--target") && i + 1 < argc)
            target = argv[++i];
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--sources") && i + 1 < argc)
            sources = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--source-net") && i + 1 < argc)
            net = atoi(argv[++i]);
        else
            die("usage: market_loadgen --target HOST:PORT [--seconds S] [--sources N] [--source-net N] "
                "< clients%s", "");
    }
    if (!target || seconds <= 0 || sources < 1 || sources > 1024 || net < 1 || net > 254)
        die("--target is needed; --seconds > 0, --sources 1..1024, --source-net 1..254%s", "");

    /* the clients */
    size_t n = 0, cap = 0;
    client *cs = NULL;
    char line[512], kind;
    while (fgets(line, sizeof line, stdin)) {
        if (n == cap) {
            cap = cap ? 2 * cap : 1024;
            cs = realloc(cs, cap * sizeof *cs);
            if (!cs)
                die("out of memory%s", "");
        }
        client *c = &cs[n];
        memset(c, 0, sizeof *c);
        long long pid = 0, step = 0;
        if (sscanf(line, " %c %79s %lld %lld", &kind, c->token, &pid, &step) < 3 || (kind != 'H' && kind != 'R'))
            die("bad client line: %s", line);
        c->kind = kind == 'H' ? HEARTBEAT : REPORT;
        c->provider_id = pid;
        c->step = step;
        c->channel = (int)(n % (size_t)sources);
        n++;
    }
    heap = calloc(n ? n : 1, sizeof *heap);
    if (!heap)
        die("out of memory%s", "");

    grpc_init();
    cq = grpc_completion_queue_create_for_next(NULL);
    channels = calloc((size_t)sources, sizeof *channels);
    for (int i = 0; i < sources; i++) {
        channels[i] = connect_from(target, net, i);
        registered[i * NKINDS + HEARTBEAT] =
            grpc_channel_register_call(channels[i], "/arceus.Market/Heartbeat", NULL, NULL);
        registered[i * NKINDS + REPORT] =
            grpc_channel_register_call(channels[i], "/arceus.Market/ReportUsage", NULL, NULL);
    }

    double start = now_s(), end = start + seconds, cpu0 = cpu_s();
    unsigned seed = (unsigned)getpid();
    for (size_t i = 0; i < n; i++) {
        client *c = &cs[i];
        c->next = start + period_s[c->kind] * ((double)rand_r(&seed) / ((double)RAND_MAX + 1));
        /* the calls due in the window: its slots before the end */
        stats.offered[c->kind] += 1 + (long)((end - c->next) / period_s[c->kind]);
        heap_push(c);
    }
    /* A call due before the end is still made when the loop wakes a little
     * after it (END_GRACE_S), so that the count of calls offered holds; a
     * market that has fallen further behind than that leaves calls unmade. */
    const double END_GRACE_S = 0.25;
    for (;;) {
        double t = now_s();
        while (heap_n > 0 && heap[0]->next <= t && heap[0]->next < end && t < end + END_GRACE_S)
            start_call(heap_pop(), t);
        int more = heap_n > 0 && heap[0]->next < end && t < end + END_GRACE_S;
        if (!more && inflight == 0)
            break;
        double until = more ? heap[0]->next : t + 1.0;
        gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                       gpr_time_from_micros((int64_t)((until - t) * 1e6) + 1, GPR_TIMESPAN));
        grpc_event ev = grpc_completion_queue_next(cq, dl, NULL);
        if (ev.type == GRPC_OP_COMPLETE)
            end_call(ev.tag, ev.success);
    }
    double elapsed = now_s() - start, cpu = cpu_s() - cpu0;

    printf("{\"seconds\": %.3f, \"elapsed\": %.3f, \"cpu_s\": %.3f, \"kinds\": [", seconds, elapsed, cpu);
    for (int k = 0; k < NKINDS; k++) {
        series *l = &stats.latency[k], *g = &stats.lag[k];
        qsort(l->xs, l->n, sizeof *l->xs, cmp_double);
        qsort(g->xs, g->n, sizeof *g->xs, cmp_double);
        printf("%s{\"rpc\": \"%s\", \"offered\": %ld, \"calls\": %ld, \"errors\": %ld, \"p50_ms\": %.3f, "
               "\"p99_ms\": %.3f, \"max_ms\": %.3f, \"lag_p99_ms\": %.3f, \"lag_max_ms\": %.3f, \"first_error\": ",
               k ? ", " : "", kind_name[k], stats.offered[k], stats.calls[k], stats.errors[k],
               quantile(l, 0.5) * 1e3, quantile(l, 0.99) * 1e3, l->n ? l->xs[l->n - 1] * 1e3 : -1,
               quantile(g, 0.99) * 1e3, g->n ? g->xs[g->n - 1] * 1e3 : -1);
        json_string(stats.first_error[k]);
        printf("}");
    }
    printf("], \"steps\": [");
    int first = 1;
    for (size_t i = 0; i < n; i++)
        if (cs[i].kind == REPORT) {
            printf("%s%lld", first ? "" : ", ", (long long)cs[i].step);
            first = 0;
        }
    printf("]}\n");

    for (int i = 0; i < sources; i++)
        grpc_channel_destroy(channels[i]);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type != GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    grpc_shutdown();
    free(channels);
    free(heap);
    free(cs);
    for (int k = 0; k < NKINDS; k++) {
        free(stats.latency[k].xs);
        free(stats.lag[k].xs);
    }
    return 0;
}
