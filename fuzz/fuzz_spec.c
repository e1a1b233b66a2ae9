/* libFuzzer harness: the model spec parser (src/nn/spec.c), as a worker runs
 * it on a Load's spec_json. A spec that parses and validates must survive a
 * round trip through ar_spec_to_json unchanged. */
#include "core/core.h"
#include "nn/spec.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ar_model_spec spec;
    if (ar_spec_parse((const char *)data, size, "fuzz", &spec) != AR_OK)
        return 0;
    (void)ar_spec_units(&spec);
    (void)ar_spec_param_count(&spec);
    if (ar_spec_validate(&spec, "fuzz") != AR_OK)
        return 0;
    char *json = ar_spec_to_json(&spec);
    if (!json)
        abort();
    ar_model_spec again;
    if (ar_spec_parse(json, strlen(json), "round trip", &again) != AR_OK ||
        ar_spec_validate(&again, "round trip") != AR_OK)
        abort(); /* what we write we must read */
    if (again.type != spec.type || again.n_layer != spec.n_layer || again.n_embd != spec.n_embd ||
        again.n_hidden != spec.n_hidden || again.inputs != spec.inputs ||
        again.classes != spec.classes || again.vocab_size != spec.vocab_size)
        abort();
    free(json);
    return 0;
}
