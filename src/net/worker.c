/* The worker: one process serving one pipeline stage over gRPC
 * (proto/arceus.proto). Hello says who it is; Load builds the stage; Pipe
 * serves the stage's frames (ar_stage_serve, upstream = the incoming stream,
 * downstream = a Pipe to the next worker); Save/Restore stream its state. */
#include "net/remote.h"

#include "arceus.pb-c.h"
#include "core/blas.h"
#include "core/core.h"
#include "net/market.h"
#include "net/net_internal.h"
#include "train/pipeline.h"
#include "train/schedule.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct ar_worker {
    ar_server *server;
    char name[160];
    int threads;
    size_t max_frame;
    double gflops;
    pthread_mutex_t mu;
    pthread_cond_t idle; /* signalled when a Pipe ends */
    int loaded;
    int pipe_active;
    ar_link *pipe_up; /* the running Pipe's upstream (belongs to its rpc); NULL when none */
    ar_stage *stage; /* on the heap: a stage holds pointers into itself */
    int schedule, index, count, load_threads;
    uint64_t seed;
    ar_client *next;
    /* leases required (ar_worker_require_lease): guarded by mu */
    ar_client *market;
    char market_token[AR_TOKEN_LEN];
    int64_t provider_id;
    char load_token[256]; /* a standalone worker's secret; "" when none */
    /* clients replaced by a later ar_worker_require_lease: a Load may still
     * be asking the market through one, so they are closed at stop only */
    ar_client **retired;
    size_t n_retired;
};

/* A Pipe whose client just vanished takes a moment to wind down (its
 * downstream stream is cancelled, the stage returns): a new driver's Load
 * or Pipe waits for that rather than failing. mu held. */
static void wait_pipe_idle(ar_worker *w, double timeout_s)
{
    double end = ar_now() + timeout_s;
    while (w->pipe_active && ar_now() < end) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 50 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&w->idle, &w->mu, &ts);
    }
}

/* A short sgemm probe (~0.2 s): what the planner weighs devices by. */
static double measure_gflops(void)
{
    const int n = 256;
    float *a = ar_calloc((size_t)n * n, sizeof(float)), *b = ar_calloc((size_t)n * n, sizeof(float)),
          *c = ar_calloc((size_t)n * n, sizeof(float));
    if (!a || !b || !c) {
        ar_free(a);
        ar_free(b);
        ar_free(c);
        return 0;
    }
    for (int i = 0; i < n * n; i++) {
        a[i] = (float)(i % 7) * 0.1f;
        b[i] = (float)(i % 5) * 0.1f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
    double t0 = ar_now(), t = 0;
    long reps = 0;
    while ((t = ar_now() - t0) < 0.2) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        reps++;
    }
    ar_free(a);
    ar_free(b);
    ar_free(c);
    return t > 0 ? 2.0 * n * n * (double)n * (double)reps / t / 1e9 : 0;
}

static uint64_t mem_available(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
            break;
    fclose(f);
    return (uint64_t)kb * 1024;
}


static void on_hello(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    void *data;
    size_t len;
    if (ar_rpc_read(rpc, &data, &len) != AR_OK)
        return ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "Hello without a request");
    Arceus__HelloRequest *req = arceus__hello_request__unpack(NULL, len, data);
    free(data);
    if (!req)
        return ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "malformed HelloRequest");
    unsigned v = req->protocol_version;
    arceus__hello_request__free_unpacked(req, NULL);
    if (v != AR_PROTOCOL_VERSION)
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION,
                             "protocol version mismatch: the client speaks version %u, worker %s speaks "
                             "version %d",
                             v, w->name, AR_PROTOCOL_VERSION);
    Arceus__HelloReply r = ARCEUS__HELLO_REPLY__INIT;
    char *caps[] = {"pipeline", "gpt", "mlp"};
    r.protocol_version = AR_PROTOCOL_VERSION;
    r.worker = w->name;
    r.n_capabilities = 3;
    r.capabilities = caps;
    r.gflops = w->gflops;
    r.free_memory = mem_available();
    r.threads = (uint32_t)w->threads;
    net_rpc_reply(rpc, &r.base);
}

/* A provider's worker serves leases only: the Load's lease token must be
 * live and include this provider (the market says). 0, or -1 with the
 * status sent. */
