/* arceus provide: rent this machine out through a market.
 *
 * Measures the machine (sgemm GFLOP/s within the thread cap, free memory
 * within the memory cap, cores), drops to a low scheduling priority, starts
 * a worker, registers the worker's address and profile with the market and
 * keeps it online with heartbeats from a thread of its own. The worker keeps
 * serving whatever happens to the market: an outage is logged once, and the
 * provider re-registers as soon as the market answers again (a restarted
 * market may have lost its record of us, or marked us offline meanwhile). */
#include "cli/cli.h"
#include "cli/service.h"
#include "core/core.h"
#include "core/device.h"
#include "net/market.h"
#include "net/remote.h"
#include "train/plan.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define PROVIDE_NICE 10

/* ---- the options ------------------------------------------------------------------- */

typedef struct {
    ar_cli_market m;
    const char *listen, *advertise;
    int max_threads, heartbeat_s;
    int64_t max_mem; /* 0: not given (a size is at least 1 byte) */
    int64_t price;   /* micro-credits per TFLOP */
    int install_service;
    int argc;   /* the command line, for --install-service */
    char **argv;
    ar_cli_tls tls;
} provide_opts;

#define AT(member) AR_OPTION_AT(provide_opts, member)

static const ar_option provide_options[] = {
    {.name = "listen", .kind = AR_OPTION_HOSTPORT, AT(listen), .metavar = "HOST:PORT", .def = "127.0.0.1:0",
     .help = "where the worker listens (port 0 picks one)"},
    {.name = "advertise", .kind = AR_OPTION_HOSTPORT, AT(advertise), .hi = AR_ADDR_MAX - 1,
     .metavar = "HOST:PORT", .def_text = "the listening address",
     .help = "the worker address registered with the market: the address renters dial"},
    {.name = "max-threads", .kind = AR_OPTION_INT, AT(max_threads), .lo = 0, .hi = 1024, .metavar = "N",
     .def = "0", .help = "threads for measuring and for the stages, 0 = all cores"},
    {.name = "max-mem", .kind = AR_OPTION_SIZE, AT(max_mem), .lo = 1, .hi = AR_MARKET_MAX_MEM,
     .metavar = "SIZE", .def_text = "the free memory",
     .help = "memory offered at most: bytes, or 512M, 4G, ..."},
    {.name = "price", .kind = AR_OPTION_CREDITS, AT(price), .lo = 0, .hi = AR_MARKET_MAX_PRICE,
     .metavar = "CREDITS", .def = "1", .help = "price in credits per TFLOP executed"},
    {.name = "heartbeat", .kind = AR_OPTION_INT, AT(heartbeat_s), .lo = 1, .hi = 3600, .metavar = "S",
     .def = "5", .help = "seconds between heartbeats"},
    {0},
};

static const ar_option service_options[] = {
    {.name = "install-service", .kind = AR_OPTION_FLAG, AT(install_service),
     .help = "instead of providing now, write a systemd user unit (arceus-provide.service) that runs "
             "arceus provide with the other options given, and the token into a 0600 file beside it; "
             "then enable and start it with systemctl --user. Prints what it did and how to undo it"},
    {0},
};

static int provide_init(void *opts, int argc, char **argv)
{
    provide_opts *o = opts;
    o->argc = argc;
    o->argv = argv;
    return 0;
}

static int run_provide(void *opts);

const ar_cmd_spec ar_provide_cmd = {
    .name = "provide",
    .summary = "rent this machine out: a worker registered with a market",
    .usage = "--market HOST:PORT --token T [options]",
    .description =
        "Rent this machine out: measure it (sgemm GFLOP/s with at most --max-threads threads, free memory "
        "capped by --max-mem, cores), start a worker that serves pipeline stages to renters, register its "
        "address and profile with the market and keep it online with heartbeats. The worker hosts only "
        "the stages it is leased for: a Load without a ticket that the market confirms for this "
        "provider is refused (UNAUTHENTICATED), and so is every Load before the first registration. "
        "Runs at low scheduling priority (nice "
        AR_OPTION_STR(PROVIDE_NICE) ") so the owner's own work comes first. Prints \"arceus provide: "
        "provider N serving on HOST:PORT (...)\" once registered. If the market goes away the worker "
        "keeps serving and the provider registers again when the market is back. SIGINT or SIGTERM "
        "stops it cleanly.",
    .sections = (const ar_option_section[]){
        {NULL, ar_cli_market_options, offsetof(provide_opts, m)},
        {NULL, provide_options, 0},
        {"running as a service", service_options, 0},
        {"TLS, for the worker", ar_cli_tls_server_options, offsetof(provide_opts, tls)},
        {"TLS, for the market and the next stage's worker", ar_cli_tls_client_options,
         offsetof(provide_opts, tls)},
        {0},
    },
    .opts_size = sizeof(provide_opts),
    .init = provide_init,
    .run = run_provide,
};

/* ---- the heartbeat thread ----------------------------------------------------------- */

