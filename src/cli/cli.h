/* The arceus command: one binary, subcommands from a table (main.c). */
#ifndef AR_CLI_H
#define AR_CLI_H

#include <signal.h>
#include <stdint.h>

typedef struct {
    const char *name;
    const char *summary;
    int (*run)(int argc, char **argv); /* argv[0] is the subcommand name */
    void (*help)(void);
} ar_command;

/* Option parsing shared by the subcommands: "--name VALUE" or "--name=VALUE".
 * Each returns 0 or prints one clear error line and returns -1. */
typedef struct {
    int argc;
    char **argv;
    int i;              /* next argument */
    const char *cmd;    /* for messages: "train" */
    const char *name;   /* the option being parsed */
    const char *inline_value;
} ar_args;

void ar_args_init(ar_args *a, int argc, char **argv);
/* Next option name (without "--"), NULL at the end; a non-option argument
 * is returned as is and flagged with *positional = 1. */
const char *ar_args_next(ar_args *a, int *positional);
int ar_args_string(ar_args *a, const char **out);
int ar_args_long(ar_args *a, long lo, long hi, long *out);
int ar_args_int(ar_args *a, int lo, int hi, int *out);
int ar_args_float(ar_args *a, double lo, double hi, float *out);
int ar_args_u64(ar_args *a, uint64_t *out);
int ar_args_unknown(ar_args *a);
/* Credits "N" or "N.DDDDDD" (at most 6 decimals) -> micro-credits, exactly
 * (no floating point); 0 when the value is in [0, max_micro], -1 otherwise
 * (the caller words the error for its option). */
int ar_parse_credits(const char *s, int64_t max_micro, int64_t *out);
/* --max-mem SIZE: "N" bytes, or N followed by K, M, G or T (powers of 1024),
 * optionally then "B" or "iB" (512M, 4G, 4GiB), 1 byte .. 4 PiB. cmd names the
 * command in the error. */
int ar_parse_size(const char *cmd, const char *s, int64_t *out);

/* Long-running commands (market, worker, provide) stop on SIGINT/SIGTERM.
 * ar_cli_block_stop_signals must run before any other thread exists, so
 * that only ar_cli_wait_stop_signal (in this thread) receives them; the wait
 * prints "arceus CMD: SIGINT, shutting down". */
void ar_cli_block_stop_signals(void);
/* The set of those signals, for a timed wait of one's own. */
void ar_cli_stop_signals(sigset_t *set);
int ar_cli_wait_stop_signal(const char *cmd);
/* Print "arceus CMD: error: MESSAGE" to stderr. */
void ar_cli_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* TLS options: --tls-cert FILE --tls-key FILE (server: whether the command
 * serves) and --tls-ca FILE (every command that dials). */
typedef struct {
    const char *cert, *key, *ca;
} ar_cli_tls;
/* 1 when name is one of them (its value parsed into t, *rc 0 or -1), else 0. */
int ar_cli_tls_option(ar_args *a, const char *name, int server, ar_cli_tls *t, int *rc);
/* Check the files and configure the process before it serves or dials;
 * prints the error and returns -1 when they are unusable. */
int ar_cli_tls_setup(const char *cmd, const ar_cli_tls *t);
#define AR_CLI_TLS_SERVER_HELP                                                                  \
    "  --tls-cert FILE      serve over TLS with this PEM certificate (scripts/make-tls-cert.sh)\n" \
    "  --tls-key FILE       and this PEM private key (both or neither)\n"
#define AR_CLI_TLS_CLIENT_HELP                                                                  \
    "  --tls-ca FILE        dial over TLS, trusting servers signed by this PEM CA\n"              \
    "                       (without it, a TLS server refuses the connection)\n"

int ar_cmd_train(int argc, char **argv);
void ar_help_train(void);
int ar_cmd_sample(int argc, char **argv);
void ar_help_sample(void);
int ar_cmd_eval(int argc, char **argv);
void ar_help_eval(void);
int ar_cmd_worker(int argc, char **argv);
void ar_help_worker(void);
int ar_cmd_provide(int argc, char **argv);
void ar_help_provide(void);
int ar_cmd_market(int argc, char **argv);
void ar_help_market(void);
int ar_cmd_providers(int argc, char **argv);
void ar_help_providers(void);
int ar_cmd_ledger(int argc, char **argv);
void ar_help_ledger(void);
int ar_cmd_jobs(int argc, char **argv);
void ar_help_jobs(void);
int ar_cmd_job(int argc, char **argv);
void ar_help_job(void);

#endif
