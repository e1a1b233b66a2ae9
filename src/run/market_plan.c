/* The plan as the market's dashboard shows it (market_plan.h). */
#include "run/market_plan.h"

#include "arceus.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static int64_t provider_of(const ar_market_lease *lease, const char *device)
{
    for (size_t i = 0; lease && i < lease->n; i++)
        if (strcmp(lease->providers[i].p.address, device) == 0)
            return lease->providers[i].p.id;
    return 0;
}

void ar_market_plan_fill(const ar_plan *p, const ar_device *devs, const ar_model_spec *spec,
                         const ar_market_lease *lease, ar_market_plan_stage *out,
                         char (*layers)[AR_LAYERS_TEXT_MAX], char (*shares)[AR_PLAN_SHARE_TEXT])
{
    for (int s = 0; s < p->nstages; s++) {
        ar_market_plan_stage *st = &out[s];
        memset(st, 0, sizeof *st);
        st->first_unit = p->first[s];
        st->last_unit = p->last[s];
        ar_plan_layers_text(spec, p->first[s], p->last[s], layers[s], AR_LAYERS_TEXT_MAX);
        st->layers = layers[s];
        st->predicted_ms = p->stage_time[s] * 1e3;
        int g = p->group_size[s] > 1 ? p->group_size[s] : 1;
        ar_range heads[AR_PLAN_MAX_GROUP], hidden[AR_PLAN_MAX_GROUP];
        bool split = g > 1 && ar_plan_member_shares(p, devs, spec, s, shares, heads, hidden) == AR_OK;
        st->n_members = g;
        for (int k = 0; k < g; k++) {
            const char *name = devs[k == 0 ? p->device[s] : p->group[s][k]].name;
            ar_market_plan_member *m = &st->members[k];
            m->device = name;
            m->provider_id = provider_of(lease, name);
            if (split) {
                m->head_begin = heads[k].begin;
                m->head_end = heads[k].end;
                m->hidden_begin = hidden[k].begin;
                m->hidden_end = hidden[k].end;
                m->share = shares[k];
            }
        }
        shares += g;
    }
}

void ar_market_plan_links(const ar_plan *p, const ar_device *devs, const ar_edge_bytes *moved, long steps,
                          ar_market_plan_link *out, char (*names)[2][AR_PLAN_LINK_NAME])
{
    for (int s = 0; s < p->nstages; s++) {
        const ar_link_figures *f = &p->link[s];
        snprintf(names[s][0], AR_PLAN_LINK_NAME, "%s", s == 0 ? "driver" : devs[p->device[s - 1]].name);
        snprintf(names[s][1], AR_PLAN_LINK_NAME, "%s", devs[p->device[s]].name);
        ar_market_plan_link *l = &out[s];
        *l = (ar_market_plan_link){.stage = s, .from = names[s][0], .to = names[s][1],
                                   .compress = ar_compress_name(p->codec[s]),
                                   .predicted_down_mb = p->edge_bytes[s].down / 1e6,
                                   .predicted_up_mb = p->edge_bytes[s].up / 1e6};
        if (f->measured) {
            l->down_mb_s = f->down_Bps / 1e6;
            l->up_mb_s = f->up_Bps / 1e6;
            l->rtt_ms = f->rtt_s * 1e3;
        }
        if (moved && steps > 0) {
            double n = (double)steps;
            l->down_mb = moved[s].down / n / 1e6;
            l->up_mb = moved[s].up / n / 1e6;
            l->down_raw_mb = moved[s].down_raw / n / 1e6;
            l->up_raw_mb = moved[s].up_raw / n / 1e6;
        }
    }
}
