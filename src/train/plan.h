/* Planning (see docs/DESIGN.md): which device holds which contiguous range of a
 * model's units, chosen to minimise the slowest stage's time per micro-batch
 * (compute plus sending its output on) subject to each device's memory.
 *
 * The costs come from the model spec (ar_plan_unit_costs), the devices from
 * the device probe (core/device.h), run here or by the workers and providers
 * that report it. A dynamic program over split points and over the
 * ordered devices finds the optimum exactly (ar_plan_auto); a plan written by
 * hand ("0-2,3-5,6-7") is parsed and priced by the same cost model. */
#ifndef AR_PLAN_H
#define AR_PLAN_H

#include "nn/spec.h"
#include "nn/tp.h"
#include "train/frame.h"

#include <stdint.h>
#include <stdio.h>

#define AR_PLAN_MAX_STAGES 64
#define AR_PLAN_MAX_DEVICES 64
/* bytes/s assumed for a device whose bandwidth is 0 (same machine: loopback) */
#define AR_PLAN_DEFAULT_BANDWIDTH 1.5e9
#define AR_PLAN_MAX_GROUP 8
/* seconds a tensor-parallel message costs beyond its bytes: the leader waits
 * for every one of them (a gRPC message on loopback takes tens of
 * microseconds), which makes groups pointless for tiny blocks */
#define AR_PLAN_MESSAGE_S 5e-5

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
    /* the shape of what crosses a link before and after the unit (the
     * planner prices a link's frames with them): micro-batch rows, tokens
     * per row (1 for an MLP), its input elements per token (0: int32
     * tokens, one per token) and its output elements per token */
    int rows, tokens, in_width, out_width;
    /* A GPT block as a tensor-parallel group splits it (train/tp_group.h):
     * each member takes a share of the heads (their QKV rows, projection
     * columns, attention) and of the MLP hidden units; the leader keeps the
     * rest. All 0 for a unit that is not split: it stays whole on the leader. */
    struct {
        int heads, hidden;            /* items split: n_head heads, 4*n_embd hidden units */
        double attn_flops, mlp_flops; /* the heads' and the hidden units' FLOPs (the whole block's) */
        double attn_state, mlp_state; /* state bytes of their weights, all heads / all units */
        double attn_act, mlp_act;     /* per slot: what a member with all heads / units saves */
        double rank_act;              /* per slot: the two normalised inputs a member keeps */
        double rank_work;             /* a member's backward scratch with all heads and units */
        double leader_state;          /* the unsplit rest on the leader: LayerNorms, biases */
        double leader_act, leader_work; /* as act_bytes and work_bytes, for the leader's part */
        double msg_bytes, reply_bytes;  /* wire bytes of one request to a member and its reply */
        /* An MLP's linear layer: a group splits them in pairs from its
         * stage's first (the first by output columns, the second by input
         * rows; an odd last one stays whole with the leader). hidden is the
         * layer's output width when it can lead a pair. */
        int linear;
        double bias_state;            /* state bytes of its bias (the second's stays with the leader) */
        double in_bytes;              /* its input per micro-batch, B x in floats */
        double in_msg, in_reply;      /* wire bytes: a request carrying its input, a reply of that size */
        double out_msg, out_reply;    /* the same for its output */
    } tp;
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
    double bandwidth_up; /* bytes/s from the next device back; 0 = the same as bandwidth */
    double rtt;       /* seconds, a small frame's round trip to the next device; 0 = none */
    int solo;         /* ar_plan_auto puts it in no tensor-parallel group (a market provider,
                       * a worker without the capability) */
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
    /* a group's predicted traffic between its leader and the other members,
     * bytes per training step (0 for a plain stage), and each member's memory
     * (member_mem[s][0] == stage_mem[s], the leader's, its own share included) */
    double tp_bytes[AR_PLAN_MAX_STAGES];
    double tp_transfer[AR_PLAN_MAX_STAGES]; /* s per micro-batch of it (ar_group_cost.transfer) */
    double member_mem[AR_PLAN_MAX_STAGES][AR_PLAN_MAX_GROUP];
    /* The links (docs/DESIGN.md, "Slow links"). Edge s is the link into
     * stage s (edge 0: the driver's to stage 0): its figures as planned
     * with (measured, or the loopback default), the compression of the
     * tensors on it (enum ar_compress, never AUTO), the time of one
     * micro-batch's activation down and gradient up, and the frame bytes
     * it carries per training step each way, compressed and as float32. */
    ar_link_figures link[AR_PLAN_MAX_STAGES];
    int codec[AR_PLAN_MAX_STAGES];
    double edge_down_s[AR_PLAN_MAX_STAGES], edge_up_s[AR_PLAN_MAX_STAGES];
    ar_edge_bytes edge_bytes[AR_PLAN_MAX_STAGES];
    /* 1F1B warm-up forwards beyond the default on stage s, to cover the
     * round trip of edge s+1 (within its device's memory), and the
     * activation slots that makes */
    int extra_warmup[AR_PLAN_MAX_STAGES];
    int slots[AR_PLAN_MAX_STAGES];
    int compress; /* the setting it was planned for (enum ar_compress) */
} ar_plan;

