/* The network layer (docs/DESIGN.md, "The chain protocol"): gRPC between processes. Every gRPC call
 * of the code base lives under src/net; the rest sees links (train/frame.h),
 * plain C structs and these functions. */
#ifndef AR_NET_H
#define AR_NET_H

#include "train/frame.h"

#include <stddef.h>
#include <stdint.h>

/* 2: tensor-parallel Load roles and shares, group traffic in NORM records;
 * 3: sessions (LoadReply.session, required by Save, Restore and Pipe);
 * 4: a stage's flags in its NORM record (its device leaving);
 * 5: slow links: PROBE frames, compressed tensors (bf16, int8 with a scale
 *    per block), link traffic in NORM records, Load's extra warm-up and
 *    compression
 * 6: digest words in NORM records (the stage record grew a field),
 *    LoadRequest.commit_digests, the Audit RPC */
#define AR_PROTOCOL_VERSION 6
#define AR_NET_DEFAULT_MAX_FRAME ((size_t)1 << 30)
#define AR_NET_CHUNK_BYTES ((size_t)1 << 20) /* Save/Restore chunks */
/* A stage's session secret (LoadReply.session): 32 random bytes, hex */
#define AR_SESSION_BYTES 32
#define AR_SESSION_HEX (2 * AR_SESSION_BYTES)

/* gRPC status codes (the same numbers as grpc_status_code). */
enum {
    AR_STATUS_OK = 0,
    AR_STATUS_CANCELLED = 1,
    AR_STATUS_UNKNOWN = 2,
    AR_STATUS_INVALID_ARGUMENT = 3,
    AR_STATUS_DEADLINE_EXCEEDED = 4,
    AR_STATUS_NOT_FOUND = 5,
    AR_STATUS_RESOURCE_EXHAUSTED = 8,
    AR_STATUS_FAILED_PRECONDITION = 9,
    AR_STATUS_ABORTED = 10,
    AR_STATUS_UNIMPLEMENTED = 12,
    AR_STATUS_INTERNAL = 13,
    AR_STATUS_UNAVAILABLE = 14
};

/* Call first thing in main, before any thread starts. OpenSSL (sessions,
 * token digests, TLS) frees its global state in an atexit handler by default;
 * a process that exits while another thread is still inside OpenSSL (a relay
 * dial, a handler finishing) then races that teardown, which hangs, crashes or
 * leaves memory the leak checker reports. This asks OpenSSL to leave its state
 * alone at exit: the process's memory goes back to the system anyway. */
int ar_net_process_init(void);

/* Reference counted: the first call starts gRPC and the event-loop thread
 * that serves every call of the process; the last stops them. */
int ar_net_init(void);
void ar_net_shutdown(void);

/* TLS, process-wide: set before any server or channel is created. Servers
 * created afterwards present this certificate and key (PEM files); channels
 * verify servers against this CA (a PEM file) and check that the server's
 * certificate covers the host name or IP address dialled. Without a CA a
 * process dials in plaintext, which a TLS server refuses. The files are read
 * and checked here: missing, unreadable or non-PEM files fail with a clear
 * error. ar_net_tls_reset forgets both (tests). */
int ar_net_tls_server(const char *cert_pem_path, const char *key_pem_path);
int ar_net_tls_client(const char *ca_pem_path);
void ar_net_tls_reset(void);

/* ---- client side -------------------------------------------------------- */

typedef struct ar_client ar_client; /* a channel to one worker */

int ar_client_open(const char *addr, ar_client **out);
/* A channel to the worker at addr through the relay at `relay` (net/relay.h):
 * gRPC opens an HTTP CONNECT tunnel there with `pass`, and runs HTTP/2 (and
 * TLS, checked against addr as usual) inside it. The channel reconnects
 * through the relay as any channel does. */
int ar_client_open_relayed(const char *addr, const char *relay, const char *pass, ar_client **out);
void ar_client_close(ar_client *c);
const char *ar_client_addr(const ar_client *c);

/* Unary call: request bytes in, reply bytes out (malloc'd, free()). A non-OK
 * status gives AR_EPROTO (or AR_ECLOSED when the worker is unreachable) with
 * the status message in ar_last_error() and the code in *status. */
