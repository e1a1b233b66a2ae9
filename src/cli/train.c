/* arceus train */
#include "cli/cli.h"
#include "core/core.h"
#include "nn/spec.h"
#include "market/money.h"
#include "run/driver.h"
#include "train/frame.h"
#include "train/schedule.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What the command line sets: the driver's config, and what the process
 * itself needs before the run. */
typedef struct {
    ar_train_config c;
    int threads;
    ar_cli_tls tls;
} train_opts;

#define AT(member) AR_OPTION_AT(train_opts, member)

/* --workers local:N (an in-process pipeline) or HOST:PORT,... (one stage
 * per worker process; the driver checks the addresses) */
static int parse_workers(const ar_option_ctx *ctx, const char *v, void *opts)
{
    ar_train_config *c = &((train_opts *)opts)->c;
    if (strncmp(v, "local:", 6) != 0 && strchr(v, ':')) {
        c->remote_workers = v;
        c->stages = 1;
        return 0;
    }
    char *end = NULL;
    long n = strncmp(v, "local:", 6) == 0 ? strtol(v + 6, &end, 10) : -1;
    if (n < 1 || n > 64 || *end != '\0') {
        ar_cli_error(ctx->cmd,
                     "--%s: expected local:N with N in 1..64 or HOST:PORT,HOST:PORT,..., got \"%s\"",
                     ctx->name, v);
        return -1;
    }
    c->stages = (int)n;
    c->remote_workers = NULL;
    return 0;
}

static const ar_option_choice optimizers[] = {{"adamw", AR_OPT_ADAMW}, {"sgd", AR_OPT_SGD}, {0}};
static const ar_option_choice schedules[] = {{"gpipe", AR_SCHED_GPIPE}, {"1f1b", AR_SCHED_1F1B}, {0}};
static const ar_option_choice verifiers[] = {{"self", AR_VERIFIER_SELF}, {0}};
static const ar_option_choice compressions[] = {{"none", AR_COMPRESS_NONE}, {"bf16", AR_COMPRESS_BF16},
                                                {"int8", AR_COMPRESS_INT8}, {"auto", AR_COMPRESS_AUTO}, {0}};

/* The defaults are ar_train_config_defaults' (they depend on the model
 * type), so the rows only say them (def_text). given_bit marks the recipe
 * fields the user chose: a resumed run keeps its stored recipe for the rest. */
static const ar_option run_options[] = {
    {.name = "model", .kind = AR_OPTION_STRING, AT(c.model_path), .metavar = "SPEC",
     .help = "model spec (JSON), e.g. configs/mlp-fashion.json; required unless --resume"},
    {.name = "data", .kind = AR_OPTION_STRING, AT(c.data_path), .metavar = "PATH",
     .help = "text file (GPT) or folder of IDX files (MLP)",
     .def_text = "Fashion-MNIST for an MLP"},
    {.name = "out", .kind = AR_OPTION_STRING, AT(c.out_dir), .metavar = "DIR",
     .help = "write checkpoints and loss.svg into DIR"},
    {.name = "resume", .kind = AR_OPTION_STRING, AT(c.resume_dir), .metavar = "DIR",
     .help = "continue a run from its checkpoint (and keep writing there unless --out says otherwise)"},
    {.name = "log", .kind = AR_OPTION_STRING, AT(c.log_path), .metavar = "FILE",
     .help = "write every step and evaluation as JSON lines"},
    {.name = "quiet", .kind = AR_OPTION_FLAG, AT(c.quiet), .help = "no progress bar or summary"},
    {.name = "profile", .kind = AR_OPTION_FLAG, AT(c.profile),
     .help = "at the end, print the milliseconds each operator took per step, forward, backward and "
             "update (the stages in this process; the first step, a warm-up, is not counted)"},
    {.name = "threads", .kind = AR_OPTION_INT, AT(threads), .lo = 0, .hi = 1024, .metavar = "N",
     .def = "0", .help = "threads to use, 0 = all cores"},
    {.name = "seed", .kind = AR_OPTION_U64, AT(c.seed), .metavar = "N", .def_text = "1337",
     .given_bit = AR_SET_SEED, .help = "seed for initialisation, data order, dropout"},
    {0},
};

