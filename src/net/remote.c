/* The driver's side of the Worker control RPCs. */
#include "net/remote.h"

#include "arceus.pb-c.h"
#include "core/core.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CONTROL_TIMEOUT_S 60.0

static void *pack(const ProtobufCMessage *m, size_t *len)
{
    *len = protobuf_c_message_get_packed_size(m);
    void *buf = malloc(*len ? *len : 1);
    if (buf)
        protobuf_c_message_pack(m, buf);
    else
        ar_fail(AR_ENOMEM, "out of memory");
    return buf;
}

static int hello_within(ar_client *c, double timeout_s, ar_hello_info *out)
{
    Arceus__HelloRequest req = ARCEUS__HELLO_REQUEST__INIT;
    req.protocol_version = AR_PROTOCOL_VERSION;
    req.client = "arceus train " AR_VERSION_STRING;
    req.token = "";
    size_t len, rlen;
    void *buf = pack(&req.base, &len), *rep;
    if (!buf)
        return AR_ENOMEM;
    int status = 0;
    int rc = ar_client_unary(c, "/arceus.Worker/Hello", buf, len, &rep, &rlen, timeout_s, &status);
    free(buf);
    if (rc != AR_OK)
        return rc;
    Arceus__HelloReply *r = arceus__hello_reply__unpack(NULL, rlen, rep);
    free(rep);
    if (!r)
        return ar_fail(AR_EPROTO, "worker %s: malformed HelloReply", ar_client_addr(c));
    memset(out, 0, sizeof *out);
    out->protocol_version = r->protocol_version;
    snprintf(out->worker, sizeof out->worker, "%s", r->worker);
    for (size_t i = 0; i < r->n_capabilities; i++) {
        size_t at = strlen(out->capabilities);
        snprintf(out->capabilities + at, sizeof out->capabilities - at, "%s%s", i ? "," : "",
                 r->capabilities[i]);
    }
    out->gflops = r->gflops;
    out->free_memory = r->free_memory;
    out->threads = (int)r->threads;
    arceus__hello_reply__free_unpacked(r, NULL);
    if (out->protocol_version != AR_PROTOCOL_VERSION)
        return ar_fail(AR_EPROTO, "worker %s speaks protocol version %u, this driver version %d",
                       ar_client_addr(c), out->protocol_version, AR_PROTOCOL_VERSION);
    return AR_OK;
}

int ar_remote_hello(ar_client *c, ar_hello_info *out)
{
    return hello_within(c, CONTROL_TIMEOUT_S, out);
}

int ar_remote_probe(ar_client *c, double timeout_s)
{
    ar_hello_info h;
    return hello_within(c, timeout_s, &h);
}

