/* What the market's dashboard shows of a running job's plan, as plain C, and
 * the JSON document the dashboard serves for it (http.c sends it as the
 * job's "plan").
 *
 * A driver reports its plan (ReportProgress); the Market service checks every
 * field, fills these structs and the market keeps the JSON built here: only
 * checked values reach the page, each as a JSON number or string. */
#ifndef AR_MARKET_DASHBOARD_H
#define AR_MARKET_DASHBOARD_H

#include "train/plan.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One member of a planned stage; for a member of a tensor-parallel group,
 * its share in words and its heads (GPT) and hidden units (of the first
 * shard) [begin, end); all empty for a stage of whole layers. */
typedef struct {
    int64_t provider_id; /* 0: not a leased provider */
    const char *device;  /* HOST:PORT */
    const char *share;   /* "heads 0-1, hidden units 0-127 of each block"; NULL or "": whole layers */
    int head_begin, head_end, hidden_begin, hidden_end;
    bool relayed; /* reached through the market's relay, not dialled directly */
} ar_market_plan_member;

typedef struct {
    int first_unit, last_unit; /* [first, last) */
    const char *layers;        /* "embedding, blocks 0-1" */
    double predicted_ms;       /* per micro-batch */
    int n_members;             /* 1, or the tensor-parallel group's size */
    ar_market_plan_member members[AR_PLAN_MAX_GROUP];
} ar_market_plan_stage;

/* The link into stage `stage` (from the driver, for stage 0): measured
 * figures (0 when not measured), its compression, and megabytes per step
 * each way, predicted and moved so far (as sent, and as float32). */
typedef struct {
    int stage;
    const char *from, *to;
    double down_mb_s, up_mb_s, rtt_ms;
    const char *compress;
    double predicted_down_mb, predicted_up_mb;
    double down_mb, up_mb, down_raw_mb, up_raw_mb;
} ar_market_plan_link;

/* A whole plan: its stages in pipeline order, and its links. */
typedef struct {
    const char *model;    /* the model in words */
    const char *schedule; /* the pipeline schedule's name */
    int micro_batches;
    double predicted_bubble; /* 0..1 */
    size_t n_stages;
    const ar_market_plan_stage *stages;
    size_t n_links;
    const ar_market_plan_link *links;
} ar_market_plan;

/* The plan as the dashboard's JSON document:
 *   {"model", "micro_batches", "schedule", "predicted_bubble",
 *    "stages": [{"stage", "first_unit", "last_unit", "layers", "predicted_ms",
 *                "members": [{"provider_id", "device"
 *                             [, "share", "heads": [b, e], "hidden": [b, e]]}]}],
 *    "links": [{"stage", "from", "to", "down_mb_s", "up_mb_s", "rtt_ms", "compress",
 *               "predicted_mb": [down, up], "moved_mb": [down, up], "moved_raw_mb": [down, up]}]}
 * (a share and its non-empty ranges only for a tensor-parallel member).
 * NULL when memory runs out; the text is freed with free(). */
char *ar_dashboard_plan_json(const ar_market_plan *p);

#endif