static int check_lease(ar_worker *w, ar_rpc *rpc, const char *lease_token)
{
    pthread_mutex_lock(&w->mu);
    ar_client *market = w->market;
    char token[AR_TOKEN_LEN];
    memcpy(token, w->market_token, sizeof token);
    int64_t provider = w->provider_id;
    pthread_mutex_unlock(&w->mu);
    if (!market) {
        if (!w->load_token[0])
            return 0;
        /* a standalone worker with a secret: compare in constant time */
        size_t n = strlen(w->load_token), m = lease_token ? strlen(lease_token) : 0;
        unsigned diff = (unsigned)(n ^ m);
        for (size_t i = 0; i < n; i++)
            diff |= (unsigned char)w->load_token[i] ^ (unsigned char)(i < m ? lease_token[i] : 0);
        if (diff == 0)
            return 0;
        ar_log(AR_LOG_WARN, "%s: Load with a wrong or missing token from %s: refused", w->name,
               ar_rpc_peer(rpc));
        ar_rpc_finish(rpc, AR_STATUS_UNAUTHENTICATED,
                      "worker %s needs its token: arceus train --worker-token T", w->name);
        return -1;
    }
    if (!lease_token || !lease_token[0]) {
        ar_log(AR_LOG_WARN, "%s: Load without a lease token from %s: refused", w->name, ar_rpc_peer(rpc));
        ar_rpc_finish(rpc, AR_STATUS_UNAUTHENTICATED,
                      "worker %s serves market leases only: Load needs the lease token "
                      "(arceus train --market HOST:PORT --token T)", w->name);
        return -1;
    }
    int status = 0;
    int64_t job = 0;
    if (ar_market_check_lease(market, token, lease_token, provider, &job, &status) != AR_OK) {
        ar_log(AR_LOG_WARN, "%s: lease refused: %s", w->name, ar_last_error());
        ar_rpc_finish(rpc, status == AR_STATUS_PERMISSION_DENIED || status == AR_STATUS_UNAUTHENTICATED
                               ? AR_STATUS_UNAUTHENTICATED
                               : AR_STATUS_UNAVAILABLE,
                      "lease not accepted by worker %s: %s", w->name, ar_last_error());
        return -1;
    }
    ar_log(AR_LOG_INFO, "%s: lease of job %lld accepted", w->name, (long long)job);
    return 0;
}

