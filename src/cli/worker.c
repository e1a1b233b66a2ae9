/* arceus worker: serve one pipeline stage over gRPC. */
#include "cli/cli.h"
#include "core/core.h"
#include "net/market.h"
#include "net/remote.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *listen, *market, *token;
    int threads, max_frame_mb, max_pipes, idle_timeout_s, pipe_idle_s;
    float grace;
    int64_t max_mem; /* 0: the free memory at the time of the Load */
    long provider_id;
    ar_cli_tls tls;
} worker_opts;

#define AT(member) AR_OPTION_AT(worker_opts, member)

static const ar_option worker_options[] = {
    {.name = "listen", .kind = AR_OPTION_HOSTPORT, AT(listen), .metavar = "HOST:PORT", .required = 1,
     .hint = "for example 127.0.0.1:5001", .help = "address to listen on, e.g. 127.0.0.1:5001"},
    {.name = "threads", .kind = AR_OPTION_INT, AT(threads), .lo = 0, .hi = 1024, .metavar = "N", .def = "0",
     .help = "threads for the stage, 0 = all cores"},
    {.name = "max-frame-mb", .kind = AR_OPTION_INT, AT(max_frame_mb), .lo = 1, .hi = 1 << 20, .metavar = "N",
     .def = "1024", .help = "refuse frames larger than N MiB"},
    {.name = "max-mem", .kind = AR_OPTION_SIZE, AT(max_mem), .lo = 1, .hi = AR_MARKET_MAX_MEM,
     .metavar = "SIZE", .def_text = "the free memory at the time of the Load",
     .help = "refuse a Load whose stage would need more memory than this (parameters, gradients, "
             "optimizer state, activations): bytes, or 512M, 4G, ..."},
    {.name = "max-pipes", .kind = AR_OPTION_INT, AT(max_pipes), .lo = 1, .hi = 1024, .metavar = "N",
     .def = AR_OPTION_STR(AR_WORKER_DEFAULT_PIPES), .help = "Pipe streams open at once from one client host"},
    {.name = "idle-timeout", .kind = AR_OPTION_INT, AT(idle_timeout_s), .lo = 1, .hi = 7 * 24 * 3600,
     .metavar = "S", .def = "600",
     .help = "free the loaded stage (and end its session) after S seconds without a Pipe, Save or Restore"},
    {.name = "pipe-idle-timeout", .kind = AR_OPTION_INT, AT(pipe_idle_s), .lo = 1, .hi = 7 * 86400,
     .metavar = "S", .def = "600",
     .help = "cancel a Pipe stream that passes no frame either way for S seconds (far longer than a slow "
             "stage's step)"},
    {.name = "market", .kind = AR_OPTION_STRING, AT(market), .metavar = "HOST:PORT",
     .help = "serve market leases only: every Load must carry a lease token that this market confirms "
             "includes the provider"},
    {.name = "token", .kind = AR_OPTION_STRING, AT(token), .metavar = "T",
     .help = "with --market: the provider's account token; without it: a secret of at least 16 "
             "characters every Load must carry (arceus train --worker-token T; also $ARCEUS_WORKER_TOKEN). "
             "With neither, anyone who can reach the worker may load a stage on it"},
    {.name = "grace", .kind = AR_OPTION_FLOAT, AT(grace), .flo = 0, .fhi = 3600, .metavar = "S", .def = "30",
     .help = "on SIGINT or SIGTERM while a driver's stage runs here: the seconds the driver has to move the "
             "stage to another worker (it is told with the next step, and nothing is redone) before the "
             "worker stops; a second signal stops it at once. 0: stop at once"},
    {.name = "provider-id", .kind = AR_OPTION_LONG, AT(provider_id), .lo = 1, .hi = (int64_t)1 << 62,
     .metavar = "ID",
     .help = "with --market: the id the market registered it under (arceus provide does all this by "
             "itself)"},
    {0},
};

static int run_worker(void *opts);

const ar_cmd_spec ar_worker_cmd = {
    .name = "worker",
    .summary = "serve a pipeline stage to drivers over gRPC",
    .usage = "--listen HOST:PORT [options]",
    .description =
        "Serve a pipeline stage to a driver (arceus train --workers HOST:PORT,...) over gRPC. The driver "
        "says which layers to hold (Load), streams frames through the stage (Pipe) and fetches or restores "
        "its state (Save/Restore). Prints \"arceus worker: listening on HOST:PORT\" once ready (port 0 "
        "picks a free port and prints it). SIGINT or SIGTERM stops it cleanly, leaving gracefully first "
        "when a stage runs here (--grace).",
    .sections = (const ar_option_section[]){
        {NULL, worker_options, 0},
        {"TLS, serving", ar_cli_tls_server_options, offsetof(worker_opts, tls)},
        {"TLS, dialing the next stage's worker and the market", ar_cli_tls_client_options,
         offsetof(worker_opts, tls)},
        {0},
    },
    .opts_size = sizeof(worker_opts),
    .run = run_worker,
};

