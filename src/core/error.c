/* Error codes and the per-thread error detail. */
#include "arceus.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[512] = "no error";

const char *ar_strerror(int err)
{
    switch (err) {
    case AR_OK: return "success";
    case AR_ENOMEM: return "out of memory";
    case AR_EINVAL: return "invalid argument";
    case AR_EIO: return "input/output error";
    case AR_EFORMAT: return "malformed input";
    case AR_ESHAPE: return "shape mismatch";
    case AR_ENOTFOUND: return "not found";
    case AR_EPROTO: return "protocol error";
    case AR_ECLOSED: return "connection closed";
    case AR_ELIMIT: return "limit exceeded";
    case AR_EINTERNAL: return "internal error";
    default: return "unknown error";
    }
}

const char *ar_last_error(void)
{
    return last_error;
}

int ar_fail(int err, const char *fmt, ...)
{
    /* format into a copy first: callers often pass ar_last_error() itself
     * as an argument, to add context to an earlier message */
    char msg[sizeof last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    memcpy(last_error, msg, sizeof msg);
    return err;
}
