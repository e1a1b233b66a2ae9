/* The generic option parser and help printer behind every subcommand's
 * table (options.h). */
#include "cli/options.h"
#include "cli/cli.h"
#include "arceus.h"
#include "market/money.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* More rows than any command has; the table check says so if one ever does. */
#define MAX_ROWS 128
#define HELP_WIDTH 79
#define HELP_COLUMN 23 /* where an option's help starts */

/* ---- the rows ------------------------------------------------------------------- */

/* Every row of every section, in order, with where its struct sits. */
typedef struct {
    const ar_option *opt;
    size_t base;
} row_ref;

static size_t kind_size(ar_option_kind kind)
{
    switch (kind) {
    case AR_OPTION_FLAG:
    case AR_OPTION_INT:
    case AR_OPTION_ENUM:
        return sizeof(int);
    case AR_OPTION_STRING:
    case AR_OPTION_HOSTPORT:
        return sizeof(const char *);
    case AR_OPTION_LONG:
        return sizeof(long);
    case AR_OPTION_U64:
        return sizeof(uint64_t);
    case AR_OPTION_FLOAT:
        return sizeof(float);
    case AR_OPTION_SIZE:
    case AR_OPTION_CREDITS:
        return sizeof(int64_t);
    case AR_OPTION_CUSTOM:
        break;
    }
    return 0;
}

/* A table that does not fit its own rules is a programming error, not a
 * user's: say which row and stop, so that no test can miss it. */
static void table_bug(const ar_cmd_spec *spec, const ar_option *o, const char *what)
{
    fprintf(stderr, "arceus %s: internal error: option --%s %s\n", spec->name, o ? o->name : "?", what);
    abort();
}

static size_t collect_rows(const ar_cmd_spec *spec, row_ref *rows)
{
    size_t n = 0;
    for (const ar_option_section *s = spec->sections; s && s->opts; s++)
        for (const ar_option *o = s->opts; o->name; o++) {
            if (n == MAX_ROWS)
                table_bug(spec, o, "is one row too many for the option parser");
            if (o->kind == AR_OPTION_CUSTOM ? !o->parse : o->dest_size != kind_size(o->kind))
                table_bug(spec, o, "has a destination that does not fit its kind");
            if (o->kind == AR_OPTION_ENUM && !o->choices)
                table_bug(spec, o, "is an enum without choices");
            rows[n].opt = o;
            rows[n].base = s->base;
            n++;
        }
    return n;
}

/* ---- values --------------------------------------------------------------------- */

/* "4 PiB", "1 byte", "1536 KiB": the largest unit that divides v exactly */
static const char *size_text(int64_t v, char *buf, size_t size)
{
    static const char *const units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int u = 0;
    while (u < 5 && v > 0 && v % 1024 == 0) {
        v /= 1024;
        u++;
    }
    snprintf(buf, size, "%lld %s", (long long)v, u == 0 && v == 1 ? "byte" : units[u]);
    return buf;
}

/* micro-credits as credits, without trailing zeros: "100", "0.25", "0.000001" */
static const char *credits_text(int64_t micro, char *buf, size_t size)
{
    ar_credits_text(micro, buf, size);
    char *dot = strchr(buf, '.');
    if (dot) {
        char *end = buf + strlen(buf);
        while (end > dot + 1 && end[-1] == '0')
            *--end = '\0';
        if (end == dot + 1)
            *dot = '\0';
    }
    return buf;
}

/* Credits "N" or "N.DDDDDD" (at most 6 decimals) -> micro-credits, exactly
 * (no floating point); 0 when the value is in [lo, hi] micro-credits. */
static int parse_credits(const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    int64_t v;
    if (ar_credits_parse(s, hi, &v) != AR_OK || v < lo)
        return -1;
    *out = v;
    return 0;
}

/* "N" bytes, or N then K, M, G or T (powers of 1024), optionally then "B"
 * or "iB"; within lo..hi bytes */
