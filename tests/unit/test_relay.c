/* The relay's pieces (net/relay.h): passes and credentials, the CONNECT
 * parser against what gRPC sends and what a stranger might, and the splice
 * between two sockets (bytes both ways, each end's close passed on). The
 * relay server and providers behind it are tested end to end in
 * tests/e2e/test_relay.py and test_nat.py. */
#include "core/core.h"
#include "net/relay.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const unsigned char KEY[AR_RELAY_KEY_BYTES] = "0123456789abcdef0123456789abcdef";

Test(relay, a_pass_opens_only_its_provider_and_lease_until_it_expires)
{
    char pass[AR_RELAY_PASS_MAX];
    int64_t now = 1700000000, provider = 0, lease = 0;
    ar_relay_pass(KEY, 17, 5, now + 60, pass);
    cr_assert(ar_relay_pass_wellformed(pass), "%s", pass);
    cr_assert_eq(ar_relay_pass_check(KEY, pass, now, &provider, &lease), AR_OK, "%s", ar_last_error());
    cr_assert_eq(provider, 17);
    cr_assert_eq(lease, 5);
    /* expired */
    cr_assert_eq(ar_relay_pass_check(KEY, pass, now + 60, &provider, &lease), AR_EINVAL);
    cr_assert(strstr(ar_last_error(), "expired"), "%s", ar_last_error());
    /* another key's */
    unsigned char other[AR_RELAY_KEY_BYTES];
    memcpy(other, KEY, sizeof other);
    other[0] ^= 1;
    cr_assert_eq(ar_relay_pass_check(other, pass, now, &provider, &lease), AR_EINVAL);
    /* another provider, lease or expiry with this MAC */
    const char *colon = strchr(pass, ':');
    char forged[AR_RELAY_PASS_MAX];
    snprintf(forged, sizeof forged, "18.5.%lld%s", (long long)(now + 60), colon);
    cr_assert_eq(ar_relay_pass_check(KEY, forged, now, &provider, &lease), AR_EINVAL);
    snprintf(forged, sizeof forged, "17.5.%lld%s", (long long)(now + 6000), colon);
    cr_assert_eq(ar_relay_pass_check(KEY, forged, now, &provider, &lease), AR_EINVAL);
    /* a flipped digit of the MAC */
    snprintf(forged, sizeof forged, "%s", pass);
    char *last = forged + strlen(forged) - 1;
    *last = *last == '0' ? '1' : '0';
    cr_assert_eq(ar_relay_pass_check(KEY, forged, now, &provider, &lease), AR_EINVAL);
    /* not passes at all */
    const char *bad[] = {"", ":", "17.5.1:", "17.5:abc", "a.b.c:" "0000000000000000000000000000000000000000000000000000000000000000",
                         "0.5.9999999999:0000000000000000000000000000000000000000000000000000000000000000",
                         "17.5.99999999999999999999:00", "17.5.9:00:00", "17.5.9:ZZ", "17 5 9:00"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_assert_eq(ar_relay_pass_check(KEY, bad[i], now, &provider, &lease), AR_EINVAL, "%s", bad[i]);
    char longer[400];
    memset(longer, '1', sizeof longer - 1);
    longer[sizeof longer - 1] = '\0';
    cr_assert_not(ar_relay_pass_wellformed(longer));
}

Test(relay, a_credential_is_bound_to_its_provider_and_address)
{
    char a[AR_RELAY_CREDENTIAL_HEX + 1], b[AR_RELAY_CREDENTIAL_HEX + 1], c[AR_RELAY_CREDENTIAL_HEX + 1];
    ar_relay_credential(KEY, 3, "10.0.0.2:7001", a);
    ar_relay_credential(KEY, 3, "10.0.0.2:7002", b);
    ar_relay_credential(KEY, 4, "10.0.0.2:7001", c);
    cr_assert_eq(strlen(a), AR_RELAY_CREDENTIAL_HEX);
    cr_assert_str_neq(a, b);
    cr_assert_str_neq(a, c);
    ar_relay_credential(KEY, 3, "10.0.0.2:7001", b);
    cr_assert_str_eq(a, b);
}

/* What gRPC 1.51 sends for a channel with grpc.http_proxy
 * "http://PASS@relay" (seen on the wire). */
static int parse(const char *req, ar_relay_connect *out)
{
    return ar_relay_parse_connect(req, strlen(req), out);
}

Test(relay, connect_requests_as_grpc_sends_them_and_as_strangers_might)
{
    ar_relay_connect c;
    /* base64("17.5.99:" + 64 zeros) */
    char pass[AR_RELAY_PASS_MAX];
    ar_relay_pass(KEY, 17, 5, 99, pass);
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char enc[400];
    size_t n = strlen(pass), o = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned char)pass[i] << 16 | (i + 1 < n ? (unsigned char)pass[i + 1] << 8 : 0) |
                     (i + 2 < n ? (unsigned char)pass[i + 2] : 0);
        enc[o++] = b64[v >> 18 & 63];
        enc[o++] = b64[v >> 12 & 63];
        enc[o++] = i + 1 < n ? b64[v >> 6 & 63] : '=';
        enc[o++] = i + 2 < n ? b64[v & 63] : '=';
    }
    enc[o] = '\0';
    char req[1024];
    snprintf(req, sizeof req,
             "CONNECT 10.1.2.3:7001 HTTP/1.1\r\nHost: 10.1.2.3:7001\r\nUser-Agent: grpc-httpcli/0.0\r\n"
             "Proxy-Authorization: Basic %s\r\n\r\n", enc);
    cr_assert_eq(parse(req, &c), AR_OK, "%s", ar_last_error());
    cr_assert_str_eq(c.target, "10.1.2.3:7001");
    cr_assert_str_eq(c.pass, pass);
    /* header names in any case; no pass at all */
    snprintf(req, sizeof req, "CONNECT [::1]:7001 HTTP/1.0\r\nproxy-AUTHORIZATION:   basic %s  \r\n\r\n", enc);
    cr_assert_eq(parse(req, &c), AR_OK, "%s", ar_last_error());
    cr_assert_str_eq(c.pass, pass);
    cr_assert_eq(parse("CONNECT h:1 HTTP/1.1\r\n\r\n", &c), AR_OK);
    cr_assert_str_eq(c.pass, "");
    /* refused */
    const char *bad[] = {
        "GET / HTTP/1.1\r\n\r\n",
        "CONNECT  HTTP/1.1\r\n\r\n",
        "CONNECT h:1 HTTP/2.0\r\n\r\n",
        "CONNECT h:1\r\n\r\n",
        "CONNECT h/1 HTTP/1.1\r\n\r\n",
        "CONNECT h:1 HTTP/1.1\r\nX: y\r\n",
        "CONNECT h:1 HTTP/1.1\r\nX: \x01\r\n\r\n",
        "CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: Bearer abc\r\n\r\n",
        "CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: Basic !!!!\r\n\r\n",
        "CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n", /* user:pass */
        "CONNECT h:1 HTTP/1.1\r\n\r\nextra",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_assert_eq(parse(bad[i], &c), AR_EINVAL, "%s", bad[i]);
    /* two passes */
    snprintf(req, sizeof req, "CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: Basic %s\r\nProxy-Authorization: Basic %s\r\n\r\n",
             enc, enc);
    cr_assert_eq(parse(req, &c), AR_EINVAL);
    /* a target too long for an address */
    char big[600] = "CONNECT ";
    memset(big + 8, 'a', 300);
    snprintf(big + 308, sizeof big - 308, ":1 HTTP/1.1\r\n\r\n");
    cr_assert_eq(parse(big, &c), AR_EINVAL);
}

