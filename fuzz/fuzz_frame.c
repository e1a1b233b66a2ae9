/* libFuzzer harness: a Pipe message as a worker receives it (src/net/link.c
 * on_recv): the Frame decoder, the frames coalesced into it (Frame.more) and
 * ar_frame_validate, then every payload copied out of the message.
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