static int parse_size(const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    const char *p = s;
    uint64_t v = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9'; p++, digits++) {
        v = v * 10 + (uint64_t)(*p - '0');
        if (v > (uint64_t)hi) /* the bytes are at least this many */
            return -1;
    }
    if (digits == 0)
        return -1;
    int shift = 0;
    switch (*p) {
    case 'k': case 'K': shift = 10; p++; break;
    case 'm': case 'M': shift = 20; p++; break;
    case 'g': case 'G': shift = 30; p++; break;
    case 't': case 'T': shift = 40; p++; break;
    default: break;
    }
    if (shift && (*p == 'i' || *p == 'I'))
        p++;
    if (*p == 'b' || *p == 'B')
        p++;
    if (*p || v > ((uint64_t)hi >> shift) || (int64_t)(v << shift) < lo)
        return -1;
    *out = (int64_t)(v << shift);
    return 0;
}

/* "a, b or c" into buf */
static const char *choices_text(const ar_option_choice *c, char *buf, size_t size)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int i = 0; c[i].word && len < size; i++) {
        const char *sep = i == 0 ? "" : c[i + 1].word ? ", " : " or ";
        int n = snprintf(buf + len, size - len, "%s%s", sep, c[i].word);
        if (n < 0)
            break;
        len += (size_t)n;
    }
    return buf;
}

/* The values a row takes, as its help and its errors say them: "1..4096",
 * "1 byte..4 PiB", "adamw or sgd"; "" when any value of its kind will do. */
static const char *range_text(const ar_option *o, char *buf, size_t size)
{
    char a[48], b[48];
    buf[0] = '\0';
    switch (o->kind) {
    case AR_OPTION_INT:
    case AR_OPTION_LONG:
        snprintf(buf, size, "%lld..%lld", (long long)o->lo, (long long)o->hi);
        break;
    case AR_OPTION_FLOAT:
        snprintf(buf, size, "%.10g..%.10g", o->flo, o->fhi);
        break;
    case AR_OPTION_SIZE:
        snprintf(buf, size, "%s..%s", size_text(o->lo, a, sizeof a), size_text(o->hi, b, sizeof b));
        break;
    case AR_OPTION_CREDITS:
        snprintf(buf, size, "%s..%s, at most 6 decimals", credits_text(o->lo, a, sizeof a),
                 credits_text(o->hi, b, sizeof b));
        break;
    case AR_OPTION_ENUM:
        choices_text(o->choices, buf, size);
        break;
    default:
        break;
    }
    return buf;
}

static int parse_long(const ar_option_ctx *ctx, const char *s, long *out)
{
    const ar_option *o = ctx->opt;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || (errno && errno != ERANGE)) {
        ar_cli_error(ctx->cmd, "--%s expects an integer, got \"%s\"", ctx->name, s);
        return -1;
    }
    if (errno == ERANGE || v < o->lo || v > o->hi) {
        char range[100];
        ar_cli_error(ctx->cmd, "--%s %s is out of range %s", ctx->name, s,
                     range_text(o, range, sizeof range));
        return -1;
    }
    *out = v;
    return 0;
}