/* What a plan is made for beyond the devices: the compression setting
 * (AUTO: the least lossy codec per edge that keeps its transfers within
 * AR_PLAN_AUTO_MARGIN of the slowest stage's compute, so the link stays off
 * the critical path) and the driver's own link to stage 0 (not measured: an
 * in-process pipeline, whose links carry pointers, never compressed under
 * AUTO). */
typedef struct {
    int compress;
    ar_link_figures driver;
} ar_plan_opts;
#define AR_PLAN_AUTO_MARGIN 0.8
/* A fast link: one that moves a micro-batch, or a small frame there and
 * back, in under this. AUTO never compresses one (per-message costs are of
 * that order on any link, so compressing saves nothing there, and runs over
 * fast links stay exact whatever their tiny stages compute), and its
 * latency needs no warm-up beyond the default (which covers that much). */
#define AR_PLAN_FAST_LINK_S 2e-3

/* The price of a stage of units [first,last) on a tensor-parallel group: the
 * devices members[0..g-1] (members[0] leads), split equally or by speed. */
typedef struct {
    double time;       /* s per micro-batch: the leader's unsplit part, then the slowest
                        * member's share, the group's transfers and the stage output */
    double compute[AR_PLAN_MAX_GROUP]; /* s per micro-batch of each member's share */
    double transfer;   /* s per micro-batch moving the group's messages: their bytes at
                        * each member's bandwidth plus AR_PLAN_MESSAGE_S apiece */
    double bytes;      /* per training step, between the leader and the other members,
                        * both directions, frame headers included (the leader's own share
                        * is computed in-process and moves nothing) */
    double mem[AR_PLAN_MAX_GROUP]; /* bytes on each member; the leader's holds its own share */
} ar_group_cost;

/* The cost model of a group (what ar_plan_estimate and ar_plan_auto use).
 * Per micro-batch and GPT block, the leader sends each member the normalised
 * input twice forward (attention, MLP) and the output gradient twice
 * backward, and gets a partial of the same size back each time (per pair of
 * an MLP's layers: the input out and a partial output back, the output
 * gradient out and a partial input gradient back); per step a gradient-norm
 * and an optimizer-step exchange. A member's transfers take bytes / its
 * bandwidth plus AR_PLAN_MESSAGE_S per message, one member after another
 * (they share the leader's link). AR_EINVAL when the units hold nothing to
 * split or there are more members than heads (or hidden units). */
int ar_plan_group_cost(const ar_unit_cost *costs, int nunits, int first, int last,
                       const ar_device *devs, const int *members, int g, int by_speed, int slots,
                       int micro_batches, ar_group_cost *out);

/* Activation slots a stage needs: M for GPipe; under 1F1B min(M, S - s + 1)
 * for stage s of S, 1 for the last (what ar_schedule_build returns). */
int ar_plan_slots(int schedule, int S, int s, int micro_batches);
/* The same with extra_warmup more 1F1B warm-up forwards (none on the last
 * stage): what ar_schedule_build_ex returns. */
int ar_plan_slots_ex(int schedule, int S, int s, int micro_batches, int extra_warmup);

/* 1F1B warm-up forwards beyond the default that cover a link's latency
 * (rtt plus one micro-batch's transfer each way), with stage_s the
 * pipeline's time per micro-batch: latency / stage_s - 1/2, rounded up (the
 * default's one forward of slack covers half a micro-batch and more); none
 * for a latency under AR_PLAN_FAST_LINK_S. Callers cap it at M. */
int ar_plan_extra_warmup(double rtt_s, double down_s, double up_s, double stage_s);

/* Frame bytes of one micro-batch on the link into the stage that starts at
 * unit `first` (0: the driver's input batch): its activation down and its
 * gradient up, compressed with codec where they may be. What a link's
 * time per micro-batch is priced from: bytes / the link's bandwidth each
 * way. */
