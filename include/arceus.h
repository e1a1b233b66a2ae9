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

enum ar_error {
    AR_OK = 0,
    AR_ENOMEM = -1,    /* an allocation failed */
    AR_EINVAL = -2,    /* a bad argument or value */
    AR_EIO = -3,       /* a file or socket could not be read or written */
    AR_EFORMAT = -4,   /* malformed input: bad magic, truncated file, bad JSON */
    AR_ESHAPE = -5,    /* tensor shapes disagree */
    AR_ENOTFOUND = -6, /* a file, key or tensor is missing */
    AR_EPROTO = -7,    /* a peer broke the protocol */
    AR_ECLOSED = -8,   /* a link or peer went away */
    AR_ELIMIT = -9,    /* a configured limit was exceeded */
    AR_EINTERNAL = -10 /* a bug: an invariant did not hold */
};

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
