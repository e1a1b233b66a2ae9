/* A stage on one worker or on a tensor-parallel group of workers, from the
 * driver's side (see remote_stage.h): Load of every member, and Save/Restore
 * through local shadows so that checkpoints always hold whole tensors. */
#include "run/remote_stage.h"

#include "core/core.h"

#include <stdio.h>
#include <string.h>

int ar_remote_stage_init(ar_remote_stage *g, const ar_model_spec *spec, int first, int last, int members,
                         ar_client *const *clients, const char *const *addrs, const double *weights,
                         uint64_t seed, const ar_optim_config *optim)
{
    memset(g, 0, sizeof *g);
    if (members < 1 || members > AR_PLAN_MAX_GROUP)
        return ar_fail(AR_EINVAL, "a stage on %d workers (1 to %d)", members, AR_PLAN_MAX_GROUP);
    g->members = members;
    for (int k = 0; k < members; k++) {
        g->clients[k] = clients[k];
        snprintf(g->addrs[k], sizeof g->addrs[k], "%s", addrs[k]);
    }
    if (members == 1)
        return AR_OK;
    int rc;
    if ((rc = ar_tp_group_layout(spec, first, last, members, weights, &g->layout)) != AR_OK)
        return rc;
    if ((rc = ar_stage_create_tp(&g->leader, spec, first, last, 1, 1, seed, optim, g->no_links, members)) != AR_OK)
        return rc;
    g->ready = 1;
    for (int k = 0; k < members; k++)
        if ((rc = ar_tp_layout_rank(&g->layout, k, spec, 1, 1, seed, optim, &g->ranks[k])) != AR_OK) {
            ar_remote_stage_destroy(g);
            return rc;
        }
    return AR_OK;
}

void ar_remote_stage_destroy(ar_remote_stage *g)
{
    if (g->ready)
        ar_stage_destroy(&g->leader);
    for (int k = 0; k < AR_PLAN_MAX_GROUP; k++)
        ar_tp_rank_destroy(&g->ranks[k]);
    memset(g, 0, sizeof *g);
}

int ar_remote_stage_load(ar_remote_stage *g, const ar_load_args *a)
{
    int rc;
    if (g->members == 1) {
        if ((rc = ar_remote_load(g->clients[0], a, &g->params[0], g->sessions[0])) != AR_OK)
            return ar_fail(rc, "loading stage %d on %s: %s", a->index, g->addrs[0], ar_last_error());
        return AR_OK;
    }
    ar_load_args m = *a;
    m.layout = &g->layout;
    /* the ranks first: the leader's first Pipe opens theirs */
    for (int k = 1; k < g->members; k++) {
        m.role = AR_LOAD_RANK;
        m.member = k;
        m.next_worker = NULL;
        m.next_session = NULL;
        if ((rc = ar_remote_load(g->clients[k], &m, &g->params[k], g->sessions[k])) != AR_OK)
            return ar_fail(rc, "loading stage %d's rank %d on %s: %s", a->index, k, g->addrs[k], ar_last_error());
    }
    m = *a;
    m.role = AR_LOAD_LEADER;
    m.layout = &g->layout;
    m.member = 0;
    for (int k = 0; k < g->members; k++) {
        m.addresses[k] = k ? g->addrs[k] : NULL;
        m.sessions[k] = k ? g->sessions[k] : NULL;
    }
    if ((rc = ar_remote_load(g->clients[0], &m, &g->params[0], g->sessions[0])) != AR_OK)
        return ar_fail(rc, "loading stage %d's leader on %s: %s", a->index, g->addrs[0], ar_last_error());
    return AR_OK;
}

const char *ar_remote_stage_session(const ar_remote_stage *g)
{
    return g->sessions[0];
}

/* The members' parts as Save/Restore carry them: the leader holds the
 * unsplit parameters and its own share, a rank its shards alone. */
static ar_state_parts member_parts(ar_remote_stage *g, int k)
{
    return (ar_state_parts){.stage = k == 0 ? &g->leader : NULL, .rank = &g->ranks[k]};
}

static ar_tp_rank *const *rank_list(ar_remote_stage *g, ar_tp_rank **out)
{
    for (int k = 0; k < g->members; k++)
        out[k] = &g->ranks[k];
    return out;
}

int ar_remote_stage_save(ar_remote_stage *g, ar_stage *full)
{
    int rc;
    if (g->members == 1) {
        ar_state_parts p = {.stage = full};
        if ((rc = ar_remote_save(g->clients[0], g->sessions[0], &p)) != AR_OK)
            return ar_fail(rc, "%s: %s", g->addrs[0], ar_last_error());
        return AR_OK;
    }
    for (int k = 0; k < g->members; k++) {
        ar_state_parts p = member_parts(g, k);
        if ((rc = ar_remote_save(g->clients[k], g->sessions[k], &p)) != AR_OK)
            return ar_fail(rc, "%s: %s", g->addrs[k], ar_last_error());
    }
    ar_tp_rank *ranks[AR_PLAN_MAX_GROUP];
    return ar_tp_parts_to_full(&g->leader, rank_list(g, ranks), g->members, full);
}

int ar_remote_stage_restore(ar_remote_stage *g, ar_stage *full)
{
    int rc;
    if (g->members == 1) {
        ar_state_parts p = {.stage = full};
        if ((rc = ar_remote_restore(g->clients[0], g->sessions[0], &p)) != AR_OK)
            return ar_fail(rc, "%s: %s", g->addrs[0], ar_last_error());
        return AR_OK;
    }
    ar_tp_rank *ranks[AR_PLAN_MAX_GROUP];
    if ((rc = ar_tp_parts_from_full(&g->leader, rank_list(g, ranks), g->members, full)) != AR_OK)
        return rc;
    for (int k = 0; k < g->members; k++) {
        ar_state_parts p = member_parts(g, k);
        if ((rc = ar_remote_restore(g->clients[k], g->sessions[k], &p)) != AR_OK)
            return ar_fail(rc, "%s: %s", g->addrs[k], ar_last_error());
    }
    return AR_OK;
}
