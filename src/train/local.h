/* An in-process pipeline: S stages, each served by its own thread, chained
 * by in-process links. Used by single-device training (S = 1), by
 * "--workers local:S", and by the tests. */
#ifndef AR_LOCAL_H
#define AR_LOCAL_H

#include "train/frame.h"
#include "train/pipeline.h"
#include "train/stage.h"

typedef struct ar_local_stage ar_local_stage;

typedef struct {
    int S;
    ar_stage *stages;
    ar_stage **stage_ptrs;
    ar_local_stage *threads;
    ar_link **links;
    ar_link *head; /* the driver's end, towards stage 0 */
} ar_local_pipeline;

/* Create the stages (units split as evenly as possible); parameters are
 * initialised from seed and may be overwritten before ar_local_start. */
int ar_local_create(ar_local_pipeline *p, const ar_model_spec *spec, int S, int max_B, int M,
                    int schedule, uint64_t seed, const ar_optim_config *optim);
/* The same with the units of stage i given as [first[i], last[i]). */
int ar_local_create_split(ar_local_pipeline *p, const ar_model_spec *spec, int S, const int *first,
                          const int *last, int max_B, int M, int schedule, uint64_t seed,
                          const ar_optim_config *optim);
/* Link the stages and start their threads (threads_per_stage each). */
int ar_local_start(ar_local_pipeline *p, int schedule, uint64_t seed, int threads_per_stage);
/* Send STOP, join the threads, free everything. Safe on a partly built one. */
void ar_local_destroy(ar_local_pipeline *p);

#endif
