/* The worker: one process serving one pipeline stage over gRPC
 * (proto/arceus.proto). Hello says who it is; Load builds the stage; Pipe
 * serves the stage's frames (ar_stage_serve, upstream = the incoming stream,
 * downstream = a Pipe to the next worker); Save/Restore stream its state.
 *
 * In a tensor-parallel group (docs/DESIGN.md, "Tensor parallelism") a worker is either the leader,
 * whose stage runs the unsplit parts and computes its own share of heads
 * and hidden units on an in-process rank, or a rank, which serves its shards
 * on the Pipe its leader opens.
 *
 * Sessions: every Load draws a fresh session secret (LoadReply.session) and
 * the stage it built answers only calls that carry it (Save, Restore, Pipe);
 * the previous stage's session is gone with it. A stage with no Pipe open
 * for idle_timeout_s is freed and its session forgotten. */
#include "net/remote.h"

#include "arceus.pb-c.h"
#include "core/core.h"
#include "core/device.h"
#include "net/market.h"
#include "net/net_internal.h"
#include "net/relay.h"
#include "train/audit.h"
#include "train/pipeline.h"
#include "train/plan.h"
#include "train/schedule.h"
#include "train/tp_group.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct ar_worker {
    ar_server *server;
    char name[160];
    int threads;
    size_t max_frame;
    uint64_t max_mem; /* 0: the free memory at each Load */
    double gflops;
    pthread_mutex_t mu;
    pthread_cond_t idle; /* signalled when a Pipe ends */
    int loaded;
    int pipe_active;
    ar_link *pipe_up; /* the running Pipe's upstream (belongs to its rpc); NULL when none */
    ar_stage *stage; /* on the heap: a stage holds pointers into itself; NULL on a rank */
    int schedule, index, count, load_threads;
    /* slow links (the Load's): warm-up beyond the default, and the codecs of
     * what the stage sends up, down and to its group */
    int extra_warmup, compress_up, compress_down, compress_tp;
    /* tensor parallelism: the role Load gave (AR_LOAD_*), the shards served
     * (a rank's, or a leader's own share), and a leader's members: clients
     * of members 1.., and the links its stage's blocks call, open while a
     * Pipe runs ([0] is the in-process link to its own share) */
    int role;
    ar_tp_rank *rank;
    int members;
    ar_client *member_clients[AR_PLAN_MAX_GROUP];
    ar_link *member_links[AR_PLAN_MAX_GROUP];
    uint64_t seed;
    int commit_digests; /* the Load asked for digests of every step */
    /* the stage's last steps for audits (Audit RPC): kept when the Load
     * asked for digests, emptied at every Load (its own lock) */
    ar_audit_keep keep;
    ar_client *next;
    /* leases required (ar_worker_require_lease): guarded by mu */
    ar_client *market;
    char market_token[AR_TOKEN_LEN];
    int64_t provider_id;
    char relay[256]; /* the market's relay, for a relayed next stage (under mu); "" when none */
    char load_token[256]; /* a standalone worker's secret; "" when none */
    /* the loaded stage's session (under mu): "" when none. generation
     * counts Loads and expiries, so a call that checked the session can
     * tell whether the stage it checked against is still the one held */
    char session[AR_SESSION_HEX + 1];
    uint64_t generation;
    char next_session[AR_SESSION_HEX + 1];                       /* next_worker's stage */
    char member_sessions[AR_PLAN_MAX_GROUP][AR_SESSION_HEX + 1]; /* a leader's members */
    /* idle expiry: last_used is when the last Pipe, Save or Restore ended (or
     * the Load); a thread frees a stage idle for idle_timeout_s */
    double idle_timeout_s;
    double last_used;
    int busy; /* Save or Restore calls running on the stage */
    int stopping;
    pthread_cond_t wake;
    pthread_t reaper;
    int reaper_started;
    int provider;         /* a provider's worker: no Load until it has its market */
    /* a graceful leave (ar_worker_set_leaving): read by the stage's runner
     * at every step without the lock; why under mu */
    atomic_int leaving;
    char leave_why[128];
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

static void on_hello(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    Arceus__HelloRequest *req = (Arceus__HelloRequest *)net_rpc_read_request(rpc, &arceus__hello_request__descriptor, 0);
    if (!req)
        return;
    unsigned v = req->protocol_version;
    arceus__hello_request__free_unpacked(req, NULL);
    if (v != AR_PROTOCOL_VERSION)
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION,
                             "protocol version mismatch: the client speaks version %u, worker %s speaks "
                             "version %d",
                             v, w->name, AR_PROTOCOL_VERSION);
    Arceus__HelloReply r = ARCEUS__HELLO_REPLY__INIT;
    /* "relay": dials a next stage through its market's relay (LoadRequest.next_relay_pass) */
    char *caps[] = {"pipeline", "gpt", "mlp", "tensor-parallel", "relay"};
    r.protocol_version = AR_PROTOCOL_VERSION;
    r.worker = w->name;
    r.n_capabilities = 5;
    r.capabilities = caps;
    r.gflops = w->gflops;
    r.free_memory = ar_device_free_memory();
    r.threads = (uint32_t)w->threads;
    net_rpc_reply(rpc, &r.base);
}

int net_session_matches(const char *expected, const char *given)
{
    /* the length is no secret (always AR_SESSION_HEX); the bytes are
     * compared in constant time */
    if (!expected || !given || strlen(expected) != AR_SESSION_HEX || strlen(given) != AR_SESSION_HEX)
        return 0;
    return CRYPTO_memcmp(expected, given, AR_SESSION_HEX) == 0;
}

/* A standalone worker's secret against what a Load carries: both hashed,
 * the digests compared in constant time, so neither the bytes nor the
 * length of the secret show in the time taken. */
static int token_matches(const char *secret, const char *given)
{
    unsigned char a[SHA256_DIGEST_LENGTH], b[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)secret, strlen(secret), a);
    SHA256((const unsigned char *)given, strlen(given), b);
    return CRYPTO_memcmp(a, b, sizeof a) == 0;
}

/* A provider's worker sends a lease's activations only to the lease's
 * members: the Load's next_worker and its tensor-parallel members'
 * addresses must be among those the market gave for the lease (CheckLease),
 * so a Load cannot point the worker at any other address. 0, or -1 with
 * the status sent. */
static int check_peers(ar_worker *w, ar_rpc *rpc, const Arceus__LoadRequest *req, const ar_market_members *mem)
{
    size_t n_tp = req->n_tp_group;
    for (size_t k = 0; k <= n_tp; k++) {
        const char *peer = k == 0 ? req->next_worker : req->tp_group[k - 1] ? req->tp_group[k - 1]->address : "";
        if (!peer[0])
            continue;
        int member = 0;
        for (size_t i = 0; i < mem->n && !member; i++)
            member = strcmp(mem->addresses[i], peer) == 0;
        if (member)
            continue;
        ar_log(AR_LOG_WARN, "%s: Load from %s names %s, not a member of its lease: refused", w->name,
               ar_rpc_peer(rpc), peer);
        ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED,
                      "worker %s: %s %.255s is not a member of the lease: a provider's worker sends to its "
                      "lease's members only", w->name, k == 0 ? "next_worker" : "tensor-parallel member", peer);
        return -1;
    }
    return 0;
}

/* A provider is paid for what the lease's plan gives it: a Load of other
 * units, or of another model, would be work nobody pays for. The spec is
 * compared in its canonical form (ar_spec_to_json), as the market keeps it.
 * 0, or -1 with the status sent. */
