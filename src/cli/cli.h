/* The arceus command: one binary, one table of subcommands (main.c), each
 * described with its options by an ar_cmd_spec (options.h). */
#ifndef AR_CLI_H
#define AR_CLI_H

#include "cli/options.h"

#include <signal.h>

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
/* `text` (from the market: names, addresses, specs) made safe to print on a
 * terminal: control characters, C1 controls, the bidirectional overrides and
 * isolates (which reorder what the eye sees) and bytes that are not UTF-8
 * become visible escapes (\x1b, \u{202e}); everything else is kept. The
 * result is cut to fit buf; returns buf. */
const char *ar_cli_safe_text(const char *text, char *buf, size_t size);

/* TLS options: --tls-cert FILE --tls-key FILE for a command that serves,
 * --tls-ca FILE for one that dials. The rows are relative to an ar_cli_tls:
 * a command embeds one in its options struct and gives its offset as the
 * section's base. */
typedef struct {
    const char *cert, *key, *ca;
} ar_cli_tls;
extern const ar_option ar_cli_tls_server_options[];
extern const ar_option ar_cli_tls_client_options[];
/* Check the files and configure the process before it serves or dials;
 * prints the error and returns -1 when they are unusable. */
int ar_cli_tls_setup(const char *cmd, const ar_cli_tls *t);

/* A market client's --market HOST:PORT and --token T (or $ARCEUS_TOKEN),
 * both required; the rows are relative to an ar_cli_market. */
typedef struct {
    const char *market, *token;
} ar_cli_market;
extern const ar_option ar_cli_market_options[];

/* The subcommands, in the order `arceus --help` lists them (main.c). */
extern const ar_cmd_spec ar_train_cmd, ar_sample_cmd, ar_eval_cmd, ar_worker_cmd, ar_provide_cmd,
    ar_market_cmd, ar_relay_cmd, ar_providers_cmd, ar_ledger_cmd, ar_jobs_cmd, ar_job_cmd;

#endif