int ar_client_unary(ar_client *c, const char *method, const void *req, size_t len, void **reply,
                    size_t *reply_len, double timeout_s, int *status);
/* Server-streaming call: on_msg is called for every reply message. */
int ar_client_read_stream(ar_client *c, const char *method, const void *req, size_t len,
                          int (*on_msg)(void *user, const void *data, size_t len), void *user,
                          double timeout_s, int *status);
/* Client-streaming call: next fills the next message (returns 0 and *len,
 * or 1 at the end; data stays valid until the next call). */
int ar_client_write_stream(ar_client *c, const char *method,
                           int (*next)(void *user, const void **data, size_t *len), void *user,
                           void **reply, size_t *reply_len, double timeout_s, int *status);

/* A Pipe stream to the worker, as a link. Frames sent are queued and written
 * in the background (a link never blocks on its peer); frames received are
 * decoded and validated (max_frame bytes) as they arrive. */
int ar_client_pipe(ar_client *c, const char *name, size_t max_frame, ar_link **out);
/* The same to a worker's stage: the first frame sent carries the stage's
 * session (its LoadReply.session; NULL or "": none). */
int ar_client_pipe_session(ar_client *c, const char *name, size_t max_frame, const char *session,
                           ar_link **out);

/* ---- links over gRPC ---------------------------------------------------- */

/* Client end: half-close after every queued frame is written, then wait up to
 * timeout_s for the worker's status. AR_OK when the status is OK. */
int ar_net_link_finish(ar_link *l, double timeout_s);
/* The gRPC status of the stream once it ended (-1 while it is open). */
int ar_net_link_status(ar_link *l);
/* When this link's peer goes away, close `other` too (a stage whose upstream
 * vanished stops waiting for its downstream). */
void ar_net_link_close_also(ar_link *l, ar_link *other);
/* Whether the stream failed (peer gone, bad frame, error status), and why. */
int ar_net_link_failed(ar_link *l);
void ar_net_link_error(ar_link *l, char *buf, size_t size);

/* ---- server side -------------------------------------------------------- */

typedef struct ar_server ar_server;
typedef struct ar_rpc ar_rpc;
typedef void (*ar_rpc_fn)(ar_rpc *rpc, void *user);

/* What one client may ask of a server (limits NULL or a field 0: the default).
 *
 * A peer host is a client's IP address (an IPv6 client's /64: one machine
 * usually holds a whole /64). A call is first *waiting*: its handler does
 * not run, and it holds no thread, until its first request message has
 * arrived whole (the request deadline); then it *runs* on a thread of its
 * own. A server holds at most AR_SERVER_MAX_WAITING waiting calls (a new
 * one pushes out the oldest) and
 * AR_SERVER_MAX_RUNNING running ones (when full, a host with fewer running
 * calls than the busiest host's takes one of the busiest host's; otherwise
 * the new call is refused), so that many addresses that each hold a few
 * stalled calls cannot lock out one more. Waits inside a handler are bounded
 * too: each later message of a client stream (idle_timeout_s), each message
 * or status to a client that does not read (write_timeout_s). A call over a
 * deadline is cancelled with DEADLINE_EXCEEDED and logged. */
#define AR_SERVER_DEFAULT_CALLS_PER_PEER 64
#define AR_SERVER_DEFAULT_REQUEST_S 5.0
#define AR_SERVER_DEFAULT_IDLE_S 60.0
#define AR_SERVER_DEFAULT_WRITE_S 30.0
#define AR_SERVER_MAX_WAITING 1024
#define AR_SERVER_MAX_RUNNING 512
typedef struct {
    size_t max_message;       /* largest request message in bytes (gRPC refuses larger ones with
                               * RESOURCE_EXHAUSTED once received); 0: no limit */
    int max_calls_per_peer;   /* calls open at once from one peer host (any method); further
                               * ones are refused with RESOURCE_EXHAUSTED */
    double request_timeout_s; /* a call's first request message must arrive within this */
    double idle_timeout_s;    /* a handler waits this long for a client stream's next message */
    double write_timeout_s;   /* ... and this long for a client to take a message or the status */
    size_t max_buffered;      /* bytes gRPC may hold for all of the server's connections at once
                               * (a resource quota; past it, gRPC cancels streams to free memory);
                               * 0: 2 x max_message + 64 MiB (none when max_message is 0) */
} ar_server_limits;