/* A graceful leave before stopping (docs/DESIGN.md, "Recovery"): the
 * market first, for a worker serving its leases (it then lets the driver
 * hand this provider's place over without a loss), then the stage says it
 * in its next step, and the driver moves it elsewhere. Waits until no
 * driver uses the stage, --grace seconds at most, or a second signal. */
static void leave(ar_worker *w, const worker_opts *o, int sig)
{
    const char *name = sig == SIGINT ? "SIGINT" : "SIGTERM";
    char why[64];
    snprintf(why, sizeof why, "stopping: %s", name);
    if (o->market) {
        ar_client *c = NULL;
        int status = 0;
        char said[80];
        snprintf(said, sizeof said, "leaving: %s", why);
        if (ar_client_open(o->market, &c) != AR_OK ||
            ar_market_heartbeat_availability(c, o->token, o->provider_id, true, said, true, &status) != AR_OK)
            fprintf(stderr, "arceus worker: warning: the market did not hear of the leave: %s\n", ar_last_error());
        ar_client_close(c);
    }
    ar_worker_set_leaving(w, 1, why);
    fprintf(stderr, "arceus worker: leaving: the driver is asked to move its stage within %g s (%s again stops "
                    "at once)\n", (double)o->grace, name);
    sigset_t set;
    ar_cli_stop_signals(&set);
    double t0 = ar_now();
    while (ar_worker_serving(w)) {
        struct timespec tick = {.tv_sec = 0, .tv_nsec = 100 * 1000000L};
        if (sigtimedwait(&set, NULL, &tick) > 0) {
            fprintf(stderr, "arceus worker: stopping now\n");
            return;
        }
        if (ar_now() - t0 >= o->grace) {
            fprintf(stderr, "arceus worker: the driver did not move its stage within %g s: stopping\n",
                    (double)o->grace);
            return;
        }
    }
    fprintf(stderr, "arceus worker: left: the driver moved its stage (%.1f s)\n", ar_now() - t0);
}

static int run_worker(void *opts)
{
    const worker_opts *o = opts;
    const char *market = o->market, *token = o->token;
    long provider_id = o->provider_id;
    if ((market || provider_id) && !(market && token && provider_id)) {
        ar_cli_error("worker", "--market, --token and --provider-id go together");
        return 2;
    }
    /* the secret may come from the environment, off the command line
     * (where any user of the machine can read it) */
    if (!token && !market && getenv("ARCEUS_WORKER_TOKEN") && getenv("ARCEUS_WORKER_TOKEN")[0])
        token = getenv("ARCEUS_WORKER_TOKEN");
    if (token && !market && (strlen(token) < AR_WORKER_MIN_TOKEN || strlen(token) > 255)) {
        ar_cli_error("worker", "--token: a worker secret of %zu characters; it needs %d to 255 (a long "
                     "random one: openssl rand -hex 32)", strlen(token), AR_WORKER_MIN_TOKEN);
        return 2;
    }
    if (!token)
        fprintf(stderr, "arceus worker: warning: no --token or --market: any client that can reach "
                        "this worker may load a stage on it\n");
    if (ar_cli_tls_setup("worker", &o->tls) != 0)
        return 2;
    /* signals are taken by sigwait below, in this thread only: block them
     * before any other thread (gRPC's, OpenMP's) exists */
    ar_cli_block_stop_signals();
    ar_set_threads(o->threads);
    ar_worker_config c = {.listen = o->listen, .threads = o->threads,
                          .max_frame = (size_t)o->max_frame_mb << 20,
                          .market = market, .market_token = market ? token : NULL,
                          .provider_id = provider_id, .load_token = market ? NULL : token,
                          .max_mem = (uint64_t)o->max_mem, .max_pipes = o->max_pipes,
                          .idle_timeout_s = o->idle_timeout_s, .pipe_idle_s = o->pipe_idle_s};
    ar_worker *w;
    char addr[200];
    if (ar_worker_start(&c, &w, addr, sizeof addr) != AR_OK) {
        ar_cli_error("worker", "%s", ar_last_error());
        return 1;
    }
    printf("arceus worker: listening on %s\n", addr);
    fflush(stdout);
    int sig = ar_cli_wait_stop_signal("worker");
    if (o->grace > 0 && ar_worker_serving(w))
        leave(w, o, sig);
    ar_worker_stop(w);
    return 0;
}