static const ar_option recipe_options[] = {
    {.name = "steps", .kind = AR_OPTION_LONG, AT(c.steps), .lo = 0, .hi = 100000000, .metavar = "N",
     .def_text = "GPT 3000, MLP 469 = one epoch", .given_bit = AR_SET_STEPS, .help = "optimizer steps"},
    {.name = "batch", .kind = AR_OPTION_INT, AT(c.batch), .lo = 1, .hi = 1 << 20, .metavar = "N",
     .def_text = "GPT 16, MLP 128", .given_bit = AR_SET_BATCH, .help = "batch size"},
    {.name = "optimizer", .kind = AR_OPTION_ENUM, AT(c.optimizer), .choices = optimizers, .metavar = "NAME",
     .def_text = "adamw", .given_bit = AR_SET_OPT, .help = "the optimizer; sgd uses momentum --beta1"},
    {.name = "lr", .kind = AR_OPTION_FLOAT, AT(c.lr), .flo = 0, .fhi = 10, .metavar = "X",
     .def_text = "GPT 1e-3, MLP 3e-3", .given_bit = AR_SET_LR, .help = "peak learning rate"},
    {.name = "min-lr", .kind = AR_OPTION_FLOAT, AT(c.min_lr), .flo = 0, .fhi = 10, .metavar = "X",
     .def_text = "1e-4", .given_bit = AR_SET_MIN_LR, .help = "final learning rate of the cosine schedule"},
    {.name = "warmup", .kind = AR_OPTION_LONG, AT(c.warmup), .lo = 0, .hi = 100000000, .metavar = "N",
     .def_text = "GPT 100, MLP 20", .given_bit = AR_SET_WARMUP, .help = "linear warm-up steps"},
    {.name = "weight-decay", .kind = AR_OPTION_FLOAT, AT(c.weight_decay), .flo = 0, .fhi = 10,
     .metavar = "X", .def_text = "GPT 0.1, MLP 0", .given_bit = AR_SET_WD,
     .help = "decoupled weight decay on matrices"},
    {.name = "beta1", .kind = AR_OPTION_FLOAT, AT(c.beta1), .flo = 0, .fhi = 0.999999, .metavar = "X",
     .def_text = "0.9", .help = "AdamW's first beta (sgd's momentum)"},
    {.name = "beta2", .kind = AR_OPTION_FLOAT, AT(c.beta2), .flo = 0, .fhi = 0.999999, .metavar = "X",
     .def_text = "0.99", .help = "AdamW's second beta"},
    {.name = "clip", .kind = AR_OPTION_FLOAT, AT(c.clip), .flo = 0, .fhi = 1e6, .metavar = "X",
     .def_text = "1.0", .given_bit = AR_SET_CLIP, .help = "clip the global gradient norm to X, 0 = off"},
    {.name = "eval-every", .kind = AR_OPTION_LONG, AT(c.eval_every), .lo = 0, .hi = 100000000,
     .metavar = "N", .def_text = "GPT 250, MLP 100", .help = "evaluate every N steps, 0 = only at the end"},
    {.name = "eval-batches", .kind = AR_OPTION_INT, AT(c.eval_batches), .lo = 1, .hi = 100000,
     .metavar = "N", .def_text = "40", .help = "language models: validation batches per evaluation"},
    {0},
};

static const ar_option checkpoint_options[] = {
    {.name = "checkpoint-every", .alias = "ckpt-every", .kind = AR_OPTION_LONG, AT(c.ckpt_every), .lo = 0,
     .hi = 100000000, .metavar = "K",
     .def_text = "whenever a minute of training has passed, so a lost stage costs at most about a minute",
     .help = "checkpoint every K steps as well as at the end; 0: only at the end"},
    {.name = "stop-after", .kind = AR_OPTION_LONG, AT(c.stop_after), .lo = 1, .hi = 100000000,
     .metavar = "N",
     .help = "stop after step N with a checkpoint, as if interrupted (the schedule still runs to --steps; "
             "resume to finish)"},
    {0},
};

