/* The even split of a model's units over devices: the placeholder until the
 * planner (DESIGN.md §4) weighs devices by speed and memory. */
#include "train/plan_even.h"

#include "core/core.h"

int ar_plan_even(int units, int ndev, int *first, int *last)
{
    if (ndev < 1 || units < ndev)
        return ar_fail(AR_EINVAL, "%d devices for a model of %d layers: each needs at least one",
                       ndev, units);
    for (int i = 0; i < ndev; i++) {
        first[i] = (int)((long)units * i / ndev);
        last[i] = (int)((long)units * (i + 1) / ndev);
    }
    return AR_OK;
}