static int check_plan(ar_worker *w, ar_rpc *rpc, const Arceus__LoadRequest *req, const ar_market_members *mem)
{
    if (!mem->has_plan)
        return 0;
    const char *why = NULL;
    char digest[AR_TOKEN_LEN] = "";
    ar_model_spec spec;
    char *canon = NULL;
    size_t len = strlen(req->spec_json);
    if ((int)req->first_unit != mem->first_unit || (int)req->last_unit != mem->last_unit)
        why = "its units are not the ones the lease pays this provider for";
    else if ((int)req->micro_batch_rows != mem->mb_rows || (int)req->micro_batches != mem->micro_batches)
        why = "its micro-batches are not the ones the lease was priced for";
    else if (len > AR_MARKET_MAX_SPEC_BYTES || ar_spec_parse(req->spec_json, len, "Load spec_json", &spec) != AR_OK ||
             !(canon = ar_spec_to_json(&spec)) || ar_rules_sha256_hex(canon, digest) != AR_OK ||
             strcmp(digest, mem->spec_sha256) != 0)
        why = "its model is not the one the lease was priced for";
    free(canon);
    if (!why)
        return 0;
    ar_log(AR_LOG_WARN, "%s: Load from %s of units %u-%u: %s: refused", w->name, ar_rpc_peer(rpc),
           req->first_unit, req->last_unit, why);
    ar_rpc_finish(rpc, AR_STATUS_PERMISSION_DENIED,
                  "worker %s: Load of units %u-%u in %u micro-batches of %u rows refused: %s (the lease pays for "
                  "units %d-%d of its model in %d micro-batches of %d rows)",
                  w->name, req->first_unit, req->last_unit, req->micro_batches, req->micro_batch_rows, why,
                  mem->first_unit, mem->last_unit, mem->micro_batches, mem->mb_rows);
    return -1;
}

/* A provider's worker serves leases only: the Load's ticket must be this
 * provider's for a live lease (the market says), and the Load must send
 * only to the lease's members (check_peers). A provider's worker refuses
 * every Load until it knows its market and provider id. 0, or -1 with the
 * status sent. */
static int check_lease(ar_worker *w, ar_rpc *rpc, const Arceus__LoadRequest *req)
{
    const char *ticket = req->ticket;
    pthread_mutex_lock(&w->mu);
    ar_client *market = w->market;
    char token[AR_TOKEN_LEN];
    memcpy(token, w->market_token, sizeof token);
    int64_t provider = w->provider_id;
    pthread_mutex_unlock(&w->mu);
    if (!market && w->provider) {
        ar_log(AR_LOG_WARN, "%s: Load from %s before the provider is registered: refused", w->name,
               ar_rpc_peer(rpc));
        ar_rpc_finish(rpc, AR_STATUS_UNAVAILABLE,
                      "worker %s serves market leases only, and its provider is not registered with its "
                      "market yet: Load again later", w->name);
        return -1;
    }
    if (!market && !w->load_token[0])
        return 0;
    if (ar_rpc_auth_refused(rpc))
        return -1;
    if (!market) {
        if (token_matches(w->load_token, ticket ? ticket : ""))
            return 0;
        ar_rpc_auth_failed(rpc, "with a wrong or missing worker token");
        ar_rpc_finish(rpc, AR_STATUS_UNAUTHENTICATED,
                      "worker %s needs its token: arceus train --worker-token T", w->name);
        return -1;
    }
    if (!ticket || !ticket[0]) {
        ar_rpc_auth_failed(rpc, "without a ticket");
        ar_rpc_finish(rpc, AR_STATUS_UNAUTHENTICATED,
                      "worker %s serves market leases only: Load needs the lease token for this provider, its "
                      "ticket from the market (arceus train --market HOST:PORT --token T)", w->name);
        return -1;
    }
    int status = 0, rc = 0;
    int64_t job = 0;
    ar_market_members *mem = calloc(1, sizeof *mem);
    if (!mem) {
        ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory");
        return -1;
    }
    if (ar_market_check_lease(market, token, ticket, provider, &job, mem, &status) != AR_OK) {
        int refused = status == AR_STATUS_PERMISSION_DENIED || status == AR_STATUS_UNAUTHENTICATED;
        char why[600];
        snprintf(why, sizeof why, "%s", ar_last_error());
        if (refused)
            ar_rpc_auth_failed(rpc, "with a ticket the market refused");
        else
            ar_log(AR_LOG_WARN, "%s: lease not checked: %s", w->name, why);
        ar_rpc_finish(rpc, refused ? AR_STATUS_UNAUTHENTICATED : AR_STATUS_UNAVAILABLE,
                      "lease not accepted by worker %s: %s", w->name, why);
        rc = -1;
    } else if ((rc = check_peers(w, rpc, req, mem)) == 0 && (rc = check_plan(w, rpc, req, mem)) == 0) {
        ar_log(AR_LOG_INFO, "%s: lease of job %lld accepted", w->name, (long long)job);
    }
    free(mem);
    return rc;
}

/* Save, Restore and Pipe: the stage must be loaded and `given` its session.
 * On success *generation is the stage's (see ar_worker) and 0 is returned;
 * otherwise the status is sent and -1 returned. */
static int check_session(ar_worker *w, ar_rpc *rpc, const char *given, uint64_t *generation)
{
    if (ar_rpc_auth_refused(rpc))
        return -1;
    pthread_mutex_lock(&w->mu);
    int loaded = w->loaded;
    int ok = loaded && net_session_matches(w->session, given);
    *generation = w->generation;
    pthread_mutex_unlock(&w->mu);
    if (ok)
        return 0;
    if (!loaded) { /* nothing to guess at: no session is live */
        ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "stage not loaded (call Load first)");
        return -1;
    }
    ar_rpc_auth_failed(rpc, given && given[0] ? "with a wrong session" : "without a session");
    ar_rpc_finish(rpc, AR_STATUS_UNAUTHENTICATED,
                  "worker %s: %s; a stage answers only its Load's session (LoadReply.session)", w->name,
                  given && given[0] ? "not the session of the stage loaded here" : "the call carries no session");
    return -1;
}

/* A fresh session secret: 32 bytes of the CSPRNG, hex. */
static int new_session(char out[AR_SESSION_HEX + 1])
{
    unsigned char raw[AR_SESSION_BYTES];
    if (RAND_bytes(raw, sizeof raw) != 1)
        return ar_fail(AR_EINTERNAL, "no random bytes for a session (OpenSSL RAND_bytes failed)");
    for (int i = 0; i < AR_SESSION_BYTES; i++)
        snprintf(out + 2 * i, 3, "%02x", raw[i]);
    OPENSSL_cleanse(raw, sizeof raw);
    return AR_OK;
}

/* What a Load builds, before it replaces what the worker holds. */
typedef struct {
    int role;
    ar_stage *stage;
    ar_tp_rank *rank;
    int members;
    ar_client *clients[AR_PLAN_MAX_GROUP];
    ar_client *next;
} held;

static void held_free(held *h)
{
    if (h->stage) {
        ar_stage_destroy(h->stage);
        free(h->stage);
    }
    if (h->rank) {
        ar_tp_rank_destroy(h->rank);
        free(h->rank);
    }
    for (int k = 0; k < AR_PLAN_MAX_GROUP; k++)
        ar_client_close(h->clients[k]);
    ar_client_close(h->next);
    memset(h, 0, sizeof *h);
}

/* A tensor-parallel share must lie inside the model: its heads (a GPT's)
 * and its hidden units in every shard (given per shard, or for a GPT once
 * for every block). Fills hidden[nshards] and *heads. */
