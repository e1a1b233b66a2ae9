/* The client side of the Market service (proto/arceus.proto): one function
 * per RPC, packing the request, calling, and turning the reply into the
 * store's structs (market/store.h) for the CLI and the driver. */
#include "net/market.h"

#include "net/relay.h"

#include "arceus.pb-c.h"
#include "core/core.h"
#include "net/net_internal.h"
#include "net/relay.h"

#include <math.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CALL_TIMEOUT_S 30.0

/* Pack `req`, call `method`, unpack the reply with `d`. */
static int call(ar_client *c, const char *method, const ProtobufCMessage *req,
                const ProtobufCMessageDescriptor *d, ProtobufCMessage **reply_out, int *status)
{
    size_t len = protobuf_c_message_get_packed_size(req), rlen = 0;
    void *buf = malloc(len ? len : 1), *rep = NULL;
    if (!buf)
        return ar_fail(AR_ENOMEM, "out of memory");
    protobuf_c_message_pack(req, buf);
    int st = 0;
    int rc = ar_client_unary(c, method, buf, len, &rep, &rlen, CALL_TIMEOUT_S, &st);
    free(buf);
    if (status)
        *status = st;
    if (rc != AR_OK)
        return rc;
    *reply_out = protobuf_c_message_unpack(d, NULL, rlen, rep);
    free(rep);
    if (!*reply_out)
        return ar_fail(AR_EPROTO, "market %s: malformed %s", ar_client_addr(c), d->short_name);
    return AR_OK;
}

/* A reach state by its name (ar_reach_name); an unknown one: unchecked. */
static ar_reach reach_from(const char *name)
{
    return !strcmp(name, "direct")        ? AR_REACH_OK
           : !strcmp(name, "relayed")     ? AR_REACH_RELAYED
           : !strcmp(name, "unreachable") ? AR_REACH_UNREACHABLE
                                          : AR_REACH_UNCHECKED;
}

int ar_market_register(ar_client *c, const char *token, const char *address,
                       const ar_market_profile *p, int64_t *provider_id, int *offline_after_s,
                       int *status)
{
    ar_market_registration reg;
    int rc = ar_market_register_full(c, token, address, p, &reg, status);
    if (rc == AR_OK && provider_id)
        *provider_id = reg.provider_id;
    if (rc == AR_OK && offline_after_s)
        *offline_after_s = reg.offline_after_s;
    OPENSSL_cleanse(&reg, sizeof reg);
    return rc;
}

int ar_market_register_full(ar_client *c, const char *token, const char *address, const ar_market_profile *p,
                            ar_market_registration *out, int *status)
{
    memset(out, 0, sizeof *out);
    Arceus__ProviderProfile pp = ARCEUS__PROVIDER_PROFILE__INIT;
    pp.gflops = p->gflops;
    pp.mem_bytes = p->mem_bytes > 0 ? (uint64_t)p->mem_bytes : 0;
    pp.cores = p->cores > 0 ? (uint32_t)p->cores : 0;
    pp.price_per_tflop = p->price_per_tflop;
    Arceus__RegisterProviderRequest req = ARCEUS__REGISTER_PROVIDER_REQUEST__INIT;
    req.token = (char *)token;
    req.address = (char *)address;
    req.profile = &pp;
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/RegisterProvider", &req.base,
                  &arceus__register_provider_reply__descriptor, &rep, status);
    if (rc != AR_OK)
        return rc;
    Arceus__RegisterProviderReply *r = (Arceus__RegisterProviderReply *)rep;
    out->provider_id = r->provider_id;
    out->offline_after_s = (int)r->offline_after_s;
    out->reach = reach_from(r->reach);
    /* a relay and a credential of the forms they have, or none */
    if (strlen(r->relay) < sizeof out->relay && strlen(r->relay_credential) == AR_RELAY_CREDENTIAL_HEX) {
        snprintf(out->relay, sizeof out->relay, "%s", r->relay);
        snprintf(out->relay_credential, sizeof out->relay_credential, "%s", r->relay_credential);
    }
    protobuf_c_message_free_unpacked(rep, NULL);
    return AR_OK;
}

