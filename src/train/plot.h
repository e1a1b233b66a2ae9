/* Loss curves as a self-contained SVG line chart (no dependencies, opens in
 * any browser): title, axes with ticks, "step" and "loss" labels, a legend. */
#ifndef AR_PLOT_H
#define AR_PLOT_H

typedef struct {
    const char *name;  /* legend text (XML-escaped on output); NULL: "series N" */
    const double *x;   /* n values; NULL means 0, 1, ..., n-1 */
    const double *y;   /* n values; NaN and infinite points are skipped (the line breaks) */
    int n;
    const char *color; /* any SVG color, e.g. "#1f77b4"; NULL picks one from a palette */
} ar_plot_series;

/* Write the chart atomically to path. Series may be empty; a lone point is
 * drawn as a dot. Returns 0, AR_EINVAL, AR_ENOMEM or AR_EIO. */
int ar_plot_svg(const char *path, const char *title, const ar_plot_series *series, int nseries);

#endif
