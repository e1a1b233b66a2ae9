/* Contiguous, near-equal unit ranges (the same split as --workers local:N). */
#ifndef AR_PLAN_EVEN_H
#define AR_PLAN_EVEN_H

/* Device i gets units [first[i], last[i]). */
int ar_plan_even(int units, int ndev, int *first, int *last);

#endif
