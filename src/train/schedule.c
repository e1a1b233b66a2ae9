#include "train/schedule.h"

#include "arceus.h"

#include <string.h>

int ar_schedule_build(int kind, int S, int s, int M, ar_action *actions)
{
    return ar_schedule_build_ex(kind, S, s, M, 0, actions);
}

int ar_schedule_build_ex(int kind, int S, int s, int M, int extra_warmup, ar_action *actions)
{
    int n = 0;
    if (kind == AR_SCHED_GPIPE) {
        /* all forwards, then all backwards */
        for (int mb = 0; mb < M; mb++)
            actions[n++] = (ar_action){'F', mb};
        for (int mb = 0; mb < M; mb++)
            actions[n++] = (ar_action){'B', mb};
        return M;
    }
    /* 1F1B: warm-up forwards, then alternate one forward and one backward,
     * then drain the remaining backwards.
     *
     * The textbook warm-up is S-s-1 forwards. With it, two neighbours run in
     * lock step: stage s sends the activation of micro-batch k+2 only after
     * the gradient of k came back and it ran B(k) and F(k+2), so every
     * micro-batch both stages wait for a transfer in each direction (the
     * network's latency plus the receiving event loop's wake-up, which on a
     * machine whose cores are all computing waits for a core), and any
     * hiccup of one stage stalls the other at once. One more warm-up
     * forward on every stage that has a successor keeps the next activation
     * already there: transfers overlap compute, at the cost of one more
     * micro-batch of activations on those stages. The ideal bubble
     * (S-1)/(M+S-1) is unchanged, and so is the order of the backwards
     * (results stay bitwise the same).
     *
     * Over a slow link the round trip of the activation and its gradient
     * is longer still: extra_warmup more forwards keep the link's round
     * trip covered (the plan sizes it from the measured link). */
    int warmup = s < S - 1 ? S - s + (extra_warmup > 0 ? extra_warmup : 0) : 0;
    if (warmup > M)
        warmup = M;
    int f = 0, b = 0;
    for (; f < warmup; f++)
        actions[n++] = (ar_action){'F', f};
    while (f < M) {
        actions[n++] = (ar_action){'F', f++};
        actions[n++] = (ar_action){'B', b++};
    }
    while (b < M)
        actions[n++] = (ar_action){'B', b++};
    int in_flight = warmup + 1;
    return in_flight > M ? M : in_flight;
}

int ar_schedule_parse(const char *name, int *kind)
{
    if (strcmp(name, "gpipe") == 0)
        *kind = AR_SCHED_GPIPE;
    else if (strcmp(name, "1f1b") == 0)
        *kind = AR_SCHED_1F1B;
    else
        return ar_fail(AR_EINVAL, "unknown schedule \"%s\" (expected gpipe or 1f1b)", name);
    return AR_OK;
}

const char *ar_schedule_name(int kind)
{
    return kind == AR_SCHED_GPIPE ? "gpipe" : "1f1b";
}