static int check_share(const Arceus__TpShare *t, int k, const ar_model_spec *spec, int first, int nshards,
                       ar_range *heads, ar_range *hidden)
{
    int gpt = spec->type == AR_MODEL_GPT;
    if (!t)
        return ar_fail(AR_EINVAL, "tensor-parallel share %d is missing", k);
    if (gpt && (t->head_begin >= t->head_end || t->head_end > (uint32_t)spec->n_head))
        return ar_fail(AR_EINVAL, "tensor-parallel share %d: heads [%u, %u) do not fit a model of %d heads", k,
                       t->head_begin, t->head_end, spec->n_head);
    *heads = (ar_range){(int)t->head_begin, (int)t->head_end};
    if (t->n_hidden_bounds != 0 && t->n_hidden_bounds != (size_t)(2 * nshards))
        return ar_fail(AR_EINVAL, "tensor-parallel share %d: %zu hidden bounds for %d shards", k,
                       t->n_hidden_bounds, nshards);
    if (!gpt && t->n_hidden_bounds == 0)
        return ar_fail(AR_EINVAL, "tensor-parallel share %d: an MLP share needs hidden_bounds", k);
    for (int b = 0; b < nshards; b++) {
        uint32_t lo = t->n_hidden_bounds ? t->hidden_bounds[2 * b] : t->hidden_begin;
        uint32_t hi = t->n_hidden_bounds ? t->hidden_bounds[2 * b + 1] : t->hidden_end;
        int units = gpt ? 4 * spec->n_embd : spec->hidden[first + 2 * b];
        if (lo >= hi || hi > (uint32_t)units)
            return ar_fail(AR_EINVAL, "tensor-parallel share %d: hidden units [%u, %u) do not fit shard %d's %d", k,
                           lo, hi, b, units);
        hidden[b] = (ar_range){(int)lo, (int)hi};
    }
    return AR_OK;
}

/* The group of a leader's Load: members' shares tile every head and hidden
 * unit in order (the leader's sum would be wrong otherwise), the first is
 * the leader's own (no address), the others name their workers. */
static int check_group(const Arceus__LoadRequest *req, const ar_model_spec *spec, int first, int nshards)
{
    size_t n = req->n_tp_group;
    int gpt = spec->type == AR_MODEL_GPT;
    if (n < 2 || n > AR_PLAN_MAX_GROUP || (gpt && (int)n > spec->n_head))
        return ar_fail(AR_EINVAL, "a tensor-parallel group of %zu members (2 to %d, at most one per head)", n,
                       AR_PLAN_MAX_GROUP);
    ar_range heads = {0, 0}, prev_heads = {0, 0}, hidden[AR_TP_MAX_SHARDS], prev[AR_TP_MAX_SHARDS] = {{0, 0}};
    for (size_t k = 0; k < n; k++) {
        const Arceus__TpShare *t = req->tp_group[k];
        int rc = check_share(t, (int)k, spec, first, nshards, &heads, hidden);
        if (rc != AR_OK)
            return rc;
        int continues = !gpt || heads.begin == prev_heads.end;
        for (int b = 0; b < nshards; b++)
            continues &= hidden[b].begin == prev[b].end;
        if (!continues)
            return ar_fail(AR_EINVAL, "tensor-parallel share %zu does not continue share %zu's heads and hidden units",
                           k, k ? k - 1 : 0);
        if ((k == 0) != (t->address[0] == '\0'))
            return ar_fail(AR_EINVAL, "tensor-parallel share %zu: %s", k,
                           k == 0 ? "the leader's own share has no address" : "a member's share needs its worker's address");
        prev_heads = heads;
        memcpy(prev, hidden, sizeof prev);
    }
    int covered = !gpt || prev_heads.end == spec->n_head;
    for (int b = 0; b < nshards; b++)
        covered &= prev[b].end == (gpt ? 4 * spec->n_embd : spec->hidden[first + 2 * b]);
    if (!covered)
        return ar_fail(AR_EINVAL, "the tensor-parallel shares do not cover every head and hidden unit");
    return AR_OK;
}

/* Everything a Load asks for, checked before anything is allocated: string
 * lengths, the spec, the unit range, the pipeline arguments, the optimizer
 * settings, the tensor-parallel role, and the memory the stage would take
 * against max_mem (0: not checked; for a tensor-parallel rank or leader the
 * whole stage's figure, an upper bound). Fills spec and *slots. AR_ELIMIT for
 * memory, AR_EINVAL for the rest. Exposed for fuzz/fuzz_load.c. */
int net_load_check(const Arceus__LoadRequest *req, uint64_t max_mem, ar_model_spec *spec, int *slots)
{
    size_t spec_len = strlen(req->spec_json);
    if (spec_len > AR_LOAD_MAX_SPEC_BYTES)
        return ar_fail(AR_EINVAL, "Load spec_json of %zu bytes: the limit is %u", spec_len,
                       AR_LOAD_MAX_SPEC_BYTES);
    if (strlen(req->next_worker) > 255 || strlen(req->ticket) > 255)
        return ar_fail(AR_EINVAL, "Load next_worker or ticket longer than 255 characters");
    if (strlen(req->next_session) > AR_SESSION_HEX)
        return ar_fail(AR_EINVAL, "Load next_session longer than %d characters", AR_SESSION_HEX);
    if (req->next_relay_pass[0] && (!req->next_worker[0] || !ar_relay_pass_wellformed(req->next_relay_pass)))
        return ar_fail(AR_EINVAL, "Load next_relay_pass is not a relay pass, or there is no next_worker");
    for (size_t k = 0; k < req->n_tp_group; k++)
        if (req->tp_group[k] && (strlen(req->tp_group[k]->address) > 255 ||
                                 strlen(req->tp_group[k]->session) > AR_SESSION_HEX))
            return ar_fail(AR_EINVAL, "tensor-parallel share %zu: address longer than 255 characters or "
                           "session longer than %d", k, AR_SESSION_HEX);
    int rc;
    if ((rc = ar_spec_parse(req->spec_json, spec_len, "Load spec_json", spec)) != AR_OK ||
        (rc = ar_spec_validate(spec, "Load spec_json")) != AR_OK)
        return rc;
    int units = ar_spec_units(spec);
    const Arceus__OptimizerConfig *oc = req->optimizer;
    if (req->first_unit >= req->last_unit || req->last_unit > (uint32_t)units)
        return ar_fail(AR_EINVAL, "units [%u, %u) out of range: the model has %d", req->first_unit,
                       req->last_unit, units);
    if (req->stage_count < 1 || req->stage_count > 64 || req->stage_index >= req->stage_count ||
        req->micro_batches < 1 || req->micro_batches > 4096 || req->micro_batch_rows < 1 ||
        req->micro_batch_rows > (1u << 20) || req->schedule > AR_SCHED_1F1B ||
        (oc && oc->kind > AR_OPT_SGD) || req->threads > 1024 || req->extra_warmup > req->micro_batches ||
        req->compress_up > AR_COMPRESS_INT8 || req->compress_down > AR_COMPRESS_INT8 ||
        req->compress_tp > AR_COMPRESS_INT8)
        return ar_fail(AR_EINVAL, "Load arguments out of range (stage %u of %u, %u micro-batches of %u "
                       "rows, schedule %u, %u extra warm-up, compression %u/%u/%u)", req->stage_index,
                       req->stage_count, req->micro_batches, req->micro_batch_rows, req->schedule,
                       req->extra_warmup, req->compress_up, req->compress_down, req->compress_tp);
    if (oc && !(isfinite(oc->beta1) && isfinite(oc->beta2) && isfinite(oc->eps) &&
                isfinite(oc->weight_decay) && oc->beta1 >= 0 && oc->beta1 < 1 && oc->beta2 >= 0 &&
                oc->beta2 < 1 && oc->eps >= 0 && oc->weight_decay >= 0))
        return ar_fail(AR_EINVAL, "Load optimizer settings out of range (beta1 %g, beta2 %g, eps %g, "
                       "weight_decay %g)", oc->beta1, oc->beta2, oc->eps, oc->weight_decay);
    if (req->tp_rank && req->n_tp_group)
        return ar_fail(AR_EINVAL, "a Load is a tensor-parallel rank or a group's leader, not both");
    if (req->tp_rank) {
        /* a rank is not in the chain: its leader is */
        if (req->next_worker[0])
            return ar_fail(AR_EINVAL, "a tensor-parallel rank has no next_worker");
    } else if ((req->next_worker[0] != '\0') != (req->stage_index + 1 < req->stage_count)) {
        return ar_fail(AR_EINVAL, "next_worker must be given for every stage but the last");
    }
    if (req->tp_rank || req->n_tp_group) {
        int fb, nb;
        if ((rc = ar_tp_blocks(spec, (int)req->first_unit, (int)req->last_unit, &fb, &nb)) != AR_OK)
            return rc;
        if (nb > AR_TP_MAX_SHARDS)
            return ar_fail(AR_EINVAL, "%d shards in one tensor-parallel stage (at most %d)", nb,
                           AR_TP_MAX_SHARDS);
        ar_range head, hidden[AR_TP_MAX_SHARDS];
        if ((rc = req->tp_rank ? check_share(req->tp_rank, 0, spec, fb, nb, &head, hidden)
                               : check_group(req, spec, fb, nb)) != AR_OK)
            return rc;
    }
    *slots = ar_plan_slots_ex((int)req->schedule, (int)req->stage_count, (int)req->stage_index,
                              (int)req->micro_batches, (int)req->extra_warmup);
    /* what building the stage would allocate, priced before it does */
    ar_unit_cost *costs = calloc((size_t)units, sizeof *costs);
    if (!costs)
        return ar_fail(AR_ENOMEM, "out of memory");
    if ((rc = ar_plan_unit_costs(spec, (int)req->micro_batch_rows, costs)) != AR_OK) {
        free(costs);
        return rc;
    }
    double need = ar_plan_stage_mem(costs, units, (int)req->first_unit, (int)req->last_unit, *slots);
    free(costs);
    if (max_mem > 0 && need > (double)max_mem)
        return ar_fail(AR_ELIMIT, "Load of units %u-%u with %d micro-batches of %u rows in flight needs "
                       "about %.1f MB; this worker allows %.1f MB (arceus worker --max-mem)",
                       req->first_unit, req->last_unit - 1, *slots, req->micro_batch_rows, need / 1e6,
                       (double)max_mem / 1e6);
    return AR_OK;
}

