/* Tensor-parallel ranks and the leader's scatter/gather (see tp_group.h). */
#include "train/tp_group.h"

#include "core/core.h"
#include "ops/ops.h"
#include "train/plan.h"

#include <stdlib.h>
#include <string.h>

void ar_tp_rank_destroy(ar_tp_rank *r)
{
    int n = r->nblocks * r->nslots;
    for (int i = 0; i < n; i++) {
        if (r->ln_attn)
            ar_free(r->ln_attn[i]);
        if (r->ln_mlp)
            ar_free(r->ln_mlp[i]);
        if (r->saved_attn)
            ar_free(r->saved_attn[i]);
        if (r->saved_mlp)
            ar_free(r->saved_mlp[i]);
    }
    ar_free(r->ln_attn);
    ar_free(r->ln_mlp);
    ar_free(r->saved_attn);
    ar_free(r->saved_mlp);
    ar_free(r->shards);
    ar_free(r->mem_params);
    ar_free(r->mem_grads);
    ar_free(r->mem_m);
    ar_free(r->mem_v);
    ar_free(r->scratch);
    ar_free(r->partial);
    memset(r, 0, sizeof *r);
}

int ar_tp_rank_create(ar_tp_rank *r, const ar_model_spec *spec, int first_block, int nblocks,
                      const ar_range *heads, const ar_range *hidden, int max_B, int nslots,
                      uint64_t seed, const ar_optim_config *optim)
{
    memset(r, 0, sizeof *r);
    r->spec = *spec;
    r->first_block = first_block;
    r->nblocks = nblocks;
    r->max_B = max_B;
    r->T = spec->block_size;
    r->nslots = nslots;
    r->optim = *optim;
    int rc = AR_OK;
    int gpt = spec->type == AR_MODEL_GPT;
    /* GPT: blocks first_block..; MLP: pairs of units from unit first_block */
    int last = gpt ? first_block + nblocks : first_block + 2 * nblocks;
    int limit = gpt ? spec->n_layer : spec->n_hidden + 1;
    if (first_block < 0 || nblocks < 1 || last > limit || max_B < 1 || nslots < 1)
        return ar_fail(AR_EINVAL, "a tensor-parallel rank needs %s %d-%d inside 0-%d", gpt ? "GPT blocks" : "linear layers",
                       first_block, last - 1, limit - 1);
    if (!gpt)
        r->T = 1;
    r->shards = ar_calloc((size_t)nblocks, sizeof *r->shards);
    if (!r->shards)
        return AR_ENOMEM;
    long total = 0;
    for (int b = 0; b < nblocks; b++) {
        ar_block_shard *s = &r->shards[b];
        rc = gpt ? ar_block_shard_init(s, &r->spec, first_block + b, heads[b], hidden[b])
                 : ar_mlp_shard_init(s, &r->spec, first_block + 2 * b, hidden[b]);
        if (rc != AR_OK)
            goto fail;
        for (int i = s->first_param; i < AR_SHARD_NPARAMS; i++)
            total += s->params[i].numel;
    }
    r->param_floats = total;
    r->mem_params = ar_calloc((size_t)total, sizeof(float));
    r->mem_grads = ar_calloc((size_t)total, sizeof(float));
    r->mem_m = ar_calloc((size_t)total, sizeof(float));
    r->mem_v = ar_calloc((size_t)total, sizeof(float));
    if (!r->mem_params || !r->mem_grads || !r->mem_m || !r->mem_v) {
        rc = AR_ENOMEM;
        goto fail;
    }
    long at = 0;
    size_t scratch = 0, width = 0, N = (size_t)max_B * r->T;
    for (int b = 0; b < nblocks; b++) {
        ar_block_shard *s = &r->shards[b];
        size_t w = (size_t)(s->in > s->out ? s->in : s->out);
        width = w > width ? w : width;
        for (int i = s->first_param; i < AR_SHARD_NPARAMS; i++) {
            ar_param *p = &s->params[i];
            p->data = r->mem_params + at;
            p->grad = r->mem_grads + at;
            p->m = r->mem_m + at;
            p->v = r->mem_v + at;
            at += p->numel;
        }
        /* the same initial values as the whole block (or pair of linear
         * layers): build it, slice it. (It exists only for this moment.) */
        ar_stage whole;
        ar_optim_config none = {0};
        int unit = gpt ? 1 + s->layer : s->layer;
        if ((rc = ar_stage_create(&whole, spec, unit, unit + (gpt ? 1 : 2), 1, 1, seed, &none)) != AR_OK)
            goto fail;
        if (gpt)
            ar_block_shard_from_full(s, whole.layers[0], 0);
        else
            ar_mlp_shard_from_full(s, whole.layers[0], whole.layers[1], 0);
        ar_stage_destroy(&whole);
        size_t need = ar_shard_scratch(s, max_B, r->T);
        scratch = need > scratch ? need : scratch;
    }
    int n = nblocks * nslots;
    r->ln_attn = ar_calloc((size_t)n, sizeof(float *));
    r->ln_mlp = ar_calloc((size_t)n, sizeof(float *));
    r->saved_attn = ar_calloc((size_t)n, sizeof(float *));
    r->saved_mlp = ar_calloc((size_t)n, sizeof(float *));
    r->scratch = ar_calloc(scratch, sizeof(float));
    r->partial = ar_calloc(N * width, sizeof(float));
    if (!r->ln_attn || !r->ln_mlp || !r->saved_attn || !r->saved_mlp || !r->scratch || !r->partial) {
        rc = AR_ENOMEM;
        goto fail;
    }
    for (int i = 0; i < n; i++) {
        /* (an MLP shard has no attention: one float stands in) */
        ar_block_shard *s = &r->shards[i / nslots];
        r->ln_attn[i] = ar_calloc(gpt ? N * (size_t)spec->n_embd : 1, sizeof(float));
        r->ln_mlp[i] = ar_calloc(N * (size_t)s->in, sizeof(float));
        r->saved_attn[i] = ar_calloc(gpt ? ar_shard_attn_saved(s, max_B, r->T) : 1, sizeof(float));
        r->saved_mlp[i] = ar_calloc(ar_shard_mlp_saved(s, max_B, r->T), sizeof(float));
        if (!r->ln_attn[i] || !r->ln_mlp[i] || !r->saved_attn[i] || !r->saved_mlp[i]) {
            rc = AR_ENOMEM;
            goto fail;
        }
    }
    return AR_OK;
fail:
    ar_tp_rank_destroy(r);
    return rc;
}

