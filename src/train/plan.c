/* Planning: unit costs, the exact split/placement dynamic program, plans by
 * hand, and the two quick device measurements (see plan.h). */
#include "train/plan.h"

#include "train/tp_group.h"

#include "nn/tp.h"
#include "train/frame.h"

#include "core/core.h"
#include "nn/layer.h"
#include "train/pipeline.h"
#include "train/schedule.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- unit costs ----------------------------------------------------------- */

static double max_d(double a, double b)
{
    return a > b ? a : b;
}

/* Forward FLOPs of one unit on B rows of T tokens: its matmuls, plus QK^T and
 * AV of a GPT block (counted over the full T x T, causal masking aside). */
static double forward_flops(const ar_model_spec *s, const ar_layer *l, double B, double T)
{
    double BT = B * T;
    if (s->type == AR_MODEL_GPT) {
        double C = s->n_embd, V = s->vocab_size;
        if (l->unit == 0)
            return 0.0; /* a lookup */
        if (l->unit <= s->n_layer) {
            /* c_attn C->3C, attn c_proj C->C, c_fc C->4C, mlp c_proj 4C->C */
            double matmul = 2.0 * BT * C * (3 * C + C + 4 * C + 4 * C);
            double attention = 2.0 * (2.0 * B * T * T * C);
            return matmul + attention;
        }
        return 2.0 * BT * C * V; /* logits through the tied embedding */
    }
    return 2.0 * BT * (double)l->in_floats_per_row * (double)l->out_floats_per_row;
}

/* Elements of unit 0's parameter called name (the owner of a tied weight). */
static int tied_numel(const ar_model_spec *spec, const char *name, long *numel)
{
    ar_layer *owner;
    int rc = ar_layer_create(spec, 0, &owner);
    if (rc != AR_OK)
        return rc;
    *numel = 0;
    for (int j = 0; j < owner->nparams; j++)
        if (strcmp(owner->params[j].name, name) == 0)
            *numel = owner->params[j].numel;
    ar_layer_destroy(owner);
    if (*numel == 0)
        return ar_fail(AR_EINTERNAL, "no unit 0 parameter named %s", name);
    return AR_OK;
}

/* Wire bytes of a tensor-parallel message (see tp_group.c: the leader's
 * scatter and a member's reply): op in scalars[0], block in step, slot in
 * mb; a payload of `floats` F32 values shaped (rows, cols), or (floats) when
 * cols is 0. */
static double tp_message_bytes(int op, int block, int slot, int rows, double floats, int64_t cols)
{
    ar_frame f = {.kind = AR_FRAME_TP, .step = block, .mb = slot, .rows = rows, .dtype = AR_DT_F32};
    f.scalars[0] = op;
    f.ndim = floats > 0 ? (cols ? 2 : 1) : 0;
    f.shape[0] = cols ? (int64_t)(floats / (double)cols) : (int64_t)floats;
    f.shape[1] = cols;
    f.nbytes = (size_t)floats * sizeof(float);
    return (double)ar_frame_wire_bytes(&f);
}

/* The split and unsplit parts of GPT block `layer` (see ar_unit_cost.tp),
 * sized like ar_tp_rank_create and ar_tp_block_create allocate them. */
static int block_tp_costs(const ar_model_spec *spec, int layer, int mb_rows, ar_unit_cost *c)
{
    ar_block_shard all;
    ar_range heads = {0, spec->n_head}, hidden = {0, 4 * spec->n_embd};
    int rc = ar_block_shard_init(&all, spec, layer, heads, hidden);
    if (rc != AR_OK)
        return rc;
    double B = mb_rows, T = spec->block_size, C = spec->n_embd, F = sizeof(float), N = B * T;
    double attn = 0, mlp = 0;
    for (int i = 0; i < AR_SHARD_NPARAMS; i++) {
        int is_attn = i == AR_SHARD_QKV_W || i == AR_SHARD_QKV_B || i == AR_SHARD_APROJ_W;
        *(is_attn ? &attn : &mlp) += (double)all.params[i].numel;
    }
    c->tp.heads = spec->n_head;
    c->tp.hidden = 4 * spec->n_embd;
    /* the forward FLOPs of forward_flops, split between the two parts; x3 for backward */
    c->tp.attn_flops = 3.0 * (2.0 * N * C * (3 * C + C) + 2.0 * (2.0 * B * T * T * C));
    c->tp.mlp_flops = 3.0 * (2.0 * N * C * (4 * C + 4 * C));
    c->tp.attn_state = 4.0 * attn * F;
    c->tp.mlp_state = 4.0 * mlp * F;
    c->tp.attn_act = (double)ar_shard_attn_saved(&all, mb_rows, spec->block_size) * F;
    c->tp.mlp_act = (double)ar_shard_mlp_saved(&all, mb_rows, spec->block_size) * F;
    c->tp.rank_act = 2.0 * N * C * F;
    c->tp.rank_work = (double)ar_shard_scratch(&all, mb_rows, spec->block_size) * F;
    c->tp.leader_state = c->state_bytes - c->tp.attn_state - c->tp.mlp_state;
    /* the leader's block keeps out | ln1 | res1 | ln2 and four row statistics,
     * its input before them; backward scratch 2 N C */
    c->tp.leader_act = (N * C + 4.0 * N * C + 4.0 * N) * F;
    c->tp.leader_work = (2.0 * N * C + 2.0 * N * C) * F;
    c->tp.msg_bytes = tp_message_bytes(AR_TP_ATTN_FWD, layer, 1, mb_rows, N * C, (int64_t)C);
    c->tp.reply_bytes = tp_message_bytes(AR_TP_ATTN_FWD, layer, 1, mb_rows, N * C, 0);
    return AR_OK;
}

/* An MLP's linear layer as either half of a split pair (see tp_mlp.c: the
 * pair's first unit scatters its input, the second its output gradient). */
static void linear_tp_costs(const ar_model_spec *spec, int unit, int mb_rows, ar_unit_cost *c)
{
    double in = unit == 0 ? spec->inputs : spec->hidden[unit - 1];
    double out = unit < spec->n_hidden ? spec->hidden[unit] : spec->classes;
    c->tp.linear = 1;
    c->tp.hidden = unit < spec->n_hidden ? spec->hidden[unit] : 0;
    c->tp.bias_state = 4.0 * out * sizeof(float);
    c->tp.in_bytes = mb_rows * in * sizeof(float);
    c->tp.in_msg = tp_message_bytes(AR_TP_MLP_FWD, unit, 1, mb_rows, mb_rows * in, (int64_t)in);
    c->tp.in_reply = tp_message_bytes(AR_TP_MLP_FWD, unit, 1, mb_rows, mb_rows * in, 0);
    c->tp.out_msg = tp_message_bytes(AR_TP_MLP_BWD, unit, 1, mb_rows, mb_rows * out, (int64_t)out);
    c->tp.out_reply = tp_message_bytes(AR_TP_MLP_BWD, unit, 1, mb_rows, mb_rows * out, 0);
}

int ar_plan_unit_costs(const ar_model_spec *spec, int mb_rows, ar_unit_cost *out)
{
    if (!spec || !out || mb_rows < 1)
        return ar_fail(AR_EINVAL, "unit costs need a spec and a positive micro-batch size");
    if (spec->type == AR_MODEL_GPT && spec->vocab_size < 1)
        return ar_fail(AR_EINVAL, "unit costs: the model's vocab_size is not known yet");
    int n = ar_spec_units(spec);
    int Ti = spec->type == AR_MODEL_GPT ? spec->block_size : 1;
    double B = mb_rows, T = Ti, BT = B * T, F = sizeof(float);
    for (int u = 0; u < n; u++) {
        ar_layer *l;
        int rc = ar_layer_create(spec, u, &l);
        if (rc != AR_OK)
            return rc;
        ar_unit_cost *c = &out[u];
        memset(c, 0, sizeof *c);
        double numel = 0;
        for (int j = 0; j < l->nparams; j++)
            numel += (double)l->params[j].numel;
        /* the same quantities ar_stage_create allocates */
        double in_w = l->in_floats_per_row ? (double)l->in_floats_per_row : 1.0; /* tokens */
        double out_w = (double)l->out_floats_per_row;
        c->param_bytes = numel * F;
        c->state_bytes = 4.0 * c->param_bytes; /* data, grad, m, v */
        c->act_bytes = (BT * in_w + (double)l->vt->saved_floats(l, mb_rows, Ti)) * F;
        if (u == n - 1)
            c->act_bytes += (BT * out_w + BT) * F; /* softmax and per-row losses of the loss */
        c->work_bytes = ((double)l->vt->scratch_floats(l, mb_rows, Ti) + 2.0 * BT * max_d(in_w, out_w)) * F;
        c->out_bytes = BT * out_w * F;
        c->rows = mb_rows;
        c->tokens = Ti;
        c->in_width = (int)l->in_floats_per_row;
        c->out_width = (int)l->out_floats_per_row;
        c->flops = 3.0 * forward_flops(spec, l, B, T); /* backward: twice the forward */
        if (l->tied_name) {
            long tn;
            if ((rc = tied_numel(spec, l->tied_name, &tn)) != AR_OK) {
                ar_layer_destroy(l);
                return rc;
            }
            c->state_bytes += (double)tn * F; /* the gradient it contributes */
            c->tied_bytes = (double)tn * F;   /* the copy, away from the owner */
        }
        ar_layer_destroy(l);
        if (spec->type == AR_MODEL_GPT && u >= 1 && u <= spec->n_layer &&
            (rc = block_tp_costs(spec, u - 1, mb_rows, c)) != AR_OK)
            return rc;
        if (spec->type == AR_MODEL_MLP)
            linear_tp_costs(spec, u, mb_rows, c);
    }
    return AR_OK;
}

