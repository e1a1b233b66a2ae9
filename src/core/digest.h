/* SHA-256 of byte ranges (libcrypto), for the digests stages commit to after
 * every step (docs/DESIGN.md, "Audits by replay"). */
#ifndef AR_DIGEST_H
#define AR_DIGEST_H

#include <stddef.h>
#include <stdint.h>

#define AR_DIGEST_LEN 32

/* A running SHA-256: begin, add ranges, end. One context is reused step
 * after step (begin resets it); free it with ar_sha256_free. */
typedef struct {
    void *ctx; /* EVP_MD_CTX */
} ar_sha256;

int ar_sha256_begin(ar_sha256 *h);
int ar_sha256_add(ar_sha256 *h, const void *data, size_t len);
int ar_sha256_end(ar_sha256 *h, uint8_t out[AR_DIGEST_LEN]);
void ar_sha256_free(ar_sha256 *h);
/* One range at once. */
int ar_sha256_of(const void *data, size_t len, uint8_t out[AR_DIGEST_LEN]);
/* Lower-case hex of a digest into out[2 * AR_DIGEST_LEN + 1]. */
void ar_digest_hex(const uint8_t d[AR_DIGEST_LEN], char *out);

#endif