static int reply(ar_link *l, const ar_frame *req, const float *data, size_t n)
{
    ar_frame f = {.kind = AR_FRAME_TP, .step = req->step, .mb = req->mb, .rows = req->rows};
    f.scalars[0] = req->scalars[0];
    int64_t shape[1] = {(int64_t)n};
    int rc = ar_frame_set_payload(&f, AR_DT_F32, n ? 1 : 0, shape, data);
    if (rc != AR_OK) {
        ar_frame_free(&f);
        return rc;
    }
    return ar_link_send(l, &f);
}

/* One operation from the leader. */
static int handle(ar_tp_rank *r, ar_link *l, ar_frame *f)
{
    int op = (int)f->scalars[0];
    if (op == AR_TP_STEP) {
        float lr = (float)f->scalars[1], scale = (float)f->scalars[2];
        if (!(lr >= 0 && lr < 1e3) || !(scale > 0 && scale <= 1))
            return ar_fail(AR_EPROTO, "tensor-parallel STEP with lr %g and scale %g", lr, scale);
        r->opt_step++;
        const ar_optim_config *o = &r->optim;
        for (int b = 0; b < r->nblocks; b++)
            for (int i = r->shards[b].first_param; i < AR_SHARD_NPARAMS; i++) {
                ar_param *p = &r->shards[b].params[i];
                float wd = p->decay ? o->weight_decay : 0.0f;
                if (o->kind == AR_OPT_SGD)
                    ar_sgd_update(p->data, p->grad, p->m, p->numel, lr, o->beta1, wd, r->opt_step, scale);
                else
                    ar_adamw_update(p->data, p->grad, p->m, p->v, p->numel, lr, o->beta1, o->beta2, o->eps, wd,
                                    r->opt_step, scale);
            }
        memset(r->mem_grads, 0, (size_t)r->param_floats * sizeof(float));
        return reply(l, f, NULL, 0);
    }
    if (op == AR_TP_NORM) {
        double sums[256];
        if (r->nblocks > 256)
            return ar_fail(AR_ELIMIT, "too many blocks");
        for (int b = 0; b < r->nblocks; b++) {
            sums[b] = 0;
            for (int i = r->shards[b].first_param; i < AR_SHARD_NPARAMS; i++)
                sums[b] += ar_sum_squares(r->shards[b].params[i].grad, r->shards[b].params[i].numel);
        }
        ar_frame out = {.kind = AR_FRAME_TP};
        out.scalars[0] = op;
        int64_t n = r->nblocks;
        int rc = ar_frame_set_payload(&out, AR_DT_F64, 1, &n, sums);
        return rc == AR_OK ? ar_link_send(l, &out) : rc;
    }
    /* the shard: a GPT block's index, or an MLP pair's first unit */
    int block = -1, slot = f->mb, B = f->rows;
    for (int b = 0; b < r->nblocks; b++)
        if (r->shards[b].layer == f->step)
            block = b;
    if (op < AR_TP_ATTN_FWD || op > AR_TP_MLP_BWD)
        return ar_fail(AR_EPROTO, "unknown tensor-parallel operation %d", op);
    if (block < 0 || slot < 0 || slot >= r->nslots || B < 1 || B > r->max_B)
        return ar_fail(AR_EPROTO, "tensor-parallel operation on block %lld, slot %d, %d rows: out of range",
                       (long long)f->step, slot, B);
    ar_block_shard *s = &r->shards[block];
    if (s->first_param != 0 && (op == AR_TP_ATTN_FWD || op == AR_TP_ATTN_BWD))
        return ar_fail(AR_EPROTO, "an attention operation for linear layers %d-%d", s->layer, s->layer + 1);
    /* forward reads the shard's input and answers a partial output; backward the reverse */
    int forward = op == AR_TP_ATTN_FWD || op == AR_TP_MLP_FWD;
    size_t N = (size_t)B * r->T, n_in = N * (size_t)(forward ? s->in : s->out),
           n_out = N * (size_t)(forward ? s->out : s->in);
    if (f->dtype != AR_DT_F32 || f->nbytes != n_in * sizeof(float))
        return ar_fail(AR_ESHAPE, "tensor-parallel payload of %zu bytes, %d rows need %zu", f->nbytes, B,
                       n_in * sizeof(float));
    int k = block * r->nslots + slot;
    const float *x = f->data;
    memset(r->partial, 0, n_out * sizeof(float));
    int rc = AR_OK;
    switch (op) {
    case AR_TP_ATTN_FWD:
        memcpy(r->ln_attn[k], x, n_in * sizeof(float));
        rc = ar_shard_attn_forward(s, B, r->T, r->ln_attn[k], r->saved_attn[k], r->partial);
        break;
    case AR_TP_ATTN_BWD:
        rc = ar_shard_attn_backward(s, B, r->T, r->ln_attn[k], r->saved_attn[k], x, r->partial, r->scratch);
        break;
    case AR_TP_MLP_FWD:
        memcpy(r->ln_mlp[k], x, n_in * sizeof(float));
        ar_shard_mlp_forward(s, B, r->T, r->ln_mlp[k], r->saved_mlp[k], r->partial);
        break;
    default:
        ar_shard_mlp_backward(s, B, r->T, r->ln_mlp[k], r->saved_mlp[k], x, r->partial, r->scratch);
        break;
    }
    if (rc != AR_OK)
        return rc;
    return reply(l, f, r->partial, n_out);
}

