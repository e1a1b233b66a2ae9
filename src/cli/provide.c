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
#include "cli/control.h"
#include "cli/owner.h"
#include "cli/service.h"
#include "core/core.h"
#include "core/device.h"
#include "net/market.h"
#include "net/relay.h"
#include "net/remote.h"
#include "train/plan.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
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
    int leave;          /* arceus provide --leave: the client of a running provider */
    float grace;        /* seconds a renter has to move its stage when we leave */
    const char *control;
    ar_owner_rules rules; /* when to compute */
    int cpu_limit;
    float check_every;
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

/* --hours HH:MM-HH:MM */
static int parse_hours(const ar_option_ctx *ctx, const char *v, void *opts)
{
    ar_owner_rules *r = &((provide_opts *)opts)->rules;
    if (ar_owner_parse_hours(v, &r->hours_from, &r->hours_to) == 0)
        return 0;
    ar_cli_error(ctx->cmd, "--%s expects HH:MM-HH:MM (e.g. 22:00-07:00: across midnight), two different times, "
                           "got \"%s\"", ctx->name, v);
    return -1;
}

static const ar_option_choice whens[] = {{"idle", AR_WHEN_IDLE}, {"always", AR_WHEN_ALWAYS}, {0}};
static const ar_option_choice yes_no[] = {{"no", 0}, {"yes", 1}, {0}};

static const ar_option owner_options[] = {
    {.name = "when", .kind = AR_OPTION_ENUM, AT(rules.when), .choices = whens, .metavar = "WHEN", .def = "idle",
     .help = "idle: only while the owner is away (no keyboard or mouse activity for --idle-after, and, with "
             "--busy-cpu, the machine's other processes using little CPU); always: whenever it runs. Either "
             "way within --hours and --on-battery. The provider tells the market when it becomes unavailable "
             "and why; it is not leased meanwhile (a lease it is serving goes on)"},
    {.name = "idle-after", .kind = AR_OPTION_FLOAT, AT(rules.idle_after_min), .flo = 0, .fhi = 1440,
     .metavar = "MIN", .def = "5", .help = "minutes without keyboard or mouse activity before the owner is away"},
    {.name = "busy-cpu", .kind = AR_OPTION_INT, AT(rules.busy_cpu), .lo = 0, .hi = 100, .metavar = "PCT",
     .def = "0", .help = "with --when idle: the machine is busy, so not idle, while its other processes use more "
                         "than PCT% of all its CPUs (0: not checked)"},
    {.name = "hours", .kind = AR_OPTION_CUSTOM, .parse = parse_hours, .metavar = "HH:MM-HH:MM",
     .def_text = "any time", .help = "only within these local hours, e.g. 22:00-07:00"},
    {.name = "on-battery", .kind = AR_OPTION_ENUM, AT(rules.on_battery), .choices = yes_no, .metavar = "YES|NO",
     .def = "no", .help = "whether to compute while the machine runs on battery"},
    {.name = "cpu-limit", .kind = AR_OPTION_INT, AT(cpu_limit), .lo = 1, .hi = 100, .metavar = "PCT", .def = "100",
     .help = "use at most PCT% of the machine's CPU: its cgroup v2 cpu.max where it may be written, else "
             "duty-cycling (stopped and continued every 100 ms)"},
    {.name = "check-every", .kind = AR_OPTION_FLOAT, AT(check_every), .flo = 0.1, .fhi = 3600, .metavar = "S",
     .def = "2", .help = "seconds between looks at the rules' inputs"},
    {0},
};