int ar_market_heartbeat(ar_client *c, const char *token, int64_t provider_id, int *status)
{
    return ar_market_heartbeat_availability(c, token, provider_id, false, NULL, false, status);
    return ar_market_heartbeat_full(c, token, provider_id, false, NULL, false, NULL, status);
}

int ar_market_heartbeat_availability(ar_client *c, const char *token, int64_t provider_id, bool unavailable,
                                     const char *why, bool leaving, int *status)
{
    return ar_market_heartbeat_full(c, token, provider_id, unavailable, why, leaving, NULL, status);
}

int ar_market_heartbeat_full(ar_client *c, const char *token, int64_t provider_id, bool unavailable,
                             const char *why, bool leaving, ar_reach *reach, int *status)
{
    Arceus__HeartbeatRequest req = ARCEUS__HEARTBEAT_REQUEST__INIT;
    req.token = (char *)token;
    req.provider_id = provider_id;
    req.unavailable = unavailable;
    req.unavailable_why = (char *)(unavailable && why ? why : "");
    req.leaving = leaving;
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/Heartbeat", &req.base, &arceus__heartbeat_reply__descriptor, &rep,
                  status);
    if (rc == AR_OK) {
        if (reach)
            *reach = reach_from(((Arceus__HeartbeatReply *)rep)->reach);
        protobuf_c_message_free_unpacked(rep, NULL);
    }
    return rc;
}

/* A provider's profile as the market sent it (none: left as it is). */
static void profile_from(const Arceus__ProviderProfile *pp, ar_provider *p)
{
    if (!pp)
        return;
    p->gflops = pp->gflops;
    p->mem_bytes = (int64_t)pp->mem_bytes;
    p->cores = (int)pp->cores;
    p->price_per_tflop = pp->price_per_tflop;
}

int ar_market_providers(ar_client *c, const char *token, bool include_offline,
                        ar_market_provider **out, size_t *n, int *status)
{
    *out = NULL;
    *n = 0;
    Arceus__ListProvidersRequest req = ARCEUS__LIST_PROVIDERS_REQUEST__INIT;
    req.token = (char *)token;
    req.include_offline = include_offline;
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/ListProviders", &req.base, &arceus__list_providers_reply__descriptor,
                  &rep, status);
    if (rc != AR_OK)
        return rc;
    Arceus__ListProvidersReply *r = (Arceus__ListProvidersReply *)rep;
    ar_market_provider *ps = calloc(r->n_providers ? r->n_providers : 1, sizeof *ps);
    if (!ps) {
        protobuf_c_message_free_unpacked(rep, NULL);
        return ar_fail(AR_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < r->n_providers; i++) {
        const Arceus__ProviderInfo *pi = r->providers[i];
        ar_market_provider *q = &ps[i];
        q->p.id = pi->id;
        snprintf(q->account, sizeof q->account, "%s", pi->account);
        snprintf(q->p.address, sizeof q->p.address, "%s", pi->address);
        profile_from(pi->profile, &q->p);
        q->p.reliability = pi->reliability;
        q->p.online = pi->online;
        q->p.last_heartbeat = pi->last_heartbeat;
        q->p.reach = reach_from(pi->reach);
        q->p.unavailable = pi->unavailable;
        snprintf(q->p.unavailable_why, sizeof q->p.unavailable_why, "%s", pi->unavailable_why);
        q->speed_gflops = pi->speed_gflops;
    }
    *out = ps;
    *n = r->n_providers;
    protobuf_c_message_free_unpacked(rep, NULL);
    return AR_OK;
}