/* value into the row's destination; 0, or one error line and -1 */
static int set_value(const ar_option_ctx *ctx, const char *value, char *dest, void *opts)
{
    const ar_option *o = ctx->opt;
    char range[240];
    switch (o->kind) {
    case AR_OPTION_FLAG:
        *(int *)dest = 1;
        return 0;
    case AR_OPTION_HOSTPORT:
    case AR_OPTION_STRING:
        if (o->kind == AR_OPTION_HOSTPORT && !strchr(value, ':')) {
            ar_cli_error(ctx->cmd, "--%s expects HOST:PORT, got \"%s\"", ctx->name, value);
            return -1;
        }
        if (o->hi > 0 && (int64_t)strlen(value) > o->hi) {
            ar_cli_error(ctx->cmd, "--%s takes at most %lld characters, got %zu", ctx->name,
                         (long long)o->hi, strlen(value));
            return -1;
        }
        *(const char **)dest = value;
        return 0;
    case AR_OPTION_INT:
    case AR_OPTION_LONG: {
        long v;
        if (parse_long(ctx, value, &v) != 0)
            return -1;
        if (o->kind == AR_OPTION_INT)
            *(int *)dest = (int)v; /* within lo..hi, which an int row keeps within int */
        else
            *(long *)dest = v;
        return 0;
    }
    case AR_OPTION_U64: {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(value, &end, 10);
        if (errno || end == value || *end != '\0' || value[0] == '-') {
            ar_cli_error(ctx->cmd, "--%s expects a non-negative integer, got \"%s\"", ctx->name, value);
            return -1;
        }
        *(uint64_t *)dest = v;
        return 0;
    }
    case AR_OPTION_FLOAT: {
        char *end;
        errno = 0;
        double v = strtod(value, &end);
        if (errno || end == value || *end != '\0' || !isfinite(v)) {
            ar_cli_error(ctx->cmd, "--%s expects a number, got \"%s\"", ctx->name, value);
            return -1;
        }
        if (v < o->flo || v > o->fhi) {
            ar_cli_error(ctx->cmd, "--%s %s is out of range %s", ctx->name, value,
                         range_text(o, range, sizeof range));
            return -1;
        }
        *(float *)dest = (float)v;
        return 0;
    }
    case AR_OPTION_SIZE:
    case AR_OPTION_CREDITS: {
        int size = o->kind == AR_OPTION_SIZE;
        if ((size ? parse_size : parse_credits)(value, o->lo, o->hi, (int64_t *)dest) == 0)
            return 0;
        ar_cli_error(ctx->cmd, "--%s expects %s (%s), got \"%s\"", ctx->name,
                     size ? "a size like 512M, 4G or a number of bytes" : "credits like 100 or 0.25",
                     range_text(o, range, sizeof range), value);
        return -1;
    }
    case AR_OPTION_ENUM: {
        for (const ar_option_choice *c = o->choices; c->word; c++)
            if (!strcmp(value, c->word)) {
                *(int *)dest = c->value;
                return 0;
            }
        ar_cli_error(ctx->cmd, "--%s must be %s, got \"%s\"", ctx->name, range_text(o, range, sizeof range),
                     value);
        return -1;
    }
    case AR_OPTION_CUSTOM:
        return o->parse(ctx, value, opts);
    }
    return -1;
}

/* ---- parsing -------------------------------------------------------------------- */

/* the row named name (len characters: argv may go on with "=VALUE") */
static int find_row(const row_ref *rows, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; i < n; i++) {
        const ar_option *o = rows[i].opt;
        if ((strlen(o->name) == len && !strncmp(o->name, name, len)) ||
            (o->alias && strlen(o->alias) == len && !strncmp(o->alias, name, len)))
            return (int)i;
    }
    return -1;
}

int ar_opts_parse(const ar_cmd_spec *spec, int argc, char **argv, void *opts)
{
    row_ref rows[MAX_ROWS];
    size_t n = collect_rows(spec, rows);
    unsigned char given[MAX_ROWS] = {0};
    char *base = opts;
    for (size_t i = 0; i < n; i++) {
        const ar_option *o = rows[i].opt;
        ar_option_ctx ctx = {.cmd = spec->name, .opt = o, .name = o->name};
        if (o->def && set_value(&ctx, o->def, base + rows[i].base + o->dest, opts) != 0)
            table_bug(spec, o, "has a default its own kind refuses");
    }
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            if (spec->positional && spec->positional(opts, arg) == 0)
                continue;
            ar_cli_error(spec->name, "unexpected argument \"%s\" (see arceus %s --help)", arg, spec->name);
            return -1;
        }
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        int r = find_row(rows, n, name, len);
        if (r < 0) {
            ar_cli_error(spec->name, "unknown option \"--%.*s\" (see arceus %s --help)", (int)len, name,
                         spec->name);
            return -1;
        }
        const ar_option *o = rows[r].opt;
        char typed[64]; /* the name as given, for messages: it may be the alias */
        snprintf(typed, sizeof typed, "%.*s", (int)len, name);
        ar_option_ctx ctx = {.cmd = spec->name, .opt = o, .name = typed};
        const char *value = NULL;
        if (o->kind == AR_OPTION_FLAG) {
            if (eq) {
                ar_cli_error(spec->name, "--%s takes no value, got \"%s\"", typed, eq + 1);
                return -1;
            }
        } else if (eq) {
            value = eq + 1;
        } else if (i + 1 < argc) {
            value = argv[++i];
        } else {
            ar_cli_error(spec->name, "--%s needs a value%s%s", typed, o->metavar ? ": " : "",
                         o->metavar ? o->metavar : "");
            return -1;
        }
        if (o->given_bit)
            *(unsigned *)(base + spec->given_mask) |= o->given_bit;
        if (set_value(&ctx, value, base + rows[r].base + o->dest, opts) != 0)
            return -1;
        given[r] = 1;
    }
    /* an option that is another form of the command (arceus provide
     * --leave) needs none of the options the command otherwise requires */
    int alone = 0;
    for (size_t i = 0; i < n; i++)
        alone |= given[i] && rows[i].opt->alone;
    for (size_t i = 0; i < n; i++) {
        const ar_option *o = rows[i].opt;
        char *dest = base + rows[i].base + o->dest;
        const char *env = o->env && !given[i] ? getenv(o->env) : NULL;
        ar_option_ctx ctx = {.cmd = spec->name, .opt = o, .name = o->name};
        if (env && set_value(&ctx, env, dest, opts) != 0)
            return -1;
        if (!o->required || alone)
            continue;
        /* an empty string is no more use than none: a token "" */
        int is_string = o->kind == AR_OPTION_STRING || o->kind == AR_OPTION_HOSTPORT;
        int missing = is_string ? !*(const char **)dest || !**(const char **)dest : !given[i] && !env;
        if (!missing)
            continue;
        char why[240] = "";
        if (o->env && o->hint)
            snprintf(why, sizeof why, " (or $%s; %s)", o->env, o->hint);
        else if (o->env || o->hint)
            snprintf(why, sizeof why, " (%s%s)", o->env ? "or $" : "", o->env ? o->env : o->hint);
        ar_cli_error(spec->name, "--%s %s is required%s", o->name, o->metavar ? o->metavar : "VALUE", why);
        return -1;
    }
    return 0;
}

