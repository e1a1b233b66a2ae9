/* The gRPC event loop: one completion queue and one thread per process
 * (redis' habit), serving the batches of every call, client or server. */
#include "net/net_internal.h"

#include "core/core.h"

#include <openssl/crypto.h>

#include <limits.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

grpc_completion_queue *ar_net_cq;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_refs;
static pthread_t g_thread;
static atomic_int g_shutting_down;

static void *loop_main(void *arg)
{
    (void)arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(ar_net_cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type == GRPC_OP_COMPLETE && ev.tag)
            ((net_tag *)ev.tag)->cb(ev.tag, ev.success);
        /* the queue is shut down only once every call is gone; the flag lets
         * callbacks know not to start new work meanwhile */
        if (g_shutting_down && ev.type == GRPC_QUEUE_TIMEOUT)
            break;
    }
    return NULL;
}

int ar_net_process_init(void)
{
    if (OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, NULL) != 1)
        return ar_fail(AR_EINTERNAL, "cannot initialise OpenSSL");
    return AR_OK;
}

int ar_net_init(void)
{
    pthread_mutex_lock(&g_mu);
    if (g_refs++ > 0) {
        pthread_mutex_unlock(&g_mu);
        return AR_OK;
    }
    grpc_init();
    g_shutting_down = 0;
    ar_net_cq = grpc_completion_queue_create_for_next(NULL);
    if (!ar_net_cq || pthread_create(&g_thread, NULL, loop_main, NULL) != 0) {
        if (ar_net_cq)
            grpc_completion_queue_destroy(ar_net_cq);
        ar_net_cq = NULL;
        grpc_shutdown_blocking();
        g_refs = 0;
        pthread_mutex_unlock(&g_mu);
        return ar_fail(AR_ENOMEM, "cannot start the network event loop");
    }
    pthread_mutex_unlock(&g_mu);
    return AR_OK;
}

void ar_net_shutdown(void)
{
    pthread_mutex_lock(&g_mu);
    if (g_refs == 0 || --g_refs > 0) {
        pthread_mutex_unlock(&g_mu);
        return;
    }
    g_shutting_down = 1;
    grpc_completion_queue_shutdown(ar_net_cq);
    pthread_join(g_thread, NULL);
    grpc_completion_queue_destroy(ar_net_cq);
    ar_net_cq = NULL;
    grpc_shutdown_blocking();
    pthread_mutex_unlock(&g_mu);
}

int net_loop_closing(void)
{
    return atomic_load(&g_shutting_down);
}

