/* IDX files (MNIST, Fashion-MNIST), plain or gzip'd, and image sets built
 * from a pair of them.
 *
 * The file is read as a stream (stdio or zlib), not slurped whole: the
 * header says how big the payload is, we validate that against a sanity
 * limit, allocate exactly that and read it. A payload shorter than the
 * header promises is an error, and so is trailing data after it (the
 * format has none; extra bytes mean the dims are wrong). */
#include "data/data.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

/* Largest payload we accept: 2 GiB, far above any IDX data set in use. */
#define IDX_MAX_BYTES ((uint64_t)1 << 31)
/* The first payload buffer; it doubles while more data comes. */
#define IDX_FIRST_CHUNK ((size_t)1 << 20)

/* A byte source that is either a plain file or a gzip stream. */
typedef struct {
    FILE *plain;
    gzFile gz;
    const char *path;
} idx_src;

static int src_open(idx_src *s, const char *path)
{
    memset(s, 0, sizeof *s);
    s->path = path;
    FILE *f = fopen(path, "rb");
    if (!f)
        return ar_fail(errno == ENOENT ? AR_ENOTFOUND : AR_EIO, "%s: %s", path, strerror(errno));
    unsigned char m[2];
    size_t got = fread(m, 1, 2, f);
    if (ferror(f)) {
        fclose(f);
        return ar_fail(AR_EIO, "%s: read error", path);
    }
    if (got == 2 && m[0] == 0x1f && m[1] == 0x8b) {
        fclose(f);
        s->gz = gzopen(path, "rb");
        if (!s->gz)
            return ar_fail(errno == ENOENT ? AR_ENOTFOUND : AR_EIO, "%s: cannot open gzip stream",
                           path);
        /* a larger buffer makes inflating 47 MB of images noticeably faster */
        gzbuffer(s->gz, 1 << 17);
        return AR_OK;
    }
    rewind(f);
    s->plain = f;
    return AR_OK;
}

static void src_close(idx_src *s)
{
    if (s->plain)
        fclose(s->plain);
    if (s->gz)
        gzclose(s->gz);
    s->plain = NULL;
    s->gz = NULL;
}

/* Read up to n bytes; *got says how many came. Returns AR_EIO (or
 * AR_EFORMAT for a corrupt gzip stream) on a read error; a short read at
 * the end of the data is not an error here, the caller judges it. */
static int src_read(idx_src *s, void *buf, size_t n, size_t *got)
{
    *got = 0;
    if (s->plain) {
        *got = fread(buf, 1, n, s->plain);
        if (ferror(s->plain))
            return ar_fail(AR_EIO, "%s: read error: %s", s->path, strerror(errno));
        return AR_OK;
    }
    unsigned char *p = buf;
    while (*got < n) {
        size_t want = n - *got;
        if (want > (1u << 30))
            want = 1u << 30;
        int r = gzread(s->gz, p + *got, (unsigned)want);
        if (r < 0) {
            int zerr = 0;
            const char *msg = gzerror(s->gz, &zerr);
            return ar_fail(zerr == Z_ERRNO ? AR_EIO : AR_EFORMAT, "%s: corrupt gzip data: %s",
                           s->path, msg ? msg : "unknown zlib error");
        }
        if (r == 0)
            break;
        *got += (size_t)r;
    }
    if (*got < n) {
        /* zlib reports a truncated gzip stream as Z_BUF_ERROR with a short read */
        int zerr = 0;
        const char *msg = gzerror(s->gz, &zerr);
        if (zerr != Z_OK && zerr != Z_BUF_ERROR)
            return ar_fail(zerr == Z_ERRNO ? AR_EIO : AR_EFORMAT, "%s: corrupt gzip data: %s",
                           s->path, msg ? msg : "unknown zlib error");
    }
    return AR_OK;
}

static uint32_t be32(const unsigned char *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | (uint32_t)b[3];
}