typedef struct {
    const char *market, *token, *address; /* address: what is registered */
    ar_market_profile profile;
    int heartbeat_s;
    ar_client *client; /* owned by main until the thread starts, then by the thread */
    ar_worker *worker;
    int64_t provider_id;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC */
    int stopping;
} provider;

/* Register with the market, on a fresh channel when there is none (a channel
 * that saw the market die would wait out gRPC's reconnect backoff). */
static int provider_register(provider *p, int *status)
{
    *status = 0;
    if (!p->client && ar_client_open(p->market, &p->client) != AR_OK)
        return AR_ECLOSED;
    int rc = ar_market_register(p->client, p->token, p->address, &p->profile, &p->provider_id, NULL, status);
    if (rc != AR_OK)
        return rc;
    /* host only what we are leased for: every Load must carry a ticket
     * that this market confirms is this provider id's (which a
     * re-registration may have changed); on a fresh channel, as above */
    rc = ar_worker_require_lease(p->worker, p->market, p->token, p->provider_id);
    if (rc != AR_OK)
        *status = AR_STATUS_INVALID_ARGUMENT;
    return rc;
}

/* A status that retrying will not fix: the market refused us. */
static int refused(int status)
{
    return status == AR_STATUS_UNAUTHENTICATED || status == AR_STATUS_PERMISSION_DENIED ||
           status == AR_STATUS_INVALID_ARGUMENT || status == AR_STATUS_FAILED_PRECONDITION;
}

