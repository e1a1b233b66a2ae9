/* Small option parser shared by the subcommands. */
#include "cli/cli.h"
#include "arceus.h"
#include "market/money.h"
#include "net/market.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ar_cli_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "arceus %s: error: ", cmd);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void ar_args_init(ar_args *a, int argc, char **argv)
{
    memset(a, 0, sizeof *a);
    a->argc = argc;
    a->argv = argv;
    a->i = 1;
    a->cmd = argv[0];
}

const char *ar_args_next(ar_args *a, int *positional)
{
    static char name[64];
    *positional = 0;
    a->inline_value = NULL;
    if (a->i >= a->argc)
        return NULL;
    const char *arg = a->argv[a->i++];
    if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
        *positional = 1;
        a->name = arg;
        return arg;
    }
    const char *eq = strchr(arg + 2, '=');
    size_t len = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
    if (len >= sizeof name)
        len = sizeof name - 1;
    memcpy(name, arg + 2, len);
    name[len] = '\0';
    if (eq)
        a->inline_value = eq + 1;
    a->name = name;
    return name;
}

int ar_args_string(ar_args *a, const char **out)
{
    if (a->inline_value) {
        *out = a->inline_value;
        return 0;
    }
    if (a->i >= a->argc) {
        ar_cli_error(a->cmd, "--%s needs a value", a->name);
        return -1;
    }
    *out = a->argv[a->i++];
    return 0;
}

int ar_args_long(ar_args *a, long lo, long hi, long *out)
{
    const char *s;
    if (ar_args_string(a, &s) != 0)
        return -1;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end != '\0') {
        ar_cli_error(a->cmd, "--%s expects an integer, got \"%s\"", a->name, s);
        return -1;
    }
    if (v < lo || v > hi) {
        ar_cli_error(a->cmd, "--%s must be between %ld and %ld, got %ld", a->name, lo, hi, v);
        return -1;
    }
    *out = v;
    return 0;
}

int ar_args_int(ar_args *a, int lo, int hi, int *out)
{
    long v;
    if (ar_args_long(a, lo, hi, &v) != 0)
        return -1;
    *out = (int)v;
    return 0;
}

int ar_args_float(ar_args *a, double lo, double hi, float *out)
{
    const char *s;
    if (ar_args_string(a, &s) != 0)
        return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end != '\0' || !isfinite(v)) {
        ar_cli_error(a->cmd, "--%s expects a number, got \"%s\"", a->name, s);
        return -1;
    }
    if (v < lo || v > hi) {
        ar_cli_error(a->cmd, "--%s must be between %g and %g, got %g", a->name, lo, hi, v);
        return -1;
    }
    *out = (float)v;
    return 0;
}

int ar_args_u64(ar_args *a, uint64_t *out)
{
    const char *s;
    if (ar_args_string(a, &s) != 0)
        return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end != '\0' || s[0] == '-') {
        ar_cli_error(a->cmd, "--%s expects a non-negative integer, got \"%s\"", a->name, s);
        return -1;
    }
    *out = v;
    return 0;
}

int ar_args_unknown(ar_args *a)
{
    ar_cli_error(a->cmd, "unknown option \"%s%s\" (see arceus %s --help)",
                 a->argv[a->i - 1][0] == '-' ? "" : "", a->argv[a->i - 1], a->cmd);
    return -1;
}

int ar_parse_credits(const char *s, int64_t max_micro, int64_t *out)
{
    return ar_credits_parse(s, max_micro, out) == AR_OK ? 0 : -1;
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

/* "N" bytes, or N followed by K, M, G or T (powers of 1024), optionally
 * followed by "B" or "iB": 512M, 4G, 4GiB, 1048576. */
int ar_parse_size(const char *cmd, const char *s, int64_t *out)
{
    const char *p = s;
    uint64_t v = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9'; p++, digits++) {
        v = v * 10 + (uint64_t)(*p - '0');
        if (v > (uint64_t)AR_MARKET_MAX_MEM)
            goto bad;
    }
    if (digits == 0)
        goto bad;
    int shift = 0;
    switch (*p) {
    case 'k': case 'K': shift = 10; p++; break;
    case 'm': case 'M': shift = 20; p++; break;
    case 'g': case 'G': shift = 30; p++; break;
    case 't': case 'T': shift = 40; p++; break;
    default: break;
    }
    if (shift && (*p == 'i' || *p == 'I'))
        p++;
    if (*p == 'b' || *p == 'B')
        p++;
    if (*p || v == 0 || v > ((uint64_t)AR_MARKET_MAX_MEM >> shift))
        goto bad;
    *out = (int64_t)(v << shift);
    return 0;
bad:
    ar_cli_error(cmd, "--max-mem expects a size like 512M, 4G or a number of bytes (1 byte .. 4 PiB), got \"%s\"",
                 s);
    return -1;
}
