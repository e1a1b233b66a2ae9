/* The training driver (see driver.h): one run, on one device, on stages in
 * this process, or on workers; the data and the market's side of a run are
 * driver_data.c and driver_market.c (driver_internal.h). */
#include "run/driver_internal.h"

#include "core/blas.h"
#include "core/device.h"
#include "core/profile.h"
#include "core/progress.h"
#include "nn/safetensors.h"
#include "train/checkpoint.h"
#include "market/money.h"
#include "train/pipeline.h"
#include "train/plot.h"
#include "train/schedule.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void ar_train_config_defaults(ar_train_config *c, int model_type)
{
    memset(c, 0, sizeof *c);
    c->steps = model_type == AR_MODEL_GPT ? 3000 : 469; /* MLP: one epoch of 60,000 at 128 */
    c->batch = model_type == AR_MODEL_GPT ? 16 : 128;
    c->micro_batches = 1;
    c->stages = 1;
    c->schedule = 1; /* 1F1B */
    c->compress = AR_COMPRESS_AUTO;
    /* measured on Fashion-MNIST, 1 epoch: lr 1e-3 gives 85.1%, 3e-3 gives 86.2-86.4% */
    c->lr = model_type == AR_MODEL_GPT ? 1e-3f : 3e-3f;
    c->min_lr = 1e-4f;
    c->warmup = model_type == AR_MODEL_GPT ? 100 : 20;
    c->weight_decay = model_type == AR_MODEL_GPT ? 0.1f : 0.0f;
    c->beta1 = 0.9f;
    c->beta2 = 0.99f;
    c->eps = 1e-8f;
    c->clip = 1.0f;
    c->seed = 1337;
    c->eval_every = model_type == AR_MODEL_GPT ? 250 : 100;
    c->eval_batches = 40;
    c->ckpt_every = -1;
    c->audit_rate = AR_AUDIT_RATE_AUTO;
}

float ar_lr_at(long step, float lr, float min_lr, long warmup, long total)
{
    if (step < warmup)
        return lr * (float)(step + 1) / (float)warmup;
    long span = total - warmup > 1 ? total - warmup : 1;
    double p = (double)(step - warmup) / (double)span;
    if (p > 1)
        p = 1;
    return (float)(min_lr + 0.5 * (lr - min_lr) * (1.0 + cos(M_PI * p)));
}

/* ---- the run ----------------------------------------------------------- */


static int eval_model(run *r, int64_t step, double *val_loss, double *accuracy)
{
    ar_train_config *c = r->c;
    double loss_sum = 0, correct = 0, count = 0;
    int rc = AR_OK;
    ar_batch_desc b = {.step = step, .M = 1, .dtype = r->data.is_text ? 1 : 0,
                       .row_elems = r->row_elems, .row_targets = r->data.is_text ? (size_t)r->T : 1};
    if (r->data.is_text) {
        /* the same val batches at every evaluation: a fixed seed */
        ar_rng rng;
        ar_rng_seed(&rng, ar_hash3(r->data.seed, 0xe7a1, 0));
        for (int i = 0; i < c->eval_batches && rc == AR_OK; i++) {
            rc = ar_text_batch(&r->data.text, 1, &rng, r->B, r->T, r->inputs, r->targets);
            for (int row = 0; rc == AR_OK && row < r->B; row += r->rows_per_mb) {
                b.B = r->rows_per_mb;
                b.inputs = (int32_t *)r->inputs + (size_t)row * r->T;
                b.targets = r->targets + (size_t)row * r->T;
                rc = ar_chain_eval(r->head, &b, r->timeout, &loss_sum, &correct, &count);
            }
        }
    } else {
        const ar_image_set *t = &r->data.test;
        for (int row = 0; row < t->count && rc == AR_OK; row += r->rows_per_mb) {
            int n = t->count - row < r->rows_per_mb ? t->count - row : r->rows_per_mb;
            b.B = n;
            b.inputs = t->images + (size_t)row * t->features;
            b.targets = t->labels + row;
            rc = ar_chain_eval(r->head, &b, r->timeout, &loss_sum, &correct, &count);
        }
    }
    if (rc != AR_OK)
        return rc;
    *val_loss = count > 0 ? loss_sum / count : NAN;
    *accuracy = count > 0 ? correct / count : NAN;
    return AR_OK;
}

static void state_from_run(const run *r, long step, ar_train_state *s)
{
    const ar_train_config *c = r->c;
    memset(s, 0, sizeof *s);
    s->step = step;
    s->opt_step = r->stages[0].opt_step;
    s->seed = c->seed;
    memcpy(s->data_rng, r->data.rng.s, sizeof s->data_rng);
    s->data_pos = r->data.pos;
    s->steps = c->steps;
    s->batch = c->batch;
    s->micro_batches = c->micro_batches;
    s->optimizer = c->optimizer;
    s->lr = c->lr;
    s->min_lr = c->min_lr;
    s->warmup = c->warmup;
    s->weight_decay = c->weight_decay;
    s->beta1 = c->beta1;
    s->beta2 = c->beta2;
    s->eps = c->eps;
    s->clip = c->clip;
    s->market_job = r->leased ? r->lease.job_id : 0;
}

/* Every stage's state into r->stages (the shadows of remote stages and of
 * in-process groups), once every stage has applied its last update. */
static int fetch_state(run *r)
{
    int rc = ar_chain_sync(r->head, r->timeout);
    if (rc != AR_OK)
        return rc;
    /* the steps before a checkpoint are paid before it is written, if the
     * market answers: a driver that dies and resumes from it redoes (and
     * pays) only the steps after it, so any unpaid before it would be lost */
    if (r->leased)
        ar_reporter_keep_up(&r->reporter, 0, REPORT_STALL_S);
    for (int i = 0; r->remote && i < r->S; i++)
        if ((rc = ar_remote_stage_save(&r->groups[i], &r->shadows[i])) != AR_OK)
            return ar_fail(rc, "saving stage %d: %s", i, ar_last_error());
    if (r->tp_local && (rc = ar_local_to_full(&r->pipe, r->shadows)) != AR_OK)
        return rc;
    return AR_OK;
}

/* The state fetched (fetch_state) written as the checkpoint of `step`. */
static int write_checkpoint(run *r, long step)
{
    int rc;
    ar_train_state st;
    state_from_run(r, step, &st);
    if ((rc = ar_checkpoint_save(r->c->out_dir, r->stage_ptrs, r->S, &st)) != AR_OK)
        return rc;
    /* a lost stage restarts from here now */
    r->restore_dir = r->c->out_dir;
    r->restore_step = step;
    r->last_ckpt_t = ar_now();
    r->failures = 0;
    return AR_OK;
}

static int save_checkpoint(run *r, long step)
{
    int rc = fetch_state(r);
    return rc == AR_OK ? write_checkpoint(r, step) : rc;
}

/* The loss curves travel with the checkpoint (curve.safetensors: "train" and
 * "val", (n, 2) rows of step, loss) so that a resumed run draws them whole. */
static int pack_curve(const double *xs, const double *ys, long n, float **out)
{
    *out = ar_calloc((size_t)(n > 0 ? n : 1) * 2, sizeof(float));
    if (!*out)
        return AR_ENOMEM;
    for (long i = 0; i < n; i++) {
        (*out)[2 * i] = (float)xs[i];
        (*out)[2 * i + 1] = (float)ys[i];
    }
    return AR_OK;
}

static void save_curve(run *r)
{
    float *train = NULL, *val = NULL;
    char path[4096];
    snprintf(path, sizeof path, "%s/curve.safetensors", r->c->out_dir);
    int rc = pack_curve(r->curve_x, r->curve_y, r->ncurve, &train);
    if (rc == AR_OK)
        rc = pack_curve(r->val_x, r->val_y, r->nval, &val);
    if (rc == AR_OK) {
        ar_st_tensor t[2] = {{.name = "train", .dtype = AR_F32, .ndim = 2, .shape = {r->ncurve, 2},
                              .nbytes = (size_t)r->ncurve * 2 * sizeof(float), .data = train},
                             {.name = "val", .dtype = AR_F32, .ndim = 2, .shape = {r->nval, 2},
                              .nbytes = (size_t)r->nval * 2 * sizeof(float), .data = val}};
        rc = ar_st_save(path, t, 2, NULL, NULL, 0);
    }
    if (rc != AR_OK)
        ar_log(AR_LOG_WARN, "could not save the loss curve %s: %s", path, ar_last_error());
    ar_free(train);
    ar_free(val);
}

static int record(double **xs, double **ys, long *n, double x, double y);

/* Seed the curves from a checkpoint's curve.safetensors, up to its step. */
static void load_curve(run *r, const char *dir, long upto)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/curve.safetensors", dir);
    ar_st_file f;
    if (ar_st_load(path, &f) != AR_OK)
        return; /* an older checkpoint: the curve starts at the resume */
    const char *names[2] = {"train", "val"};
    for (int k = 0; k < 2; k++) {
        const ar_st_tensor *t = ar_st_find(&f, names[k]);
        if (!t || t->dtype != AR_F32 || t->ndim != 2 || t->shape[1] != 2)
            continue;
        const float *v = t->data;
        for (int64_t i = 0; i < t->shape[0] && v[2 * i] <= upto; i++)
            if (k == 0)
                record(&r->curve_x, &r->curve_y, &r->ncurve, v[2 * i], v[2 * i + 1]);
            else
                record(&r->val_x, &r->val_y, &r->nval, v[2 * i], v[2 * i + 1]);
    }
    ar_st_free(&f);
}

static void draw_curve(run *r)
{
    save_curve(r);
    char path[4096];
    snprintf(path, sizeof path, "%s/loss.svg", r->c->out_dir);
    ar_plot_series s[2] = {{"train loss", r->curve_x, r->curve_y, (int)r->ncurve, NULL},
                           {r->data.is_text ? "val loss" : "test loss", r->val_x, r->val_y,
                            (int)r->nval, NULL}};
    if (ar_plot_svg(path, "Arceus training", s, 2) != AR_OK)
        ar_log(AR_LOG_WARN, "could not draw %s: %s", path, ar_last_error());
}

