/* libFuzzer harness: a Pipe message as a worker receives it (src/net/link.c
 * on_recv): the Frame decoder, the frames coalesced into it (Frame.more) and
 * ar_frame_validate, then every payload copied out of the message and, as
 * g_recv and ar_link_recv do, a compressed one (bf16, int8 with its scales)
 * checked and decompressed: bad scales, NaN and blocks cut short must end in
 * an error, never a crash or a read past the payload.
 *
 * gRPC hands a message over as a list of slices whose boundaries fall
 * anywhere; the first input byte chooses where the rest is cut, so the
 * decoder's reads across slice boundaries are fuzzed too. */
#include "core/core.h"
#include "net/net_internal.h"
#include "slices.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 1 MiB: small enough that libFuzzer's malloc limit is never reached by a
 * frame that passed validation */
#define FUZZ_MAX_FRAME ((size_t)1 << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ar_log_set_level(AR_LOG_ERROR + 1);
    grpc_byte_buffer *bb = fuzz_sliced_message(data, size);
    if (!bb)
        return 0;

    ar_frame fs[1 + NET_MAX_COALESCED];
    size_t payload_at[1 + NET_MAX_COALESCED];
    int count = 0;
    if (net_frames_receive(bb, FUZZ_MAX_FRAME, fs, payload_at, &count) == AR_OK) {
        for (int k = 0; k < count; k++) {
            if (net_payload_copy(bb, payload_at[k], fs[k].nbytes, &fs[k].data) != AR_OK)
                abort(); /* the decoder promised the payload is there */
            int compressed = fs[k].dtype == AR_DT_BF16 || fs[k].dtype == AR_DT_Q8;
            int checked = ar_frame_check_compressed(&fs[k]);
            int rc = ar_frame_decompress(&fs[k]);
            if (rc != checked && rc != AR_ENOMEM)
                abort(); /* decompressing refuses exactly what the check does */
            if (rc == AR_OK && compressed &&
                (fs[k].dtype != AR_DT_F32 || fs[k].nbytes != ar_payload_bytes(AR_DT_F32, fs[k].nbytes / 4)))
                abort();
            ar_frame_free(&fs[k]);
        }
    }
    grpc_byte_buffer_destroy(bb);

    /* the single-frame decoder (no coalescing, payload copied) */
    ar_frame f;
    if (ar_net_frame_decode(data, size, &f) == AR_OK) {
        (void)ar_frame_validate(&f, FUZZ_MAX_FRAME);
        ar_frame_free(&f);
    }
    return 0;
}