/* Shards of every GPT block (or MLP pair) of the units, with one share's
 * ranges (a request net_load_check has passed: the share fits). */
static int make_rank(ar_tp_rank **out, const ar_model_spec *spec, const Arceus__LoadRequest *req,
                     const Arceus__TpShare *t, int slots, const ar_optim_config *optim)
{
    int fb, nb, rc;
    if ((rc = ar_tp_blocks(spec, (int)req->first_unit, (int)req->last_unit, &fb, &nb)) != AR_OK)
        return rc;
    ar_range head, heads[AR_TP_MAX_SHARDS], hidden[AR_TP_MAX_SHARDS];
    if ((rc = check_share(t, 0, spec, fb, nb, &head, hidden)) != AR_OK)
        return rc;
    for (int b = 0; b < nb; b++)
        heads[b] = head;
    ar_tp_rank *r = calloc(1, sizeof *r);
    if (!r)
        return ar_fail(AR_ENOMEM, "out of memory");
    if ((rc = ar_tp_rank_create(r, spec, fb, nb, heads, hidden, (int)req->micro_batch_rows, slots, req->seed,
                                optim)) != AR_OK) {
        free(r);
        return rc;
    }
    *out = r;
    return AR_OK;
}

/* Build what the request describes into *h. */
static int build(ar_worker *w, const Arceus__LoadRequest *req, held *h)
{
    ar_model_spec spec;
    int slots = 0;
    int rc = net_load_check(req, w->max_mem ? w->max_mem : ar_device_free_memory(), &spec, &slots);
    if (rc != AR_OK)
        return rc;
    const Arceus__OptimizerConfig *oc = req->optimizer;
    h->role = req->tp_rank ? AR_LOAD_RANK : req->n_tp_group ? AR_LOAD_LEADER : AR_LOAD_STAGE;
    ar_optim_config optim = {0};
    if (oc) {
        optim.kind = (int)oc->kind;
        optim.beta1 = oc->beta1;
        optim.beta2 = oc->beta2;
        optim.eps = oc->eps;
        optim.weight_decay = oc->weight_decay;
    }
    if (h->role == AR_LOAD_RANK)
        return make_rank(&h->rank, &spec, req, req->tp_rank, slots, &optim);
    if (h->role == AR_LOAD_LEADER) {
        if ((rc = make_rank(&h->rank, &spec, req, req->tp_group[0], slots, &optim)) != AR_OK)
            return rc;
        h->members = (int)req->n_tp_group;
        for (int k = 1; k < h->members; k++)
            if ((rc = ar_client_open(req->tp_group[k]->address, &h->clients[k])) != AR_OK)
                return ar_fail(rc, "tensor-parallel member %d (%s): %s", k, req->tp_group[k]->address,
                               ar_last_error());
    }
    if (!(h->stage = calloc(1, sizeof *h->stage)))
        return ar_fail(AR_ENOMEM, "out of memory");
    /* a leader's blocks call the worker's member links, opened by each Pipe */
    if ((rc = ar_stage_create_tp(h->stage, &spec, (int)req->first_unit, (int)req->last_unit,
                                 (int)req->micro_batch_rows, slots, req->seed, &optim,
                                 h->members ? w->member_links : NULL, h->members)) != AR_OK) {
        free(h->stage);
        h->stage = NULL;
        return rc;
    }
    if (req->next_worker[0] && req->next_relay_pass[0]) {
        /* through the relay its market named, never one a Load names */
        char relay[256];
        pthread_mutex_lock(&w->mu);
        memcpy(relay, w->relay, sizeof relay);
        pthread_mutex_unlock(&w->mu);
        if (!relay[0])
            return ar_fail(AR_EINVAL, "worker %s has no relay to reach next_worker %s through (a provider "
                           "whose market runs one has)", w->name, req->next_worker);
        rc = req->next_reverse ? ar_client_open_reversed(req->next_worker, relay, req->next_relay_pass, &h->next)
                               : ar_client_open_relayed(req->next_worker, relay, req->next_relay_pass, &h->next);
        if (rc != AR_OK)
            return ar_fail(rc, "next_worker %s through relay %s: %s", req->next_worker, relay, ar_last_error());
    } else if (req->next_worker[0] && (rc = ar_client_open(req->next_worker, &h->next)) != AR_OK) {
        return ar_fail(rc, "next_worker %s: %s", req->next_worker, ar_last_error());
    }
    return AR_OK;
}