int ar_market_ledger(ar_client *c, const char *token, const char *account,
                     char account_out[AR_NAME_MAX], ar_ledger_row **rows, size_t *n,
                     int64_t *balance, int64_t *pending, int *status)
{
    *rows = NULL;
    *n = 0;
    Arceus__LedgerRequest req = ARCEUS__LEDGER_REQUEST__INIT;
    req.token = (char *)token;
    req.account = (char *)(account ? account : "");
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/Ledger", &req.base, &arceus__ledger_reply__descriptor, &rep, status);
    if (rc != AR_OK)
        return rc;
    Arceus__LedgerReply *r = (Arceus__LedgerReply *)rep;
    ar_ledger_row *out = calloc(r->n_rows ? r->n_rows : 1, sizeof *out);
    if (!out) {
        protobuf_c_message_free_unpacked(rep, NULL);
        return ar_fail(AR_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < r->n_rows; i++) {
        const Arceus__LedgerRow *row = r->rows[i];
        out[i].id = row->id;
        out[i].transfer_id = row->transfer_id;
        out[i].account_id = 0;
        out[i].amount = row->amount;
        snprintf(out[i].reason, sizeof out[i].reason, "%s", row->reason);
        out[i].job_id = row->job_id;
        out[i].step = row->step;
        out[i].created = row->created;
    }
    snprintf(account_out, AR_NAME_MAX, "%s", r->account);
    *balance = r->balance;
    if (pending)
        *pending = r->pending;
    *rows = out;
    *n = r->n_rows;
    protobuf_c_message_free_unpacked(rep, NULL);
    return AR_OK;
}

int ar_market_balance(ar_client *c, const char *token, char account_out[AR_NAME_MAX],
                      int64_t *balance, int *status)
{
    Arceus__BalanceRequest req = ARCEUS__BALANCE_REQUEST__INIT;
    req.token = (char *)token;
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/Balance", &req.base, &arceus__balance_reply__descriptor, &rep, status);
    if (rc != AR_OK)
        return rc;
    Arceus__BalanceReply *r = (Arceus__BalanceReply *)rep;
    snprintf(account_out, AR_NAME_MAX, "%s", r->account);
    *balance = r->balance;
    protobuf_c_message_free_unpacked(rep, NULL);
    return AR_OK;
}

static void leased_from(const Arceus__LeasedProvider *l, ar_market_leased *q)
{
    q->p.id = l->provider_id;
    snprintf(q->account, sizeof q->account, "%s", l->account);
    snprintf(q->p.address, sizeof q->p.address, "%s", l->address);
    profile_from(l->profile, &q->p);
    q->p.reliability = l->reliability;
    q->p.online = true;
    q->flops_per_step = l->flops_per_step;
    snprintf(q->ticket, sizeof q->ticket, "%s", l->ticket);
    q->stage = (int)l->stage;
    q->first_unit = (int)l->first_unit;
    q->last_unit = (int)l->last_unit;
    q->speed_gflops = l->speed_gflops;
    /* a relayed member: its relay and pass, when both have their forms */
    q->p.reach = AR_REACH_OK;
    q->relay[0] = q->relay_pass[0] = '\0';
    if (l->relay[0] && strlen(l->relay) < sizeof q->relay && ar_relay_pass_wellformed(l->relay_pass)) {
        snprintf(q->relay, sizeof q->relay, "%s", l->relay);
        snprintf(q->relay_pass, sizeof q->relay_pass, "%s", l->relay_pass);
        q->p.reach = AR_REACH_RELAYED;
    }
}

int ar_market_acquire(ar_client *c, const char *token, const ar_market_lease_request *q,
                      ar_market_lease *out, int *status)
{
    memset(out, 0, sizeof *out);
    Arceus__AcquireLeaseRequest req = ARCEUS__ACQUIRE_LEASE_REQUEST__INIT;
    req.token = (char *)token;
    req.devices = q->devices;
    req.max_credits = q->max_credits;
    req.est_steps = q->est_steps;
    req.spec = (char *)(q->spec ? q->spec : "");
    req.flops_per_step = q->flops_per_step;
    req.min_mem_bytes = q->min_mem_bytes > 0 ? (uint64_t)q->min_mem_bytes : 0;
    req.resume_job_id = q->resume_job;
    req.kept_steps = q->kept_steps;
    req.model_spec = (char *)(q->model_spec ? q->model_spec : "");
    req.micro_batch_rows = q->mb_rows > 0 ? (uint32_t)q->mb_rows : 0;
    req.micro_batches = q->micro_batches > 0 ? (uint32_t)q->micro_batches : 0;
    req.schedule = q->schedule > 0 ? (uint32_t)q->schedule : 0;
    req.n_stage_units = q->n_stage_units;
    req.stage_units = (uint32_t *)q->stage_units;
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/AcquireLease", &req.base, &arceus__acquire_lease_reply__descriptor,
                  &rep, status);
    if (rc != AR_OK)
        return rc;
    Arceus__AcquireLeaseReply *r = (Arceus__AcquireLeaseReply *)rep;
    if (r->n_providers < 1 || r->n_providers > AR_MARKET_MAX_DEVICES || strlen(r->lease_token) != AR_TOKEN_LEN - 1) {
        protobuf_c_message_free_unpacked(rep, NULL);
        return ar_fail(AR_EPROTO, "market %s: malformed AcquireLeaseReply", ar_client_addr(c));
    }
    out->job_id = r->job_id;
    out->lease_id = r->lease_id;
    snprintf(out->token, sizeof out->token, "%s", r->lease_token);
    out->estimate = r->estimate;
    out->n = r->n_providers;
    for (size_t i = 0; i < r->n_providers; i++)
        leased_from(r->providers[i], &out->providers[i]);
    protobuf_c_message_free_unpacked(rep, NULL);
    /* a market that does not fix plans (older than this client) gives no
     * units: the lease would be paid by what the driver reports */
    for (size_t i = 0; i < out->n; i++)
        if (out->providers[i].last_unit <= out->providers[i].first_unit || out->providers[i].stage != (int)i)
            return ar_fail(AR_EPROTO, "market %s: the lease gives provider %lld no place in a plan (a market older "
                           "than this arceus?)", ar_client_addr(c), (long long)out->providers[i].p.id);
    return AR_OK;
}

