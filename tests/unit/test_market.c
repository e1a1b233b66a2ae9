/* The Market service in this process: a real server on 127.0.0.1 (port 0)
 * over a SQLite file, called through the C client (net/market.h). Covers the
 * client functions the CLI does not use yet (RegisterProvider, Heartbeat,
 * Balance) and runs every handler under the sanitizers. */
#include "core/core.h"
#include "market/store.h"
#include "net/market.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    char dir[64], db[128], addr[200];
    ar_market *m;
    ar_client *c;
    char alice[AR_TOKEN_LEN], bob[AR_TOKEN_LEN];
} fixture;

static void setup(fixture *f, int offline_after)
{
    snprintf(f->dir, sizeof f->dir, "/tmp/ar-market-XXXXXX");
    cr_assert(mkdtemp(f->dir));
    snprintf(f->db, sizeof f->db, "%s/market.db", f->dir);
    ar_store *s;
    cr_assert_eq(ar_store_open(f->db, &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(ar_store_account_create(s, "alice", AR_CREDITS(10), f->alice, NULL), AR_OK);
    cr_assert_eq(ar_store_account_create(s, "bob", 1500000, f->bob, NULL), AR_OK);
    ar_store_close(s);
    /* no reachability checks: these providers are addresses where no worker listens */
    ar_market_config c = {.listen = "127.0.0.1:0", .db_path = f->db, .offline_after_s = offline_after,
                          .reach_timeout_s = -1};
    cr_assert_eq(ar_market_start(&c, &f->m, f->addr, sizeof f->addr), AR_OK, "%s", ar_last_error());
    cr_assert(strcmp(f->addr, "127.0.0.1:0") != 0);
    cr_assert_eq(ar_client_open(f->addr, &f->c), AR_OK);
}

static void teardown(fixture *f)
{
    ar_client_close(f->c);
    ar_market_stop(f->m);
    char path[160];
    static const char *const suffix[] = {"", "-wal", "-shm"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s%s", f->db, suffix[i]);
        unlink(path);
    }
    rmdir(f->dir);
}

static const ar_market_profile PROFILE = {
    .gflops = 120.0, .mem_bytes = (int64_t)2 << 30, .cores = 2, .price_per_tflop = 300000};

Test(market, register_heartbeat_and_list)
{
    fixture f;
    setup(&f, 0);
    int64_t id = 0;
    int offline_after = 0, status = -1;
    cr_assert_eq(ar_market_register(f.c, f.alice, "127.0.0.1:6001", &PROFILE, &id, &offline_after, &status),
                 AR_OK, "%s", ar_last_error());
    cr_assert(id > 0);
    cr_assert_eq(offline_after, AR_MARKET_DEFAULT_OFFLINE_AFTER_S);
    cr_assert_eq(status, AR_STATUS_OK);
    cr_assert_eq(ar_market_heartbeat(f.c, f.alice, id, &status), AR_OK, "%s", ar_last_error());
    /* bob may not beat for alice's provider */
    cr_assert_eq(ar_market_heartbeat(f.c, f.bob, id, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_PERMISSION_DENIED);
    cr_assert_eq(ar_market_heartbeat(f.c, f.alice, id + 100, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_NOT_FOUND);

    ar_market_provider *ps;
    size_t n;
    cr_assert_eq(ar_market_providers(f.c, f.bob, false, &ps, &n, &status), AR_OK, "%s", ar_last_error());
    cr_assert_eq(n, 1);
    cr_assert_eq(ps[0].p.id, id);
    cr_assert_str_eq(ps[0].account, "alice");
    cr_assert_str_eq(ps[0].p.address, "127.0.0.1:6001");
    cr_assert_eq(ps[0].p.gflops, PROFILE.gflops);
    cr_assert_eq(ps[0].p.mem_bytes, PROFILE.mem_bytes);
    cr_assert_eq(ps[0].p.cores, PROFILE.cores);
    cr_assert_eq(ps[0].p.price_per_tflop, PROFILE.price_per_tflop);
    cr_assert_eq(ps[0].p.reliability, AR_RELIABILITY_NEW); /* its account's: a new one */
    cr_assert_float_eq(ps[0].speed_gflops, PROFILE.gflops, 1e-9); /* not observed yet: its claim */
    cr_assert(ps[0].p.online);
    free(ps);
    teardown(&f);
}

Test(market, bad_tokens_and_fields_are_refused)
{
    fixture f;
    setup(&f, 0);
    int status = -1;
    int64_t id;
    char bad[AR_TOKEN_LEN];
    memset(bad, 'a', AR_TOKEN_LEN - 1);
    bad[AR_TOKEN_LEN - 1] = '\0';
    const char *tokens[] = {"", "short", bad};
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(ar_market_register(f.c, tokens[i], "127.0.0.1:6001", &PROFILE, &id, NULL, &status),
                     AR_EPROTO);
        cr_assert_eq(status, AR_STATUS_UNAUTHENTICATED, "token %d: status %d", i, status);
    }
    cr_assert(strstr(ar_last_error(), "unknown account token"), "%s", ar_last_error());

    ar_market_profile p = PROFILE;
    p.cores = 0;
    cr_assert_eq(ar_market_register(f.c, f.alice, "127.0.0.1:6001", &p, &id, NULL, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_INVALID_ARGUMENT);
    cr_assert_eq(ar_market_register(f.c, f.alice, "nohost", &PROFILE, &id, NULL, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_INVALID_ARGUMENT);
    cr_assert_eq(ar_market_register(f.c, f.alice, "[::1:6001", &PROFILE, &id, NULL, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_INVALID_ARGUMENT);
    /* a bracketed IPv6 host is fine */
    cr_assert_eq(ar_market_register(f.c, f.alice, "[::1]:6001", &PROFILE, &id, NULL, &status), AR_OK,
                 "%s", ar_last_error());
    teardown(&f);
}

Test(market, ledger_and_balance)
{
    fixture f;
    setup(&f, 0);
    int status = -1;
    char name[AR_NAME_MAX];
    int64_t balance = 0;
    cr_assert_eq(ar_market_balance(f.c, f.bob, name, &balance, &status), AR_OK, "%s", ar_last_error());
    cr_assert_str_eq(name, "bob");
    cr_assert_eq(balance, 1500000);

    ar_ledger_row *rows;
    size_t n;
    int64_t pending = -1;
    cr_assert_eq(ar_market_ledger(f.c, f.alice, NULL, name, &rows, &n, &balance, &pending, &status), AR_OK,
                 "%s", ar_last_error());
    cr_assert_eq(pending, 0);
    cr_assert_str_eq(name, "alice");
    cr_assert_eq(n, 1);
    cr_assert_eq(rows[0].amount, AR_CREDITS(10));
    cr_assert_str_eq(rows[0].reason, "mint");
    cr_assert_eq(balance, AR_CREDITS(10));
    free(rows);

    cr_assert_eq(ar_market_ledger(f.c, f.alice, "bob", name, &rows, &n, &balance, NULL, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_PERMISSION_DENIED);
    cr_assert_null(rows);
    teardown(&f);
}

Test(market, silent_providers_go_offline)
{
    fixture f;
    setup(&f, 1);
    int64_t id;
    int status;
    cr_assert_eq(ar_market_register(f.c, f.alice, "127.0.0.1:6001", &PROFILE, &id, NULL, &status), AR_OK);
    ar_market_provider *ps = NULL;
    size_t n = 1;
    double end = ar_now() + 10;
    while (n > 0 && ar_now() < end) {
        free(ps);
        usleep(200 * 1000);
        cr_assert_eq(ar_market_providers(f.c, f.bob, false, &ps, &n, &status), AR_OK);
    }
    free(ps);
    cr_assert_eq(n, 0, "the provider is still online after 10 s");
    cr_assert_eq(ar_market_providers(f.c, f.bob, true, &ps, &n, &status), AR_OK);
    cr_assert_eq(n, 1);
    cr_assert(!ps[0].p.online);
    free(ps);
    /* a heartbeat brings it back */
    cr_assert_eq(ar_market_heartbeat(f.c, f.alice, id, &status), AR_OK);
    cr_assert_eq(ar_market_providers(f.c, f.bob, false, &ps, &n, &status), AR_OK);
    cr_assert_eq(n, 1);
    free(ps);
    teardown(&f);
}

/* ReportProgress: the driver's snapshot for the dashboard, checked field by
 * field; the plan is stored as JSON the market wrote itself. */
Test(market, progress_reports_are_checked_and_stored)
{
    fixture f;
    setup(&f, 0);
    int64_t pid = 0;
    int status = -1;
    cr_assert_eq(ar_market_register(f.c, f.alice, "127.0.0.1:6001", &PROFILE, &pid, NULL, &status), AR_OK);
    ar_market_lease_request q = {.devices = 1, .est_steps = 10, .spec = "mlp", .flops_per_step = 1000000,
                                 .model_spec = "{\"type\": \"mlp\", \"inputs\": 8, \"hidden\": [6, 6], "
                                               "\"classes\": 3, \"activation\": \"relu\", \"dropout\": 0}",
                                 .mb_rows = 4, .micro_batches = 1};
    ar_market_lease lease;
    cr_assert_eq(ar_market_acquire(f.c, f.bob, &q, &lease, &status), AR_OK, "%s", ar_last_error());

    double busy[1] = {0.5}, idle[1] = {0.25};
    ar_market_plan_stage st = {.first_unit = 0, .last_unit = 3, .layers = "linear 0-2", .predicted_ms = 1.5,
                               .n_members = 1, .members = {{.provider_id = pid, .device = "127.0.0.1:6001"}}};
    ar_market_progress p = {.step = 5, .total_steps = 10, .items_per_s = 1200, .unit = "samples", .eta_s = 4,
                            .has_val = true, .val_step = 5, .val_loss = 0.75, .wall_s = 1.0, .n_stages = 1,
                            .busy_s = busy, .idle_s = idle, .n_plan = 1, .plan = &st, .model = "mlp, 10 parameters",
                            .schedule = "1f1b", .micro_batches = 4, .predicted_bubble = 0};
    cr_assert_eq(ar_market_report_progress(f.c, lease.token, &p, &status), AR_OK, "%s", ar_last_error());

    /* what the driver must not send */
    ar_market_progress bad = p;
    bad.unit = "bananas";
    cr_assert_eq(ar_market_report_progress(f.c, lease.token, &bad, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_INVALID_ARGUMENT);
    bad = p;
    bad.items_per_s = -1;
    cr_assert_eq(ar_market_report_progress(f.c, lease.token, &bad, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_INVALID_ARGUMENT);
    ar_market_plan_stage bad_st = st;
    bad_st.members[0].device = "<script>:1";
    bad = p;
    bad.plan = &bad_st;
    cr_assert_eq(ar_market_report_progress(f.c, lease.token, &bad, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_INVALID_ARGUMENT);
    cr_assert(strstr(ar_last_error(), "not allowed"), "%s", ar_last_error());
    bad_st = st;
    bad_st.first_unit = 3; /* an empty range */
    cr_assert_eq(ar_market_report_progress(f.c, lease.token, &bad, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_INVALID_ARGUMENT);
    char unknown[AR_TOKEN_LEN];
    memset(unknown, 'a', AR_TOKEN_LEN - 1);
    unknown[AR_TOKEN_LEN - 1] = 0;
    cr_assert_eq(ar_market_report_progress(f.c, unknown, &p, &status), AR_EPROTO);
    cr_assert_eq(status, AR_STATUS_UNAUTHENTICATED);

    /* a later report without the plan keeps it */
    p.step = 6;
    p.n_plan = 0;
    p.has_val = false;
    cr_assert_eq(ar_market_report_progress(f.c, lease.token, &p, &status), AR_OK, "%s", ar_last_error());

    ar_store *s;
    cr_assert_eq(ar_store_open(f.db, &s), AR_OK);
    ar_job_live live;
    cr_assert_eq(ar_store_job_live_get(s, lease.job_id, &live), AR_OK, "%s", ar_last_error());
    cr_assert_eq(live.step, 6);
    cr_assert_eq(live.total_steps, 10);
    cr_assert_str_eq(live.unit, "samples");
    cr_assert_not_null(live.plan);
    cr_assert(strstr(live.plan, "\"layers\":\"linear 0-2\""), "%s", live.plan);
    cr_assert(strstr(live.plan, "\"device\":\"127.0.0.1:6001\""), "%s", live.plan);
    cr_assert(strstr(live.plan, "\"schedule\":\"1f1b\""), "%s", live.plan);
    cr_assert_null(strstr(live.plan, "heads"), "%s", live.plan); /* whole layers: no head ranges */
    ar_store_job_live_clear(&live);
    ar_job_point *val;
    size_t n;
    cr_assert_eq(ar_store_job_val(s, lease.job_id, &val, &n), AR_OK);
    cr_assert_eq(n, 1);
    cr_assert_eq(val[0].step, 5);
    ar_free(val);
    ar_stage_time *t;
    cr_assert_eq(ar_store_job_stage_times(s, lease.job_id, &t, &n), AR_OK);
    cr_assert_eq(n, 2);
    cr_assert_float_eq(t[1].busy_s, 0.5, 1e-12);
    ar_free(t);
    ar_store_close(s);
    teardown(&f);
}
