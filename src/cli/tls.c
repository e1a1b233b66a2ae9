/* --tls-cert/--tls-key (servers) and --tls-ca (clients), shared by the
 * commands that serve or dial gRPC. */
#include "cli/cli.h"
#include "core/core.h"
#include "net/net.h"

#include <string.h>

int ar_cli_tls_option(ar_args *a, const char *name, int server, ar_cli_tls *t, int *rc)
{
    if (!strcmp(name, "tls-ca"))
        *rc = ar_args_string(a, &t->ca);
    else if (server && !strcmp(name, "tls-cert"))
        *rc = ar_args_string(a, &t->cert);
    else if (server && !strcmp(name, "tls-key"))
        *rc = ar_args_string(a, &t->key);
    else
        return 0;
    return 1;
}

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