/* ---- stage prices ----------------------------------------------------------- */

int ar_plan_slots(int schedule, int S, int s, int micro_batches)
{
    return ar_plan_slots_ex(schedule, S, s, micro_batches, 0);
}

int ar_plan_slots_ex(int schedule, int S, int s, int micro_batches, int extra_warmup)
{
    if (schedule == AR_SCHED_GPIPE)
        return micro_batches;
    /* warm-up + 1, see ar_schedule_build_ex */
    int k = s < S - 1 ? S - s + 1 + (extra_warmup > 0 ? extra_warmup : 0) : 1;
    return k < micro_batches ? k : micro_batches;
}

int ar_plan_extra_warmup(double rtt_s, double down_s, double up_s, double stage_s)
{
    if (!(stage_s > 0) || !(rtt_s + down_s + up_s > AR_PLAN_FAST_LINK_S))
        return 0;
    /* In steady 1F1B a stage runs its forward of micro-batch k, then wf more
     * (forward, backward) pairs of stage_s each before the backward of k;
     * the gradient of k is back after the link's latency L plus the next
     * stage's own stage_s. So wf >= 1 + L / stage_s; the default warm-up is
     * one more than the textbook's, so the extra is L / stage_s - 1, rounded
     * up with half a micro-batch to spare. */
    double n = ceil((rtt_s + down_s + up_s) / stage_s - 0.5);
    return n > 0 ? (n > 4096 ? 4096 : (int)n) : 0;
}

/* ---- links ------------------------------------------------------------------ */

/* A step number as large as most runs' (its varint's length is all that counts) */
#define TYPICAL_STEP 500

/* Wire bytes of a float32 tensor frame of `floats` values (shape rows x
 * width, or flat when width is 0) once compressed with codec where it may be. */
static double tensor_frame_bytes(ar_frame *f, double floats, int64_t width, int codec)
{
    f->dtype = AR_DT_F32;
    f->nbytes = (size_t)floats * sizeof(float);
    f->ndim = floats > 0 ? (width > 0 ? 2 : 1) : 0;
    f->shape[0] = width > 0 ? (int64_t)(floats / (double)width) : (int64_t)floats;
    f->shape[1] = width;
    if (floats >= AR_COMPRESS_MIN_FLOATS && (codec == AR_COMPRESS_BF16 || codec == AR_COMPRESS_INT8)) {
        f->dtype = codec == AR_COMPRESS_BF16 ? AR_DT_BF16 : AR_DT_Q8;
        f->nbytes = ar_compressed_bytes(codec, (size_t)floats);
    }
    return (double)ar_frame_wire_bytes(f);
}

/* One micro-batch's frames on the link into the stage that starts at unit
 * `first` (0: the driver's input batch): the activation down and its
 * gradient up, compressed with codec. */
static void mb_frame_bytes(const ar_unit_cost *costs, int first, int M, int mb, int codec, double *down,
                           double *up)
{
    ar_frame a = {.kind = AR_FRAME_ACT, .step = TYPICAL_STEP, .mb = mb, .nmb = M};
    ar_frame g = {.kind = AR_FRAME_GRAD, .step = TYPICAL_STEP, .mb = mb, .nmb = M};
    g.scalars[0] = 1.0; /* the micro-batch's loss */
    if (first == 0) {
        /* the input rows: int32 tokens (rows, T) or float features (rows, in), as
         * the driver sends them; stage 0 sends no gradient of them back */
        const ar_unit_cost *c = &costs[0];
        int tokens = c->in_width == 0;
        double elems = (double)c->rows * (tokens ? c->tokens : c->in_width);
        a.rows = c->rows;
        a.ntargets = (size_t)c->rows * (size_t)c->tokens;
        a.dtype = tokens ? AR_DT_I32 : AR_DT_F32;
        if (mb == 0) { /* the step's first carries lr and clipping: stage 0 takes the step */
            a.scalars[0] = 1e-3;
            a.scalars[1] = 1.0;
            a.scalars[2] = 1.0;
        }
        if (tokens) {
            a.ndim = 2;
            a.shape[0] = c->rows;
            a.shape[1] = c->tokens;
            a.nbytes = (size_t)elems * 4;
            *down = (double)ar_frame_wire_bytes(&a);
        } else {
            *down = tensor_frame_bytes(&a, elems, c->in_width, codec);
        }
        g.rows = c->rows;
        *up = (double)ar_frame_wire_bytes(&g);
        return;
    }
    /* the previous unit's output and its gradient (sized by out_bytes, which
     * every cost has; the shape only adds its header's few bytes) */
    const ar_unit_cost *c = &costs[first - 1];
    double floats = c->out_bytes / sizeof(float);
    a.rows = g.rows = c->rows;
    a.ntargets = (size_t)c->rows * (size_t)c->tokens;
    *down = tensor_frame_bytes(&a, floats, c->out_width, codec);
    *up = tensor_frame_bytes(&g, floats, c->out_width, codec);
}

void ar_plan_link_mb_bytes(const ar_unit_cost *costs, int first, int M, int codec, double *down, double *up)
{
    mb_frame_bytes(costs, first, M, 1, codec, down, up);
}

static double bw_down(const ar_device *d)
{
    return d->bandwidth > 0 ? d->bandwidth : AR_PLAN_DEFAULT_BANDWIDTH;
}

static double bw_up(const ar_device *d)
{
    return d->bandwidth_up > 0 ? d->bandwidth_up : bw_down(d);
}

/* A link's codec and its transfer time per micro-batch each way. */
typedef struct {
    int codec;
    double down_s, up_s;
} link_price;

static double link_s(const link_price *l)
{
    return l->down_s > l->up_s ? l->down_s : l->up_s;
}

/* The link after a stage that ends before unit `last` (nothing after the
 * last stage), whose figures are d's (bandwidth each way): with `compress`,
 * or under AUTO the least lossy codec whose transfers take at most budget
 * seconds a micro-batch (int8 when none does). */
static link_price price_link(const ar_unit_cost *costs, int nunits, int last, double down_Bps, double up_Bps,
                             int compress, int M, double budget)
{
    link_price lp = {AR_COMPRESS_NONE, 0, 0};
    if (last >= nunits)
        return lp;
    int from = compress == AR_COMPRESS_AUTO ? AR_COMPRESS_NONE : compress;
    int to = compress == AR_COMPRESS_AUTO ? AR_COMPRESS_INT8 : compress;
    for (int codec = from; codec <= to; codec++) {
        double down, up;
        mb_frame_bytes(costs, last, M, 1, codec, &down, &up);
        lp = (link_price){codec, down / down_Bps, up / up_Bps};
        if (link_s(&lp) <= budget || link_s(&lp) <= AR_PLAN_FAST_LINK_S)
            break;
    }
    return lp;
}

void ar_plan_edge_bytes(const ar_plan *p, const ar_unit_cost *costs, int nunits, int s, int codec,
                        ar_edge_bytes *out)
{
    memset(out, 0, sizeof *out);
    if (s < 0 || s >= p->nstages)
        return;
    int M = p->micro_batches > 0 ? p->micro_batches : 1;
    for (int mb = 0; mb < M; mb++) {
        double d, u, dr, ur;
        mb_frame_bytes(costs, p->first[s], M, mb, codec, &d, &u);
        mb_frame_bytes(costs, p->first[s], M, mb, AR_COMPRESS_NONE, &dr, &ur);
        out->down += d;
        out->up += u;
        out->down_raw += dr;
        out->up_raw += ur;
    }
    /* the optimizer step down; the gradient norms of this stage and those
     * after it up */
    ar_frame step = {.kind = AR_FRAME_STEP, .step = TYPICAL_STEP};
    step.scalars[0] = 1e-3;
    step.scalars[1] = 1.0;
    double records = 0;
    for (int t = s; t < p->nstages; t++)
        records += AR_NORM_HEADER + (p->last[t] - p->first[t]);
    ar_frame norm = {.kind = AR_FRAME_NORM, .step = TYPICAL_STEP, .dtype = AR_DT_F64, .ndim = 1};
    norm.shape[0] = (int64_t)records;
    norm.nbytes = (size_t)records * sizeof(double);
    /* the tied weight (the GPT head's copy of the embedding): when the head
     * is on a later stage than the owner (unit 0, stage 0), its values go
     * down with every STEP and its gradient comes up as TIED, across every
     * link from stage 1 to the head's */
    double tied = costs[nunits - 1].tied_bytes / sizeof(float);
    double step_b = 0, tied_b = 0;
    if (tied > 0 && s >= 1 && p->first[p->nstages - 1] > 0) {
        ar_frame t = {.kind = AR_FRAME_TIED, .step = TYPICAL_STEP, .dtype = AR_DT_F32, .ndim = 1};
        t.shape[0] = (int64_t)tied;
        t.nbytes = (size_t)tied * sizeof(float);
        tied_b = (double)ar_frame_wire_bytes(&t);
        step.dtype = AR_DT_F32;
        step.ndim = 1;
        step.shape[0] = (int64_t)tied;
        step.nbytes = t.nbytes;
    }
    /* the driver sends no STEP: stage 0 takes the step itself (ar_chain_send_step) */
    step_b = s == 0 ? 0.0 : (double)ar_frame_wire_bytes(&step);
    double norm_b = (double)ar_frame_wire_bytes(&norm);
    out->down += step_b;
    out->down_raw += step_b;
    out->up += norm_b + tied_b;
    out->up_raw += norm_b + tied_b;
}

/* Running totals of a stage [first, u]: the program extends a stage one unit
 * at a time, and estimates use the same sums in the same order. */
typedef struct {
    double state, act, work, flops;
} stage_acc;

