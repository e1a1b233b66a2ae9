/* Command-line options from one table per subcommand.
 *
 * A subcommand describes itself once, in an ar_cmd_spec: its usage line,
 * what it does, and its options in sections of rows. Each row says the
 * option's name, what kind of value it takes and within which range or
 * choices, its default, where the value goes (an offset into the
 * subcommand's own options struct), a metavar and one help line. The same
 * rows drive ar_opts_parse (argv into the struct, with one clear error line
 * for anything wrong) and ar_opts_help (`arceus COMMAND --help`), so the
 * help cannot drift from what is parsed, and the table holds everything a
 * man page would need.
 *
 * Checks that involve several options together are not the table's business:
 * each command makes them in plain code after ar_opts_parse. */
#ifndef AR_CLI_OPTIONS_H
#define AR_CLI_OPTIONS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum {
    AR_OPTION_FLAG,     /* int, set to 1; takes no value */
    AR_OPTION_STRING,   /* const char * (into argv); .hi > 0: at most .hi characters */
    AR_OPTION_HOSTPORT, /* const char *, "HOST:PORT"; .hi as for a string */
    AR_OPTION_INT,      /* int in .lo..hi */
    AR_OPTION_LONG,     /* long in .lo..hi */
    AR_OPTION_U64,      /* uint64_t, any non-negative integer */
    AR_OPTION_FLOAT,    /* float in .flo..fhi */
    AR_OPTION_SIZE,     /* int64_t bytes in .lo..hi: N, or N then K, M, G or T (powers of
                           1024), optionally then B or iB: 512M, 4G, 4GiB */
    AR_OPTION_CREDITS,  /* int64_t micro-credits in .lo..hi, read exactly (no floating
                           point) from credits "N" or "N.DDDDDD" */
    AR_OPTION_ENUM,     /* int: the value of one of .choices */
    AR_OPTION_CUSTOM,   /* .parse reads the value */
} ar_option_kind;

/* One word of an AR_OPTION_ENUM and the value it stands for. */
typedef struct {
    const char *word;
    int value;
} ar_option_choice;

typedef struct ar_option ar_option;

/* What a value parser is told, for its messages: the command, the row, and
 * the option's name as it was typed (the row's name or its alias). */
typedef struct {
    const char *cmd;
    const ar_option *opt;
    const char *name;
} ar_option_ctx;

struct ar_option {
    const char *name;    /* without the leading "--"; NULL ends a table */
    const char *alias;   /* another name accepted for it (an older spelling), or NULL */
    ar_option_kind kind;
    size_t dest;         /* offset of the destination within the section's struct */
    size_t dest_size;    /* its size, checked against the kind (AR_OPTION_AT sets both) */
    int64_t lo, hi;      /* the range of integers, sizes and credits; a string's length */
    double flo, fhi;     /* the range of an AR_OPTION_FLOAT */
    const ar_option_choice *choices; /* AR_OPTION_ENUM: ends with a NULL word */
    /* AR_OPTION_CUSTOM: read value into the command's options struct (the
     * whole of it, not only dest: one option may set several fields); 0, or
     * print one error line (ar_cli_error) and return -1 */
    int (*parse)(const ar_option_ctx *ctx, const char *value, void *opts);
    const char *metavar; /* the value's name in the help: "N", "HOST:PORT" */
    const char *def;     /* the default as it would be written on the command line; parsed
                            into dest before argv is (NULL: dest keeps what the command put
                            there) */
    const char *def_text; /* the default as the help says it, when it is not one value that
                            def can hold: "GPT 3000, MLP 469", "the free memory" */
    const char *env;     /* when the option is not given, the value of this environment
                            variable, if set, is parsed in its place */
    int required;        /* missing (or empty) after argv and env: an error */
    int alone;           /* given, the command needs none of its required options: it is another
                            form of the command (its usage's second line) */
    const char *hint;    /* appended to the "is required" error: where to get a value */
    unsigned given_bit;  /* ORed into the command's given mask when the option is given */
    const char *help;    /* what it does; the range, choices and default are added */
};

/* dest and dest_size of a member of the options struct TYPE */
#define AR_OPTION_AT(type, member) \
    .dest = offsetof(type, member), .dest_size = sizeof(((type *)0)->member)

/* A numeric macro as a default: .def = AR_OPTION_STR(AR_WORKER_DEFAULT_PIPES) */
#define AR_OPTION_STR(x) AR_OPTION_STR_(x)
#define AR_OPTION_STR_(x) #x

/* A titled group of rows. base is the offset of the struct the rows' dest
 * offsets are relative to, so a table of shared rows (the TLS options, a
 * market client's --market and --token) serves every command that embeds
 * their struct. */
typedef struct {
    const char *title;     /* NULL: the command's own "options" */
    const ar_option *opts; /* NULL ends the list of sections */
    size_t base;
} ar_option_section;

typedef struct ar_cmd_spec {
    const char *name;        /* "train" */
    const char *summary;     /* one line for `arceus --help` */
    const char *usage;       /* what follows "usage: arceus NAME "; a '\n' starts another form */
    const char *description; /* paragraphs, separated by "\n\n"; wrapped when printed */
    const ar_option_section *sections;
    /* An argument that is not an option: 0 when the command takes it (stored
     * in opts), -1 to have it refused as unexpected. NULL refuses them all. */
    int (*positional)(void *opts, const char *arg);
    size_t given_mask;       /* offset of an unsigned in opts for the rows' given_bit */
    size_t opts_size;        /* the command's options struct */
    /* Before the rows' defaults and argv, on the zeroed struct: defaults the
     * rows cannot hold (train's depend on the model). 0, or the exit code.
     * May be NULL. */
    int (*init)(void *opts, int argc, char **argv);
    /* The command itself, on its parsed options: the exit code. */
    int (*run)(void *opts);
} ar_cmd_spec;

/* Apply the rows' defaults to opts, then read argv[1..argc) into it ("--name
 * VALUE" or "--name=VALUE"), then the environment for options not given,
 * and check the required ones. 0, or one error line on stderr and -1 (a
 * usage error: the command exits 2). */
int ar_opts_parse(const ar_cmd_spec *spec, int argc, char **argv, void *opts);

/* Run a subcommand: a zeroed options struct, init, ar_opts_parse, run. The
 * exit code: 2 for a usage error. argv[0] is the subcommand's name. */
int ar_opts_main(const ar_cmd_spec *spec, int argc, char **argv);

/* `arceus NAME --help`: usage, description, and every option with its
 * metavar, help, range or choices and default. */
void ar_opts_help(const ar_cmd_spec *spec, FILE *out);

/* `arceus NAME --man`: the same as the help, as a manual page in roff
 * (arceus-NAME(1)): synopsis, description, every option with its facts, the
 * environment variables the rows read. `make man` writes them. */
void ar_opts_man(const ar_cmd_spec *spec, FILE *out);
/* `arceus --man`: arceus(1), the list of commands. */
void ar_opts_man_index(const ar_cmd_spec *const *cmds, size_t n, FILE *out);

/* The last value given to --name in argv (either form), before parsing:
 * for a command whose defaults depend on one option. NULL when absent. */
const char *ar_opts_peek(int argc, char **argv, const char *name);

#endif
