/* The owner's rules for arceus provide (owner.c): when this machine may be
 * rented out. Like volunteer-computing clients, a provider computes only
 * while its owner is away (no keyboard or mouse activity for a while, the
 * machine's other work light), within the owner's hours, and not on battery
 * unless allowed; and it can hold its own CPU use under a limit.
 *
 * Every input the rules read has a path, so that tests can point them at
 * files of their own: the input devices (/dev/input), the interrupt counts
 * (/proc/interrupts), the CPU counters (/proc/stat), the power supplies
 * (/sys/class/power_supply) and the clock (a file holding "HH:MM" instead
 * of the local time). */
#ifndef AR_CLI_OWNER_H
#define AR_CLI_OWNER_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

enum { AR_WHEN_IDLE = 0, AR_WHEN_ALWAYS = 1 };

typedef struct {
    int when;            /* AR_WHEN_IDLE or AR_WHEN_ALWAYS */
    float idle_after_min; /* idle: this long without keyboard or mouse activity */
    int busy_cpu;        /* idle: other processes' CPU use above this % is "busy" (0: not checked) */
    int hours_from, hours_to; /* minutes of the day; -1: any time */
    int on_battery;      /* 1: may run on battery */
    const char *input_dir, *interrupts, *proc_stat, *power_supply_dir, *clock_file;
} ar_owner_rules;

typedef struct {
    ar_owner_rules r;
    time_t last_input;     /* the latest keyboard or mouse activity seen (0: none) */
    unsigned long long irq_sum; /* i8042 interrupts at the last look */
    int irq_seen;
    unsigned long long cpu_busy, cpu_total, own_ticks; /* /proc/stat and /proc/self/stat at the last look */
    int cpu_seen;
    int other_pct;         /* other processes' CPU use between the last two looks that told it (-1: none yet) */
    int clock_warned, stat_warned;
} ar_owner;

/* "22:00-07:00" -> minutes of the day; 0, or -1 for anything else (both
 * times HH:MM, 00:00..23:59, not the same). */
int ar_owner_parse_hours(const char *s, int *from, int *to);

void ar_owner_init(ar_owner *o, const ar_owner_rules *r);

/* Look at the machine now: 1 when the rules let it be rented out, 0 when
 * not, with why ("outside hours 22:00-07:00", "on battery", "its owner is
 * active (keyboard or mouse 12 s ago)", "busy: other processes use 73% of
 * the CPU") in why. */
int ar_owner_check(ar_owner *o, char *why, size_t size);

/* Hold this process to pct% of the machine's CPU: a cgroup v2 cpu.max on
 * its own cgroup where it is alone there and may write it (a systemd
 * service), else a helper process that
 * stops and continues it (SIGSTOP/SIGCONT) in 100 ms cycles. 100: nothing.
 * Says which on stdout. 0, or -1 (said why on stderr). */
int ar_owner_limit_cpu(int pct);

#endif
