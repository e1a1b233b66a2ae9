/* The gRPC transport: frames round-trip bitwise through a real server on
 * 127.0.0.1 (port 0) in this process, bad frames get INVALID_ARGUMENT and
 * the server keeps serving, and the worker's control RPCs. */
#include "arceus.pb-c.h"
#include "core/core.h"
#include "net/net.h"
#include "net/remote.h"
#include "nn/spec.h"
#include "train/frame.h"
#include "train/pipeline.h"
#include "train/stage.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SERVER_MAX_FRAME ((size_t)64 << 20)

/* Pipe handler that sends every frame back. */
static void echo_pipe(ar_rpc *rpc, void *user)
{
    (void)user;
    ar_link *l;
    if (ar_rpc_link(rpc, "echo client", SERVER_MAX_FRAME, &l) != AR_OK)
        return;
    for (;;) {
        ar_frame f;
        if (ar_link_recv(l, &f, -1) != AR_OK)
            break;
        if (ar_link_send(l, &f) != AR_OK)
            break;
    }
}

static ar_server *start_echo(char *addr, size_t size)
{
    ar_server *s;
    int port = 0;
    cr_assert_eq(ar_server_create("127.0.0.1:0", NULL, &s, &port), AR_OK, "%s", ar_last_error());
    cr_assert(port > 0);
    cr_assert_eq(ar_server_handle(s, "/arceus.Worker/Pipe", echo_pipe, NULL), AR_OK);
    cr_assert_eq(ar_server_start(s), AR_OK);
    snprintf(addr, size, "127.0.0.1:%d", port);
    return s;
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        p[i] = (unsigned char)(x >> 24);
    }
}

/* Send a frame of nbytes (U8, shape {nbytes}) and check what comes back. */
static double round_trip(ar_link *l, size_t nbytes, int mb)
{
    unsigned char *want = malloc(nbytes ? nbytes : 1);
    cr_assert(want);
    fill(want, nbytes, (unsigned)nbytes + 7);
    int32_t targets[5] = {1, -2, 3, 400000, -5};
    ar_frame f = {.kind = AR_FRAME_ACT, .step = 1234567890123LL, .mb = mb, .nmb = 8, .rows = 3};
    f.scalars[0] = 1.5;
    f.scalars[1] = -0.25;
    f.scalars[3] = 1e-300;
    int64_t shape = (int64_t)nbytes;
    if (nbytes)
        cr_assert_eq(ar_frame_set_payload(&f, AR_DT_U8, 1, &shape, want), AR_OK);
    cr_assert_eq(ar_frame_set_targets(&f, targets, 5), AR_OK);
    double t0 = ar_now();
    cr_assert_eq(ar_link_send(l, &f), AR_OK, "%s", ar_last_error());
    cr_assert_null(f.data); /* the link took the buffers */
    ar_frame g;
    cr_assert_eq(ar_link_recv(l, &g, 60), AR_OK, "%s", ar_last_error());
    double dt = ar_now() - t0;
    cr_assert_eq(g.kind, AR_FRAME_ACT);
    cr_assert_eq(g.step, 1234567890123LL);
    cr_assert_eq(g.mb, mb);
    cr_assert_eq(g.nmb, 8);
    cr_assert_eq(g.rows, 3);
    cr_assert_eq(g.nbytes, nbytes);
    if (nbytes) {
        cr_assert_eq(g.dtype, AR_DT_U8);
        cr_assert_eq(g.ndim, 1);
        cr_assert_eq(g.shape[0], (int64_t)nbytes);
        cr_assert(memcmp(g.data, want, nbytes) == 0, "payload differs");
    }
    cr_assert_eq(g.ntargets, 5);
    cr_assert(memcmp(g.targets, targets, sizeof targets) == 0);
    cr_assert(g.scalars[0] == 1.5 && g.scalars[1] == -0.25 && g.scalars[2] == 0 && g.scalars[3] == 1e-300);
    ar_frame_free(&g);
    free(want);
    return dt;
}

Test(net, frames_round_trip_bitwise)
{
    char addr[64];
    ar_server *s = start_echo(addr, sizeof addr);
    ar_client *c;
    cr_assert_eq(ar_client_open(addr, &c), AR_OK);
    ar_link *l;
    cr_assert_eq(ar_client_pipe(c, "echo server", SERVER_MAX_FRAME, &l), AR_OK);
    round_trip(l, 0, 0);
    round_trip(l, 64 << 10, 1);
    round_trip(l, 16 << 20, 2);
    double best = 1e9;
    for (int i = 0; i < 3; i++) {
        double t = round_trip(l, 16 << 20, 3);
        best = t < best ? t : best;
    }
    cr_log_info("16 MiB frame round trip: %.1f ms (%.2f GB/s each way)", best * 1e3,
                2.0 * (16 << 20) / best / 1e9);
    fprintf(stderr, "test_net: 16 MiB frame round trip %.1f ms (%.2f GB/s both ways)\n", best * 1e3,
            2.0 * (16 << 20) / best / 1e9);
    /* many frames queued at once, in order */
    for (int i = 0; i < 50; i++) {
        ar_frame f = {.kind = AR_FRAME_SYNC, .step = i};
        cr_assert_eq(ar_link_send(l, &f), AR_OK);
    }
    for (int i = 0; i < 50; i++) {
        ar_frame g;
        cr_assert_eq(ar_link_recv(l, &g, 30), AR_OK, "%s", ar_last_error());
        cr_assert_eq(g.step, i);
        ar_frame_free(&g);
    }
    cr_assert_eq(ar_net_link_finish(l, 30), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_net_link_status(l), AR_STATUS_OK);
    ar_link_destroy(l);
    ar_client_close(c);
    ar_server_destroy(s);
}

