/* A stage on one worker or on a tensor-parallel group of workers, as the
 * driver sees it: Load of every member, and Save/Restore through local
 * shadows so that checkpoints always hold whole tensors. */
#ifndef AR_RUN_REMOTE_STAGE_H
#define AR_RUN_REMOTE_STAGE_H

#include "net/remote.h"

/* One worker, or a tensor-parallel group of them (member 0 leads; docs/DESIGN.md,
 * "Tensor parallelism"). The driver keeps local shadows of every part so that Save and Restore
 * can go through a whole stage of the same units: what checkpoints see. */
typedef struct {
    int members; /* 1: a plain stage */
    ar_client *clients[AR_PLAN_MAX_GROUP]; /* not owned */
    char addrs[AR_PLAN_MAX_GROUP][128];
    ar_tp_layout layout;                   /* groups: who holds which heads and hidden units */
    uint64_t params[AR_PLAN_MAX_GROUP];    /* floats each member holds (from Load) */
    /* each member's session (LoadReply.session): its Save, Restore and
     * Pipe need it; [0], the leader's, is the stage's */
    char sessions[AR_PLAN_MAX_GROUP][AR_SESSION_HEX + 1];
    /* groups only: the leader's unsplit parts and every member's shards */
    ar_stage leader;
    ar_tp_rank ranks[AR_PLAN_MAX_GROUP];
    ar_link *no_links[AR_PLAN_MAX_GROUP]; /* the shadow leader never calls its ranks */
    int ready;
} ar_remote_stage;

/* Set up the shadows of stage [first, last) on `members` workers, the heads
 * and hidden units split in proportion to weights (NULL: equally). */
int ar_remote_stage_init(ar_remote_stage *g, const ar_model_spec *spec, int first, int last, int members,
                         ar_client *const *clients, const char *const *addrs, const double *weights,
                         uint64_t seed, const ar_optim_config *optim);
void ar_remote_stage_destroy(ar_remote_stage *g);
/* Load every member (ranks first, then the leader with the group and the
 * ranks' sessions), from the arguments of a plain stage. */
int ar_remote_stage_load(ar_remote_stage *g, const ar_load_args *a);
/* The stage's session, which the Pipe into the stage presents (the
 * driver's, or the previous stage's: its Load's next_session). */
const char *ar_remote_stage_session(const ar_remote_stage *g);
/* Save every member's state and gather it into full (a whole stage of the
 * same units); restore pushes full's state out to the members. */
int ar_remote_stage_save(ar_remote_stage *g, ar_stage *full);
int ar_remote_stage_restore(ar_remote_stage *g, ar_stage *full);

#endif
