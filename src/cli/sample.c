/* arceus sample and arceus eval: use a checkpoint. */
#include "cli/cli.h"
#include "core/core.h"
#include "data/data.h"
#include "train/checkpoint.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Choose the next token from logits (V). */
static int pick(const float *logits, int V, float temperature, int top_k, ar_rng *rng)
{
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best])
            best = i;
    if (temperature <= 0)
        return best;
    float cutoff = -INFINITY;
    if (top_k > 0 && top_k < V) {
        /* the k-th largest logit: count how many are strictly larger */
        for (int i = 0; i < V; i++) {
            int larger = 0;
            for (int j = 0; j < V; j++)
                larger += logits[j] > logits[i];
            if (larger < top_k && (cutoff == -INFINITY || logits[i] < cutoff))
                cutoff = logits[i];
        }
    }
    double probs[256], sum = 0;
    for (int i = 0; i < V; i++) {
        probs[i] = logits[i] >= cutoff ? exp((logits[i] - logits[best]) / temperature) : 0.0;
        sum += probs[i];
    }
    double u = ar_rng_uniform(rng) * sum;
    for (int i = 0; i < V; i++) {
        u -= probs[i];
        if (u <= 0 && probs[i] > 0)
            return i;
    }
    return best;
}

typedef struct {
    const char *ckpt, *prompt;
    long tokens;
    float temperature;
    int top_k, threads;
    uint64_t seed;
} sample_opts;

#define SAMPLE(member) AR_OPTION_AT(sample_opts, member)

static const ar_option sample_options[] = {
    {.name = "ckpt", .kind = AR_OPTION_STRING, SAMPLE(ckpt), .metavar = "DIR", .required = 1,
     .help = "checkpoint folder"},
    {.name = "prompt", .kind = AR_OPTION_STRING, SAMPLE(prompt), .metavar = "TEXT", .def = "\n",
     .def_text = "a newline", .help = "text to continue; its characters must be in the model's vocabulary"},
    {.name = "tokens", .kind = AR_OPTION_LONG, SAMPLE(tokens), .lo = 0, .hi = 1000000, .metavar = "N",
     .def = "200", .help = "characters to generate"},
    {.name = "temperature", .kind = AR_OPTION_FLOAT, SAMPLE(temperature), .flo = 0, .fhi = 100,
     .metavar = "X", .def = "0.8", .help = "sampling temperature, 0 = greedy"},
    {.name = "top-k", .kind = AR_OPTION_INT, SAMPLE(top_k), .lo = 0, .hi = 256, .metavar = "K", .def = "0",
     .help = "sample among the K most likely, 0 = all"},
    {.name = "seed", .kind = AR_OPTION_U64, SAMPLE(seed), .metavar = "N", .def = "1337",
     .help = "random seed"},
    {.name = "threads", .kind = AR_OPTION_INT, SAMPLE(threads), .lo = 0, .hi = 1024, .metavar = "N",
     .def = "0", .help = "threads, 0 = all cores"},
    {0},
};

static int run_sample(void *opts);

const ar_cmd_spec ar_sample_cmd = {
    .name = "sample",
    .summary = "generate text from a language-model checkpoint",
    .usage = "--ckpt DIR [--prompt TEXT] [options]",
    .description = "Generate text with a language model trained by arceus train --out DIR.",
    .sections = (const ar_option_section[]){{NULL, sample_options, 0}, {0}},
    .opts_size = sizeof(sample_opts),
    .run = run_sample,
};