int ar_remote_load(ar_client *c, const ar_load_args *a, uint64_t *params, char session[AR_SESSION_HEX + 1])
{
    session[0] = '\0';
    const ar_tp_layout *lay = a->layout;
    if (a->role != AR_LOAD_STAGE &&
        (!lay || lay->members < 2 || lay->members > AR_PLAN_MAX_GROUP || a->member < 0 || a->member >= lay->members))
        return ar_fail(AR_EINVAL, "a tensor-parallel Load without a layout");
    char *spec = ar_spec_to_json(a->spec);
    if (!spec)
        return ar_fail(AR_ENOMEM, "out of memory");
    Arceus__OptimizerConfig oc = ARCEUS__OPTIMIZER_CONFIG__INIT;
    oc.kind = (uint32_t)a->optim.kind;
    oc.beta1 = a->optim.beta1;
    oc.beta2 = a->optim.beta2;
    oc.eps = a->optim.eps;
    oc.weight_decay = a->optim.weight_decay;
    Arceus__LoadRequest req = ARCEUS__LOAD_REQUEST__INIT;
    req.spec_json = spec;
    req.first_unit = (uint32_t)a->first;
    req.last_unit = (uint32_t)a->last;
    req.micro_batch_rows = (uint32_t)a->rows;
    req.micro_batches = (uint32_t)a->micro_batches;
    req.schedule = (uint32_t)a->schedule;
    req.stage_index = (uint32_t)a->index;
    req.stage_count = (uint32_t)a->count;
    req.seed = a->seed;
    req.optimizer = &oc;
    req.next_worker = (char *)(a->next_worker ? a->next_worker : "");
    req.threads = (uint32_t)(a->threads > 0 ? a->threads : 0);
    req.ticket = (char *)(a->ticket ? a->ticket : "");
    req.next_session = (char *)(a->next_session ? a->next_session : "");
    req.extra_warmup = (uint32_t)(a->extra_warmup > 0 ? a->extra_warmup : 0);
    req.compress_up = (uint32_t)a->compress_up;
    req.compress_down = (uint32_t)a->compress_down;
    req.compress_tp = (uint32_t)a->compress_tp;
    req.commit_digests = a->commit_digests != 0;
    req.next_relay_pass = (char *)(a->next_relay_pass ? a->next_relay_pass : "");
    req.next_reverse = a->next_relay_pass && a->next_reverse;
    /* the members' shares: heads (GPT) and hidden units of every shard */
    Arceus__TpShare shares[AR_PLAN_MAX_GROUP], *share_ptrs[AR_PLAN_MAX_GROUP];
    uint32_t bounds[AR_PLAN_MAX_GROUP][2 * AR_TP_MAX_SHARDS];
    int nshares = a->role == AR_LOAD_LEADER ? lay->members : a->role == AR_LOAD_RANK ? 1 : 0;
    for (int i = 0; i < nshares; i++) {
        int k = a->role == AR_LOAD_RANK ? a->member : i;
        Arceus__TpShare *t = &shares[i];
        arceus__tp_share__init(t);
        t->address = (char *)(a->role == AR_LOAD_LEADER && a->addresses[k] ? a->addresses[k] : "");
        t->session = (char *)(a->role == AR_LOAD_LEADER && k > 0 && a->sessions[k] ? a->sessions[k] : "");
        t->head_begin = (uint32_t)lay->heads[k].begin;
        t->head_end = (uint32_t)lay->heads[k].end;
        t->hidden_begin = (uint32_t)lay->hidden[k][0].begin;
        t->hidden_end = (uint32_t)lay->hidden[k][0].end;
        for (int b = 0; b < lay->count; b++) {
            bounds[i][2 * b] = (uint32_t)lay->hidden[k][b].begin;
            bounds[i][2 * b + 1] = (uint32_t)lay->hidden[k][b].end;
        }
        t->n_hidden_bounds = (size_t)(2 * lay->count);
        t->hidden_bounds = bounds[i];
        share_ptrs[i] = t;
    }
    if (a->role == AR_LOAD_LEADER) {
        req.n_tp_group = (size_t)nshares;
        req.tp_group = share_ptrs;
    } else if (a->role == AR_LOAD_RANK) {
        req.tp_rank = &shares[0];
    }
    size_t len, rlen;
    void *buf = pack(&req.base, &len), *rep = NULL;
    free(spec);
    if (!buf)
        return AR_ENOMEM;
    int rc = ar_client_unary(c, "/arceus.Worker/Load", buf, len, &rep, &rlen, CONTROL_TIMEOUT_S, NULL);
    free(buf);
    if (rc == AR_OK) {
        Arceus__LoadReply *r = arceus__load_reply__unpack(NULL, rlen, rep);
        if (!r)
            rc = ar_fail(AR_EPROTO, "worker %s: malformed LoadReply", ar_client_addr(c));
        else if (strlen(r->session) != AR_SESSION_HEX)
            rc = ar_fail(AR_EPROTO, "worker %s: LoadReply without a session", ar_client_addr(c));
        else {
            memcpy(session, r->session, AR_SESSION_HEX + 1);
            if (params)
                *params = r->parameters;
        }
        if (r)
            arceus__load_reply__free_unpacked(r, NULL);
    }
    free(rep);
    return rc;
}

typedef struct {
    unsigned char *buf;
    size_t n, cap;
    size_t limit; /* 0: none */
} collect;

static int on_chunk(void *user, const void *data, size_t len)
{
    collect *col = user;
    Arceus__Chunk *c = arceus__chunk__unpack(NULL, len, data);
    if (!c)
        return ar_fail(AR_EPROTO, "malformed Chunk");
    if (col->limit && c->data.len > col->limit - col->n) {
        arceus__chunk__free_unpacked(c, NULL);
        return ar_fail(AR_EPROTO, "more than the %zu bytes expected", col->limit);
    }
    if (col->n + c->data.len > col->cap) {
        size_t ncap = col->cap ? col->cap * 2 : (1u << 20);
        while (ncap < col->n + c->data.len)
            ncap *= 2;
        unsigned char *g = realloc(col->buf, ncap);
        if (!g) {
            arceus__chunk__free_unpacked(c, NULL);
            return ar_fail(AR_ENOMEM, "out of memory for the stage state");
        }
        col->buf = g;
        col->cap = ncap;
    }
    if (c->data.len > 0) /* an empty chunk has no data pointer */
        memcpy(col->buf + col->n, c->data.data, c->data.len);
    col->n += c->data.len;
    arceus__chunk__free_unpacked(c, NULL);
    return AR_OK;
}