/* Apply a stored recipe except for what the user set explicitly. */
static void apply_state_recipe(ar_train_config *c, const ar_train_state *s)
{
    if (!(c->set_mask & AR_SET_STEPS)) c->steps = s->steps;
    if (!(c->set_mask & AR_SET_BATCH)) c->batch = s->batch;
    if (!(c->set_mask & AR_SET_MB)) c->micro_batches = s->micro_batches;
    if (!(c->set_mask & AR_SET_LR)) c->lr = s->lr;
    if (!(c->set_mask & AR_SET_MIN_LR)) c->min_lr = s->min_lr;
    if (!(c->set_mask & AR_SET_WARMUP)) c->warmup = s->warmup;
    if (!(c->set_mask & AR_SET_WD)) c->weight_decay = s->weight_decay;
    if (!(c->set_mask & AR_SET_CLIP)) c->clip = s->clip;
    if (!(c->set_mask & AR_SET_OPT)) c->optimizer = s->optimizer;
    c->seed = s->seed; /* the data order and dropout depend on it */
    c->beta1 = s->beta1;
    c->beta2 = s->beta2;
    c->eps = s->eps;
}

static int check_out_dir(const char *dir)
{
    if (ar_mkdir_p(dir) != AR_OK)
        return ar_fail(AR_EIO, "--out %s", ar_last_error());
    char probe[4096];
    snprintf(probe, sizeof probe, "%s/.arceus-write-test", dir);
    FILE *f = fopen(probe, "w");
    if (!f)
        return ar_fail(AR_EIO, "--out %s: cannot write there: %s", dir, strerror(errno));
    fclose(f);
    remove(probe);
    return AR_OK;
}

static void log_json(run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_json(run *r, const char *fmt, ...)
{
    if (!r->log)
        return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(r->log, fmt, ap);
    va_end(ap);
    fputc('\n', r->log);
    fflush(r->log);
}

static int grow(double **arr, long n)
{
    if ((n & (n - 1)) != 0 && n != 0)
        return AR_OK;
    long cap = n ? 2 * n : 64;
    double *p = realloc(*arr, (size_t)cap * sizeof(double));
    if (!p)
        return ar_fail(AR_ENOMEM, "out of memory for the loss curve");
    *arr = p;
    return AR_OK;
}

static int record(double **xs, double **ys, long *n, double x, double y)
{
    if (*n < 64 || ((*n & (*n - 1)) == 0)) {
        int rc = grow(xs, *n);
        if (rc == AR_OK)
            rc = grow(ys, *n);
        if (rc != AR_OK)
            return rc;
    }
    (*xs)[*n] = x;
    (*ys)[*n] = y;
    (*n)++;
    return AR_OK;
}

/* "HOST:PORT,HOST:PORT,...": one stage per worker, in pipeline order. */
static int parse_workers(run *r, const char *list)
{
    r->remote = 1;
    r->S = 0;
    const char *p = list;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == 0 || n >= sizeof r->addrs[0] || !memchr(p, ':', n))
            return ar_fail(AR_EINVAL, "--workers: \"%.*s\" is not HOST:PORT", (int)n, p);
        if (r->S >= 64)
            return ar_fail(AR_EINVAL, "--workers: at most 64 workers");
        memcpy(r->addrs[r->S], p, n);
        r->addrs[r->S][n] = '\0';
        r->S++;
        p += n + (end ? 1 : 0);
        if (end && !*p)
            return ar_fail(AR_EINVAL, "--workers: trailing comma in \"%s\"", list);
    }
    if (r->S == 0)
        return ar_fail(AR_EINVAL, "--workers: no worker given");
    /* the last --spares workers wait to replace a lost stage */
    int spares = r->c->spares;
    if (spares >= r->S)
        return ar_fail(AR_EINVAL, "--spares %d leaves no worker of the %d given to train on", spares, r->S);
    r->S -= spares;
    for (int i = 0; i < spares; i++)
        memcpy(r->spare_addrs[i], r->addrs[r->S + i], sizeof r->spare_addrs[i]);
    r->nspares = spares;
    return AR_OK;
}

/* Split the model's units over the devices: the planner's choice, or the
 * user's --plan. Devices the plan leaves out are dropped. */
static int make_plan(run *r, int ndev, int print)
{
    ar_train_config *c = r->c;
    int units = ar_spec_units(&r->spec);
    ar_unit_cost *costs = ar_calloc((size_t)units, sizeof *costs);
    if (!costs)
        return AR_ENOMEM;
    /* the links as measured (the driver's own, when a worker holds stage 0) */
    ar_plan_opts opts = {.compress = c->compress};
    for (int i = 0; r->remote && i < r->nlinks; i++)
        if (!r->links[i].from[0])
            opts.driver = r->links[i].f;
    int rc = ar_plan_unit_costs(&r->spec, r->rows_per_mb, costs);
    if (rc == AR_OK && r->leased) {
        /* a lease fixes the split (and with it the price of a step); the
         * links' compression and warm-up are the driver's to choose */
        if ((rc = driver_lease_plan(r, &r->plan)) == AR_OK)
            rc = ar_plan_estimate_ex(&r->plan, costs, units, r->devs, ndev, r->M, c->schedule, &opts);
    } else if (rc == AR_OK) {
        if (c->plan && strcmp(c->plan, "auto") != 0) {
            rc = ar_plan_parse_devices(c->plan, units, r->devs, ndev, &r->plan);
            if (rc == AR_OK)
                rc = ar_plan_estimate_ex(&r->plan, costs, units, r->devs, ndev, r->M, c->schedule, &opts);

        } else {
            rc = ar_plan_auto_ex(costs, units, r->devs, ndev, r->M, c->schedule, &opts, &r->plan);
        }
    }
    if (rc == AR_OK && !c->quiet && print) {
        long params = ar_spec_param_count(&r->spec);
        printf("model: %s, %ld parameters (%.2fM)\n", r->spec.type == AR_MODEL_GPT ? "gpt" : "mlp",
               params, params / 1e6);
        ar_plan_print(stdout, &r->plan, r->devs, costs, &r->spec);
    }
    r->plan_gen++; /* a new plan (after a lost stage too): the dashboard gets it */
    ar_free(costs);
    return rc;
}


/* What each worker of a tensor-parallel group holds (what shows
 * that a member's parameters are its share of the layers, not all). */
static void print_group_shares(const run *r, int i)
{
    const ar_remote_stage *g = &r->groups[i];
    if (g->members < 2 || r->c->quiet)
        return;
    const ar_tp_layout *l = &g->layout;
    for (int k = 0; k < g->members; k++) {
        char heads[48] = "";
        if (r->spec.type == AR_MODEL_GPT)
            snprintf(heads, sizeof heads, "heads %d-%d, ", l->heads[k].begin, l->heads[k].end - 1);
        printf("stage %d %s %s: %shidden %d-%d, %llu parameters held\n", i, k ? "rank  " : "leader",
               g->addrs[k], heads, l->hidden[k][0].begin, l->hidden[k][0].end - 1,
               (unsigned long long)g->params[k]);
    }
    fflush(stdout);
}

static int load_stages(run *r, int restore);

/* What was measured of the link from `from` ("" for the driver) to `to`;
 * NULL when it was not. */
static const ar_link_figures *link_known(const run *r, const char *from, const char *to)
{
    for (int i = 0; i < r->nlinks; i++)
        if (strcmp(r->links[i].from, from) == 0 && (!to || strcmp(r->links[i].to, to) == 0))
            return &r->links[i].f;
    return NULL;
}

/* Device i's link to the next device, as the planner prices it: measured
 * to the next worker given, else to any worker, else unknown (loopback). */
static void device_link(const run *r, int i, int n, ar_device *d)
{
    const ar_link_figures *f = i + 1 < n ? link_known(r, r->addrs[i], r->addrs[i + 1]) : NULL;
    if (!f)
        f = link_known(r, r->addrs[i], NULL);
    d->bandwidth = f ? f->down_Bps : 0;
    d->bandwidth_up = f ? f->up_Bps : 0;
    d->rtt = f ? f->rtt_s : 0;
}

/* Greet every worker, split the units, build the shadows, Load (and on
 * resume Restore, from resume_dir) every stage, then open the stream to
 * stage 0 (one pass of setup_remote). */