int ar_tp_rank_serve(ar_tp_rank *r, ar_link *leader)
{
    for (;;) {
        ar_frame f;
        int rc = ar_link_recv(leader, &f, -1);
        if (rc != AR_OK)
            return rc == AR_ECLOSED ? AR_OK : rc;
        if ((rc = ar_frame_validate(&f, (size_t)1 << 31)) == AR_OK && f.kind != AR_FRAME_TP)
            rc = ar_fail(AR_EPROTO, "a tensor-parallel rank got a %s frame", ar_frame_kind_name(f.kind));
        if (rc == AR_OK && (int)f.scalars[0] == AR_TP_STOP) {
            ar_frame_free(&f);
            return AR_OK;
        }
        if (rc == AR_OK)
            rc = handle(r, leader, &f);
        ar_frame_free(&f);
        if (rc != AR_OK) {
            /* tell the leader, keep serving */
            ar_frame e = {.kind = AR_FRAME_ERROR};
            const char *msg = ar_last_error();
            int64_t len = (int64_t)strlen(msg);
            if (ar_frame_set_payload(&e, AR_DT_U8, 1, &len, msg) == AR_OK)
                ar_link_send(leader, &e);
            else
                ar_frame_free(&e);
        }
    }
}

int ar_tp_group_scatter(ar_link **ranks, int nranks, int op, int block, int slot, int B, int T,
                        int C, const float *x)
{
    for (int i = 0; i < nranks; i++) {
        ar_frame f = {.kind = AR_FRAME_TP, .step = block, .mb = slot, .rows = B};
        f.scalars[0] = op;
        int64_t shape[2] = {(int64_t)B * T, C};
        int rc = ar_frame_set_payload(&f, AR_DT_F32, x ? 2 : 0, shape, x);
        if (rc == AR_OK)
            rc = ar_link_send(ranks[i], &f);
        else
            ar_frame_free(&f);
        /* a lost rank fails this stage's work (AR_EIO); AR_ECLOSED would
         * mean the stage's own neighbours left and end its serving */
        if (rc != AR_OK)
            return ar_fail(rc == AR_ECLOSED ? AR_EIO : rc, "tensor-parallel rank %d (%s): %s", i + 1,
                           ranks[i]->name, ar_last_error());
    }
    return AR_OK;
}