int ar_market_replace(ar_client *c, const char *lease_token, int64_t lost_provider_id, int64_t kept_steps,
                      const char *reason, ar_market_replacement *out, int *status)
{
    memset(out, 0, sizeof *out);
    Arceus__ReplaceProviderRequest req = ARCEUS__REPLACE_PROVIDER_REQUEST__INIT;
    req.lease_token = (char *)lease_token;
    req.lost_provider_id = lost_provider_id;
    req.kept_steps = kept_steps;
    req.reason = (char *)(reason ? reason : "");
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/ReplaceProvider", &req.base, &arceus__replace_provider_reply__descriptor,
                  &rep, status);
    if (rc != AR_OK)
        return rc;
    Arceus__ReplaceProviderReply *r = (Arceus__ReplaceProviderReply *)rep;
    if (r->n_members > AR_MARKET_MAX_DEVICES) {
        protobuf_c_message_free_unpacked(rep, NULL);
        return ar_fail(AR_EPROTO, "market %s: ReplaceProvider names %zu members (at most %d)", ar_client_addr(c),
                       r->n_members, AR_MARKET_MAX_DEVICES);
    }
    if (r->replacement) {
        leased_from(r->replacement, &out->replacement);
        out->found = true;
    }
    out->n = r->n_members;
    for (size_t i = 0; i < r->n_members; i++)
        leased_from(r->members[i], &out->members[i]);
    out->contested = (int)r->contested;
    out->spent = r->spent;
    protobuf_c_message_free_unpacked(rep, NULL);
    return AR_OK;
}

int ar_market_report_audit(ar_client *c, const char *lease_token, int64_t provider_id, int stage, int64_t step,
                           const ar_audit_evidence *ev, bool *confirmed, int64_t *returned, int *status)
{
    *confirmed = false;
    *returned = 0;
    Arceus__ReportAuditRequest req = ARCEUS__REPORT_AUDIT_REQUEST__INIT;
    req.lease_token = (char *)lease_token;
    req.provider_id = provider_id;
    req.stage = (uint32_t)stage;
    req.step = step;
    req.passed = ev == NULL;
    if (ev) {
        req.material.data = (uint8_t *)ev->material;
        req.material.len = ev->material_bytes;
        req.optimizer = (uint32_t)ev->optim.kind;
        req.beta1 = ev->optim.beta1;
        req.beta2 = ev->optim.beta2;
        req.eps = ev->optim.eps;
        req.weight_decay = ev->optim.weight_decay;
        req.seed = ev->seed;
    }
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/ReportAudit", &req.base, &arceus__report_audit_reply__descriptor, &rep, status);
    if (rc != AR_OK)
        return rc;
    Arceus__ReportAuditReply *r = (Arceus__ReportAuditReply *)rep;
    *confirmed = r->confirmed;
    *returned = r->returned;
    protobuf_c_message_free_unpacked(rep, NULL);
    return AR_OK;
}

