/* The owner's rules for arceus provide (owner.h). */
#include "cli/owner.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- hours ---------------------------------------------------------------------------- */

static int parse_hhmm(const char *s, const char **end, int *minutes)
{
    if (!isdigit((unsigned char)s[0]) || !isdigit((unsigned char)s[1]) || s[2] != ':' ||
        !isdigit((unsigned char)s[3]) || !isdigit((unsigned char)s[4]))
        return -1;
    int h = (s[0] - '0') * 10 + (s[1] - '0'), m = (s[3] - '0') * 10 + (s[4] - '0');
    if (h > 23 || m > 59)
        return -1;
    *minutes = h * 60 + m;
    *end = s + 5;
    return 0;
}

int ar_owner_parse_hours(const char *s, int *from, int *to)
{
    const char *p;
    if (parse_hhmm(s, &p, from) != 0 || *p != '-' || parse_hhmm(p + 1, &p, to) != 0 || *p || *from == *to)
        return -1;
    return 0;
}

/* Minutes since midnight now: from the clock file when there is one
 * ("HH:MM" on its first line), else the local time. */
static int minute_of_day(ar_owner *o)
{
    if (o->r.clock_file) {
        char buf[32] = "";
        FILE *f = fopen(o->r.clock_file, "r");
        int m, ok = f && fgets(buf, sizeof buf, f);
        if (f)
            fclose(f);
        const char *end;
        buf[strcspn(buf, "\r\n")] = '\0';
        if (ok && parse_hhmm(buf, &end, &m) == 0 && !*end)
            return m;
        if (!o->clock_warned)
            fprintf(stderr, "arceus provide: warning: %s holds no HH:MM time: the local time is used\n",
                    o->r.clock_file);
        o->clock_warned = 1;
    }
    time_t t = time(NULL);
    struct tm tm;
    if (!localtime_r(&t, &tm))
        return 0;
    return tm.tm_hour * 60 + tm.tm_min;
}

static int in_hours(int now, int from, int to)
{
    return from < to ? now >= from && now < to : now >= from || now < to; /* or across midnight */
}

/* ---- the power supply ---------------------------------------------------------------- */

/* The first line of dir/name/file into buf; 0, or -1 when there is none. */
static int read_attr(const char *dir, const char *name, const char *file, char *buf, size_t size)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s/%s", dir, name, file);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int ok = fgets(buf, (int)size, f) != NULL;
    fclose(f);
    if (!ok)
        return -1;
    buf[strcspn(buf, "\r\n")] = '\0';
    return 0;
}

/* On battery: there is a battery, and no mains (or USB) supply is online;
 * with a battery and no other supply listed, its status says Discharging. */
static int on_battery(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0; /* nothing to tell: a desktop, a server, a container */
    int battery = 0, discharging = 0, ac = 0, ac_online = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        char type[64], v[64];
        if (e->d_name[0] == '.' || read_attr(dir, e->d_name, "type", type, sizeof type) != 0)
            continue;
        if (!strcmp(type, "Battery")) {
            battery = 1;
            if (read_attr(dir, e->d_name, "status", v, sizeof v) == 0 && !strcmp(v, "Discharging"))
                discharging = 1;
        } else {
            ac = 1;
            if (read_attr(dir, e->d_name, "online", v, sizeof v) == 0 && atoi(v) > 0)
                ac_online = 1;
        }
    }
    closedir(d);
    return battery && (ac ? !ac_online : discharging);
}

/* ---- keyboard and mouse ------------------------------------------------------------------ */

/* The latest access or change time of the input devices in dir (event*,
 * mouse*, mice): where the kernel keeps them, they move with every key
 * press and mouse move. 0 when there are none. */
static time_t input_time(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    time_t latest = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "event", 5) != 0 && strncmp(e->d_name, "mouse", 5) != 0 &&
            strcmp(e->d_name, "mice") != 0)
            continue;
        char path[1024];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (stat(path, &st) != 0)
            continue;
        if (st.st_atime > latest)
            latest = st.st_atime;
        if (st.st_mtime > latest)
            latest = st.st_mtime;
    }
    closedir(d);
    return latest;
}

/* The interrupts of the PS/2 keyboard and mouse (i8042 lines of
 * /proc/interrupts), summed over the CPUs; -1 when there are none. */
static long long i8042_interrupts(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    char line[4096];
    long long sum = -1;
    while (fgets(line, sizeof line, f)) {
        if (!strstr(line, "i8042"))
            continue;
        char *p = strchr(line, ':');
        if (!p)
            continue;
        for (p++;;) {
            char *end;
            while (*p == ' ' || *p == '\t')
                p++;
            if (!isdigit((unsigned char)*p))
                break;
            unsigned long long v = strtoull(p, &end, 10);
            sum = (sum < 0 ? 0 : sum) + (long long)v;
            p = end;
        }
    }
    fclose(f);
    return sum;
}

