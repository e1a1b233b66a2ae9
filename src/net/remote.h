/* The Worker service (proto/arceus.proto): the worker process's side and the
 * driver's side of the control RPCs, and the stage state as safetensors
 * bytes (what Save and Restore stream). */
#ifndef AR_REMOTE_H
#define AR_REMOTE_H

#include "net/net.h"
#include "train/audit.h"
#include "train/stage.h"
#include "train/plan.h"
#include "train/tp_group.h"

#include <stddef.h>
#include <stdint.h>

/* What one worker's Save/Restore carries: a stage, a tensor-parallel rank,
 * or both (a group's leader holds the unsplit parts and its own share). */
typedef struct {
    ar_stage *stage;  /* NULL: none */
    ar_tp_rank *rank; /* NULL: none */
} ar_state_parts;

/* ---- the worker --------------------------------------------------------- */

typedef struct {
    const char *listen;   /* HOST:PORT; port 0 picks a free one */
    int threads;          /* for stages whose Load does not say (0: all cores) */
    size_t max_frame;     /* bytes; 0: AR_NET_DEFAULT_MAX_FRAME */
    /* A provider's worker (all three set): every Load must carry a lease
     * token that this market confirms (CheckLease) includes provider_id;
     * otherwise UNAUTHENTICATED. Unset (NULL): Load needs no token (local
     * use, tests). The token is the provider's account token. */
    const char *market;       /* HOST:PORT */
    const char *market_token;
    int64_t provider_id;
    /* A provider's worker started before its provider is registered (its
     * address must be known first): every Load is refused (UNAVAILABLE)
     * until ar_worker_require_lease gives it its market and provider id. */
    int provider;
    /* A worker of one's own (no market): every Load must carry this secret
     * (arceus train --worker-token), of AR_WORKER_MIN_TOKEN to 255
     * characters. NULL: Loads need no token. */
    const char *load_token;
    /* Seconds without a Pipe, Save or Restore after which the loaded stage
     * is freed and its session ends (0: AR_WORKER_DEFAULT_IDLE_S). */
    double idle_timeout_s;
    /* Hostile-input limits. max_mem: bytes one stage may take, as Load
     * estimates it (parameters, gradients, optimizer state, activations of
     * the micro-batches in flight, scratch) before allocating; a Load over it
     * is refused (RESOURCE_EXHAUSTED). 0: the free memory (MemAvailable) at
     * the time of the Load. max_pipes: Pipe streams open at once from one
     * client host (0: AR_WORKER_DEFAULT_PIPES). */
    uint64_t max_mem;
    int max_pipes;
    /* A Pipe through which no frame has passed either way for this long, or
     * whose client has left a frame unread this long, is cancelled: longer
     * than any honest gap between frames (a slow stage's step, the driver's
     * checkpoint in between). 0: AR_WORKER_DEFAULT_PIPE_IDLE_S. */
    double pipe_idle_s;
    /* GFLOP/s already measured (ar_device_probe with `threads`), as a
     * provider does for the market; 0: the worker probes at start. */
    double gflops;
} ar_worker_config;

#define AR_WORKER_DEFAULT_PIPES 4
/* A driver keeps one Pipe open for its whole run and reloads every stage
 * after a loss; 10 minutes covers a slow Restore or a recovery's waits for
 * a replacement, and still frees the memory (and ends the session on the
 * weights) of a driver that vanished within minutes. */
#define AR_WORKER_DEFAULT_IDLE_S 600.0
/* Worker secrets shorter than this are refused at start: a guessable one
 * gives a stranger the worker. */
#define AR_WORKER_MIN_TOKEN 16
/* The largest Hello request: three short fields. */
#define AR_WORKER_MAX_HELLO 4096
#define AR_WORKER_DEFAULT_PIPE_IDLE_S 600.0
/* A Restore's first chunk (1 MiB) may take this long to arrive; the other
 * requests are small and get the server's default (net.h). */
#define AR_WORKER_RESTORE_FIRST_S 60.0
/* The largest spec_json a Load may carry: a spec with a full vocabulary is
 * under 2 KiB. */
#define AR_LOAD_MAX_SPEC_BYTES (64u << 10)

typedef struct ar_worker ar_worker;

/* Measure, bind and start serving; *addr gets "HOST:PORT" with the real port. */
int ar_worker_start(const ar_worker_config *c, ar_worker **out, char *addr, size_t addr_size);
/* Cancel every call, free the stage, stop. */
void ar_worker_stop(ar_worker *w);
/* Require leases from now on (a provider learns its id only after it has
 * registered the worker's address): as the config's market fields. */
int ar_worker_require_lease(ar_worker *w, const char *market, const char *market_token,
                            int64_t provider_id);
/* The market's relay (net/relay.h; NULL or "": none): a Load's next stage
 * with a relay pass is dialled through it. */