static void expect_invalid(ar_client *c, ar_frame *bad)
{
    ar_link *l;
    cr_assert_eq(ar_client_pipe(c, "echo server", SERVER_MAX_FRAME, &l), AR_OK);
    ar_link_send(l, bad); /* queued: the error comes back as the status */
    ar_frame g;
    cr_assert_neq(ar_link_recv(l, &g, 30), AR_OK);
    cr_assert_eq(ar_net_link_status(l), AR_STATUS_INVALID_ARGUMENT, "status %d: %s",
                 ar_net_link_status(l), ar_last_error());
    cr_assert(strstr(ar_last_error(), "bad frame"), "%s", ar_last_error());
    ar_link_destroy(l);
}

Test(net, invalid_frames_get_invalid_argument_and_the_server_goes_on)
{
    char addr[64];
    ar_server *s = start_echo(addr, sizeof addr);
    ar_client *c;
    cr_assert_eq(ar_client_open(addr, &c), AR_OK);

    /* shape says 10 floats, the payload has 12 bytes */
    ar_frame bad = {.kind = AR_FRAME_ACT, .nmb = 1};
    int64_t shape = 3;
    float v[3] = {1, 2, 3};
    cr_assert_eq(ar_frame_set_payload(&bad, AR_DT_F32, 1, &shape, v), AR_OK);
    bad.shape[0] = 10;
    expect_invalid(c, &bad);

    /* unknown kind */
    ar_frame unk = {.kind = 99};
    expect_invalid(c, &unk);

    /* micro-batch out of range */
    ar_frame mb = {.kind = AR_FRAME_ACT, .mb = 5, .nmb = 2};
    expect_invalid(c, &mb);

    /* over the server's size limit */
    size_t big = SERVER_MAX_FRAME + 16;
    ar_frame huge = {.kind = AR_FRAME_ACT, .nmb = 1, .dtype = AR_DT_U8, .ndim = 1};
    huge.shape[0] = (int64_t)big;
    huge.data = calloc(1, big);
    huge.nbytes = big;
    cr_assert(huge.data);
    expect_invalid(c, &huge);

    /* and then a good client is served */
    ar_link *l;
    cr_assert_eq(ar_client_pipe(c, "echo server", SERVER_MAX_FRAME, &l), AR_OK);
    round_trip(l, 1000, 0);
    cr_assert_eq(ar_net_link_finish(l, 30), AR_OK, "%s", ar_last_error());
    ar_link_destroy(l);
    ar_client_close(c);
    ar_server_destroy(s);
}

Test(net, decoder_rejects_malformed_bytes)
{
    ar_frame f;
    const unsigned char trunc[] = {0x08}; /* a key without its value */
    cr_assert_neq(ar_net_frame_decode(trunc, sizeof trunc, &f), AR_OK);
    const unsigned char longlen[] = {0x52, 0xff, 0xff, 0xff, 0x0f, 1, 2}; /* payload longer than the message */
    cr_assert_neq(ar_net_frame_decode(longlen, sizeof longlen, &f), AR_OK);
    const unsigned char dims[] = {0x3a, 5, 1, 1, 1, 1, 1}; /* 5 packed dimensions */
    cr_assert_neq(ar_net_frame_decode(dims, sizeof dims, &f), AR_OK);
    const unsigned char ok[] = {0x08, 0x07, 0x10, 0x05, 0x9a, 0x01, 0x01, 0x00}; /* kind 7, step 5, unknown field 19 */
    cr_assert_eq(ar_net_frame_decode(ok, sizeof ok, &f), AR_OK, "%s", ar_last_error());
    cr_assert_eq(f.kind, 7);
    cr_assert_eq(f.step, 5);
    ar_frame_free(&f);
}

/* What links count per frame is the size of the protobuf message a peer
 * reads: packed by protobuf-c itself, decoded by the link's own decoder. */
