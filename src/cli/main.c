/* arceus: the command-line entry point. Subcommands come from a table. */
#include "arceus.h"
#include "cli/cli.h"

#include <stdio.h>
#include <string.h>

static const ar_command commands[] = {
    {"train", "train a model: on this machine, over workers, or through a market", ar_cmd_train, ar_help_train},
    {"sample", "generate text from a language-model checkpoint", ar_cmd_sample, ar_help_sample},
    {"eval", "evaluate a checkpoint on a data set", ar_cmd_eval, ar_help_eval},
    {"worker", "serve a pipeline stage to drivers over gRPC", ar_cmd_worker, ar_help_worker},
    {"provide", "rent this machine out: a worker registered with a market", ar_cmd_provide, ar_help_provide},
    {"market", "run the market server; add-account creates an account", ar_cmd_market, ar_help_market},
    {"providers", "list the providers online at a market", ar_cmd_providers, ar_help_providers},
    {"ledger", "print your credit ledger and balance at a market", ar_cmd_ledger, ar_help_ledger},
    {"jobs", "list your training jobs at a market", ar_cmd_jobs, ar_help_jobs},
    {"job", "show one job: status, step, credits spent, loss curve", ar_cmd_job, ar_help_job},
};

static void usage(FILE *out)
{
    fprintf(out, "arceus %s: decentralized neural-network training\n\n"
                 "usage: arceus COMMAND [OPTIONS]\n\ncommands:\n", AR_VERSION_STRING);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-9s %s\n", commands[i].name, commands[i].summary);
    fprintf(out, "\n`arceus COMMAND --help` describes a command's options.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("arceus %s\n", AR_VERSION_STRING);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(argv[1], commands[i].name) != 0)
            continue;
        for (int j = 2; j < argc; j++)
            if (strcmp(argv[j], "--help") == 0 || strcmp(argv[j], "-h") == 0) {
                commands[i].help();
                return 0;
            }
        return commands[i].run(argc - 1, argv + 1);
    }
    fprintf(stderr, "arceus: error: unknown command \"%s\"\n\n", argv[1]);
    usage(stderr);
    return 2;
}
