/* arceus worker: serve one pipeline stage over gRPC. */
#include "cli/cli.h"
#include "core/core.h"
#include "net/remote.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

void ar_help_worker(void)
{
    printf("usage: arceus worker --listen HOST:PORT [options]\n"
           "\n"
           "Serve a pipeline stage to a driver (arceus train --workers HOST:PORT,...)\n"
           "over gRPC. The driver says which layers to hold (Load), streams frames\n"
           "through the stage (Pipe) and fetches or restores its state (Save/Restore).\n"
           "Prints \"arceus worker: listening on HOST:PORT\" once ready (port 0 picks a\n"
           "free port and prints it). SIGINT or SIGTERM stops it cleanly.\n"
           "\n"
           "options:\n"
           "  --listen HOST:PORT   address to listen on, e.g. 127.0.0.1:5001\n"
           "  --threads N          threads for the stage, 0 = all cores (0)\n"
           "  --max-frame-mb N     refuse frames larger than N MiB (1024)\n"
           "  --max-mem SIZE       refuse a Load whose stage would need more memory than\n"
           "                       this (parameters, gradients, optimizer state,\n"
           "                       activations): bytes, or 512M, 4G, ... (the free memory\n"
           "                       at the time of the Load)\n"
           "  --max-pipes N        Pipe streams open at once from one client host (4)\n"
           "  --pipe-idle-timeout S\n"
           "                       cancel a Pipe stream that passes no frame either way for\n"
           "                       S seconds (600: far longer than a slow stage's step)\n"
           "  --market HOST:PORT   serve market leases only: every Load must carry a lease\n"
           "                       token that this market confirms includes the provider\n"
           "  --token T            with --market: the provider's account token; without it:\n"
           "                       a secret every Load must carry (arceus train\n"
           "                       --worker-token T). With neither, anyone who can reach\n"
           "                       the worker may load a stage on it\n"
           "  --provider-id ID     with --market: the id the market registered it under\n"
           "                       (arceus provide does all this by itself)\n"
           AR_CLI_TLS_SERVER_HELP
           AR_CLI_TLS_CLIENT_HELP
           "                       (a worker dials the next stage's worker and the market)\n");
}

int ar_cmd_worker(int argc, char **argv)
{
    const char *listen = NULL, *market = NULL, *token = NULL;
    int threads = 0, max_mb = 1024, max_pipes = AR_WORKER_DEFAULT_PIPES;
    int pipe_idle = (int)AR_WORKER_DEFAULT_PIPE_IDLE_S;
    int64_t max_mem = 0;
    long provider_id = 0;
    ar_cli_tls tls = {0};
    ar_args a;
    ar_args_init(&a, argc, argv);
    const char *name;
    int positional;
    while ((name = ar_args_next(&a, &positional))) {
        int rc = 0;
        if (positional) {
            ar_cli_error("worker", "unexpected argument \"%s\" (see arceus worker --help)", name);
            return 2;
        }
        if (!strcmp(name, "listen"))
            rc = ar_args_string(&a, &listen);
        else if (!strcmp(name, "threads"))
            rc = ar_args_int(&a, 0, 1024, &threads);
        else if (!strcmp(name, "max-frame-mb"))
            rc = ar_args_int(&a, 1, 1 << 20, &max_mb);
        else if (!strcmp(name, "max-mem")) {
            const char *v;
            if ((rc = ar_args_string(&a, &v)) == 0)
                rc = ar_parse_size("worker", v, &max_mem);
        } else if (!strcmp(name, "max-pipes"))
            rc = ar_args_int(&a, 1, 1024, &max_pipes);
        else if (!strcmp(name, "pipe-idle-timeout"))
            rc = ar_args_int(&a, 1, 7 * 86400, &pipe_idle);
        else if (!strcmp(name, "market"))
            rc = ar_args_string(&a, &market);
        else if (!strcmp(name, "token"))
            rc = ar_args_string(&a, &token);
        else if (!strcmp(name, "provider-id"))
            rc = ar_args_long(&a, 1, (long)1 << 62, &provider_id);
        else if (!ar_cli_tls_option(&a, name, 1, &tls, &rc))
            rc = ar_args_unknown(&a);
        if (rc != 0)
            return 2;
    }
    if (!listen || !strchr(listen, ':')) {
        ar_cli_error("worker", "--listen HOST:PORT is required (for example 127.0.0.1:5001)");
        return 2;
    }
    if ((market || provider_id) && !(market && token && provider_id)) {
        ar_cli_error("worker", "--market, --token and --provider-id go together");
        return 2;
    }
    if (token && !market && strlen(token) < 8) {
        ar_cli_error("worker", "--token: a secret of at least 8 characters, please");
        return 2;
    }
    if (!token)
        fprintf(stderr, "arceus worker: warning: no --token or --market: any client that can reach "
                        "this worker may load a stage on it\n");
    if (ar_cli_tls_setup("worker", &tls) != 0)
        return 2;
    /* signals are taken by sigwait below, in this thread only: block them
     * before any other thread (gRPC's, OpenMP's) exists */
    ar_cli_block_stop_signals();
    ar_set_threads(threads);
    ar_worker_config c = {.listen = listen, .threads = threads, .max_frame = (size_t)max_mb << 20,
                          .market = market, .market_token = market ? token : NULL,
                          .provider_id = provider_id, .load_token = market ? NULL : token,
                          .max_mem = (uint64_t)max_mem, .max_pipes = max_pipes,
                          .pipe_idle_s = pipe_idle};
    ar_worker *w;
    char addr[200];
    if (ar_worker_start(&c, &w, addr, sizeof addr) != AR_OK) {
        ar_cli_error("worker", "%s", ar_last_error());
        return 1;
    }
    printf("arceus worker: listening on %s\n", addr);
    fflush(stdout);
    ar_cli_wait_stop_signal("worker");
    ar_worker_stop(w);
    return 0;
}
