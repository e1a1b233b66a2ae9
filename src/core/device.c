/* The device probe: sgemm speed, free memory and cores, measured the same way
 * wherever a device is weighed (device.h). */
#include "device.h"

#include "blas.h"
#include "core.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef __linux__
#include <sched.h>
#endif

/* ---- sgemm speed ------------------------------------------------------- */

/* 512 is the size of the products the models train with (a GPT's n_embd and
 * hidden widths run 256-1024, the rows of a micro-batch more), large enough
 * that starting the threads costs little against the product, small enough
 * that one product takes milliseconds on a single slow core. */
#define PROBE_N 512
/* untimed: the BLAS thread pool starts, the pages are touched, the cores
 * leave their idle clock */
#define PROBE_WARMUP_S 0.02
/* Many short runs and the best of them: on a machine shared with other work
 * a long run averages in every interruption, while some short run usually
 * finds the cores free. A short pause before each run helps that: the
 * scheduler favours threads that have just slept. A run times at least
 * PROBE_RUN_S of whole products (two or more at 512, on a core of today). */
#define PROBE_RUNS 20
#define PROBE_RUN_S 0.005
#define PROBE_PAUSE_S 0.003
/* The probe stops repeating once this much has been spent (after at least
 * PROBE_MIN_RUNS runs, on a slow machine where a product outlasts a run): it
 * runs whenever a worker starts, a provider offers itself or a driver plans,
 * and should not hold any of them up. */
#define PROBE_BUDGET_S 0.2
#define PROBE_MIN_RUNS 3

static double cpu_seconds(void)
{
    struct timespec t;
    if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t) != 0)
        return 0;
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void pause_briefly(double seconds)
{
    struct timespec t = {.tv_sec = 0, .tv_nsec = (long)(seconds * 1e9)};
    /* an interrupted pause is only a shorter one */
    (void)nanosleep(&t, NULL);
}

static void product(const float *a, const float *b, float *c)
{
    ar_sgemm(0, 0, PROBE_N, PROBE_N, PROBE_N, 1.0f, a, PROBE_N, b, PROBE_N, 0.0f, c, PROBE_N);
}

/* Best GFLOP/s over the runs, and the CPU share of that run. */
static void time_products(const float *a, const float *b, float *c, int threads, double *gflops,
                          double *cpu_share)
{
    const double flop = 2.0 * PROBE_N * PROBE_N * (double)PROBE_N;
    double start = ar_now();
    do {
        product(a, b, c);
    } while (ar_now() - start < PROBE_WARMUP_S);

    *gflops = 0;
    *cpu_share = 0;
    for (int run = 0; run < PROBE_RUNS; run++) {
        if (run >= PROBE_MIN_RUNS && ar_now() - start + PROBE_PAUSE_S + PROBE_RUN_S > PROBE_BUDGET_S)
            break;
        pause_briefly(PROBE_PAUSE_S);
        long products = 0;
        double cpu0 = cpu_seconds(), t0 = ar_now(), elapsed;
        do {
            product(a, b, c);
            products++;
        } while ((elapsed = ar_now() - t0) < PROBE_RUN_S);
        double rate = flop * (double)products / elapsed / 1e9;
        if (rate > *gflops) {
            *gflops = rate;
            *cpu_share = (cpu_seconds() - cpu0) / (elapsed * threads);
        }
    }
}

