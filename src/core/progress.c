/* Progress bar: one redrawn line on a terminal, plain lines elsewhere.
 * Drawing is throttled so that a fast loop (thousands of steps a second)
 * spends its time training, not writing to the terminal. */
#include "core/progress.h"

#include "core/core.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define BAR_WIDTH 24
#define REDRAW_SECONDS 0.1

int ar_progress_begin(ar_progress *p, const char *label, long total, FILE *out)
{
    if (!p)
        return ar_fail(AR_EINVAL, "ar_progress_begin: p is NULL");
    memset(p, 0, sizeof *p);
    p->base = -1;
    snprintf(p->label, sizeof p->label, "%s", label ? label : "");
    p->total = total > 0 ? total : 0;
    p->out = out ? out : stderr;
    const char *env = getenv("ARCEUS_PROGRESS");
    if (env && strcasecmp(env, "plain") == 0)
        p->mode = AR_PROGRESS_PLAIN;
    else if (env && strcasecmp(env, "tty") == 0)
        p->mode = AR_PROGRESS_TTY;
    else if (env && (strcasecmp(env, "off") == 0 || strcasecmp(env, "none") == 0))
        p->mode = AR_PROGRESS_OFF;
    else
        p->mode = isatty(fileno(p->out)) ? AR_PROGRESS_TTY : AR_PROGRESS_PLAIN;
    p->plain_every = p->total > 0 ? (p->total / 20 > 0 ? p->total / 20 : 1) : 100;
    p->start = ar_now();
    p->last_draw = -1;
    p->drawn_final = 1; /* nothing to show yet */
    return AR_OK;
}

/* "1:02", "1:02:03"; "?" for nonsense */
static void fmt_duration(double s, char *buf, size_t cap)
{
    if (!isfinite(s) || s < 0 || s > 1e8) {
        snprintf(buf, cap, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(buf, cap, "%ld:%02ld", t / 60, t % 60);
}

/* Append with snprintf semantics, never past the end. */
static void put(char *buf, size_t cap, size_t *len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void put(char *buf, size_t cap, size_t *len, const char *fmt, ...)
{
    if (*len >= cap - 1)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *len, cap - *len, fmt, ap);
    va_end(ap);
    if (n > 0)
        *len = (size_t)n < cap - *len ? *len + (size_t)n : cap - 1;
}

static size_t format_line(const ar_progress *p, int with_bar, char *buf, size_t cap)
{
    size_t len = 0;
    buf[0] = 0;
    double elapsed = ar_now() - p->start;
    char dur[32];
    if (p->label[0])
        put(buf, cap, &len, "%s ", p->label);
    if (p->total > 0) {
        long done = p->done < 0 ? 0 : p->done > p->total ? p->total : p->done;
        double frac = (double)done / (double)p->total;
        if (with_bar) {
            char bar[BAR_WIDTH + 1];
            int fill = (int)(frac * BAR_WIDTH);
            for (int i = 0; i < BAR_WIDTH; i++)
                bar[i] = i < fill ? '#' : '-';
            bar[BAR_WIDTH] = 0;
            put(buf, cap, &len, "%3d%% [%s] ", (int)(frac * 100), bar);
        }
        /* pad done to the width of total so the line does not jitter */
        int w = snprintf(NULL, 0, "%ld", p->total);
        put(buf, cap, &len, "%*ld/%ld", w, p->done, p->total);
    } else {
        put(buf, cap, &len, "%ld", p->done);
    }
    if (p->metrics[0])
        put(buf, cap, &len, " | %s", p->metrics);
    if (p->total > 0 && p->done < p->total) {
        long base = p->base > 0 ? p->base : 0;
        if (p->done > base) {
            fmt_duration(elapsed * (double)(p->total - p->done) / (double)(p->done - base), dur, sizeof dur);
            put(buf, cap, &len, " | ETA %s", dur);
        } else {
            put(buf, cap, &len, " | ETA ?");
        }
    } else {
        fmt_duration(elapsed, dur, sizeof dur);
        put(buf, cap, &len, " | in %s", dur);
    }
    return len;
}

static int terminal_columns(FILE *out)
{
    struct winsize ws;
    if (ioctl(fileno(out), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        return ws.ws_col;
    return 0;
}

static void draw_tty(ar_progress *p)
{
    char line[512];
    size_t len = format_line(p, 1, line, sizeof line);
    /* a line wider than the terminal wraps, and \r then only returns to the
     * start of the last row: cut it to fit */
    int cols = terminal_columns(p->out);
    if (cols > 1 && len > (size_t)(cols - 1)) {
        len = (size_t)(cols - 1);
        line[len] = 0;
    }
    int pad = p->width > (int)len ? p->width - (int)len : 0;
    fprintf(p->out, "\r%s%*s", line, pad, "");
    if (pad)
        fprintf(p->out, "\r%s", line);
    fflush(p->out);
    p->width = (int)len;
    p->last_draw = ar_now();
    p->drawn_final = 1;
}

static void draw_plain(ar_progress *p)
{
    char line[512];
    format_line(p, 0, line, sizeof line);
    fprintf(p->out, "%s\n", line);
    fflush(p->out);
    p->printed = p->done;
    p->drawn_final = 1;
}

void ar_progress_update(ar_progress *p, long done, const char *fmt, ...)
{
    if (!p || !p->out)
        return;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->metrics, sizeof p->metrics, fmt, ap);
        va_end(ap);
        /* a newline in the metrics would break the one-line display */
        for (char *c = p->metrics; *c; c++)
            if (*c == '\n' || *c == '\r')
                *c = ' ';
    } else {
        p->metrics[0] = 0;
    }
    if (p->base < 0)
        p->base = done - 1;
    p->done = done;
    p->drawn_final = 0;
    int final = p->total > 0 && done >= p->total;
    if (p->mode == AR_PROGRESS_TTY) {
        if (final || p->last_draw < 0 || ar_now() - p->last_draw >= REDRAW_SECONDS)
            draw_tty(p);
    } else if (p->mode == AR_PROGRESS_PLAIN) {
        long every = p->plain_every > 0 ? p->plain_every : 1;
        if (final || done - p->printed >= every)
            draw_plain(p);
    }
}

void ar_progress_end(ar_progress *p)
{
    if (!p || !p->out)
        return;
    if (p->mode == AR_PROGRESS_TTY) {
        /* redraw so that the line shows the total time, then keep it */
        if (p->last_draw >= 0 || !p->drawn_final) {
            draw_tty(p);
            fputc('\n', p->out);
            fflush(p->out);
        }
    } else if (p->mode == AR_PROGRESS_PLAIN) {
        if (!p->drawn_final)
            draw_plain(p);
    }
    p->out = NULL; /* further updates are ignored */
}

void ar_progress_note(ar_progress *p, const char *fmt, ...)
{
    FILE *out = p && p->out ? p->out : stderr;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (p && p->mode == AR_PROGRESS_TTY && p->width > 0) {
        /* wipe the bar, print the note on its own line, draw the bar again below */
        fprintf(out, "\r%*s\r%s\n", p->width, "", line);
        p->width = 0;
        draw_tty(p);
    } else {
        fprintf(out, "%s\n", line);
    }
    fflush(out);
}