Test(net, wire_bytes_are_the_protobuf_message_size)
{
    static float payload[300 * 7];
    int32_t targets[5] = {1, 2, 3, 4, 5};
    int64_t shape[2] = {300, 7};
    double scalars[3] = {3, 0, 2.5};
    Arceus__Frame h = ARCEUS__FRAME__INIT;
    h.kind = AR_FRAME_TP;
    h.step = 1000000;
    h.mb = 3;
    h.rows = 2;
    h.n_shape = 2;
    h.shape = shape;
    h.n_scalars = 3;
    h.scalars = scalars;
    h.targets.len = sizeof targets;
    h.targets.data = (uint8_t *)targets;
    h.payload.len = sizeof payload;
    h.payload.data = (uint8_t *)payload;
    size_t n = arceus__frame__get_packed_size(&h);
    uint8_t *buf = malloc(n);
    cr_assert_not_null(buf);
    cr_assert_eq(arceus__frame__pack(&h, buf), n);
    ar_frame f;
    cr_assert_eq(ar_net_frame_decode(buf, n, &f), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_frame_wire_bytes(&f), n, "%zu bytes counted, the message has %zu", ar_frame_wire_bytes(&f), n);
    ar_frame_free(&f);
    /* an empty frame and one with a negative field (ten bytes on the wire) */
    Arceus__Frame e = ARCEUS__FRAME__INIT;
    e.kind = AR_FRAME_SYNC;
    e.mb = -1;
    ar_frame g = {.kind = AR_FRAME_SYNC, .mb = -1};
    cr_assert_eq(ar_frame_wire_bytes(&g), arceus__frame__get_packed_size(&e));
    free(buf);
}

/* A link's counters: every frame both ways, as the messages' sizes. */
Test(net, links_count_the_bytes_they_move)
{
    char addr[64];
    ar_server *s = start_echo(addr, sizeof addr);
    ar_client *c;
    cr_assert_eq(ar_client_open(addr, &c), AR_OK);
    ar_link *l;
    cr_assert_eq(ar_client_pipe(c, "echo server", SERVER_MAX_FRAME, &l), AR_OK);
    size_t want = 0;
    for (int i = 0; i < 4; i++) {
        ar_frame f = {.kind = AR_FRAME_TP, .step = i, .rows = 2};
        f.scalars[0] = 3;
        int64_t shape[1] = {1000 * i};
        float *x = calloc(1000 * (size_t)i + 1, sizeof(float));
        cr_assert_not_null(x);
        cr_assert_eq(ar_frame_set_payload(&f, AR_DT_F32, i ? 1 : 0, shape, x), AR_OK);
        free(x);
        want += ar_frame_wire_bytes(&f);
        cr_assert_eq(ar_link_send(l, &f), AR_OK);
    }
    for (int i = 0; i < 4; i++) {
        ar_frame g;
        cr_assert_eq(ar_link_recv(l, &g, 30), AR_OK, "%s", ar_last_error());
        ar_frame_free(&g);
    }
    cr_assert_eq(l->bytes_sent, want);
    cr_assert_eq(l->bytes_received, want, "the echo comes back the same size");
    cr_assert_gt(want, 4 * 6000);
    ar_link_destroy(l);
    ar_client_close(c);
    ar_server_destroy(s);
}

/* ---- the worker --------------------------------------------------------- */

static const char *MLP = "{\"type\": \"mlp\", \"inputs\": 8, \"hidden\": [6], \"classes\": 3, "
                         "\"activation\": \"relu\", \"dropout\": 0.0}";

