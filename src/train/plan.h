/* Planning (DESIGN.md §4): which device holds which contiguous range of a
 * model's units, chosen to minimise the slowest stage's time per micro-batch
 * (compute plus sending its output on) subject to each device's memory.
 *
 * The costs come from the model spec (ar_plan_unit_costs), the devices from a
 * quick measurement (ar_probe_sgemm_gflops, ar_free_memory_bytes) or from
 * what providers report. A dynamic program over split points and over the
 * ordered devices finds the optimum exactly (ar_plan_auto); a plan written by
 * hand ("0-2,3-5,6-7") is parsed and priced by the same cost model. */
#ifndef AR_PLAN_H
#define AR_PLAN_H

#include "nn/spec.h"
#include "nn/tp.h"

#include <stdio.h>

#define AR_PLAN_MAX_STAGES 64
#define AR_PLAN_MAX_DEVICES 64
/* bytes/s assumed for a device whose bandwidth is 0 (same machine: loopback) */
#define AR_PLAN_DEFAULT_BANDWIDTH 1.5e9
#define AR_PLAN_MAX_GROUP 8

/* What one unit costs, per micro-batch of mb_rows rows. Memory matches what
 * ar_stage_create allocates for a stage holding the unit. */
typedef struct {
    double flops;       /* forward + backward FLOPs per micro-batch */
    double param_bytes; /* the unit's own parameters */
    double state_bytes; /* params + grads + AdamW m, v (+ tied-gradient buffer of the GPT head) */
    double tied_bytes;  /* copy of a weight owned by unit 0 (the GPT head's wte): only
                         * allocated when unit 0 is in another stage */
    double act_bytes;   /* per micro-batch in flight (one slot): the unit's input and what it
                         * saves for backward (+ the softmax of the model's last unit). A unit
                         * inside a stage reads its input from the previous unit's saved output,
                         * so the stage does not count that input twice. */
    double work_bytes;  /* backward scratch and the stage's boundary gradient buffers: a stage
                         * needs the largest of its units', not the sum */
    double out_bytes;   /* the unit's output per micro-batch, sent to the next stage (and a
                         * gradient of the same size comes back) */
} ar_unit_cost;

/* Fill out[ar_spec_units(spec)] for micro-batches of mb_rows rows (of
 * block_size tokens for a GPT). FLOPs count the matmuls (2*M*N*K forward,
 * twice that backward) and attention (QK^T and AV over the full T x T);
 * element-wise work is ignored. */
int ar_plan_unit_costs(const ar_model_spec *spec, int mb_rows, ar_unit_cost *out);

typedef struct {
    char name[64];
    double gflops;    /* measured GFLOP/s (> 0) */
    double mem_bytes; /* free memory; 0 = unknown, not checked */
    double bandwidth; /* bytes/s to the next device; 0 = same machine (AR_PLAN_DEFAULT_BANDWIDTH) */
} ar_device;

typedef struct {
    int nstages;
    int device[AR_PLAN_MAX_STAGES];            /* index into the device list */
    int first[AR_PLAN_MAX_STAGES], last[AR_PLAN_MAX_STAGES]; /* units [first,last) */
    double stage_time[AR_PLAN_MAX_STAGES];     /* predicted s per micro-batch: compute + output transfer */
    double stage_mem[AR_PLAN_MAX_STAGES];      /* predicted bytes */
    double bubble;                             /* predicted bubble fraction (S-1)/(M+S-1) */
    /* tensor parallelism: stage s is computed by group_size[s] devices,
     * group[s][0] (== device[s]) leading; 1 for a plain stage */
    int group_size[AR_PLAN_MAX_STAGES];
    int group[AR_PLAN_MAX_STAGES][AR_PLAN_MAX_GROUP];
    /* a group's heads and hidden units split equally (0; 8 heads over 3 as
     * 3+3+2) or in proportion to the members' speed (1) */
    int by_speed[AR_PLAN_MAX_STAGES];
    int micro_batches;                         /* M and the schedule the plan was priced for */
    int schedule;                              /* enum ar_schedule_kind */
} ar_plan;