static void acc_add(stage_acc *a, const ar_unit_cost *costs, int first, int u)
{
    a->state += costs[u].state_bytes;
    if (first > 0)
        a->state += costs[u].tied_bytes;
    a->act += costs[u].act_bytes;
    if (u > first)
        a->act -= costs[u - 1].out_bytes; /* its input is the previous unit's saved output */
    a->work = max_d(a->work, costs[u].work_bytes);
    a->flops += costs[u].flops;
}

static double acc_mem(const stage_acc *a, int slots)
{
    return a->state + (double)slots * a->act + a->work;
}

double ar_plan_stage_mem(const ar_unit_cost *costs, int nunits, int first, int last, int slots)
{
    stage_acc a = {0};
    for (int u = first; u < last && u < nunits; u++)
        acc_add(&a, costs, first, u);
    return acc_mem(&a, slots);
}

static double bandwidth(const ar_device *d)
{
    return bw_down(d);
}

/* Seconds of compute per micro-batch of a stage on d. Its link to the next
 * stage is priced apart (price_link): sends overlap compute, so a stage
 * takes the longer of the two (the last stage keeps its output: the loss
 * is computed there). */
static double acc_time(const stage_acc *a, const ar_device *d)
{
    return a->flops / (d->gflops * 1e9);
}

static int fits(double need, const ar_device *d)
{
    return d->mem_bytes <= 0 || need <= d->mem_bytes;
}

/* ---- tensor-parallel groups ------------------------------------------------- */

/* Running totals of a group's stage [first, u], extended one unit at a time
 * like stage_acc: the leader's unsplit part and each member's share. */
typedef struct {
    int g, nblocks, heads, bad;    /* bad: more members than heads */
    const ar_device *dev[AR_PLAN_MAX_GROUP];
    double weight[AR_PLAN_MAX_GROUP];   /* of the split: 1 each, or the members' GFLOP/s */
    double h[AR_PLAN_MAX_GROUP], m[AR_PLAN_MAX_GROUP]; /* shares of the heads and hidden units */
    stage_acc lead;                /* the leader's unsplit part */
    double flops[AR_PLAN_MAX_GROUP], state[AR_PLAN_MAX_GROUP], act[AR_PLAN_MAX_GROUP],
        work[AR_PLAN_MAX_GROUP];
    double mb_bytes, mb_msgs;      /* per micro-batch, leader <-> one member, both directions */
    int pending;                   /* an MLP layer waiting for the second of its pair (whole on
                                    * the leader if the stage ends there), or -1 */
} group_acc;

static void group_init(group_acc *a, const ar_device *devs, const int *members, int g, int by_speed)
{
    memset(a, 0, sizeof *a);
    a->g = g;
    a->pending = -1;
    for (int k = 0; k < g; k++) {
        a->dev[k] = &devs[members[k]];
        a->weight[k] = by_speed ? a->dev[k]->gflops : 1.0;
    }
}

/* Each member's fraction of the heads and hidden units: what ar_tp_split
 * gives the group (whole items, so 8 heads over 3 are 3+3+2). */
static void group_shares(group_acc *a, int heads, int hidden)
{
    ar_range hr[AR_PLAN_MAX_GROUP], ur[AR_PLAN_MAX_GROUP];
    a->heads = heads;
    if (a->g > heads || ar_tp_split(heads, a->g, a->weight, hr) != AR_OK ||
        ar_tp_split(hidden, a->g, a->weight, ur) != AR_OK) {
        a->bad = 1;
        return;
    }
    for (int k = 0; k < a->g; k++) {
        a->h[k] = (double)(hr[k].end - hr[k].begin) / heads;
        a->m[k] = (double)(ur[k].end - ur[k].begin) / hidden;
    }
}

/* The pair of an MLP's linear layers p, u = p + 1 split over the group. */
static void group_add_pair(group_acc *a, const ar_unit_cost *costs, int first, int p)
{
    const ar_unit_cost *c1 = &costs[p], *c2 = &costs[p + 1];
    ar_range ur[AR_PLAN_MAX_GROUP];
    if (c1->tp.hidden < a->g || ar_tp_split(c1->tp.hidden, a->g, a->weight, ur) != AR_OK) {
        a->bad = 1;
        return;
    }
    a->nblocks++;
    /* the leader keeps the second's bias, and its layers' inputs and outputs */
    a->lead.state += c2->tp.bias_state;
    a->lead.act += c1->act_bytes + c2->act_bytes - c1->out_bytes;
    if (p > first)
        a->lead.act -= costs[p - 1].out_bytes;
    a->lead.work = max_d(a->lead.work, max_d(c1->work_bytes, c2->work_bytes));
    for (int k = 0; k < a->g; k++) {
        double m = (double)(ur[k].end - ur[k].begin) / c1->tp.hidden;
        double hidden_bytes = c1->out_bytes * m; /* B x its hidden units */
        a->flops[k] += (c1->flops + c2->flops) * m;
        a->state[k] += (c1->state_bytes + c2->state_bytes - c2->tp.bias_state) * m;
        /* its copy of the input, the pre-activation and activation of its units */
        a->act[k] += c1->tp.in_bytes + 2.0 * hidden_bytes;
        /* backward scratch (two B x units buffers) and the partial output */
        a->work[k] = max_d(a->work[k], 2.0 * hidden_bytes + max_d(c1->tp.in_bytes, c2->out_bytes));
    }
    /* forward: the input out, a partial output back; backward: the output
     * gradient out, a partial input gradient back */
    a->mb_bytes += c1->tp.in_msg + c2->tp.out_reply + c2->tp.out_msg + c1->tp.in_reply;
    a->mb_msgs += 4.0;
}

static void group_add(group_acc *a, const ar_unit_cost *costs, int first, int u)
{
    const ar_unit_cost *c = &costs[u];
    if (c->tp.linear) {
        if ((u - first) % 2 == 0) {
            a->pending = u;
        } else {
            a->pending = -1;
            group_add_pair(a, costs, first, u - 1);
        }
        return;
    }
    if (c->tp.heads == 0) {
        acc_add(&a->lead, costs, first, u); /* whole on the leader */
        return;
    }
    if (a->nblocks == 0)
        group_shares(a, c->tp.heads, c->tp.hidden);
    a->nblocks++;
    /* the leader's part, chained like acc_add (its input is the previous unit's output) */
    a->lead.state += c->tp.leader_state;
    if (first > 0)
        a->lead.state += c->tied_bytes;
    a->lead.act += c->tp.leader_act;
    if (u > first)
        a->lead.act -= costs[u - 1].out_bytes;
    a->lead.work = max_d(a->lead.work, c->tp.leader_work);
    for (int k = 0; k < a->g; k++) {
        double h = a->h[k], m = a->m[k];
        a->flops[k] += c->tp.attn_flops * h + c->tp.mlp_flops * m;
        a->state[k] += c->tp.attn_state * h + c->tp.mlp_state * m;
        a->act[k] += c->tp.rank_act + c->tp.attn_act * h + c->tp.mlp_act * m;
        /* scratch is the larger of the two parts' (an upper bound), plus the
         * member's partial-output buffer */
        a->work[k] = max_d(a->work[k], c->tp.rank_work * max_d(h, m) + c->out_bytes);
    }
    /* two requests forward (attention, MLP), two backward, each answered */
    a->mb_bytes += 4.0 * (c->tp.msg_bytes + c->tp.reply_bytes);
    a->mb_msgs += 8.0;
}

/* Bytes per training step between the leader and one member: M micro-batches,
 * then the gradient-norm exchange (a norm per block comes back) and the
 * optimizer step (see ar_stage_grad_sumsq and ar_stage_update). */
static double group_step_bytes(const group_acc *a, int M)
{
    ar_frame norm = {.kind = AR_FRAME_TP}, norm_reply = {.kind = AR_FRAME_TP, .dtype = AR_DT_F64, .ndim = 1};
    norm.scalars[0] = norm_reply.scalars[0] = AR_TP_NORM;
    norm_reply.shape[0] = a->nblocks;
    norm_reply.nbytes = (size_t)a->nblocks * sizeof(double);
    ar_frame step = {.kind = AR_FRAME_TP}, step_reply = {.kind = AR_FRAME_TP};
    step.scalars[0] = step_reply.scalars[0] = AR_TP_STEP;
    step.scalars[1] = 1e-3; /* lr, gradient scale: doubles, their size does not depend on them */
    step.scalars[2] = 1.0;
    return (double)M * a->mb_bytes + (double)(ar_frame_wire_bytes(&norm) + ar_frame_wire_bytes(&norm_reply) +
                                              ar_frame_wire_bytes(&step) + ar_frame_wire_bytes(&step_reply));
}

/* The leader's unsplit part as the stage stands: with a pending MLP layer,
 * which stays whole there when the stage ends before its pair does. */
static stage_acc group_lead(const group_acc *a, const ar_unit_cost *costs, int first)
{
    stage_acc lead = a->lead;
    if (a->pending >= 0)
        acc_add(&lead, costs, first, a->pending);
    return lead;
}

static double group_mem(const group_acc *a, const stage_acc *lead, int k, int slots)
{
    double own = a->state[k] + (double)slots * a->act[k] + a->work[k];
    return k == 0 ? acc_mem(lead, slots) + own : own;
}

static int group_fits(const group_acc *a, const ar_unit_cost *costs, int first, int slots)
{
    stage_acc lead = group_lead(a, costs, first);
    for (int k = 0; k < a->g; k++)
        if (!fits(group_mem(a, &lead, k, slots), a->dev[k]))
            return 0;
    return 1;
}

