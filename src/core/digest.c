/* SHA-256 through libcrypto's EVP interface (the low-level SHA256_* calls
 * are deprecated in OpenSSL 3). */
#include "core/digest.h"

#include "arceus.h"

#include <openssl/evp.h>

int ar_sha256_begin(ar_sha256 *h)
{
    if (!h->ctx && !(h->ctx = EVP_MD_CTX_new()))
        return ar_fail(AR_ENOMEM, "out of memory for a SHA-256 context");
    if (!EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL))
        return ar_fail(AR_EINTERNAL, "SHA-256 init failed");
    return AR_OK;
}

int ar_sha256_add(ar_sha256 *h, const void *data, size_t len)
{
    if (len && !EVP_DigestUpdate(h->ctx, data, len))
        return ar_fail(AR_EINTERNAL, "SHA-256 update failed");
    return AR_OK;
}

int ar_sha256_end(ar_sha256 *h, uint8_t out[AR_DIGEST_LEN])
{
    unsigned int n = 0;
    if (!EVP_DigestFinal_ex(h->ctx, out, &n) || n != AR_DIGEST_LEN)
        return ar_fail(AR_EINTERNAL, "SHA-256 final failed");
    return AR_OK;
}

void ar_sha256_free(ar_sha256 *h)
{
    EVP_MD_CTX_free(h->ctx);
    h->ctx = NULL;
}

int ar_sha256_of(const void *data, size_t len, uint8_t out[AR_DIGEST_LEN])
{
    ar_sha256 h = {0};
    int rc = ar_sha256_begin(&h);
    if (rc == AR_OK)
        rc = ar_sha256_add(&h, data, len);
    if (rc == AR_OK)
        rc = ar_sha256_end(&h, out);
    ar_sha256_free(&h);
    return rc;
}

void ar_digest_hex(const uint8_t d[AR_DIGEST_LEN], char *out)
{
    static const char hx[] = "0123456789abcdef";
    for (int i = 0; i < AR_DIGEST_LEN; i++) {
        out[2 * i] = hx[d[i] >> 4];
        out[2 * i + 1] = hx[d[i] & 15];
    }
    out[2 * AR_DIGEST_LEN] = 0;
}
