/* A per-operator profile: where a training step's time goes.
 *
 * A site is a static counter named after an operator and a phase (forward,
 * backward, update); code around an operator does
 *
 *     static ar_prof_site site = AR_PROF_SITE("attention", AR_PROF_FWD);
 *     ar_prof_mark t0 = ar_prof_begin();
 *     ... the operator ...
 *     ar_prof_end(&site, t0, flops);
 *
 * While profiling is off (the default) that costs one load and a branch. Sites
 * register themselves on first use; times add up atomically, so stages on
 * several threads may share a site (their times then overlap in wall time). */
#ifndef AR_PROFILE_H
#define AR_PROFILE_H

#include "core/core.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>

enum { AR_PROF_FWD, AR_PROF_BWD, AR_PROF_UPDATE, AR_PROF_PHASES };

typedef struct ar_prof_site {
    const char *name;
    int phase;
    _Atomic uint64_t ns, cpu_ns, calls;
    _Atomic uint64_t flops;
    _Atomic int registered;
    struct ar_prof_site *next;
    int order;
} ar_prof_site;

#define AR_PROF_SITE(name, phase) {(name), (phase), 0, 0, 0, 0, 0, NULL, 0}

extern _Atomic int ar_prof_active;

/* Turn the profile on or off (off keeps what was counted). */
void ar_prof_enable(int on);
/* Forget what was counted (e.g. after a warm-up step). */
void ar_prof_reset(void);

/* When an operator started: wall time, and the calling thread's CPU time
 * (on a machine shared with other work the CPU time is the steadier figure
 * for one thread; an operator's other threads are not in it). */
typedef struct {
    double wall, cpu;
} ar_prof_mark;

ar_prof_mark ar_prof_now(void);

static inline ar_prof_mark ar_prof_begin(void)
{
    if (atomic_load_explicit(&ar_prof_active, memory_order_relaxed))
        return ar_prof_now();
    ar_prof_mark none = {0, 0};
    return none;
}

/* t0 from ar_prof_begin; flops: the operator's arithmetic, 0 if not counted */
void ar_prof_end(ar_prof_site *site, ar_prof_mark t0, double flops);

/* Time one statement at a site of its own (one per place it is written). */
#define AR_PROF_CALL(name, phase, flops, ...)                                                     \
    do {                                                                                           \
        static ar_prof_site ar_prof_site_ = AR_PROF_SITE(name, phase);                            \
        ar_prof_mark ar_prof_t0_ = ar_prof_begin();                                                      \
        __VA_ARGS__;                                                                               \
        ar_prof_end(&ar_prof_site_, ar_prof_t0_, (flops));                                         \
    } while (0)

/* Print the table: milliseconds per step of each operator, forward, backward
 * and update, their share of step_s (the measured time of one step, 0 if
 * unknown), GFLOP/s where the operator counts its arithmetic, and the
 * calling thread's CPU milliseconds. */
void ar_prof_print(FILE *f, long steps, double step_s);

#endif