/* Activation slots a stage needs: M for GPipe; under 1F1B min(M, S - s + 1)
 * for stage s of S, 1 for the last (what ar_schedule_build returns). */
int ar_plan_slots(int schedule, int S, int s, int micro_batches);

/* Bytes stage [first,last) needs with `slots` micro-batches in flight. */
double ar_plan_stage_mem(const ar_unit_cost *costs, int nunits, int first, int last, int slots);

/* The best plan: devices keep their order along the pipe and may be skipped
 * (one too small for any unit is left out with a warning naming it). Minimises
 * the slowest stage's time; ties go to fewer stages, then to the smaller total
 * time. AR_ELIMIT (with a message naming the unit that does not fit) when no
 * assignment fits in memory; AR_EINVAL for bad arguments. */
int ar_plan_auto(const ar_unit_cost *costs, int nunits, const ar_device *devs, int ndev,
                 int micro_batches, int schedule, ar_plan *out);

/* A plan by hand: "0-2,3-5,6-7" gives stage i units a..b inclusive on device
 * i; "4" is "4-4". The ranges must be contiguous and cover 0..nunits-1, with
 * no more stages than devices. Times and memory are left 0 (ar_plan_estimate). */
int ar_plan_parse(const char *text, int nunits, int ndev, ar_plan *out);
/* The same, where a stage may name its devices: "0-3@A+B,4-5@C" puts layers
 * 0-3 on a tensor-parallel group of devices A and B (A leads) and 4-5 on C.
 * A device is its index in devs or its name (devs may be NULL: indices only).
 * A group splits its heads and hidden units equally, or in proportion to the
 * members' speed when it ends in "~speed" ("0-3@A+B~speed"). */
int ar_plan_parse_devices(const char *text, int nunits, const ar_device *devs, int ndev,
                          ar_plan *out);

/* The weights a group's split uses: every member 1, or its GFLOP/s when the
 * plan splits stage s by speed. */
void ar_plan_group_weights(const ar_plan *p, const ar_device *devs, int s, double *w);

/* Fill stage_time, stage_mem, bubble (and micro_batches, schedule) of a plan.
 * Returns AR_ELIMIT, after filling everything, when a stage does not fit in
 * its device's memory; AR_EINVAL for a malformed plan. */
int ar_plan_estimate(ar_plan *p, const ar_unit_cost *costs, int nunits, const ar_device *devs,
                     int ndev, int micro_batches, int schedule);

/* "embedding, blocks 0-1", "block 3", "head", "linear 0-1", "units 2-4" (no
 * spec): the model's units [first, last) in words. */
void ar_plan_layers_text(const ar_model_spec *spec, int first, int last, char *buf, size_t n);

#define AR_PLAN_SHARE_TEXT 160

/* What each member g of stage s's tensor-parallel group computes: in words
 * (text[g]: "heads 0-1, hidden units 0-127 of each block" for a GPT, "hidden
 * units 0-255 of linear 0, ..." for an MLP), its heads (GPT; empty for an
 * MLP) and its hidden units of the stage's first shard. AR_EINVAL when the
 * stage is not a group or cannot be split so. */
int ar_plan_member_shares(const ar_plan *p, const ar_device *devs, const ar_model_spec *spec, int s,
                          char (*text)[AR_PLAN_SHARE_TEXT], ar_range *heads, ar_range *hidden);

/* A table: stage, device, layers (named from spec when given: "embedding,
 * blocks 0-1", "head"), parameter MB, memory MB, ms per micro-batch; then the
 * bubble. */
void ar_plan_print(FILE *out, const ar_plan *p, const ar_device *devs, const ar_unit_cost *costs,
                   const ar_model_spec *spec);

/* GFLOP/s of cblas_sgemm on 512x512x512 products, timed for about `seconds`. */
double ar_probe_sgemm_gflops(double seconds);
/* MemAvailable from /proc/meminfo in bytes; 0 when unknown. */
double ar_free_memory_bytes(void);

#endif
