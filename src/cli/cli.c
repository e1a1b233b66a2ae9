/* What the subcommands share: the error line, the stop signals, and the
 * options of a market client. */
#include "cli/cli.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>

void ar_cli_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "arceus %s: error: ", cmd);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void ar_cli_stop_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGTERM);
}

void ar_cli_block_stop_signals(void)
{
    sigset_t set;
    ar_cli_stop_signals(&set);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
}

int ar_cli_wait_stop_signal(const char *cmd)
{
    sigset_t set;
    ar_cli_stop_signals(&set);
    int sig = 0;
    sigwait(&set, &sig);
    fprintf(stderr, "arceus %s: %s, shutting down\n", cmd, sig == SIGINT ? "SIGINT" : "SIGTERM");
    return sig;
}

const ar_option ar_cli_market_options[] = {
    {.name = "market", .kind = AR_OPTION_HOSTPORT, AR_OPTION_AT(ar_cli_market, market),
     .metavar = "HOST:PORT", .required = 1, .hint = "the address arceus market listens on",
     .help = "the market (arceus market --listen ...)"},
    {.name = "token", .kind = AR_OPTION_STRING, AR_OPTION_AT(ar_cli_market, token), .metavar = "T",
     .env = "ARCEUS_TOKEN", .required = 1, .hint = "arceus market add-account prints one",
     .help = "your account token"},
    {0},
};