static void on_load(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    Arceus__LoadRequest *req = (Arceus__LoadRequest *)net_rpc_read_request(rpc, &arceus__load_request__descriptor, 0);
    if (!req)
        return;
    if (atomic_load(&w->leaving)) {
        char why[sizeof w->leave_why];
        pthread_mutex_lock(&w->mu);
        memcpy(why, w->leave_why, sizeof why);
        pthread_mutex_unlock(&w->mu);
        arceus__load_request__free_unpacked(req, NULL);
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "worker %s is leaving (%s): it takes no stage",
                             w->name, why);
    }
    if (check_lease(w, rpc, req) != 0) {
        arceus__load_request__free_unpacked(req, NULL);
        return;
    }
    held h = {0};
    char session[AR_SESSION_HEX + 1];
    int rc = new_session(session);
    if (rc == AR_OK)
        rc = build(w, req, &h);
    if (rc != AR_OK) {
        held_free(&h);
        arceus__load_request__free_unpacked(req, NULL);
        return ar_rpc_finish(rpc, rc == AR_ENOMEM || rc == AR_EINTERNAL ? AR_STATUS_INTERNAL
                                  : rc == AR_ELIMIT ? AR_STATUS_RESOURCE_EXHAUSTED
                                                    : AR_STATUS_INVALID_ARGUMENT,
                             "%s", ar_last_error());
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
        held_free(&h);
        arceus__load_request__free_unpacked(req, NULL);
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION,
                             "a pipeline is running on this stage; Load again after it ends");
    }
    /* swap: the worker takes the new parts, the old ones are freed below */
    held old = {.role = w->role, .stage = w->stage, .rank = w->rank, .members = w->members, .next = w->next};
    memcpy(old.clients, w->member_clients, sizeof old.clients);
    w->role = h.role;
    w->stage = h.stage;
    w->rank = h.rank;
    w->members = h.members;
    memcpy(w->member_clients, h.clients, sizeof h.clients);
    w->next = h.next;
    w->loaded = 1;
    /* the previous driver's session ends here: its calls are refused now */
    memcpy(w->session, session, sizeof session);
    w->generation++;
    snprintf(w->next_session, sizeof w->next_session, "%s", req->next_session);
    memset(w->member_sessions, 0, sizeof w->member_sessions);
    for (size_t k = 0; k < req->n_tp_group && k < AR_PLAN_MAX_GROUP; k++)
        snprintf(w->member_sessions[k], sizeof w->member_sessions[k], "%s", req->tp_group[k]->session);
    w->last_used = ar_now();
    pthread_cond_broadcast(&w->wake);
    w->schedule = (int)req->schedule;
    w->index = (int)req->stage_index;
    w->count = (int)req->stage_count;
    w->seed = req->seed;
    w->commit_digests = req->commit_digests;
    /* the old session's steps are not this one's to answer for */
    ar_audit_keep_clear(&w->keep);
    w->load_threads = (int)req->threads;
    w->extra_warmup = (int)req->extra_warmup;
    w->compress_up = (int)req->compress_up;
    w->compress_down = (int)req->compress_down;
    w->compress_tp = (int)req->compress_tp;
    long params = (w->stage ? w->stage->param_floats : 0) + (w->rank ? w->rank->param_floats : 0);
    pthread_mutex_unlock(&w->mu);
    held_free(&old);
    const char *what = h.role == AR_LOAD_RANK ? "tensor-parallel rank of stage" : h.role == AR_LOAD_LEADER ? "leading stage" : "stage";
    ar_log(AR_LOG_INFO, "%s: loaded %s %u of %u, units %u-%u (%ld parameters)", w->name, what,
           req->stage_index, req->stage_count, req->first_unit, req->last_unit - 1, params);
    Arceus__LoadReply r = ARCEUS__LOAD_REPLY__INIT;
    r.parameters = (uint64_t)params;
    r.session = session;
    arceus__load_request__free_unpacked(req, NULL);
    net_rpc_reply(rpc, &r.base);
    OPENSSL_cleanse(session, sizeof session);
}

/* A leader's own share of its group, served on a thread of its own. */
typedef struct {
    ar_tp_rank *rank;
    ar_link *link; /* its end; the stage calls the other (member_links[0]) */
    int threads;
    pthread_t thread;
    int started;
} own_share;

static void set_threads(int threads)
{
#ifdef _OPENMP
    /* the OpenMP thread count is per thread: set it on the serving one */
    if (threads > 0)
        omp_set_num_threads(threads);
#else
    (void)threads;
#endif
}

static void *own_share_main(void *arg)
{
    own_share *o = arg;
    set_threads(o->threads);
    if (ar_tp_rank_serve(o->rank, o->link) != AR_OK)
        ar_log(AR_LOG_WARN, "own tensor-parallel share: %s", ar_last_error());
    return NULL;
}

/* Stop a leader's members: STOP to each, the remote ones finish their
 * streams, the own share's thread ends. */
static void close_members(ar_worker *w, own_share *own)
{
    for (int k = 0; k < w->members; k++) {
        if (!w->member_links[k])
            continue;
        ar_frame stop = {.kind = AR_FRAME_TP};
        stop.scalars[0] = AR_TP_STOP;
        if (ar_link_send(w->member_links[k], &stop) == AR_OK && k > 0 &&
            ar_net_link_finish(w->member_links[k], 10) != AR_OK)
            ar_log(AR_LOG_DEBUG, "%s: %s", w->name, ar_last_error());
    }
    if (own->started) {
        ar_link_close(own->link);
        pthread_join(own->thread, NULL);
        own->started = 0;
    }
    for (int k = 0; k < w->members; k++) {
        ar_link_destroy(w->member_links[k]);
        w->member_links[k] = NULL;
    }
    ar_link_destroy(own->link);
    own->link = NULL;
}

/* A leader's Pipe opens its members: an in-process link to its own share
 * and a Pipe to every other member's worker, with that member's session. */
static int open_members(ar_worker *w, own_share *own, int threads)
{
    int rc = ar_link_local_pair(&w->member_links[0], &own->link, "own share", "leader");
    if (rc != AR_OK)
        return rc;
    own->rank = w->rank;
    own->threads = threads;
    if (pthread_create(&own->thread, NULL, own_share_main, own) != 0)
        return ar_fail(AR_ENOMEM, "cannot start the own share's thread");
    own->started = 1;
    for (int k = 1; k < w->members; k++) {
        /* the name is what a lost member is reported by */
        char name[160];
        snprintf(name, sizeof name, "%.120s", ar_client_addr(w->member_clients[k]));
        if ((rc = ar_client_pipe_session(w->member_clients[k], name, w->max_frame, w->member_sessions[k],
                                         &w->member_links[k])) != AR_OK)
            return ar_fail(rc, "tensor-parallel member %d (%s): %s", k, name, ar_last_error());
        w->member_links[k]->compress = w->compress_tp;
    }
    return AR_OK;
}

/* A rank's Pipe: its leader's operations until STOP or the leader leaves. */
static void serve_rank(ar_worker *w, ar_rpc *rpc, ar_link *up)
{
    up->compress = w->compress_tp; /* its replies to the leader */
    set_threads(w->load_threads > 0 ? w->load_threads : w->threads);
    if (ar_tp_rank_serve(w->rank, up) == AR_OK)
        ar_rpc_finish(rpc, AR_STATUS_OK, NULL);
    else
        ar_rpc_finish(rpc, AR_STATUS_CANCELLED, "%s", ar_last_error());
}

/* A stage's Pipe: frames from upstream through the stage, and on to the
 * next stage's worker over a Pipe of its own. */