static void on_load(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    void *data;
    size_t len;
    if (ar_rpc_read(rpc, &data, &len) != AR_OK)
        return ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "Load without a request");
    Arceus__LoadRequest *req = arceus__load_request__unpack(NULL, len, data);
    free(data);
    if (!req)
        return ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "malformed LoadRequest");
    if (check_lease(w, rpc, req->lease_token) != 0) {
        arceus__load_request__free_unpacked(req, NULL);
        return;
    }
    ar_model_spec spec;
    int code = AR_STATUS_INVALID_ARGUMENT;
    char msg[700] = "";
    int units = 0;
    ar_stage *st = calloc(1, sizeof *st);
    int created = 0;
    if (!st) {
        arceus__load_request__free_unpacked(req, NULL);
        return ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory");
    }
    if (ar_spec_parse(req->spec_json, strlen(req->spec_json), "Load spec_json", &spec) != AR_OK ||
        ar_spec_validate(&spec, "Load spec_json") != AR_OK) {
        snprintf(msg, sizeof msg, "%s", ar_last_error());
        goto done;
    }
    units = ar_spec_units(&spec);
    const Arceus__OptimizerConfig *oc = req->optimizer;
    if (req->first_unit >= req->last_unit || req->last_unit > (uint32_t)units) {
        snprintf(msg, sizeof msg, "units [%u, %u) out of range: the model has %d", req->first_unit,
                 req->last_unit, units);
        goto done;
    }
    if (req->stage_count < 1 || req->stage_count > 64 || req->stage_index >= req->stage_count ||
        req->micro_batches < 1 || req->micro_batches > 4096 || req->micro_batch_rows < 1 ||
        req->micro_batch_rows > (1u << 20) || req->schedule > AR_SCHED_1F1B ||
        (oc && oc->kind > AR_OPT_SGD) || req->threads > 1024) {
        snprintf(msg, sizeof msg, "Load arguments out of range (stage %u of %u, %u micro-batches of %u "
                 "rows, schedule %u)", req->stage_index, req->stage_count, req->micro_batches,
                 req->micro_batch_rows, req->schedule);
        goto done;
    }
    if ((req->next_worker[0] != '\0') != (req->stage_index + 1 < req->stage_count)) {
        snprintf(msg, sizeof msg, "next_worker must be given for every stage but the last");
        goto done;
    }
    ar_optim_config optim = {0};
    if (oc) {
        optim.kind = (int)oc->kind;
        optim.beta1 = oc->beta1;
        optim.beta2 = oc->beta2;
        optim.eps = oc->eps;
        optim.weight_decay = oc->weight_decay;
    }
    ar_action *acts = calloc((size_t)2 * req->micro_batches, sizeof *acts);
    if (!acts) {
        code = AR_STATUS_INTERNAL;
        snprintf(msg, sizeof msg, "out of memory");
        goto done;
    }
    int slots = ar_schedule_build((int)req->schedule, (int)req->stage_count, (int)req->stage_index,
                                  (int)req->micro_batches, acts);
    free(acts);
    if (ar_stage_create(st, &spec, (int)req->first_unit, (int)req->last_unit,
                        (int)req->micro_batch_rows, slots, req->seed, &optim) != AR_OK) {
        snprintf(msg, sizeof msg, "%s", ar_last_error());
        goto done;
    }
    created = 1;
    ar_client *next = NULL;
    if (req->next_worker[0] && ar_client_open(req->next_worker, &next) != AR_OK) {
        snprintf(msg, sizeof msg, "next_worker %s: %s", req->next_worker, ar_last_error());
        goto done;
    }
    pthread_mutex_lock(&w->mu);
    wait_pipe_idle(w, 2);
    if (w->pipe_active && w->pipe_up) {
        /* the driver (checked above) is rebuilding its pipeline: the one still
         * running here waits on an upstream stage that stopped answering
         * without closing its stream (a stopped process keeps its sockets) */
        ar_log(AR_LOG_WARN, "%s: a new Load ends the pipeline still running here", w->name);
        ar_link_close(w->pipe_up);
        wait_pipe_idle(w, 10);
    }
    if (w->pipe_active) {
        pthread_mutex_unlock(&w->mu);
        ar_client_close(next);
        code = AR_STATUS_FAILED_PRECONDITION;
        snprintf(msg, sizeof msg, "a pipeline is running on this stage; Load again after it ends");
        goto done;
    }
    if (w->loaded) {
        ar_stage_destroy(w->stage);
        free(w->stage);
    }
    ar_client_close(w->next);
    w->stage = st;
    st = NULL;
    created = 0;
    w->loaded = 1;
    w->next = next;
    w->schedule = (int)req->schedule;
    w->index = (int)req->stage_index;
    w->count = (int)req->stage_count;
    w->seed = req->seed;
    w->load_threads = (int)req->threads;
    long params = w->stage->param_floats;
    pthread_mutex_unlock(&w->mu);
    ar_log(AR_LOG_INFO, "%s: loaded stage %u of %u, units %u-%u (%ld parameters)", w->name,
           req->stage_index, req->stage_count, req->first_unit, req->last_unit - 1, params);
    Arceus__LoadReply r = ARCEUS__LOAD_REPLY__INIT;
    r.parameters = (uint64_t)params;
    arceus__load_request__free_unpacked(req, NULL);
    net_rpc_reply(rpc, &r.base);
    return;
done:
    if (created)
        ar_stage_destroy(st);
    free(st);
    arceus__load_request__free_unpacked(req, NULL);
    ar_rpc_finish(rpc, code, "%s", msg);
}