static int run_sample(void *opts)
{
    const sample_opts *o = opts;
    ar_set_threads(o->threads);
    ar_stage st;
    if (ar_checkpoint_open_stage(o->ckpt, 1, &st) != AR_OK) {
        ar_cli_error("sample", "%s", ar_last_error());
        return 1;
    }
    int rc = 1;
    int32_t *ctx = NULL;
    ar_text_set vocab;
    memset(&vocab, 0, sizeof vocab);
    if (st.spec.type != AR_MODEL_GPT || !st.spec.has_vocab) {
        ar_cli_error("sample", "%s: not a language-model checkpoint", o->ckpt);
        goto done;
    }
    if (ar_text_vocab_init(&vocab, st.spec.vocab, st.spec.vocab_size) != AR_OK) {
        ar_cli_error("sample", "%s", ar_last_error());
        goto done;
    }
    int T = st.spec.block_size, V = st.spec.vocab_size;
    long plen = (long)strlen(o->prompt);
    ctx = calloc((size_t)(plen + o->tokens + T + 1), sizeof *ctx);
    if (!ctx) {
        ar_cli_error("sample", "out of memory");
        goto done;
    }
    long n;
    if (ar_text_encode(&vocab, o->prompt, ctx, &n) != AR_OK) {
        ar_cli_error("sample", "--prompt: %s", ar_last_error());
        goto done;
    }
    if (n == 0) {
        ar_cli_error("sample", "--prompt must not be empty");
        goto done;
    }
    ar_rng rng;
    ar_rng_seed(&rng, o->seed);
    fputs(o->prompt, stdout);
    int32_t window[8192];
    for (long i = 0; i < o->tokens; i++) {
        /* the last T tokens; causal attention lets us pad after them */
        long start = n > T ? n - T : 0, len = n - start;
        memset(window, 0, sizeof(int32_t) * (size_t)T);
        memcpy(window, ctx + start, sizeof(int32_t) * (size_t)len);
        const float *logits;
        if (ar_stage_forward(&st, 0, 1, window, 0, 0, &logits) != AR_OK) {
            ar_cli_error("sample", "%s", ar_last_error());
            goto done;
        }
        int next = pick(logits + (size_t)(len - 1) * V, V, o->temperature, o->top_k, &rng);
        ctx[n++] = next;
        putchar(st.spec.vocab[next]);
        fflush(stdout);
    }
    putchar('\n');
    rc = 0;
done:
    free(ctx);
    ar_text_free(&vocab);
    ar_stage_destroy(&st);
    return rc;
}

typedef struct {
    const char *ckpt, *data;
    int batches, batch, threads;
} eval_opts;

#define EVAL(member) AR_OPTION_AT(eval_opts, member)

static const ar_option eval_options[] = {
    {.name = "ckpt", .kind = AR_OPTION_STRING, EVAL(ckpt), .metavar = "DIR", .required = 1,
     .help = "checkpoint folder"},
    {.name = "data", .kind = AR_OPTION_STRING, EVAL(data), .metavar = "PATH",
     .def_text = "Fashion-MNIST for an MLP", .help = "text file (GPT, required) or IDX folder (MLP)"},
    {.name = "batches", .kind = AR_OPTION_INT, EVAL(batches), .lo = 0, .hi = 1000000, .metavar = "N",
     .def = "4", .help = "number of batches, 0 = the whole split"},
    {.name = "batch", .kind = AR_OPTION_INT, EVAL(batch), .lo = 1, .hi = 65536, .metavar = "N", .def = "16",
     .help = "rows per batch"},
    {.name = "threads", .kind = AR_OPTION_INT, EVAL(threads), .lo = 0, .hi = 1024, .metavar = "N",
     .def = "0", .help = "threads, 0 = all cores"},
    {0},
};

static int run_eval(void *opts);

const ar_cmd_spec ar_eval_cmd = {
    .name = "eval",
    .summary = "evaluate a checkpoint on a data set",
    .usage = "--ckpt DIR [--data PATH] [options]",
    .description =
        "Evaluate a checkpoint on fixed data and print one JSON line {\"loss\": ..., \"accuracy\": ..., "
        "\"count\": ...}. A language model reads consecutive windows of the validation split (the last 10% "
        "of the text) from its start; a classifier reads the test set in order.",
    .sections = (const ar_option_section[]){{NULL, eval_options, 0}, {0}},
    .opts_size = sizeof(eval_opts),
    .run = run_eval,
};

