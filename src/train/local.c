/* In-process pipelines (see local.h). */
#include "train/local.h"

#include "core/core.h"
#include "train/audit.h"
#include "train/schedule.h"
#include "train/tp_group.h"

#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdio.h>
#include <string.h>

struct ar_local_stage {
    ar_stage_runner runner;
    pthread_t thread;
    int started;
    int result;
};

struct ar_local_rank {
    ar_tp_rank rank;
    ar_link *link; /* the rank's end; the leader's is in rank_links */
    int threads;
    pthread_t thread;
    int started;
};

static void *rank_main(void *arg)
{
    ar_local_rank *t = arg;
#ifdef _OPENMP
    /* the OpenMP thread count is per thread; left at every core, the ranks'
     * BLAS teams would spin against each other and the stages' */
    omp_set_num_threads(t->threads);
#endif
    ar_tp_rank_serve(&t->rank, t->link);
    return NULL;
}

static void *stage_main(void *arg)
{
    ar_local_stage *t = arg;
    t->result = ar_stage_serve(&t->runner);
    return NULL;
}

int ar_local_create(ar_local_pipeline *p, const ar_model_spec *spec, int S, int max_B, int M,
                    int schedule, uint64_t seed, const ar_optim_config *optim)
{
    int units = ar_spec_units(spec);
    if (S < 1 || S > units || S > 64) {
        memset(p, 0, sizeof *p);
        return ar_fail(AR_EINVAL, "%d stages for a model of %d layers", S, units);
    }
    int first[64], last[64];
    for (int i = 0; i < S; i++) {
        first[i] = units * i / S;
        last[i] = units * (i + 1) / S;
    }
    return ar_local_create_split(p, spec, S, first, last, max_B, M, schedule, seed, optim);
}

int ar_local_create_split(ar_local_pipeline *p, const ar_model_spec *spec, int S, const int *first,
                          const int *last, int max_B, int M, int schedule, uint64_t seed,
                          const ar_optim_config *optim)
{
    memset(p, 0, sizeof *p);
    int units = ar_spec_units(spec);
    if (S < 1 || S > units || S > 64)
        return ar_fail(AR_EINVAL, "%d stages for a model of %d layers", S, units);
    p->stages = ar_calloc((size_t)S, sizeof *p->stages);
    p->stage_ptrs = ar_calloc((size_t)S, sizeof *p->stage_ptrs);
    p->threads = ar_calloc((size_t)S, sizeof *p->threads);
    p->links = ar_calloc((size_t)S * 2, sizeof *p->links);
    ar_action *acts = ar_calloc((size_t)2 * M, sizeof *acts);
    if (!p->stages || !p->stage_ptrs || !p->threads || !p->links || !acts) {
        ar_free(acts);
        return AR_ENOMEM;
    }
    int rc = AR_OK;
    for (int i = 0; i < S && rc == AR_OK; i++) {
        if (first[i] != (i ? last[i - 1] : 0) || (i == S - 1 && last[i] != units)) {
            rc = ar_fail(AR_EINVAL, "stage %d: units %d-%d do not continue the pipeline", i, first[i],
                         last[i] - 1);
            break;
        }
        int slots = ar_schedule_build(schedule, S, i, M, acts);
        rc = ar_stage_create(&p->stages[i], spec, first[i], last[i], max_B, slots, seed, optim);
        if (rc == AR_OK) {
            p->stage_ptrs[i] = &p->stages[i];
            p->S = i + 1;
        }
    }
    ar_free(acts);
    return rc;
}

int ar_local_has_tp(const ar_local_pipeline *p)
{
    return p->nranks > 0;
}

