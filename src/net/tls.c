/* TLS: one process-wide configuration, set by the command line
 * before any server or channel exists. Servers created afterwards present the
 * certificate and key; channels verify the server against the CA. A process
 * with no CA dials in plaintext, which a TLS server refuses.
 *
 * Host names are checked the usual way, against the certificate's
 * subjectAltName: scripts/make-tls-cert.sh makes one that covers localhost and
 * 127.0.0.1 (add more names or addresses there for other machines). */
#include "net/net_internal.h"

#include "core/core.h"

#include <grpc/grpc_security.h>
#include <pthread.h>
#include <string.h>

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static char *g_cert, *g_key, *g_ca; /* PEM text, kept for the process */

/* Read a PEM file and check that it holds a block of the expected kind. */
static int read_pem(const char *what, const char *path, const char *marker, char **out)
{
    char *text;
    size_t len;
    if (!path || !*path)
        return ar_fail(AR_EINVAL, "TLS %s: no file given", what);
    if (ar_read_file(path, &text, &len) != AR_OK)
        return ar_fail(AR_EIO, "TLS %s: cannot read %s", what, ar_last_error());
    if (len == 0 || strlen(text) != len || !strstr(text, "-----BEGIN") || !strstr(text, marker)) {
        ar_free(text);
        return ar_fail(AR_EINVAL, "TLS %s: %s is not a PEM file with a \"%s\" block", what, path, marker);
    }
    *out = text;
    return AR_OK;
}

int ar_net_tls_server(const char *cert_pem_path, const char *key_pem_path)
{
    char *cert = NULL, *key = NULL;
    int rc = read_pem("certificate", cert_pem_path, "CERTIFICATE-----", &cert);
    if (rc == AR_OK)
        rc = read_pem("key", key_pem_path, "PRIVATE KEY-----", &key);
    if (rc != AR_OK) {
        ar_free(cert);
        return rc;
    }
    pthread_mutex_lock(&g_mu);
    ar_free(g_cert);
    ar_free(g_key);
    g_cert = cert;
    g_key = key;
    pthread_mutex_unlock(&g_mu);
    return AR_OK;
}

int ar_net_tls_client(const char *ca_pem_path)
{
    char *ca = NULL;
    int rc = read_pem("CA", ca_pem_path, "CERTIFICATE-----", &ca);
    if (rc != AR_OK)
        return rc;
    pthread_mutex_lock(&g_mu);
    ar_free(g_ca);
    g_ca = ca;
    pthread_mutex_unlock(&g_mu);
    return AR_OK;
}

void ar_net_tls_reset(void)
{
    pthread_mutex_lock(&g_mu);
    ar_free(g_cert);
    ar_free(g_key);
    ar_free(g_ca);
    g_cert = g_key = g_ca = NULL;
    pthread_mutex_unlock(&g_mu);
}

int net_tls_server_on(void)
{
    pthread_mutex_lock(&g_mu);
    int on = g_cert != NULL;
    pthread_mutex_unlock(&g_mu);
    return on;
}

int net_tls_client_on(void)
{
    pthread_mutex_lock(&g_mu);
    int on = g_ca != NULL;
    pthread_mutex_unlock(&g_mu);
    return on;
}

grpc_server_credentials *net_server_credentials(void)
{
    grpc_server_credentials *creds;
    pthread_mutex_lock(&g_mu);
    if (g_cert) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = g_key, .cert_chain = g_cert};
        creds = grpc_ssl_server_credentials_create(NULL, &pair, 1, 0, NULL);
    } else {
        creds = grpc_insecure_server_credentials_create();
    }
    pthread_mutex_unlock(&g_mu);
    return creds;
}

grpc_channel_credentials *net_channel_credentials(void)
{
    grpc_channel_credentials *creds;
    pthread_mutex_lock(&g_mu);
    if (g_ca)
        creds = grpc_ssl_credentials_create(g_ca, NULL, NULL, NULL);
    else
        creds = grpc_insecure_credentials_create();
    pthread_mutex_unlock(&g_mu);
    return creds;
}