int ar_opts_main(const ar_cmd_spec *spec, int argc, char **argv)
{
    void *opts = calloc(1, spec->opts_size ? spec->opts_size : 1);
    if (!opts) {
        ar_cli_error(spec->name, "out of memory");
        return 1;
    }
    int rc = spec->init ? spec->init(opts, argc, argv) : 0;
    if (rc == 0)
        rc = ar_opts_parse(spec, argc, argv, opts) == 0 ? spec->run(opts) : 2;
    free(opts);
    return rc;
}

const char *ar_opts_peek(int argc, char **argv, const char *name)
{
    size_t len = strlen(name);
    const char *value = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0 || strncmp(a + 2, name, len) != 0)
            continue;
        if (a[2 + len] == '=')
            value = a + 3 + len;
        else if (a[2 + len] == '\0' && i + 1 < argc)
            value = argv[++i];
    }
    return value;
}

/* ---- help ----------------------------------------------------------------------- */

/* Print len characters of text from column *col, wrapping at HELP_WIDTH onto
 * lines indented to indent. A '\n' in text starts a new line (at indent). */
static void wrap(FILE *out, const char *text, size_t len_all, int indent, int *col)
{
    const char *p = text, *stop = text + len_all;
    while (p < stop) {
        if (*p == '\n') {
            fprintf(out, "\n%*s", indent, "");
            *col = indent;
            p++;
            continue;
        }
        if (*p == ' ') {
            p++;
            continue;
        }
        size_t len = strcspn(p, " \n");
        if (len > (size_t)(stop - p))
            len = (size_t)(stop - p);
        int at_line_start = *col <= indent;
        if (!at_line_start && *col + 1 + (int)len > HELP_WIDTH) {
            fprintf(out, "\n%*s", indent, "");
            *col = indent;
            at_line_start = 1;
        }
        if (!at_line_start) {
            fputc(' ', out);
            (*col)++;
        }
        fwrite(p, 1, len, out);
        *col += (int)len;
        p += len;
    }
}

/* What the table knows besides the help line: "[1..4096; default 1]" */
static void option_facts(const ar_option *o, char *buf, size_t size)
{
    char range[240];
    range_text(o, range, sizeof range);
    const char *def = o->def_text ? o->def_text : o->def;
    const char *parts[5];
    int n = 0;
    char need[80] = "", alias[80] = "", dflt[200] = "";
    if (o->required || o->env) {
        snprintf(need, sizeof need, "%s%s%s%s", o->required ? "required" : "",
                 o->required && o->env ? ", " : "", o->env ? "or $" : "", o->env ? o->env : "");
        parts[n++] = need;
    }
    if (range[0])
        parts[n++] = range;
    if (def) {
        snprintf(dflt, sizeof dflt, "default %s", def);
        parts[n++] = dflt;
    }
    if (o->alias) {
        snprintf(alias, sizeof alias, "also --%s", o->alias);
        parts[n++] = alias;
    }
    size_t len = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && len < size; i++) {
        int w = snprintf(buf + len, size - len, "%s%s%s", i == 0 ? "[" : "; ", parts[i],
                         i == n - 1 ? "]" : "");
        if (w < 0)
            break;
        len += (size_t)w;
    }
}

