/* arceus relay: a relay of its own for a market's providers that nobody can
 * dial (net/relay.h; docs/DESIGN.md, "The relay"). A market can also run one
 * inside itself (arceus market --relay). */
#include "cli/cli.h"
#include "core/core.h"
#include "net/relay.h"

#include <openssl/crypto.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    const char *listen, *secret;
    int per_provider, per_client, circuits;
} relay_opts;

#define AT(member) AR_OPTION_AT(relay_opts, member)

static const ar_option relay_options[] = {
    {.name = "listen", .kind = AR_OPTION_HOSTPORT, AT(listen), .metavar = "HOST:PORT", .required = 1,
     .hint = "for example 0.0.0.0:7100",
     .help = "address to listen on: the address the market tells providers and renters (arceus market "
             "--relay-at)"},
    {.name = "secret", .kind = AR_OPTION_STRING, AT(secret), .metavar = "FILE", .required = 1,
     .hint = "head -c 32 /dev/urandom > relay.key; chmod 600 relay.key",
     .help = "the key shared with the market (arceus market --relay-secret FILE): at least 32 bytes, "
             "readable by its owner only"},
    {.name = "max-per-provider", .kind = AR_OPTION_INT, AT(per_provider), .lo = 1, .hi = 100000, .metavar = "N",
     .def = AR_OPTION_STR(AR_RELAY_DEFAULT_PER_PROVIDER), .help = "circuits open at once to one provider"},
    {.name = "max-per-client", .kind = AR_OPTION_INT, AT(per_client), .lo = 1, .hi = 100000, .metavar = "N",
     .def = AR_OPTION_STR(AR_RELAY_DEFAULT_PER_CLIENT), .help = "circuits open at once from one client host"},
    {.name = "max-circuits", .kind = AR_OPTION_INT, AT(circuits), .lo = 1, .hi = 1000000, .metavar = "N",
     .def = AR_OPTION_STR(AR_RELAY_DEFAULT_CIRCUITS), .help = "circuits open at once in all"},
    {0},
};

static int run_relay(void *opts);

const ar_cmd_spec ar_relay_cmd = {
    .name = "relay",
    .summary = "relay renters to providers that cannot be dialled (behind NAT)",
    .usage = "--listen HOST:PORT --secret FILE [options]",
    .description =
        "Relay for a market's providers that nobody can dial (a machine behind a home router or a "
        "firewall). Such a provider keeps a control connection open to the relay; a renter's driver or "
        "the stage before it asks the relay for a circuit (an HTTP CONNECT tunnel with a pass the market "
        "issued for the lease), the relay asks the provider to dial back, and splices the two TCP "
        "connections byte for byte: TLS, when used, stays end to end. Only passes the market made with "
        "the shared --secret open a circuit; refused requests are counted, and a host with five in ten "
        "seconds is refused for thirty. Run the market with --relay-at HOST:PORT --relay-secret FILE "
        "(or let it run its own relay: arceus market --relay). Prints \"arceus relay: listening on "
        "HOST:PORT\" once ready, its counts as they change, and stops cleanly on SIGINT or SIGTERM.",
    .sections = (const ar_option_section[]){{NULL, relay_options, 0}, {0}},
    .opts_size = sizeof(relay_opts),
    .run = run_relay,
};

static int run_relay(void *opts)
{
    const relay_opts *o = opts;
    ar_relay_config c = {.listen = o->listen, .per_provider = o->per_provider, .per_client = o->per_client,
                         .circuits = o->circuits};
    if (ar_relay_key_load(o->secret, c.key) != AR_OK) {
        ar_cli_error("relay", "%s", ar_last_error());
        return 2;
    }
    ar_cli_block_stop_signals();
    ar_relay *r;
    char addr[300];
    int rc = ar_relay_start(&c, &r, addr, sizeof addr);
    OPENSSL_cleanse(c.key, sizeof c.key);
    if (rc != AR_OK) {
        ar_cli_error("relay", "%s", ar_last_error());
        return 1;
    }
    printf("arceus relay: listening on %s\n", addr);
    fflush(stdout);
    ar_cli_wait_stop_signal("relay");
    ar_relay_stats s;
    ar_relay_get_stats(r, &s);
    ar_relay_stop(r);
    char text[400];
    ar_relay_stats_text(&s, text, sizeof text);
    printf("arceus relay: %s\n", text);
    fflush(stdout);
    return 0;
}
