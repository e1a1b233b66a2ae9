/* libFuzzer harness: the session check of Save, Restore and Pipe
 * (src/net/worker.c, src/net/link.c). The first input byte picks the entry
 * point; the rest is the request as it arrives:
 *   0: a Pipe's first message, cut into gRPC slices at the second byte's
 *      stride: the session is found among the top-level fields
 *      (net_frames_session) without decoding the frames;
 *   1: a SaveRequest;
 *   2: a Restore's first Chunk.
 * The session found is compared with the stage's (net_session_matches); the
 * harness aborts when that answer differs from a plain comparison, so a
 * request is accepted exactly when it carries the stage's session whole. */
#include "arceus.pb-c.h"
#include "core/core.h"
#include "net/net_internal.h"
#include "slices.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The stage's session: 64 hex characters, as Load draws them. */
static const char SESSION[] = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

static void check(const char *given)
{
    int expect = given && strcmp(given, SESSION) == 0;
    if (net_session_matches(SESSION, given) != expect)
        abort();
    /* no session is live: nothing matches, not even an empty one */
    if (net_session_matches("", given) || net_session_matches(NULL, given))
        abort();
}

static void pipe_message(const uint8_t *data, size_t size)
{
    grpc_byte_buffer *bb = fuzz_sliced_message(data, size);
    if (!bb)
        return;
    char given[AR_SESSION_HEX + 1];
    int found = net_frames_session(bb, given, sizeof given);
    grpc_byte_buffer_destroy(bb);
    if (strlen(given) >= sizeof given)
        abort(); /* always terminated */
    if (!found && given[0])
        abort(); /* nothing found leaves nothing */
    check(found ? given : "");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    ar_log_set_level(AR_LOG_ERROR + 1);
    int which = data[0] % 3;
    data++;
    size--;
    if (which == 0) {
        pipe_message(data, size);
    } else if (which == 1) {
        Arceus__SaveRequest *r = arceus__save_request__unpack(NULL, size, data);
        if (r) {
            check(r->session);
            arceus__save_request__free_unpacked(r, NULL);
        }
    } else {
        Arceus__Chunk *c = arceus__chunk__unpack(NULL, size, data);
        if (c) {
            check(c->session);
            arceus__chunk__free_unpacked(c, NULL);
        }
    }
    return 0;
}
