/* libFuzzer harness: a worker's Load request (src/net/worker.c): the
 * protobuf-c unpack of a LoadRequest, then every check the worker makes before
 * it allocates (net_load_check: the spec, the unit range, the pipeline
 * arguments, the memory estimate against --max-mem). A request that passes is
 * built for real, so an estimate far below what ar_stage_create allocates
 * shows up as a malloc over libFuzzer's limit. */
#include "core/core.h"
#include "net/net_internal.h"
#include "train/stage.h"

#include <stdint.h>
#include <stdlib.h>

#define FUZZ_MAX_MEM ((uint64_t)16 << 20) /* the worker's --max-mem here */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ar_log_set_level(AR_LOG_ERROR + 1);
    Arceus__LoadRequest *req = arceus__load_request__unpack(NULL, size, data);
    if (!req)
        return 0;
    ar_model_spec spec;
    int slots = 0;
    int rc = net_load_check(req, FUZZ_MAX_MEM, &spec, &slots);
    if (rc == AR_OK && !req->tp_rank && !req->n_tp_group) {
        /* a plain stage (the tensor-parallel roles build shards the same way) */
        ar_optim_config optim = {0};
        if (req->optimizer) {
            optim.kind = (int)req->optimizer->kind;
            optim.beta1 = req->optimizer->beta1;
            optim.beta2 = req->optimizer->beta2;
            optim.eps = req->optimizer->eps;
            optim.weight_decay = req->optimizer->weight_decay;
        }
        ar_stage st;
        if (ar_stage_create(&st, &spec, (int)req->first_unit, (int)req->last_unit,
                            (int)req->micro_batch_rows, slots, req->seed, &optim) == AR_OK)
            ar_stage_destroy(&st);
    } else if (rc != AR_OK && ar_last_error()[0] == '\0') {
        abort(); /* a refusal always says why */
    }
    arceus__load_request__free_unpacked(req, NULL);
    return 0;
}
