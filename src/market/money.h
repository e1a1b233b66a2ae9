/* Money: micro-credits as integers, their text, and the price of work.
 *
 * Amounts are micro-credits (int64, 1 credit = AR_MICRO_PER_CREDIT), prices
 * micro-credits per TFLOP (1e12 FLOPs). Pure functions, no floating point:
 * the market's estimates, its payments and the driver's budget all use these
 * same rules, so an estimate is exactly what the steps it covers are paid. */
#ifndef AR_MARKET_MONEY_H
#define AR_MARKET_MONEY_H

#include <stddef.h>
#include <stdint.h>

#define AR_MICRO_PER_CREDIT 1000000LL
/* whole credits -> micro-credits */
#define AR_CREDITS(c) ((int64_t)(c) * AR_MICRO_PER_CREDIT)

/* Cost of `flops` at `price_per_tflop` micro-credits per TFLOP, rounded to the
 * nearest micro-credit. AR_EINVAL for a negative argument, AR_ELIMIT when the
 * cost does not fit in int64. */
int ar_flops_cost(int64_t flops, int64_t price_per_tflop, int64_t *micro_out);

/* micro-credits as credits with 6 decimals, "[-]C.CCCCCC"; returns buf. */
const char *ar_credits_text(int64_t micro, char *buf, size_t size);

/* Credits written "C", "C.F" or ".F" (at most 6 decimals, no sign) as
 * micro-credits: AR_EINVAL for any other text, AR_ELIMIT above max_micro.
 * ar_credits_text's output for a non-negative amount reads back exactly. */
int ar_credits_parse(const char *text, int64_t max_micro, int64_t *micro_out);

#endif