int ar_tp_group_gather_sum(ar_link **ranks, int nranks, size_t n, float *sum, double timeout_s)
{
    int rc = AR_OK;
    for (int i = 0; i < nranks; i++) {
        ar_frame f;
        int r = ar_link_recv(ranks[i], &f, timeout_s);
        if (r != AR_OK) {
            if (rc == AR_OK)
                rc = ar_fail(r == AR_ECLOSED ? AR_EIO : r, "tensor-parallel rank %d (%s) lost: %s", i + 1,
                             ranks[i]->name, ar_last_error());
            continue;
        }
        if (f.kind == AR_FRAME_ERROR) {
            if (rc == AR_OK)
                rc = ar_fail(AR_EPROTO, "tensor-parallel rank %d (%s): %.*s", i + 1, ranks[i]->name,
                             (int)f.nbytes, f.data ? (const char *)f.data : "");
        } else if (f.kind != AR_FRAME_TP || f.nbytes != n * sizeof(float)) {
            if (rc == AR_OK)
                rc = ar_fail(AR_EPROTO, "tensor-parallel rank %d (%s) answered %zu bytes, %zu expected", i + 1,
                             ranks[i]->name, f.nbytes, n * sizeof(float));
        } else if (n) {
            ar_residual_forward(sum, sum, f.data, (long)n);
        }
        ar_frame_free(&f);
    }
    return rc;
}

int ar_tp_blocks(const ar_model_spec *spec, int first_unit, int last_unit, int *first_block, int *nblocks)
{
    if (spec->type == AR_MODEL_MLP) {
        /* pairs of linear layers from the stage's first; an odd last one
         * stays whole with the leader */
        if (spec->dropout > 0)
            return ar_fail(AR_EINVAL, "tensor parallelism of an MLP with dropout is not supported");
        if (last_unit - first_unit < 2)
            return ar_fail(AR_EINVAL, "layers %d-%d hold no pair of linear layers to split", first_unit,
                           last_unit - 1);
        *first_block = first_unit;
        *nblocks = (last_unit - first_unit) / 2;
        return AR_OK;
    }
    if (spec->type != AR_MODEL_GPT)
        return ar_fail(AR_EINVAL, "tensor parallelism splits GPT blocks and MLP linear layers only");
    /* unit 0 is the embedding, units 1..n_layer the blocks, then the head */
    int b0 = first_unit < 1 ? 1 : first_unit;
    int b1 = last_unit > spec->n_layer + 1 ? spec->n_layer + 1 : last_unit;
    if (b1 <= b0)
        return ar_fail(AR_EINVAL, "layers %d-%d hold no transformer block to split", first_unit, last_unit - 1);
    *first_block = b0 - 1;
    *nblocks = b1 - b0;
    return AR_OK;
}

int ar_tp_group_layout(const ar_model_spec *spec, int first_unit, int last_unit, int members,
                       const double *weights, ar_tp_layout *out)
{
    memset(out, 0, sizeof *out);
    int rc = ar_tp_blocks(spec, first_unit, last_unit, &out->first, &out->count);
    if (rc != AR_OK)
        return rc;
    if (out->count > AR_TP_MAX_SHARDS)
        return ar_fail(AR_ELIMIT, "%d blocks in one tensor-parallel stage (at most %d)", out->count,
                       AR_TP_MAX_SHARDS);
    int gpt = spec->type == AR_MODEL_GPT;
    if (members < 2 || members > AR_PLAN_MAX_GROUP || (gpt && members > spec->n_head))
        return ar_fail(AR_EINVAL, "a group of %d devices cannot share %d attention heads", members,
                       gpt ? spec->n_head : 0);
    out->members = members;
    if (gpt && (rc = ar_tp_split(spec->n_head, members, weights, out->heads)) != AR_OK)
        return rc;
    for (int b = 0; b < out->count; b++) {
        /* a GPT block's 4C hidden units, or the pair's first layer's outputs */
        int units = gpt ? 4 * spec->n_embd : spec->hidden[out->first + 2 * b];
        ar_range r[AR_PLAN_MAX_GROUP];
        if ((rc = ar_tp_split(units, members, weights, r)) != AR_OK)
            return rc;
        for (int k = 0; k < members; k++)
            out->hidden[k][b] = r[k];
    }
    return AR_OK;
}

