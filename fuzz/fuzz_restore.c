/* libFuzzer harness: a worker's Restore (src/net/worker.c on_restore) after
 * the chunks are joined: ar_state_decode into a real stage (a GPT block and
 * the head, whose tied embedding copy comes along), which checks every
 * tensor's name, dtype and shape before it writes any.
 *
 * The seed (fuzz/corpus/restore/) is the stage's own encoded state, written
 * by this binary: AR_FUZZ_SEED_OUT=FILE build/fuzz/fuzz/fuzz_restore. */
#include "core/core.h"
#include "net/remote.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ar_stage stage;

static void write_seed(const char *path)
{
    ar_state_parts parts = {.stage = &stage};
    void *buf;
    size_t len;
    FILE *f = fopen(path, "wb");
    if (ar_state_encode(&parts, &buf, &len) != AR_OK || !f || fwrite(buf, 1, len, f) != len ||
        fclose(f) != 0) {
        fprintf(stderr, "fuzz_restore: cannot write %s: %s\n", path, ar_last_error());
        exit(1);
    }
    free(buf);
    exit(0);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    ar_log_set_level(AR_LOG_ERROR + 1);
    const char *json = "{\"type\": \"gpt\", \"vocab_size\": 5, \"block_size\": 8, \"n_layer\": 1, "
                       "\"n_head\": 2, \"n_embd\": 8, \"dropout\": 0.0}";
    ar_model_spec spec;
    ar_optim_config optim = {0};
    if (ar_spec_parse(json, strlen(json), "fuzz", &spec) != AR_OK ||
        ar_stage_create(&stage, &spec, 1, 3, 2, 1, 7, &optim) != AR_OK) {
        fprintf(stderr, "fuzz_restore: %s\n", ar_last_error());
        exit(1);
    }
    const char *seed = getenv("AR_FUZZ_SEED_OUT");
    if (seed)
        write_seed(seed);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ar_state_parts parts = {.stage = &stage};
    (void)ar_state_decode(&parts, data, size, "Restore");
    return 0;
}