static const ar_option pipeline_options[] = {
    {.name = "workers", .kind = AR_OPTION_CUSTOM, .parse = parse_workers, .metavar = "local:S|HOST:PORT,...",
     .def_text = "local:1",
     .help = "local:S runs an in-process pipeline of S stages (1..64); HOST:PORT,HOST:PORT,... puts one "
             "stage on each worker process (arceus worker), in order"},
    {.name = "micro-batches", .kind = AR_OPTION_INT, AT(c.micro_batches), .lo = 1, .hi = 4096,
     .metavar = "M", .def_text = "1", .given_bit = AR_SET_MB,
     .help = "split each batch into M micro-batches"},
    {.name = "schedule", .kind = AR_OPTION_ENUM, AT(c.schedule), .choices = schedules, .metavar = "NAME",
     .def_text = "1f1b", .help = "pipeline schedule"},
    {.name = "compress", .kind = AR_OPTION_ENUM, AT(c.compress), .choices = compressions, .metavar = "NAME",
     .def_text = "auto",
     .help = "how activations and their gradients cross the links between stages (and inside a "
             "tensor-parallel group): none (float32, results bitwise those of one device), bf16, int8 (a "
             "scale per 256 values), or auto: per link, the least lossy that keeps the link's measured "
             "bandwidth off the critical path (none on fast links and in-process); the stages compute in "
             "float32 either way"},
    {.name = "plan", .kind = AR_OPTION_STRING, AT(c.plan), .metavar = "auto|SPEC", .def_text = "auto",
     .help = "how layers are split over the stages: auto (the planner, from each worker's measured speed "
             "and memory; it may put a GPT's blocks on a tensor-parallel group) or e.g. \"0-2,3-5,6-7\" "
             "(layers of stage 0, 1, 2 on the workers in order), \"0-3@0+1,4-7@2\" (layers 0-3 shared by "
             "workers 0 and 1; add ~speed after a group to split it by their speed)"},
    {.name = "worker-token", .kind = AR_OPTION_STRING, AT(c.worker_token), .metavar = "T",
     .env = "ARCEUS_WORKER_TOKEN", .help = "the secret of workers started with arceus worker --token T"},
    {.name = "stage-timeout", .kind = AR_OPTION_FLOAT, AT(c.stage_timeout), .flo = 0.1, .fhi = 86400,
     .metavar = "S", .def_text = "10, or 4x the slowest step if more",
     .help = "a remote stage silent for S seconds mid-step is lost"},
    {.name = "spares", .kind = AR_OPTION_INT, AT(c.spares), .lo = 1, .hi = 63, .metavar = "N",
     .help = "the last N of --workers HOST:PORT,... only replace lost stages"},
    {.name = "audit-rate", .kind = AR_OPTION_FLOAT, AT(c.audit_rate), .flo = 0, .fhi = 1, .metavar = "P",
     .def_text = "0.05 on a --market lease, 0 on --workers", .env = "ARCEUS_AUDIT_RATE",
     .help = "remote stages: after each step, each stage's previous step is replayed and its committed "
             "digests compared with chance P (a stage that fails is replaced as a lost one is); 0 = no "
             "audits (and no digests). By default a leased run audits (strangers' machines, paid per "
             "step) and a run on the --workers you name does not (your own machines)"},
    {.name = "verifier", .kind = AR_OPTION_ENUM, AT(c.verifier), .choices = verifiers, .metavar = "WHO",
     .def_text = "self", .help = "who replays an audited step: self (this process; another provider "
             "cannot verify yet)"},
    {.name = "audit-seed", .kind = AR_OPTION_U64, AT(c.audit_seed), .metavar = "N",
     .help = "seed the audits' draws (tests); by default they come from the OS, so providers cannot "
             "predict them"},
    {0},
};