static int idx_read(idx_src *s, const char *path, ar_idx *out)
{
    unsigned char head[4 + 4 * 4];
    size_t got;
    int rc = src_read(s, head, 4, &got);
    if (rc)
        return rc;
    if (got < 4)
        return ar_fail(AR_EFORMAT, "%s: truncated header (%zu of 4 magic bytes)", path, got);
    if (head[0] != 0 || head[1] != 0)
        return ar_fail(AR_EFORMAT, "%s: bad IDX magic 0x%08x", path, be32(head));
    if (head[2] != 0x08)
        return ar_fail(AR_EFORMAT, "%s: IDX element type 0x%02x not supported (only 0x08, unsigned byte)",
                       path, head[2]);
    int ndim = head[3];
    if (ndim < 1 || ndim > 4)
        return ar_fail(AR_EFORMAT, "%s: IDX has %d dimensions (1 to 4 supported)", path, ndim);
    size_t want = 4 * (size_t)ndim;
    rc = src_read(s, head + 4, want, &got);
    if (rc)
        return rc;
    if (got < want)
        return ar_fail(AR_EFORMAT, "%s: truncated header (%zu of %zu dimension bytes)", path, got,
                       want);
    uint64_t count = 1;
    for (int i = 0; i < ndim; i++) {
        uint32_t d = be32(head + 4 + 4 * i);
        if (d == 0)
            return ar_fail(AR_EFORMAT, "%s: dimension %d is zero", path, i);
        count *= d; /* at most 2^31 * 2^32 before the check below, no overflow */
        if (count > IDX_MAX_BYTES)
            return ar_fail(AR_ELIMIT, "%s: payload larger than %llu bytes", path,
                           (unsigned long long)IDX_MAX_BYTES);
        out->dims[i] = d;
    }
    out->ndim = ndim;
    out->count = (size_t)count;
    /* Memory only for bytes that exist: 20 header bytes may claim 2 GiB. A
     * plain file's length is checked up front; a gzip stream's is known only
     * by inflating it, so its buffer grows (doubling) as the data comes. */
    size_t header = 4 + want;
    struct stat st;
    if (s->plain && fstat(fileno(s->plain), &st) == 0 && S_ISREG(st.st_mode) &&
        (uint64_t)st.st_size < header + count)
        return ar_fail(AR_EFORMAT, "%s: truncated payload: the header says %zu bytes, the file "
                       "holds %llu", path, out->count, (unsigned long long)(st.st_size - header));
    size_t have = 0, cap = 0;
    got = 0;
    do {
        if (have == cap) {
            size_t ncap = cap ? cap * 2 : IDX_FIRST_CHUNK;
            if (ncap > out->count)
                ncap = out->count;
            /* malloc'd like ar_calloc's memory: ar_idx_free's ar_free takes both */
            uint8_t *grown = realloc(out->data, ncap);
            if (!grown)
                return ar_fail(AR_ENOMEM, "%s: out of memory for a %zu-byte payload", path, ncap);
            out->data = grown;
            cap = ncap;
        }
        rc = src_read(s, out->data + have, cap - have, &got);
        if (rc)
            return rc;
        have += got;
    } while (got > 0 && have < out->count);
    if (have < out->count)
        return ar_fail(AR_EFORMAT, "%s: truncated payload: %zu of %zu bytes", path, have,
                       out->count);
    /* one byte more must not exist; for gzip this also checks the CRC trailer */
    unsigned char extra[64];
    rc = src_read(s, extra, sizeof extra, &got);
    if (rc)
        return rc;
    if (got > 0)
        return ar_fail(AR_EFORMAT, "%s: %s%zu bytes of trailing data after the %zu-byte payload",
                       path, got == sizeof extra ? "at least " : "", got, out->count);
    return AR_OK;
}

