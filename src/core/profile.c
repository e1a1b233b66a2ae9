#include "core/profile.h"

#include <math.h>
#include <string.h>
#include <time.h>

_Atomic int ar_prof_active;

/* the sites seen so far, newest first; pushed once each, never removed */
static _Atomic(ar_prof_site *) sites;
static _Atomic int nsites;

void ar_prof_enable(int on)
{
    atomic_store(&ar_prof_active, on ? 1 : 0);
}

void ar_prof_reset(void)
{
    for (ar_prof_site *s = atomic_load(&sites); s; s = s->next) {
        atomic_store(&s->ns, 0);
        atomic_store(&s->cpu_ns, 0);
        atomic_store(&s->calls, 0);
        atomic_store(&s->flops, 0);
    }
}

ar_prof_mark ar_prof_now(void)
{
    ar_prof_mark m = {ar_now(), 0};
    struct timespec t;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t) == 0)
        m.cpu = (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
    return m;
}

void ar_prof_end(ar_prof_site *site, ar_prof_mark t0, double flops)
{
    if (t0.wall <= 0.0 || !atomic_load_explicit(&ar_prof_active, memory_order_relaxed))
        return;
    ar_prof_mark t1 = ar_prof_now();
    double dt = t1.wall - t0.wall, dc = t1.cpu - t0.cpu;
    if (!atomic_exchange(&site->registered, 1)) {
        site->order = atomic_fetch_add(&nsites, 1);
        ar_prof_site *head = atomic_load(&sites);
        do
            site->next = head;
        while (!atomic_compare_exchange_weak(&sites, &head, site));
    }
    atomic_fetch_add_explicit(&site->ns, (uint64_t)(dt > 0 ? dt * 1e9 : 0), memory_order_relaxed);
    atomic_fetch_add_explicit(&site->cpu_ns, (uint64_t)(dc > 0 ? dc * 1e9 : 0), memory_order_relaxed);
    atomic_fetch_add_explicit(&site->calls, 1, memory_order_relaxed);
    if (flops > 0)
        atomic_fetch_add_explicit(&site->flops, (uint64_t)flops, memory_order_relaxed);
}

/* One row of the table: an operator's sites of every phase. */
typedef struct {
    const char *name;
    int order;
    double ms[AR_PROF_PHASES], cpu_ms;
    double flops, flop_ms; /* over the phases that count FLOPs */
} prof_row;

#define MAX_ROWS 128

void ar_prof_print(FILE *f, long steps, double step_s)
{
    if (steps < 1)
        steps = 1;
    prof_row rows[MAX_ROWS];
    int nrows = 0;
    for (ar_prof_site *s = atomic_load(&sites); s; s = s->next) {
        uint64_t ns = atomic_load(&s->ns);
        if (atomic_load(&s->calls) == 0)
            continue;
        int r = 0;
        while (r < nrows && strcmp(rows[r].name, s->name) != 0)
            r++;
        if (r == nrows) {
            if (nrows == MAX_ROWS)
                continue;
            memset(&rows[nrows], 0, sizeof rows[nrows]);
            rows[nrows].name = s->name;
            rows[nrows].order = s->order;
            nrows++;
        }
        double ms = ns / 1e6 / steps;
        rows[r].ms[s->phase] += ms;
        rows[r].cpu_ms += atomic_load(&s->cpu_ns) / 1e6 / steps;
        if (s->order < rows[r].order)
            rows[r].order = s->order;
        uint64_t fl = atomic_load(&s->flops);
        if (fl) {
            rows[r].flops += (double)fl / steps;
            rows[r].flop_ms += ms;
        }
    }
    /* in the order the operators first ran: the model's order */
    for (int i = 1; i < nrows; i++)
        for (int j = i; j > 0 && rows[j].order < rows[j - 1].order; j--) {
            prof_row t = rows[j];
            rows[j] = rows[j - 1];
            rows[j - 1] = t;
        }
    double tot[AR_PROF_PHASES] = {0}, all = 0, flops = 0, cpu = 0;
    fprintf(f, "profile: milliseconds per step, mean of %ld step%s\n", steps, steps == 1 ? "" : "s");
    fprintf(f, "  %-30s %9s %9s %9s %9s %6s %8s %9s\n", "operator", "forward", "backward", "update", "total",
            "share", "GFLOP/s", "CPU ms");
    for (int i = 0; i < nrows; i++) {
        double t = 0;
        for (int p = 0; p < AR_PROF_PHASES; p++) {
            t += rows[i].ms[p];
            tot[p] += rows[i].ms[p];
        }
        all += t;
        cpu += rows[i].cpu_ms;
        flops += rows[i].flops;
        char share[16] = "", gf[16] = "";
        if (step_s > 0)
            snprintf(share, sizeof share, "%.1f%%", 100 * t / (step_s * 1e3));
        if (rows[i].flop_ms > 0)
            snprintf(gf, sizeof gf, "%.1f", rows[i].flops / (rows[i].flop_ms * 1e6));
        fprintf(f, "  %-30s %9.3f %9.3f %9.3f %9.3f %6s %8s %9.3f\n", rows[i].name, rows[i].ms[AR_PROF_FWD],
                rows[i].ms[AR_PROF_BWD], rows[i].ms[AR_PROF_UPDATE], t, share, gf, rows[i].cpu_ms);
    }
    fprintf(f, "  %-30s %9.3f %9.3f %9.3f %9.3f %6s %8s %9.3f\n", "operators", tot[AR_PROF_FWD], tot[AR_PROF_BWD],
            tot[AR_PROF_UPDATE], all, "", "", cpu);
    if (step_s > 0) {
        fprintf(f, "  %-30s %39.3f %6.1f%%\n", "the rest (framework)", step_s * 1e3 - all,
                100 * (1 - all / (step_s * 1e3)));
        fprintf(f, "  %-30s %39.3f %6s %8.1f\n", "step", step_s * 1e3, "100%",
                flops > 0 ? flops / (step_s * 1e9) : 0.0);
    }
}