Test(net, worker_control_rpcs)
{
    ar_worker_config wc = {.listen = "127.0.0.1:0", .threads = 1};
    ar_worker *w;
    char addr[200];
    cr_assert_eq(ar_worker_start(&wc, &w, addr, sizeof addr), AR_OK, "%s", ar_last_error());
    ar_client *c;
    cr_assert_eq(ar_client_open(addr, &c), AR_OK);
    ar_hello_info h;
    cr_assert_eq(ar_remote_hello(c, &h), AR_OK, "%s", ar_last_error());
    cr_assert_eq(h.protocol_version, AR_PROTOCOL_VERSION);
    cr_assert_str_eq(h.worker, addr);
    cr_assert(strstr(h.capabilities, "pipeline"));
    cr_assert(h.gflops > 0);
    cr_assert(h.free_memory > 0);
    cr_assert_eq(h.threads, 1);

    char session[AR_SESSION_HEX + 1];
    /* Pipe before Load */
    ar_link *l;
    cr_assert_eq(ar_client_pipe(c, "stage 0", 0, &l), AR_OK);
    ar_frame f;
    cr_assert_neq(ar_link_recv(l, &f, 30), AR_OK);
    cr_assert_eq(ar_net_link_status(l), AR_STATUS_FAILED_PRECONDITION);
    cr_assert(strstr(ar_last_error(), "stage not loaded"), "%s", ar_last_error());
    ar_link_destroy(l);

    /* a bad Load: units out of range, and an invalid spec */
    ar_model_spec spec;
    cr_assert_eq(ar_spec_parse(MLP, strlen(MLP), "test", &spec), AR_OK);
    ar_load_args a = {.spec = &spec, .first = 0, .last = 5, .rows = 4, .micro_batches = 2,
                      .schedule = 1, .index = 0, .count = 1, .seed = 1,
                      .optim = {.kind = 0, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f}};
    cr_assert_neq(ar_remote_load(c, &a, NULL, session), AR_OK);
    cr_assert(strstr(ar_last_error(), "out of range"), "%s", ar_last_error());
    ar_model_spec broken = spec;
    broken.classes = 0;
    a.spec = &broken;
    a.last = 2;
    cr_assert_neq(ar_remote_load(c, &a, NULL, session), AR_OK);

    /* Load, Save, change, Restore */
    a.spec = &spec;
    uint64_t held = 0;
    cr_assert_eq(ar_remote_load(c, &a, &held, session), AR_OK, "%s", ar_last_error());
    ar_stage sh;
    cr_assert_eq(ar_stage_create(&sh, &spec, 0, 2, 1, 1, 1, &a.optim), AR_OK);
    ar_stage ref;
    cr_assert_eq(ar_stage_create(&ref, &spec, 0, 2, 1, 1, 1, &a.optim), AR_OK);
    cr_assert_eq(held, (uint64_t)sh.param_floats);
    memset(sh.mem_params, 0, sizeof(float) * (size_t)sh.param_floats);
    ar_state_parts shp = {.stage = &sh}, refp = {.stage = &ref};
    cr_assert_eq(ar_remote_save(c, session, &shp), AR_OK, "%s", ar_last_error());
    cr_assert(memcmp(sh.mem_params, ref.mem_params, sizeof(float) * (size_t)sh.param_floats) == 0);
    for (long i = 0; i < sh.param_floats; i++) {
        sh.mem_params[i] = (float)i;
        sh.mem_m[i] = 0.5f;
        sh.mem_v[i] = 0.25f;
    }
    sh.opt_step = 42;
    cr_assert_eq(ar_remote_restore(c, session, &shp), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_remote_save(c, session, &refp), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ref.opt_step, 42);
    cr_assert(memcmp(sh.mem_params, ref.mem_params, sizeof(float) * (size_t)sh.param_floats) == 0);
    cr_assert(memcmp(sh.mem_v, ref.mem_v, sizeof(float) * (size_t)sh.param_floats) == 0);

    /* another session (or none) can neither read nor write the stage, and a
     * new Load ends the old session */
    char other[AR_SESSION_HEX + 1];
    memcpy(other, session, sizeof other);
    other[0] = other[0] == 'a' ? 'b' : 'a';
    cr_assert_neq(ar_remote_save(c, other, &refp), AR_OK);
    cr_assert(strstr(ar_last_error(), "not the session"), "%s", ar_last_error());
    cr_assert_neq(ar_remote_restore(c, "", &refp), AR_OK);
    cr_assert(strstr(ar_last_error(), "carries no session"), "%s", ar_last_error());
    char old[AR_SESSION_HEX + 1];
    memcpy(old, session, sizeof old);
    cr_assert_eq(ar_remote_load(c, &a, NULL, session), AR_OK, "%s", ar_last_error());
    cr_assert_str_neq(old, session);
    cr_assert_neq(ar_remote_save(c, old, &refp), AR_OK);
    cr_assert_eq(ar_remote_save(c, session, &refp), AR_OK, "%s", ar_last_error());
    ar_stage_destroy(&sh);
    ar_stage_destroy(&ref);

    ar_client_close(c);
    ar_worker_stop(w);
}

static int ignore_msg(void *user, const void *data, size_t len)
{
    (void)user;
    (void)data;
    (void)len;
    return AR_OK;
}

/* The Audit RPC: only the Load's session reads a stage's kept steps, only
 * when the Load asked for digests, only its last three steps; the request is
 * bounded, and so is what the driver accepts back. */