/* Fill out from the totals of the group's stage ending before `last`. */
static void group_price(const group_acc *a, const ar_unit_cost *costs, int nunits, int first, int last,
                        int slots, int M, ar_group_cost *out)
{
    memset(out, 0, sizeof *out);
    stage_acc lead = group_lead(a, costs, first);
    double slowest = 0;
    for (int k = 0; k < a->g; k++) {
        out->compute[k] = a->flops[k] / (a->dev[k]->gflops * 1e9);
        slowest = max_d(slowest, out->compute[k]);
        out->mem[k] = group_mem(a, &lead, k, slots);
    }
    double per_member = group_step_bytes(a, M);
    double msgs = (double)M * a->mb_msgs + 4.0; /* and the norm and step exchanges */
    for (int k = 1; k < a->g; k++) {
        out->bytes += per_member;
        out->transfer += (per_member / bandwidth(a->dev[k]) + msgs * AR_PLAN_MESSAGE_S) / (double)M;
    }
    /* the leader's unsplit work comes before and after the blocks: it does
     * not overlap the members' */
    out->time = acc_time(&lead, a->dev[0]) + slowest + out->transfer;
}

int ar_plan_group_cost(const ar_unit_cost *costs, int nunits, int first, int last,
                       const ar_device *devs, const int *members, int g, int by_speed, int slots,
                       int micro_batches, ar_group_cost *out)
{
    if (!costs || !devs || !members || !out || g < 2 || g > AR_PLAN_MAX_GROUP || first < 0 ||
        last <= first || last > nunits || slots < 1 || micro_batches < 1)
        return ar_fail(AR_EINVAL, "group cost: bad arguments");
    group_acc a;
    group_init(&a, devs, members, g, by_speed);
    for (int u = first; u < last; u++)
        group_add(&a, costs, first, u);
    if (a.bad)
        return ar_fail(AR_EINVAL, a.heads ? "a group of %d devices cannot share %d attention heads"
                                          : "a group of %d devices is more than a layer's hidden units",
                       g, a.heads);
    if (a.nblocks == 0)
        return ar_fail(AR_EINVAL, "layers %d-%d hold no transformer block or pair of linear layers for a group "
                       "of %d devices to split", first, last - 1, g);
    group_price(&a, costs, nunits, first, last, slots, micro_batches, out);
    return AR_OK;
}

/* "1.2 GB", "340.0 MB", "12.0 kB" */
static const char *fmt_bytes(double b, char *buf, size_t n)
{
    if (b >= 1e9)
        snprintf(buf, n, "%.2f GB", b / 1e9);
    else if (b >= 1e6)
        snprintf(buf, n, "%.1f MB", b / 1e6);
    else
        snprintf(buf, n, "%.1f kB", b / 1e3);
    return buf;
}

static int check_inputs(const ar_unit_cost *costs, int nunits, const ar_device *devs, int ndev,
                        int micro_batches, int schedule)
{
    if (!costs || !devs || nunits < 1)
        return ar_fail(AR_EINVAL, "a plan needs unit costs and devices");
    if (ndev < 1 || ndev > AR_PLAN_MAX_DEVICES)
        return ar_fail(AR_EINVAL, "%d devices: a plan takes 1 to %d", ndev, AR_PLAN_MAX_DEVICES);
    if (micro_batches < 1)
        return ar_fail(AR_EINVAL, "%d micro-batches: need at least 1", micro_batches);
    if (schedule != AR_SCHED_GPIPE && schedule != AR_SCHED_1F1B)
        return ar_fail(AR_EINVAL, "unknown schedule %d", schedule);
    for (int d = 0; d < ndev; d++)
        if (!(devs[d].gflops > 0) || !isfinite(devs[d].gflops) || devs[d].bandwidth < 0 ||
            !(devs[d].mem_bytes >= 0))
            return ar_fail(AR_EINVAL, "device %d (%.63s): speed must be positive, memory and bandwidth not negative",
                           d, devs[d].name);
    return AR_OK;
}

/* ---- the dynamic program ------------------------------------------------------ */

/* Tables indexed by (c, i, k): the units [i, n) placed on devices k.. in
 * exactly c stages. Under 1F1B a stage's slots depend on how many stages
 * follow it, which is why the count is part of the state and the program
 * runs from the back. A stage on device k may also be a group of devices
 * k..k+g-1 (devices keep their order), the next stage starting at k+g. */
typedef struct {
    int n, D, C;
    double *val;
    int *choice; /* phase 2: 0 = device k skipped, else (g-1)*(n+1) + j: units [i,j) on
                  * the g devices from k */
} dp_tables;

static size_t at(const dp_tables *t, int c, int i, int k)
{
    return ((size_t)c * (size_t)(t->n + 1) + (size_t)i) * (size_t)(t->D + 1) + (size_t)k;
}

/* A group splits by speed when its members' speeds differ (an equal split
 * otherwise: the same shares, and a plan that reads simpler). */
static int group_by_speed(const ar_device *devs, int k, int g)
{
    for (int m = k + 1; m < k + g; m++)
        if (devs[m].gflops != devs[k].gflops)
            return 1;
    return 0;
}

/* What every cell of the program shares. */
typedef struct {
    const ar_unit_cost *costs;
    const ar_device *devs;
    int M, schedule, compress;
} dp_ctx;

/* A stage's time per micro-batch from its compute on (or led by) device d
 * and its link to the next stage, and the slots it keeps: `slots` and, under
 * 1F1B, as many more warm-up micro-batches as cover the link's round trip
 * and fit (fits_with says whether a slot count fits). The program prices a
 * link for AUTO against the stage's own compute; the estimate of the chosen
 * plan against the slowest stage's. */
static double dp_stage_time(const dp_ctx *x, int n, int j, const ar_device *d, double compute, int *slots,
                            int (*fits_with)(const void *acc, int slots, const ar_device *d, int first),
                            const void *acc, int first)
{
    /* AUTO compresses measured links only (an unknown one is loopback's) */
    int compress = x->compress == AR_COMPRESS_AUTO && d->bandwidth <= 0 ? AR_COMPRESS_NONE : x->compress;
    link_price lp = price_link(x->costs, n, j, bw_down(d), bw_up(d), compress, x->M, AR_PLAN_AUTO_MARGIN * compute);
    if (x->schedule == AR_SCHED_1F1B && j < n && d->rtt > 0) {
        int extra = ar_plan_extra_warmup(d->rtt, lp.down_s, lp.up_s, compute);
        int want = *slots + extra < x->M ? *slots + extra : x->M;
        while (want > *slots && !fits_with(acc, want, d, first))
            want--;
        *slots = want;
    }
    return max_d(compute, link_s(&lp));
}

static int plain_fits(const void *acc, int slots, const ar_device *d, int first)
{
    (void)first;
    return fits(acc_mem(acc, slots), d);
}

typedef struct {
    const group_acc *ga;
    const ar_unit_cost *costs;
} group_fit_arg;

static int group_fits_with(const void *arg, int slots, const ar_device *d, int first)
{
    (void)d;
    const group_fit_arg *g = arg;
    return group_fits(g->ga, g->costs, first, slots);
}

/* Consider units [i, j) for j = i+1..n on the g devices from k, keeping the
 * best value in *best and *choice. */
static void dp_try(const dp_tables *t, const dp_ctx *x, int c, int base_slots, double thr, int i, int k, int g,
                   double *best, int *choice)
{
    int n = t->n, M = x->M;
    const ar_unit_cost *costs = x->costs;
    const ar_device *devs = x->devs;
    stage_acc a = {0};
    group_acc ga;
    if (g > 1) {
        int members[AR_PLAN_MAX_GROUP];
        for (int m = 0; m < g; m++)
            members[m] = k + m;
        group_init(&ga, devs, members, g, group_by_speed(devs, k, g));
    }
    for (int j = i + 1; j <= n; j++) {
        double st;
        int slots = base_slots;
        if (g == 1) {
            acc_add(&a, costs, i, j - 1);
        } else {
            group_add(&ga, costs, i, j - 1);
            if (ga.bad)
                return; /* more members than heads: so it stays */
        }
        double rest = t->val[at(t, c - 1, j, k + g)];
        if (rest == INFINITY)
            continue;
        if (g == 1) {
            if (!fits(acc_mem(&a, slots), &devs[k]))
                continue;
            st = dp_stage_time(x, n, j, &devs[k], acc_time(&a, &devs[k]), &slots, plain_fits, &a, i);
        } else {
            if (ga.nblocks == 0 || !group_fits(&ga, costs, i, slots))
                continue;
            ar_group_cost gc;
            group_price(&ga, costs, n, i, j, slots, M, &gc);
            group_fit_arg arg = {&ga, costs};
            st = dp_stage_time(x, n, j, &devs[k], gc.time, &slots, group_fits_with, &arg, i);
        }
        double v;
        if (thr < 0) {
            v = max_d(st, rest);
        } else {
            if (st > thr)
                continue;
            v = st + rest;
        }
        if (v < *best) {
            *best = v;
            *choice = (g - 1) * (n + 1) + j;
        }
    }
}

/* Phase 1 (thr < 0): val = the smallest possible slowest-stage time.
 * Phase 2: val = the smallest total time among plans whose stages all take
 * at most thr, with the choices recorded. Both are exact: the max and the sum
 * each decompose over the suffix. */
static void run_dp(dp_tables *t, const dp_ctx *x, double thr, int max_group)
{
    int n = t->n, D = t->D;
    const ar_device *devs = x->devs;
    for (int c = 0; c <= t->C; c++)
        for (int i = 0; i <= n; i++)
            for (int k = 0; k <= D; k++) {
                t->val[at(t, c, i, k)] = (c == 0 && i == n) ? 0.0 : INFINITY;
                t->choice[at(t, c, i, k)] = 0;
            }
    for (int c = 1; c <= t->C; c++) {
        int slots = ar_plan_slots(x->schedule, c, 0, x->M); /* c stages from this one to the end */
        for (int i = n - 1; i >= 0; i--)
            for (int k = D - 1; k >= 0; k--) {
                double best = t->val[at(t, c, i, k + 1)];
                int choice = 0;
                for (int g = 1; g <= max_group && k + g <= D && (g == 1 || !devs[k + g - 1].solo); g++)
                    if (g == 1 || !devs[k].solo)
                        dp_try(t, x, c, slots, thr, i, k, g, &best, &choice);
                t->val[at(t, c, i, k)] = best;
                t->choice[at(t, c, i, k)] = choice;
            }
    }
}

