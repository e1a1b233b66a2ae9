/* Memory, random numbers, threads, time, logging and files. */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "blas.h"
#include "device.h"

/* ---- memory ------------------------------------------------------------ */

void *ar_calloc(size_t count, size_t size)
{
    if (size != 0 && count > SIZE_MAX / size) {
        ar_fail(AR_ENOMEM, "allocation of %zu x %zu bytes overflows", count, size);
        return NULL;
    }
    size_t bytes = count * size;
    if (bytes == 0)
        bytes = 1;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded < bytes) {
        ar_fail(AR_ENOMEM, "allocation of %zu bytes overflows", bytes);
        return NULL;
    }
    void *p = aligned_alloc(64, rounded);
    if (!p) {
        ar_fail(AR_ENOMEM, "out of memory allocating %zu bytes", bytes);
        return NULL;
    }
    memset(p, 0, rounded);
    return p;
}

void ar_free(void *p)
{
    free(p);
}

/* ---- random numbers ----------------------------------------------------- */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void ar_rng_seed(ar_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t ar_rng_next(ar_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

float ar_rng_uniform(ar_rng *r)
{
    return (float)(ar_rng_next(r) >> 40) * (1.0f / 16777216.0f);
}

uint64_t ar_rng_below(ar_rng *r, uint64_t n)
{
    if (n == 0)
        return 0;
    /* rejection sampling keeps the result unbiased */
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do {
        x = ar_rng_next(r);
    } while (x >= limit);
    return x % n;
}

float ar_rng_normal(ar_rng *r)
{
    double u1 = ((ar_rng_next(r) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (ar_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

uint64_t ar_hash3(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t x = a * 0x9e3779b97f4a7c15ULL;
    uint64_t h = splitmix64(&x);
    x = h ^ (b * 0xc2b2ae3d27d4eb4fULL);
    h = splitmix64(&x);
    x = h ^ (c * 0x165667b19e3779f9ULL);
    return splitmix64(&x);
}

/* ---- threads ------------------------------------------------------------ */

static int thread_count = 0;

void ar_set_threads(int n)
{
    /* all the cores this process may use, as the device probe counts them */
    int cores = ar_device_cores();
    if (n <= 0 || n > cores)
        n = cores;
    thread_count = n;
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

int ar_get_threads(void)
{
    if (thread_count == 0)
        ar_set_threads(0);
    return thread_count;
}

/* ---- time and logging --------------------------------------------------- */

double ar_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int log_level = AR_LOG_INFO;

void ar_log_set_level(int level)
{
    log_level = level;
}

void ar_log(int level, const char *fmt, ...)
{
    static const char *names[] = {"debug", "info", "warning", "error"};
    if (level < log_level)
        return;
    if (level < 0 || level > AR_LOG_ERROR)
        level = AR_LOG_ERROR;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "arceus: %s: %s\n", names[level], line);
}

/* ---- files -------------------------------------------------------------- */

int ar_read_file(const char *path, char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return ar_fail(errno == ENOENT ? AR_ENOTFOUND : AR_EIO, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return ar_fail(AR_EIO, "%s: not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    char *buf = ar_calloc(size + 1, 1);
    if (!buf) {
        fclose(f);
        return AR_ENOMEM;
    }
    size_t got = fread(buf, 1, size, f);
    int bad = ferror(f);
    fclose(f);
    if (bad || got != size) {
        ar_free(buf);
        return ar_fail(AR_EIO, "%s: read %zu of %zu bytes", path, got, size);
    }
    *out = buf;
    *len = size;
    return AR_OK;
}

int ar_mkdir_p(const char *path)
{
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf)
        return ar_fail(AR_EINVAL, "\"%s\": not a usable folder name", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0')
            continue;
        char saved = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return ar_fail(AR_EIO, "%s: cannot create the folder %s: %s", path, buf, strerror(errno));
        buf[i] = saved;
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return ar_fail(AR_EIO, "%s: not a folder", path);
    return AR_OK;
}

int ar_write_file_atomic(const char *path, const void *data, size_t len)
{
    char tmp[4096];
    int n = snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    if (n < 0 || (size_t)n >= sizeof tmp)
        return ar_fail(AR_EINVAL, "%s: path too long", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return ar_fail(AR_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            close(fd);
            unlink(tmp);
            return ar_fail(AR_EIO, "%s: write failed: %s", tmp, strerror(e));
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        unlink(tmp);
        return ar_fail(AR_EIO, "%s: cannot flush: %s", tmp, strerror(errno));
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return ar_fail(AR_EIO, "%s: cannot rename into place: %s", path, strerror(e));
    }
    return AR_OK;
}
