/* A progress bar for training loops.
 *
 * On a terminal, one line redrawn in place with \r:
 *   train [##########--------------]   420/1000  loss 1.234 | 3,456 tok/s  ETA 1:02
 * at most ~10 redraws a second (the last one always drawn). Elsewhere (a log
 * file, a pipe, CI) a plain line every plain_every steps and at the end,
 * never a \r. ARCEUS_PROGRESS=tty|plain forces the mode, =off silences it.
 *
 *   ar_progress p;
 *   ar_progress_begin(&p, "train", steps, stderr);
 *   for (...) ar_progress_update(&p, step + 1, "loss %.3f", loss);
 *   ar_progress_end(&p);                                                  */
#ifndef AR_PROGRESS_H
#define AR_PROGRESS_H

#include <stdio.h>

enum { AR_PROGRESS_OFF = 0, AR_PROGRESS_TTY = 1, AR_PROGRESS_PLAIN = 2 };

typedef struct {
    char label[48];
    long total;       /* <= 0: unknown, no bar and no ETA */
    FILE *out;
    int mode;         /* AR_PROGRESS_* */
    long plain_every; /* plain mode: print when done advanced this much (default ~5% of total) */
    double start;     /* ar_now() at begin */
    double last_draw; /* tty mode: time of the last redraw */
    long done;        /* last value passed to update */
    long base;        /* done before the first update (a resumed run starts late); -1: unset */
    long printed;     /* plain mode: done at the last printed line (-1: none yet) */
    int drawn_final;  /* the state at `done` is already on screen */
    int width;        /* tty mode: length of the last line drawn (to blank leftovers) */
    char metrics[256];
} ar_progress;

/* out NULL means stderr. Returns 0 or AR_EINVAL. */
int ar_progress_begin(ar_progress *p, const char *label, long total, FILE *out);
/* done: steps completed so far (1..total); fmt: the metrics text, may be NULL. */
void ar_progress_update(ar_progress *p, long done, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Draw the final state and end the line (prints the total time). */
void ar_progress_end(ar_progress *p);
/* Print a line of its own (an evaluation result) above the bar, keeping the
 * bar's state (rate, ETA). */
void ar_progress_note(ar_progress *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