Test(net, worker_audit_rpc)
{
    ar_worker_config wc = {.listen = "127.0.0.1:0", .threads = 1};
    ar_worker *w;
    char addr[200];
    cr_assert_eq(ar_worker_start(&wc, &w, addr, sizeof addr), AR_OK, "%s", ar_last_error());
    ar_client *c;
    cr_assert_eq(ar_client_open(addr, &c), AR_OK);
    ar_model_spec spec;
    cr_assert_eq(ar_spec_parse(MLP, strlen(MLP), "test", &spec), AR_OK);
    ar_load_args a = {.spec = &spec, .first = 0, .last = 2, .rows = 4, .micro_batches = 2, .schedule = 1,
                      .index = 0, .count = 1, .seed = 1,
                      .optim = {.kind = 0, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f}};
    ar_stage ref;
    cr_assert_eq(ar_stage_create(&ref, &spec, 0, 2, 4, 1, 1, &a.optim), AR_OK);
    long pf = ref.param_floats;
    size_t plenty = (size_t)64 << 20;
    ar_audit_material m;
    char session[AR_SESSION_HEX + 1];

    /* before any Load */
    cr_assert_neq(ar_remote_audit(c, "", 0, plenty, pf, 2, 4, &m), AR_OK);
    cr_assert(strstr(ar_last_error(), "stage not loaded"), "%s", ar_last_error());
    /* a Load that asked for no digests keeps nothing */
    cr_assert_eq(ar_remote_load(c, &a, NULL, session), AR_OK, "%s", ar_last_error());
    cr_assert_neq(ar_remote_audit(c, session, 0, plenty, pf, 2, 4, &m), AR_OK);
    cr_assert(strstr(ar_last_error(), "keeps no steps"), "%s", ar_last_error());

    /* with digests: two steps through a Pipe */
    a.commit_digests = 1;
    cr_assert_eq(ar_remote_load(c, &a, NULL, session), AR_OK, "%s", ar_last_error());
    ar_link *l;
    cr_assert_eq(ar_client_pipe_session(c, "stage 0", 0, session, &l), AR_OK, "%s", ar_last_error());
    float x[8 * 8];
    int32_t y[8];
    for (int i = 0; i < 64; i++)
        x[i] = (float)((i * 7) % 11) / 11.0f - 0.5f;
    for (int i = 0; i < 8; i++)
        y[i] = i % 3;
    for (int64_t step = 0; step < 2; step++) {
        ar_batch_desc b = {.step = step, .M = 2, .B = 8, .dtype = AR_DT_F32, .inputs = x, .row_elems = 8,
                           .targets = y, .row_targets = 1};
        ar_step_result res;
        cr_assert_eq(ar_chain_send_step(l, &b, 1, 1e-2f, 1.0f), AR_OK, "%s", ar_last_error());
        cr_assert_eq(ar_chain_recv_step(l, &b, 30, &res), AR_OK, "%s", ar_last_error());
        cr_assert(res.has_digests[0]);
    }
    cr_assert_eq(ar_chain_sync(l, 30), AR_OK, "%s", ar_last_error());

    /* the right session gets step 0's material: the state before it (the
     * Load's initial weights, as ref has them) and its two micro-batches */
    cr_assert_eq(ar_remote_audit(c, session, 0, plenty, pf, 2, 4, &m), AR_OK, "%s", ar_last_error());
    cr_assert_eq(m.step, 0);
    cr_assert_eq(m.M, 2);
    cr_assert(m.has_update);
    cr_assert(memcmp(m.params, ref.mem_params, sizeof(float) * (size_t)pf) == 0);
    cr_assert_eq(m.mb[1].act_bytes, 4 * 8 * sizeof(float));
    ar_audit_material_free(&m);
    /* a step never run is NOT_FOUND */
    cr_assert_neq(ar_remote_audit(c, session, 7, plenty, pf, 2, 4, &m), AR_OK);
    cr_assert(strstr(ar_last_error(), "no longer kept"), "%s", ar_last_error());
    /* another session, or none, reads nothing */
    char other[AR_SESSION_HEX + 1];
    memcpy(other, session, sizeof other);
    other[0] = other[0] == 'a' ? 'b' : 'a';
    cr_assert_neq(ar_remote_audit(c, other, 0, plenty, pf, 2, 4, &m), AR_OK);
    cr_assert(strstr(ar_last_error(), "not the session"), "%s", ar_last_error());
    cr_assert_neq(ar_remote_audit(c, "", 0, plenty, pf, 2, 4, &m), AR_OK);
    cr_assert(strstr(ar_last_error(), "carries no session"), "%s", ar_last_error());
    /* the driver takes no more than it expects, and only the stage it expects */
    cr_assert_neq(ar_remote_audit(c, session, 0, 512, pf, 2, 4, &m), AR_OK);
    cr_assert(strstr(ar_last_error(), "more than the 512 bytes expected"), "%s", ar_last_error());
    cr_assert_neq(ar_remote_audit(c, session, 0, plenty, pf + 1, 2, 4, &m), AR_OK);
    cr_assert(strstr(ar_last_error(), "parameters"), "%s", ar_last_error());
    cr_assert_neq(ar_remote_audit(c, session, 0, plenty, pf, 1, 4, &m), AR_OK);
    cr_assert_neq(ar_remote_audit(c, session, 0, plenty, pf, 2, 3, &m), AR_OK);
    /* a request over 1 KiB is refused as it arrives */
    char big[2048];
    memset(big, 'x', sizeof big);
    cr_assert_neq(ar_client_read_stream(c, "/arceus.Worker/Audit", big, sizeof big, ignore_msg, NULL, 10, NULL), AR_OK);
    cr_assert(strstr(ar_last_error(), "the limit is 1024"), "%s", ar_last_error());
    /* the worker goes on: a new Load empties what it kept */
    cr_assert_eq(ar_remote_load(c, &a, NULL, session), AR_OK, "%s", ar_last_error());
    cr_assert_neq(ar_remote_audit(c, session, 0, plenty, pf, 2, 4, &m), AR_OK);
    cr_assert(strstr(ar_last_error(), "no longer kept"), "%s", ar_last_error());

    ar_link_destroy(l);
    ar_stage_destroy(&ref);
    ar_client_close(c);
    ar_worker_stop(w);
}

static const char *GPT = "{\"type\": \"gpt\", \"vocab_size\": 11, \"block_size\": 4, \"n_layer\": 2, "
                         "\"n_head\": 4, \"n_embd\": 8, \"dropout\": 0.0}";

/* A worker as a tensor-parallel rank: Load with its share, Save and Restore
 * of exactly its slices; Loads whose shares do not fit are refused. */
