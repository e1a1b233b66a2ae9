/* libFuzzer harness: audit material from an untrusted provider (or, at the
 * market, from a renter's evidence): ar_audit_material_decode, and on
 * success the replay on a stage of the expected shape, which checks what the
 * bytes could not (every size against the stage). */
#include "core/core.h"
#include "nn/spec.h"
#include "train/audit.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* the whole of this MLP is one stage of 75 parameters (fuzz/make_seeds.py) */
static const char *SPEC = "{\"type\": \"mlp\", \"inputs\": 8, \"hidden\": [6], \"classes\": 3, "
                          "\"activation\": \"relu\", \"dropout\": 0.0}";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static ar_stage st;
    static int ready;
    if (!ready) {
        ar_model_spec spec;
        ar_optim_config oc = {.kind = AR_OPT_ADAMW, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f};
        if (ar_spec_parse(SPEC, strlen(SPEC), "fuzz", &spec) != AR_OK ||
            ar_stage_create(&st, &spec, 0, 2, 4, 1, 1, &oc) != AR_OK || st.param_floats != 75)
            abort();
        ready = 1;
    }
    ar_audit_material m;
    if (ar_audit_material_decode(data, size, st.param_floats, 4, 4, "fuzz", &m) == AR_OK) {
        if (m.M < 1 || m.M > 4)
            abort();
        ar_step_digests d;
        uint8_t after[32];
        (void)ar_audit_replay(&st, &m, 1, &d, after);
        ar_audit_material_free(&m);
    }
    return 0;
}