static int setup_pass(run *r, const ar_train_state *resume, const char *resume_dir, int print)
{
    const ar_optim_config *oc = &r->oc;
    ar_train_config *c = r->c;
    int units = ar_spec_units(&r->spec);
    int first[64], last[64], rc;
    if (r->S > units)
        return ar_fail(AR_EINVAL, "%d workers for a model of %d layers: each needs at least one", r->S, units);
    int threads = 0, tp_capable[64] = {0}, relay_capable[64] = {0};
    for (int i = 0; i < r->S; i++) {
        ar_hello_info h;
        if ((rc = driver_open_worker(r, i, &r->clients[i])) != AR_OK)
            return ar_fail(rc, "worker %d (%s): %s", i, r->addrs[i], ar_last_error());
        if ((rc = ar_remote_hello(r->clients[i], &h)) != AR_OK)
            return ar_fail(rc, "worker %d (%s): %s", i, r->addrs[i], ar_last_error());
        if (i == 0 || h.threads < threads)
            threads = h.threads;
        tp_capable[i] = strstr(h.capabilities, "tensor-parallel") != NULL;
        relay_capable[i] = strstr(h.capabilities, "relay") != NULL;
        ar_device *d = &r->devs[i];
        size_t n = strnlen(r->addrs[i], sizeof d->name - 1);
        memcpy(d->name, r->addrs[i], n); /* (snprintf trips gcc's restrict check here) */
        d->name[n] = '\0';
        d->gflops = h.gflops > 0 ? h.gflops : 1;
        d->mem_bytes = (double)h.free_memory;
        device_link(r, i, r->S, d); /* as setup measured them, or unknown yet */
        d->solo = !tp_capable[i] || r->leased; /* (groups over providers: not yet) */
        if (r->offers[i].known) {
            /* plan over what the market measured and the provider offers */
            d->gflops = r->offers[i].gflops > 0 ? r->offers[i].gflops : d->gflops;
            d->mem_bytes = r->offers[i].mem_bytes;
        }
    }
    r->threads_per_stage = threads;
    if ((rc = make_plan(r, r->S, print)) != AR_OK)
        return rc;
    for (int i = 0; i < r->plan.nstages; i++)
        for (int k = 0; r->plan.group_size[i] > 1 && k < r->plan.group_size[i]; k++) {
            int d = r->plan.group[i][k];
            if (r->leased)
                return ar_fail(AR_EINVAL, "--plan: tensor-parallel groups over market providers are not "
                                          "supported yet; name your own workers with --workers");
            if (!tp_capable[d])
                return ar_fail(AR_EINVAL, "worker %s cannot join a tensor-parallel group (it does not say "
                                          "\"tensor-parallel\" in Hello: an older arceus?)", r->addrs[d]);
        }
    /* keep the workers the plan uses, in pipeline order */
    ar_client *used[64];
    char addrs[64][128];
    int keep[64] = {0};
    int64_t pids[64], prices[64];
    char tickets[64][AR_TOKEN_LEN], relays[64][AR_ADDR_MAX], passes[64][sizeof r->passes[0]];
    device_offer offers[64];
    for (int i = 0; i < r->plan.nstages; i++) {
        int d = r->plan.device[i];
        /* a stage followed by one reached through the relay dials it there */
        if (i + 1 < r->plan.nstages && r->relays[r->plan.device[i + 1]][0] && !relay_capable[d])
            return ar_fail(AR_EINVAL, "worker %s cannot reach the next stage's worker %s through the relay (it "
                                      "does not say \"relay\" in Hello: an older arceus?)",
                           r->addrs[d], r->addrs[r->plan.device[i + 1]]);
        pids[i] = r->provider_ids[d];
        memcpy(tickets[i], r->tickets[d], sizeof tickets[i]);
        memcpy(relays[i], r->relays[d], sizeof relays[i]);
        memcpy(passes[i], r->passes[d], sizeof passes[i]);
        prices[i] = r->prices[r->plan.device[i]];
        offers[i] = r->offers[r->plan.device[i]];
        used[i] = r->clients[r->plan.device[i]];
        memcpy(addrs[i], r->addrs[r->plan.device[i]], sizeof addrs[i]);
        keep[r->plan.device[i]] = 1;
        for (int k = 1; k < r->plan.group_size[i]; k++)
            keep[r->plan.group[i][k]] = 1;
        first[i] = r->plan.first[i];
        last[i] = r->plan.last[i];
    }
    for (int i = 0; i < r->S; i++)
        if (!keep[i]) {
            ar_log(AR_LOG_INFO, "worker %s is not used by the plan", r->addrs[i]);
            ar_client_close(r->clients[i]);
        }
    ar_client *orig_clients[64];
    char orig_addrs[64][128];
    memcpy(orig_clients, r->clients, sizeof orig_clients);
    memcpy(orig_addrs, r->addrs, sizeof orig_addrs);
    r->S = r->plan.nstages;
    for (int i = 0; i < r->S; i++) {
        r->clients[i] = used[i];
        memcpy(r->addrs[i], addrs[i], sizeof addrs[i]);
        r->provider_ids[i] = pids[i];
        memcpy(r->tickets[i], tickets[i], sizeof tickets[i]);
        memcpy(r->relays[i], relays[i], sizeof relays[i]);
        memcpy(r->passes[i], passes[i], sizeof passes[i]);
        r->prices[i] = prices[i];
        r->offers[i] = offers[i];
    }
    if (r->leased && (rc = driver_price_stages(r)) != AR_OK)
        return rc;
    /* each stage's workers: its leader, then the rest of its group (those
     * clients move to member_clients, which owns them) */
    if (!(r->groups = ar_calloc((size_t)r->S, sizeof *r->groups)))
        return AR_ENOMEM;
    for (int i = 0; i < r->S; i++) {
        int g = r->plan.group_size[i] > 1 ? r->plan.group_size[i] : 1;
        ar_client *mc[AR_PLAN_MAX_GROUP] = {r->clients[i]};
        const char *ma[AR_PLAN_MAX_GROUP] = {r->addrs[i]};
        double w[AR_PLAN_MAX_GROUP] = {1};
        ar_plan_group_weights(&r->plan, r->devs, i, w);
        for (int k = 1; k < g; k++) {
            int d = r->plan.group[i][k];
            mc[k] = orig_clients[d];
            ma[k] = orig_addrs[d];
            r->member_clients[r->nmember_clients++] = orig_clients[d];
        }
        if ((rc = ar_remote_stage_init(&r->groups[i], &r->spec, first[i], last[i], g, mc, ma, w, c->seed, oc)) != AR_OK)
            return ar_fail(rc, "stage %d: %s", i, ar_last_error());
    }
    for (int i = r->S; i < 64; i++)
        r->clients[i] = NULL;
    for (int i = 0; i < r->S; i++) {
        if ((rc = ar_stage_create(&r->shadows[i], &r->spec, first[i], last[i], 1, 1, c->seed, oc)) != AR_OK)
            return rc;
        r->shadow_ptrs[i] = &r->shadows[i];
        r->nshadows = i + 1;
    }
    r->stages = r->shadows;
    r->stage_ptrs = r->shadow_ptrs;
    if (resume) {
        if ((rc = ar_checkpoint_load_params(resume_dir, r->shadow_ptrs, r->S, 1)) != AR_OK)
            return rc;
        for (int i = 0; i < r->S; i++)
            r->shadows[i].opt_step = resume->opt_step;
        memcpy(r->data.rng.s, resume->data_rng, sizeof r->data.rng.s);
        r->data.pos = resume->data_pos;
    }
    return load_stages(r, resume != NULL);
}

/* Load every stage on its workers (and with `restore`, push its shadow's
 * state to it), then open the stream to stage 0. */
static int load_stages(run *r, int restore)
{
    driver_audit_reset(r);
    ar_train_config *c = r->c;
    int rc;
    /* from the last stage to the first: a stage's Pipe to its successor
     * presents the successor's session, which its Load must carry */
    for (int i = r->S - 1; i >= 0; i--) {
        ar_load_args a = {.spec = &r->spec, .first = r->plan.first[i], .last = r->plan.last[i],
                          .rows = r->rows_per_mb, .micro_batches = r->M, .schedule = c->schedule,
                          .index = i, .count = r->S, .seed = c->seed, .optim = r->oc,
                          .next_worker = i + 1 < r->S ? r->addrs[i + 1] : NULL,
                          .next_session = i + 1 < r->S ? ar_remote_stage_session(&r->groups[i + 1]) : NULL,
                          .ticket = r->leased ? r->tickets[i] : c->worker_token,
                          .next_relay_pass = i + 1 < r->S && r->relays[i + 1][0] ? r->passes[i + 1] : NULL,
                          .next_reverse = driver_edge_reversed(r, i + 1),
                          .extra_warmup = r->plan.extra_warmup[i],
                          .compress_up = r->plan.codec[i],
                          .compress_down = i + 1 < r->S ? r->plan.codec[i + 1] : AR_COMPRESS_NONE,
                          /* a group's links are not measured: compressed only when told to */
                          .compress_tp = c->compress == AR_COMPRESS_AUTO ? AR_COMPRESS_NONE : c->compress,
                          /* the market keeps them with each payment; the driver audits */
                          .commit_digests = r->leased || c->audit_rate > 0};
        if ((rc = ar_remote_stage_load(&r->groups[i], &a)) != AR_OK)
            return rc;
        if (restore && (rc = ar_remote_stage_restore(&r->groups[i], &r->shadows[i])) != AR_OK)
            return ar_fail(rc, "restoring stage %d: %s", i, ar_last_error());
    }
    driver_print_edges(r);
    char name[64];
    snprintf(name, sizeof name, "stage 0 (%.40s)", r->addrs[0]);
    if ((rc = ar_client_pipe_session(r->clients[0], name, AR_NET_DEFAULT_MAX_FRAME,
                                     ar_remote_stage_session(&r->groups[0]), &r->remote_head)) != AR_OK)
        return rc;
    r->head = r->remote_head;
    r->head->compress = r->plan.codec[0];
    /* a new link: its traffic starts from nothing */
    memset(r->head_mark, 0, sizeof r->head_mark);
    return AR_OK;
}

/* Measure every link of the pipeline just set up (the driver's to stage 0,
 * each stage's to the next) and keep the figures by the pair of addresses. */
#define PROBE_TIMEOUT_S 60.0
static int measure_links(run *r)
{
    ar_link_figures f[64];
    int n = 0;
    int rc = ar_chain_probe(r->head, PROBE_TIMEOUT_S, f, 64, &n);
    if (rc != AR_OK)
        return ar_fail(rc, "measuring the links: %s", ar_last_error());
    for (int s = 0; s < n && s < r->S; s++) {
        const char *from = s == 0 ? "" : r->addrs[s - 1];
        int at = 0;
        while (at < r->nlinks && !(strcmp(r->links[at].from, from) == 0 && strcmp(r->links[at].to, r->addrs[s]) == 0))
            at++;
        if (at == r->nlinks) {
            if (r->nlinks >= (int)(sizeof r->links / sizeof r->links[0]))
                break;
            r->nlinks++;
        }
        /* (memcpy: the names are r's own, which snprintf's restrict forbids) */
        memmove(r->links[at].from, from, strlen(from) + 1);
        memmove(r->links[at].to, r->addrs[s], strlen(r->addrs[s]) + 1);
        r->links[at].f = f[s];
        r->plan.link[s] = f[s]; /* what the table shows */
    }
    /* the steps' traffic starts here */
    r->head_mark[0] = r->head->bytes_sent;
    r->head_mark[1] = r->head->raw_sent;
    r->head_mark[2] = r->head->bytes_received;
    r->head_mark[3] = r->head->raw_received;
    return AR_OK;
}

static void drop_remote(run *r);

/* The plan in force as a table (make_plan's, once the links are measured). */
static void print_plan_table(const run *r)
{
    if (r->c->quiet)
        return;
    int units = ar_spec_units(&r->spec);
    ar_unit_cost *costs = ar_calloc((size_t)units, sizeof *costs);
    if (costs && ar_plan_unit_costs(&r->spec, r->rows_per_mb, costs) == AR_OK) {
        long params = ar_spec_param_count(&r->spec);
        printf("model: %s, %ld parameters (%.2fM)\n", r->spec.type == AR_MODEL_GPT ? "gpt" : "mlp", params,
               params / 1e6);
        ar_plan_print(stdout, &r->plan, r->devs, costs, &r->spec);
    }
    ar_free(costs);
}