/* the rules' inputs: the machine's own, or a test's */
static const ar_option input_options[] = {
    {.name = "input-dir", .kind = AR_OPTION_STRING, AT(rules.input_dir), .metavar = "DIR", .def = "/dev/input",
     .help = "input devices: their access and change times are keyboard and mouse activity"},
    {.name = "interrupts", .kind = AR_OPTION_STRING, AT(rules.interrupts), .metavar = "FILE",
     .def = "/proc/interrupts", .help = "interrupt counts: a change of the i8042 (PS/2 keyboard and mouse) "
                                        "lines is activity"},
    {.name = "proc-stat", .kind = AR_OPTION_STRING, AT(rules.proc_stat), .metavar = "FILE", .def = "/proc/stat",
     .help = "CPU counters for --busy-cpu (/proc/stat's format: its first \"cpu\" line, cumulative ticks): "
             "the busy share of their growth between looks, less this process's own (/proc/self/stat), is "
             "the other processes' use"},
    {.name = "power-supply-dir", .kind = AR_OPTION_STRING, AT(rules.power_supply_dir), .metavar = "DIR",
     .def = "/sys/class/power_supply", .help = "power supplies (type, online, status)"},
    {.name = "clock-file", .kind = AR_OPTION_STRING, AT(rules.clock_file), .metavar = "FILE",
     .def_text = "the local time", .help = "read the time of day for --hours from FILE (HH:MM), read at each look"},
    {0},
};

static const ar_option leave_options[] = {
    {.name = "grace", .kind = AR_OPTION_FLOAT, AT(grace), .flo = 1, .fhi = 3600, .metavar = "S", .def = "30",
     .help = "when the provider leaves (its owner is back: --when, --hours, --on-battery; SIGTERM or SIGINT; "
             "arceus provide --leave), the seconds the renter's driver has to move its stage elsewhere: it is "
             "told with the next step, saves the stage and continues on another device, nothing redone and "
             "nothing reversed. After them the stage is dropped (a loss for the renter). A second signal "
             "stops at once"},
    {.name = "control", .kind = AR_OPTION_STRING, AT(control), .hi = 100, .metavar = "PATH",
     .def_text = "$XDG_RUNTIME_DIR/arceus-provide.sock, or /tmp/arceus-UID/provide.sock",
     .help = "the local socket arceus provide --leave talks to: only this user may use it"},
    {.name = "leave", .kind = AR_OPTION_FLAG, AT(leave), .alone = 1,
     .help = "instead of providing: ask the provider running on this machine (the one listening on "
             "--control) to leave gracefully and stop, and print what it does until it has stopped"},
    {0},
};

static const ar_option service_options[] = {
    {.name = "install-service", .kind = AR_OPTION_FLAG, AT(install_service),
     .help = "instead of providing now, write a systemd user unit (arceus-provide.service) that runs "
             "arceus provide with the other options given, and the token into a 0600 file beside it; "
             "then enable and start it with systemctl --user. A --cpu-limit under 100 becomes the unit's "
             "CPUQuota= (PCT x the online CPUs, systemd's percent being of one CPU) instead of an option of "
             "its command. Prints what it did and how to undo it"},
    {0},
};

static int provide_init(void *opts, int argc, char **argv)
{
    provide_opts *o = opts;
    o->argc = argc;
    o->argv = argv;
    o->rules.hours_from = o->rules.hours_to = -1;
    return 0;
}

static int run_provide(void *opts);

