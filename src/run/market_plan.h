/* A training plan as the market's dashboard shows it: each stage's layers in
 * words, its devices with their provider ids, and for a tensor-parallel group
 * each member's heads and hidden units (ReportProgress, net/market.h). */
#ifndef AR_TRAIN_MARKET_PLAN_H
#define AR_TRAIN_MARKET_PLAN_H

#include "net/market.h"
#include "train/plan.h"

#define AR_LAYERS_TEXT_MAX 96
#define AR_PLAN_LINK_NAME 64

/* Fill out[0 .. p->nstages-1] from the plan over devs; a device whose name
 * is the address of a provider of `lease` (may be NULL) gets its id. The
 * texts point into layers[] (one per stage), shares[] (one per member of
 * every group: AR_PLAN_MAX_STAGES * AR_PLAN_MAX_GROUP at most) and devs,
 * which must outlive out. */
void ar_market_plan_fill(const ar_plan *p, const ar_device *devs, const ar_model_spec *spec,
                         const ar_market_lease *lease, ar_market_plan_stage *out,
                         char (*layers)[AR_LAYERS_TEXT_MAX], char (*shares)[AR_PLAN_SHARE_TEXT]);

/* The plan's links for the dashboard (out[0 .. p->nstages-1]): the figures
 * the plan was made with (measured ones; 0 for a link not measured), each
 * link's compression, the plan's predicted megabytes per step, and what
 * moved on average over `steps` steps (moved: the sums, NULL or steps 0:
 * nothing yet). names[s] is room for the link's two ends. */
void ar_market_plan_links(const ar_plan *p, const ar_device *devs, const ar_edge_bytes *moved, long steps,
                          ar_market_plan_link *out, char (*names)[2][AR_PLAN_LINK_NAME]);

#endif