int ar_idx_load(const char *path, ar_idx *out)
{
    if (!out)
        return ar_fail(AR_EINVAL, "ar_idx_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!path)
        return ar_fail(AR_EINVAL, "ar_idx_load: path is NULL");
    idx_src s;
    int rc = src_open(&s, path);
    if (rc)
        return rc;
    rc = idx_read(&s, path, out);
    src_close(&s);
    if (rc)
        ar_idx_free(out);
    return rc;
}

void ar_idx_free(ar_idx *idx)
{
    if (!idx)
        return;
    ar_free(idx->data);
    memset(idx, 0, sizeof *idx);
}

/* ---- image sets ---------------------------------------------------------- */

/* "<dir>/<prefix>-<kind>-ubyte", then the same with ".gz". */
static int find_file(const char *dir, const char *prefix, const char *kind, char *path,
                     size_t cap)
{
    size_t dl = strlen(dir);
    const char *sep = (dl > 0 && dir[dl - 1] == '/') ? "" : "/";
    int n = snprintf(path, cap, "%s%s%s-%s-ubyte", dir, sep, prefix, kind);
    if (n < 0 || (size_t)n + 3 >= cap)
        return ar_fail(AR_EINVAL, "%s: path too long", dir);
    FILE *f = fopen(path, "rb");
    if (f) {
        fclose(f);
        return AR_OK;
    }
    if (errno != ENOENT)
        return ar_fail(AR_EIO, "%s: %s", path, strerror(errno));
    strcat(path, ".gz");
    f = fopen(path, "rb");
    if (f) {
        fclose(f);
        return AR_OK;
    }
    return ar_fail(errno == ENOENT ? AR_ENOTFOUND : AR_EIO, "%s: %s (also tried without .gz)",
                   path, strerror(errno));
}

int ar_image_set_load(const char *dir, const char *prefix, ar_image_set *out)
{
    if (!out)
        return ar_fail(AR_EINVAL, "ar_image_set_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!dir || !prefix)
        return ar_fail(AR_EINVAL, "ar_image_set_load: dir or prefix is NULL");

    char ipath[4096], lpath[4096];
    int rc = find_file(dir, prefix, "images-idx3", ipath, sizeof ipath);
    if (rc)
        return rc;
    rc = find_file(dir, prefix, "labels-idx1", lpath, sizeof lpath);
    if (rc)
        return rc;

    ar_idx im, lb;
    rc = ar_idx_load(ipath, &im);
    if (rc)
        return rc;
    rc = ar_idx_load(lpath, &lb);
    if (rc) {
        ar_idx_free(&im);
        return rc;
    }
    if (im.ndim != 3) {
        rc = ar_fail(AR_EFORMAT, "%s: images need 3 dimensions (N, rows, cols), file has %d", ipath,
                     im.ndim);
        goto done;
    }
    if (lb.ndim != 1) {
        rc = ar_fail(AR_EFORMAT, "%s: labels need 1 dimension (N), file has %d", lpath, lb.ndim);
        goto done;
    }
    if (im.dims[0] != lb.dims[0]) {
        rc = ar_fail(AR_ESHAPE, "%s has %u images but %s has %u labels", ipath, im.dims[0], lpath,
                     lb.dims[0]);
        goto done;
    }
    if (im.dims[0] > INT_MAX || (uint64_t)im.dims[1] * im.dims[2] > INT_MAX) {
        rc = ar_fail(AR_ELIMIT, "%s: too many images or features", ipath);
        goto done;
    }
    int count = (int)im.dims[0];
    int features = (int)(im.dims[1] * im.dims[2]);
    out->images = ar_calloc(im.count, sizeof(float));
    out->labels = ar_calloc((size_t)count, sizeof(int32_t));
    if (!out->images || !out->labels) {
        rc = AR_ENOMEM;
        goto done;
    }
    for (size_t i = 0; i < im.count; i++)
        out->images[i] = (float)im.data[i] / 255.0f;
    int maxl = 0;
    for (int i = 0; i < count; i++) {
        /* labels are single bytes, so always < 256 */
        out->labels[i] = lb.data[i];
        if (lb.data[i] > maxl)
            maxl = lb.data[i];
    }
    out->count = count;
    out->features = features;
    out->classes = maxl + 1;
done:
    ar_idx_free(&im);
    ar_idx_free(&lb);
    if (rc)
        ar_image_set_free(out);
    return rc;
}

void ar_image_set_free(ar_image_set *s)
{
    if (!s)
        return;
    ar_free(s->images);
    ar_free(s->labels);
    memset(s, 0, sizeof *s);
}