Test(net, worker_as_a_tensor_parallel_rank)
{
    ar_worker_config wc = {.listen = "127.0.0.1:0", .threads = 1};
    ar_worker *w;
    char addr[200];
    cr_assert_eq(ar_worker_start(&wc, &w, addr, sizeof addr), AR_OK, "%s", ar_last_error());
    ar_client *c;
    cr_assert_eq(ar_client_open(addr, &c), AR_OK);
    ar_hello_info h;
    cr_assert_eq(ar_remote_hello(c, &h), AR_OK, "%s", ar_last_error());
    cr_assert(strstr(h.capabilities, "tensor-parallel"), "%s", h.capabilities);
    ar_model_spec spec;
    cr_assert_eq(ar_spec_parse(GPT, strlen(GPT), "test", &spec), AR_OK, "%s", ar_last_error());
    /* units 0-2: the embedding and both blocks; this rank (member 1):
     * heads 1-2, hidden units 8-19 of both blocks */
    static ar_tp_layout lay;
    lay = (ar_tp_layout){.first = 0, .count = 2, .members = 2};
    lay.heads[1] = (ar_range){1, 3};
    lay.hidden[1][0] = lay.hidden[1][1] = (ar_range){8, 20};
    char session[AR_SESSION_HEX + 1];
    ar_load_args a = {.spec = &spec, .first = 0, .last = 3, .rows = 2, .micro_batches = 2,
                      .schedule = 1, .index = 0, .count = 2, .seed = 7, .role = AR_LOAD_RANK,
                      .layout = &lay, .member = 1,
                      .optim = {.kind = 0, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f}};
    uint64_t held = 0;
    cr_assert_eq(ar_remote_load(c, &a, &held, session), AR_OK, "%s", ar_last_error());
    ar_tp_rank shadow, ref;
    ar_range heads[2] = {{1, 3}, {1, 3}}, hidden[2] = {{8, 20}, {8, 20}};
    cr_assert_eq(ar_tp_rank_create(&shadow, &spec, 0, 2, heads, hidden, 1, 1, 7, &a.optim), AR_OK);
    cr_assert_eq(ar_tp_rank_create(&ref, &spec, 0, 2, heads, hidden, 1, 1, 7, &a.optim), AR_OK);
    cr_assert_eq(held, (uint64_t)shadow.param_floats, "held %llu", (unsigned long long)held);
    /* 2 blocks x (2 heads x 2 wide x (3*8 + 3 + 8) + 12 units x (2*8 + 1)) */
    cr_assert_eq(shadow.param_floats, 2 * (2 * 2 * 35 + 12 * 17));
    memset(shadow.mem_params, 0, sizeof(float) * (size_t)shadow.param_floats);
    ar_state_parts sp = {.rank = &shadow}, rp = {.rank = &ref};
    cr_assert_eq(ar_remote_save(c, session, &sp), AR_OK, "%s", ar_last_error());
    cr_assert(memcmp(shadow.mem_params, ref.mem_params, sizeof(float) * (size_t)ref.param_floats) == 0,
              "a rank starts from the slices of the whole model's initial weights");
    for (long i = 0; i < shadow.param_floats; i++) {
        shadow.mem_params[i] = (float)i;
        shadow.mem_m[i] = 0.5f;
    }
    shadow.opt_step = 9;
    cr_assert_eq(ar_remote_restore(c, session, &sp), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_remote_save(c, session, &rp), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ref.opt_step, 9);
    cr_assert(memcmp(shadow.mem_params, ref.mem_params, sizeof(float) * (size_t)ref.param_floats) == 0);
    cr_assert(memcmp(shadow.mem_m, ref.mem_m, sizeof(float) * (size_t)ref.param_floats) == 0);
    /* a stage's state does not fit a rank */
    ar_stage st;
    cr_assert_eq(ar_stage_create(&st, &spec, 0, 3, 1, 1, 7, &a.optim), AR_OK);
    ar_state_parts stp = {.stage = &st};
    cr_assert_neq(ar_remote_restore(c, session, &stp), AR_OK);
    cr_assert(strstr(ar_last_error(), "missing or of the wrong"), "%s", ar_last_error());
    ar_stage_destroy(&st);
    ar_tp_rank_destroy(&shadow);
    ar_tp_rank_destroy(&ref);

    /* shares that do not fit the model, or a group that does not tile it */
    lay.heads[1] = (ar_range){3, 5};
    cr_assert_neq(ar_remote_load(c, &a, NULL, session), AR_OK);
    cr_assert(strstr(ar_last_error(), "do not fit a model of 4 heads"), "%s", ar_last_error());
    a.role = AR_LOAD_LEADER;
    a.next_worker = "127.0.0.1:1";
    lay.heads[0] = (ar_range){0, 2};
    lay.heads[1] = (ar_range){3, 4};
    lay.hidden[0][0] = lay.hidden[0][1] = (ar_range){0, 16};
    lay.hidden[1][0] = lay.hidden[1][1] = (ar_range){16, 32};
    a.addresses[1] = "127.0.0.1:2";
    cr_assert_neq(ar_remote_load(c, &a, NULL, session), AR_OK);
    cr_assert(strstr(ar_last_error(), "does not continue"), "%s", ar_last_error());
    lay.heads[1] = (ar_range){2, 4};
    lay.hidden[1][1] = (ar_range){16, 30};
    cr_assert_neq(ar_remote_load(c, &a, NULL, session), AR_OK);
    cr_assert(strstr(ar_last_error(), "do not cover"), "%s", ar_last_error());
    lay.hidden[1][1] = (ar_range){16, 32};
    a.addresses[1] = NULL;
    cr_assert_neq(ar_remote_load(c, &a, NULL, session), AR_OK);
    cr_assert(strstr(ar_last_error(), "needs its worker's address"), "%s", ar_last_error());
    /* units without a block to split */
    a.role = AR_LOAD_RANK;
    a.next_worker = NULL;
    a.first = 0;
    a.last = 1;
    cr_assert_neq(ar_remote_load(c, &a, NULL, session), AR_OK);
    cr_assert(strstr(ar_last_error(), "no transformer block"), "%s", ar_last_error());

    ar_client_close(c);
    ar_worker_stop(w);
}

