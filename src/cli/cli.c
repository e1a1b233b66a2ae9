/* What the subcommands share: the error line, the stop signals, and the
 * options of a market client. */
#include "cli/cli.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
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

/* The length of the UTF-8 sequence at s and its code point, or 0 when the
 * bytes there are not one (overlong forms and surrogates included). */
static int utf8_decode(const unsigned char *s, uint32_t *cp)
{
    int n = s[0] < 0x80 ? 1 : (s[0] & 0xE0) == 0xC0 ? 2 : (s[0] & 0xF0) == 0xE0 ? 3 : (s[0] & 0xF8) == 0xF0 ? 4 : 0;
    if (n == 0)
        return 0;
    uint32_t c = n == 1 ? s[0] : (uint32_t)(s[0] & (0x7F >> n));
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        c = c << 6 | (uint32_t)(s[i] & 0x3F);
    }
    static const uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (c < least[n] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
        return 0;
    *cp = c;
    return n;
}

/* Characters that change how a terminal shows what follows them. */
static int unsafe_code_point(uint32_t c)
{
    return c < 0x20 || c == 0x7F || (c >= 0x80 && c <= 0x9F) || /* C0, DEL, C1 */
           c == 0x061C || c == 0x200E || c == 0x200F ||           /* bidi marks */
           (c >= 0x202A && c <= 0x202E) ||                        /* embeddings, overrides */
           (c >= 0x2066 && c <= 0x2069);                          /* isolates */
}

const char *ar_cli_safe_text(const char *text, char *buf, size_t size)
{
    size_t at = 0;
    if (size == 0)
        return buf;
    const unsigned char *s = (const unsigned char *)(text ? text : "");
    while (*s) {
        uint32_t c = 0;
        int n = utf8_decode(s, &c);
        char esc[16];
        const char *piece = (const char *)s;
        size_t len = (size_t)n;
        if (n == 0) {
            len = (size_t)snprintf(esc, sizeof esc, "\\x%02x", s[0]);
            piece = esc;
            n = 1;
        } else if (unsafe_code_point(c)) {
            len = c < 0x80 ? (size_t)snprintf(esc, sizeof esc, "\\x%02x", (unsigned)c)
                           : (size_t)snprintf(esc, sizeof esc, "\\u{%04x}", (unsigned)c);
            piece = esc;
        }
        if (at + len >= size)
            break;
        memcpy(buf + at, piece, len);
        at += len;
        s += n;
    }
    buf[at] = '\0';
    return buf;
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
