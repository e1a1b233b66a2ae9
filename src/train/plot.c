/* SVG line charts of training curves. The whole document is built in
 * memory and written with ar_write_file_atomic, so a reader (a browser
 * refreshing the page during training) never sees half a file. */
#include "train/plot.h"

#include "core/core.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define W 800.0
#define H 480.0
#define ML 80.0 /* margins: left, right, top, bottom */
#define MR 24.0
#define MT 48.0
#define MB 56.0

static const char *palette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728",
                                "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};

/* ---- a growable string --------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_reserve(sbuf *b, size_t more)
{
    if (b->oom)
        return;
    if (b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more + 1) {
        if (cap > SIZE_MAX / 2) {
            b->oom = 1;
            return;
        }
        cap *= 2;
    }
    char *np = realloc(b->p, cap);
    if (!np) {
        b->oom = 1;
        return;
    }
    b->p = np;
    b->cap = cap;
}

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->oom = 1;
        return;
    }
    sb_reserve(b, (size_t)n);
    if (b->oom)
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Length of the valid UTF-8 sequence at s, or 0 if it is not one. */
static int utf8_len(const unsigned char *s)
{
    int n;
    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        n = 2;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        n = 3;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        n = 4;
    else
        return 0;
    for (int i = 1; i < n; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    /* overlong forms, surrogates and code points past U+10FFFF */
    if (n == 3 && s[0] == 0xe0 && s[1] < 0xa0)
        return 0;
    if (n == 3 && s[0] == 0xed && s[1] >= 0xa0)
        return 0;
    if (n == 4 && s[0] == 0xf0 && s[1] < 0x90)
        return 0;
    if (n == 4 && s[0] == 0xf4 && s[1] >= 0x90)
        return 0;
    return n;
}

/* Text content or attribute value: escape the five XML specials, replace
 * what XML 1.0 forbids (control characters, invalid UTF-8) with '?'. */
static void sb_xml(sbuf *b, const char *s)
{
    const unsigned char *u = (const unsigned char *)s;
    while (*u) {
        switch (*u) {
        case '&': sb_printf(b, "&amp;"); u++; continue;
        case '<': sb_printf(b, "&lt;"); u++; continue;
        case '>': sb_printf(b, "&gt;"); u++; continue;
        case '"': sb_printf(b, "&quot;"); u++; continue;
        case '\'': sb_printf(b, "&#39;"); u++; continue;
        default: break;
        }
        if (*u < 0x20) {
            sb_printf(b, *u == '\t' || *u == '\n' ? " " : "?");
            u++;
            continue;
        }
        int n = utf8_len(u);
        if (n == 0) {
            sb_printf(b, "?");
            u++;
        } else {
            sb_printf(b, "%.*s", n, (const char *)u);
            u += n;
        }
    }
}

/* ---- axes ---------------------------------------------------------------- */

typedef struct {
    double lo, hi, step; /* step 0: no ticks */
} axis;

/* 1, 2, 5 x 10^k closest above raw */
static double nice_step(double raw)
{
    double e = floor(log10(raw));
    double base = pow(10, e);
    double f = raw / base;
    double m = f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10;
    return m * base;
}

static axis make_axis(double mn, double mx, int have)
{
    axis a = {0, 1, 0.2};
    if (!have)
        return a;
    if (mn == mx) {
        /* one value: a band around it */
        double d = fabs(mn) > 0 ? fabs(mn) * 0.1 : 1;
        mn -= d;
        mx += d;
    }
    double r = mx - mn;
    if (!isfinite(r) || r <= 0 || !isfinite(mn) || !isfinite(mx)) {
        a.lo = mn;
        a.hi = mx;
        a.step = 0;
        return a;
    }
    double step = nice_step(r / 5);
    if (!isfinite(step) || step <= 0) {
        a.lo = mn;
        a.hi = mx;
        a.step = 0;
        return a;
    }
    a.lo = floor(mn / step) * step;
    a.hi = ceil(mx / step) * step;
    a.step = step;
    if (!isfinite(a.lo) || !isfinite(a.hi) || a.hi <= a.lo) {
        a.lo = mn;
        a.hi = mx;
        a.step = 0;
    }
    return a;
}

/* Map v to pixels; NAN when it cannot be placed. */
static double map(const axis *a, double v, double p0, double p1)
{
    double t = (v - a->lo) / (a->hi - a->lo);
    double p = p0 + t * (p1 - p0);
    return isfinite(p) ? p : NAN;
}

static void tick_label(double v, double step, char *buf, size_t cap)
{
    if (fabs(v) < step * 1e-9)
        v = 0; /* -0 and 1e-17 from floating-point steps */
    snprintf(buf, cap, "%g", v);
}

/* ---- the chart ----------------------------------------------------------- */

static double xval(const ar_plot_series *s, int i)
{
    return s->x ? s->x[i] : (double)i;
}

static void draw_series(sbuf *b, const ar_plot_series *s, const char *color, const axis *ax,
                        const axis *ay)
{
    const double x0 = ML, x1 = W - MR, y0 = H - MB, y1 = MT;
    int run = 0;       /* points in the current polyline */
    double lx = 0, ly = 0; /* the last point, for a run of one */
    for (int i = 0; i <= s->n; i++) {
        double px = NAN, py = NAN;
        if (i < s->n) {
            px = map(ax, xval(s, i), x0, x1);
            py = map(ay, s->y[i], y0, y1);
        }
        if (isfinite(px) && isfinite(py)) {
            if (run == 0) {
                lx = px;
                ly = py;
            } else {
                if (run == 1) {
                    sb_printf(b, "<polyline fill=\"none\" stroke=\"");
                    sb_xml(b, color);
                    sb_printf(b, "\" stroke-width=\"1.5\" stroke-linejoin=\"round\" points=\"%.2f,%.2f",
                              lx, ly);
                }
                sb_printf(b, " %.2f,%.2f", px, py);
            }
            run++;
            continue;
        }
        /* a gap (NaN, inf) or the end: close the run */
        if (run == 1) {
            sb_printf(b, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"2.5\" fill=\"", lx, ly);
            sb_xml(b, color);
            sb_printf(b, "\"/>\n");
        } else if (run > 1) {
            sb_printf(b, "\"/>\n");
        }
        run = 0;
    }
}

int ar_plot_svg(const char *path, const char *title, const ar_plot_series *series, int nseries)
{
    if (!path || nseries < 0 || (nseries > 0 && !series))
        return ar_fail(AR_EINVAL, "ar_plot_svg: bad arguments");
    for (int k = 0; k < nseries; k++)
        if (series[k].n < 0 || (series[k].n > 0 && !series[k].y))
            return ar_fail(AR_EINVAL, "%s: series %d has %d points and %s y values", path, k,
                           series[k].n, series[k].y ? "some" : "no");

    /* data range over finite points */
    double xmn = DBL_MAX, xmx = -DBL_MAX, ymn = DBL_MAX, ymx = -DBL_MAX;
    int have = 0;
    for (int k = 0; k < nseries; k++)
        for (int i = 0; i < series[k].n; i++) {
            double x = xval(&series[k], i), y = series[k].y[i];
            if (!isfinite(x) || !isfinite(y))
                continue;
            have = 1;
            xmn = fmin(xmn, x);
            xmx = fmax(xmx, x);
            ymn = fmin(ymn, y);
            ymx = fmax(ymx, y);
        }
    axis ax = make_axis(xmn, xmx, have), ay = make_axis(ymn, ymx, have);
    const double x0 = ML, x1 = W - MR, y0 = H - MB, y1 = MT;

    sbuf b = {0};
    sb_printf(&b,
              "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
              "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
              "viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\" font-size=\"12\">\n",
              W, H, W, H);
    sb_printf(&b, "<title>");
    sb_xml(&b, title ? title : "loss");
    sb_printf(&b, "</title>\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    if (title) {
        sb_printf(&b, "<text x=\"%.1f\" y=\"28\" text-anchor=\"middle\" font-size=\"16\" "
                      "font-weight=\"bold\">",
                  W / 2);
        sb_xml(&b, title);
        sb_printf(&b, "</text>\n");
    }

    /* grid, ticks and tick labels */
    sb_printf(&b, "<g stroke=\"#e0e0e0\" stroke-width=\"1\">\n");
    char lab[64];
    if (ax.step > 0)
        for (int i = 0; i <= 100; i++) {
            double v = ax.lo + i * ax.step;
            if (v > ax.hi + ax.step * 1e-6)
                break;
            double px = map(&ax, v, x0, x1);
            if (isfinite(px))
                sb_printf(&b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\"/>\n", px, y0, px,
                          y1);
        }
    if (ay.step > 0)
        for (int i = 0; i <= 100; i++) {
            double v = ay.lo + i * ay.step;
            if (v > ay.hi + ay.step * 1e-6)
                break;
            double py = map(&ay, v, y0, y1);
            if (isfinite(py))
                sb_printf(&b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\"/>\n", x0, py, x1,
                          py);
        }
    sb_printf(&b, "</g>\n<g fill=\"#333\">\n");
    /* without nice ticks (absurd ranges) label just the two ends */
    int nx = ax.step > 0 ? 100 : 1, ny = ay.step > 0 ? 100 : 1;
    double sx = ax.step > 0 ? ax.step : ax.hi - ax.lo, sy = ay.step > 0 ? ay.step : ay.hi - ay.lo;
    for (int i = 0; i <= nx; i++) {
        double v = i == nx && ax.step <= 0 ? ax.hi : ax.lo + i * sx;
        if (ax.step > 0 && v > ax.hi + ax.step * 1e-6)
            break;
        double px = map(&ax, v, x0, x1);
        if (!isfinite(px))
            continue;
        tick_label(v, fabs(sx), lab, sizeof lab);
        sb_printf(&b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#333\"/>\n",
                  px, y0, px, y0 + 5);
        sb_printf(&b, "<text x=\"%.2f\" y=\"%.2f\" text-anchor=\"middle\">%s</text>\n", px, y0 + 18,
                  lab);
    }
    for (int i = 0; i <= ny; i++) {
        double v = i == ny && ay.step <= 0 ? ay.hi : ay.lo + i * sy;
        if (ay.step > 0 && v > ay.hi + ay.step * 1e-6)
            break;
        double py = map(&ay, v, y0, y1);
        if (!isfinite(py))
            continue;
        tick_label(v, fabs(sy), lab, sizeof lab);
        sb_printf(&b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#333\"/>\n",
                  x0 - 5, py, x0, py);
        sb_printf(&b, "<text x=\"%.2f\" y=\"%.2f\" text-anchor=\"end\">%s</text>\n", x0 - 8,
                  py + 4, lab);
    }
    sb_printf(&b, "</g>\n");

    /* axes and their labels */
    sb_printf(&b,
              "<path d=\"M%.2f,%.2f V%.2f H%.2f\" fill=\"none\" stroke=\"#333\" "
              "stroke-width=\"1\"/>\n",
              x0, y1, y0, x1);
    sb_printf(&b, "<text x=\"%.2f\" y=\"%.2f\" text-anchor=\"middle\">step</text>\n",
              (x0 + x1) / 2, H - 14);
    sb_printf(&b,
              "<text x=\"20\" y=\"%.2f\" text-anchor=\"middle\" "
              "transform=\"rotate(-90 20 %.2f)\">loss</text>\n",
              (y0 + y1) / 2, (y0 + y1) / 2);

    /* the curves, clipped to the plot area */
    sb_printf(&b,
              "<clipPath id=\"plot\"><rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\"/>"
              "</clipPath>\n<g clip-path=\"url(#plot)\">\n",
              x0, y1 - 3, x1 - x0 + 3, y0 - y1 + 6);
    for (int k = 0; k < nseries; k++) {
        const char *color = series[k].color ? series[k].color : palette[k % 8];
        draw_series(&b, &series[k], color, &ax, &ay);
    }
    sb_printf(&b, "</g>\n");

    /* legend: top right of the plot area */
    if (nseries > 0) {
        size_t longest = 8;
        for (int k = 0; k < nseries; k++)
            if (series[k].name && strlen(series[k].name) > longest)
                longest = strlen(series[k].name);
        if (longest > 60)
            longest = 60;
        double lw = 36 + 7.0 * (double)longest, lh = 8 + 18.0 * nseries;
        double lx = x1 - lw - 8, ly = y1 + 8;
        sb_printf(&b,
                  "<g><rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"white\" "
                  "fill-opacity=\"0.85\" stroke=\"#ccc\"/>\n",
                  lx, ly, lw, lh);
        for (int k = 0; k < nseries; k++) {
            const char *color = series[k].color ? series[k].color : palette[k % 8];
            double yy = ly + 16 + 18.0 * k;
            sb_printf(&b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke-width=\"2\" stroke=\"",
                      lx + 6, yy - 4, lx + 26, yy - 4);
            sb_xml(&b, color);
            sb_printf(&b, "\"/>\n<text x=\"%.2f\" y=\"%.2f\">", lx + 32, yy);
            if (series[k].name)
                sb_xml(&b, series[k].name);
            else
                sb_printf(&b, "series %d", k + 1);
            sb_printf(&b, "</text>\n");
        }
        sb_printf(&b, "</g>\n");
    }
    sb_printf(&b, "</svg>\n");

    int rc;
    if (b.oom)
        rc = ar_fail(AR_ENOMEM, "%s: out of memory building the chart", path);
    else
        rc = ar_write_file_atomic(path, b.p, b.len);
    free(b.p);
    return rc;
}