/* Frames queued faster than they are sent travel coalesced, several to a
 * gRPC message: each still arrives whole, in order, bitwise. */
Test(net, a_burst_of_frames_arrives_whole_and_in_order)
{
    char addr[64];
    ar_server *s = start_echo(addr, sizeof addr);
    ar_client *c;
    cr_assert_eq(ar_client_open(addr, &c), AR_OK);
    ar_link *l;
    cr_assert_eq(ar_client_pipe(c, "echo server", SERVER_MAX_FRAME, &l), AR_OK);
    enum { N = 300 };
    for (int i = 0; i < N; i++) {
        size_t n = (size_t)(i % 7) * 37 * 1024 + (size_t)(i % 3); /* 0 .. ~220 KiB, odd sizes too */
        unsigned char *p = malloc(n ? n : 1);
        cr_assert(p);
        fill(p, n, (unsigned)i);
        ar_frame f = {.kind = AR_FRAME_ACT, .step = i, .mb = i % 8, .nmb = 8, .rows = 1};
        int64_t shape = (int64_t)n;
        if (n)
            cr_assert_eq(ar_frame_set_payload(&f, AR_DT_U8, 1, &shape, p), AR_OK);
        int32_t t = i;
        cr_assert_eq(ar_frame_set_targets(&f, &t, 1), AR_OK);
        cr_assert_eq(ar_link_send(l, &f), AR_OK, "%s", ar_last_error());
        free(p);
    }
    for (int i = 0; i < N; i++) {
        size_t n = (size_t)(i % 7) * 37 * 1024 + (size_t)(i % 3);
        ar_frame g;
        cr_assert_eq(ar_link_recv(l, &g, 60), AR_OK, "%s", ar_last_error());
        cr_assert_eq(g.step, i, "frame %d arrived as %lld", i, (long long)g.step);
        cr_assert_eq(g.nbytes, n);
        cr_assert_eq(g.ntargets, 1);
        cr_assert_eq(g.targets[0], i);
        unsigned char *want = malloc(n ? n : 1);
        fill(want, n, (unsigned)i);
        cr_assert(n == 0 || memcmp(g.data, want, n) == 0, "payload of frame %d differs", i);
        free(want);
        ar_frame_free(&g);
    }
    cr_assert_eq(ar_net_link_finish(l, 30), AR_OK, "%s", ar_last_error());
    ar_link_destroy(l);
    ar_client_close(c);
    ar_server_destroy(s);
}

/* ---- deadlines and peer hosts ------------------------------------------- */

#include "net/net_internal.h"

#include <unistd.h>

Test(net, peer_hosts_drop_the_port_and_count_ipv6_by_64)
{
    char h[128];
    net_peer_host("ipv4:127.0.0.1:5432", h, sizeof h);
    cr_assert_str_eq(h, "ipv4:127.0.0.1");
    net_peer_host("ipv6:[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:5", h, sizeof h);
    cr_assert_str_eq(h, "ipv6:2001:db8:1:2::/64");
    net_peer_host("ipv6:%5B2001:db8:1:2::9%5D:5", h, sizeof h);
    cr_assert_str_eq(h, "ipv6:2001:db8:1:2::/64");
    net_peer_host("ipv6:[2001:db8:1:3::9]:5", h, sizeof h);
    cr_assert_str_eq(h, "ipv6:2001:db8:1:3::/64");
    net_peer_host("ipv6:[::ffff:10.1.2.3]:80", h, sizeof h);
    cr_assert_str_eq(h, "ipv4:10.1.2.3");
    net_peer_host("ipv6:[fe80::1%25eth0]:80", h, sizeof h);
    cr_assert_str_eq(h, "ipv6:fe80::/64");
    net_peer_host("unix:/tmp/sock", h, sizeof h);
    cr_assert_str_eq(h, "unix:/tmp/sock");
}

/* Reads the request, then every further message, and replies with the count. */
static void count_messages(ar_rpc *rpc, void *user)
{
    (void)user;
    int n = 0;
    void *data;
    size_t len;
    int rc;
    while ((rc = ar_rpc_read(rpc, &data, &len)) == AR_OK) {
        free(data);
        n++;
    }
    if (rc != AR_ECLOSED)
        return ar_rpc_finish(rpc, AR_STATUS_CANCELLED, "%s", ar_last_error());
    unsigned char reply = (unsigned char)n;
    if (ar_rpc_write(rpc, &reply, 1) == AR_OK)
        ar_rpc_finish(rpc, AR_STATUS_OK, NULL);
}