int ar_tp_layout_rank(const ar_tp_layout *l, int k, const ar_model_spec *spec, int max_B, int nslots,
                      uint64_t seed, const ar_optim_config *optim, ar_tp_rank *out)
{
    ar_range heads[AR_TP_MAX_SHARDS];
    for (int b = 0; b < l->count; b++)
        heads[b] = l->heads[k];
    return ar_tp_rank_create(out, spec, l->first, l->count, heads, l->hidden[k], max_B, nslots, seed, optim);
}

/* which: 0 data, 2 m, 3 v (as in ar_block_shard_*) */
static float *param_buffer(ar_param *q, int which)
{
    return which == 0 ? q->data : which == 2 ? q->m : q->v;
}

static int transfer(ar_stage *st, ar_tp_rank *const *ranks, int nranks, ar_stage *f, int to_full)
{
    if (f->first != st->first || f->last != st->last)
        return ar_fail(AR_EINTERNAL, "the whole stage holds layers %d-%d, the parts %d-%d", f->first,
                       f->last - 1, st->first, st->last - 1);
    for (int i = 0; i < st->nparams; i++) {
        ar_param *a = st->params[i], *b = ar_stage_find_param(f, a->name);
        if (!b || b->numel != a->numel)
            return ar_fail(AR_EINTERNAL, "the whole stage has no %s of %ld values", a->name, a->numel);
        for (int w = 0; w <= 3; w++)
            if (w != 1) {
                float *pa = param_buffer(a, w), *pb = param_buffer(b, w);
                memcpy(to_full ? pb : pa, to_full ? pa : pb, (size_t)a->numel * sizeof(float));
            }
    }
    if (st->has_tied_copy && f->has_tied_copy) {
        float *pa = st->tied_copy.data, *pb = f->tied_copy.data;
        memcpy(to_full ? pb : pa, to_full ? pa : pb, (size_t)st->tied_copy.numel * sizeof(float));
    }
    if (to_full)
        f->opt_step = st->opt_step;
    else
        st->opt_step = f->opt_step;
    for (int k = 0; k < nranks; k++) {
        ar_tp_rank *r = ranks[k];
        for (int b = 0; b < r->nblocks; b++) {
            ar_block_shard *sh = &r->shards[b];
            int gpt = sh->first_param == 0;
            /* a GPT block is one unit, an MLP pair two */
            int unit = gpt ? 1 + sh->layer : sh->layer, end = unit + (gpt ? 1 : 2);
            if (unit < f->first || end > f->last)
                return ar_fail(AR_EINTERNAL, "rank %d holds layers %d-%d, outside %d-%d", k, unit, end - 1,
                               f->first, f->last - 1);
            ar_layer *layer = f->layers[unit - f->first], *next = gpt ? NULL : f->layers[unit + 1 - f->first];
            for (int w = 0; w <= 3; w++) {
                if (w == 1)
                    continue;
                if (gpt && to_full)
                    ar_block_shard_to_full(sh, layer, w);
                else if (gpt)
                    ar_block_shard_from_full(sh, layer, w);
                else if (to_full)
                    ar_mlp_shard_to_full(sh, layer, next, w);
                else
                    ar_mlp_shard_from_full(sh, layer, next, w);
            }
        }
        if (!to_full)
            r->opt_step = f->opt_step;
    }
    return AR_OK;
}

int ar_tp_parts_to_full(ar_stage *part, ar_tp_rank *const *ranks, int nranks, ar_stage *full)
{
    return transfer(part, ranks, nranks, full, 1);
}

int ar_tp_parts_from_full(ar_stage *part, ar_tp_rank *const *ranks, int nranks, ar_stage *full)
{
    return transfer(part, ranks, nranks, full, 0);
}