typedef struct {
    int a, b;
    double moved;
} splice_job;

static void *splice_main(void *arg)
{
    splice_job *j = arg;
    j->moved = ar_net_splice(j->a, j->b, NULL);
    return NULL;
}

Test(relay, the_splice_carries_bytes_both_ways_and_passes_each_close_on)
{
    /* client <-> [x | y] <-> server */
    int l[2], r[2];
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, l), 0);
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, r), 0);
    splice_job j = {.a = l[1], .b = r[0]};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, splice_main, &j), 0);
    size_t n = 5 << 20;
    unsigned char *out = malloc(n), *in = malloc(n);
    cr_assert(out && in);
    for (size_t i = 0; i < n; i++)
        out[i] = (unsigned char)(i * 131 + 7);
    /* a writer process, so that neither side blocks the other */
    size_t got = 0;
    pid_t child = fork();
    cr_assert(child >= 0);
    if (child == 0) {
        size_t off = 0;
        while (off < n) {
            ssize_t k = write(l[0], out + off, n - off);
            if (k <= 0)
                _exit(1);
            off += (size_t)k;
        }
        shutdown(l[0], SHUT_WR);
        _exit(0);
    }
    while (got < n) {
        ssize_t k = read(r[1], in + got, n - got);
        cr_assert(k > 0, "the stream ended after %zu of %zu bytes", got, n);
        got += (size_t)k;
    }
    cr_assert_eq(memcmp(in, out, n), 0);
    /* the client's half-close reached the server */
    char c;
    cr_assert_eq(read(r[1], &c, 1), 0);
    /* and the other way, then the server closes */
    cr_assert_eq(write(r[1], "pong", 4), 4);
    close(r[1]);
    char back[8] = {0};
    size_t b = 0;
    ssize_t k;
    while ((k = read(l[0], back + b, sizeof back - 1 - b)) > 0)
        b += (size_t)k;
    cr_assert_str_eq(back, "pong");
    pthread_join(t, NULL);
    cr_assert_eq((size_t)j.moved, n + 4);
    int st;
    waitpid(child, &st, 0);
    close(l[0]);
    close(l[1]);
    close(r[0]);
    free(out);
    free(in);
}

Test(relay, a_relayed_channel_takes_only_a_pass_and_a_relay_address)
{
    ar_client *c = NULL;
    char pass[AR_RELAY_PASS_MAX];
    ar_relay_pass(KEY, 1, 1, 99, pass);
    cr_assert_eq(ar_client_open_relayed("10.0.0.1:7001", "relay:7100/x", pass, &c), AR_EINVAL);
    cr_assert_eq(ar_client_open_relayed("10.0.0.1:7001", "re@lay:7100", pass, &c), AR_EINVAL);
    cr_assert_eq(ar_client_open_relayed("10.0.0.1:7001", "relay", pass, &c), AR_EINVAL);
    cr_assert_eq(ar_client_open_relayed("10.0.0.1:7001", "relay:7100", "a@b:c", &c), AR_EINVAL);
    cr_assert_eq(ar_client_open_relayed("10.0.0.1:7001", "relay:7100", pass, &c), AR_OK, "%s", ar_last_error());
    ar_client_close(c);
}