static void on_pipe(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    pthread_mutex_lock(&w->mu);
    if (!w->loaded) {
        pthread_mutex_unlock(&w->mu);
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "stage not loaded (call Load first)");
    }
    wait_pipe_idle(w, 10);
    if (w->pipe_active) {
        pthread_mutex_unlock(&w->mu);
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "a pipeline is already running on this stage");
    }
    w->pipe_active = 1;
    pthread_mutex_unlock(&w->mu);

    char up_name[64], down_name[64];
    snprintf(up_name, sizeof up_name, "%s", w->index == 0 ? "driver" : "previous stage");
    ar_link *up = NULL, *down = NULL;
    int rc = ar_rpc_link(rpc, up_name, w->max_frame, &up);
    if (rc == AR_OK && w->next) {
        snprintf(down_name, sizeof down_name, "stage %d (%.40s)", w->index + 1, ar_client_addr(w->next));
        rc = ar_client_pipe(w->next, down_name, w->max_frame, &down);
    }
    if (rc != AR_OK) {
        ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "%s", ar_last_error());
        goto out;
    }
    pthread_mutex_lock(&w->mu);
    w->pipe_up = up; /* a later Load may end this pipeline (on_load) */
    pthread_mutex_unlock(&w->mu);
    /* the upstream gone, the stage must not wait on its downstream forever */
    ar_net_link_close_also(up, down);
    ar_stage_runner r = {.stage = w->stage,
                         .up = up,
                         .down = down,
                         .schedule = w->schedule,
                         .index = w->index,
                         .count = w->count,
                         .threads = w->load_threads > 0 ? w->load_threads : w->threads,
                         .max_frame_bytes = w->max_frame,
                         .seed = w->seed,
                         .timeout_s = -1};
    rc = ar_stage_serve(&r);
    ar_net_link_close_also(up, NULL);
    if (rc == AR_OK) {
        /* STOP: passed on; let the rest of the chain finish in order */
        if (down && ar_net_link_finish(down, 60) != AR_OK)
            ar_log(AR_LOG_WARN, "%s: %s", w->name, ar_last_error());
        ar_rpc_finish(rpc, AR_STATUS_OK, NULL);
    } else if (ar_net_link_failed(up)) {
        char err[600];
        ar_net_link_error(up, err, sizeof err);
        ar_log(AR_LOG_WARN, "%s: the step in flight is dropped: %s", w->name, err);
        ar_rpc_finish(rpc, AR_STATUS_CANCELLED, "%s", err);
    } else if (down && ar_net_link_failed(down)) {
        /* tell upstream who was lost; ABORTED marks a relayed report */
        char err[600];
        ar_net_link_error(down, err, sizeof err);
        ar_log(AR_LOG_ERROR, "%s: %s", w->name, err);
        ar_rpc_finish(rpc, AR_STATUS_ABORTED, "%s", err);
    } else {
        /* the client closed its side of the stream: a normal end for us */
        ar_log(AR_LOG_INFO, "%s: %s", w->name, ar_last_error());
        ar_rpc_finish(rpc, AR_STATUS_OK, NULL);
    }
out:
    ar_link_destroy(down);
    pthread_mutex_lock(&w->mu);
    w->pipe_active = 0;
    w->pipe_up = NULL;
    pthread_cond_broadcast(&w->idle);
    pthread_mutex_unlock(&w->mu);
}

static void on_save(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    void *data;
    size_t len;
    if (ar_rpc_read(rpc, &data, &len) != AR_OK)
        return ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "Save without a request");
    free(data);
    pthread_mutex_lock(&w->mu);
    if (!w->loaded) {
        pthread_mutex_unlock(&w->mu);
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "stage not loaded (call Load first)");
    }
    void *buf;
    size_t n;
    int rc = ar_stage_state_encode(w->stage, &buf, &n);
    pthread_mutex_unlock(&w->mu);
    if (rc != AR_OK)
        return ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "%s", ar_last_error());
    uint8_t *msg = malloc(AR_NET_CHUNK_BYTES + 16);
    for (size_t at = 0; msg && at < n && rc == AR_OK; at += AR_NET_CHUNK_BYTES) {
        Arceus__Chunk c = ARCEUS__CHUNK__INIT;
        c.data.data = (uint8_t *)buf + at;
        c.data.len = n - at < AR_NET_CHUNK_BYTES ? n - at : AR_NET_CHUNK_BYTES;
        size_t m = arceus__chunk__pack(&c, msg);
        rc = ar_rpc_write(rpc, msg, m);
    }
    free(buf);
    if (!msg)
        return ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory");
    free(msg);
    if (rc == AR_OK)
        ar_rpc_finish(rpc, AR_STATUS_OK, NULL);
}

static void on_restore(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    pthread_mutex_lock(&w->mu);
    int loaded = w->loaded;
    size_t limit = loaded ? (size_t)w->stage->param_floats * 3 * 4 + (64u << 20) : 0;
    if (loaded && w->stage->has_tied_copy)
        limit += (size_t)w->stage->tied_copy.numel * 4;
    pthread_mutex_unlock(&w->mu);
    if (!loaded)
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "stage not loaded (call Load first)");
    uint8_t *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        void *data;
        size_t len;
        int rc = ar_rpc_read(rpc, &data, &len);
        if (rc == AR_ECLOSED && !data)
            break;
        if (rc != AR_OK) {
            free(buf);
            return ar_rpc_finish(rpc, AR_STATUS_CANCELLED, "%s", ar_last_error());
        }
        Arceus__Chunk *c = arceus__chunk__unpack(NULL, len, data);
        free(data);
        if (!c || n + c->data.len > limit) {
            if (c)
                arceus__chunk__free_unpacked(c, NULL);
            free(buf);
            return ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, c ? "Restore stream larger than the stage state" : "malformed Chunk");
        }
        if (n + c->data.len > cap) {
            size_t ncap = cap ? cap * 2 : (1u << 20);
            while (ncap < n + c->data.len)
                ncap *= 2;
            uint8_t *g = realloc(buf, ncap);
            if (!g) {
                arceus__chunk__free_unpacked(c, NULL);
                free(buf);
                return ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory");
            }
            buf = g;
            cap = ncap;
        }
        memcpy(buf + n, c->data.data, c->data.len);
        n += c->data.len;
        arceus__chunk__free_unpacked(c, NULL);
    }
    pthread_mutex_lock(&w->mu);
    int rc = w->loaded ? ar_stage_state_decode(w->stage, buf, n, "Restore")
                       : ar_fail(AR_EINVAL, "stage not loaded");
    pthread_mutex_unlock(&w->mu);
    free(buf);
    if (rc != AR_OK)
        return ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "%s", ar_last_error());
    Arceus__RestoreReply r = ARCEUS__RESTORE_REPLY__INIT;
    r.bytes = n;
    net_rpc_reply(rpc, &r.base);
}

