/* What every subcommand shares besides its options: the error line and the
 * stop signals. */
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
