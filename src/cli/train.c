/* arceus train */
#include "cli/cli.h"
#include "core/core.h"
#include "nn/spec.h"
#include "market/money.h"
#include "run/driver.h"
#include "train/schedule.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* "N" or "N.DDDDDD" credits (at most 6 decimals, at most 1e12) -> micro-credits
 * (as arceus market add-account --credits reads them) */
static int parse_max_credits(const char *s, int64_t *out)
{
    if (ar_parse_credits(s, AR_CREDITS(1000000000000LL), out) == 0 && *out > 0)
        return 0;
    ar_cli_error("train", "--max-credits expects credits like 100 or 0.25 (above 0, up to 1e12, at "
                 "most 6 decimals), got \"%s\"", s);
    return -1;
}

void ar_help_train(void)
{
    printf("usage: arceus train --model SPEC [--data PATH] [options]\n"
           "\n"
           "Train a model: on this machine (one stage, or --workers local:S), over worker\n"
           "processes (--workers HOST:PORT,...), or on providers leased from a market\n"
           "(--market). The default data for an MLP is Fashion-MNIST\n"
           "from /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist);\n"
           "a GPT trains on a text file given with --data.\n"
           "\n"
           "options:\n"
           "  --model SPEC         model spec (JSON), e.g. configs/mlp-fashion.json\n"
           "  --data PATH          text file (GPT) or folder of IDX files (MLP)\n"
           "  --steps N            optimizer steps, at least 1 (GPT 3000, MLP 469 = one epoch)\n"
           "  --batch N            batch size (GPT 16, MLP 128)\n"
           "  --micro-batches M    split each batch into M micro-batches (1)\n"
           "  --workers local:S    run an in-process pipeline of S stages (local:1)\n"
           "  --workers H:P,H:P,.. one stage per worker process (arceus worker), in order\n"
           "  --schedule NAME      pipeline schedule: gpipe or 1f1b (1f1b)\n"
           "  --worker-token T     the secret of workers started with arceus worker --token T\n"
           "                       (also $ARCEUS_WORKER_TOKEN)\n"
           "  --plan auto|SPEC     how layers are split over the stages: auto (the planner,\n"
           "                       from each worker's measured speed and memory; it may put a\n"
           "                       GPT's blocks on a tensor-parallel group) or e.g.\n"
           "                       \"0-2,3-5,6-7\" (layers of stage 0, 1, 2 on the workers in order),\n"
           "                       \"0-3@0+1,4-7@2\" (layers 0-3 shared by workers 0 and 1; add\n"
           "                       ~speed after a group to split it by their speed)\n"
           "  --optimizer NAME     adamw or sgd (adamw; sgd uses momentum --beta1)\n"
           "  --lr X               peak learning rate (GPT 1e-3, MLP 3e-3)\n"
           "  --min-lr X           final learning rate of the cosine schedule (1e-4)\n"
           "  --warmup N           linear warm-up steps (GPT 100, MLP 20)\n"
           "  --weight-decay X     decoupled weight decay on matrices (GPT 0.1, MLP 0)\n"
           "  --beta1 X, --beta2 X AdamW betas (0.9, 0.99)\n"
           "  --clip X             clip the global gradient norm to X, 0 = off (1.0)\n"
           "  --seed N             seed for initialisation, data order, dropout (1337)\n"
           "  --threads N          threads to use, 0 = all cores (0)\n"
           "  --eval-every N       evaluate every N steps, 0 = only at the end (GPT 250, MLP 100)\n"
           "  --eval-batches N     language models: val batches per evaluation (40)\n"
           "  --out DIR            write checkpoints and loss.svg into DIR\n"
           "  --checkpoint-every K checkpoint every K steps as well as at the end; 0: only\n"
           "                       at the end (default: whenever a minute of training has\n"
           "                       passed, so a lost stage costs at most about a minute)\n"
           "  --stage-timeout S    a remote stage silent for S seconds mid-step is lost (10,\n"
           "                       or 4x the slowest step if more)\n"
           "  --spares N           the last N of --workers H:P,... only replace lost stages\n"
           "  --resume DIR         continue a run from its checkpoint (and keep writing there\n"
           "                       unless --out says otherwise)\n"
           "  --stop-after N       stop after step N with a checkpoint, as if interrupted\n"
           "                       (the schedule still runs to --steps; resume to finish)\n"
           "  --market HOST:PORT   lease the workers from this market (arceus market)\n"
           "  --token T            the renter's account token (or $ARCEUS_TOKEN)\n"
           "  --devices N          how many providers to lease (with --market; 1)\n"
           "  --max-credits C      stop (with a checkpoint in --out) before spending more\n"
           "                       than C credits; a lease whose estimate exceeds it is\n"
           "                       refused up front\n"
           AR_CLI_TLS_CLIENT_HELP
           "                       (for the workers and the market)\n"
           "  --log FILE           write every step and evaluation as JSON lines\n"
           "  --quiet              no progress bar or summary\n");
}