const ar_cmd_spec ar_provide_cmd = {
    .name = "provide",
    .summary = "rent this machine out: a worker registered with a market",
    .usage = "--market HOST:PORT --token T [options]\n--leave [--control PATH]",
    .description =
        "Rent this machine out: measure it (sgemm GFLOP/s with at most --max-threads threads, free memory "
        "capped by --max-mem, cores), start a worker that serves pipeline stages to renters, register its "
        "address and profile with the market and keep it online with heartbeats. The worker hosts only "
        "the stages it is leased for: a Load without a ticket that the market confirms for this "
        "provider is refused (UNAUTHENTICATED), and so is every Load before the first registration. "
        "Runs at low scheduling priority (nice "
        AR_OPTION_STR(PROVIDE_NICE) ") so the owner's own work comes first. Prints \"arceus provide: "
        "provider N serving on HOST:PORT (...)\" once registered. If the market goes away the worker "
        "keeps serving and the provider registers again when the market is back. When its owner returns "
        "(the rules below), on SIGINT or SIGTERM, or when asked with arceus provide --leave, it leaves "
        "gracefully: it tells the market, and the renter's driver, told with the next step, moves its stage "
        "to another device within --grace seconds, nothing redone; it is paid for every step it did and its "
        "reliability stays. Then it stops (a signal, --leave), or waits, leased to no one, until the rules "
        "let it compute again.",
    .sections = (const ar_option_section[]){
        {NULL, ar_cli_market_options, offsetof(provide_opts, m)},
        {NULL, provide_options, 0},
        {"when to compute (the owner's rules)", owner_options, 0},
        {"the rules' inputs (for tests)", input_options, 0},
        {"leaving gracefully", leave_options, 0},
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
    /* how the market reaches the worker, and the relay it named: a worker it
     * cannot dial keeps a control connection to the relay (net/relay.h) */
    ar_reach reach;
    char relay[AR_ADDR_MAX];
    char relay_credential[AR_RELAY_CREDENTIAL_HEX + 1];
    ar_relay_attach *attach;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC */
    int stopping;
    /* the owner's rules, as main last saw them, or a graceful leave
     * (leaving); beat_now: tell the market at once, not at the next
     * heartbeat; state counts the changes of unavailable and leaving, and
     * told is the count the market has acknowledged in a heartbeat */
    int unavailable, leaving, beat_now;
    char why[AR_WHY_MAX];
    unsigned long state, told;
} provider;

/* A connection the provider dialled back to the relay: the worker serves it. */
static int adopt(void *worker, int fd)
{
    return ar_worker_adopt(worker, fd);
}

/* Register with the market, on a fresh channel when there is none (a channel
 * that saw the market die would wait out gRPC's reconnect backoff). */
static int provider_register(provider *p, int *status)
{
    *status = 0;
    if (!p->client && ar_client_open(p->market, &p->client) != AR_OK)
        return AR_ECLOSED;
    ar_market_registration reg;
    int rc = ar_market_register_full(p->client, p->token, p->address, &p->profile, &reg, status);
    if (rc != AR_OK)
        return rc;
    int64_t was = p->provider_id;
    p->provider_id = reg.provider_id;
    p->reach = reg.reach;
    /* the relay the market names: where a relayed next stage is dialled,
     * and where this worker waits for renters when the market cannot dial it */
    if ((rc = ar_worker_set_relay(p->worker, reg.relay)) != AR_OK) {
        *status = AR_STATUS_INVALID_ARGUMENT;
        return rc;
    }
    int relay_changed = strcmp(p->relay, reg.relay) != 0 || strcmp(p->relay_credential, reg.relay_credential) != 0 ||
                        was != p->provider_id;
    if (relay_changed && p->attach) {
        ar_relay_attach_stop(p->attach);
        p->attach = NULL;
    }
    snprintf(p->relay, sizeof p->relay, "%s", reg.relay);
    snprintf(p->relay_credential, sizeof p->relay_credential, "%s", reg.relay_credential);
    OPENSSL_cleanse(&reg, sizeof reg);
    /* host only what we are leased for: every Load must carry a ticket
     * that this market confirms is this provider id's (which a
     * re-registration may have changed); on a fresh channel, as above */
    rc = ar_worker_require_lease(p->worker, p->market, p->token, p->provider_id);
    if (rc != AR_OK) {
        *status = AR_STATUS_INVALID_ARGUMENT;
        return rc;
    }
    /* a worker behind a router: always attached while the market has a
     * relay and has not dialled us (the market checks again at heartbeats,
     * through the relay once we are there) */
    if (p->relay[0] && p->reach != AR_REACH_OK && !p->attach) {
        if (ar_relay_attach_start(p->relay, p->provider_id, p->address, p->relay_credential, adopt, p->worker,
                                  &p->attach) != AR_OK)
            fprintf(stderr, "arceus provide: warning: cannot keep a connection to relay %s: %s\n", p->relay,
                    ar_last_error());
        else
            printf("arceus provide: the market cannot dial %s: keeping a connection to its relay %s\n",
                   p->address, p->relay);
        fflush(stdout);
    }
    return AR_OK;
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
        while (!p->stopping && !p->beat_now && pthread_cond_timedwait(&p->cv, &p->mu, &ts) != ETIMEDOUT) {
        }
        if (p->stopping)
            break;
        /* every heartbeat says what the owner's rules say now */
        int unavailable = p->unavailable, leaving = p->leaving;
        unsigned long state = p->state;
        char why[AR_WHY_MAX];
        snprintf(why, sizeof why, "%s", p->why);
        p->beat_now = 0;
        pthread_mutex_unlock(&p->mu);
        int status = 0, rc, was_registered = registered;
        if (registered && ar_relay_attach_refused(p->attach)) {
            /* the relay no longer takes our credential (a market restarted
             * with a new key): registering again fetches the current one */
            fprintf(stderr, "arceus provide: relay %s refused this provider's credential: registering again\n",
                    p->relay);
            registered = was_registered = 0;
        }
        if (registered) {
            ar_reach reach = p->reach;
            rc = ar_market_heartbeat_full(p->client, p->token, p->provider_id, unavailable, why, leaving, &reach,
                                          &status);
            if (rc == AR_OK && reach != p->reach) {
                printf("arceus provide: the market now reaches this worker %s\n",
                       reach == AR_REACH_OK        ? "directly"
                       : reach == AR_REACH_RELAYED ? "through its relay"
                                                   : "not at all: it is not leased until it does");
                fflush(stdout);
                p->reach = reach;
            }
            if (rc != AR_OK && status == AR_STATUS_NOT_FOUND) {
                /* the market forgot us (a new database): register again now */
                fprintf(stderr, "arceus provide: the market no longer knows provider %" PRId64
                                ", registering again\n", p->provider_id);
                registered = was_registered = 0;
                rc = provider_register(p, &status);
                registered = rc == AR_OK;
            }
        } else {
            rc = provider_register(p, &status);
            registered = rc == AR_OK;
        }
        /* registered again: a heartbeat at once tells the market what the
         * owner's rules say, before anyone leases us */
        int beat_again = registered && !was_registered;
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
        p->beat_now |= beat_again;
        if (rc == AR_OK && was_registered && state > p->told) {
            p->told = state;
            pthread_cond_broadcast(&p->cv); /* main may wait for the market to know */
        }
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* ---- the command -------------------------------------------------------------------------- */

/* One line saying what the owner's rules are. */
static void print_rules(const provide_opts *o)
{
    const ar_owner_rules *r = &o->rules;
    char hours[64] = "any time", idle[160] = "";
    if (r->hours_from >= 0)
        snprintf(hours, sizeof hours, "%02d:%02d-%02d:%02d", r->hours_from / 60, r->hours_from % 60,
                 r->hours_to / 60, r->hours_to % 60);
    if (r->when == AR_WHEN_IDLE)
        snprintf(idle, sizeof idle, " after %g min without keyboard or mouse%s", (double)r->idle_after_min,
                 r->busy_cpu > 0 ? " and while other processes use little CPU" : "");
    char limit[48] = "";
    if (o->cpu_limit < 100)
        snprintf(limit, sizeof limit, ", at most %d%% of the CPU", o->cpu_limit);
    printf("arceus provide: computes %s%s, %s, %s battery%s\n", r->when == AR_WHEN_IDLE ? "when idle" : "always",
           idle, hours, r->on_battery ? "also on" : "not on", limit);
}

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

/* ---- a graceful leave ---------------------------------------------------------------------- */

#define POLL_MS 100
/* how long a leave waits for the market to hear of it before the stage says so */
#define TELL_MARKET_S 5.0

enum { LEAVE_NONE, LEAVE_LEAVING, LEAVE_LEFT };

typedef struct {
    provider *p;
    ar_worker *w;
    ar_control *ctl;
    double grace, since;
    int heartbeats; /* the heartbeat thread runs */
    int state;      /* LEAVE_* */
    int stop;       /* the process stops once the leave is over */
} leave;

/* What the heartbeats say from now on: a change of state is told at once
 * (a new why alone goes with the next heartbeat). The state's count. */
static unsigned long set_state(provider *p, int unavailable, const char *why, int leaving)
{
    pthread_mutex_lock(&p->mu);
    if (p->unavailable != unavailable || p->leaving != leaving) {
        p->state++;
        p->beat_now = 1;
        pthread_cond_broadcast(&p->cv);
    }
    p->unavailable = unavailable;
    p->leaving = leaving;
    snprintf(p->why, sizeof p->why, "%s", why);
    unsigned long state = p->state;
    pthread_mutex_unlock(&p->mu);
    return state;
}

/* A line on stdout ("arceus provide: ...") and to whoever asked us to
 * leave. */
static void say(leave *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(leave *l, const char *fmt, ...)
{
    char line[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    printf("arceus provide: %s\n", line);
    fflush(stdout);
    ar_control_say(l->ctl, line);
}

/* Leave: `why` ("its owner is active ...", "stopping: SIGTERM"); stop: the
 * process stops once the renter has moved its stage. The market hears of
 * it first (it then accepts the renter's HandOver), then the stage says it
 * in its next step's NORM record, and the driver moves it. 1 when there is
 * nothing to wait for and the process is to stop now. */
static int start_leave(leave *l, const char *why, int stop)
{
    l->stop |= stop;
    if (l->state != LEAVE_NONE)
        return l->state == LEAVE_LEFT && l->stop;
    if (!ar_worker_serving(l->w)) {
        if (!stop)
            return 0;
        say(l, "leaving: %s; no renter's stage here", why);
        return 1;
    }
    char said[AR_WHY_MAX];
    snprintf(said, sizeof said, "leaving: %s", why);
    unsigned long state = set_state(l->p, 1, said, 1);
    /* the market knows before the driver asks it to hand our place over
     * (which it accepts only from a provider that said it is leaving) */
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += (time_t)TELL_MARKET_S;
    pthread_mutex_lock(&l->p->mu);
    while (l->heartbeats && l->p->told < state &&
           pthread_cond_timedwait(&l->p->cv, &l->p->mu, &until) != ETIMEDOUT) {
    }
    int told = l->p->told >= state;
    pthread_mutex_unlock(&l->p->mu);
    ar_worker_set_leaving(l->w, 1, why);
    l->state = LEAVE_LEAVING;
    l->since = ar_now();
    say(l, "leaving: %s; the renter's driver is asked to move its stage within %g s%s", why, (double)l->grace,
        told ? "" : " (the market has not answered yet)");
    return 0;
}

/* A leave under way: over when no renter uses the stage any more (its
 * driver moved it), or when the grace has run out (the stage is dropped).
 * 1 when it is over now. */
static int step_leave(leave *l)
{
    if (l->state != LEAVE_LEAVING)
        return l->state == LEAVE_LEFT;
    if (ar_worker_serving(l->w)) {
        if (ar_now() - l->since < l->grace)
            return 0;
        say(l, "the renter did not move its stage within %g s: dropping it", (double)l->grace);
    } else {
        say(l, "left: the renter moved its stage (%.1f s)", ar_now() - l->since);
    }
    ar_worker_drop(l->w); /* nothing of the renter's stays here */
    l->state = LEAVE_LEFT;
    if (!l->stop)
        say(l, "leased to no one until its owner's rules let it compute again");
    return 1;
}

static int run_provide(void *opts)
{
    const provide_opts *o = opts;
    const char *market = o->m.market, *token = o->m.token, *listen = o->listen, *advertise = o->advertise;
    int max_threads = o->max_threads, heartbeat_s = o->heartbeat_s, have_mem = o->max_mem > 0;
    int64_t max_mem = o->max_mem, price = o->price;
    char control[128];
    if (o->control)
        snprintf(control, sizeof control, "%s", o->control);
    if (o->leave)
        return o->control || ar_control_default_path(control, sizeof control) == 0 ? ar_control_leave(control) : 1;
    if (ar_cli_tls_setup("provide", &o->tls) != 0)
        return 2;
    if (!advertise && (!strncmp(listen, "0.0.0.0:", 8) || !strncmp(listen, "[::]:", 5))) {
        ar_cli_error("provide", "--listen %s serves on every interface: say with --advertise HOST:PORT "
                                "which address renters should dial",
                     listen);
        return 2;
    }
    if (o->install_service)
        return ar_cli_install_service(o->argc, o->argv, token, market, o->grace, o->cpu_limit);

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
    /* the CPU limit's helper, if it needs one, is forked before any thread */
    if (ar_owner_limit_cpu(o->cpu_limit) != 0)
        return 1;

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

    /* the owner's rules, looked at once before the market hears of us */
    ar_owner owner;
    ar_owner_init(&owner, &o->rules);
    p.unavailable = !ar_owner_check(&owner, p.why, sizeof p.why);
    p.beat_now = 1;

    /* arceus provide --leave reaches us on the control socket */
    int rc, status, sig = 0, warned = 0, exit_code = 0;
    ar_control ctl;
    memset(&ctl, 0, sizeof ctl);
    ctl.listen_fd = ctl.lock_fd = -1;
    if ((o->control || ar_control_default_path(control, sizeof control) == 0) &&
        ar_control_open(&ctl, control) < 0 && o->control) {
        exit_code = 1;
        goto out;
    }

    /* The first registration, here: a refusal (a bad token) is fatal, an
     * unreachable market is waited for while the worker already serves. */
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
    /* the rules before the line that says it serves: whoever waits for
     * that line can read them */
    print_rules(o);
    if (p.unavailable)
        printf("arceus provide: unavailable now: %s (the market leases it to no one meanwhile)\n", p.why);
    if (ctl.listen_fd >= 0)
        printf("arceus provide: arceus provide --leave%s%s asks it to leave\n", o->control ? " --control " : "",
               o->control ? control : "");
    char pricebuf[48];
    printf("arceus provide: provider %" PRId64 " serving on %s (%.1f GFLOP/s, %.1f GiB, price %s)\n",
           p.provider_id, addr, gflops, (double)mem / (double)(1LL << 30),
           ar_credits_text(price, pricebuf, sizeof pricebuf));
    if (advertise)
        printf("arceus provide: registered with the market as %s\n", advertise);
    printf("arceus provide: the market reaches this worker %s\n",
           p.reach == AR_REACH_OK        ? "directly"
           : p.reach == AR_REACH_RELAYED ? "through its relay"
           : p.reach == AR_REACH_UNCHECKED ? "unchecked (the market does not check)"
                                           : p.relay[0] ? "not yet (it checks again through the relay as we beat)"
                                                        : "not at all: it is not leased until it does");
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


    /* look at the rules every --check-every seconds, and for signals and
     * control requests every POLL_MS, until it stops */
    leave lv = {.p = &p, .w = w, .ctl = &ctl, .grace = o->grace, .heartbeats = hb_started};
    double next_check = ar_now() + o->check_every;
    for (;;) {
        int asked = ar_control_poll(&ctl, POLL_MS);
        struct timespec zero = {0, 0};
        int s = sigtimedwait(&set, NULL, &zero);
        if (s > 0 && lv.stop) {
            /* asked twice: no more waiting for the renter */
            say(&lv, "%s again: stopping now", signame(s));
            break;
        }
        if (s > 0) {
            fprintf(stderr, "arceus provide: %s, shutting down\n", signame(s));
            fflush(stderr);
        }
        if (s > 0 || asked) {
            char why[64];
            snprintf(why, sizeof why, "stopping: %s", s > 0 ? signame(s) : "arceus provide --leave");
            if (start_leave(&lv, why, 1))
                break;
        }
        if (lv.state != LEAVE_NONE && step_leave(&lv) && lv.stop)
            break;
        if (ar_now() < next_check)
            continue;
        next_check = ar_now() + o->check_every;
        char why[AR_WHY_MAX];
        int unavailable = !ar_owner_check(&owner, why, sizeof why);
        if (lv.state == LEAVE_LEFT && !unavailable && !lv.stop) {
            /* the owner is away again: back in the market */
            lv.state = LEAVE_NONE;
            ar_worker_set_leaving(w, 0, NULL);
            set_state(&p, 0, "", 0);
            printf("arceus provide: available again\n");
            fflush(stdout);
            continue;
        }
        if (lv.state != LEAVE_NONE)
            continue; /* a leave says it all until it is over */
        pthread_mutex_lock(&p.mu);
        int changed = unavailable != p.unavailable;
        pthread_mutex_unlock(&p.mu);
        set_state(&p, unavailable, unavailable ? why : "", 0);
        if (changed && unavailable)
            printf("arceus provide: unavailable: %s (the market leases it to no one meanwhile)\n", why);
        else if (changed)
            printf("arceus provide: available again\n");
        fflush(stdout);
        /* the owner is back while a renter's stage runs here: it leaves */
        if (unavailable && ar_worker_serving(w))
            start_leave(&lv, why, 0);
    }
    say(&lv, "stopped");
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
    ar_relay_attach_stop(p.attach); /* its dials hand sockets to the worker: first */
    ar_control_close(&ctl);
    ar_client_close(p.client);
    ar_worker_stop(w);
    return exit_code;
}
