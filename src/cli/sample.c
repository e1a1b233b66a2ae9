/* arceus sample and arceus eval: use a checkpoint. */
#include "cli/cli.h"
#include "core/core.h"
#include "data/data.h"
#include "train/checkpoint.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ar_help_sample(void)
{
    printf("usage: arceus sample --ckpt DIR [--prompt TEXT] [options]\n"
           "\n"
           "Generate text with a language model trained by arceus train --out DIR.\n"
           "\n"
           "options:\n"
           "  --ckpt DIR          checkpoint folder\n"
           "  --prompt TEXT       text to continue (default: a newline); its characters\n"
           "                      must be in the model's vocabulary\n"
           "  --tokens N          characters to generate (200)\n"
           "  --temperature X     sampling temperature, 0 = greedy (0.8)\n"
           "  --top-k K           sample among the K most likely, 0 = all (0)\n"
           "  --seed N            random seed (1337)\n"
           "  --threads N         threads, 0 = all cores (0)\n");
}

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

int ar_cmd_sample(int argc, char **argv)
{
    const char *ckpt = NULL, *prompt = "\n";
    long tokens = 200;
    float temperature = 0.8f;
    int top_k = 0, threads = 0;
    uint64_t seed = 1337;
    ar_args a;
    ar_args_init(&a, argc, argv);
    const char *name;
    int positional;
    while ((name = ar_args_next(&a, &positional))) {
        int rc;
        if (positional) {
            ar_cli_error("sample", "unexpected argument \"%s\" (see arceus sample --help)", name);
            return 2;
        }
        if (!strcmp(name, "ckpt"))
            rc = ar_args_string(&a, &ckpt);
        else if (!strcmp(name, "prompt"))
            rc = ar_args_string(&a, &prompt);
        else if (!strcmp(name, "tokens"))
            rc = ar_args_long(&a, 0, 1000000, &tokens);
        else if (!strcmp(name, "temperature"))
            rc = ar_args_float(&a, 0, 100, &temperature);
        else if (!strcmp(name, "top-k"))
            rc = ar_args_int(&a, 0, 256, &top_k);
        else if (!strcmp(name, "seed"))
            rc = ar_args_u64(&a, &seed);
        else if (!strcmp(name, "threads"))
            rc = ar_args_int(&a, 0, 1024, &threads);
        else
            rc = ar_args_unknown(&a);
        if (rc != 0)
            return 2;
    }
    if (!ckpt) {
        ar_cli_error("sample", "--ckpt DIR is required");
        return 2;
    }
    ar_set_threads(threads);
    ar_stage st;
    if (ar_checkpoint_open_stage(ckpt, 1, &st) != AR_OK) {
        ar_cli_error("sample", "%s", ar_last_error());
        return 1;
    }
    int rc = 1;
    int32_t *ctx = NULL;
    ar_text_set vocab;
    memset(&vocab, 0, sizeof vocab);
    if (st.spec.type != AR_MODEL_GPT || !st.spec.has_vocab) {
        ar_cli_error("sample", "%s: not a language-model checkpoint", ckpt);
        goto done;
    }
    if (ar_text_vocab_init(&vocab, st.spec.vocab, st.spec.vocab_size) != AR_OK) {
        ar_cli_error("sample", "%s", ar_last_error());
        goto done;
    }
    int T = st.spec.block_size, V = st.spec.vocab_size;
    long plen = (long)strlen(prompt);
    ctx = calloc((size_t)(plen + tokens + T + 1), sizeof *ctx);
    if (!ctx) {
        ar_cli_error("sample", "out of memory");
        goto done;
    }
    long n;
    if (ar_text_encode(&vocab, prompt, ctx, &n) != AR_OK) {
        ar_cli_error("sample", "--prompt: %s", ar_last_error());
        goto done;
    }
    if (n == 0) {
        ar_cli_error("sample", "--prompt must not be empty");
        goto done;
    }
    ar_rng rng;
    ar_rng_seed(&rng, seed);
    fputs(prompt, stdout);
    int32_t window[8192];
    for (long i = 0; i < tokens; i++) {
        /* the last T tokens; causal attention lets us pad after them */
        long start = n > T ? n - T : 0, len = n - start;
        memset(window, 0, sizeof(int32_t) * (size_t)T);
        memcpy(window, ctx + start, sizeof(int32_t) * (size_t)len);
        const float *logits;
        if (ar_stage_forward(&st, 0, 1, window, 0, 0, &logits) != AR_OK) {
            ar_cli_error("sample", "%s", ar_last_error());
            goto done;
        }
        int next = pick(logits + (size_t)(len - 1) * V, V, temperature, top_k, &rng);
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

void ar_help_eval(void)
{
    printf("usage: arceus eval --ckpt DIR [--data PATH] [options]\n"
           "\n"
           "Evaluate a checkpoint on fixed data and print one JSON line\n"
           "{\"loss\": ..., \"accuracy\": ..., \"count\": ...}.\n"
           "A language model reads consecutive windows of the validation split (the last\n"
           "10%% of the text) from its start; a classifier reads the test set in order.\n"
           "\n"
           "options:\n"
           "  --ckpt DIR       checkpoint folder\n"
           "  --data PATH      text file (GPT) or IDX folder (MLP, default Fashion-MNIST)\n"
           "  --batches N      number of batches, 0 = the whole split (4)\n"
           "  --batch N        rows per batch (16)\n"
           "  --threads N      threads, 0 = all cores (0)\n");
}

int ar_cmd_eval(int argc, char **argv)
{
    const char *ckpt = NULL, *data = NULL;
    int batches = 4, batch = 16, threads = 0;
    ar_args a;
    ar_args_init(&a, argc, argv);
    const char *name;
    int positional;
    while ((name = ar_args_next(&a, &positional))) {
        int rc;
        if (positional) {
            ar_cli_error("eval", "unexpected argument \"%s\" (see arceus eval --help)", name);
            return 2;
        }
        if (!strcmp(name, "ckpt"))
            rc = ar_args_string(&a, &ckpt);
        else if (!strcmp(name, "data"))
            rc = ar_args_string(&a, &data);
        else if (!strcmp(name, "batches"))
            rc = ar_args_int(&a, 0, 1000000, &batches);
        else if (!strcmp(name, "batch"))
            rc = ar_args_int(&a, 1, 65536, &batch);
        else if (!strcmp(name, "threads"))
            rc = ar_args_int(&a, 0, 1024, &threads);
        else
            rc = ar_args_unknown(&a);
        if (rc != 0)
            return 2;
    }
    if (!ckpt) {
        ar_cli_error("eval", "--ckpt DIR is required");
        return 2;
    }
    ar_set_threads(threads);
    ar_stage st;
    if (ar_checkpoint_open_stage(ckpt, batch, &st) != AR_OK) {
        ar_cli_error("eval", "%s", ar_last_error());
        return 1;
    }
    int rc = 1;
    double loss_sum = 0;
    long correct = 0, count = 0;
    int T = st.T;
    int32_t *inputs = calloc((size_t)batch * T, sizeof *inputs), *targets = calloc((size_t)batch * T, sizeof *targets);
    ar_text_set text;
    ar_image_set images;
    memset(&text, 0, sizeof text);
    memset(&images, 0, sizeof images);
    if (!inputs || !targets) {
        ar_cli_error("eval", "out of memory");
        goto done;
    }
    if (st.spec.type == AR_MODEL_GPT) {
        if (!data) {
            ar_cli_error("eval", "--data PATH (the text file) is required for a language model");
            goto done;
        }
        if (ar_text_load(data, &text) != AR_OK) {
            ar_cli_error("eval", "%s", ar_last_error());
            goto done;
        }
        if (text.vocab_size != st.spec.vocab_size || memcmp(text.vocab, st.spec.vocab, (size_t)text.vocab_size)) {
            ar_cli_error("eval", "%s: the text's characters differ from the checkpoint's vocabulary", data);
            goto done;
        }
        long windows = (text.count - text.train_count - 1) / T;
        if (batches > 0 && windows > (long)batches * batch)
            windows = (long)batches * batch;
        for (long w = 0; w < windows; w += batch) {
            int rows = (int)(windows - w < batch ? windows - w : batch);
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
        if (ar_image_set_load(data ? data : "/usr/share/datasets/fashion-mnist", "t10k", &images) != AR_OK) {
            ar_cli_error("eval", "%s", ar_last_error());
            goto done;
        }
        if (images.features != st.spec.inputs) {
            ar_cli_error("eval", "images have %d features, the model takes %d", images.features, st.spec.inputs);
            goto done;
        }
        long total = images.count;
        if (batches > 0 && total > (long)batches * batch)
            total = (long)batches * batch;
        for (long i = 0; i < total; i += batch) {
            int rows = (int)(total - i < batch ? total - i : batch);
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