int ar_worker_set_relay(ar_worker *w, const char *relay);
/* Serve a connection the provider dialled to its relay (ar_server_adopt). */
int ar_worker_adopt(ar_worker *w, int fd);

/* A graceful leave (docs/DESIGN.md, "Recovery"). While leaving is set, the
 * stage's NORM record says so at every step (the driver then saves the
 * stage, moves it to another device and closes its Pipe) and every Load is
 * refused (FAILED_PRECONDITION, naming `why`: at most 127 bytes are kept).
 * Cleared, the worker takes Loads again. */
void ar_worker_set_leaving(ar_worker *w, int leaving, const char *why);
/* Whether a renter is using the stage now: a Pipe runs on it, or a Save or
 * Restore. */
int ar_worker_serving(ar_worker *w);
/* Ends the pipeline running on the stage (its upstream stream is closed)
 * and frees the stage, ending its session: nothing of the renter's stays. */
void ar_worker_drop(ar_worker *w);

/* ---- the driver's side -------------------------------------------------- */

typedef struct {
    unsigned protocol_version;
    char worker[128];
    char capabilities[256]; /* comma-separated */
    double gflops;
    uint64_t free_memory;
    int threads;
} ar_hello_info;

/* Hello; a worker speaking another protocol version is refused with a
 * message naming it. */
int ar_remote_hello(ar_client *c, ar_hello_info *out);
/* Is the worker alive? A Hello that must be answered within timeout_s (the
 * worker answers it on its own thread, even in the middle of a step): a
 * stopped or vanished worker fails it. */
int ar_remote_probe(ar_client *c, double timeout_s);

typedef struct {
    const ar_model_spec *spec;
    int first, last;         /* units [first, last) */
    int rows, micro_batches; /* micro-batch rows, micro-batches per step */
    int schedule;
    int index, count;
    uint64_t seed;
    ar_optim_config optim;
    const char *next_worker; /* NULL or "" for the last stage */
    int threads;
    /* the Load's authorization (LoadRequest.ticket): a leased provider's
     * ticket, or a worker's own --token secret; NULL or "": none */
    const char *ticket;
    /* tensor parallelism: role AR_LOAD_LEADER sends every member's share of
     * the layout (addresses[k]: member k's worker; member 0 is the leader
     * itself), AR_LOAD_RANK sends member `member`'s share */
    int role;
    const ar_tp_layout *layout;
    int member;
    const char *addresses[AR_PLAN_MAX_GROUP];
    /* sessions the stage's Pipes present: next_worker's stage's (NULL or ""
     * when none), and a leader's members' (sessions[k] for member k >= 1) */
    const char *next_session;
    const char *sessions[AR_PLAN_MAX_GROUP];
    /* slow links (LoadRequest.extra_warmup, compress_*): enum ar_compress
     * codecs, never AUTO */
    int extra_warmup;
    int compress_up, compress_down, compress_tp;
    int commit_digests; /* the stage commits digests of every step (pipeline.h) */
    /* next_worker through the relay with this pass (NULL or "": dialled
     * directly); next_reverse: have it dial this stage back instead */
    const char *next_relay_pass;
    int next_reverse;
} ar_load_args;

enum { AR_LOAD_STAGE = 0, AR_LOAD_LEADER = 1, AR_LOAD_RANK = 2 };

/* *params: the floats the worker holds (NULL: not wanted); session gets the
 * stage's session secret, which its Save, Restore and Pipe need. */
int ar_remote_load(ar_client *c, const ar_load_args *a, uint64_t *params, char session[AR_SESSION_HEX + 1]);
/* Fetch the worker's state into local parts of the same shape (a stage of
 * the same range; for a tensor-parallel leader, also its own rank's shards;
 * for a rank, its shards alone). */
int ar_remote_save(ar_client *c, const char *session, const ar_state_parts *shadow);
/* Push local parts' state (weights, moments, step) to the worker. */
int ar_remote_restore(ar_client *c, const char *session, const ar_state_parts *shadow);
/* Fetch what the stage needs to replay step `step` (the Audit RPC): at most
 * max_bytes arrive (more is refused as it comes), decoded and checked as
 * ar_audit_material_decode does (param_floats, max_mb, max_rows). */
int ar_remote_audit(ar_client *c, const char *session, int64_t step, size_t max_bytes, long param_floats,
                    int max_mb, int max_rows, ar_audit_material *out);

/* ---- stage state -------------------------------------------------------- */

/* NAME, m.NAME, v.NAME for every parameter (a shard's slices keep the whole
 * tensor's name: a leader's and its rank's names never meet), the tied
 * copy's values, metadata "opt_step". *buf is malloc'd. Decoding checks
 * every tensor's shape before it writes any. */
int ar_state_encode(const ar_state_parts *parts, void **buf, size_t *len);
int ar_state_decode(const ar_state_parts *parts, const void *buf, size_t len, const char *origin);

#endif
