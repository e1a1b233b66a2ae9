/* Error codes and the per-thread error detail. */
#include "arceus.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[512] = "no error";

/* The messages, indexed by -code. A gap in the codes would leave the table
 * longer than the list (the assertion below), a code given twice would be an
 * initializer overridden (-Woverride-init, in -Wextra) and a positive code an
 * index out of bounds: each stops the build. */
#define AR_ERROR_MESSAGE(name, value, message) [-(value)] = message,
static const char *const messages[] = {AR_ERRORS(AR_ERROR_MESSAGE)};
#undef AR_ERROR_MESSAGE

#define AR_ERROR_ONE(name, value, message) +1
enum { ERROR_COUNT = 0 AR_ERRORS(AR_ERROR_ONE) };
#undef AR_ERROR_ONE

_Static_assert(sizeof messages / sizeof messages[0] == ERROR_COUNT,
               "the error codes of AR_ERRORS (arceus.h) must run 0, -1, -2, ... without a gap");

const char *ar_strerror(int err)
{
    /* compared before negating: -INT_MIN would overflow */
    if (err > 0 || err <= -ERROR_COUNT)
        return "unknown error";
    return messages[-err];
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