static const ar_option market_options[] = {
    {.name = "market", .kind = AR_OPTION_HOSTPORT, AT(c.market), .metavar = "HOST:PORT",
     .help = "lease the workers from this market (arceus market)"},
    {.name = "token", .kind = AR_OPTION_STRING, AT(c.token), .metavar = "T", .def_text = "$ARCEUS_TOKEN",
     .help = "the renter's account token"},
    {.name = "devices", .kind = AR_OPTION_INT, AT(c.devices), .lo = 1, .hi = 64, .metavar = "N",
     .def_text = "1", .help = "how many providers to lease"},
    {.name = "max-credits", .kind = AR_OPTION_CREDITS, AT(c.max_credits), .lo = 1,
     .hi = AR_CREDITS(1000000000000LL), .metavar = "C", .def_text = "the account's balance",
     .help = "stop (with a checkpoint in --out) before spending more than C credits; a lease whose "
             "estimate exceeds it is refused up front"},
    {0},
};

/* The model type decides the defaults, before the options override them. */
static int train_init(void *opts, int argc, char **argv)
{
    const char *model = ar_opts_peek(argc, argv, "model");
    int type = AR_MODEL_MLP;
    if (model) {
        ar_model_spec spec;
        if (ar_spec_load(model, &spec) != AR_OK) {
            ar_cli_error("train", "%s", ar_last_error());
            return 1;
        }
        type = spec.type;
    }
    ar_train_config_defaults(&((train_opts *)opts)->c, type);
    return 0;
}

static int run_train(void *opts);

const ar_cmd_spec ar_train_cmd = {
    .name = "train",
    .summary = "train a model: on this machine, over workers, or through a market",
    .usage = "--model SPEC [--data PATH] [options]\n--resume DIR [--data PATH] [options]",
    .description =
        "Train a model: on this machine (one stage, or --workers local:S), over worker processes "
        "(--workers HOST:PORT,...), or on providers leased from a market (--market). The default data "
        "for an MLP is Fashion-MNIST from /usr/share/datasets/fashion-mnist (Debian's "
        "dataset-fashion-mnist); a GPT trains on a text file given with --data.",
    .sections = (const ar_option_section[]){
        {NULL, run_options, 0},
        {"the recipe", recipe_options, 0},
        {"checkpoints", checkpoint_options, 0},
        {"the pipeline", pipeline_options, 0},
        {"training on a market's providers", market_options, 0},
        {"TLS, for the workers and the market", ar_cli_tls_client_options, offsetof(train_opts, tls)},
        {0},
    },
    .given_mask = offsetof(train_opts, c.set_mask),
    .opts_size = sizeof(train_opts),
    .init = train_init,
    .run = run_train,
};

static int run_train(void *opts)
{
    train_opts *o = opts;
    ar_train_config *c = &o->c;
    if (ar_cli_tls_setup("train", &o->tls) != 0)
        return 2;
    if (c->model_path && c->resume_dir) {
        ar_cli_error("train", "--resume takes the model from %s/spec.json; drop --model", c->resume_dir);
        return 2;
    }
    if (!c->model_path && !c->resume_dir) {
        ar_cli_error("train", "--model SPEC is required (for example configs/mlp-fashion.json)");
        return 2;
    }
    if (c->market) {
        if (c->remote_workers || c->stages > 1) {
            ar_cli_error("train", "--market leases the workers: drop --workers");
            return 2;
        }
        if (!c->token)
            c->token = getenv("ARCEUS_TOKEN");
        if (!c->token || !*c->token) {
            ar_cli_error("train", "--market needs --token T (or $ARCEUS_TOKEN; arceus market add-account prints one)");
            return 2;
        }
        if (c->devices == 0)
            c->devices = 1;
    } else if (c->spares && !c->remote_workers) {
        ar_cli_error("train", "--spares goes with --workers HOST:PORT,...");
        return 2;
    } else if (c->token || c->devices || c->max_credits) {
        ar_cli_error("train", "--token, --devices and --max-credits go with --market HOST:PORT");
        return 2;
    }
    ar_set_threads(o->threads);
    int rc = ar_train_run(c);
    if (rc != AR_OK) {
        ar_cli_error("train", "%s", ar_last_error());
        return 1;
    }
    return 0;
}
