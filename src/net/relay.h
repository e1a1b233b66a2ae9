/* The relay (docs/DESIGN.md, "The relay"): how a provider that nobody can dial
 * (a machine behind a home router or a firewall) is still reached by its
 * renter's driver and by the stage before it.
 *
 * The relay only splices bytes. A provider the market cannot reach keeps an
 * outbound *control* connection to the relay. A client that wants the
 * provider's worker opens an HTTP CONNECT tunnel to the relay (gRPC core does
 * that itself for a channel given a proxy, so TLS and HTTP/2 run end to end
 * inside it: the relay sees ciphertext only); the relay checks the client's
 * *pass*, asks the provider over its control connection to dial a fresh
 * *data* connection back, and splices the two TCP connections byte for byte.
 * The provider serves gRPC on the connection it dialled.
 *
 * Who may open a circuit: a pass is HMAC-SHA256, under a key the market and
 * the relay share, over (provider, lease, expiry); the market hands one per
 * relayed member to the lease's renter with the member's ticket, and the
 * renter's driver hands stage i+1's to stage i in its Load. A pass opens a
 * TCP circuit to that provider's worker and nothing else: every call there
 * but Hello still needs the lease's ticket or a session, which the relay
 * never sees. A provider's control connection is opened with a credential
 * the market gave it at registration (HMAC under the same key over its id
 * and address).
 *
 * The wire, on one TCP port (every line ASCII, bounded, with a deadline):
 *   client:   CONNECT HOST:PORT HTTP/1.1\r\n ... Proxy-Authorization: Basic
 *             base64("PROVIDER.LEASE.EXPIRY:MAC")\r\n\r\n
 *             -> "HTTP/1.1 200 Connection established\r\n\r\n" then the
 *             provider's bytes; or 403 (bad pass), 404 (provider not
 *             attached), 429 (a limit), 504 (the provider did not dial back)
 *             and the connection closed.
 *   provider: ARCEUS-RELAY 1 CONTROL PROVIDER ADDRESS CREDENTIAL\n
 *             -> "OK PING_S\n", then "DIAL CIRCUIT NONCE\n" per circuit and
 *             "PING\n" every PING_S seconds; the provider sends "PING\n" as
 *             often. A side that hears nothing for 3 * PING_S drops the
 *             connection; "NO REASON\n" refuses it.
 *   data:     ARCEUS-RELAY 1 DATA CIRCUIT NONCE\n, then the worker's bytes.
 *   reverse:  ARCEUS-RELAY 1 REVERSE PASS PORT NONCE\n from a stage that can
 *             be dialled and wants the (relayed) provider of PASS as its next
 *             stage -> "OK\n" once the provider is told, over its control
 *             connection, "DIALTO ASKER_IP:PORT NONCE\n"; it dials there
 *             directly and sends ARCEUS-RELAY 1 DATA 0 NONCE\n, then serves
 *             the worker's bytes. The relay carries nothing of it. */
#ifndef AR_NET_RELAY_H
#define AR_NET_RELAY_H

#include "net/net.h"

#include <stddef.h>
#include <stdint.h>

#define AR_RELAY_KEY_BYTES 32
/* "PROVIDER.LEASE.EXPIRY:MAC", decimal numbers and 64 hex digits */
#define AR_RELAY_PASS_MAX 160
#define AR_RELAY_CREDENTIAL_HEX 64
/* What one relay admits, unless told otherwise: circuits open at once to one
 * provider (its driver's channel and the previous stage's, with room for
 * those of a recovery that have not closed yet), from one client host (a
 * renter's driver reaches each of its relayed stages), and in all. */
#define AR_RELAY_DEFAULT_PER_PROVIDER 16
#define AR_RELAY_DEFAULT_PER_CLIENT 64
#define AR_RELAY_DEFAULT_CIRCUITS 1024
/* Control connections from one host (providers behind one router share its
 * address) and in all. */
#define AR_RELAY_CONTROLS_PER_HOST 64
#define AR_RELAY_MAX_CONTROLS 16384
/* Control connections ping every this many seconds. */
#define AR_RELAY_PING_S 5
/* A lease's passes last this long (a run outlives no lease by more); the
 * market's own reach checks use passes of AR_RELAY_PROBE_PASS_S. */
#define AR_RELAY_PASS_S (30 * 86400)
#define AR_RELAY_PROBE_PASS_S 120

/* ---- the shared key, passes and credentials ---------------------------- */

/* The key from a file the market and its relay share: SHA-256 of its
 * contents, which must be at least 32 bytes (head -c 32 /dev/urandom > F).
 * A file that others than its owner may read is refused. */
int ar_relay_key_load(const char *path, unsigned char key[AR_RELAY_KEY_BYTES]);
/* A fresh random key (a market with a built-in relay and no key file). */
int ar_relay_key_random(unsigned char key[AR_RELAY_KEY_BYTES]);
/* The pass that opens circuits to provider's worker for lease (0: the
 * market's own checks) until expiry (unix seconds). */
void ar_relay_pass(const unsigned char key[AR_RELAY_KEY_BYTES], int64_t provider, int64_t lease, int64_t expiry,
                   char out[AR_RELAY_PASS_MAX]);
/* The credential of provider's control connection (it serves `address`). */
void ar_relay_credential(const unsigned char key[AR_RELAY_KEY_BYTES], int64_t provider, const char *address,
                         char out[AR_RELAY_CREDENTIAL_HEX + 1]);
/* Whether `pass` has a pass's form (what a client puts in a URL): the
 * digits, dots, colon and hex of one, at most AR_RELAY_PASS_MAX - 1 long. */
