/* An in-process pipeline: S stages, each served by its own thread, chained
 * by in-process links. Used by single-device training (S = 1), by
 * "--workers local:S", and by the tests. */
#ifndef AR_LOCAL_H
#define AR_LOCAL_H

#include "train/frame.h"
#include "train/pipeline.h"
#include "train/plan.h"
#include "train/stage.h"

typedef struct ar_local_stage ar_local_stage;
typedef struct ar_local_rank ar_local_rank;

typedef struct {
    int S;
    ar_stage *stages;
    ar_stage **stage_ptrs;
    ar_local_stage *threads;
    ar_link **links;
    ar_link *head; /* the driver's end, towards stage 0 */
    /* tensor-parallel ranks (threads), stage s uses rank_links[rank_first[s] ..
     * + rank_count[s]) */
    ar_local_rank *ranks;
    int nranks;
    ar_link **rank_links;
    int rank_first[64], rank_count[64];
    struct ar_audit_keep *keeps; /* per stage, after ar_local_keep_for_audits */
    /* the codec (enum ar_compress) of the link into stage s, both ways (the
     * driver's to stage 0 too); 0 (none) unless set before ar_local_start */
    int codec[64];
} ar_local_pipeline;

/* Create the stages (units split as evenly as possible); parameters are
 * initialised from seed and may be overwritten before ar_local_start. */
int ar_local_create(ar_local_pipeline *p, const ar_model_spec *spec, int S, int max_B, int M,
                    int schedule, uint64_t seed, const ar_optim_config *optim);
/* The same with the units of stage i given as [first[i], last[i]). */
int ar_local_create_split(ar_local_pipeline *p, const ar_model_spec *spec, int S, const int *first,
                          const int *last, int max_B, int M, int schedule, uint64_t seed,
                          const ar_optim_config *optim);
/* Stages as a plan says (train/plan.h), including tensor-parallel groups:
 * a stage whose plan entry names several devices has its GPT blocks split
 * over that many ranks (threads here), shares in proportion to the devices'
 * speed. */
int ar_local_create_plan(ar_local_pipeline *p, const ar_model_spec *spec, const ar_plan *plan,
                         const ar_device *devs, int max_B, int M, int schedule, uint64_t seed,
                         const ar_optim_config *optim);
/* Copy every stage's state (weights, AdamW moments, step) into / out of
 * plain stages of the same unit ranges: how checkpoints see a pipeline whose
 * blocks are split over ranks. */
int ar_local_to_full(ar_local_pipeline *p, ar_stage *full);
int ar_local_from_full(ar_local_pipeline *p, ar_stage *full);
int ar_local_has_tp(const ar_local_pipeline *p);
/* Before ar_local_start: every stage keeps its last two steps for audits by
 * replay (train/audit.h), in p->keeps[i]. */
int ar_local_keep_for_audits(ar_local_pipeline *p);
/* Link the stages and start their threads (threads_per_stage each). */
int ar_local_start(ar_local_pipeline *p, int schedule, uint64_t seed, int threads_per_stage);
/* Send STOP, join the threads, free everything. Safe on a partly built one. */
void ar_local_destroy(ar_local_pipeline *p);

#endif