static int run_eval(void *opts)
{
    const eval_opts *o = opts;
    ar_set_threads(o->threads);
    ar_stage st;
    if (ar_checkpoint_open_stage(o->ckpt, o->batch, &st) != AR_OK) {
        ar_cli_error("eval", "%s", ar_last_error());
        return 1;
    }
    int rc = 1;
    double loss_sum = 0;
    long correct = 0, count = 0;
    int T = st.T;
    int32_t *inputs = calloc((size_t)o->batch * T, sizeof *inputs), *targets = calloc((size_t)o->batch * T, sizeof *targets);
    ar_text_set text;
    ar_image_set images;
    memset(&text, 0, sizeof text);
    memset(&images, 0, sizeof images);
    if (!inputs || !targets) {
        ar_cli_error("eval", "out of memory");
        goto done;
    }
    if (st.spec.type == AR_MODEL_GPT) {
        if (!o->data) {
            ar_cli_error("eval", "--data PATH (the text file) is required for a language model");
            goto done;
        }
        if (ar_text_load(o->data, &text) != AR_OK) {
            ar_cli_error("eval", "%s", ar_last_error());
            goto done;
        }
        if (text.vocab_size != st.spec.vocab_size || memcmp(text.vocab, st.spec.vocab, (size_t)text.vocab_size)) {
            ar_cli_error("eval", "%s: the text's characters differ from the checkpoint's vocabulary", o->data);
            goto done;
        }
        long windows = (text.count - text.train_count - 1) / T;
        if (o->batches > 0 && windows > (long)o->batches * o->batch)
            windows = (long)o->batches * o->batch;
        for (long w = 0; w < windows; w += o->batch) {
            int rows = (int)(windows - w < o->batch ? windows - w : o->batch);
            for (int r = 0; r < rows; r++) {
                long at = text.train_count + (w + r) * T;
                memcpy(inputs + (size_t)r * T, text.tokens + at, sizeof(int32_t) * (size_t)T);
                memcpy(targets + (size_t)r * T, text.tokens + at + 1, sizeof(int32_t) * (size_t)T);
            }
            const float *out;
            double loss;
            long c;
            if (ar_stage_forward(&st, 0, rows, inputs, 0, 0, &out) != AR_OK ||
                ar_stage_loss(&st, 0, rows, targets, &loss, &c) != AR_OK) {
                ar_cli_error("eval", "%s", ar_last_error());
                goto done;
            }
            loss_sum += loss * rows * T;
            correct += c;
            count += (long)rows * T;
        }
    } else {
        if (ar_image_set_load(o->data ? o->data : "/usr/share/datasets/fashion-mnist", "t10k", &images) != AR_OK) {
            ar_cli_error("eval", "%s", ar_last_error());
            goto done;
        }
        if (images.features != st.spec.inputs) {
            ar_cli_error("eval", "images have %d features, the model takes %d", images.features, st.spec.inputs);
            goto done;
        }
        long total = images.count;
        if (o->batches > 0 && total > (long)o->batches * o->batch)
            total = (long)o->batches * o->batch;
        for (long i = 0; i < total; i += o->batch) {
            int rows = (int)(total - i < o->batch ? total - i : o->batch);
            const float *out;
            double loss;
            long c;
            if (ar_stage_forward(&st, 0, rows, images.images + (size_t)i * images.features, 0, 0, &out) != AR_OK ||
                ar_stage_loss(&st, 0, rows, images.labels + i, &loss, &c) != AR_OK) {
                ar_cli_error("eval", "%s", ar_last_error());
                goto done;
            }
            loss_sum += loss * rows;
            correct += c;
            count += rows;
        }
    }
    if (count == 0) {
        ar_cli_error("eval", "no data to evaluate");
        goto done;
    }
    printf("{\"loss\": %.7f, \"accuracy\": %.6f, \"count\": %ld}\n", loss_sum / count,
           (double)correct / count, count);
    rc = 0;
done:
    free(inputs);
    free(targets);
    ar_text_free(&text);
    ar_image_set_free(&images);
    ar_stage_destroy(&st);
    return rc;
}
