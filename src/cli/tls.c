/* --tls-cert/--tls-key (servers) and --tls-ca (clients), shared by the
 * commands that serve or dial gRPC. */
#include "cli/cli.h"
#include "core/core.h"
#include "net/net.h"

#define AT(member) AR_OPTION_AT(ar_cli_tls, member)

const ar_option ar_cli_tls_server_options[] = {
    {.name = "tls-cert", .kind = AR_OPTION_STRING, AT(cert), .metavar = "FILE",
     .help = "serve over TLS with this PEM certificate (scripts/make-tls-cert.sh)"},
    {.name = "tls-key", .kind = AR_OPTION_STRING, AT(key), .metavar = "FILE",
     .help = "and this PEM private key (both or neither)"},
    {0},
};

const ar_option ar_cli_tls_client_options[] = {
    {.name = "tls-ca", .kind = AR_OPTION_STRING, AT(ca), .metavar = "FILE",
     .help = "dial over TLS, trusting servers signed by this PEM CA (without it, a TLS server "
             "refuses the connection)"},
    {0},
};

int ar_cli_tls_setup(const char *cmd, const ar_cli_tls *t)
{
    if (!t->cert != !t->key) {
        ar_cli_error(cmd, "--tls-cert and --tls-key go together (scripts/make-tls-cert.sh makes a pair)");
        return -1;
    }
    if (t->cert && ar_net_tls_server(t->cert, t->key) != AR_OK) {
        ar_cli_error(cmd, "%s", ar_last_error());
        return -1;
    }
    if (t->ca && ar_net_tls_client(t->ca) != AR_OK) {
        ar_cli_error(cmd, "%s", ar_last_error());
        return -1;
    }
    return 0;
}