static void print_option(FILE *out, const ar_option *o)
{
    const char *metavar = o->kind == AR_OPTION_FLAG || !o->metavar ? "" : o->metavar;
    char facts[600];
    int col = fprintf(out, "  --%s%s%s", o->name, *metavar ? " " : "", metavar);
    /* the help beside the option, or under it when the option is too wide */
    if (col > HELP_COLUMN - 2)
        fprintf(out, "\n%*s", HELP_COLUMN, "");
    else
        fprintf(out, "%*s", HELP_COLUMN - col, "");
    col = HELP_COLUMN;
    if (o->help)
        wrap(out, o->help, strlen(o->help), HELP_COLUMN, &col);
    option_facts(o, facts, sizeof facts);
    wrap(out, facts, strlen(facts), HELP_COLUMN, &col);
    fputc('\n', out);
}

void ar_opts_help(const ar_cmd_spec *spec, FILE *out)
{
    row_ref rows[MAX_ROWS];
    collect_rows(spec, rows); /* checks the table */
    /* every usage form on its own line, the later ones under the first */
    const char *u = spec->usage ? spec->usage : "[options]";
    fprintf(out, "usage: ");
    for (int first = 1; *u; first = 0) {
        size_t len = strcspn(u, "\n");
        fprintf(out, "%sarceus %s %.*s\n", first ? "" : "       ", spec->name, (int)len, u);
        u += len + (u[len] == '\n');
    }
    /* the description, paragraph by paragraph */
    for (const char *d = spec->description; d && *d;) {
        const char *end = strstr(d, "\n\n");
        size_t len = end ? (size_t)(end - d) : strlen(d);
        int col = 0;
        fputc('\n', out);
        wrap(out, d, len, 0, &col);
        fputc('\n', out);
        d += len + (end ? 2 : 0);
    }
    int untitled_done = 0;
    for (const ar_option_section *s = spec->sections; s && s->opts; s++) {
        if (s->title)
            fprintf(out, "\n%s:\n", s->title);
        else if (!untitled_done)
            fprintf(out, "\noptions:\n");
        untitled_done |= !s->title;
        for (const ar_option *o = s->opts; o->name; o++)
            print_option(out, o);
    }
}

/* ---- manual pages ------------------------------------------------------------------- */

/* text (len bytes) as roff: backslashes and minus signs escaped, a '\n'
 * becomes a line break, and a line that would begin with a control
 * character ('.' or '\'') is protected with \& */
static void roff_text(FILE *out, const char *text, size_t len)
{
    int line_start = 1;
    for (size_t i = 0; i < len; i++) {
        char ch = text[i];
        if (ch == '\n') {
            fputs("\n.br\n", out);
            line_start = 1;
            continue;
        }
        if (line_start && (ch == '.' || ch == '\''))
            fputs("\\&", out);
        line_start = 0;
        if (ch == '\\')
            fputs("\\e", out);
        else if (ch == '-')
            fputs("\\-", out);
        else
            fputc(ch, out);
    }
}

static void roff_str(FILE *out, const char *text)
{
    roff_text(out, text, strlen(text));
}

/* NAME in upper case for .TH */
static void roff_title(FILE *out, const char *name)
{
    for (const char *p = name; *p; p++)
        fputc(*p >= 'a' && *p <= 'z' ? *p - 'a' + 'A' : *p, out);
}

static void man_header(FILE *out, const char *title, const char *what)
{
    fprintf(out, ".\\\" Generated by arceus %s from its option tables (src/cli/options.c); do not edit.\n",
            AR_VERSION_STRING);
    fputs(".TH ", out);
    roff_title(out, title);
    fprintf(out, " 1 \"\" \"arceus %s\" \"Arceus Manual\"\n.SH NAME\n", AR_VERSION_STRING);
    roff_str(out, title);
    fputs(" \\- ", out);
    roff_str(out, what);
    fputc('\n', out);
}

