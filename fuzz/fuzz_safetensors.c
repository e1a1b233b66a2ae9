/* libFuzzer harness: the safetensors reader (src/nn/safetensors.c) on a byte
 * buffer, as a worker's Restore and a checkpoint load run it. Every tensor it
 * hands out is read end to end, so a pointer or length outside the buffer
 * shows up under ASan. */
#include "core/core.h"
#include "nn/safetensors.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ar_st_file f;
    if (ar_st_parse(data, size, &f) == AR_OK) {
        unsigned sum = 0;
        for (int i = 0; i < f.count; i++) {
            const ar_st_tensor *t = &f.tensors[i];
            const uint8_t *p = t->data;
            for (size_t k = 0; k < t->nbytes; k++)
                sum += p[k];
            if (ar_st_find(&f, t->name) == NULL)
                abort(); /* every tensor listed can be found by name */
        }
        for (int i = 0; i < f.meta_count; i++)
            if (ar_st_meta(&f, f.meta_keys[i]) == NULL)
                abort();
        /* keep the reads from being optimised away */
        if (sum == 0xdeadbeef)
            ar_log(AR_LOG_DEBUG, "sum %u", sum);
        ar_st_free(&f);
    }
    return 0;
}