int ar_market_hand_over(ar_client *c, const char *lease_token, int64_t provider_id, int64_t step, int64_t min_mem,
                        ar_market_leased *replacement, int *found, int64_t *spent, int *status)
{
    *found = 0;
    Arceus__HandOverRequest req = ARCEUS__HAND_OVER_REQUEST__INIT;
    req.lease_token = (char *)lease_token;
    req.provider_id = provider_id;
    req.step = step;
    req.min_mem_bytes = min_mem > 0 ? (uint64_t)min_mem : 0;
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/HandOver", &req.base, &arceus__hand_over_reply__descriptor, &rep, status);
    if (rc != AR_OK)
        return rc;
    Arceus__HandOverReply *r = (Arceus__HandOverReply *)rep;
    if (r->replacement) {
        memset(replacement, 0, sizeof *replacement);
        leased_from(r->replacement, replacement);
        *found = 1;
    }
    if (spent)
        *spent = r->spent;
    protobuf_c_message_free_unpacked(rep, NULL);
    return AR_OK;
}

int ar_market_report(ar_client *c, const char *lease_token, int64_t step,
                     const ar_market_stage_usage *u, size_t n, int64_t *paid, int64_t *spent,
                     int64_t *balance, int *status)
{
    return ar_market_report_loss(c, lease_token, step, NAN, u, n, paid, spent, balance, status);
}

int ar_market_report_loss(ar_client *c, const char *lease_token, int64_t step, double loss,
                          const ar_market_stage_usage *u, size_t n, int64_t *paid,
                          int64_t *spent, int64_t *balance, int *status)
{
    if (n > AR_MARKET_MAX_DEVICES)
        return ar_fail(AR_EINVAL, "%zu stages: at most %d", n, AR_MARKET_MAX_DEVICES);
    Arceus__StageUsage su[AR_MARKET_MAX_DEVICES], *sp[AR_MARKET_MAX_DEVICES];
    for (size_t i = 0; i < n; i++) {
        Arceus__StageUsage x = ARCEUS__STAGE_USAGE__INIT;
        x.stage = (uint32_t)u[i].stage;
        x.provider_id = u[i].provider_id;
        x.flops = u[i].flops;
        if (u[i].has_digests) {
            x.digests.data = (uint8_t *)u[i].digests;
            x.digests.len = AR_STAGE_DIGEST_BYTES;
        }
        su[i] = x;
        sp[i] = &su[i];
    }
    Arceus__ReportUsageRequest req = ARCEUS__REPORT_USAGE_REQUEST__INIT;
    req.lease_token = (char *)lease_token;
    req.step = step;
    req.n_stages = n;
    req.stages = sp;
    if (isfinite(loss)) {
        req.has_loss = true;
        req.loss = loss;
    }
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/ReportUsage", &req.base, &arceus__report_usage_reply__descriptor, &rep,
                  status);
    if (rc != AR_OK)
        return rc;
    Arceus__ReportUsageReply *r = (Arceus__ReportUsageReply *)rep;
    if (paid)
        *paid = r->paid;
    if (spent)
        *spent = r->spent;
    if (balance)
        *balance = r->balance;
    protobuf_c_message_free_unpacked(rep, NULL);
    return AR_OK;
}

