/* SVG loss charts, and the progress bar (both are training-time output). */
#include "core/core.h"
#include "core/progress.h"
#include "train/plot.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[256];
static char svg[512];

static void mk_tmp(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/ar_test_plot_XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
    snprintf(svg, sizeof svg, "%s/loss.svg", tmpdir);
}

static void rm_tmp(void)
{
    unlink(svg);
    rmdir(tmpdir);
}

static char *slurp(const char *path)
{
    char *buf;
    size_t len;
    cr_assert_eq(ar_read_file(path, &buf, &len), 0, "%s", ar_last_error());
    return buf;
}

static int count(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p++)
        n++;
    return n;
}

TestSuite(plot, .init = mk_tmp, .fini = rm_tmp);

Test(plot, two_series)
{
    double x[50], tr[50], va[10], vx[10];
    for (int i = 0; i < 50; i++) {
        x[i] = i * 10;
        tr[i] = 4.2 * exp(-i / 15.0) + 1.0;
    }
    for (int i = 0; i < 10; i++) {
        vx[i] = i * 50;
        va[i] = 4.0 * exp(-i / 3.0) + 1.3;
    }
    ar_plot_series s[2] = {{"train", x, tr, 50, NULL}, {"val <held-out> & \"more\"", vx, va, 10, "#d62728"}};
    cr_assert_eq(ar_plot_svg(svg, "gpt-5m on tiny shakespeare", s, 2), 0, "%s", ar_last_error());
    char *doc = slurp(svg);
    cr_assert_not_null(strstr(doc, "<svg"));
    cr_assert_not_null(strstr(doc, "</svg>"));
    cr_assert_not_null(strstr(doc, ">train<"));
    cr_assert_not_null(strstr(doc, "val &lt;held-out&gt; &amp; &quot;more&quot;"));
    cr_assert_null(strstr(doc, "<held-out>"));
    cr_assert_not_null(strstr(doc, "gpt-5m on tiny shakespeare"));
    cr_assert_not_null(strstr(doc, ">step<"));
    cr_assert_not_null(strstr(doc, ">loss<"));
    cr_assert_eq(count(doc, "<polyline"), 2);
    cr_assert_not_null(strstr(doc, "#d62728"));
    /* ticks: 0 and 500 on x */
    cr_assert_not_null(strstr(doc, ">0<"));
    cr_assert_not_null(strstr(doc, ">500<"));
    cr_assert_null(strstr(doc, "nan"));
    cr_assert_null(strstr(doc, "inf"));
    ar_free(doc);
}

Test(plot, empty_and_single_point)
{
    ar_plot_series none[1] = {{"nothing", NULL, NULL, 0, NULL}};
    cr_assert_eq(ar_plot_svg(svg, "empty", none, 1), 0, "%s", ar_last_error());
    char *doc = slurp(svg);
    cr_assert_not_null(strstr(doc, "<svg"));
    cr_assert_not_null(strstr(doc, "nothing"));
    cr_assert_eq(count(doc, "<polyline"), 0);
    ar_free(doc);

    cr_assert_eq(ar_plot_svg(svg, NULL, NULL, 0), 0, "%s", ar_last_error());
    doc = slurp(svg);
    cr_assert_not_null(strstr(doc, "</svg>"));
    ar_free(doc);

    double y = 2.5;
    ar_plot_series one[1] = {{"one", NULL, &y, 1, NULL}};
    cr_assert_eq(ar_plot_svg(svg, "one point", one, 1), 0, "%s", ar_last_error());
    doc = slurp(svg);
    cr_assert_eq(count(doc, "<circle"), 1);
    cr_assert_null(strstr(doc, "nan"));
    ar_free(doc);
}

Test(plot, nonfinite_values_skipped)
{
    double y[6] = {3.0, NAN, 2.0, 1.5, INFINITY, -INFINITY};
    double y2[2] = {NAN, NAN};
    ar_plot_series s[2] = {{"a", NULL, y, 6, NULL}, {"b", NULL, y2, 2, NULL}};
    cr_assert_eq(ar_plot_svg(svg, "t", s, 2), 0, "%s", ar_last_error());
    char *doc = slurp(svg);
    cr_assert_eq(count(doc, "<circle"), 1);   /* 3.0 alone between gaps */
    cr_assert_eq(count(doc, "<polyline"), 1); /* 2.0 - 1.5 */
    cr_assert_null(strstr(doc, "nan"));
    cr_assert_null(strstr(doc, "inf"));
    ar_free(doc);

    /* huge and equal values must not break the axes */
    double big[3] = {1e308, -1e308, 0}, flat[3] = {7, 7, 7};
    ar_plot_series s2[2] = {{"big", NULL, big, 3, NULL}, {"flat", NULL, flat, 3, NULL}};
    cr_assert_eq(ar_plot_svg(svg, "t", s2, 2), 0, "%s", ar_last_error());
    doc = slurp(svg);
    cr_assert_null(strstr(doc, "nan"));
    ar_free(doc);
    cr_assert_eq(ar_plot_svg(svg, "t", s2 + 1, 1), 0, "%s", ar_last_error());
}