/* Whether two plans load the same stages the same way: devices, units,
 * groups, and the links' codecs and warm-up (link 0's codec is the driver's
 * alone: stage 0 sends no tensor back to it). */
static int same_loads(const ar_plan *a, const ar_plan *b)
{
    if (a->nstages != b->nstages)
        return 0;
    for (int s = 0; s < a->nstages; s++) {
        if (a->device[s] != b->device[s] || a->first[s] != b->first[s] || a->last[s] != b->last[s] ||
            a->group_size[s] != b->group_size[s] || a->by_speed[s] != b->by_speed[s] ||
            (s > 0 && a->codec[s] != b->codec[s]) || a->extra_warmup[s] != b->extra_warmup[s])
            return 0;
        for (int k = 1; k < a->group_size[s]; k++)
            if (a->group[s][k] != b->group[s][k])
                return 0;
    }
    return 1;
}

/* Set up the pipeline over the workers, with measured links (docs/DESIGN.md,
 * "Slow links"): a first pass plans over what is known (the worker's speed
 * and memory), loads the stages and measures every link of that pipeline
 * over the streams the frames take; the planner then prices the links as
 * measured, choosing each one's compression and the warm-up that covers its
 * round trip. When that plan loads the stages as the first pass did (on
 * loopback, nearly always), the pipeline stands; otherwise it is dropped and
 * loaded again by the new plan (and links it had not measured are measured
 * then). Also how a run recovers from a lost stage: the same steps over the
 * new set of workers, from the last checkpoint. */
static int setup_remote(run *r, const ar_train_state *resume, const char *resume_dir)
{
    /* the workers as given: the first pass keeps only those its plan uses */
    int S = r->S;
    char (*addrs)[128] = malloc(sizeof r->addrs);
    int64_t pids[64], prices[64];
    char (*tickets)[AR_TOKEN_LEN] = malloc(sizeof r->tickets);
    device_offer offers[64];
    if (!addrs || !tickets) {
        free(addrs);
        free(tickets);
        return ar_fail(AR_ENOMEM, "out of memory");
    }
    memcpy(addrs, r->addrs, sizeof r->addrs);
    memcpy(pids, r->provider_ids, sizeof pids);
    memcpy(prices, r->prices, sizeof prices);
    memcpy(tickets, r->tickets, sizeof r->tickets);
    memcpy(offers, r->offers, sizeof offers);
    r->nlinks = 0; /* a new set of workers (a recovery): measured again */
    ar_plan first;
    int rc = setup_pass(r, resume, resume_dir, 0);
    if (rc == AR_OK)
        rc = measure_links(r);
    if (rc == AR_OK) {
        /* the plan over every worker given, as measured */
        first = r->plan;
        int kept = r->S;
        char (*used)[128] = malloc(sizeof r->addrs);
        if (!used)
            rc = ar_fail(AR_ENOMEM, "out of memory");
        if (rc == AR_OK) {
            memcpy(used, r->addrs, sizeof r->addrs);
            memcpy(r->addrs, addrs, sizeof r->addrs);
            for (int i = 0; i < S; i++)
                device_link(r, i, S, &r->devs[i]);
            rc = make_plan(r, S, 0);
            memcpy(r->addrs, used, sizeof r->addrs);
            free(used);
        }
        r->S = kept;
        if (rc == AR_OK && same_loads(&first, &r->plan)) {
            /* the stages stand: the table shows the links as measured */
            for (int s = 0; s < r->plan.nstages; s++)
                r->plan.link[s] = first.link[s];
            r->head->compress = r->plan.codec[0];
            print_plan_table(r);
        } else if (rc == AR_OK) {
            drop_remote(r);
            r->S = S;
            memcpy(r->addrs, addrs, sizeof r->addrs);
            memcpy(r->provider_ids, pids, sizeof pids);
            memcpy(r->prices, prices, sizeof prices);
            memcpy(r->tickets, tickets, sizeof r->tickets);
            memcpy(r->offers, offers, sizeof offers);
            if (!r->c->quiet)
                printf("links measured: loading the stages again for them\n");
            rc = setup_pass(r, resume, resume_dir, 0);
            /* links this pipeline has that the first did not: measured now */
            int unknown = !link_known(r, "", r->addrs[0]);
            for (int s = 1; s < r->S; s++)
                unknown |= !link_known(r, r->addrs[s - 1], r->addrs[s]);
            if (rc == AR_OK && unknown)
                rc = measure_links(r);
            for (int s = 0; rc == AR_OK && s < r->S; s++) {
                const ar_link_figures *f = link_known(r, s ? r->addrs[s - 1] : "", r->addrs[s]);
                if (f)
                    r->plan.link[s] = *f;
            }
            if (rc == AR_OK)
                print_plan_table(r);
        }
    }
    free(addrs);
    free(tickets);
    if (rc == AR_OK) {
        for (int i = 0; i < r->S; i++)
            print_group_shares(r, i);
        fflush(stdout);
    }
    return rc;
}

/* ---- recovery: a stage lost mid-run --------------------------------------- */

/* The remote pipeline gone: the stream to stage 0 cancelled (each worker
 * then drops its stream to the next and goes back to waiting for a Load),
 * the stages' groups and channels closed, the shadows freed. */
static void drop_remote(run *r)
{
    if (r->remote_head) {
        ar_link_destroy(r->remote_head);
        r->remote_head = NULL;
        r->head = NULL;
    }
    for (int i = 0; r->groups && i < r->S; i++)
        ar_remote_stage_destroy(&r->groups[i]);
    ar_free(r->groups);
    r->groups = NULL;
    for (int i = 0; i < 64; i++) {
        ar_client_close(r->clients[i]);
        r->clients[i] = NULL;
    }
    for (int i = 0; i < r->nmember_clients; i++)
        ar_client_close(r->member_clients[i]);
    r->nmember_clients = 0;
    for (int i = 0; i < r->nshadows; i++)
        ar_stage_destroy(&r->shadows[i]);
    r->nshadows = 0;
}


/* Which stages are gone: each worker must answer a Hello within the stage
 * timeout. *why gets "no answer for 5 s" or the reason it is unreachable. */
static int find_lost(run *r, int *lost, char why[][160])
{
    int n = 0;
    double wait = r->timeout > 0 ? r->timeout : DEFAULT_STAGE_TIMEOUT_S;
    for (int i = 0; i < r->S; i++) {
        double t0 = ar_now();
        if (ar_remote_probe(r->clients[i], wait) == AR_OK)
            continue;
        if (ar_now() - t0 >= 0.9 * wait)
            snprintf(why[n], sizeof why[n], "no answer for %.0f s", wait);
        else
            snprintf(why[n], sizeof why[n], "unreachable");
        lost[n++] = i;
    }
    return n;
}

/* Stages reached through the relay that did not answer: the relay broke
 * their streams (it restarted) or their providers have not reattached yet.
 * Probed again until they answer or RELAY_REATTACH_S (or the stage timeout,
 * if longer) has passed; the rest stay lost. The new count. */
