/* arceus: the command-line entry point. Each subcommand is one ar_cmd_spec
 * (its summary, options, help and entry point); this is the list of them. */
#include "arceus.h"
#include "cli/cli.h"
#include "net/net.h"

#include <stdio.h>
#include <string.h>

static const ar_cmd_spec *const commands[] = {
    &ar_train_cmd,  &ar_sample_cmd,    &ar_eval_cmd,   &ar_worker_cmd, &ar_provide_cmd,
    &ar_market_cmd, &ar_relay_cmd,     &ar_providers_cmd, &ar_ledger_cmd, &ar_jobs_cmd,
    &ar_job_cmd,
};

static void usage(FILE *out)
{
    fprintf(out, "arceus %s: decentralized neural-network training\n\n"
                 "usage: arceus COMMAND [OPTIONS]\n\ncommands:\n", AR_VERSION_STRING);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-9s %s\n", commands[i]->name, commands[i]->summary);
    fprintf(out, "\n`arceus COMMAND --help` describes a command's options.\n");
}

int main(int argc, char **argv)
{
    if (ar_net_process_init() != AR_OK) {
        fprintf(stderr, "arceus: error: %s\n", ar_last_error());
        return 1;
    }
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    /* for `make man`: not in the usage, which is for people */
    if (strcmp(argv[1], "--man") == 0) {
        ar_opts_man_index(commands, sizeof commands / sizeof commands[0], stdout);
        return 0;
    }
    if (strcmp(argv[1], "--commands") == 0) {
        for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
            printf("%s\n", commands[i]->name);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("arceus %s\n", AR_VERSION_STRING);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(argv[1], commands[i]->name) != 0)
            continue;
        for (int j = 2; j < argc; j++)
            if (strcmp(argv[j], "--help") == 0 || strcmp(argv[j], "-h") == 0) {
                ar_opts_help(commands[i], stdout);
                return 0;
            } else if (strcmp(argv[j], "--man") == 0) {
                ar_opts_man(commands[i], stdout);
                return 0;
            }
        return ar_opts_main(commands[i], argc - 1, argv + 1);
    }
    fprintf(stderr, "arceus: error: unknown command \"%s\"\n\n", argv[1]);
    usage(stderr);
    return 2;
}