int ar_market_release(ar_client *c, const char *lease_token, const char *status_name,
                      int64_t steps, int64_t *spent, int *status)
{
    Arceus__ReleaseLeaseRequest req = ARCEUS__RELEASE_LEASE_REQUEST__INIT;
    req.lease_token = (char *)lease_token;
    req.status = (char *)status_name;
    req.step = steps;
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/ReleaseLease", &req.base, &arceus__release_lease_reply__descriptor,
                  &rep, status);
    if (rc != AR_OK)
        return rc;
    if (spent)
        *spent = ((Arceus__ReleaseLeaseReply *)rep)->spent;
    protobuf_c_message_free_unpacked(rep, NULL);
    return AR_OK;
}

int ar_market_check_lease(ar_client *c, const char *token, const char *ticket, int64_t provider_id,
                          int64_t *job_id, ar_market_members *members, int *status)
{
    Arceus__CheckLeaseRequest req = ARCEUS__CHECK_LEASE_REQUEST__INIT;
    req.token = (char *)token;
    req.ticket = (char *)ticket;
    req.provider_id = provider_id;
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/CheckLease", &req.base, &arceus__check_lease_reply__descriptor, &rep,
                  status);
    if (rc != AR_OK)
        return rc;
    const Arceus__CheckLeaseReply *r = (const Arceus__CheckLeaseReply *)rep;
    if (r->n_member_addresses > AR_MARKET_MAX_DEVICES) {
        protobuf_c_message_free_unpacked(rep, NULL);
        return ar_fail(AR_EPROTO, "market %s: CheckLease names %zu members (at most %d)", ar_client_addr(c),
                       r->n_member_addresses, AR_MARKET_MAX_DEVICES);
    }
    if (job_id)
        *job_id = r->job_id;
    if (members) {
        members->n = r->n_member_addresses;
        for (size_t i = 0; i < members->n; i++)
            snprintf(members->addresses[i], sizeof members->addresses[i], "%s", r->member_addresses[i]);
        members->has_plan = r->has_plan;
        members->first_unit = (int)r->first_unit;
        members->last_unit = (int)r->last_unit;
        snprintf(members->spec_sha256, sizeof members->spec_sha256, "%s", r->spec_sha256);
        members->mb_rows = (int)r->micro_batch_rows;
        members->micro_batches = (int)r->micro_batches;
    }
    protobuf_c_message_free_unpacked(rep, NULL);
    return AR_OK;
}

