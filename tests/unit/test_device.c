/* The device probe (core/device.h): repeatable, more threads faster, and
 * memory and cores that agree with what the system says. */
#include <criterion/criterion.h>

#include "core/core.h"
#include "core/device.h"

#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Below this CPU share, other work took turns on the probe's cores (see
 * ar_device_info.cpu_share; the figure is rough: the kernel brings other
 * threads' CPU time up to date at its ticks only). */
#define BUSY_SHARE 0.85

static ar_device_info probe(int threads)
{
    ar_device_info d;
    cr_assert_eq(ar_device_probe(threads, &d), AR_OK, "%s", ar_last_error());
    cr_assert(d.gflops > 0 && isfinite(d.gflops), "%g GFLOP/s", d.gflops);
    return d;
}

/* Two probes of the same machine agree within 25%. On one thread: the
 * machines that run the tests are shared, and a many-thread product waits
 * for its slowest part, so there two probes would measure the neighbours'
 * load more than the machine; one thread gets a core to itself far more
 * often. A burst of other work can still spoil one probe: up to three pairs. */
Test(device, two_probes_agree)
{
    char seen[512] = "";
    size_t used = 0;
    for (int attempt = 0; attempt < 3; attempt++) {
        ar_device_info a = probe(1), b = probe(1);
        double hi = fmax(a.gflops, b.gflops), lo = fmin(a.gflops, b.gflops);
        if (lo >= 0.75 * hi)
            return;
        int n = snprintf(seen + used, sizeof seen - used, " %.1f/%.1f (CPU share %.2f/%.2f)", a.gflops,
                         b.gflops, a.cpu_share, b.cpu_share);
        if (n > 0 && (size_t)n < sizeof seen - used)
            used += (size_t)n;
    }
    cr_assert_fail("no two probes in three pairs agreed within 25%%; GFLOP/s:%s", seen);
}

/* A 1-thread probe is below a 2-thread one, when the second core is there
 * and free: with other work on it, a 2-thread product waits for the half
 * that shares a core, and two threads may well be slower than one. */
Test(device, two_threads_beat_one)
{
    if (ar_device_cores() < 2)
        cr_skip("this process may use only one core: a 2-thread probe cannot beat a 1-thread one");
    char seen[512] = "";
    size_t used = 0;
    double best_share = 0;
    for (int attempt = 0; attempt < 5; attempt++) {
        ar_device_info one = probe(1), two = probe(2);
        cr_assert_eq(one.threads, 1);
        cr_assert_eq(two.threads, 2);
        if (one.gflops < two.gflops)
            return;
        best_share = fmax(best_share, two.cpu_share);
        int n = snprintf(seen + used, sizeof seen - used, " %.1f vs %.1f (CPU share %.2f)", one.gflops,
                         two.gflops, two.cpu_share);
        if (n > 0 && (size_t)n < sizeof seen - used)
            used += (size_t)n;
    }
    if (best_share < BUSY_SHARE)
        cr_skip("other work kept the second core busy (the 2-thread probe got at most %.0f%% of its "
                "CPU time), so 1 and 2 threads cannot be compared; 1 vs 2 threads, GFLOP/s:%s",
                100 * best_share, seen);
    cr_assert_fail("a 2-thread probe never beat a 1-thread one; 1 vs 2 threads, GFLOP/s:%s", seen);
}

/* The probe is short: it runs whenever a worker starts, a provider offers
 * itself or a driver plans (about 0.2 s; the bound leaves room for a busy
 * machine). */
Test(device, probe_is_short)
{
    ar_device_info d = probe(0);
    cr_assert_gt(d.seconds, 0.1, "%.3f s", d.seconds);
    cr_assert_lt(d.seconds, 1.0, "%.3f s", d.seconds);
}

/* The probe runs on the threads asked (0 = every core, no more than the
 * cores) and leaves the thread count as it found it. */
Test(device, probe_threads_and_restores_them)
{
    int cores = ar_device_cores();
    cr_assert_eq(probe(0).threads, cores);
    cr_assert_eq(probe(cores + 3).threads, cores);
    ar_set_threads(1);
    cr_assert_eq(probe(cores).threads, cores);
    cr_assert_eq(ar_get_threads(), 1);
    cr_assert_eq(omp_get_max_threads(), 1, "the BLAS threads (OpenMP's) were not restored");
}

Test(device, memory_and_cores_are_plausible)
{
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int cores = ar_device_cores();
    cr_assert(cores >= 1 && cores <= online, "%d cores of %ld online", cores, online);
    ar_device_info d = probe(1);
    cr_assert_eq(d.cores, cores);

    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    cr_assert(pages > 0 && page > 0);
    uint64_t physical = (uint64_t)pages * (uint64_t)page;
    uint64_t free_bytes = ar_device_free_memory();
#ifdef __linux__
    /* a test process has a few megabytes at least */
    cr_assert_gt(free_bytes, 16u << 20, "%llu bytes free", (unsigned long long)free_bytes);
#endif
    cr_assert_leq(free_bytes, physical, "%llu bytes free of %llu", (unsigned long long)free_bytes,
                  (unsigned long long)physical);
    cr_assert_leq(d.free_bytes, physical);
}