static int find_lost_again(run *r, int *lost, char why[][160], int n)
{
    double wait = r->timeout > 0 ? r->timeout : DEFAULT_STAGE_TIMEOUT_S;
    double end = ar_now() + (wait > RELAY_REATTACH_S ? wait : RELAY_REATTACH_S);
    for (;;) {
        int left = 0, relayed = 0;
        for (int k = 0; k < n; k++) {
            int i = lost[k];
            if (r->relays[i][0] && ar_remote_probe(r->clients[i], 1.0) == AR_OK)
                continue;
            relayed += r->relays[i][0] != 0;
            lost[left] = i;
            memmove(why[left], why[k], sizeof why[left]);
            left++;
        }
        n = left;
        if (relayed == 0 || ar_now() >= end)
            return n;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 500 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* The chain failed with `failure` during step *step. When it is a lost
 * stage of a remote pipeline: find who is gone, replace it (a spare worker,
 * or a provider from the market), and restore every stage from the last
 * checkpoint (or the start): *step goes back to the step before it and the
 * run goes on. Training is deterministic, so the result is the same as
 * without the loss. Otherwise, or when there is nobody to replace it, the
 * failure is the run's error. */
static int recover(run *r, int failure, long *step)
{
    ar_train_config *c = r->c;
    if (!r->remote || r->stranded || r->budget_stop || failure == AR_ENOMEM)
        return failure;
    char first[1024];
    snprintf(first, sizeof first, "%s", ar_last_error());
    int lost[64];
    char why[64][160];
    int nlost;
    long kept = r->restore_step;
    if (r->cheat >= 0) {
        /* a stage that failed an audit goes as a lost one does; the run
         * goes back to a state it did not touch: the checkpoint if its last
         * passed audit covers it, the start otherwise */
        lost[0] = r->cheat;
        snprintf(why[0], sizeof why[0], "failed an audit of step %ld", r->audit.failed_step);
        nlost = 1;
        if (kept > r->audit.last_passed[r->cheat] + 1 && kept > 0) {
            ar_log(AR_LOG_WARN, "stage %d's work since step %ld is unverified: back to the start", r->cheat,
                   r->audit.last_passed[r->cheat] + 1);
            r->restore_dir = NULL;
            r->restore_step = kept = 0;
        }
        r->audit.last_passed[r->cheat] = -1;
        r->cheat = -1;
    } else {
        nlost = find_lost(r, lost, why);
        if (nlost > 0 && r->leased && driver_wait_relays(r, lost, nlost, RELAY_WAIT_S))
            nlost = find_lost_again(r, lost, why, nlost);
    }
    if (nlost == 0 && failure != AR_ECLOSED)
        return ar_fail(failure, "%s", first); /* every worker answers: not a lost stage */
    char names[2048] = "every worker answers";
    if (nlost == 0 && c->stage_timeout <= 0 && r->timeout > 0) {
        /* a stream broke, or a step outlasted the timeout: the same workers
         * again, and more time if the default was too short */
        r->timeout *= 2;
        snprintf(names, sizeof names, "every worker answers (stage timeout now %.0f s)", r->timeout);
    } else if (nlost > 0) {
        names[0] = '\0';
    }
    for (int k = 0; k < nlost; k++) {
        size_t at = strlen(names);
        snprintf(names + at, sizeof names - at, "%sstage %d (%.127s) lost: %.159s", k ? "; " : "", lost[k],
                 r->addrs[lost[k]], why[k]);
    }
    if (++r->failures > MAX_FAILURES)
        return ar_fail(failure, "%s; %s: %d losses without a checkpoint in between, giving up", first, names,
                       MAX_FAILURES);
    ar_log(AR_LOG_WARN, "%s (%s); restarting from step %ld", names, first, kept);
    /* step: the steps completed (and paid) when the loss was found */
    log_json(r, "{\"event\": \"stage_lost\", \"step\": %ld, \"restart_step\": %ld}", r->steps_done, kept);
    drop_remote(r);
    int gone[64] = {0}, ngone = 0;
    int64_t lost_ids[64];
    char lost_addrs[64][128];
    for (int k = 0; k < nlost; k++) {
        lost_ids[k] = r->provider_ids[lost[k]];
        memcpy(lost_addrs[k], r->addrs[lost[k]], sizeof lost_addrs[k]);
    }
    for (int k = 0; k < nlost; k++) {
        int i = lost[k];
        int rc, found = 0;
        if (r->leased) {
            /* the market takes the lost provider off the lease, and its
             * members (re-planned when none is free) become the stages */
            if ((rc = driver_replace_from_market(r, lost_ids[k], kept, why[k], &found)) != AR_OK)
                return ar_fail(rc, "%s; stage %d (%s) lost: %s; %s", first, i, lost_addrs[k], why[k], ar_last_error());
            if (!found && !c->quiet)
                printf("  no free provider to replace stage %d: going on with %d\n", i, r->S);
        } else if (r->nspares > 0) {
            memcpy(r->addrs[i], r->spare_addrs[--r->nspares], sizeof r->addrs[i]);
            if (!c->quiet)
                printf("  spare worker %s replaces stage %d\n", r->addrs[i], i);
        } else {
            return ar_fail(failure, "%s; stage %d (%s) lost: %s, and no spare worker to replace it "
                           "(give more --workers and --spares N)", first, i, r->addrs[i], why[k]);
        }
    }
    if (ngone == r->S)
        return ar_fail(failure, "%s; %s, and no free provider at the market to replace them", first, names);
    if (ngone > 0 && !r->leased) {
        int n = 0;
        for (int i = 0; i < r->S; i++)
            if (!gone[i]) {
                memmove(r->addrs[n], r->addrs[i], sizeof r->addrs[n]);
                memmove(r->tickets[n], r->tickets[i], sizeof r->tickets[n]);
                memmove(r->relays[n], r->relays[i], sizeof r->relays[n]);
                memmove(r->passes[n], r->passes[i], sizeof r->passes[n]);
                r->provider_ids[n] = r->provider_ids[i];
                r->prices[n] = r->prices[i];
                r->offers[n] = r->offers[i];
                n++;
            }
        r->S = n;
        if (c->plan && strcmp(c->plan, "auto") != 0) {
            ar_log(AR_LOG_WARN, "--plan %s was written for more devices: planning over %d", c->plan, n);
            c->plan = NULL;
        }
    }
    /* steps after the checkpoint are redone and paid then, by whoever does them */
    if (r->leased)
        ar_reporter_rollback(&r->reporter, kept);
    ar_train_state st;
    int rc;
    if (r->restore_dir) {
        if ((rc = ar_checkpoint_load_state(r->restore_dir, &st)) != AR_OK)
            return rc;
    } else {
        data_source_rewind(&r->data);
    }
    while (r->ncurve > 0 && r->curve_x[r->ncurve - 1] > kept)
        r->ncurve--;
    while (r->nval > 0 && r->val_x[r->nval - 1] > kept)
        r->nval--;
    if ((rc = setup_remote(r, r->restore_dir ? &st : NULL, r->restore_dir)) != AR_OK)
        return rc;
    if (!c->quiet) {
        printf("restored every stage from %s; training goes on from step %ld\n",
               r->restore_dir ? r->restore_dir : "the start", kept);
        fflush(stdout);
    }
    *step = kept - 1; /* the loop's step++ makes it `kept` */
    r->steps_done = kept;
    r->recovered = 1;
    return AR_OK;
}

/* ---- a graceful leave: a stage moved, nothing redone ------------------------ */

/* The checkpoint of a run that cannot go on without the stages it had: the
 * state already fetched (fetch_state), written when there is an --out. Its
 * words for the message: where it is, or why there is none. */
static void keep_state(run *r, long done, char *where, size_t size)
{
    if (!r->c->out_dir) {
        snprintf(where, size, "the run has no --out, so its state is not kept");
        return;
    }
    if (write_checkpoint(r, done) != AR_OK) {
        snprintf(where, size, "writing the checkpoint failed: %.300s", ar_last_error());
        return;
    }
    draw_curve(r);
    snprintf(where, size, "checkpoint of step %ld in %.300s (--resume it when a device can take the stage)", done,
             r->c->out_dir);
}

/* A new worker at leaving stage i's place: its channel, its Hello (protocol
 * version, speed, memory), the stage's group on it. */
static int take_place(run *r, int i, const char *addr)
{
    ar_client *c = NULL;
    ar_hello_info h;
    /* (a provider the market reaches through its relay only: there too) */
    int rc = r->relays[i][0] ? ar_client_open_relayed(addr, r->relays[i], r->passes[i], &c) : ar_client_open(addr, &c);
    if (rc == AR_OK)
        rc = ar_remote_hello(c, &h);
    if (rc != AR_OK) {
        ar_client_close(c);
        return ar_fail(rc, "stage %d's new worker %s: %s", i, addr, ar_last_error());
    }
    ar_remote_stage_destroy(&r->groups[i]);
    ar_client_close(r->clients[i]);
    r->clients[i] = c;
    snprintf(r->addrs[i], sizeof r->addrs[i], "%s", addr);
    ar_device *d = &r->devs[r->plan.device[i]];
    size_t len = strnlen(addr, sizeof d->name - 1);
    memcpy(d->name, addr, len); /* (as setup_remote: the name is the address, cut to fit) */
    d->name[len] = '\0';
    d->gflops = r->offers[i].known && r->offers[i].gflops > 0 ? r->offers[i].gflops : h.gflops > 0 ? h.gflops : 1;
    d->mem_bytes = r->offers[i].known ? r->offers[i].mem_bytes : (double)h.free_memory;
    ar_client *mc[1] = {c};
    const char *ma[1] = {r->addrs[i]};
    return ar_remote_stage_init(&r->groups[i], &r->spec, r->plan.first[i], r->plan.last[i], 1, mc, ma, NULL,
                                r->c->seed, &r->oc);
}

/* After `done` completed steps, the stages whose devices said they are
 * leaving (res->leaving: their owner wants them back, or they are stopping)
 * move: every stage's state is fetched (the leaver's must be, and the
 * others are Loaded again), the pipeline closed, which releases the leavers,
 * each leaver's place given to another device (a spare worker, or a free
 * provider the market hands the place over to: not a loss, nothing
 * reversed), every stage Loaded and Restored, and training goes on at step
 * `done`: nothing is redone. No device to take a place: the state is kept
 * as a checkpoint and the run ends saying so (r->stranded). */
static int move_leaving(run *r, const ar_step_result *res, long done)
{
    ar_train_config *c = r->c;
    int leaving[64], n = 0, rc;
    for (int i = 0; i < res->nstages && i < r->S; i++) {
        if (!res->leaving[i])
            continue;
        if (r->plan.group_size[i] > 1) {
            if (!r->group_leave_warned++)
                ar_log(AR_LOG_WARN, "stage %d (%s) is leaving, but a tensor-parallel group cannot move yet: "
                       "if it goes, it is recovered as lost", i, r->addrs[i]);
            continue;
        }
        leaving[n++] = i;
    }
    if (n == 0)
        return AR_OK;
    for (int k = 0; !c->quiet && k < n; k++)
        printf("stage %d (%s) is leaving (its owner wants the machine back, or it is stopping): moving it "
               "after step %ld\n", leaving[k], r->addrs[leaving[k]], done);
    fflush(stdout);
    if ((rc = fetch_state(r)) != AR_OK)
        return rc;
    /* the state is here: the pipeline ends as at the end of a run (STOP
     * down the chain, each worker ending its streams in order, its stage
     * still loaded), and the leavers are free to go */
    if (ar_chain_stop(r->remote_head) == AR_OK && ar_net_link_finish(r->remote_head, 30) != AR_OK)
        ar_log(AR_LOG_DEBUG, "%s", ar_last_error());
    ar_link_destroy(r->remote_head);
    r->remote_head = r->head = NULL;
    char from[64][128];
    for (int k = 0; k < n; k++) {
        int i = leaving[k], found = 0;
        memcpy(from[k], r->addrs[i], sizeof from[k]);
        char addr[128] = "";
        if (r->leased) {
            if ((rc = driver_hand_over(r, i, done, addr, sizeof addr, &found)) != AR_OK) {
                char why[600], where[400];
                snprintf(why, sizeof why, "%s", ar_last_error());
                keep_state(r, done, where, sizeof where);
                r->stranded = 1;
                return ar_fail(rc, "stage %d (%s) is leaving and the market did not hand its place over: %s; %s",
                               i, from[k], why, where);
            }
        } else if (r->nspares > 0) {
            memcpy(addr, r->spare_addrs[--r->nspares], sizeof addr);
            found = 1;
        }
        if (!found) {
            char where[400];
            keep_state(r, done, where, sizeof where);
            r->stranded = 1;
            return ar_fail(AR_ELIMIT, "stage %d (%s) is leaving and %s; %s", i, from[k],
                           r->leased ? "no free provider at the market can take its place"
                                     : "there is no spare worker to take its place (give more --workers and "
                                       "--spares N)",
                           where);
        }
        if ((rc = take_place(r, i, addr)) != AR_OK)
            return rc;
    }
    if (r->leased && (rc = driver_price_stages(r)) != AR_OK)
        return rc;
    if ((rc = load_stages(r, 1)) != AR_OK)
        return rc;
    r->plan_gen++; /* the dashboard gets the new members */
    for (int k = 0; k < n; k++) {
        int i = leaving[k];
        log_json(r, "{\"event\": \"stage_left\", \"step\": %ld, \"stage\": %d, \"from\": \"%s\", \"to\": \"%s\"}",
                 done, i, from[k], r->addrs[i]);
        if (!c->quiet)
            printf("stage %d moved from %s to %s after step %ld: nothing is redone\n", i, from[k], r->addrs[i],
                   done);
    }
    fflush(stdout);
    return AR_OK;
}

static int setup(run *r)
{
    ar_train_config *c = r->c;
    int rc;
    ar_train_state resume_state;
    long start_step = 0;
    if (c->resume_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/spec.json", c->resume_dir);
        if ((rc = ar_spec_load(path, &r->spec)) != AR_OK)
            return rc;
        if ((rc = ar_checkpoint_load_state(c->resume_dir, &resume_state)) != AR_OK)
            return rc;
        apply_state_recipe(c, &resume_state);
        load_curve(r, c->resume_dir, resume_state.step);
        if (!c->out_dir)
            c->out_dir = c->resume_dir; /* keep checkpointing where we resumed from */
        start_step = resume_state.step;
    } else {
        if (!c->model_path)
            return ar_fail(AR_EINVAL, "--model SPEC is required (for example configs/mlp-fashion.json)");
        if ((rc = ar_spec_load(c->model_path, &r->spec)) != AR_OK)
            return rc;
    }
    if (c->batch < 1 || c->micro_batches < 1 || c->batch % c->micro_batches != 0)
        return ar_fail(AR_EINVAL, "--batch %d must be a positive multiple of --micro-batches %d",
                       c->batch, c->micro_batches);
    if (c->steps < 1)
        return ar_fail(AR_EINVAL, "--steps must be at least 1");
    if (start_step >= c->steps)
        return ar_fail(AR_EINVAL, "%s: the run already finished at step %ld of %ld; give a larger --steps to go on",
                       c->resume_dir, start_step, c->steps);
    if (c->out_dir && (rc = check_out_dir(c->out_dir)) != AR_OK)
        return rc;
    if ((rc = data_source_open(&r->data, &r->spec, c->data_path, c->seed)) != AR_OK)
        return rc;
    if (r->spec.type == AR_MODEL_GPT) {
        if (r->spec.has_vocab) {
            /* a checkpoint's vocabulary must be the data's */
            if (r->spec.vocab_size != r->data.text.vocab_size ||
                memcmp(r->spec.vocab, r->data.text.vocab, (size_t)r->spec.vocab_size) != 0)
                return ar_fail(AR_EINVAL, "%s: the text's characters differ from the checkpoint's vocabulary",
                               c->data_path);
        } else {
            if (r->spec.vocab_size != 0 && r->spec.vocab_size != r->data.text.vocab_size)
                return ar_fail(AR_EINVAL, "the spec says vocab_size %d but %s has %d distinct characters",
                               r->spec.vocab_size, c->data_path, r->data.text.vocab_size);
            r->spec.vocab_size = r->data.text.vocab_size;
            memcpy(r->spec.vocab, r->data.text.vocab, (size_t)r->spec.vocab_size);
            r->spec.has_vocab = 1;
        }
    }
    if ((rc = ar_spec_validate(&r->spec, c->model_path ? c->model_path : "spec")) != AR_OK)
        return rc;

    r->M = c->micro_batches;
    r->B = c->batch;
    r->rows_per_mb = r->B / r->M;
    r->T = r->spec.type == AR_MODEL_GPT ? r->spec.block_size : 1;
    r->row_elems = r->spec.type == AR_MODEL_GPT ? (size_t)r->T : (size_t)r->spec.inputs;
    r->inputs = ar_calloc((size_t)r->B * r->row_elems, 4);
    r->targets = ar_calloc((size_t)r->B * r->T, sizeof(int32_t));
    if (!r->inputs || !r->targets)
        return AR_ENOMEM;

    /* stages: contiguous, near-equal unit ranges; the GPT head shares wte
     * with the embedding so they stay together in this version */
    int units = ar_spec_units(&r->spec);
    r->S = c->stages;
    if (c->remote_workers && (rc = parse_workers(r, c->remote_workers)) != AR_OK)
        return rc;
    if (c->market && (rc = driver_acquire_lease(r, start_step, c->resume_dir ? resume_state.market_job : 0)) != AR_OK)
        return rc;
    if (r->S < 1 || r->S > units || r->S > 64)
        return ar_fail(AR_EINVAL, "%d stages for a model of %d layers", r->S, units);
    ar_optim_config oc = {.kind = c->optimizer, .beta1 = c->beta1, .beta2 = c->beta2,
                          .eps = c->eps, .weight_decay = c->weight_decay};
    r->oc = oc;
    r->restore_dir = c->resume_dir;
    r->restore_step = start_step;
    r->timeout = -1; /* in-process stages do not vanish */
    if (r->remote) {
        if ((rc = setup_remote(r, c->resume_dir ? &resume_state : NULL, c->resume_dir)) != AR_OK)
            return rc;
        if (c->log_path && !(r->log = fopen(c->log_path, c->resume_dir ? "a" : "w")))
            return ar_fail(AR_EIO, "--log %s: %s", c->log_path, strerror(errno));
        return (int)start_step;
    }
    /* in-process stages share this machine: equal devices, so the plan
     * balances the work */
    if (r->S > 1 || c->plan) {
        /* the device probe (as workers and providers run it) prices the
         * stages in milliseconds */
        ar_device_info dev;
        if ((rc = ar_device_probe(ar_get_threads(), &dev)) != AR_OK)
            return rc;
        for (int i = 0; i < r->S; i++) {
            snprintf(r->devs[i].name, sizeof r->devs[i].name, "local %d", i);
            r->devs[i].gflops = dev.gflops > 0 ? dev.gflops / r->S : 1;
            /* threads of one process share its cores: a group cannot beat
             * the pipeline here, and --plan auto stays bitwise repeatable
             * whatever the probe measured (a hand plan may still name one) */
            r->devs[i].solo = 1;
        }
        if ((rc = make_plan(r, r->S, 1)) != AR_OK)
            return rc;
        r->S = r->plan.nstages;
    } else {
        r->plan = (ar_plan){.nstages = 1, .first = {0}, .last = {units}};
    }
    r->threads_per_stage = ar_get_threads() / r->S > 0 ? ar_get_threads() / r->S : 1;
    if ((rc = ar_local_create_plan(&r->pipe, &r->spec, &r->plan, r->devs, r->rows_per_mb, r->M,
                                   c->schedule, c->seed, &oc)) != AR_OK)
        return rc;
    r->stages = r->pipe.stages;
    r->stage_ptrs = r->pipe.stage_ptrs;
    if (ar_local_has_tp(&r->pipe)) {
        /* checkpoints see whole blocks: plain stages of the same ranges
         * gather the ranks' slices (ar_local_to_full) */
        for (int i = 0; i < r->S; i++) {
            if ((rc = ar_stage_create(&r->shadows[i], &r->spec, r->plan.first[i], r->plan.last[i], 1, 1,
                                      c->seed, &oc)) != AR_OK)
                return rc;
            r->shadow_ptrs[i] = &r->shadows[i];
            r->nshadows = i + 1;
        }
        r->tp_local = 1;
        r->stages = r->shadows;
        r->stage_ptrs = r->shadow_ptrs;
    }
    if (c->resume_dir) {
        if ((rc = ar_checkpoint_load_params(c->resume_dir, r->stage_ptrs, r->S, 1)) != AR_OK)
            return rc;
        for (int i = 0; i < r->S; i++)
            r->stages[i].opt_step = resume_state.opt_step;
        if (r->tp_local && (rc = ar_local_from_full(&r->pipe, r->shadows)) != AR_OK)
            return rc;
        memcpy(r->data.rng.s, resume_state.data_rng, sizeof r->data.rng.s);
        r->data.pos = resume_state.data_pos;
    }
    /* in-process links compress only when told to (--compress bf16 or int8:
     * the plan's codecs then; a plan of one stage has no link to compress) */
    for (int i = 0; i < r->S && r->plan.nstages == r->S; i++)
        r->pipe.codec[i] = r->plan.codec[i];
    if ((rc = ar_local_start(&r->pipe, c->schedule, c->seed, r->threads_per_stage)) != AR_OK)
        return rc;
    r->head = r->pipe.head;
    if (c->log_path && !(r->log = fopen(c->log_path, c->resume_dir ? "a" : "w")))
        return ar_fail(AR_EIO, "--log %s: %s", c->log_path, strerror(errno));
    return (int)start_step; /* >= 0 */
}

static void teardown(run *r)
{
    char saved[1024]; /* the error that ended the run survives the cleanup */
    snprintf(saved, sizeof saved, "%s", ar_last_error());
    ar_local_destroy(&r->pipe);
    driver_audit_free(r);
    if (r->remote_head) {
        /* STOP flows down the chain; each worker ends its stream in order */
        if (ar_chain_stop(r->remote_head) == AR_OK && ar_net_link_finish(r->remote_head, 30) != AR_OK)
            ar_log(AR_LOG_DEBUG, "%s", ar_last_error());
        ar_link_destroy(r->remote_head);
    }
    for (int i = 0; i < r->nshadows; i++)
        ar_stage_destroy(&r->shadows[i]);
    for (int i = 0; r->groups && i < r->S; i++)
        ar_remote_stage_destroy(&r->groups[i]);
    ar_free(r->groups);
    for (int i = 0; i < 64; i++)
        ar_client_close(r->clients[i]);
    for (int i = 0; i < r->nmember_clients; i++)
        ar_client_close(r->member_clients[i]);
    ar_client_close(r->market);
    ar_reporter_stop(&r->reporter);
    ar_free(r->inputs);
    ar_free(r->targets);
    data_source_close(&r->data);
    if (r->log)
        fclose(r->log);
    free(r->curve_x);
    free(r->curve_y);
    free(r->val_x);
    free(r->val_y);
    ar_fail(AR_OK, "%s", saved);
}

static void print_plan(const run *r)
{
    if (r->c->quiet)
        return;
    if (r->S == 1 && !r->remote) {
        /* (a pipeline's plan was printed as a table by make_plan) */
        long params = ar_spec_param_count(&r->spec);
        printf("model: %s, %ld parameters (%.2fM), %d threads\n",
               r->spec.type == AR_MODEL_GPT ? "gpt" : "mlp", params, params / 1e6,
               r->threads_per_stage);
    }
    /* the kernel too: an audit's verifier may run another (their results are the same bits) */
    printf("batch %d = %d micro-batches of %d, %ld steps, schedule %s, %d threads per stage, sgemm kernel %s\n",
           r->B, r->M, r->rows_per_mb, r->c->steps, ar_schedule_name(r->c->schedule), r->threads_per_stage,
           ar_sgemm_kernel());
    fflush(stdout);
}

/* Whether a checkpoint follows step (its results in): every --checkpoint-every
 * steps, or by default once AUTO_CHECKPOINT_S have passed since the last. */
static int checkpoint_due(const run *r, long step)
{
    const ar_train_config *c = r->c;
    return c->ckpt_every > 0 ? (step + 1) % c->ckpt_every == 0
                             : c->ckpt_every < 0 && ar_now() - r->last_ckpt_t >= AUTO_CHECKPOINT_S;
}

/* Whether step + 1's batch may go before step's results are in: nothing is
 * due between the two (an evaluation, a checkpoint, the end or a stop, a
 * budget that would not cover both, a stage to move). */
static int look_ahead(const run *r, long step, int64_t spent, size_t queued)
{
    const ar_train_config *c = r->c;
    /* --profile times each step's compute alone; a device that said it is
     * leaving moves once nothing is in flight (move_leaving) */
    if (c->profile || r->leave_seen)
        return 0;
    if (step + 1 >= c->steps || (c->stop_after > 0 && step + 1 >= c->stop_after))
        return 0;
    if ((c->eval_every > 0 && (step + 1) % c->eval_every == 0) || (c->out_dir && checkpoint_due(r, step)))
        return 0;
    return !(r->leased && c->max_credits > 0 && spent + ((int64_t)queued + 2) * r->step_cost > c->max_credits);
}

/* The batch of `step` (the data's next, in r->inputs and r->targets) to
 * stage 0, which applies the optimizer itself once the step's gradient norms
 * are in: the learning rate and the clipping go with it. */
static int send_batch(run *r, long step)
{
    ar_train_config *c = r->c;
    int is_text = r->data.is_text;
    ar_batch_desc b = {.step = step, .M = r->M, .B = r->B, .dtype = is_text ? 1 : 0, .inputs = r->inputs,
                       .row_elems = r->row_elems, .targets = r->targets, .row_targets = is_text ? (size_t)r->T : 1};
    float lr = ar_lr_at(step, c->lr, c->min_lr, c->warmup, c->steps);
    int rc = driver_audit_batch(r, step, &b);
    return rc == AR_OK ? ar_chain_send_step(r->head, &b, 1, lr, c->clip) : rc;
}

int ar_train_run(ar_train_config *c)
{
    run r;
    memset(&r, 0, sizeof r);
    r.c = c;
    r.cheat = -1;
    int rc = driver_audit_setup(&r);
    if (rc == AR_OK)
        rc = setup(&r);
    if (rc < 0) {
        driver_release_lease(&r, rc);
        teardown(&r);
        return rc;
    }
    long start = rc;
    r.steps_done = start;
    rc = AR_OK;
    if (r.remote_head)
        r.timeout = c->stage_timeout > 0 ? c->stage_timeout : DEFAULT_STAGE_TIMEOUT_S;
    r.last_ckpt_t = ar_now();
    print_plan(&r);
    ar_progress bar;
    ar_progress_begin(&bar, "train", c->steps, stderr);
    double t0 = ar_now(), last_loss = NAN, last_val = NAN, last_acc = NAN;
    double rate_t = t0;
    long rate_step = start;
    double items_per_step = (double)r.B * r.T;
    int is_text = r.data.is_text;
    /* --profile: every step but the first (a warm-up: pages touched for the
     * first time, the thread pool started), evaluations left out */
    long prof_steps = 0;
    double prof_s = 0;
    long sent = start - 1;        /* the last step whose batch is on its way to stage 0 */
    double results_t = ar_now(); /* when the last step's results came in */
    for (long step = start; step < c->steps; step++) {
        if (r.recovered) {
            /* back to a checkpoint: a batch sent ahead went with the old pipeline */
            sent = step - 1;
            r.recovered = 0;
        }
        if (c->profile && step == start + 1) {
            /* the warm-up step's update may still be running in its stage
             * (nothing was sent ahead under --profile) */
            if ((rc = ar_chain_sync(r.head, r.timeout)) != AR_OK)
                break;
            ar_prof_reset();
            ar_prof_enable(1);
        }
        /* the steps queued for payment count as spent */
        int64_t spent = 0;
        size_t queued = 0;
        if (r.leased)
            ar_reporter_state(&r.reporter, &spent, &queued, NULL, NULL, NULL, NULL);
        if (sent < step && r.leased && c->max_credits > 0 &&
            spent + ((int64_t)queued + 1) * r.step_cost > c->max_credits) {
            /* the budget would not cover this step: keep what was paid for */
            char a[40], b[40], d[40];
            r.budget_stop = 1;
            if (c->out_dir && step > start && (rc = save_checkpoint(&r, step)) != AR_OK)
                break; /* (no recovery: the run is ending) */
            rc = ar_fail(AR_ELIMIT,
                         "budget reached after step %ld: %s of max %s credits spent, the next step costs %s%s%s%s",
                         step, ar_credits_text(spent + (int64_t)queued * r.step_cost, a, sizeof a), ar_credits_text(c->max_credits, b, sizeof b),
                         ar_credits_text(r.step_cost, d, sizeof d),
                         c->out_dir && step > start ? "; checkpoint in " : "",
                         c->out_dir && step > start ? c->out_dir : "",
                         c->out_dir && step > start ? " (--resume it with more credits)" : "");
            break;
        }
        ar_batch_desc b = {.step = step, .M = r.M, .B = r.B};
        double step_t0 = ar_now();
        if (sent < step) {
            if ((rc = data_source_next(&r.data, r.B, r.T, r.inputs, r.targets)) != AR_OK)
                break;
            if ((rc = send_batch(&r, step)) != AR_OK) {
                if ((rc = recover(&r, rc, &step)) == AR_OK)
                    continue;
                break;
            }
            sent = step;
        } else {
            step_t0 = results_t; /* sent ahead: the step began when the last one ended */
        }
        /* the next step's batch goes now, unless something must come between
         * the two steps: stage 0 takes each optimizer step itself, so this
         * link's round trip is off the steps' critical path */
        int ahead = look_ahead(&r, step, spent, queued);
        if (ahead) {
            if ((rc = data_source_next(&r.data, r.B, r.T, r.inputs, r.targets)) != AR_OK)
                break;
            if ((rc = send_batch(&r, step + 1)) != AR_OK) {
                if ((rc = recover(&r, rc, &step)) == AR_OK)
                    continue;
                break;
            }
            sent = step + 1;
        }
        ar_step_result res;
        rc = ar_chain_recv_step(r.head, &b, r.timeout, &res);
        results_t = ar_now();
        double took = results_t - step_t0;
        r.step_wall += took;
        if (rc != AR_OK) {
            if ((rc = recover(&r, rc, &step)) == AR_OK)
                continue;
            break;
        }
        if (took > r.slowest_step) {
            /* a stage may be slow, not gone: the default timeout grows with the steps */
            r.slowest_step = took;
            if (r.remote_head && c->stage_timeout <= 0 && 4 * took > r.timeout)
                r.timeout = 4 * took;
        }
        double sumsq = 0;
        for (int i = 0; i < res.nunits; i++)
            sumsq += res.unit_sumsq[i];
        double norm = sqrt(sumsq);
        if (!isfinite(res.loss) || !isfinite(norm)) {
            rc = ar_fail(AR_EINVAL, "step %ld: the loss or gradient is not finite (loss %g, norm %g); lower --lr", step, res.loss, norm);
            break;
        }
        /* stage 0 has applied the optimizer (torch.nn.utils.clip_grad_norm_'s
         * clipping, ar_chain_send_step): the same lr for the log */
        float lr = ar_lr_at(step, c->lr, c->min_lr, c->warmup, c->steps);
        if (c->profile && step > start) {
            prof_steps++;
            prof_s += ar_now() - step_t0;
        }
        /* paid by the reporter's thread, in order; a refusal of an earlier
         * step (the market's budget, a lease it ended) ends the run */
        if (r.leased && ((rc = ar_reporter_refusal(&r.reporter)) != AR_OK ||
                         (rc = driver_queue_usage(&r, step, &res)) != AR_OK))
            break;
        if (r.leased)
            ar_reporter_keep_up(&r.reporter, REPORT_QUEUE_HIGH, REPORT_STALL_S);
        /* the audits drawn for the step before (this step's digests hold
         * its state after; paid first, so the market has them too): a stage
         * that fails one is replaced as a lost one is */
        int cheat = -1;
        if ((rc = driver_audit_step(&r, step, &res, &cheat)) != AR_OK)
            break;
        if (cheat >= 0) {
            ar_log(AR_LOG_WARN, "stage %d (%s) failed the audit of step %ld: %s", cheat, r.addrs[cheat],
                   r.audit.failed_step, r.audit.why);
            log_json(&r, "{\"event\": \"audit_failed\", \"step\": %ld, \"stage\": %d, \"provider\": %lld}",
                     r.audit.failed_step, cheat, (long long)r.provider_ids[cheat]);
            if (!c->quiet)
                printf("stage %d (%s) failed an audit of step %ld: %s\n", cheat, r.addrs[cheat],
                       r.audit.failed_step, r.audit.why);
            r.cheat = cheat;
            rc = ar_fail(AR_EPROTO, "stage %d failed an audit: %s", cheat, r.audit.why);
            if ((rc = recover(&r, rc, &step)) == AR_OK)
                continue;
            break;
        }
        r.steps_done = step + 1;
        for (int i = 0; i < res.nstages && i < 64; i++) {
            r.busy[i] += res.busy_s[i];
            r.idle[i] += res.idle_s[i];
            r.tp_bytes[i] += res.tp_bytes[i];
        }
        r.tp_steps++;
        /* the driver's own link: what moved since the last step's end (this
         * step's batch, gradients, norms and optimizer step) */
        uint64_t now_c[4] = {r.head->bytes_sent, r.head->raw_sent, r.head->bytes_received, r.head->raw_received};
        res.edges[0] = (ar_edge_bytes){.down = (double)(now_c[0] - r.head_mark[0]),
                                       .down_raw = (double)(now_c[1] - r.head_mark[1]),
                                       .up = (double)(now_c[2] - r.head_mark[2]),
                                       .up_raw = (double)(now_c[3] - r.head_mark[3])};
        memcpy(r.head_mark, now_c, sizeof now_c);
        char links_json[64 * 96] = "";
        size_t lj = 0;
        for (int e = 0; e < r.S && e < 64; e++) {
            ar_edge_bytes *x = &r.edge_sum[e];
            x->down += res.edges[e].down;
            x->down_raw += res.edges[e].down_raw;
            x->up += res.edges[e].up;
            x->up_raw += res.edges[e].up_raw;
            lj += (size_t)snprintf(links_json + lj, sizeof links_json - lj < 1 ? 0 : sizeof links_json - lj,
                                   "%s[%.0f, %.0f, %.0f, %.0f]", e ? ", " : "", res.edges[e].down,
                                   res.edges[e].down_raw, res.edges[e].up, res.edges[e].up_raw);
            if (lj >= sizeof links_json)
                lj = sizeof links_json - 1;
        }
        r.edge_steps++;
        last_loss = res.loss;
        double now = ar_now();
        double rate = (step + 1 - rate_step) * items_per_step / (now - rate_t > 1e-9 ? now - rate_t : 1e-9);
        if ((rc = record(&r.curve_x, &r.curve_y, &r.ncurve, (double)step + 1, res.loss)) != AR_OK)
            break;
        /* the loss with all its digits: runs are compared bit for bit */
        /* step_s: this step's forward, backward and update alone (no data
         * loading, logging or evaluation), for benchmarks that take a median;
         * links: per link into stage e, the step's frame bytes [down, down as
         * float32, up, up as float32] (docs/DESIGN.md, "Slow links") */
        log_json(&r, "{\"step\": %ld, \"loss\": %.17g, \"lr\": %.6g, \"grad_norm\": %.17g, \"%s\": %.1f, \"elapsed_s\": %.3f, \"step_s\": %.6f, \"links\": [%s]}",
                 step + 1, res.loss, lr, norm, is_text ? "tokens_per_s" : "samples_per_s", rate, now - t0, now - step_t0, links_json);
        int last = step + 1 == c->steps;
        int stopping = c->stop_after > 0 && step + 1 == c->stop_after;
        if ((c->eval_every > 0 && (step + 1) % c->eval_every == 0) || last) {
            if (c->profile && step > start) {
                /* the step's update is part of the step; the evaluation is not */
                double t = ar_now();
                if ((rc = ar_chain_sync(r.head, r.timeout)) != AR_OK)
                    break;
                prof_s += ar_now() - t;
                ar_prof_enable(0);
            }
            rc = eval_model(&r, step, &last_val, &last_acc);
            if (c->profile && step > start)
                ar_prof_enable(1);
            if (rc != AR_OK) {
                if ((rc = recover(&r, rc, &step)) == AR_OK)
                    continue;
                break;
            }
            if ((rc = record(&r.val_x, &r.val_y, &r.nval, (double)step + 1, last_val)) != AR_OK)
                break;
            if (is_text)
                log_json(&r, "{\"step\": %ld, \"val_loss\": %.17g, \"elapsed_s\": %.3f}", step + 1, last_val, ar_now() - t0);
            else
                log_json(&r, "{\"step\": %ld, \"val_loss\": %.17g, \"accuracy\": %.6f, \"elapsed_s\": %.3f}", step + 1, last_val, last_acc, ar_now() - t0);
            if (!c->quiet && !last) {
                if (is_text)
                    ar_progress_note(&bar, "step %ld: train loss %.4f, val loss %.4f", step + 1, last_loss, last_val);
                else
                    ar_progress_note(&bar, "step %ld: train loss %.4f, test loss %.4f, test accuracy %.2f%%", step + 1, last_loss, last_val, 100 * last_acc);
            }
            /* the rate should not count evaluation time */
            rate_t = ar_now();
            rate_step = step + 1;
        }
        driver_report_progress(&r, step, rate, ar_now() - t0, start);
        /* by default a checkpoint whenever AUTO_CHECKPOINT_S have passed: at
         * most about that much work is redone when a stage is lost */
        int due = !ahead && checkpoint_due(&r, step); /* (ahead: the next step is on its way already) */
        if (c->out_dir && (due || last || stopping)) {
            if ((rc = save_checkpoint(&r, step + 1)) != AR_OK) {
                if ((rc = recover(&r, rc, &step)) == AR_OK)
                    continue;
                break;
            }
            draw_curve(&r);
        }
        if (!c->quiet)
            ar_progress_update(&bar, step + 1, "loss %.4f | %.0f %s/s", res.loss, rate,
                               is_text ? "tok" : "samples");
        if (stopping)
            break;
        /* a device leaving gracefully: its stage moves, and the next step
         * goes on from here; with the next step's batch sent already, after
         * that step (the flag keeps the one after from going ahead) */
        r.leave_seen = 0;
        for (int i = 0; i < res.nstages && i < 64; i++)
            r.leave_seen |= res.leaving[i];
        if (r.remote && !last && !ahead && (rc = move_leaving(&r, &res, step + 1)) != AR_OK) {
            if ((rc = recover(&r, rc, &step)) == AR_OK)
                continue;
            break;
        }
    }
    ar_progress_end(&bar);
    double elapsed = ar_now() - t0;
    /* the last steps' payments are on their way: a refusal of one of them
     * is the run's error, as it is mid-run (an unreachable market is not:
     * releasing the lease waits for it) */
    if (rc == AR_OK && r.leased && ar_reporter_flush(&r.reporter, ar_now() + MARKET_RETRY_S) != AR_ECLOSED)
        rc = ar_reporter_refusal(&r.reporter);
    if (rc == AR_OK && !c->quiet) {
        long end = c->stop_after > 0 && c->stop_after < c->steps ? c->stop_after : c->steps;
        long done = end - start;
        printf("done: %ld steps in %.1f s (%.0f %s/s)\n", done, elapsed,
               done * items_per_step / (elapsed > 0 ? elapsed : 1), is_text ? "tokens" : "samples");
        printf("final train loss %.4f\n", last_loss);
        if (is_text)
            printf("final val loss %.4f\n", last_val);
        else
            printf("test accuracy %.2f%% (test loss %.4f)\n", 100 * last_acc, last_val);
        if (r.S > 1)
            for (int i = 0; i < r.S; i++) {
                printf("  stage %d: busy %.1f s of %.1f s, bubble %.1f%% (theory %.1f%%)\n", i,
                       r.busy[i], r.step_wall, r.step_wall > 0 ? 100 * (1 - r.busy[i] / r.step_wall) : 0,
                       100.0 * (r.S - 1) / (r.M + r.S - 1));
            }
        /* what each link carried, against the plan's prediction */
        for (int e = 0; (r.S > 1 || r.remote) && e < r.S && e < 64 && r.edge_steps > 0; e++) {
            const ar_edge_bytes *x = &r.edge_sum[e], *pr = &r.plan.edge_bytes[e];
            double n = (double)r.edge_steps, got = (x->down + x->up) / n, raw = (x->down_raw + x->up_raw) / n;
            char name[300];
            if (r.remote)
                ar_plan_link_name(&r.plan, r.devs, e, name, sizeof name);
            else
                snprintf(name, sizeof name, e ? "stage %d -> stage %d" : "driver -> stage 0", e - 1, e);
            printf("  link %s (%s): %.4f MB down, %.4f MB up per step; as float32 %.4f MB, %.4f MB (%.2fx); "
                   "predicted %.4f MB, %.4f MB\n", name, ar_compress_name(r.plan.codec[e]), x->down / n / 1e6,
                   x->up / n / 1e6, x->down_raw / n / 1e6, x->up_raw / n / 1e6, got > 0 ? raw / got : 1.0,
                   pr->down / 1e6, pr->up / 1e6);
        }
        /* what the groups' members exchanged with their leaders, against the cost model */
        for (int i = 0; i < r.plan.nstages && i < 64 && r.tp_steps > 0; i++)
            if (r.plan.group_size[i] > 1)
                printf("  stage %d tensor-parallel traffic: %.3f MB per step (predicted %.3f MB)\n", i,
                       r.tp_bytes[i] / (double)r.tp_steps / 1e6, r.plan.tp_bytes[i] / 1e6);
        if (c->out_dir)
            printf("checkpoint and loss curve in %s/\n", c->out_dir);
    }
    if (r.remote && c->audit_rate > 0) {
        const driver_audit *a = &r.audit;
        long n = a->passed + a->failed;
        if (rc == AR_OK && !c->quiet)
            printf("audits: %ld passed, %ld failed, %ld not done; verifier %.3f CPU s per audited step\n",
                   a->passed, a->failed, a->skipped, n ? a->cpu_s / (double)n : 0.0);
        log_json(&r, "{\"event\": \"audits\", \"passed\": %ld, \"failed\": %ld, \"skipped\": %ld, "
                 "\"verifier_cpu_s\": %.6f}", a->passed, a->failed, a->skipped, a->cpu_s);
    }
    if (rc == AR_OK && c->profile) {
        if (prof_steps > 0)
            ar_prof_print(stdout, prof_steps, prof_s / prof_steps);
        else
            printf("profile: no step after the first to count (--steps 2 or more)\n");
    }
    driver_release_lease(&r, rc);
    teardown(&r);
    return rc;
}