int ar_device_probe(int threads, ar_device_info *out)
{
    memset(out, 0, sizeof *out);
    double start = ar_now();
    out->cores = ar_device_cores();
    out->free_bytes = ar_device_free_memory();
    if (threads <= 0 || threads > out->cores)
        threads = out->cores;
    out->threads = threads;

    float *a = ar_calloc((size_t)PROBE_N * PROBE_N, sizeof(float));
    float *b = ar_calloc((size_t)PROBE_N * PROBE_N, sizeof(float));
    float *c = ar_calloc((size_t)PROBE_N * PROBE_N, sizeof(float));
    if (!a || !b || !c) {
        ar_free(a);
        ar_free(b);
        ar_free(c);
        return ar_fail(AR_ENOMEM, "device probe: no memory for three %dx%d matrices", PROBE_N, PROBE_N);
    }
    /* small values that stay far from denormals and infinities, whose
     * arithmetic could be slower than the ordinary kind */
    for (size_t i = 0; i < (size_t)PROBE_N * PROBE_N; i++) {
        a[i] = (float)((int)(i % 7) - 3) * 0.01f;
        b[i] = (float)((int)(i % 5) - 2) * 0.01f;
    }
    int restore = ar_get_threads();
    ar_set_threads(threads);
    time_products(a, b, c, threads, &out->gflops, &out->cpu_share);
    ar_set_threads(restore);
    ar_free(a);
    ar_free(b);
    ar_free(c);
    out->seconds = ar_now() - start;
    return AR_OK;
}

/* ---- cores ------------------------------------------------------------- */

int ar_device_cores(void)
{
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores < 1)
        cores = 1;
#ifdef __linux__
    /* the mask may have more bits than a cpu_set_t (EINVAL): grow it */
    for (int bits = CPU_SETSIZE; bits <= (1 << 20); bits *= 2) {
        cpu_set_t *set = CPU_ALLOC(bits);
        if (!set)
            break;
        size_t size = CPU_ALLOC_SIZE(bits);
        CPU_ZERO_S(size, set);
        int rc = sched_getaffinity(0, size, set);
        int allowed = rc == 0 ? CPU_COUNT_S(size, set) : 0;
        int again = rc != 0 && errno == EINVAL;
        CPU_FREE(set);
        if (allowed >= 1 && allowed < cores)
            cores = allowed;
        if (!again)
            break;
    }
#endif
    return cores > 4096 ? 4096 : (int)cores;
}

/* ---- free memory ------------------------------------------------------- */

/* A small file (/proc, /sys) into buf, NUL-terminated; its length or -1.
 * Read in a loop: /proc files report a size of 0. */
static long read_small(const char *path, char *buf, size_t size)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = 0, got;
    while (n + 1 < size && (got = fread(buf + n, 1, size - 1 - n, f)) > 0)
        n += got;
    int bad = ferror(f);
    fclose(f);
    if (bad)
        return -1;
    buf[n] = '\0';
    return (long)n;
}

/* The number a file holds ("max" and anything else that is not a number:
 * no). */
static int read_number(const char *path, uint64_t *value)
{
    char text[64];
    if (read_small(path, text, sizeof text) <= 0)
        return 0;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || end == text || (*end != '\0' && *end != '\n'))
        return 0;
    *value = v;
    return 1;
}

/* The value of "key N" in a memory.stat file; 0 when absent. */
static uint64_t stat_value(const char *path, const char *key)
{
    char text[8192];
    if (read_small(path, text, sizeof text) <= 0)
        return 0;
    size_t klen = strlen(key);
    const char *line = text;
    while (line) {
        unsigned long long v;
        if (strncmp(line, key, klen) == 0 && line[klen] == ' ' && sscanf(line + klen, " %llu", &v) == 1)
            return v;
        line = strchr(line, '\n');
        if (line)
            line++;
    }
    return 0;
}

