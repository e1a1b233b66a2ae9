/* Shared by the files of src/net: the event loop and its tags. */
#ifndef AR_NET_INTERNAL_H
#define AR_NET_INTERNAL_H

#include "net/net.h"

#include <grpc/grpc.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <protobuf-c/protobuf-c.h>
#include <pthread.h>

/* Every batch started on a call carries a tag; the event loop calls its cb
 * with the batch's success. */
typedef struct net_tag {
    void (*cb)(struct net_tag *t, int ok);
} net_tag;

/* A tag another thread waits on. */
typedef struct {
    net_tag base;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done, ok;
} net_waiter;

extern grpc_completion_queue *ar_net_cq;
/* 1 once the process's last user of the network has begun shutting the
 * queue down: a callback must not start another batch on it then (gRPC
 * aborts on a batch begun on a queue being shut down). */
int net_loop_closing(void);

void net_waiter_init(net_waiter *w);
void net_waiter_destroy(net_waiter *w);
/* Wait for completion; after timeout_s (< 0: forever) cancel the call and
 * keep waiting (the batch always completes after a cancel). Returns ok. */
int net_waiter_wait(net_waiter *w, grpc_call *call, double timeout_s);
/* Start a batch and wait for it. Returns 1 when it succeeded. */
int net_batch(grpc_call *call, const grpc_op *ops, size_t n, double timeout_s);

/* Channel arguments of a client (no message size limit) and of a server
 * (requests up to max_message bytes, 0: no limit; what its connections may
 * hold at once bounded by quota when not NULL), which fills args (room for
 * NET_NARGS + 1) and ca. */
#define NET_NARGS 8
const grpc_channel_args *net_channel_args(void);
void net_server_args(size_t max_message, grpc_resource_quota *quota, grpc_arg *args, grpc_channel_args *ca);
gpr_timespec net_deadline(double timeout_s);

/* TLS (tls.c): the credentials for a new server or channel, TLS when the
 * process was configured with ar_net_tls_server / ar_net_tls_client. */
#include <grpc/grpc_security.h>
grpc_server_credentials *net_server_credentials(void);
grpc_channel_credentials *net_channel_credentials(void);
int net_tls_server_on(void);
int net_tls_client_on(void);

/* One byte buffer -> one malloc'd contiguous copy. */
int net_buffer_flatten(grpc_byte_buffer *bb, void **data, size_t *len);

/* Links (link.c). */
#define NET_MAX_COALESCED 256 /* frames coalesced into one message, at most */
/* What a link does with a message it receives: decode every frame (the first
 * and those coalesced into it) and validate each against max_frame. fs and
 * payload_at have room for 1 + NET_MAX_COALESCED entries. The payloads stay in
 * bb (f->data NULL, payload_at[k] their offset) until net_payload_copy. On
 * failure nothing is left to free. Exposed for fuzz/fuzz_frame.c. */
int net_frames_receive(grpc_byte_buffer *bb, size_t max_frame, ar_frame *fs, size_t *payload_at,
                       int *count);
/* The session a Pipe's first message carries (Frame.session, field 16, at
 * the top level): 1 and buf filled ("" when longer than size - 1), or 0 when
 * absent or the message is malformed before it. Exposed for fuzz/fuzz_session.c. */
int net_frames_session(grpc_byte_buffer *bb, char *buf, size_t size);
/* Copy n bytes at offset `at` of a raw byte buffer into a new buffer. */
int net_payload_copy(grpc_byte_buffer *bb, size_t at, size_t n, void **out);
/* have_first: the first message was read already (first; NULL when the
 * stream ended without one), before the handler made the link: the link
 * takes it as its first (and owns it). */
ar_link *net_link_new(grpc_call *call, int is_server, const char *name, size_t max_frame,
                      struct ar_rpc *rpc, grpc_byte_buffer *first, int have_first);
/* Server side: the status to send when the stream ends badly. 1 when this
 * started the status batch (0: a status was sent already, or gRPC refused). */
int net_rpc_send_status_async(struct ar_rpc *rpc, int code, const char *msg);
/* Server end: wait until the queued frames are written (up to timeout_s). */
void net_link_drain(ar_link *l, double timeout_s);
void net_link_release(ar_link *l);
/* Client end, before anything is sent: the first frame carries session. */
void net_link_set_session(ar_link *l, const char *session);
/* Server end: wait up to timeout_s (< 0: forever) for the first message and
 * give its session. AR_EPROTO when it carries none; AR_ECLOSED when the
 * stream ended or failed first (a malformed message: the link has already
 * answered INVALID_ARGUMENT) or nothing came in time. */
int net_link_first_session(ar_link *l, char *buf, size_t size, double timeout_s);

/* Server side: a link's traffic, so that the server can tell an idle or
 * stuck stream (ar_server_stream_method). Lock-free: called from the event
 * loop with the link's mutex held. */
enum { NET_RPC_RECEIVED, NET_RPC_SEND_BEGIN, NET_RPC_SEND_END };
void net_rpc_note(struct ar_rpc *rpc, int what);
/* The host a gRPC peer string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5", with the
 * brackets as is or %-encoded) counts as: its address without the port, an
 * IPv6 address's /64 ("ipv6:2001:db8:1:2::/64"), an IPv4-mapped IPv6 address
 * as the IPv4 one; anything else as given. Exposed for tests. */
void net_peer_host(const char *peer, char *host, size_t size);

/* Pack a protobuf-c message, send it as the reply and finish with OK (or
 * INTERNAL when out of memory). */
void net_rpc_reply(ar_rpc *rpc, const ProtobufCMessage *m);
/* Read and unpack the one request of a unary call (d: its message type;
 * max_bytes > 0: refuse a longer one); NULL, with the status sent, when there
 * is none, it is too long or it does not parse. */
ProtobufCMessage *net_rpc_read_request(ar_rpc *rpc, const ProtobufCMessageDescriptor *d, size_t max_bytes);

/* The worker's checks of a Load (worker.c), before anything is allocated;
 * fills spec and *slots. AR_OK, AR_ELIMIT when the stage would need more than
 * max_mem bytes (0: not checked), AR_EINVAL (the message says why) for the
 * rest. Exposed for fuzz/fuzz_load.c. */
#include "arceus.pb-c.h"
#include "nn/spec.h"
int net_load_check(const Arceus__LoadRequest *req, uint64_t max_mem, ar_model_spec *spec, int *slots);
/* Whether `given` is the session `expected` (AR_SESSION_HEX characters; ""
 * when there is none: nothing matches then), in time that does not depend
 * on where they differ. Exposed for fuzz/fuzz_session.c. */
int net_session_matches(const char *expected, const char *given);

#endif