static void serve_stage(ar_worker *w, ar_rpc *rpc, ar_link *up)
{
    own_share own = {0};
    int threads = w->load_threads > 0 ? w->load_threads : w->threads;
    char down_name[64];
    ar_link *down = NULL;
    int rc = AR_OK;
    if (w->next) {
        snprintf(down_name, sizeof down_name, "stage %d (%.40s)", w->index + 1, ar_client_addr(w->next));
        rc = ar_client_pipe_session(w->next, down_name, w->max_frame, w->next_session, &down);
        if (rc == AR_OK)
            down->compress = w->compress_down;
    }
    up->compress = w->compress_up;
    if (rc == AR_OK && w->role == AR_LOAD_LEADER)
        rc = open_members(w, &own, threads);
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
                         .threads = threads,
                         .max_frame_bytes = w->max_frame,
                         .seed = w->seed,
                         .timeout_s = -1,
                         .digests = w->commit_digests,
                         /* a tensor-parallel stage cannot be replayed alone */
                         .keep = w->commit_digests && w->role == AR_LOAD_STAGE ? &w->keep : NULL,
                         .leaving = &w->leaving,
                         .extra_warmup = w->extra_warmup};
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
    close_members(w, &own);
    ar_link_destroy(down);
}

/* The stage's session arrives with the first frame: nothing is served, no
 * Pipe opened downstream and no running pipeline waited for until it has
 * been checked. A client that opens a Pipe and sends nothing waits here for
 * at most the idle timeout (its calls are bounded per host by the server). */
static void on_pipe(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    pthread_mutex_lock(&w->mu);
    int loaded = w->loaded;
    const char *up_name = w->role == AR_LOAD_RANK ? "tensor-parallel leader" : w->index == 0 ? "driver"
                                                                                             : "previous stage";
    pthread_mutex_unlock(&w->mu);
    if (!loaded)
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "stage not loaded (call Load first)");
    if (ar_rpc_auth_refused(rpc))
        return;
    ar_link *up = NULL;
    int rc = ar_rpc_link(rpc, up_name, w->max_frame, &up);
    if (rc != AR_OK)
        return ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "%s", ar_last_error());
    char given[AR_SESSION_HEX + 1] = "";
    rc = net_link_first_session(up, given, sizeof given, w->idle_timeout_s);
    if (rc == AR_ECLOSED) /* a malformed first frame has had its answer from the link */
        return ar_rpc_finish(rpc, AR_STATUS_CANCELLED, "%s", ar_last_error());
    uint64_t generation;
    if (check_session(w, rpc, given, &generation) != 0)
        return;
    pthread_mutex_lock(&w->mu);
    wait_pipe_idle(w, 10);
    if (w->pipe_active || !w->loaded || w->generation != generation) {
        int replaced = !w->loaded || w->generation != generation;
        pthread_mutex_unlock(&w->mu);
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "%s",
                             replaced ? "the stage was replaced by a new Load, or freed"
                                      : "a pipeline is already running on this stage");
    }
    w->pipe_active = 1;
    int role = w->role;
    pthread_mutex_unlock(&w->mu);

    if (role == AR_LOAD_RANK)
        serve_rank(w, rpc, up);
    else
        serve_stage(w, rpc, up);
    pthread_mutex_lock(&w->mu);
    w->pipe_active = 0;
    w->pipe_up = NULL;
    w->last_used = ar_now();
    pthread_cond_broadcast(&w->idle);
    pthread_mutex_unlock(&w->mu);
}

/* Save and Restore keep the stage from expiring while they run. */
static void end_use(ar_worker *w)
{
    pthread_mutex_lock(&w->mu);
    w->busy--;
    w->last_used = ar_now();
    pthread_mutex_unlock(&w->mu);
}

/* The end of Save and Audit: n bytes of buf (freed here) as a stream of
 * Chunk messages of AR_NET_CHUNK_BYTES, then the call's status; the stage's
 * use (w->busy, taken by the caller) ends once the bytes are out. */
static void send_chunks(ar_worker *w, ar_rpc *rpc, void *buf, size_t n)
{
    int rc = AR_OK;
    uint8_t *msg = malloc(AR_NET_CHUNK_BYTES + 16);
    for (size_t at = 0; msg && at < n && rc == AR_OK; at += AR_NET_CHUNK_BYTES) {
        Arceus__Chunk c = ARCEUS__CHUNK__INIT;
        c.data.data = (uint8_t *)buf + at;
        c.data.len = n - at < AR_NET_CHUNK_BYTES ? n - at : AR_NET_CHUNK_BYTES;
        rc = ar_rpc_write(rpc, msg, arceus__chunk__pack(&c, msg));
    }
    free(buf);
    end_use(w);
    if (!msg)
        return ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory");
    free(msg);
    if (rc == AR_OK)
        ar_rpc_finish(rpc, AR_STATUS_OK, NULL);
}

static void on_save(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    Arceus__SaveRequest *req = (Arceus__SaveRequest *)net_rpc_read_request(rpc, &arceus__save_request__descriptor, 0);
    if (!req)
        return;
    uint64_t generation;
    int bad = check_session(w, rpc, req->session, &generation);
    arceus__save_request__free_unpacked(req, NULL);
    if (bad)
        return;
    void *buf = NULL;
    size_t n = 0;
    int rc;
    pthread_mutex_lock(&w->mu);
    if (!w->loaded || w->generation != generation) {
        rc = ar_fail(AR_EINVAL, "the stage was replaced by a new Load, or freed");
    } else {
        ar_state_parts parts = {.stage = w->stage, .rank = w->rank};
        rc = ar_state_encode(&parts, &buf, &n);
        w->last_used = ar_now();
    }
    /* a renter is using the stage until its state has gone out */
    if (rc == AR_OK)
        w->busy++;
    pthread_mutex_unlock(&w->mu);
    if (rc == AR_EINVAL)
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "%s", ar_last_error());
    if (rc != AR_OK)
        return ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "%s", ar_last_error());
    send_chunks(w, rpc, buf, n);
}

/* Audit: one of the stage's last steps, for a replay (train/audit.h). The
 * session proves the caller is the driver that loaded the stage; a step no
 * longer (or never) kept is NOT_FOUND. */
static void on_audit(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    Arceus__AuditRequest *req =
        (Arceus__AuditRequest *)net_rpc_read_request(rpc, &arceus__audit_request__descriptor, 0);
    if (!req)
        return;
    uint64_t generation;
    int bad = check_session(w, rpc, req->session, &generation);
    uint64_t step = req->step;
    arceus__audit_request__free_unpacked(req, NULL);
    if (bad)
        return;
    pthread_mutex_lock(&w->mu);
    int digests = w->commit_digests && w->generation == generation;
    if (digests)
        w->busy++;
    pthread_mutex_unlock(&w->mu);
    if (!digests)
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION,
                             "this stage keeps no steps for audits (its Load did not ask for digests)");
    ar_audit_material m;
    int rc = step > (uint64_t)INT64_MAX ? ar_fail(AR_ENOTFOUND, "no step %llu", (unsigned long long)step)
                                        : ar_audit_keep_get(&w->keep, (int64_t)step, &m);
    void *buf = NULL;
    size_t n = 0;
    if (rc == AR_OK) {
        if (!m.has_update)
            rc = ar_fail(AR_ENOTFOUND, "step %llu has not been completed here", (unsigned long long)step);
        else
            rc = ar_audit_material_encode(&m, &buf, &n);
        ar_audit_material_free(&m);
    }
    if (rc != AR_OK) {
        end_use(w);
        return ar_rpc_finish(rpc, rc == AR_ENOTFOUND ? AR_STATUS_NOT_FOUND : AR_STATUS_INTERNAL, "%s", ar_last_error());
    }
    send_chunks(w, rpc, buf, n);
}

/* The encoded state of what the worker holds: values, m and v of every
 * parameter and the tied copy, plus the safetensors header (names and
 * shapes: a few KiB a block; RESTORE_HEADER_BYTES covers the largest spec).
 * A Restore longer than that is refused as it arrives. mu held. */
