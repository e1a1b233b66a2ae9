/* Core helpers: error messages that quote earlier ones, mkdir -p. */
#include <criterion/criterion.h>

#include "core/core.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

Test(core, error_context_can_quote_the_previous_error)
{
    ar_fail(AR_EIO, "disk full");
    int rc = ar_fail(AR_EIO, "saving stage %d: %s", 2, ar_last_error());
    cr_assert_eq(rc, AR_EIO);
    cr_assert_str_eq(ar_last_error(), "saving stage 2: disk full");
    ar_fail(AR_EIO, "%s", ar_last_error());
    cr_assert_str_eq(ar_last_error(), "saving stage 2: disk full");
}

/* The messages come from the same list as the codes (AR_ERRORS): spot checks
 * at both ends, and the codes outside the list. */
Test(core, strerror_names_every_code_and_only_those)
{
    cr_assert_str_eq(ar_strerror(AR_OK), "success");
    cr_assert_str_eq(ar_strerror(AR_ENOMEM), "out of memory");
    cr_assert_str_eq(ar_strerror(AR_EFORMAT), "malformed input");
    cr_assert_str_eq(ar_strerror(AR_EINTERNAL), "internal error");
    cr_assert_str_eq(ar_strerror(AR_EINTERNAL - 1), "unknown error");
    cr_assert_str_eq(ar_strerror(1), "unknown error");
    cr_assert_str_eq(ar_strerror(INT_MIN), "unknown error");
    cr_assert_str_eq(ar_strerror(INT_MAX), "unknown error");
}

Test(core, mkdir_p_creates_parents)
{
    char root[] = "/tmp/arceus-core-XXXXXX";
    cr_assert_not_null(mkdtemp(root));
    char path[256];
    snprintf(path, sizeof path, "%s/a/b/c", root);
    cr_assert_eq(ar_mkdir_p(path), AR_OK, "%s", ar_last_error());
    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    cr_assert(S_ISDIR(st.st_mode));
    cr_assert_eq(ar_mkdir_p(path), AR_OK, "existing folders are fine");
    /* a regular file in the way */
    char file[256];
    snprintf(file, sizeof file, "%s/f", root);
    FILE *f = fopen(file, "w");
    cr_assert_not_null(f);
    fclose(f);
    snprintf(path, sizeof path, "%s/f/sub", root);
    cr_assert_eq(ar_mkdir_p(path), AR_EIO);
    cr_assert_not_null(strstr(ar_last_error(), "f/sub"), "%s", ar_last_error());
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    cr_assert_eq(system(cmd), 0);
}