int ar_relay_pass_wellformed(const char *pass);
/* A pass checked against the key at `now`: AR_OK with its provider and
 * lease, AR_EINVAL (malformed, wrong MAC, expired: the message says which). */
int ar_relay_pass_check(const unsigned char key[AR_RELAY_KEY_BYTES], const char *pass, int64_t now,
                        int64_t *provider, int64_t *lease);

/* ---- the relay server ---------------------------------------------------- */

typedef struct ar_relay ar_relay;

typedef struct {
    const char *listen; /* HOST:PORT (port 0 picks one) */
    unsigned char key[AR_RELAY_KEY_BYTES];
    int per_provider, per_client, circuits; /* 0: the defaults above */
    /* Optional, for a relay inside the market: whether `lease` is live and
     * holds `provider` (the market's own checks pass lease 0). NULL: a valid
     * pass is enough (a standalone relay has no database). */
    int (*lease_live)(void *ctx, int64_t provider, int64_t lease);
    void *lease_ctx;
} ar_relay_config;

typedef struct {
    long providers;        /* control connections attached now */
    long circuits_open;    /* spliced now */
    long circuits;         /* opened since the start */
    long refused;          /* circuit requests refused, all reasons: */
    long refused_pass;     /*   no pass, a malformed, forged or expired one, a lease not live */
    long refused_absent;   /*   the provider is not attached */
    long refused_limit;    /*   a limit per provider, per client or in all; a blocked host */
    long refused_timeout;  /*   the provider did not dial back in time */
    long refused_other;    /*   not a request the relay speaks, or too slow to arrive */
    long controls_refused; /* control connections with a bad credential or over a limit */
    long reversed;         /* providers asked to dial a reachable stage back directly */
    double bytes;          /* spliced both ways */
} ar_relay_stats;

/* Bind, start serving; *addr gets HOST:PORT with the real port. */
int ar_relay_start(const ar_relay_config *c, ar_relay **out, char *addr, size_t addr_size);
/* Close every connection and circuit, stop. */
void ar_relay_stop(ar_relay *r);
void ar_relay_get_stats(ar_relay *r, ar_relay_stats *out);
/* "2 providers attached, 3 circuits open (12 opened), 4 refused (...)" */
void ar_relay_stats_text(const ar_relay_stats *s, char *buf, size_t size);

/* ---- a provider's side ----------------------------------------------------- */

typedef struct ar_relay_attach ar_relay_attach;

/* Keep a control connection to `relay` open for provider_id, whose worker
 * serves `address` (as registered): reconnect with backoff while it is
 * down, and for every DIAL dial a data connection back and hand it to
 * adopt(ctx, fd), which owns fd from then on (a worker: ar_worker_adopt).
 * Logs when it attaches and when it loses the relay (once per outage). */
typedef int (*ar_relay_adopt_fn)(void *ctx, int fd);
int ar_relay_attach_start(const char *relay, int64_t provider_id, const char *address, const char *credential,
                          ar_relay_adopt_fn adopt, void *ctx, ar_relay_attach **out);
/* Whether the control connection is up now. */
int ar_relay_attached(ar_relay_attach *a);
/* Whether the relay's last answer was a refusal (NO): a credential of
 * another key (a market restarted without its --relay-secret draws a new
 * one), to be fetched again by registering. */
int ar_relay_attach_refused(ar_relay_attach *a);
void ar_relay_attach_stop(ar_relay_attach *a);

/* ---- a stage that can be dialled, and its relayed next stage ----------------------- */

/* A channel to the relayed worker at addr that has it dial this process back
 * directly (the relay's REVERSE; this process must be reachable, as a
 * direct provider's is): gRPC's tunnel goes to a proxy of this process on
 * loopback, which asks the relay with `pass`, waits a few seconds for the
 * worker's connection at a meeting point it listens on (any address, a port
 * of its own), and splices the tunnel to it; failing that, it opens the
 * tunnel through the relay instead. HTTP/2 and TLS run end to end either
 * way. The proxy and meeting point stay up for the process's life. */
int ar_client_open_reversed(const char *addr, const char *relay, const char *pass, ar_client **out);

/* ---- sockets and splicing --------------------------------------------------------- */

/* HOST:PORT (a name, an IPv4 address or a bracketed IPv6 one) resolved
 * for a TCP socket; passive: for listening, an empty HOST meaning every
 * address. *res is for freeaddrinfo. AR_EINVAL: not HOST:PORT; AR_EIO: no
 * address. */
struct addrinfo;
int ar_net_resolve(const char *hostport, int passive, struct addrinfo **res);

/* A TCP connection to HOST:PORT within timeout_s, blocking afterwards; -1
 * with the reason in ar_last_error(). */
int ar_net_dial(const char *hostport, double timeout_s);


/* Copy bytes both ways between two connected sockets until both directions
 * have ended (each end's EOF passed on as a half-close), one fails, or *stop
 * becomes non-zero (checked every second; may be NULL). Through the kernel's
 * pipes (splice(2)): the bytes are not copied into this process. Closes
 * neither socket. Returns the bytes moved. */
double ar_net_splice(int a, int b, const volatile int *stop);

/* ---- parsing (exposed for tests and fuzz/fuzz_relay.c) ---------------------- */

/* A circuit request: the CONNECT target and the pass of its
 * Proxy-Authorization header ("" when there is none). buf holds the whole
 * request, up to and including the empty line. AR_EINVAL for anything
 * else. */
typedef struct {
    char target[256];
    char pass[AR_RELAY_PASS_MAX];
} ar_relay_connect;
int ar_relay_parse_connect(const char *buf, size_t len, ar_relay_connect *out);

#endif
