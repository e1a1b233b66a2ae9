/* Pipeline schedules: in which order a stage runs the forward (F) and
 * backward (B) passes of the micro-batches of one step. */
#ifndef AR_SCHEDULE_H
#define AR_SCHEDULE_H

enum ar_schedule_kind { AR_SCHED_GPIPE = 0, AR_SCHED_1F1B = 1 };

typedef struct {
    char op; /* 'F' or 'B' */
    int mb;
} ar_action;

/* Fill actions[2*M] for stage s of S with M micro-batches. Backward passes
 * always run in micro-batch order 0..M-1, in both schedules, so gradients
 * accumulate in the same order whatever the schedule or partition (this is
 * what makes runs bitwise identical across them). Returns the number of
 * micro-batches in flight at most (activation slots needed). */
int ar_schedule_build(int kind, int S, int s, int M, ar_action *actions);
/* The same with extra warm-up forwards under 1F1B (on a stage that has a
 * successor): micro-batches in flight to cover the round trip of a slow
 * link (docs/DESIGN.md, "Slow links"). */
int ar_schedule_build_ex(int kind, int S, int s, int M, int extra_warmup, ar_action *actions);
int ar_schedule_parse(const char *name, int *kind);
const char *ar_schedule_name(int kind);

#endif