void ar_plan_link_mb_bytes(const ar_unit_cost *costs, int first, int M, int codec, double *down, double *up);

/* Frame bytes a link carries per training step (see ar_plan.edge_bytes):
 * M micro-batches' activations down (the input batch on edge 0, the first
 * with the step's lr and clipping) and gradients up, compressed with codec
 * where they may be, the optimizer step down (not on edge 0: stage 0 takes
 * it, ar_chain_send_step) and the gradient norms up (records of stages
 * s..S-1), and the tied weight's values and gradient when the link lies
 * between its owner and the head. */
void ar_plan_edge_bytes(const ar_plan *p, const ar_unit_cost *costs, int nunits, int s, int codec,
                        ar_edge_bytes *out);

/* Bytes stage [first,last) needs with `slots` micro-batches in flight. */
double ar_plan_stage_mem(const ar_unit_cost *costs, int nunits, int first, int last, int slots);

/* The best plan: devices keep their order along the pipe and may be skipped
 * (one too small for any unit is left out with a warning naming it). A stage
 * holding GPT blocks may run on a tensor-parallel group of 2 to
 * AR_PLAN_MAX_GROUP consecutive devices, split by speed when their speeds
 * differ: chosen where a block fits no single device, or where it lowers the
 * slowest stage once the group's transfers are counted. Minimises the
 * slowest stage's time; ties go to fewer stages, then to the smaller total
 * time. AR_ELIMIT (with a message naming the unit that does not fit) when no
 * assignment fits in memory; AR_EINVAL for bad arguments. */
int ar_plan_auto(const ar_unit_cost *costs, int nunits, const ar_device *devs, int ndev,
                 int micro_batches, int schedule, ar_plan *out);
/* The same for a compression setting and the driver's link (opts NULL:
 * none, and an in-process driver). A stage's time per micro-batch is the
 * longer of its compute and its link's transfers each way (sends overlap
 * compute); under 1F1B its slots include the warm-up that covers its link's
 * round trip, as many as fit its device's memory. */
int ar_plan_auto_ex(const ar_unit_cost *costs, int nunits, const ar_device *devs, int ndev,
                    int micro_batches, int schedule, const ar_plan_opts *opts, ar_plan *out);

/* The best plan with exactly one stage on each device, in order: what a
 * market lease is, where every leased provider holds one stage. Same
 * objective as ar_plan_auto (the slowest stage, then the total), in
 * O(ndev * nunits^2). AR_ELIMIT when no such split fits in memory,
 * AR_EINVAL when there are more devices than units. */
int ar_plan_each(const ar_unit_cost *costs, int nunits, const ar_device *devs, int ndev, int micro_batches,
                 int schedule, ar_plan *out);

/* FLOPs one training step of units [first, last) takes (their FLOPs per
 * micro-batch summed in unit order, times the micro-batches, rounded): what
 * a market pays a stage for, computed alike by the market and the driver.
 * AR_ELIMIT above AR_PLAN_MAX_STEP_FLOPS. */
#define AR_PLAN_MAX_STEP_FLOPS ((int64_t)1 << 60)
int ar_plan_stage_flops(const ar_unit_cost *costs, int nunits, int first, int last, int micro_batches,
                        int64_t *out);

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
/* The same for a compression setting and the driver's link; also fills the
 * edges (figures, codecs, transfer times, bytes per step) and each stage's
 * extra warm-up and slots. */
int ar_plan_estimate_ex(ar_plan *p, const ar_unit_cost *costs, int nunits, const ar_device *devs, int ndev,
                        int micro_batches, int schedule, const ar_plan_opts *opts);

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
 * blocks 0-1", "head"), parameter MB, memory MB, ms per micro-batch, the
 * micro-batches it keeps in flight; for a group, each member's heads and
 * hidden units and memory, and the group's predicted transfer per step; then
 * the bubble; then the links: each one's measured MB/s each way and round
 * trip, its compression and the MB per step it carries each way. */
void ar_plan_print(FILE *out, const ar_plan *p, const ar_device *devs, const ar_unit_cost *costs,
                   const ar_model_spec *spec);
/* The links part of the table alone (nothing when no link was measured). */
void ar_plan_print_links(FILE *out, const ar_plan *p, const ar_device *devs);
/* "driver -> A" for link 0, "A -> B" for link s into stage s. */
void ar_plan_link_name(const ar_plan *p, const ar_device *devs, int s, char *buf, size_t n);

#endif
