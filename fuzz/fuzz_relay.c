/* libFuzzer harness: what the relay reads from strangers (src/net/relay.c).
 * The first input byte picks the entry point; the rest is the input:
 *   0: a circuit request (ar_relay_parse_connect); when it parses, its pass
 *      goes through ar_relay_pass_check as the relay would;
 *   1: a pass on its own (ar_relay_pass_check, ar_relay_pass_wellformed).
 * The harness aborts when a pass is accepted that this harness did not make
 * with the key, or when the parser returns a target or pass that is not a
 * terminated string of their forms. */
#include "core/core.h"
#include "net/relay.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const unsigned char KEY[AR_RELAY_KEY_BYTES] = "fuzz-relay-key-fuzz-relay-key-!!";
#define NOW 1700000000

/* The only pass the harness issues: accepted exactly when it is given. */
static char good[AR_RELAY_PASS_MAX];

static void check_pass(const char *pass)
{
    int64_t provider = 0, lease = 0;
    int ok = ar_relay_pass_check(KEY, pass, NOW, &provider, &lease) == AR_OK;
    if (ok != (strcmp(pass, good) == 0))
        abort();
    if (ok && (provider != 7 || lease != 3))
        abort();
    if (ok && !ar_relay_pass_wellformed(pass))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!good[0])
        ar_relay_pass(KEY, 7, 3, NOW + 60, good);
    if (size < 1)
        return 0;
    const char *in = (const char *)data + 1;
    size_t n = size - 1;
    if (data[0] % 2 == 0) {
        ar_relay_connect c;
        if (ar_relay_parse_connect(in, n, &c) == AR_OK) {
            if (memchr(c.target, '\0', sizeof c.target) == NULL || memchr(c.pass, '\0', sizeof c.pass) == NULL)
                abort();
            if (c.pass[0] && !ar_relay_pass_wellformed(c.pass))
                abort();
            check_pass(c.pass);
        }
    } else {
        char *s = malloc(n + 1);
        if (!s)
            return 0;
        memcpy(s, in, n);
        s[n] = '\0';
        check_pass(s);
        free(s);
    }
    return 0;
}