typedef struct {
    int sent, before_first_s, between_s, count;
} slow_feed;

/* Sleeps before_first_s before the first message and between_s before the others. */
static int slow_next(void *user, const void **data, size_t *len)
{
    slow_feed *f = user;
    if (f->sent >= f->count)
        return 1;
    sleep((unsigned)(f->sent == 0 ? f->before_first_s : f->between_s));
    static const char msg[] = "m";
    *data = msg;
    *len = 1;
    f->sent++;
    return 0;
}

Test(net, a_request_or_a_stream_that_stalls_is_cancelled)
{
    ar_server_limits lim = {.request_timeout_s = 1, .idle_timeout_s = 1, .write_timeout_s = 1};
    ar_server *s;
    int port = 0;
    cr_assert_eq(ar_server_create("127.0.0.1:0", &lim, &s, &port), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_server_handle(s, "/arceus.Worker/Restore", count_messages, NULL), AR_OK);
    cr_assert_eq(ar_server_start(s), AR_OK);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    ar_client *c;
    cr_assert_eq(ar_client_open(addr, &c), AR_OK);
    void *rep = NULL;
    size_t rlen = 0;
    int status = -1;

    /* prompt messages are served */
    slow_feed ok = {.count = 3};
    cr_assert_eq(ar_client_write_stream(c, "/arceus.Worker/Restore", slow_next, &ok, &rep, &rlen, 30, &status),
                 AR_OK, "%s", ar_last_error());
    cr_assert_eq(rlen, 1);
    cr_assert_eq(((unsigned char *)rep)[0], 3);
    free(rep);

    /* no request within the deadline */
    slow_feed late = {.count = 1, .before_first_s = 3};
    cr_assert_neq(ar_client_write_stream(c, "/arceus.Worker/Restore", slow_next, &late, &rep, &rlen, 30, &status),
                  AR_OK);
    free(rep);
    cr_assert_eq(status, AR_STATUS_DEADLINE_EXCEEDED, "status %d: %s", status, ar_last_error());
    cr_assert(strstr(ar_last_error(), "no request within 1 s"), "%s", ar_last_error());

    /* a stream that goes quiet after its first message */
    slow_feed quiet = {.count = 2, .between_s = 3};
    cr_assert_neq(ar_client_write_stream(c, "/arceus.Worker/Restore", slow_next, &quiet, &rep, &rlen, 30, &status),
                  AR_OK);
    free(rep);
    cr_assert_eq(status, AR_STATUS_DEADLINE_EXCEEDED, "status %d: %s", status, ar_last_error());
    cr_assert(strstr(ar_last_error(), "no message from the client within 1 s"), "%s", ar_last_error());

    /* and the server goes on */
    slow_feed again = {.count = 1};
    cr_assert_eq(ar_client_write_stream(c, "/arceus.Worker/Restore", slow_next, &again, &rep, &rlen, 30, &status),
                 AR_OK, "%s", ar_last_error());
    free(rep);
    ar_client_close(c);
    ar_server_destroy(s);
}

/* ---- exiting while another thread is inside OpenSSL ---------------------- */

#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>

/* CI once failed on a provider that exited on SIGTERM while a thread was
 * still in OpenSSL: the atexit teardown raced it (LeakSanitizer reported
 * libcrypto's state; without a sanitizer it hangs or crashes). After
 * ar_net_process_init a process exits cleanly however busy its threads are:
 * helper_exit_race (built next to this test) is such a process. */
Test(net, a_process_exits_cleanly_while_threads_use_openssl, .timeout = 90)
{
    char self[PATH_MAX] = {0}, helper[PATH_MAX + 32];
    cr_assert(readlink("/proc/self/exe", self, sizeof self - 1) > 0);
    snprintf(helper, sizeof helper, "%s/helper_exit_race", dirname(self));
    cr_assert_eq(access(helper, X_OK), 0, "%s is not built", helper);
    for (int round = 0; round < 5; round++) {
        pid_t child = fork();
        cr_assert(child >= 0);
        if (child == 0) {
            execl(helper, helper, (char *)NULL);
            _exit(127);
        }
        int status = 0;
        pid_t done = 0;
        for (int waited_ms = 0; waited_ms < 15000 && done == 0; waited_ms += 10) {
            done = waitpid(child, &status, WNOHANG);
            if (done == 0) {
                struct timespec tick = {0, 10 * 1000 * 1000};
                nanosleep(&tick, NULL);
            }
        }
        if (done == 0) {
            kill(child, SIGKILL);
            waitpid(child, &status, 0);
            cr_assert_fail("round %d: the process hung at exit", round);
        }
        cr_assert(WIFEXITED(status), "round %d: the process died from signal %d at exit", round,
                  WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        cr_assert_eq(WEXITSTATUS(status), 0, "round %d: exit status %d", round, WEXITSTATUS(status));
    }
}