static void *heartbeat_main(void *arg)
{
    provider *p = arg;
    int outage = 0; /* a warning was logged for the current outage */
    int registered = 1;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += p->heartbeat_s;
        while (!p->stopping && pthread_cond_timedwait(&p->cv, &p->mu, &ts) != ETIMEDOUT) {
        }
        if (p->stopping)
            break;
        pthread_mutex_unlock(&p->mu);
        int status = 0, rc;
        if (registered) {
            rc = ar_market_heartbeat(p->client, p->token, p->provider_id, &status);
            if (rc != AR_OK && status == AR_STATUS_NOT_FOUND) {
                /* the market forgot us (a new database): register again now */
                fprintf(stderr, "arceus provide: the market no longer knows provider %" PRId64
                                ", registering again\n", p->provider_id);
                registered = 0;
                rc = provider_register(p, &status);
                registered = rc == AR_OK;
            }
        } else {
            rc = provider_register(p, &status);
            registered = rc == AR_OK;
        }
        if (rc == AR_OK && outage) {
            fprintf(stderr, "arceus provide: market %s is back: registered again as provider %" PRId64 "\n",
                    p->market, p->provider_id);
            outage = 0;
        } else if (rc != AR_OK) {
            if (!outage)
                fprintf(stderr, "arceus provide: warning: %s (%s); the worker keeps serving, "
                                "retrying every %d s\n",
                        refused(status) ? "the market refused us" : "market unreachable", ar_last_error(),
                        p->heartbeat_s);
            outage = 1;
            registered = 0;
            ar_client_close(p->client);
            p->client = NULL;
        }
        fflush(stderr);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* ---- the command -------------------------------------------------------------------------- */

/* Sleep up to `seconds` unless SIGINT/SIGTERM (blocked, in `set`) arrives:
 * 1 when one did. */
static int wait_signal(const sigset_t *set, int seconds, int *sig)
{
    struct timespec ts = {.tv_sec = seconds, .tv_nsec = 0};
    for (;;) {
        int s = sigtimedwait(set, NULL, &ts);
        if (s > 0) {
            *sig = s;
            return 1;
        }
        if (errno != EINTR)
            return 0;
    }
}

static const char *signame(int sig)
{
    return sig == SIGINT ? "SIGINT" : "SIGTERM";
}

static int run_provide(void *opts)
{
    const provide_opts *o = opts;
    const char *market = o->m.market, *token = o->m.token, *listen = o->listen, *advertise = o->advertise;
    int max_threads = o->max_threads, heartbeat_s = o->heartbeat_s, have_mem = o->max_mem > 0;
    int64_t max_mem = o->max_mem, price = o->price;
    if (ar_cli_tls_setup("provide", &o->tls) != 0)
        return 2;
    if (!advertise && (!strncmp(listen, "0.0.0.0:", 8) || !strncmp(listen, "[::]:", 5))) {
        ar_cli_error("provide", "--listen %s serves on every interface: say with --advertise HOST:PORT "
                                "which address renters should dial",
                     listen);
        return 2;
    }
    if (o->install_service)
        return ar_cli_install_service(o->argc, o->argv, token, market);

    /* Low priority first, before any other thread exists: on Linux the nice
     * value belongs to each thread and new threads inherit their creator's,
     * so gRPC's, OpenMP's and the worker's threads all run at it. Only ever
     * raise it: someone who started us at nice 19 meant it. */
    errno = 0;
    int nice_now = getpriority(PRIO_PROCESS, 0);
    if (errno == 0 && nice_now < PROVIDE_NICE) {
        if (setpriority(PRIO_PROCESS, 0, PROVIDE_NICE) != 0) {
            ar_cli_error("provide", "cannot lower the scheduling priority: %s", strerror(errno));
            return 1;
        }
        nice_now = PROVIDE_NICE;
    }
    printf("arceus provide: running at nice %d (low priority): the owner's own work comes first\n", nice_now);
    fflush(stdout);

    /* signals are taken by sigwait/sigtimedwait in this thread only: block
     * them before any other thread (gRPC's, OpenMP's, heartbeats) exists */
    ar_cli_block_stop_signals();
    sigset_t set;
    ar_cli_stop_signals(&set);

    /* the machine, within the caps */
    ar_set_threads(max_threads);
    int threads = ar_get_threads();
    ar_device_info dev;
    if (ar_device_probe(threads, &dev) != AR_OK) {
        ar_cli_error("provide", "cannot measure this machine: %s", ar_last_error());
        return 1;
    }
    double gflops = dev.gflops;
    if (!(gflops > 0)) {
        ar_cli_error("provide", "could not measure this machine's speed (sgemm probe failed)");
        return 1;
    }
    int64_t mem = dev.free_bytes > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)dev.free_bytes;
    if (mem <= 0) {
        long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
        mem = pages > 0 && page > 0 ? (int64_t)pages * page : 0;
    }
    if (have_mem && (mem <= 0 || max_mem < mem))
        mem = max_mem;
    if (mem <= 0) {
        ar_cli_error("provide", "cannot tell how much memory is free: say it with --max-mem SIZE");
        return 1;
    }
    if (mem > AR_MARKET_MAX_MEM)
        mem = AR_MARKET_MAX_MEM;
    long cores = dev.cores;
    provider p = {.market = market, .token = token, .heartbeat_s = heartbeat_s};
    p.profile.gflops = gflops;
    p.profile.mem_bytes = mem;
    /* the cores renters get: the thread cap, not the whole machine */
    p.profile.cores = threads < cores ? threads : (int)cores;
    p.profile.price_per_tflop = price;

    /* the worker holds a renter's stage to the memory offered, and refuses
     * every Load until the market has registered us and it knows our
     * provider id (provider_register) */
    ar_worker_config wc = {.listen = listen, .threads = threads, .max_frame = 0, .max_mem = (uint64_t)mem,
                           .gflops = gflops, .provider = 1};
    ar_worker *w;
    char addr[AR_ADDR_MAX];
    if (ar_worker_start(&wc, &w, addr, sizeof addr) != AR_OK) {
        ar_cli_error("provide", "cannot start the worker on %s: %s", listen, ar_last_error());
        return 1;
    }
    p.address = advertise ? advertise : addr;
    p.worker = w;

    /* The first registration, here: a refusal (a bad token) is fatal, an
     * unreachable market is waited for while the worker already serves. */
    int rc, status, sig = 0, warned = 0, exit_code = 0;
    while ((rc = provider_register(&p, &status)) != AR_OK) {
        if (refused(status) || rc != AR_ECLOSED) {
            ar_cli_error("provide", "the market refused to register this provider: %s", ar_last_error());
            exit_code = 1;
            goto out;
        }
        if (!warned)
            fprintf(stderr, "arceus provide: warning: market unreachable (%s); the worker serves "
                            "meanwhile, retrying every %d s\n",
                    ar_last_error(), heartbeat_s);
        warned = 1;
        ar_client_close(p.client);
        p.client = NULL;
        if (wait_signal(&set, heartbeat_s, &sig)) {
            fprintf(stderr, "arceus provide: %s, shutting down\n", signame(sig));
            goto out;
        }
    }
    char pricebuf[48];
    printf("arceus provide: provider %" PRId64 " serving on %s (%.1f GFLOP/s, %.1f GiB, price %s)\n",
           p.provider_id, addr, gflops, (double)mem / (double)(1LL << 30),
           ar_credits_text(price, pricebuf, sizeof pricebuf));
    if (advertise)
        printf("arceus provide: registered with the market as %s\n", advertise);
    printf("arceus provide: %d thread%s, %ld core%s on this machine, heartbeat every %d s to %s\n", threads,
           threads == 1 ? "" : "s", cores, cores == 1 ? "" : "s", heartbeat_s, market);
    fflush(stdout);

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p.cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&p.mu, NULL);
    pthread_t hb;
    int hb_started = pthread_create(&hb, NULL, heartbeat_main, &p) == 0;
    if (!hb_started)
        fprintf(stderr, "arceus provide: warning: cannot start the heartbeat thread; the market will "
                        "mark this provider offline\n");
    ar_cli_wait_stop_signal("provide");
    if (hb_started) {
        pthread_mutex_lock(&p.mu);
        p.stopping = 1;
        pthread_cond_broadcast(&p.cv);
        pthread_mutex_unlock(&p.mu);
        pthread_join(hb, NULL);
    }
    pthread_mutex_destroy(&p.mu);
    pthread_cond_destroy(&p.cv);
out:
    ar_client_close(p.client);
    ar_worker_stop(w);
    return exit_code;
}
