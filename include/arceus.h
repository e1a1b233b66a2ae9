/* Arceus public API: decentralized training of neural networks.
 *
 * Conventions (see docs/DESIGN.md, "Code habits"):
 *   - public names start with ar_; file-local ones are static;
 *   - functions return 0 on success or a negative AR_E* code; ar_strerror()
 *     names the code and ar_last_error() gives the detail of the last failure
 *     on the calling thread ("spec.json: unknown key 'n_heads'");
 *   - input from a user or the network never aborts the process. */
#ifndef ARCEUS_H
#define ARCEUS_H

#include <stddef.h>
#include <stdint.h>

#define AR_VERSION_STRING "0.1.0"

/* Every error code: its name, its value and its short message (ar_strerror).
 * This one list makes both the enum below and the messages in
 * src/core/error.c, so the two cannot drift apart. The codes run 0, -1, -2,
 * ... without a gap (error.c checks it when it compiles); a new code goes at
 * the end. */
#define AR_ERRORS(X)                                                                               \
    X(AR_OK, 0, "success")                                                                         \
    X(AR_ENOMEM, -1, "out of memory")       /* an allocation failed */                             \
    X(AR_EINVAL, -2, "invalid argument")    /* a bad argument or value */                          \
    X(AR_EIO, -3, "input/output error")     /* a file or socket could not be read or written */    \
    X(AR_EFORMAT, -4, "malformed input")    /* bad magic, truncated file, bad JSON */              \
    X(AR_ESHAPE, -5, "shape mismatch")      /* tensor shapes disagree */                           \
    X(AR_ENOTFOUND, -6, "not found")        /* a file, key or tensor is missing */                 \
    X(AR_EPROTO, -7, "protocol error")      /* a peer broke the protocol */                        \
    X(AR_ECLOSED, -8, "connection closed")  /* a link or peer went away */                         \
    X(AR_ELIMIT, -9, "limit exceeded")      /* a configured limit was exceeded */                  \
    X(AR_EINTERNAL, -10, "internal error")  /* a bug: an invariant did not hold */

#define AR_ERROR_ENUMERATOR(name, value, message) name = (value),
enum ar_error { AR_ERRORS(AR_ERROR_ENUMERATOR) };
#undef AR_ERROR_ENUMERATOR

/* Short name of an error code: "out of memory", "malformed input", ... */
const char *ar_strerror(int err);

/* Detail of the last error recorded on this thread (never NULL). */
const char *ar_last_error(void);

/* Record a detailed error message for this thread and return err, so that
 * callers can write: return ar_fail(AR_EFORMAT, "%s: bad magic", path); */
int ar_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Threads used by BLAS and by the element-wise kernels (0 = all cores). */
void ar_set_threads(int n);
int ar_get_threads(void);

#endif
