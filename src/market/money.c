/* Money (money.h): integer arithmetic only, so that every amount the market
 * writes, shows or reads back is exact. */
#include "market/money.h"

#include "arceus.h"

#include <inttypes.h>
#include <stdio.h>

int ar_flops_cost(int64_t flops, int64_t price_per_tflop, int64_t *micro_out)
{
    if (flops < 0 || price_per_tflop < 0)
        return ar_fail(AR_EINVAL, "negative flops (%" PRId64 ") or price (%" PRId64 ")", flops,
                       price_per_tflop);
    unsigned __int128 p = (unsigned __int128)(uint64_t)flops * (uint64_t)price_per_tflop;
    p = (p + 500000000000ull) / 1000000000000ull; /* per TFLOP, rounded to nearest */
    if (p > (unsigned __int128)INT64_MAX)
        return ar_fail(AR_ELIMIT, "cost of %" PRId64 " FLOPs at %" PRId64 " overflows", flops,
                       price_per_tflop);
    *micro_out = (int64_t)p;
    return AR_OK;
}

const char *ar_credits_text(int64_t micro, char *buf, size_t size)
{
    const uint64_t unit = (uint64_t)AR_MICRO_PER_CREDIT;
    /* the magnitude in unsigned arithmetic: -INT64_MIN does not fit in int64 */
    uint64_t a = micro < 0 ? (uint64_t)0 - (uint64_t)micro : (uint64_t)micro;
    snprintf(buf, size, "%s%" PRIu64 ".%06" PRIu64, micro < 0 ? "-" : "", a / unit, a % unit);
    return buf;
}

int ar_credits_parse(const char *text, int64_t max_micro, int64_t *micro_out)
{
    const uint64_t unit = (uint64_t)AR_MICRO_PER_CREDIT;
    if (!text || max_micro < 0)
        return ar_fail(AR_EINVAL, "no credits to read");
    const char *p = text;
    uint64_t whole = 0, frac = 0;
    int digits = 0, fdigits = 0;
    for (; *p >= '0' && *p <= '9'; p++, digits++) {
        whole = whole * 10 + (uint64_t)(*p - '0');
        /* stop before whole * unit could wrap; the exact bound is checked last */
        if (whole > (uint64_t)max_micro / unit + 1)
            return ar_fail(AR_ELIMIT, "\"%.40s\" credits: more than %" PRId64 " micro-credits", text, max_micro);
    }
    if (*p == '.')
        for (p++; *p >= '0' && *p <= '9'; p++, fdigits++) {
            if (fdigits == 6)
                return ar_fail(AR_EINVAL, "\"%.40s\" credits: at most 6 decimals (1 micro-credit)", text);
            frac = frac * 10 + (uint64_t)(*p - '0');
        }
    if (*p || (digits == 0 && fdigits == 0))
        return ar_fail(AR_EINVAL, "\"%.40s\" is not an amount of credits (C or C.FFFFFF)", text);
    for (int i = fdigits; i < 6; i++)
        frac *= 10;
    uint64_t v = whole * unit + frac;
    if (v > (uint64_t)max_micro)
        return ar_fail(AR_ELIMIT, "\"%.40s\" credits: more than %" PRId64 " micro-credits", text, max_micro);
    *micro_out = (int64_t)v;
    return AR_OK;
}