/* ---- the machine's other work ------------------------------------------------------------- */

/* All CPUs' busy and total ticks (the first line of path, /proc/stat's
 * format), and this process's own (always the real /proc/self/stat). */
static int cpu_ticks(const char *path, unsigned long long *busy, unsigned long long *total,
                     unsigned long long *own)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    unsigned long long v[8] = {0};
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                   &v[6], &v[7]);
    fclose(f);
    if (n < 4)
        return -1;
    *busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]; /* user nice system irq softirq steal */
    *total = *busy + v[3] + v[4];                   /* + idle iowait */
    f = fopen("/proc/self/stat", "r");
    if (!f)
        return -1;
    char buf[2048];
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = '\0';
    /* after the command's name in parentheses: state is field 3, utime 14, stime 15 */
    char *p = strrchr(buf, ')');
    unsigned long long ut = 0, st = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    *own = ut + st;
    return 0;
}

/* ---- the rules ------------------------------------------------------------------------- */

void ar_owner_init(ar_owner *o, const ar_owner_rules *r)
{
    memset(o, 0, sizeof *o);
    o->r = *r;
    o->other_pct = -1;
}

int ar_owner_check(ar_owner *o, char *why, size_t size)
{
    const ar_owner_rules *r = &o->r;
    why[0] = '\0';
    time_t now = time(NULL);

    /* what idleness needs is watched even while other rules say no, so
     * that it knows the owner's last activity when they say yes again */
    time_t t = input_time(r->input_dir);
    if (t > o->last_input)
        o->last_input = t;
    long long irq = i8042_interrupts(r->interrupts);
    if (irq >= 0) {
        if (o->irq_seen && (unsigned long long)irq != o->irq_sum)
            o->last_input = now;
        o->irq_sum = (unsigned long long)irq;
        o->irq_seen = 1;
    }
    unsigned long long busy, total, own;
    if (r->busy_cpu > 0 && cpu_ticks(r->proc_stat, &busy, &total, &own) != 0) {
        /* nothing to measure: the rule cannot say busy (nor keep saying it) */
        if (!o->stat_warned)
            fprintf(stderr, "arceus provide: warning: cannot read the CPU counters in %s: --busy-cpu is not "
                            "applied while it cannot\n", r->proc_stat);
        o->stat_warned = 1;
        o->cpu_seen = 0;
        o->other_pct = -1;
    } else if (r->busy_cpu > 0) {
        /* counters that went backwards (the file replaced by another)
         * start the measure again */
        if (o->cpu_seen && total > o->cpu_total && busy >= o->cpu_busy) {
            double others = (double)(busy - o->cpu_busy) - (double)(own - o->own_ticks);
            o->other_pct = (int)(100.0 * (others < 0 ? 0 : others) / (double)(total - o->cpu_total) + 0.5);
        }
        /* no tick between two looks (looks closer than a clock tick): the
         * last measure stands, rather than the machine looking idle */
        if (!o->cpu_seen || total != o->cpu_total) {
            o->cpu_busy = busy;
            o->cpu_total = total;
            o->own_ticks = own;
            o->cpu_seen = 1;
        }
    }
    int other_pct = o->other_pct;

    if (r->hours_from >= 0 && !in_hours(minute_of_day(o), r->hours_from, r->hours_to)) {
        snprintf(why, size, "outside hours %02d:%02d-%02d:%02d", r->hours_from / 60, r->hours_from % 60,
                 r->hours_to / 60, r->hours_to % 60);
        return 0;
    }
    if (!r->on_battery && on_battery(r->power_supply_dir)) {
        snprintf(why, size, "on battery");
        return 0;
    }
    if (r->when == AR_WHEN_ALWAYS)
        return 1;
    double idle_s = (double)r->idle_after_min * 60.0;
    if (o->last_input > 0 && difftime(now, o->last_input) < idle_s) {
        long ago = (long)difftime(now, o->last_input);
        snprintf(why, size, "its owner is active (keyboard or mouse %ld s ago; idle after %g min)", ago < 0 ? 0 : ago,
                 (double)r->idle_after_min);
        return 0;
    }
    if (other_pct >= 0 && other_pct > r->busy_cpu) {
        snprintf(why, size, "busy: other processes use %d%% of the CPU (more than %d%%)", other_pct, r->busy_cpu);
        return 0;
    }
    return 1;
}

/* ---- the CPU limit ------------------------------------------------------------------------ */

#define DUTY_PERIOD_US 100000
#define DUTY_SLICE_US 5000 /* how often the helper looks: the overshoot of a period's share */

