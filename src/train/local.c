/* In-process pipelines (see local.h). */
#include "train/local.h"

#include "core/core.h"
#include "train/schedule.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

struct ar_local_stage {
    ar_stage_runner runner;
    pthread_t thread;
    int started;
    int result;
};

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
                                      .timeout_s = -1};
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
    for (int i = 0; p->stages && i < p->S; i++)
        ar_stage_destroy(&p->stages[i]);
    ar_free(p->stages);
    ar_free(p->stage_ptrs);
    ar_free(p->threads);
    ar_free(p->links);
    memset(p, 0, sizeof *p);
}