int ar_worker_start(const ar_worker_config *c, ar_worker **out, char *addr, size_t addr_size)
{
    ar_worker *w = calloc(1, sizeof *w);
    if (!w)
        return ar_fail(AR_ENOMEM, "out of memory");
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->idle, NULL);
    w->threads = c->threads > 0 ? c->threads : ar_get_threads();
    w->max_frame = c->max_frame ? c->max_frame : AR_NET_DEFAULT_MAX_FRAME;
    w->gflops = measure_gflops();
    int port = 0;
    int rc = ar_server_create(c->listen, &w->server, &port);
    if (rc != AR_OK) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->idle);
        free(w);
        return rc;
    }
    const char *colon = strrchr(c->listen, ':');
    int hl = colon ? (int)(colon - c->listen) : (int)strlen(c->listen);
    snprintf(w->name, sizeof w->name, "%.*s:%d", hl, c->listen, port);
    if (c->load_token)
        snprintf(w->load_token, sizeof w->load_token, "%s", c->load_token);
    if (c->market && (rc = ar_worker_require_lease(w, c->market, c->market_token, c->provider_id)) != AR_OK) {
        ar_worker_stop(w);
        return rc;
    }
    ar_server_handle(w->server, "/arceus.Worker/Hello", on_hello, w);
    ar_server_handle(w->server, "/arceus.Worker/Load", on_load, w);
    ar_server_handle(w->server, "/arceus.Worker/Pipe", on_pipe, w);
    ar_server_handle(w->server, "/arceus.Worker/Save", on_save, w);
    ar_server_handle(w->server, "/arceus.Worker/Restore", on_restore, w);
    if ((rc = ar_server_start(w->server)) != AR_OK) {
        ar_worker_stop(w);
        return rc;
    }
    snprintf(addr, addr_size, "%s", w->name);
    *out = w;
    return AR_OK;
}

void ar_worker_stop(ar_worker *w)
{
    if (!w)
        return;
    ar_server_destroy(w->server); /* cancels the calls, waits for the handlers */
    if (w->loaded) {
        ar_stage_destroy(w->stage);
        free(w->stage);
    }
    ar_client_close(w->next);
    ar_client_close(w->market);
    for (size_t i = 0; i < w->n_retired; i++)
        ar_client_close(w->retired[i]);
    free(w->retired);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->idle);
    free(w);
}

int ar_worker_require_lease(ar_worker *w, const char *market, const char *market_token,
                            int64_t provider_id)
{
    if (!market || !market[0] || !market_token || strlen(market_token) != AR_TOKEN_LEN - 1 ||
        provider_id <= 0)
        return ar_fail(AR_EINVAL, "a worker requiring leases needs a market address, the provider's "
                       "account token (%d hex characters) and its provider id", AR_TOKEN_LEN - 1);
    ar_client *c;
    int rc = ar_client_open(market, &c);
    if (rc != AR_OK)
        return ar_fail(rc, "market %s: %s", market, ar_last_error());
    pthread_mutex_lock(&w->mu);
    ar_client *old = w->market;
    if (old) {
        /* a Load may be using the old client right now (check_lease): keep it */
        ar_client **r = realloc(w->retired, (w->n_retired + 1) * sizeof *r);
        if (!r) {
            pthread_mutex_unlock(&w->mu);
            ar_client_close(c);
            return ar_fail(AR_ENOMEM, "out of memory");
        }
        w->retired = r;
        w->retired[w->n_retired++] = old;
    }
    w->market = c;
    memcpy(w->market_token, market_token, AR_TOKEN_LEN);
    w->provider_id = provider_id;
    pthread_mutex_unlock(&w->mu);
    return AR_OK;
}