/* A clock's reading in seconds; -1 when it cannot be read (another
 * process's CPU clock, once that process is gone). */
static double duty_clock(clockid_t id)
{
    struct timespec ts;
    if (clock_gettime(id, &ts) != 0)
        return -1;
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* cpu.max of this process's own cgroup (v2), when it is alone there: 0
 * when written */
static int cgroup_limit(int pct, long cores, char *where, size_t size)
{
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (!f)
        return -1;
    char line[1024], path[1200];
    int found = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "0::", 3)) {
            line[strcspn(line, "\n")] = '\0';
            snprintf(path, sizeof path, "/sys/fs/cgroup%s/cpu.max", line + 3);
            found = 1;
            break;
        }
    fclose(f);
    if (!found)
        return -1;
    /* cpu.max holds every process of the cgroup: written only when this
     * one is alone in it (a systemd service's), never a terminal session's */
    char procs[1300];
    snprintf(procs, sizeof procs, "%.*scgroup.procs", (int)(strlen(path) - strlen("cpu.max")), path);
    f = fopen(procs, "r");
    if (!f)
        return -1;
    long pid, self = (long)getpid();
    int alone = 1;
    while (fscanf(f, "%ld", &pid) == 1)
        if (pid != self)
            alone = 0;
    fclose(f);
    if (!alone)
        return -1;
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char v[64];
    int n = snprintf(v, sizeof v, "%lld %d", (long long)pct * cores * DUTY_PERIOD_US / 100, DUTY_PERIOD_US);
    int ok = write(fd, v, (size_t)n) == n;
    close(fd);
    if (ok)
        snprintf(where, size, "%s = \"%s\"", path, v);
    return ok ? 0 : -1;
}

int ar_owner_limit_cpu(int pct)
{
    if (pct >= 100)
        return 0;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores < 1)
        cores = 1;
    char where[1400];
    if (cgroup_limit(pct, cores, where, sizeof where) == 0) {
        printf("arceus provide: CPU held to %d%% of the machine by its cgroup: %s\n", pct, where);
        fflush(stdout);
        return 0;
    }
    /* Duty-cycling, the way a cgroup's cpu.max works: in each 100 ms
     * period this process may use pct% of the machine's CPU time (all its
     * threads together); a helper watches its CPU clock and, once the
     * period's share is spent, stops it until the period ends. A process
     * that uses less is never stopped. The helper dies with us (PDEATHSIG)
     * and always leaves us running: it continues us before every exit. */
    pid_t parent = getpid();
    clockid_t parent_cpu;
    if (clock_getcpuclockid(parent, &parent_cpu) != 0) {
        fprintf(stderr, "arceus provide: error: --cpu-limit: no cgroup to write and no CPU clock to watch\n");
        return -1;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "arceus provide: error: --cpu-limit: no cgroup to write and cannot start its helper: %s\n",
                strerror(errno));
        return -1;
    }
    if (pid == 0) {
        sigset_t all;
        sigfillset(&all);
        sigdelset(&all, SIGKILL);
        sigprocmask(SIG_BLOCK, &all, NULL); /* SIGTERM and SIGINT are for the provider */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(0);
        const double period = DUTY_PERIOD_US / 1e6, quota = period * (double)pct * (double)cores / 100.0;
        const struct timespec slice = {0, DUTY_SLICE_US * 1000};
        double debt = 0; /* what the last period used past its share (a look comes every slice) */
        for (;;) {
            double start = duty_clock(CLOCK_MONOTONIC), used0 = duty_clock(parent_cpu);
            if (used0 < 0)
                _exit(0); /* the parent is gone */
            double now = start;
            while (now - start < period) {
                nanosleep(&slice, NULL);
                now = duty_clock(CLOCK_MONOTONIC);
                double used = duty_clock(parent_cpu);
                if (used < 0)
                    _exit(0);
                if (used - used0 >= quota - debt && now - start < period) {
                    debt = used - used0 - (quota - debt);
                    if (debt > quota)
                        debt = quota;
                    /* the period's share is spent: stopped until it ends */
                    if (kill(parent, SIGSTOP) != 0)
                        _exit(0);
                    double left = period - (now - start);
                    struct timespec rest = {0, (long)(left * 1e9)};
                    nanosleep(&rest, NULL);
                    kill(parent, SIGCONT);
                    break;
                }
            }
            if (now - start >= period)
                debt = 0; /* a period within its share: nothing owed */
            if (getppid() != parent)
                _exit(0);
        }
    }
    printf("arceus provide: CPU held to about %d%% of the machine by duty-cycling (helper process %ld stops it "
           "for the rest of each 100 ms once it used its share): no cgroup v2 cpu.max of its own to write here\n",
           pct, (long)pid);
    fflush(stdout);
    return 0;
}