int ar_local_create_plan(ar_local_pipeline *p, const ar_model_spec *spec, const ar_plan *plan,
                         const ar_device *devs, int max_B, int M, int schedule, uint64_t seed,
                         const ar_optim_config *optim)
{
    memset(p, 0, sizeof *p);
    int S = plan->nstages, total = 0;
    for (int s = 0; s < S; s++)
        total += plan->group_size[s] > 1 ? plan->group_size[s] : 0;
    if (total == 0)
        return ar_local_create_split(p, spec, S, plan->first, plan->last, max_B, M, schedule, seed,
                                     optim);
    ar_tp_layout layout;
    ar_local_rank *ranks = ar_calloc((size_t)total, sizeof *ranks);
    ar_link **links = ar_calloc((size_t)total, sizeof *links);
    ar_action *acts = ar_calloc((size_t)2 * M, sizeof *acts);
    p->stages = ar_calloc((size_t)S, sizeof *p->stages);
    p->stage_ptrs = ar_calloc((size_t)S, sizeof *p->stage_ptrs);
    p->threads = ar_calloc((size_t)S, sizeof *p->threads);
    p->links = ar_calloc((size_t)S * 2, sizeof *p->links);
    p->ranks = ranks;
    p->rank_links = links;
    if (!ranks || !links || !acts || !p->stages || !p->stage_ptrs || !p->threads || !p->links) {
        ar_free(acts);
        return AR_ENOMEM;
    }
    int rc = AR_OK, at = 0;
    for (int s = 0; s < S && rc == AR_OK; s++) {
        int slots = ar_schedule_build(schedule, S, s, M, acts);
        int g = plan->group_size[s] > 1 ? plan->group_size[s] : 0;
        p->rank_first[s] = at;
        p->rank_count[s] = g;
        if (g) {
            /* the stage's blocks (or pairs of linear layers), split among the members */
            double w[AR_PLAN_MAX_GROUP];
            ar_plan_group_weights(plan, devs, s, w);
            if ((rc = ar_tp_group_layout(spec, plan->first[s], plan->last[s], g, w, &layout)) != AR_OK) {
                rc = ar_fail(rc, "stage %d: %s", s, ar_last_error());
                break;
            }
            for (int k = 0; k < g && rc == AR_OK; k++) {
                ar_local_rank *t = &ranks[at + k];
                t->threads = ar_get_threads() / total > 1 ? ar_get_threads() / total : 1;
                rc = ar_tp_layout_rank(&layout, k, spec, max_B, slots, seed, optim, &t->rank);
                char name[64];
                snprintf(name, sizeof name, "stage %d rank %d", s, k);
                if (rc == AR_OK)
                    rc = ar_link_local_pair(&links[at + k], &t->link, name, "leader");
                if (rc == AR_OK) {
                    if (pthread_create(&t->thread, NULL, rank_main, t) != 0)
                        rc = ar_fail(AR_ENOMEM, "cannot start a rank thread");
                    else
                        t->started = 1;
                }
                p->nranks = at + k + 1;
            }
            at += g;
        }
        if (rc == AR_OK)
            rc = ar_stage_create_tp(&p->stages[s], spec, plan->first[s], plan->last[s], max_B, slots, seed,
                                    optim, g ? links + p->rank_first[s] : NULL, g);
        if (rc == AR_OK) {
            p->stage_ptrs[s] = &p->stages[s];
            p->S = s + 1;
        }
    }
    ar_free(acts);
    return rc;
}

static int transfer_full(ar_local_pipeline *p, ar_stage *full, int to_full)
{
    for (int s = 0; s < p->S; s++) {
        ar_tp_rank *ranks[AR_PLAN_MAX_GROUP];
        int g = p->rank_count[s];
        for (int k = 0; k < g; k++)
            ranks[k] = &p->ranks[p->rank_first[s] + k].rank;
        int rc = to_full ? ar_tp_parts_to_full(&p->stages[s], ranks, g, &full[s])
                         : ar_tp_parts_from_full(&p->stages[s], ranks, g, &full[s]);
        if (rc != AR_OK)
            return ar_fail(rc, "stage %d: %s", s, ar_last_error());
    }
    return AR_OK;
}

int ar_local_to_full(ar_local_pipeline *p, ar_stage *full)
{
    return transfer_full(p, full, 1);
}

int ar_local_from_full(ar_local_pipeline *p, ar_stage *full)
{
    return transfer_full(p, full, 0);
}