int ar_market_progress_pack(const char *lease_token, const ar_market_progress *p, void **buf, size_t *len)
{
    *buf = NULL;
    *len = 0;
    if (p->n_stages > AR_MARKET_MAX_DEVICES || p->n_plan > AR_MARKET_MAX_DEVICES)
        return ar_fail(AR_EINVAL, "%zu stages: at most %d", p->n_stages > p->n_plan ? p->n_stages : p->n_plan,
                       AR_MARKET_MAX_DEVICES);
    Arceus__StageTiming tm[AR_MARKET_MAX_DEVICES], *tp[AR_MARKET_MAX_DEVICES];
    for (size_t i = 0; i < p->n_stages; i++) {
        Arceus__StageTiming t = ARCEUS__STAGE_TIMING__INIT;
        t.stage = (uint32_t)i;
        t.busy_s = p->busy_s[i];
        t.idle_s = p->idle_s[i];
        tm[i] = t;
        tp[i] = &tm[i];
    }
    Arceus__PlanStage ps[AR_MARKET_MAX_DEVICES], *psp[AR_MARKET_MAX_DEVICES];
    Arceus__PlanMember pm[AR_MARKET_MAX_DEVICES][AR_PLAN_MAX_GROUP], *pmp[AR_MARKET_MAX_DEVICES][AR_PLAN_MAX_GROUP];
    for (size_t i = 0; i < p->n_plan; i++) {
        const ar_market_plan_stage *q = &p->plan[i];
        if (q->n_members < 1 || q->n_members > AR_PLAN_MAX_GROUP)
            return ar_fail(AR_EINVAL, "plan stage %zu has %d members: 1..%d", i, q->n_members, AR_PLAN_MAX_GROUP);
        Arceus__PlanStage x = ARCEUS__PLAN_STAGE__INIT;
        x.stage = (uint32_t)i;
        x.first_unit = (uint32_t)q->first_unit;
        x.last_unit = (uint32_t)q->last_unit;
        x.layers = (char *)q->layers;
        x.predicted_ms = q->predicted_ms;
        for (int k = 0; k < q->n_members; k++) {
            const ar_market_plan_member *m = &q->members[k];
            Arceus__PlanMember y = ARCEUS__PLAN_MEMBER__INIT;
            y.provider_id = m->provider_id;
            y.device = (char *)m->device;
            y.head_begin = (uint32_t)m->head_begin;
            y.head_end = (uint32_t)m->head_end;
            y.hidden_begin = (uint32_t)m->hidden_begin;
            y.hidden_end = (uint32_t)m->hidden_end;
            y.share = (char *)(m->share ? m->share : "");
            y.relayed = m->relayed;
            pm[i][k] = y;
            pmp[i][k] = &pm[i][k];
        }
        x.n_members = (size_t)q->n_members;
        x.members = pmp[i];
        ps[i] = x;
        psp[i] = &ps[i];
    }
    if (p->n_links > AR_MARKET_MAX_DEVICES)
        return ar_fail(AR_EINVAL, "%zu plan links: at most %d", p->n_links, AR_MARKET_MAX_DEVICES);
    Arceus__PlanLink pl[AR_MARKET_MAX_DEVICES], *plp[AR_MARKET_MAX_DEVICES];
    for (size_t i = 0; i < p->n_links; i++) {
        const ar_market_plan_link *l = &p->links[i];
        Arceus__PlanLink x = ARCEUS__PLAN_LINK__INIT;
        x.stage = (uint32_t)l->stage;
        x.from = (char *)(l->from ? l->from : "");
        x.to = (char *)(l->to ? l->to : "");
        x.down_mb_s = l->down_mb_s;
        x.up_mb_s = l->up_mb_s;
        x.rtt_ms = l->rtt_ms;
        x.compress = (char *)(l->compress ? l->compress : "");
        x.predicted_down_mb = l->predicted_down_mb;
        x.predicted_up_mb = l->predicted_up_mb;
        x.down_mb = l->down_mb;
        x.up_mb = l->up_mb;
        x.down_raw_mb = l->down_raw_mb;
        x.up_raw_mb = l->up_raw_mb;
        pl[i] = x;
        plp[i] = &pl[i];
    }
    Arceus__JobPlan plan = ARCEUS__JOB_PLAN__INIT;
    plan.n_links = p->n_plan > 0 ? p->n_links : 0;
    plan.links = plp;
    plan.n_stages = p->n_plan;
    plan.stages = psp;
    plan.micro_batches = (uint32_t)p->micro_batches;
    plan.schedule = (char *)(p->schedule ? p->schedule : "");
    plan.predicted_bubble = p->predicted_bubble;
    plan.model = (char *)(p->model ? p->model : "");
    Arceus__ReportProgressRequest req = ARCEUS__REPORT_PROGRESS_REQUEST__INIT;
    req.lease_token = (char *)lease_token;
    req.step = p->step;
    req.total_steps = p->total_steps;
    req.items_per_s = p->items_per_s;
    req.items_unit = (char *)p->unit;
    req.eta_s = p->eta_s;
    req.has_val_loss = p->has_val;
    req.val_step = p->val_step;
    req.val_loss = p->val_loss;
    req.wall_s = p->wall_s;
    req.n_timings = p->n_stages;
    req.timings = tp;
    req.plan = p->n_plan > 0 ? &plan : NULL;
    size_t n = protobuf_c_message_get_packed_size(&req.base);
    if (!(*buf = malloc(n ? n : 1)))
        return ar_fail(AR_ENOMEM, "out of memory for a progress report");
    protobuf_c_message_pack(&req.base, *buf);
    *len = n;
    return AR_OK;
}

int ar_market_report_progress_packed(ar_client *c, const void *buf, size_t len, int *status)
{
    void *rep = NULL;
    size_t rlen = 0;
    int st = 0;
    int rc = ar_client_unary(c, "/arceus.Market/ReportProgress", buf, len, &rep, &rlen, CALL_TIMEOUT_S, &st);
    if (status)
        *status = st;
    if (rc != AR_OK)
        return rc;
    Arceus__ReportProgressReply *r = arceus__report_progress_reply__unpack(NULL, rlen, rep);
    free(rep);
    if (!r)
        return ar_fail(AR_EPROTO, "market %s: malformed ReportProgressReply", ar_client_addr(c));
    arceus__report_progress_reply__free_unpacked(r, NULL);
    return AR_OK;
}