void ar_opts_man(const ar_cmd_spec *spec, FILE *out)
{
    row_ref rows[MAX_ROWS];
    size_t n = collect_rows(spec, rows); /* checks the table */
    char title[64];
    snprintf(title, sizeof title, "arceus-%s", spec->name);
    man_header(out, title, spec->summary);

    fputs(".SH SYNOPSIS\n", out);
    const char *u = spec->usage ? spec->usage : "[options]";
    while (*u) {
        size_t len = strcspn(u, "\n");
        fprintf(out, ".B arceus %s\n", spec->name);
        roff_text(out, u, len);
        fputs("\n.br\n", out);
        u += len + (u[len] == '\n');
    }

    fputs(".SH DESCRIPTION\n", out);
    for (const char *d = spec->description; d && *d;) {
        const char *end = strstr(d, "\n\n");
        size_t len = end ? (size_t)(end - d) : strlen(d);
        fputs(".PP\n", out);
        roff_text(out, d, len);
        fputc('\n', out);
        d += len + (end ? 2 : 0);
    }

    fputs(".SH OPTIONS\n", out);
    for (const ar_option_section *s = spec->sections; s && s->opts; s++) {
        if (s->title) {
            fputs(".SS ", out);
            roff_str(out, s->title);
            fputc('\n', out);
        }
        for (const ar_option *o = s->opts; o->name; o++) {
            fputs(".TP\n\\fB", out);
            roff_str(out, "--");
            roff_str(out, o->name);
            fputs("\\fR", out);
            if (o->kind != AR_OPTION_FLAG && o->metavar) {
                fputs(" \\fI", out);
                roff_str(out, o->metavar);
                fputs("\\fR", out);
            }
            fputc('\n', out);
            char facts[600];
            option_facts(o, facts, sizeof facts);
            if (o->help)
                roff_str(out, o->help);
            if (facts[0]) {
                fputs(o->help ? " " : "", out);
                roff_str(out, facts);
            }
            fputc('\n', out);
        }
    }
    fputs(".PP\nEvery option may also be written \\fB\\-\\-name=\\fR\\fIVALUE\\fR.\n", out);

    int envs = 0;
    for (size_t i = 0; i < n; i++) {
        const ar_option *o = rows[i].opt;
        if (!o->env)
            continue;
        if (envs++ == 0)
            fputs(".SH ENVIRONMENT\n", out);
        fputs(".TP\n.B ", out);
        roff_str(out, o->env);
        fputs("\nthe value of \\fB", out);
        roff_str(out, "--");
        roff_str(out, o->name);
        fputs("\\fR when it is not given.\n", out);
    }
    fputs(".SH SEE ALSO\n.BR arceus (1)\n", out);
}

void ar_opts_man_index(const ar_cmd_spec *const *cmds, size_t n, FILE *out)
{
    man_header(out, "arceus", "decentralized neural-network training");
    fputs(".SH SYNOPSIS\n.B arceus\n\\fICOMMAND\\fR [\\fIOPTIONS\\fR]\n.br\n"
          ".B arceus\n\\fICOMMAND\\fR \\fB\\-\\-help\\fR\n"
          ".SH DESCRIPTION\n.PP\n"
          "One binary plays every role of Arceus: it trains a model on this machine or across "
          "worker processes on several machines (pipeline and tensor parallelism over gRPC), runs "
          "the credit market with its web dashboard, rents this machine out through a market, and "
          "reads a market's providers, ledger and jobs. Each command's manual page describes its "
          "options; \\fBarceus \\fR\\fICOMMAND\\fR\\fB \\-\\-help\\fR prints the same.\n"
          ".SH COMMANDS\n",
          out);
    for (size_t i = 0; i < n; i++) {
        fputs(".TP\n.B ", out);
        roff_str(out, cmds[i]->name);
        fputc('\n', out);
        roff_str(out, cmds[i]->summary);
        fputs(" (see \\fBarceus\\-", out);
        roff_str(out, cmds[i]->name);
        fputs("\\fR(1))\n", out);
    }
    fputs(".SH SEE ALSO\n", out);
    for (size_t i = 0; i < n; i++) {
        fputs(".BR arceus\\-", out);
        roff_str(out, cmds[i]->name);
        fprintf(out, " (1)%s\n", i + 1 < n ? "," : "");
    }
}