static void waiter_cb(net_tag *t, int ok)
{
    net_waiter *w = (net_waiter *)t;
    pthread_mutex_lock(&w->mu);
    w->done = 1;
    w->ok = ok;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

void net_waiter_init(net_waiter *w)
{
    memset(w, 0, sizeof *w);
    w->base.cb = waiter_cb;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
}

void net_waiter_destroy(net_waiter *w)
{
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
}

int net_waiter_wait(net_waiter *w, grpc_call *call, double timeout_s)
{
    struct timespec deadline;
    if (timeout_s >= 0) {
        clock_gettime(CLOCK_REALTIME, &deadline);
        double t = (double)deadline.tv_sec + deadline.tv_nsec * 1e-9 + timeout_s;
        deadline.tv_sec = (time_t)t;
        deadline.tv_nsec = (long)((t - (double)deadline.tv_sec) * 1e9);
    }
    pthread_mutex_lock(&w->mu);
    while (!w->done) {
        if (timeout_s < 0) {
            pthread_cond_wait(&w->cv, &w->mu);
        } else if (pthread_cond_timedwait(&w->cv, &w->mu, &deadline) != 0 && !w->done) {
            /* too late: cancel, after which the batch completes promptly */
            pthread_mutex_unlock(&w->mu);
            if (call)
                grpc_call_cancel(call, NULL);
            pthread_mutex_lock(&w->mu);
            while (!w->done)
                pthread_cond_wait(&w->cv, &w->mu);
        }
    }
    int ok = w->ok;
    pthread_mutex_unlock(&w->mu);
    return ok;
}

int net_batch(grpc_call *call, const grpc_op *ops, size_t n, double timeout_s)
{
    net_waiter w;
    net_waiter_init(&w);
    grpc_call_error e = grpc_call_start_batch(call, ops, n, &w, NULL);
    int ok = 0;
    if (e == GRPC_CALL_OK)
        ok = net_waiter_wait(&w, call, timeout_s);
    else
        ar_log(AR_LOG_ERROR, "grpc_call_start_batch failed (%d)", (int)e);
    net_waiter_destroy(&w);
    return ok;
}

/* The channel arguments with the largest message received set to max_receive
 * (-1: none). Filled once per process for each of the two uses below. */
static void fill_args(grpc_arg *args, grpc_channel_args *ca, int max_receive)
{
    /* HTTP/2 tuned for a few long streams of large frames, measured with
     * bench/link_bench on loopback (see the commit that set them): a 64 MiB
     * stream window from the start, without the BDP probe (which otherwise
     * keeps resizing the window from 64 KiB and stalls the sender on window
     * updates), the largest DATA frames HTTP/2 allows (fewer frame headers
     * and parser calls per message) and a write buffer that holds a whole
     * large frame. Combined, these roughly double the link's throughput at
     * 64 KiB frames and add 30-50% at 1 and 16 MiB; alone, none of them
     * helps much.
     *
     * Reconnecting: at most 2 s between attempts (gRPC's default grows to
     * 120 s), so that a restarted market or worker is reached again within
     * seconds of coming back (a driver retrying unpaid steps). */
    const struct {
        const char *key;
        int value;
    } kv[NET_NARGS] = {
        {GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, max_receive},
        {GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, -1},
        {GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20},
        {GRPC_ARG_HTTP2_BDP_PROBE, 0},
        {GRPC_ARG_HTTP2_MAX_FRAME_SIZE, (1 << 24) - 1},
        {GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 64 << 20},
        {GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 500},
        {GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000},
    };
    for (int i = 0; i < NET_NARGS; i++) {
        args[i].type = GRPC_ARG_INTEGER;
        args[i].key = (char *)kv[i].key;
        args[i].value.integer = kv[i].value;
    }
    ca->num_args = NET_NARGS;
    ca->args = args;
}

const grpc_channel_args *net_channel_args(void)
{
    /* docs/DESIGN.md, "The chain protocol": a client takes replies of any size (the frames are
     * validated against our own limit instead) */
    static grpc_arg args[NET_NARGS];
    static grpc_channel_args ca;
    fill_args(args, &ca, -1);
    return &ca;
}

void net_server_args(size_t max_message, grpc_resource_quota *quota, grpc_arg *args, grpc_channel_args *ca)
{
    /* a server bounds what one message may make it hold: gRPC refuses a
     * larger message with RESOURCE_EXHAUSTED. gRPC 1.51 checks the size only
     * once the message is whole (a 200 MiB message against a 17 MiB limit
     * still raised a worker's RSS by about 250 MB), so this is a bound on
     * memory per message, not a refusal before reading; what many messages
     * at once may make it hold is the quota's to bound (ar_server_create) */
    int limit = max_message == 0 || max_message > (size_t)INT_MAX ? -1 : (int)max_message;
    fill_args(args, ca, limit);
    if (quota) {
        args[NET_NARGS].type = GRPC_ARG_POINTER;
        args[NET_NARGS].key = (char *)GRPC_ARG_RESOURCE_QUOTA;
        args[NET_NARGS].value.pointer.p = quota;
        args[NET_NARGS].value.pointer.vtable = grpc_resource_quota_arg_vtable();
        ca->num_args = NET_NARGS + 1;
    }
}

gpr_timespec net_deadline(double timeout_s)
{
    if (timeout_s < 0)
        return gpr_inf_future(GPR_CLOCK_REALTIME);
    gpr_timespec now = gpr_now(GPR_CLOCK_REALTIME);
    gpr_timespec d = gpr_time_from_millis((int64_t)(timeout_s * 1000), GPR_TIMESPAN);
    return gpr_time_add(now, d);
}

int net_buffer_flatten(grpc_byte_buffer *bb, void **data, size_t *len)
{
    size_t n = grpc_byte_buffer_length(bb);
    char *buf = malloc(n ? n : 1);
    if (!buf)
        return ar_fail(AR_ENOMEM, "out of memory for a %zu byte message", n);
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb)) {
        free(buf);
        return ar_fail(AR_EPROTO, "unreadable message");
    }
    grpc_slice s;
    size_t at = 0;
    while (grpc_byte_buffer_reader_next(&r, &s)) {
        size_t sl = GRPC_SLICE_LENGTH(s);
        if (at + sl <= n)
            memcpy(buf + at, GRPC_SLICE_START_PTR(s), sl);
        at += sl;
        grpc_slice_unref(s);
    }
    grpc_byte_buffer_reader_destroy(&r);
    *data = buf;
    *len = at <= n ? at : n;
    return AR_OK;
}