int ar_remote_save(ar_client *c, const char *session, const ar_state_parts *shadow)
{
    Arceus__SaveRequest req = ARCEUS__SAVE_REQUEST__INIT;
    req.session = (char *)(session ? session : "");
    size_t len;
    void *buf = pack(&req.base, &len);
    if (!buf)
        return AR_ENOMEM;
    collect col = {0};
    int rc = ar_client_read_stream(c, "/arceus.Worker/Save", buf, len, on_chunk, &col, -1, NULL);
    free(buf);
    if (rc == AR_OK) {
        char origin[300];
        snprintf(origin, sizeof origin, "Save from %s", ar_client_addr(c));
        rc = ar_state_decode(shadow, col.buf, col.n, origin);
    }
    free(col.buf);
    return rc;
}

int ar_remote_audit(ar_client *c, const char *session, int64_t step, size_t max_bytes, long param_floats,
                    int max_mb, int max_rows, ar_audit_material *out)
{
    memset(out, 0, sizeof *out);
    out->step = -1;
    if (step < 0)
        return ar_fail(AR_EINVAL, "no step %lld", (long long)step);
    Arceus__AuditRequest req = ARCEUS__AUDIT_REQUEST__INIT;
    req.session = (char *)(session ? session : "");
    req.step = (uint64_t)step;
    size_t len;
    void *buf = pack(&req.base, &len);
    if (!buf)
        return AR_ENOMEM;
    collect col = {.limit = max_bytes};
    int rc = ar_client_read_stream(c, "/arceus.Worker/Audit", buf, len, on_chunk, &col, -1, NULL);
    free(buf);
    char origin[300];
    snprintf(origin, sizeof origin, "Audit of step %lld from %s", (long long)step, ar_client_addr(c));
    if (rc != AR_OK)
        rc = ar_fail(rc, "%s: %s", origin, ar_last_error());
    else
        rc = ar_audit_material_decode(col.buf, col.n, param_floats, max_mb, max_rows, origin, out);
    if (rc == AR_OK && out->step != step) {
        ar_audit_material_free(out);
        rc = ar_fail(AR_EPROTO, "%s: the material of another step", origin);
    }
    free(col.buf);
    return rc;
}

typedef struct {
    const unsigned char *state;
    size_t n, at;
    unsigned char *msg;
    const char *session; /* on the first chunk; NULL after it */
} feeder;

static int next_chunk(void *user, const void **data, size_t *len)
{
    feeder *f = user;
    if (f->at >= f->n && !f->session)
        return 1;
    Arceus__Chunk c = ARCEUS__CHUNK__INIT;
    if (f->session) {
        c.session = (char *)f->session;
        f->session = NULL;
    }
    c.data.data = (uint8_t *)f->state + f->at;
    c.data.len = f->n - f->at < AR_NET_CHUNK_BYTES ? f->n - f->at : AR_NET_CHUNK_BYTES;
    f->at += c.data.len;
    *len = arceus__chunk__pack(&c, f->msg);
    *data = f->msg;
    return 0;
}

int ar_remote_restore(ar_client *c, const char *session, const ar_state_parts *shadow)
{
    void *state;
    size_t n;
    int rc = ar_state_encode(shadow, &state, &n);
    if (rc != AR_OK)
        return rc;
    feeder f = {.state = state, .n = n, .msg = malloc(AR_NET_CHUNK_BYTES + 16 + AR_SESSION_HEX + 8),
                .session = session ? session : ""};
    if (!f.msg) {
        free(state);
        return ar_fail(AR_ENOMEM, "out of memory");
    }
    void *rep = NULL;
    size_t rlen;
    rc = ar_client_write_stream(c, "/arceus.Worker/Restore", next_chunk, &f, &rep, &rlen, -1, NULL);
    free(rep);
    free(f.msg);
    free(state);
    return rc;
}
