/* A temporary folder for a test suite's files (Criterion's .init = tmp_make,
 * .fini = tmp_remove) and files written into it, plain or gzip'd. */
#ifndef AR_TEST_TMPFILES_H
#define AR_TEST_TMPFILES_H

#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

static char tmpdir[256];

static inline void tmp_make(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/ar_test_XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}

/* The folder and the files in it (the tests write no subfolders). */
static inline void tmp_remove(void)
{
    DIR *d = opendir(tmpdir);
    cr_assert_not_null(d, "%s: %s", tmpdir, strerror(errno));
    struct dirent *e;
    char p[512];
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
            unlink(p);
        }
    closedir(d);
    cr_assert_eq(rmdir(tmpdir), 0, "%s: %s", tmpdir, strerror(errno));
}

static inline const char *tmp_path(const char *name)
{
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", tmpdir, name);
    return p;
}

/* Write len bytes to the file `name` of the folder (gzip'd when gz); its path. */
static inline const char *tmp_write(const char *name, const void *data, size_t len, int gz)
{
    const char *p = tmp_path(name);
    if (gz) {
        gzFile f = gzopen(p, "wb");
        cr_assert_not_null(f);
        if (len)
            cr_assert_eq(gzwrite(f, data, (unsigned)len), (int)len);
        cr_assert_eq(gzclose(f), Z_OK);
    } else {
        FILE *f = fopen(p, "wb");
        cr_assert_not_null(f);
        cr_assert_eq(fwrite(data, 1, len, f), len);
        cr_assert_eq(fclose(f), 0);
    }
    return p;
}

#endif