int ar_market_report_progress(ar_client *c, const char *lease_token, const ar_market_progress *p,
                              int *status)
{
    void *buf;
    size_t len;
    int rc = ar_market_progress_pack(lease_token, p, &buf, &len);
    if (rc == AR_OK)
        rc = ar_market_report_progress_packed(c, buf, len, status);
    free(buf);
    return rc;
}

static int job_from(const Arceus__JobInfo *ji, ar_job *j)
{
    memset(j, 0, sizeof *j);
    j->id = ji->id;
    if (ar_job_status_parse(ji->status, &j->status) != AR_OK)
        return ar_fail(AR_EPROTO, "market: job %lld has status '%.32s'", (long long)ji->id, ji->status);
    j->spec = strdup(ji->spec ? ji->spec : "");
    if (!j->spec)
        return ar_fail(AR_ENOMEM, "out of memory");
    j->created = ji->created;
    j->step = ji->step;
    j->max_credits = ji->max_credits;
    j->spent = ji->spent;
    return AR_OK;
}

int ar_market_jobs(ar_client *c, const char *token, ar_job **out, size_t *n, int *status)
{
    *out = NULL;
    *n = 0;
    Arceus__ListJobsRequest req = ARCEUS__LIST_JOBS_REQUEST__INIT;
    req.token = (char *)token;
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/ListJobs", &req.base, &arceus__list_jobs_reply__descriptor, &rep,
                  status);
    if (rc != AR_OK)
        return rc;
    Arceus__ListJobsReply *r = (Arceus__ListJobsReply *)rep;
    ar_job *jobs = calloc(r->n_jobs ? r->n_jobs : 1, sizeof *jobs);
    if (!jobs)
        rc = ar_fail(AR_ENOMEM, "out of memory");
    size_t cnt = 0;
    for (; rc == AR_OK && cnt < r->n_jobs; cnt++)
        rc = job_from(r->jobs[cnt], &jobs[cnt]);
    protobuf_c_message_free_unpacked(rep, NULL);
    if (rc != AR_OK) {
        ar_store_jobs_free(jobs, cnt);
        return rc;
    }
    *out = jobs;
    *n = cnt;
    return AR_OK;
}

int ar_market_job(ar_client *c, const char *token, int64_t job_id, ar_job *job,
                  ar_job_point **points, size_t *n, int *status)
{
    memset(job, 0, sizeof *job);
    *points = NULL;
    *n = 0;
    Arceus__GetJobRequest req = ARCEUS__GET_JOB_REQUEST__INIT;
    req.token = (char *)token;
    req.job_id = job_id;
    ProtobufCMessage *rep;
    int rc = call(c, "/arceus.Market/GetJob", &req.base, &arceus__get_job_reply__descriptor, &rep, status);
    if (rc != AR_OK)
        return rc;
    Arceus__GetJobReply *r = (Arceus__GetJobReply *)rep;
    ar_job_point *pts = NULL;
    if (!r->job)
        rc = ar_fail(AR_EPROTO, "market %s: GetJob without a job", ar_client_addr(c));
    if (rc == AR_OK)
        rc = job_from(r->job, job);
    if (rc == AR_OK && !(pts = calloc(r->n_losses ? r->n_losses : 1, sizeof *pts)))
        rc = ar_fail(AR_ENOMEM, "out of memory");
    for (size_t i = 0; rc == AR_OK && i < r->n_losses; i++) {
        pts[i].step = r->losses[i]->step;
        pts[i].loss = r->losses[i]->loss;
    }
    if (rc == AR_OK) {
        *points = pts;
        *n = r->n_losses;
    } else {
        free(pts);
        ar_store_job_clear(job);
    }
    protobuf_c_message_free_unpacked(rep, NULL);
    return rc;
}