Test(plot, escapes_title_and_rejects_bad_args)
{
    double y[2] = {1, 2};
    ar_plot_series s[1] = {{"x\x01y\xff", NULL, y, 2, NULL}};
    cr_assert_eq(ar_plot_svg(svg, "a<b>&'c'", s, 1), 0);
    char *doc = slurp(svg);
    cr_assert_not_null(strstr(doc, "a&lt;b&gt;&amp;&#39;c&#39;"));
    cr_assert_not_null(strstr(doc, "x?y?"));
    ar_free(doc);
    ar_plot_series bad[1] = {{"b", NULL, NULL, 3, NULL}};
    cr_assert_eq(ar_plot_svg(svg, "t", bad, 1), AR_EINVAL);
    cr_assert_eq(ar_plot_svg(svg, "t", NULL, 2), AR_EINVAL);
    cr_assert_eq(ar_plot_svg("/nonexistent-dir/x.svg", "t", s, 1), AR_EIO);
}

/* ---- progress bar ---------------------------------------------------------- */

static char *run_progress(const char *mode, long total, long steps)
{
    if (mode)
        setenv("ARCEUS_PROGRESS", mode, 1);
    else
        unsetenv("ARCEUS_PROGRESS");
    FILE *f = tmpfile();
    cr_assert_not_null(f);
    ar_progress p;
    cr_assert_eq(ar_progress_begin(&p, "train", total, f), 0);
    for (long i = 1; i <= steps; i++)
        ar_progress_update(&p, i, "loss %.3f | %s tok/s", 2.0 / (double)i, "3,456");
    ar_progress_end(&p);
    unsetenv("ARCEUS_PROGRESS");
    long len = ftell(f);
    rewind(f);
    char *buf = calloc((size_t)len + 1, 1);
    cr_assert_not_null(buf);
    cr_assert_eq(fread(buf, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    return buf;
}

Test(progress, plain_lines_every_5_percent)
{
    char *out = run_progress(NULL, 100, 100); /* a file is not a tty: plain */
    cr_assert_null(strchr(out, '\r'));
    cr_assert_eq(count(out, "\n"), 20, "%s", out);
    cr_assert_not_null(strstr(out, "train "));
    cr_assert_not_null(strstr(out, " 5/100"));
    cr_assert_not_null(strstr(out, "100/100 | loss 0.020 | 3,456 tok/s"));
    cr_assert_not_null(strstr(out, "ETA"));
    free(out);

    /* the last update is always printed, once */
    out = run_progress("plain", 7, 7);
    cr_assert_eq(count(out, "\n"), 7);
    cr_assert_eq(count(out, "7/7"), 1);
    free(out);
    /* stopped early: end prints the last state */
    out = run_progress("plain", 100, 12);
    cr_assert_not_null(strstr(out, " 12/100"));
    free(out);
}

Test(progress, tty_redraws_one_line)
{
    char *out = run_progress("tty", 1000, 1000);
    /* throttled: far fewer redraws than updates, one final newline */
    int redraws = count(out, "\r");
    cr_assert(redraws >= 2 && redraws < 50, "%d redraws", redraws);
    cr_assert_eq(count(out, "\n"), 1);
    cr_assert_not_null(strstr(out, "[########################]"));
    cr_assert_not_null(strstr(out, "1000/1000"));
    cr_assert_not_null(strstr(out, "100%"));
    free(out);
}

Test(progress, off_and_unknown_total)
{
    char *out = run_progress("off", 10, 10);
    cr_assert_eq(out[0], 0);
    free(out);
    out = run_progress("plain", 0, 250);
    cr_assert_eq(count(out, "\n"), 3, "%s", out); /* 100, 200, and the end */
    cr_assert_null(strstr(out, "ETA"));
    free(out);
}