int ar_local_start(ar_local_pipeline *p, int schedule, uint64_t seed, int threads_per_stage)
{
    int S = p->S;
    int rc;
    for (int i = 0; i < S; i++) {
        char a[32], b[32];
        snprintf(a, sizeof a, "stage %d", i);
        if (i == 0)
            snprintf(b, sizeof b, "driver");
        else
            snprintf(b, sizeof b, "stage %d", i - 1);
        if ((rc = ar_link_local_pair(&p->links[2 * i], &p->links[2 * i + 1], a, b)) != AR_OK)
            return rc;
        /* [2i] sends activations down into stage i, [2i+1] its gradients up */
        p->links[2 * i]->compress = p->links[2 * i + 1]->compress = p->codec[i];
    }
    p->head = p->links[0];
    for (int i = 0; i < S; i++) {
        ar_local_stage *t = &p->threads[i];
        t->runner = (ar_stage_runner){.stage = &p->stages[i],
                                      .up = p->links[2 * i + 1],
                                      .down = i + 1 < S ? p->links[2 * (i + 1)] : NULL,
                                      .schedule = schedule,
                                      .index = i,
                                      .count = S,
                                      .threads = threads_per_stage,
                                      .max_frame_bytes = (size_t)1 << 31,
                                      .seed = seed,
                                      .timeout_s = -1,
                                      .keep = p->keeps ? &p->keeps[i] : NULL,
                                      .digests = p->keeps != NULL};
        if (pthread_create(&t->thread, NULL, stage_main, t) != 0)
            return ar_fail(AR_ENOMEM, "cannot start the thread of stage %d", i);
        t->started = 1;
    }
    return AR_OK;
}

void ar_local_destroy(ar_local_pipeline *p)
{
    if (p->head)
        ar_chain_stop(p->head);
    /* a stage stuck mid-step (after a failure) would never see the STOP:
     * closing every link wakes it with AR_ECLOSED */
    for (int i = 0; p->links && i < 2 * p->S; i++)
        if (p->links[i])
            ar_link_close(p->links[i]);
    for (int i = 0; p->threads && i < p->S; i++)
        if (p->threads[i].started)
            pthread_join(p->threads[i].thread, NULL);
    for (int i = 0; p->links && i < 2 * p->S; i++)
        ar_link_destroy(p->links[i]);
    for (int i = 0; i < p->nranks; i++) {
        ar_local_rank *t = &p->ranks[i];
        if (t->started) {
            ar_frame stop = {.kind = AR_FRAME_TP};
            stop.scalars[0] = AR_TP_STOP;
            ar_link_send(p->rank_links[i], &stop);
            pthread_join(t->thread, NULL);
        }
        ar_link_destroy(p->rank_links[i]);
        ar_link_destroy(t->link);
        ar_tp_rank_destroy(&t->rank);
    }
    ar_free(p->ranks);
    ar_free(p->rank_links);
    for (int i = 0; p->stages && i < p->S; i++)
        ar_stage_destroy(&p->stages[i]);
    ar_free(p->stages);
    ar_free(p->stage_ptrs);
    ar_free(p->threads);
    ar_free(p->links);
    for (int i = 0; p->keeps && i < p->S; i++)
        ar_audit_keep_destroy(&p->keeps[i]);
    ar_free(p->keeps);
    memset(p, 0, sizeof *p);
}

int ar_local_keep_for_audits(ar_local_pipeline *p)
{
    if (p->keeps)
        return AR_OK;
    if (!(p->keeps = ar_calloc((size_t)p->S, sizeof *p->keeps)))
        return ar_fail(AR_ENOMEM, "out of memory for audit keeps");
    for (int i = 0; i < p->S; i++) {
        int rc = ar_audit_keep_init(&p->keeps[i]);
        if (rc != AR_OK) {
            for (int j = 0; j < i; j++)
                ar_audit_keep_destroy(&p->keeps[j]);
            ar_free(p->keeps);
            p->keeps = NULL;
            return rc;
        }
    }
    return AR_OK;
}