/* Memory one unit needs alone with the fewest slots the schedule allows. */
static double unit_alone(const ar_unit_cost *costs, int n, int u, int M, int schedule)
{
    return ar_plan_stage_mem(costs, n, u, u + 1, schedule == AR_SCHED_GPIPE ? M : 1);
}

static int infeasible(const ar_unit_cost *costs, int n, const ar_device *devs, int ndev, int M,
                      int schedule)
{
    int big = 0;
    double largest = 0, total_mem = 0;
    for (int d = 0; d < ndev; d++) {
        total_mem += devs[d].mem_bytes;
        if (devs[d].mem_bytes > devs[big].mem_bytes)
            big = d;
    }
    largest = devs[big].mem_bytes;
    int worst = 0;
    for (int u = 1; u < n; u++)
        if (unit_alone(costs, n, u, M, schedule) > unit_alone(costs, n, worst, M, schedule))
            worst = u;
    char a[32], b[32];
    double need = unit_alone(costs, n, worst, M, schedule);
    if (need > largest)
        return ar_fail(AR_ELIMIT, "layer %d needs %s, the largest device (%.63s) has %s free%s", worst,
                       fmt_bytes(need, a, sizeof a), devs[big].name, fmt_bytes(largest, b, sizeof b),
                       costs[worst].tp.heads ? " (nor does its share on any group of consecutive devices)" : "");
    double all = ar_plan_stage_mem(costs, n, 0, n, schedule == AR_SCHED_GPIPE ? M : 1);
    return ar_fail(AR_ELIMIT,
                   "no split of the %d layers over the %d devices fits in their memory (the whole "
                   "model needs about %s, the devices have %s free together)",
                   n, ndev, fmt_bytes(all, a, sizeof a), fmt_bytes(total_mem, b, sizeof b));
}

static void warn_unused(const ar_plan *p, const ar_unit_cost *costs, int n, const ar_device *devs,
                        int ndev, int M, int schedule)
{
    double smallest = INFINITY;
    for (int u = 0; u < n; u++) {
        double need = unit_alone(costs, n, u, M, schedule);
        smallest = need < smallest ? need : smallest;
    }
    for (int d = 0; d < ndev; d++) {
        int used = 0;
        for (int s = 0; s < p->nstages; s++)
            for (int k = 0; k < (p->group_size[s] > 1 ? p->group_size[s] : 1); k++)
                used |= (k ? p->group[s][k] : p->device[s]) == d;
        if (used)
            continue;
        char a[32], b[32];
        if (!fits(smallest, &devs[d]))
            ar_log(AR_LOG_WARN, "device %d (%.63s) is left out: %s free, the smallest layer needs %s", d,
                   devs[d].name, fmt_bytes(devs[d].mem_bytes, a, sizeof a),
                   fmt_bytes(smallest, b, sizeof b));
        else
            ar_log(AR_LOG_INFO, "device %d (%.63s) is left out: the plan is no faster with it", d,
                   devs[d].name);
    }
}

int ar_plan_auto(const ar_unit_cost *costs, int nunits, const ar_device *devs, int ndev,
                 int micro_batches, int schedule, ar_plan *out)
{
    return ar_plan_auto_ex(costs, nunits, devs, ndev, micro_batches, schedule, NULL, out);
}

static int check_opts(const ar_plan_opts *o)
{
    if (o && (o->compress < AR_COMPRESS_NONE || o->compress > AR_COMPRESS_AUTO))
        return ar_fail(AR_EINVAL, "unknown compression %d", o->compress);
    return AR_OK;
}

int ar_plan_auto_ex(const ar_unit_cost *costs, int nunits, const ar_device *devs, int ndev,
                    int micro_batches, int schedule, const ar_plan_opts *opts, ar_plan *out)
{
    int rc = check_inputs(costs, nunits, devs, ndev, micro_batches, schedule);
    if (rc == AR_OK)
        rc = check_opts(opts);
    if (rc != AR_OK)
        return rc;
    dp_ctx x = {.costs = costs, .devs = devs, .M = micro_batches, .schedule = schedule,
                .compress = opts ? opts->compress : AR_COMPRESS_NONE};
    dp_tables t = {.n = nunits, .D = ndev};
    t.C = nunits < ndev ? nunits : ndev;
    if (t.C > AR_PLAN_MAX_STAGES)
        t.C = AR_PLAN_MAX_STAGES;
    size_t cells = (size_t)(t.C + 1) * (size_t)(nunits + 1) * (size_t)(ndev + 1);
    t.val = ar_calloc(cells, sizeof *t.val);
    t.choice = ar_calloc(cells, sizeof *t.choice);
    if (!t.val || !t.choice) {
        ar_free(t.val);
        ar_free(t.choice);
        return AR_ENOMEM;
    }

    /* groups only for units a group can split (GPT blocks) */
    int max_group = 1;
    for (int u = 0; u < nunits; u++)
        if (costs[u].tp.heads > 0)
            max_group = AR_PLAN_MAX_GROUP;
    /* phase 1: the best bottleneck for each stage count */
    run_dp(&t, &x, -1.0, max_group);
    double best = INFINITY;
    for (int c = 1; c <= t.C; c++)
        best = t.val[at(&t, c, 0, 0)] < best ? t.val[at(&t, c, 0, 0)] : best;
    if (best == INFINITY) {
        ar_free(t.val);
        ar_free(t.choice);
        return infeasible(costs, nunits, devs, ndev, micro_batches, schedule);
    }
    /* fewest stages that reach it (a relative tolerance keeps rounding from
     * deciding a tie), then phase 2: the smallest total time there */
    double thr = best * (1.0 + 1e-9);
    int C = 1;
    while (t.val[at(&t, C, 0, 0)] > thr)
        C++;
    run_dp(&t, &x, thr, max_group);

    memset(out, 0, sizeof *out);
    int i = 0, k = 0, c = C;
    while (c > 0 && k < ndev) {
        int choice = t.choice[at(&t, c, i, k)];
        if (choice == 0) {
            k++;
            continue;
        }
        int j = choice % (nunits + 1), g = choice / (nunits + 1) + 1, s = out->nstages;
        out->device[s] = k;
        out->first[s] = i;
        out->last[s] = j;
        out->group_size[s] = g;
        for (int m = 0; m < g; m++)
            out->group[s][m] = k + m;
        out->by_speed[s] = g > 1 && group_by_speed(devs, k, g);
        out->nstages++;
        i = j;
        k += g;
        c--;
    }
    ar_free(t.val);
    ar_free(t.choice);
    if (i != nunits)
        return ar_fail(AR_EINTERNAL, "plan reconstruction stopped at unit %d of %d", i, nunits);
    rc = ar_plan_estimate_ex(out, costs, nunits, devs, ndev, micro_batches, schedule, opts);
    if (rc != AR_OK)
        return rc;
    warn_unused(out, costs, nunits, devs, ndev, micro_batches, schedule);
    return AR_OK;
}

/* ---- one stage per device ----------------------------------------------------- */

/* Tables over (i, k): units [i, n) on devices k..D-1, one stage each. */
typedef struct {
    int n, D;
    double *val;
    int *next; /* the end j of the stage on device k */
} each_tables;

static size_t each_at(const each_tables *t, int i, int k)
{
    return (size_t)i * (size_t)(t->D + 1) + (size_t)k;
}

/* Phase 1 (thr < 0): the smallest slowest stage; phase 2: the smallest
 * total among splits whose stages all take at most thr. */
static void run_each(each_tables *t, const ar_unit_cost *costs, const ar_device *devs, int M, int schedule,
                     double thr)
{
    int n = t->n, D = t->D;
    for (int i = 0; i <= n; i++)
        for (int k = 0; k <= D; k++) {
            t->val[each_at(t, i, k)] = i == n && k == D ? 0.0 : INFINITY;
            t->next[each_at(t, i, k)] = 0;
        }
    for (int k = D - 1; k >= 0; k--) {
        int slots = ar_plan_slots(schedule, D, k, M);
        /* the devices after k need a unit each */
        for (int i = n - (D - k); i >= 0; i--) {
            stage_acc a = {0};
            double best = INFINITY;
            int choice = 0;
            for (int j = i + 1; j <= n - (D - 1 - k); j++) {
                acc_add(&a, costs, i, j - 1);
                double rest = t->val[each_at(t, j, k + 1)];
                if (rest == INFINITY || !fits(acc_mem(&a, slots), &devs[k]))
                    continue;
                /* a stage's time as ar_plan_auto prices it: the longer of its
                 * compute and its link's transfers */
                link_price lp = price_link(costs, n, j, bw_down(&devs[k]), bw_up(&devs[k]), AR_COMPRESS_NONE, M, 0);
                double st = max_d(acc_time(&a, &devs[k]), link_s(&lp));
                double v;
                if (thr < 0) {
                    v = max_d(st, rest);
                } else {
                    if (st > thr)
                        continue;
                    v = st + rest;
                }
                if (v < best) {
                    best = v;
                    choice = j;
                }
            }
            t->val[each_at(t, i, k)] = best;
            t->next[each_at(t, i, k)] = choice;
        }
    }
}