/* Bind addr ("HOST:PORT", port 0 picks one); *port gets the bound port. */
int ar_server_create(const char *addr, const ar_server_limits *limits, ar_server **out, int *port);
/* Register a handler (before ar_server_start). Each running call has a
 * thread of its own (threads are reused); unknown methods get
 * UNIMPLEMENTED. */
int ar_server_handle(ar_server *s, const char *method, ar_rpc_fn fn, void *user);
/* At most max_per_peer calls of this (registered) method open at once from
 * one peer host; further ones are refused with RESOURCE_EXHAUSTED. */
int ar_server_limit_method(ar_server *s, const char *method, int max_per_peer);
/* Requests of this (registered) method larger than max_bytes are refused
 * with RESOURCE_EXHAUSTED by ar_rpc_read, before they are copied or decoded.
 * gRPC itself only knows one limit per server (ar_server_limits.max_message),
 * which must be the largest of these. */
int ar_server_limit_message(ar_server *s, const char *method, size_t max_bytes);
/* A streaming method whose handler runs at once, before any message (a Pipe:
 * the client may have nothing to send for a while), and whose call is
 * cancelled (DEADLINE_EXCEEDED) once no message has passed either way for
 * idle_s, or a message to the client has waited that long to be taken. */
int ar_server_stream_method(ar_server *s, const char *method, double idle_s);
/* This method's first request message may take first_s to arrive instead of
 * the server's request timeout (large messages over slow links). */
int ar_server_request_timeout(ar_server *s, const char *method, double first_s);
int ar_server_start(ar_server *s);
/* Serve gRPC on a connected socket as if the server had accepted it (a
 * provider's data connection, dialled out to a relay); the server owns fd
 * from then on, also on failure. gRPC 1.51 serves an existing socket in
 * plaintext only, so a TLS server splices it to its own listening address
 * instead, where TLS ends as for any client. After ar_server_start. */
int ar_server_adopt(ar_server *s, int fd);
/* Stop accepting, cancel every call, wait for the handlers, free. */
void ar_server_destroy(ar_server *s);

/* Inside a handler. Read one request message (malloc'd); AR_ECLOSED at the
 * end of the client's stream (with *data NULL). */
int ar_rpc_read(ar_rpc *rpc, void **data, size_t *len);
int ar_rpc_write(ar_rpc *rpc, const void *data, size_t len);
/* Send the status (once; later calls do nothing). A handler that returns
 * without finishing gets OK. */
void ar_rpc_finish(ar_rpc *rpc, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* The call's stream as a link (for Pipe). The link belongs to the rpc: do not
 * destroy it; it ends with the call. */
int ar_rpc_link(ar_rpc *rpc, const char *name, size_t max_frame, ar_link **out);
const char *ar_rpc_peer(const ar_rpc *rpc);

/* Failed authentications, per client host: after AR_AUTH_MAX_FAILURES
 * within AR_AUTH_WINDOW_S from one host, its calls that need a secret are
 * refused for AR_AUTH_BLOCK_S. Logged once per burst, not per attempt. */
#define AR_AUTH_MAX_FAILURES 5
#define AR_AUTH_WINDOW_S 10.0
#define AR_AUTH_BLOCK_S 30.0
/* Before checking a secret: 1 when the caller's host is blocked (the call is
 * then finished with RESOURCE_EXHAUSTED), else 0. */
int ar_rpc_auth_refused(ar_rpc *rpc);
/* A secret did not match: count it against the caller's host. The call's
 * own non-OK status is then not logged (the burst is). */
void ar_rpc_auth_failed(ar_rpc *rpc, const char *what);

/* ---- frames on the wire (exposed for tests) ----------------------------- */

/* Decode a serialized arceus.Frame (no validation). */
int ar_net_frame_decode(const void *data, size_t len, ar_frame *f);

#endif