#define RESTORE_HEADER_BYTES ((size_t)4 << 20)
static size_t restore_limit_locked(const ar_worker *w)
{
    size_t limit = RESTORE_HEADER_BYTES;
    if (w->stage)
        limit += (size_t)w->stage->param_floats * 3 * 4 +
                 (w->stage->has_tied_copy ? (size_t)w->stage->tied_copy.numel * 4 : 0);
    if (w->rank)
        limit += (size_t)w->rank->param_floats * 3 * 4;
    return limit;
}

/* The chunks of a Restore, the first (already read) and the rest, joined
 * into *buf (malloc'd; NULL when empty). 0, or -1 with the status sent and
 * nothing left to free. */
static int read_chunks(ar_rpc *rpc, Arceus__Chunk *first, size_t limit, uint8_t **buf, size_t *n)
{
    size_t cap = 0;
    *buf = NULL;
    *n = 0;
    Arceus__Chunk *c = first;
    for (;;) {
        if (c->data.len > limit - *n) {
            arceus__chunk__free_unpacked(c, NULL);
            ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "Restore stream larger than the stage state");
            goto fail;
        }
        if (*n + c->data.len > cap) {
            size_t ncap = cap ? cap * 2 : (1u << 20);
            while (ncap < *n + c->data.len)
                ncap *= 2;
            uint8_t *g = realloc(*buf, ncap);
            if (!g) {
                arceus__chunk__free_unpacked(c, NULL);
                ar_rpc_finish(rpc, AR_STATUS_INTERNAL, "out of memory");
                goto fail;
            }
            *buf = g;
            cap = ncap;
        }
        if (c->data.len > 0) /* an empty chunk has no data pointer to copy from */
            memcpy(*buf + *n, c->data.data, c->data.len);
        *n += c->data.len;
        arceus__chunk__free_unpacked(c, NULL);
        void *data;
        size_t len;
        int rc = ar_rpc_read(rpc, &data, &len);
        if (rc == AR_ECLOSED && !data)
            return 0;
        if (rc != AR_OK) {
            ar_rpc_finish(rpc, AR_STATUS_CANCELLED, "%s", ar_last_error());
            goto fail;
        }
        c = arceus__chunk__unpack(NULL, len, data);
        free(data);
        if (!c) {
            ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "malformed Chunk");
            goto fail;
        }
    }
fail:
    free(*buf);
    *buf = NULL;
    *n = 0;
    return -1;
}

static void on_restore(ar_rpc *rpc, void *user)
{
    ar_worker *w = user;
    pthread_mutex_lock(&w->mu);
    int loaded = w->loaded;
    pthread_mutex_unlock(&w->mu);
    if (!loaded)
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "stage not loaded (call Load first)");
    /* the first chunk carries the session: nothing is buffered before it
     * has been checked */
    void *data;
    size_t len;
    int rc = ar_rpc_read(rpc, &data, &len);
    if (rc == AR_ECLOSED && !data)
        return ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "Restore without a chunk (the first carries the session)");
    if (rc != AR_OK)
        return ar_rpc_finish(rpc, AR_STATUS_CANCELLED, "%s", ar_last_error());
    Arceus__Chunk *first = arceus__chunk__unpack(NULL, len, data);
    free(data);
    if (!first)
        return ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "malformed Chunk");
    uint64_t generation;
    if (check_session(w, rpc, first->session, &generation) != 0) {
        arceus__chunk__free_unpacked(first, NULL);
        return;
    }
    pthread_mutex_lock(&w->mu);
    size_t limit = restore_limit_locked(w);
    w->busy++;
    pthread_mutex_unlock(&w->mu);
    uint8_t *buf;
    size_t n;
    if (read_chunks(rpc, first, limit, &buf, &n) != 0)
        return end_use(w);
    pthread_mutex_lock(&w->mu);
    ar_state_parts parts = {.stage = w->stage, .rank = w->rank};
    /* the stage checked against must still be the one held */
    int same = w->loaded && w->generation == generation;
    rc = same ? ar_state_decode(&parts, buf, n, "Restore") : AR_OK;
    pthread_mutex_unlock(&w->mu);
    free(buf);
    end_use(w);
    if (!same)
        return ar_rpc_finish(rpc, AR_STATUS_FAILED_PRECONDITION, "the stage was replaced by a new Load, or freed");
    if (rc != AR_OK)
        return ar_rpc_finish(rpc, AR_STATUS_INVALID_ARGUMENT, "%s", ar_last_error());
    Arceus__RestoreReply r = ARCEUS__RESTORE_REPLY__INIT;
    r.bytes = n;
    net_rpc_reply(rpc, &r.base);
}

/* Takes the loaded stage's parts out of the worker into *old (for
 * held_free, outside the lock) and ends its session. mu held. */
static void unload_locked(ar_worker *w, held *old)
{
    *old = (held){.role = w->role, .stage = w->stage, .rank = w->rank, .members = w->members, .next = w->next};
    memcpy(old->clients, w->member_clients, sizeof old->clients);
    w->stage = NULL;
    w->rank = NULL;
    w->next = NULL;
    memset(w->member_clients, 0, sizeof w->member_clients);
    w->members = 0;
    w->loaded = 0;
    w->generation++;
    OPENSSL_cleanse(w->session, sizeof w->session);
    OPENSSL_cleanse(w->next_session, sizeof w->next_session);
    OPENSSL_cleanse(w->member_sessions, sizeof w->member_sessions);
}

/* Frees a stage that has had no Pipe, Save or Restore for idle_timeout_s:
 * a driver that vanished must not pin the memory, and its session (and with
 * it the weights) must not stay reachable forever. */