int ar_plan_each(const ar_unit_cost *costs, int nunits, const ar_device *devs, int ndev, int micro_batches,
                 int schedule, ar_plan *out)
{
    int rc = check_inputs(costs, nunits, devs, ndev, micro_batches, schedule);
    if (rc != AR_OK)
        return rc;
    if (ndev > nunits || ndev > AR_PLAN_MAX_STAGES)
        return ar_fail(AR_EINVAL, "%d devices for a model of %d layers: each needs at least one", ndev, nunits);
    each_tables t = {.n = nunits, .D = ndev};
    size_t cells = (size_t)(nunits + 1) * (size_t)(ndev + 1);
    t.val = ar_calloc(cells, sizeof *t.val);
    t.next = ar_calloc(cells, sizeof *t.next);
    if (!t.val || !t.next) {
        ar_free(t.val);
        ar_free(t.next);
        return AR_ENOMEM;
    }
    run_each(&t, costs, devs, micro_batches, schedule, -1.0);
    double best = t.val[each_at(&t, 0, 0)];
    if (best == INFINITY) {
        ar_free(t.val);
        ar_free(t.next);
        char a[32];
        return ar_fail(AR_ELIMIT, "no split of the %d layers into %d stages, one on each device, fits in their "
                       "memory (the whole model needs about %s)", nunits, ndev,
                       fmt_bytes(ar_plan_stage_mem(costs, nunits, 0, nunits, 1), a, sizeof a));
    }
    run_each(&t, costs, devs, micro_batches, schedule, best * (1.0 + 1e-9));
    memset(out, 0, sizeof *out);
    int i = 0;
    for (int k = 0; k < ndev; k++) {
        int j = t.next[each_at(&t, i, k)];
        if (j <= i)
            break;
        out->device[k] = k;
        out->first[k] = i;
        out->last[k] = j;
        out->group_size[k] = 1;
        out->group[k][0] = k;
        out->nstages++;
        i = j;
    }
    ar_free(t.val);
    ar_free(t.next);
    if (i != nunits || out->nstages != ndev)
        return ar_fail(AR_EINTERNAL, "plan reconstruction stopped at unit %d of %d", i, nunits);
    return ar_plan_estimate(out, costs, nunits, devs, ndev, micro_batches, schedule);
}

int ar_plan_stage_flops(const ar_unit_cost *costs, int nunits, int first, int last, int micro_batches,
                        int64_t *out)
{
    if (first < 0 || last > nunits || first >= last || micro_batches < 1)
        return ar_fail(AR_EINVAL, "units %d-%d of %d with %d micro-batches", first, last, nunits, micro_batches);
    double f = 0;
    for (int u = first; u < last; u++)
        f += costs[u].flops;
    f *= micro_batches;
    if (!isfinite(f) || f < 0 || f > (double)AR_PLAN_MAX_STEP_FLOPS)
        return ar_fail(AR_ELIMIT, "units %d-%d take %g FLOPs per step: more than %lld", first, last - 1, f,
                       (long long)AR_PLAN_MAX_STEP_FLOPS);
    *out = (int64_t)llround(f);
    return AR_OK;
}

/* ---- plans by hand ------------------------------------------------------------ */

static void skip_spaces(const char **s)
{
    while (**s == ' ' || **s == '\t')
        (*s)++;
}

static int parse_unit(const char *text, const char **s, int *v)
{
    skip_spaces(s);
    if (**s < '0' || **s > '9')
        return ar_fail(AR_EINVAL, "plan \"%s\": expected a layer number at %s%s%s", text,
                       **s ? "\"" : "the end", *s, **s ? "\"" : "");
    long x = 0;
    while (**s >= '0' && **s <= '9') {
        x = x * 10 + (**s - '0');
        if (x > 1000000)
            return ar_fail(AR_EINVAL, "plan \"%s\": layer number too large", text);
        (*s)++;
    }
    *v = (int)x;
    skip_spaces(s);
    return AR_OK;
}

/* One device reference of a group: an index or a device's name. */
static int parse_device(const char *text, const char **s, const ar_device *devs, int ndev, int *out)
{
    const char *start = *s;
    size_t n = strcspn(start, "+,~");
    while (n > 0 && start[n - 1] == ' ')
        n--;
    if (n == 0)
        return ar_fail(AR_EINVAL, "plan \"%s\": a device is missing after '@' or '+'", text);
    int digits = 1;
    for (size_t i = 0; i < n; i++)
        digits &= start[i] >= '0' && start[i] <= '9';
    *out = -1;
    if (digits && n < 6) {
        *out = atoi(start);
    } else if (devs) {
        for (int d = 0; d < ndev; d++)
            if (strlen(devs[d].name) == n && strncmp(devs[d].name, start, n) == 0)
                *out = d;
    }
    if (*out < 0 || *out >= ndev)
        return ar_fail(AR_EINVAL, "plan \"%s\": no device \"%.*s\" (give an index 0-%d or a name from --workers)",
                       text, (int)n, start, ndev - 1);
    *s = start + strcspn(start, "+,~");
    return AR_OK;
}

int ar_plan_parse(const char *text, int nunits, int ndev, ar_plan *out)
{
    return ar_plan_parse_devices(text, nunits, NULL, ndev, out);
}

int ar_plan_parse_devices(const char *text, int nunits, const ar_device *devs, int ndev,
                          ar_plan *out)
{
    if (!text || !out || nunits < 1)
        return ar_fail(AR_EINVAL, "plan parse: bad arguments");
    memset(out, 0, sizeof *out);
    const char *s = text;
    int next = 0, rc;
    for (;;) {
        int a, b;
        if ((rc = parse_unit(text, &s, &a)) != AR_OK)
            return rc;
        b = a;
        if (*s == '-') {
            s++;
            if ((rc = parse_unit(text, &s, &b)) != AR_OK)
                return rc;
        }
        int idx = out->nstages;
        if (b < a)
            return ar_fail(AR_EINVAL, "plan \"%s\": stage %d's range %d-%d is reversed", text, idx,
                           a, b);
        if (b >= nunits)
            return ar_fail(AR_EINVAL, "plan \"%s\": stage %d's range %d-%d goes beyond the last layer %d",
                           text, idx, a, b, nunits - 1);
        if (a != next)
            return ar_fail(AR_EINVAL,
                           "plan \"%s\": stage %d starts at layer %d, expected %d (each stage starts "
                           "where the previous one ends)",
                           text, idx, a, next);
        if (idx >= ndev || idx >= AR_PLAN_MAX_STAGES)
            return ar_fail(AR_EINVAL, "plan \"%s\": more stages than the %d devices", text,
                           ndev < AR_PLAN_MAX_STAGES ? ndev : AR_PLAN_MAX_STAGES);
        out->device[idx] = idx;
        out->group[idx][0] = idx;
        out->group_size[idx] = 1;
        if (*s == '@') {
            out->group_size[idx] = 0;
            do {
                s++;
                if (out->group_size[idx] >= AR_PLAN_MAX_GROUP)
                    return ar_fail(AR_EINVAL, "plan \"%s\": stage %d has more than %d devices", text,
                                   idx, AR_PLAN_MAX_GROUP);
                int d = -1;
                if ((rc = parse_device(text, &s, devs, ndev, &d)) != AR_OK)
                    return rc;
                out->group[idx][out->group_size[idx]++] = d;
            } while (*s == '+');
            out->device[idx] = out->group[idx][0];
            if (*s == '~') {
                if (strncmp(s, "~speed", 6) != 0 || out->group_size[idx] < 2)
                    return ar_fail(AR_EINVAL, "plan \"%s\": after a group of devices, \"~speed\" splits it by "
                                   "their speed (found \"%s\")", text, s);
                out->by_speed[idx] = 1;
                s += 6;
            }
        }
        /* every device in one place only */
        for (int g = 0; g < out->group_size[idx]; g++)
            for (int t = 0; t <= idx; t++)
                for (int h = 0; h < (t == idx ? g : out->group_size[t]); h++)
                    if (out->group[t][h] == out->group[idx][g])
                        return ar_fail(AR_EINVAL, "plan \"%s\": device %d is used twice", text,
                                       out->group[idx][g]);
        out->first[idx] = a;
        out->last[idx] = b + 1;
        out->nstages++;
        next = b + 1;
        if (*s == '\0')
            break;
        if (*s != ',')
            return ar_fail(AR_EINVAL, "plan \"%s\": expected ',' or '-' at \"%s\"", text, s);
        s++;
    }
    if (next != nunits)
        return ar_fail(AR_EINVAL, "plan \"%s\" ends at layer %d, the model's last layer is %d", text,
                       next - 1, nunits - 1);
    return AR_OK;
}

int ar_plan_estimate(ar_plan *p, const ar_unit_cost *costs, int nunits, const ar_device *devs,
                     int ndev, int micro_batches, int schedule)
{
    return ar_plan_estimate_ex(p, costs, nunits, devs, ndev, micro_batches, schedule, NULL);
}

/* Stage s's compute per micro-batch and its memory with `slots` in flight
 * (for a group, each member's in p->member_mem and its traffic in
 * p->tp_bytes and p->tp_transfer); *d_out: the device whose memory bounds it
 * (a group without anything to split: its members summed in *sum). */