int ar_cmd_train(int argc, char **argv)
{
    const char *model = NULL;
    /* first pass: the model type decides the defaults */
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--model") == 0)
            model = argv[i + 1];
        else if (strncmp(argv[i], "--model=", 8) == 0)
            model = argv[i] + 8;
    int type = AR_MODEL_MLP;
    if (model) {
        ar_model_spec spec;
        if (ar_spec_load(model, &spec) != AR_OK) {
            ar_cli_error("train", "%s", ar_last_error());
            return 1;
        }
        type = spec.type;
    }
    ar_train_config c;
    ar_train_config_defaults(&c, type);
    int threads = 0;
    ar_cli_tls tls = {0};
    ar_args a;
    ar_args_init(&a, argc, argv);
    const char *name;
    int positional;
    while ((name = ar_args_next(&a, &positional))) {
        int rc = 0;
        if (positional) {
            ar_cli_error("train", "unexpected argument \"%s\" (see arceus train --help)", name);
            return 2;
        }
        if (!strcmp(name, "model"))
            rc = ar_args_string(&a, &c.model_path);
        else if (!strcmp(name, "data"))
            rc = ar_args_string(&a, &c.data_path);
        else if (!strcmp(name, "out"))
            rc = ar_args_string(&a, &c.out_dir);
        else if (!strcmp(name, "resume"))
            rc = ar_args_string(&a, &c.resume_dir);
        else if (!strcmp(name, "log"))
            rc = ar_args_string(&a, &c.log_path);
        else if (!strcmp(name, "steps"))
            rc = ar_args_long(&a, 0, 100000000, &c.steps), c.set_mask |= AR_SET_STEPS;
        else if (!strcmp(name, "batch"))
            rc = ar_args_int(&a, 1, 1 << 20, &c.batch), c.set_mask |= AR_SET_BATCH;
        else if (!strcmp(name, "micro-batches"))
            rc = ar_args_int(&a, 1, 4096, &c.micro_batches), c.set_mask |= AR_SET_MB;
        else if (!strcmp(name, "lr"))
            rc = ar_args_float(&a, 0, 10, &c.lr), c.set_mask |= AR_SET_LR;
        else if (!strcmp(name, "min-lr"))
            rc = ar_args_float(&a, 0, 10, &c.min_lr), c.set_mask |= AR_SET_MIN_LR;
        else if (!strcmp(name, "warmup"))
            rc = ar_args_long(&a, 0, 100000000, &c.warmup), c.set_mask |= AR_SET_WARMUP;
        else if (!strcmp(name, "weight-decay"))
            rc = ar_args_float(&a, 0, 10, &c.weight_decay), c.set_mask |= AR_SET_WD;
        else if (!strcmp(name, "beta1"))
            rc = ar_args_float(&a, 0, 0.999999, &c.beta1);
        else if (!strcmp(name, "beta2"))
            rc = ar_args_float(&a, 0, 0.999999, &c.beta2);
        else if (!strcmp(name, "clip"))
            rc = ar_args_float(&a, 0, 1e6, &c.clip), c.set_mask |= AR_SET_CLIP;
        else if (!strcmp(name, "seed"))
            rc = ar_args_u64(&a, &c.seed), c.set_mask |= AR_SET_SEED;
        else if (!strcmp(name, "threads"))
            rc = ar_args_int(&a, 0, 1024, &threads);
        else if (!strcmp(name, "eval-every"))
            rc = ar_args_long(&a, 0, 100000000, &c.eval_every);
        else if (!strcmp(name, "eval-batches"))
            rc = ar_args_int(&a, 1, 100000, &c.eval_batches);
        else if (!strcmp(name, "ckpt-every") || !strcmp(name, "checkpoint-every"))
            rc = ar_args_long(&a, 0, 100000000, &c.ckpt_every);
        else if (!strcmp(name, "stage-timeout"))
            rc = ar_args_float(&a, 0.1, 86400, &c.stage_timeout);
        else if (!strcmp(name, "spares"))
            rc = ar_args_int(&a, 1, 63, &c.spares);
        else if (!strcmp(name, "plan"))
            rc = ar_args_string(&a, &c.plan);
        else if (!strcmp(name, "worker-token"))
            rc = ar_args_string(&a, &c.worker_token);
        else if (!strcmp(name, "stop-after"))
            rc = ar_args_long(&a, 1, 100000000, &c.stop_after);
        else if (!strcmp(name, "quiet"))
            c.quiet = 1;
        else if (!strcmp(name, "market"))
            rc = ar_args_string(&a, &c.market);
        else if (!strcmp(name, "token"))
            rc = ar_args_string(&a, &c.token);
        else if (!strcmp(name, "devices"))
            rc = ar_args_int(&a, 1, 64, &c.devices);
        else if (!strcmp(name, "max-credits")) {
            const char *v;
            if ((rc = ar_args_string(&a, &v)) == 0)
                rc = parse_max_credits(v, &c.max_credits);
        }
        else if (!strcmp(name, "optimizer")) {
            const char *v;
            if ((rc = ar_args_string(&a, &v)) == 0) {
                if (!strcmp(v, "adamw"))
                    c.optimizer = AR_OPT_ADAMW;
                else if (!strcmp(v, "sgd"))
                    c.optimizer = AR_OPT_SGD;
                else {
                    ar_cli_error("train", "--optimizer must be adamw or sgd, got \"%s\"", v);
                    rc = -1;
                }
                c.set_mask |= AR_SET_OPT;
            }
        } else if (!strcmp(name, "schedule")) {
            const char *v;
            if ((rc = ar_args_string(&a, &v)) == 0 && ar_schedule_parse(v, &c.schedule) != AR_OK) {
                ar_cli_error("train", "--schedule: %s", ar_last_error());
                rc = -1;
            }
        } else if (!strcmp(name, "workers")) {
            const char *v;
            if ((rc = ar_args_string(&a, &v)) == 0) {
                char *end = NULL;
                long n = strncmp(v, "local:", 6) == 0 ? strtol(v + 6, &end, 10) : -1;
                if (strncmp(v, "local:", 6) != 0 && strchr(v, ':')) {
                    c.remote_workers = v; /* HOST:PORT,... (checked by the driver) */
                    c.stages = 1;
                } else if (n < 1 || n > 64 || *end != '\0') {
                    ar_cli_error("train", "--workers: expected local:N with N in 1..64 or "
                                          "HOST:PORT,HOST:PORT,..., got \"%s\"", v);
                    rc = -1;
                } else {
                    c.stages = (int)n;
                    c.remote_workers = NULL;
                }
            }
        } else if (!ar_cli_tls_option(&a, name, 0, &tls, &rc))
            rc = ar_args_unknown(&a);
        if (rc != 0)
            return 2;
    }
    if (ar_cli_tls_setup("train", &tls) != 0)
        return 2;
    if (c.model_path && c.resume_dir) {
        ar_cli_error("train", "--resume takes the model from %s/spec.json; drop --model", c.resume_dir);
        return 2;
    }
    if (!c.worker_token)
        c.worker_token = getenv("ARCEUS_WORKER_TOKEN");
    if (!c.model_path && !c.resume_dir) {
        ar_cli_error("train", "--model SPEC is required (for example configs/mlp-fashion.json)");
        return 2;
    }
    if (c.market) {
        if (!strchr(c.market, ':')) {
            ar_cli_error("train", "--market expects HOST:PORT, got \"%s\"", c.market);
            return 2;
        }
        if (c.remote_workers || c.stages > 1) {
            ar_cli_error("train", "--market leases the workers: drop --workers");
            return 2;
        }
        if (!c.token)
            c.token = getenv("ARCEUS_TOKEN");
        if (!c.token || !*c.token) {
            ar_cli_error("train", "--market needs --token T (or $ARCEUS_TOKEN; arceus market add-account prints one)");
            return 2;
        }
        if (c.devices == 0)
            c.devices = 1;
    } else if (c.spares && !c.remote_workers) {
        ar_cli_error("train", "--spares goes with --workers HOST:PORT,...");
        return 2;
    } else if (c.token || c.devices || c.max_credits) {
        ar_cli_error("train", "--token, --devices and --max-credits go with --market HOST:PORT");
        return 2;
    }
    ar_set_threads(threads);
    int rc = ar_train_run(&c);
    if (rc != AR_OK) {
        ar_cli_error("train", "%s", ar_last_error());
        return 1;
    }
    return 0;
}
