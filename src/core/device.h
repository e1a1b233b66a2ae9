/* What this machine offers, measured one way for everyone: the worker's
 * Hello, `arceus provide`'s offer to the market and the driver's planner all
 * weigh devices by these figures, so they must be comparable. */
#ifndef AR_DEVICE_H
#define AR_DEVICE_H

#include "arceus.h"

#include <stdint.h>

typedef struct {
    /* single-precision matrix products (ar_sgemm, 512x512x512), GFLOP/s:
     * the best of several short timed runs on `threads` threads */
    double gflops;
    int threads;
    /* CPU time the best run got per thread and per second: about 1 when its
     * threads had their cores to themselves, less when other work took turns
     * on them (the figure is then what is left over, not what the cores do) */
    double cpu_share;
    /* seconds the whole probe took */
    double seconds;
    uint64_t free_bytes; /* ar_device_free_memory() */
    int cores;           /* ar_device_cores() */
} ar_device_info;

/* Measure this machine with `threads` threads (0 = all its cores; more than
 * its cores are capped to them). Takes about 0.2 s. The thread count is
 * restored to ar_get_threads() afterwards. AR_OK, or AR_ENOMEM. */
int ar_device_probe(int threads, ar_device_info *out);

/* Bytes that can be allocated without swapping: MemAvailable of
 * /proc/meminfo, or less when this process's cgroup has a memory limit
 * closer; 0 when neither can be read. Cheap: a few small files. */
uint64_t ar_device_free_memory(void);

/* CPUs this process may run on: the online ones, fewer when the affinity
 * mask (taskset, a container's cpuset) allows fewer. At least 1. */
int ar_device_cores(void);

/* The room left under the cgroup memory limits of a process whose
 * /proc/self/cgroup reads `self_cgroup`, with the cgroup file system mounted
 * at `root` (normally /sys/fs/cgroup): the smallest of limit - (usage -
 * inactive page cache) over the cgroup and its parents, for cgroup v2 or v1.
 * UINT64_MAX when no limit applies. Part of ar_device_free_memory; public so
 * that tests can point it at a made-up hierarchy. */
uint64_t ar_device_cgroup_room(const char *root, const char *self_cgroup);

#endif