static int is_folder(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The file names of one cgroup version's memory controller. */
typedef struct {
    const char *limit, *usage, *inactive_key;
} memory_files;

static const memory_files cgroup_v2 = {"memory.max", "memory.current", "inactive_file"};
static const memory_files cgroup_v1 = {"memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"};

/* The least room under the limits of the cgroup at `path` of the hierarchy
 * mounted at `mount` and of its parents: a parent's limit holds its children
 * too. Page cache that is not in active use is counted as room, as
 * MemAvailable does: the kernel drops it before it would refuse memory. */
static uint64_t room_under(const char *mount, const char *path, const memory_files *files)
{
    char rel[1024], dir[2048], file[2200];
    int n = snprintf(rel, sizeof rel, "%s", path);
    if (n < 0 || (size_t)n >= sizeof rel)
        return UINT64_MAX;
    while (n > 0 && rel[n - 1] == '/')
        rel[--n] = '\0';
    /* In a container without its own cgroup namespace the path names the
     * host's hierarchy, while the container's own cgroup is mounted at the
     * top: then the top is the place to look. */
    snprintf(dir, sizeof dir, "%s%s", mount, rel);
    if (!is_folder(dir))
        rel[0] = '\0';
    uint64_t room = UINT64_MAX;
    for (;;) {
        snprintf(dir, sizeof dir, "%s%s", mount, rel);
        uint64_t limit, usage;
        snprintf(file, sizeof file, "%s/%s", dir, files->limit);
        int limited = read_number(file, &limit);
        snprintf(file, sizeof file, "%s/%s", dir, files->usage);
        if (limited && read_number(file, &usage)) {
            snprintf(file, sizeof file, "%s/memory.stat", dir);
            uint64_t inactive = stat_value(file, files->inactive_key);
            uint64_t used = usage > inactive ? usage - inactive : 0;
            uint64_t left = limit > used ? limit - used : 0;
            if (left < room)
                room = left;
        }
        char *slash = strrchr(rel, '/');
        if (!slash)
            break;
        *slash = '\0';
    }
    return room;
}

uint64_t ar_device_cgroup_room(const char *root, const char *self_cgroup)
{
    uint64_t room = UINT64_MAX;
    /* lines "hierarchy-id:controllers:path"; cgroup v2's is "0::path" */
    for (const char *line = self_cgroup; line && *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        char text[1200];
        if (len < sizeof text) {
            memcpy(text, line, len);
            text[len] = '\0';
            char *first = strchr(text, ':');
            char *second = first ? strchr(first + 1, ':') : NULL;
            if (second) {
                *first = *second = '\0';
                const char *controllers = first + 1, *path = second + 1;
                uint64_t left = UINT64_MAX;
                if (strcmp(text, "0") == 0 && controllers[0] == '\0') {
                    left = room_under(root, path, &cgroup_v2);
                } else {
                    /* v1: the memory controller, alone or mounted with others */
                    char list[1200], *save = NULL;
                    snprintf(list, sizeof list, "%s", controllers);
                    for (char *c = strtok_r(list, ",", &save); c; c = strtok_r(NULL, ",", &save))
                        if (strcmp(c, "memory") == 0) {
                            char mount[1100];
                            snprintf(mount, sizeof mount, "%s/%s", root, controllers);
                            if (!is_folder(mount))
                                snprintf(mount, sizeof mount, "%s/memory", root);
                            left = room_under(mount, path, &cgroup_v1);
                            break;
                        }
                }
                if (left < room)
                    room = left;
            }
        }
        line = end ? end + 1 : NULL;
    }
    return room;
}

/* MemAvailable of /proc/meminfo in bytes; 0 when unknown. */
static uint64_t mem_available(void)
{
    char text[8192];
    if (read_small("/proc/meminfo", text, sizeof text) <= 0)
        return 0;
    const char *at = strstr(text, "MemAvailable:");
    unsigned long long kb;
    if (!at || sscanf(at, "MemAvailable: %llu kB", &kb) != 1 || kb > UINT64_MAX / 1024)
        return 0;
    return (uint64_t)kb * 1024;
}

uint64_t ar_device_free_memory(void)
{
    uint64_t free_bytes = mem_available();
    char self[4096];
    if (read_small("/proc/self/cgroup", self, sizeof self) > 0) {
        uint64_t room = ar_device_cgroup_room("/sys/fs/cgroup", self);
        if (room != UINT64_MAX && (free_bytes == 0 || room < free_bytes))
            free_bytes = room;
    }
    return free_bytes;
}