static int stage_price(ar_plan *p, int s, const ar_unit_cost *costs, int nunits, const ar_device *devs,
                       int slots, int M, double *compute, ar_device *sum, const ar_device **d_out)
{
    const ar_device *d = &devs[p->device[s]];
    p->tp_bytes[s] = p->tp_transfer[s] = 0;
    memset(p->member_mem[s], 0, sizeof p->member_mem[s]);
    /* GPT blocks or a pair of an MLP's layers: what a group splits */
    int priced = p->last[s] - p->first[s] >= 2 && costs[p->first[s]].tp.linear;
    for (int u = p->first[s]; u < p->last[s]; u++)
        priced |= costs[u].tp.heads > 0;
    stage_acc acc = {0};
    if (p->group_size[s] > 1 && priced) {
        int g = p->group_size[s];
        ar_group_cost gc;
        int grc = ar_plan_group_cost(costs, nunits, p->first[s], p->last[s], devs, p->group[s], g, p->by_speed[s],
                                     slots, M, &gc);
        if (grc != AR_OK)
            return ar_fail(grc, "plan stage %d: %s", s, ar_last_error());
        *compute = gc.time;
        p->stage_mem[s] = gc.mem[0];
        p->tp_bytes[s] = gc.bytes;
        p->tp_transfer[s] = gc.transfer;
        for (int k = 0; k < g; k++)
            p->member_mem[s][k] = gc.mem[k];
        *d_out = d;
        return AR_OK;
    }
    if (p->group_size[s] > 1) {
        /* nothing to split (the run says so): priced as one device with
         * the members' speed and memory added up */
        *sum = *d;
        for (int k = 1; k < p->group_size[s]; k++) {
            const ar_device *m = &devs[p->group[s][k]];
            sum->gflops += m->gflops;
            sum->mem_bytes = sum->mem_bytes > 0 && m->mem_bytes > 0 ? sum->mem_bytes + m->mem_bytes : 0;
        }
        d = sum;
    }
    for (int u = p->first[s]; u < p->last[s]; u++)
        acc_add(&acc, costs, p->first[s], u);
    *compute = acc_time(&acc, d);
    p->stage_mem[s] = acc_mem(&acc, slots);
    if (p->group_size[s] <= 1)
        p->member_mem[s][0] = p->stage_mem[s];
    *d_out = d;
    return AR_OK;
}

/* Whether stage s, priced by stage_price, fits its devices (the first
 * failure's message recorded). */
static int stage_fits(const ar_plan *p, int s, const ar_device *devs, const ar_device *d, int report)
{
    char a[32], b[32];
    if (p->group_size[s] > 1 && p->member_mem[s][1] > 0) {
        for (int k = 0; k < p->group_size[s]; k++) {
            const ar_device *m = &devs[p->group[s][k]];
            if (!fits(p->member_mem[s][k], m)) {
                if (report)
                    ar_fail(AR_ELIMIT, "stage %d (layers %d-%d) needs %s on device %d (%.63s) of its group, "
                            "which has %s free", s, p->first[s], p->last[s] - 1,
                            fmt_bytes(p->member_mem[s][k], a, sizeof a), p->group[s][k], m->name,
                            fmt_bytes(m->mem_bytes, b, sizeof b));
                return 0;
            }
        }
        return 1;
    }
    if (fits(p->stage_mem[s], d))
        return 1;
    if (report) {
        if (p->group_size[s] > 1)
            ar_fail(AR_ELIMIT, "stage %d (layers %d-%d) needs %s, its group has %s free", s, p->first[s],
                    p->last[s] - 1, fmt_bytes(p->stage_mem[s], a, sizeof a), fmt_bytes(d->mem_bytes, b, sizeof b));
        else
            ar_fail(AR_ELIMIT, "stage %d (layers %d-%d) needs %s, device %d (%.63s) has %s free", s, p->first[s],
                    p->last[s] - 1, fmt_bytes(p->stage_mem[s], a, sizeof a), p->device[s], d->name,
                    fmt_bytes(d->mem_bytes, b, sizeof b));
    }
    return 0;
}

int ar_plan_estimate_ex(ar_plan *p, const ar_unit_cost *costs, int nunits, const ar_device *devs, int ndev,
                        int micro_batches, int schedule, const ar_plan_opts *opts)
{
    int rc = check_inputs(costs, nunits, devs, ndev, micro_batches, schedule);
    if (rc == AR_OK)
        rc = check_opts(opts);
    if (rc != AR_OK)
        return rc;
    int S = p->nstages;
    if (S < 1 || S > AR_PLAN_MAX_STAGES)
        return ar_fail(AR_EINVAL, "a plan of %d stages", S);
    int next = 0, used_by[AR_PLAN_MAX_DEVICES];
    for (int d = 0; d < ndev; d++)
        used_by[d] = -1;
    for (int s = 0; s < S; s++) {
        if (p->first[s] != next || p->last[s] <= p->first[s] || p->last[s] > nunits)
            return ar_fail(AR_EINVAL, "plan stage %d holds layers [%d,%d): not contiguous in 0-%d",
                           s, p->first[s], p->last[s], nunits - 1);
        next = p->last[s];
        int g = p->group_size[s] > 1 ? p->group_size[s] : 1;
        if (g > AR_PLAN_MAX_GROUP || (g > 1 && p->group[s][0] != p->device[s]))
            return ar_fail(AR_EINVAL, "plan stage %d: a group of %d devices led by device %d", s, g,
                           p->device[s]);
        for (int k = 0; k < g; k++) {
            int d = k ? p->group[s][k] : p->device[s];
            if (d < 0 || d >= ndev)
                return ar_fail(AR_EINVAL, "plan stage %d is on device %d of %d", s, d, ndev);
            if (used_by[d] >= 0)
                return ar_fail(AR_EINVAL, "plan stages %d and %d share device %d", used_by[d], s, d);
            used_by[d] = s;
        }
    }
    if (next != nunits)
        return ar_fail(AR_EINVAL, "plan covers layers 0-%d of 0-%d", next - 1, nunits - 1);

    int compress = opts ? opts->compress : AR_COMPRESS_NONE;
    p->micro_batches = micro_batches;
    p->schedule = schedule;
    p->compress = compress;
    p->bubble = (double)(S - 1) / (double)(micro_batches + S - 1);
    /* pass 1: each stage's compute with its default slots; the slowest is
     * what a link must keep up with to stay off the critical path */
    double compute[AR_PLAN_MAX_STAGES], slowest = 0;
    ar_device sums[AR_PLAN_MAX_STAGES];
    const ar_device *dv[AR_PLAN_MAX_STAGES];
    for (int s = 0; s < S; s++) {
        int slots = ar_plan_slots(schedule, S, s, micro_batches);
        if ((rc = stage_price(p, s, costs, nunits, devs, slots, micro_batches, &compute[s], &sums[s], &dv[s])) != AR_OK)
            return rc;
        slowest = max_d(slowest, compute[s]);
    }
    /* pass 2: the links, their codecs, the warm-up that covers them, and
     * each stage's time and memory with it */
    rc = AR_OK;
    for (int s = 0; s < S; s++) {
        /* the link into stage s: the driver's (edge 0), or stage s-1's device's to the next */
        ar_link_figures fig = {0};
        int measured_driver = opts && opts->driver.measured;
        if (s == 0) {
            if (measured_driver)
                fig = opts->driver;
        } else {
            const ar_device *up = dv[s - 1];
            fig = (ar_link_figures){.rtt_s = up->rtt, .down_Bps = bw_down(up), .up_Bps = bw_up(up),
                                    .measured = up->bandwidth > 0};
        }
        if (!fig.measured && fig.down_Bps <= 0)
            fig.down_Bps = fig.up_Bps = AR_PLAN_DEFAULT_BANDWIDTH;
        p->link[s] = fig;
        link_price lp;
        if (s == 0 && !measured_driver) {
            /* an in-process driver hands stage 0 its batch by pointer */
            lp = (link_price){AR_COMPRESS_NONE, 0, 0};
        } else if (s == 0 && compress == AR_COMPRESS_AUTO) {
            /* the driver's link carries the training data itself (features,
             * tokens), not activations: AUTO leaves what the model learns
             * from as it is (an explicit codec compresses it too) */
            lp = price_link(costs, nunits, 0, fig.down_Bps, fig.up_Bps, AR_COMPRESS_NONE, micro_batches, 0);
        } else {
            /* AUTO compresses measured links only: an unknown one is loopback's */
            int mode = compress == AR_COMPRESS_AUTO && !fig.measured ? AR_COMPRESS_NONE : compress;
            lp = price_link(costs, nunits, p->first[s], fig.down_Bps, fig.up_Bps, mode, micro_batches,
                            AR_PLAN_AUTO_MARGIN * slowest);
            if (s == 0 && compress != AR_COMPRESS_AUTO)
                lp.codec = compress;
        }
        p->codec[s] = lp.codec;
        p->edge_down_s[s] = lp.down_s;
        p->edge_up_s[s] = lp.up_s;
    }
    /* the pipeline's pace: its slowest stage or link */
    double pace = slowest;
    for (int s = 1; s < S; s++)
        pace = max_d(pace, max_d(p->edge_down_s[s], p->edge_up_s[s]));
    for (int s = 0; s < S; s++) {
        int slots = ar_plan_slots(schedule, S, s, micro_batches), extra = 0;
        double link = 0;
        if (s + 1 < S) {
            link = max_d(p->edge_down_s[s + 1], p->edge_up_s[s + 1]);
            if (schedule == AR_SCHED_1F1B) {
                extra = ar_plan_extra_warmup(p->link[s + 1].rtt_s, p->edge_down_s[s + 1], p->edge_up_s[s + 1], pace);
                extra = extra < micro_batches ? extra : micro_batches;
                /* as many as fit: the activation memory the device allows */
                for (; extra > 0; extra--) {
                    slots = ar_plan_slots_ex(schedule, S, s, micro_batches, extra);
                    double c0;
                    int prc = stage_price(p, s, costs, nunits, devs, slots, micro_batches, &c0, &sums[s], &dv[s]);
                    if (prc != AR_OK)
                        return prc;
                    if (stage_fits(p, s, devs, dv[s], 0))
                        break;
                }
                slots = ar_plan_slots_ex(schedule, S, s, micro_batches, extra);
            }
        }
        double c0;
        int prc = stage_price(p, s, costs, nunits, devs, slots, micro_batches, &c0, &sums[s], &dv[s]);
        if (prc != AR_OK)
            return prc;
        p->extra_warmup[s] = extra;
        p->slots[s] = slots;
        p->stage_time[s] = max_d(compute[s], link);
        ar_plan_edge_bytes(p, costs, nunits, s, p->codec[s], &p->edge_bytes[s]);
        if (!stage_fits(p, s, devs, dv[s], rc == AR_OK) && rc == AR_OK)
            rc = AR_ELIMIT;
    }
    return rc;
}