static void *reaper_main(void *arg)
{
    ar_worker *w = arg;
    pthread_mutex_lock(&w->mu);
    while (!w->stopping) {
        double now = ar_now();
        double idle = now - w->last_used;
        if (w->loaded && !w->pipe_active && w->busy == 0 && idle >= w->idle_timeout_s) {
            held old;
            unload_locked(w, &old);
            pthread_mutex_unlock(&w->mu);
            held_free(&old);
            ar_log(AR_LOG_INFO, "%s: no Pipe for %.0f s: the stage is freed and its session ended", w->name,
                   idle);
            pthread_mutex_lock(&w->mu);
            continue;
        }
        /* wake at the earliest expiry, at least once a second (a Pipe that
         * ends sets last_used without waking us) */
        double wait = w->loaded ? w->idle_timeout_s - idle : 1.0;
        if (wait > 1.0 || wait < 0.05)
            wait = wait < 0.05 ? 0.05 : 1.0;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long ns = ts.tv_nsec + (long)(wait * 1e9);
        ts.tv_sec += ns / 1000000000L;
        ts.tv_nsec = ns % 1000000000L;
        pthread_cond_timedwait(&w->wake, &w->mu, &ts);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* A worker that failed before its server started: only its locks to undo. */
static int free_unstarted(ar_worker *w, int rc)
{
    ar_audit_keep_destroy(&w->keep);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->idle);
    pthread_cond_destroy(&w->wake);
    free(w);
    return rc;
}

int ar_worker_start(const ar_worker_config *c, ar_worker **out, char *addr, size_t addr_size)
{
    if (c->load_token && strlen(c->load_token) < AR_WORKER_MIN_TOKEN)
        return ar_fail(AR_EINVAL, "a worker secret of %zu characters: at least %d, please (a long random "
                       "one, e.g. openssl rand -hex 32)", strlen(c->load_token), AR_WORKER_MIN_TOKEN);
    if (c->load_token && strlen(c->load_token) > 255)
        return ar_fail(AR_EINVAL, "a worker secret of %zu characters: at most 255", strlen(c->load_token));
    ar_worker *w = calloc(1, sizeof *w);
    if (!w)
        return ar_fail(AR_ENOMEM, "out of memory");
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->idle, NULL);
    pthread_cond_init(&w->wake, NULL);
    if (ar_audit_keep_init(&w->keep) != AR_OK) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->idle);
        pthread_cond_destroy(&w->wake);
        free(w);
        return ar_fail(AR_EINTERNAL, "cannot set up the worker's audit record");
    }
    w->idle_timeout_s = c->idle_timeout_s > 0 ? c->idle_timeout_s : AR_WORKER_DEFAULT_IDLE_S;
    w->threads = c->threads > 0 ? c->threads : ar_get_threads();
    w->max_frame = c->max_frame ? c->max_frame : AR_NET_DEFAULT_MAX_FRAME;
    w->max_mem = c->max_mem;
    /* a provider has just probed with these threads: the market and the
     * Hellos then report the same figure */
    w->gflops = c->gflops;
    if (!(w->gflops > 0)) {
        ar_device_info dev;
        int rc = ar_device_probe(w->threads, &dev);
        if (rc != AR_OK)
            return free_unstarted(w, rc);
        w->gflops = dev.gflops;
    }
    int port = 0;
    /* Pipe: a message holds at most one frame of max_frame bytes, or frames
     * coalesced up to 16 MiB (link.c), plus their headers; the largest
     * request of any method, so the server's gRPC limit. The others are
     * limited per method (ar_server_limit_message, below). */
    size_t pipe_max = (w->max_frame > (16u << 20) ? w->max_frame : (16u << 20)) + (1u << 20);
    ar_server_limits limits = {.max_message = pipe_max};
    int rc = ar_server_create(c->listen, &limits, &w->server, &port);
    if (rc != AR_OK)
        return free_unstarted(w, rc);
    const char *colon = strrchr(c->listen, ':');
    int hl = colon ? (int)(colon - c->listen) : (int)strlen(c->listen);
    snprintf(w->name, sizeof w->name, "%.*s:%d", hl, c->listen, port);
    if (c->load_token)
        snprintf(w->load_token, sizeof w->load_token, "%s", c->load_token);
    w->provider = c->provider;
    if (c->market && (rc = ar_worker_require_lease(w, c->market, c->market_token, c->provider_id)) != AR_OK) {
        ar_worker_stop(w);
        return rc;
    }
    ar_server_handle(w->server, "/arceus.Worker/Hello", on_hello, w);
    ar_server_handle(w->server, "/arceus.Worker/Load", on_load, w);
    ar_server_handle(w->server, "/arceus.Worker/Pipe", on_pipe, w);
    ar_server_handle(w->server, "/arceus.Worker/Save", on_save, w);
    ar_server_handle(w->server, "/arceus.Worker/Restore", on_restore, w);
    ar_server_handle(w->server, "/arceus.Worker/Audit", on_audit, w);
    ar_server_limit_method(w->server, "/arceus.Worker/Pipe",
                           c->max_pipes > 0 ? c->max_pipes : AR_WORKER_DEFAULT_PIPES);
    /* What each request may weigh: Hello a few strings; Load the spec (at
     * most AR_LOAD_MAX_SPEC_BYTES) and as much again for the addresses,
     * tokens, sessions and tensor-parallel shares; Save a session; a Restore
     * chunk AR_NET_CHUNK_BYTES of state and its session. */
    ar_server_limit_message(w->server, "/arceus.Worker/Hello", AR_WORKER_MAX_HELLO);
    ar_server_limit_message(w->server, "/arceus.Worker/Load", 2 * (size_t)AR_LOAD_MAX_SPEC_BYTES);
    ar_server_limit_message(w->server, "/arceus.Worker/Save", 1024);
    ar_server_limit_message(w->server, "/arceus.Worker/Audit", 1024);
    ar_server_limit_message(w->server, "/arceus.Worker/Restore", AR_NET_CHUNK_BYTES + 1024);
    ar_server_limit_message(w->server, "/arceus.Worker/Pipe", pipe_max);
    if ((rc = pthread_create(&w->reaper, NULL, reaper_main, w)) != 0) {
        ar_worker_stop(w);
        return ar_fail(AR_ENOMEM, "cannot start the worker's idle-stage thread");
    }
    w->reaper_started = 1;
    /* a Pipe's handler runs before its first frame (a stage opens its
     * downstream Pipe long before it has an activation to send) */
    ar_server_stream_method(w->server, "/arceus.Worker/Pipe",
                            c->pipe_idle_s > 0 ? c->pipe_idle_s : AR_WORKER_DEFAULT_PIPE_IDLE_S);
    ar_server_request_timeout(w->server, "/arceus.Worker/Restore", AR_WORKER_RESTORE_FIRST_S);
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
    if (w->reaper_started) {
        pthread_mutex_lock(&w->mu);
        w->stopping = 1;
        pthread_cond_broadcast(&w->wake);
        pthread_mutex_unlock(&w->mu);
        pthread_join(w->reaper, NULL);
    }
    ar_server_destroy(w->server); /* cancels the calls, waits for the handlers */
    held h = {.stage = w->stage, .rank = w->rank, .next = w->next};
    memcpy(h.clients, w->member_clients, sizeof h.clients);
    held_free(&h);
    ar_client_close(w->market);
    for (size_t i = 0; i < w->n_retired; i++)
        ar_client_close(w->retired[i]);
    free(w->retired);
    ar_audit_keep_destroy(&w->keep);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->idle);
    pthread_cond_destroy(&w->wake);
    OPENSSL_cleanse(w, sizeof *w); /* secrets: the token, the sessions */
    free(w);
}

int ar_worker_adopt(ar_worker *w, int fd)
{
    return ar_server_adopt(w->server, fd);
}

int ar_worker_set_relay(ar_worker *w, const char *relay)
{
    if (relay && strlen(relay) >= sizeof w->relay)
        return ar_fail(AR_EINVAL, "relay address longer than %zu characters", sizeof w->relay - 1);
    pthread_mutex_lock(&w->mu);
    snprintf(w->relay, sizeof w->relay, "%s", relay ? relay : "");
    pthread_mutex_unlock(&w->mu);
    return AR_OK;
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

void ar_worker_set_leaving(ar_worker *w, int leaving, const char *why)
{
    pthread_mutex_lock(&w->mu);
    snprintf(w->leave_why, sizeof w->leave_why, "%s", leaving && why ? why : "");
    atomic_store(&w->leaving, leaving ? 1 : 0);
    pthread_mutex_unlock(&w->mu);
}

int ar_worker_serving(ar_worker *w)
{
    pthread_mutex_lock(&w->mu);
    int serving = w->loaded && (w->pipe_active || w->busy > 0);
    pthread_mutex_unlock(&w->mu);
    return serving;
}

void ar_worker_drop(ar_worker *w)
{
    pthread_mutex_lock(&w->mu);
    if (w->pipe_active && w->pipe_up) {
        /* the stage returns from its step with the link closed, and its
         * Pipe's handler ends (on_pipe) */
        ar_link_close(w->pipe_up);
        wait_pipe_idle(w, 10);
    }
    held old = {0};
    int freed = w->loaded && !w->pipe_active && w->busy == 0;
    if (freed)
        unload_locked(w, &old);
    pthread_mutex_unlock(&w->mu);
    if (freed) {
        held_free(&old);
        ar_log(AR_LOG_INFO, "%s: the stage is freed and its session ended", w->name);
    }
}