#ifdef __linux__
/* Fewer CPUs in the affinity mask (taskset, a container's cpuset): fewer
 * cores. Criterion runs each test in a process of its own. */
Test(device, cores_honour_the_affinity_mask)
{
    cpu_set_t all, one;
    cr_assert_eq(sched_getaffinity(0, sizeof all, &all), 0);
    int first = -1;
    for (int i = 0; i < CPU_SETSIZE && first < 0; i++)
        if (CPU_ISSET(i, &all))
            first = i;
    cr_assert_geq(first, 0);
    CPU_ZERO(&one);
    CPU_SET(first, &one);
    cr_assert_eq(sched_setaffinity(0, sizeof one, &one), 0);
    cr_assert_eq(ar_device_cores(), 1);
    cr_assert_eq(sched_setaffinity(0, sizeof all, &all), 0);
    cr_assert_eq(ar_device_cores(), CPU_COUNT(&all) < sysconf(_SC_NPROCESSORS_ONLN)
                                        ? CPU_COUNT(&all)
                                        : (int)sysconf(_SC_NPROCESSORS_ONLN));
}
#endif

/* ---- cgroup limits, on a made-up hierarchy ------------------------------ */

static char root[] = "/tmp/arceus-device-XXXXXX";

static void write_text(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s%s", root, dir);
    cr_assert_eq(ar_mkdir_p(path), AR_OK, "%s", ar_last_error());
    snprintf(path, sizeof path, "%s%s/%s", root, dir, name);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "%s", path);
    cr_assert_geq(fputs(text, f), 0);
    cr_assert_eq(fclose(f), 0);
}

static void make_root(void)
{
    cr_assert_not_null(mkdtemp(root));
}

static void remove_root(void)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    cr_assert_eq(system(cmd), 0);
}

TestSuite(cgroup, .init = make_root, .fini = remove_root);

/* v2: the tightest of the cgroup and its parents, inactive page cache
 * counted as room; "max" is no limit. */
Test(cgroup, v2_takes_the_tightest_limit_of_the_cgroup_and_its_parents)
{
    write_text("/app/job", "memory.max", "max\n");
    write_text("/app/job", "memory.current", "100000\n");
    write_text("/app", "memory.max", "1000000\n");
    write_text("/app", "memory.current", "400000\n");
    write_text("/app", "memory.stat", "anon 300000\nfile 100000\ninactive_file 100000\nactive_file 0\n");
    /* above the limit already (counting the cache): no room, not a wrap */
    write_text("", "memory.max", "5000000\n");
    write_text("", "memory.current", "4000000\n");
    cr_assert_eq(ar_device_cgroup_room(root, "0::/app/job\n"), 700000);

    write_text("", "memory.current", "6000000\n");
    cr_assert_eq(ar_device_cgroup_room(root, "0::/app/job\n"), 0);
}

Test(cgroup, v2_without_limits_or_files)
{
    cr_assert_eq(ar_device_cgroup_room(root, "0::/\n"), UINT64_MAX);
    write_text("", "memory.max", "max\n");
    write_text("", "memory.current", "12345\n");
    cr_assert_eq(ar_device_cgroup_room(root, "0::/\n"), UINT64_MAX);
    cr_assert_eq(ar_device_cgroup_room(root, ""), UINT64_MAX);
    cr_assert_eq(ar_device_cgroup_room(root, "garbage"), UINT64_MAX);
}

/* A container without its own cgroup namespace: the path names the host's
 * hierarchy, which is not there; its own cgroup is mounted at the top. */
Test(cgroup, v2_path_of_the_host_falls_back_to_the_top)
{
    write_text("", "memory.max", "2000000\n");
    write_text("", "memory.current", "500000\n");
    cr_assert_eq(ar_device_cgroup_room(root, "0::/system.slice/docker-abc.scope\n"), 1500000);
}

/* v1: the memory controller's own hierarchy, among the others' lines */
Test(cgroup, v1_reads_the_memory_controller)
{
    write_text("/memory/job", "memory.limit_in_bytes", "3000000\n");
    write_text("/memory/job", "memory.usage_in_bytes", "1200000\n");
    write_text("/memory/job", "memory.stat", "cache 500000\ntotal_inactive_file 200000\n");
    /* the top's "unlimited" is a huge number, not a limit that matters */
    write_text("/memory", "memory.limit_in_bytes", "9223372036854771712\n");
    write_text("/memory", "memory.usage_in_bytes", "7000000\n");
    cr_assert_eq(ar_device_cgroup_room(root, "12:cpu,cpuacct:/job\n4:memory:/job\n1:name=systemd:/job\n"),
                 2000000);
}