/* ---- printing ------------------------------------------------------------------ */

static void append(char *buf, size_t n, const char *piece)
{
    size_t len = strlen(buf);
    snprintf(buf + len, n - len, "%s%s", len ? ", " : "", piece);
}

void ar_plan_layers_text(const ar_model_spec *spec, int first, int last, char *buf, size_t n)
{
    char piece[64];
    buf[0] = '\0';
    if (spec && spec->type == AR_MODEL_GPT) {
        if (first == 0)
            append(buf, n, "embedding");
        int a = first > 1 ? first : 1, b = last < spec->n_layer + 1 ? last : spec->n_layer + 1;
        if (b - a == 1)
            snprintf(piece, sizeof piece, "block %d", a - 1);
        else if (b - a > 1)
            snprintf(piece, sizeof piece, "blocks %d-%d", a - 1, b - 2);
        if (b > a)
            append(buf, n, piece);
        if (last == spec->n_layer + 2)
            append(buf, n, "head");
        return;
    }
    if (last - first == 1)
        snprintf(buf, n, "%s %d", spec ? "linear" : "unit", first);
    else
        snprintf(buf, n, "%s %d-%d", spec ? "linear" : "units", first, last - 1);
}

/* Each member's heads and hidden units (of every GPT block alike, or of
 * each of an MLP's pairs of linear layers). */
int ar_plan_member_shares(const ar_plan *p, const ar_device *devs, const ar_model_spec *spec, int s,
                          char (*text)[AR_PLAN_SHARE_TEXT], ar_range *heads, ar_range *hidden)
{
    if (p->group_size[s] < 2 || !spec)
        return ar_fail(AR_EINVAL, "stage %d is not a tensor-parallel group", s);
    double w[AR_PLAN_MAX_GROUP];
    ar_plan_group_weights(p, devs, s, w);
    ar_tp_layout *l = malloc(sizeof *l);
    if (!l)
        return ar_fail(AR_ENOMEM, "out of memory");
    int rc = ar_tp_group_layout(spec, p->first[s], p->last[s], p->group_size[s], w, l);
    for (int g = 0; rc == AR_OK && g < p->group_size[s]; g++) {
        heads[g] = spec->type == AR_MODEL_GPT ? l->heads[g] : (ar_range){0, 0};
        hidden[g] = l->hidden[g][0];
        if (spec->type == AR_MODEL_GPT) {
            snprintf(text[g], AR_PLAN_SHARE_TEXT, "heads %d-%d, hidden units %d-%d of each block", l->heads[g].begin,
                     l->heads[g].end - 1, l->hidden[g][0].begin, l->hidden[g][0].end - 1);
            continue;
        }
        size_t at = 0;
        text[g][0] = '\0';
        for (int b = 0; b < l->count && at < AR_PLAN_SHARE_TEXT; b++)
            at += (size_t)snprintf(text[g] + at, AR_PLAN_SHARE_TEXT - at, "%shidden units %d-%d of linear %d",
                                   b ? ", " : "", l->hidden[g][b].begin, l->hidden[g][b].end - 1, l->first + 2 * b);
    }
    free(l);
    return rc;
}

static void print_group_shares(FILE *out, const ar_plan *p, const ar_device *devs, const ar_model_spec *spec,
                               int s)
{
    char text[AR_PLAN_MAX_GROUP][AR_PLAN_SHARE_TEXT];
    ar_range heads[AR_PLAN_MAX_GROUP], hidden[AR_PLAN_MAX_GROUP];
    if (ar_plan_member_shares(p, devs, spec, s, text, heads, hidden) != AR_OK)
        return; /* the run itself reports why the group cannot be split */
    for (int g = 0; g < p->group_size[s]; g++) {
        fprintf(out, "       %.63s: %s", devs[p->group[s][g]].name, text[g]);
        if (p->member_mem[s][g] > 0)
            fprintf(out, ", %.1f MB%s", p->member_mem[s][g] / 1e6, g ? "" : " with the unsplit layers");
        fputc('\n', out);
    }
}

/* "A" or, for a tensor-parallel group, "A+B". */
static void device_label(const ar_plan *p, const ar_device *devs, int s, char *buf, size_t n)
{
    buf[0] = '\0';
    int g = p->group_size[s] > 0 ? p->group_size[s] : 1;
    for (int i = 0; i < g; i++) {
        size_t at = strlen(buf);
        snprintf(buf + at, n - at, "%s%.63s", i ? "+" : "", devs[i == 0 ? p->device[s] : p->group[s][i]].name);
    }
}

void ar_plan_print(FILE *out, const ar_plan *p, const ar_device *devs, const ar_unit_cost *costs,
                   const ar_model_spec *spec)
{
    char names[AR_PLAN_MAX_STAGES][96];
    int wdev = 6, wlay = 6;
    for (int s = 0; s < p->nstages; s++) {
        ar_plan_layers_text(spec, p->first[s], p->last[s], names[s], sizeof names[s]);
        char dev[192];
        device_label(p, devs, s, dev, sizeof dev);
        int l = (int)strlen(names[s]), d = (int)strlen(dev);
        wlay = l > wlay ? l : wlay;
        wdev = d > wdev ? d : wdev;
    }
    fprintf(out, "%-5s  %-*s  %-*s  %9s  %9s  %14s  %9s\n", "stage", wdev, "device", wlay, "layers",
            "params MB", "memory MB", "ms/micro-batch", "in flight");
    double slowest = 0;
    for (int s = 0; s < p->nstages; s++) {
        double params = 0;
        for (int u = p->first[s]; u < p->last[s]; u++)
            params += costs[u].param_bytes;
        char dev[192];
        device_label(p, devs, s, dev, sizeof dev);
        int slots = p->slots[s] > 0 ? p->slots[s] : ar_plan_slots(p->schedule, p->nstages, s, p->micro_batches);
        char flight[32];
        if (p->extra_warmup[s] > 0)
            snprintf(flight, sizeof flight, "%d (+%d)", slots, p->extra_warmup[s]);
        else
            snprintf(flight, sizeof flight, "%d", slots);
        fprintf(out, "%-5d  %-*s  %-*s  %9.2f  %9.1f  %14.3f  %9s\n", s, wdev, dev, wlay, names[s],
                params / 1e6, p->stage_mem[s] / 1e6, p->stage_time[s] * 1e3, flight);
        if (p->group_size[s] > 1 && spec) {
            print_group_shares(out, p, devs, spec, s);
            if (p->tp_bytes[s] > 0)
                fprintf(out, "       tensor-parallel transfer %.2f MB per step (%.3f ms per micro-batch)\n",
                        p->tp_bytes[s] / 1e6, p->tp_transfer[s] * 1e3);
        }
        slowest = max_d(slowest, p->stage_time[s]);
    }
    fprintf(out, "predicted bubble %.1f%% (%d stages, %d micro-batches, %s); slowest stage %.3f ms per micro-batch\n",
            100.0 * p->bubble, p->nstages, p->micro_batches, ar_schedule_name(p->schedule),
            slowest * 1e3);
    ar_plan_print_links(out, p, devs);
}

void ar_plan_link_name(const ar_plan *p, const ar_device *devs, int s, char *buf, size_t n)
{
    if (s == 0)
        snprintf(buf, n, "driver -> %.63s", devs[p->device[0]].name);
    else
        snprintf(buf, n, "%.63s -> %.63s", devs[p->device[s - 1]].name, devs[p->device[s]].name);
}

void ar_plan_print_links(FILE *out, const ar_plan *p, const ar_device *devs)
{
    int any = 0;
    for (int s = 0; s < p->nstages; s++)
        any |= p->link[s].measured;
    if (!any)
        return; /* in-process, or never measured: nothing to show but defaults */
    char names[AR_PLAN_MAX_STAGES][140];
    int w = 4;
    for (int s = 0; s < p->nstages; s++) {
        ar_plan_link_name(p, devs, s, names[s], sizeof names[s]);
        int l = (int)strlen(names[s]);
        w = l > w ? l : w;
    }
    fprintf(out, "%-*s  %9s  %9s  %7s  %8s  %13s  %13s\n", w, "link", "MB/s down", "MB/s up", "RTT ms", "compress",
            "MB/step down", "MB/step up");
    for (int s = 0; s < p->nstages; s++) {
        const ar_link_figures *f = &p->link[s];
        char down[24], up[24], rtt[24];
        if (f->measured) {
            snprintf(down, sizeof down, "%.2f", f->down_Bps / 1e6);
            snprintf(up, sizeof up, "%.2f", f->up_Bps / 1e6);
            snprintf(rtt, sizeof rtt, "%.1f", f->rtt_s * 1e3);
        } else {
            snprintf(down, sizeof down, "-");
            snprintf(up, sizeof up, "-");
            snprintf(rtt, sizeof rtt, "-");
        }
        fprintf(out, "%-*s  %9s  %9s  %7s  %8s  %13.3f  %13.3f\n", w, names[s], down, up, rtt,
                ar_compress_name(p->codec[s]), p->edge_bytes[s].down / 1e6, p->edge_bytes[s].up / 1e6);
    }
}

void ar_plan_group_weights(const ar_plan *p, const ar_device *devs, int s, double *w)
{
    for (int g = 0; g < p->group_size[s] && g < AR_PLAN_MAX_GROUP; g++) {
        double speed = devs[p->group[s][g]].gflops;
        w[g] = p->by_speed[s] && speed > 0 ? speed : 1;
    }
}
