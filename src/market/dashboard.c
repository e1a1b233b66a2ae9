/* The dashboard's JSON of a job's plan (dashboard.h). */
#include "market/dashboard.h"

#include <cjson/cJSON.h>
#include <stdbool.h>

/* obj[key] = [begin, end] when the range is not empty */
static bool add_range(cJSON *obj, const char *key, int begin, int end)
{
    if (end <= begin)
        return true;
    double v[2] = {begin, end};
    cJSON *a = cJSON_CreateDoubleArray(v, 2);
    if (a && cJSON_AddItemToObject(obj, key, a))
        return true;
    cJSON_Delete(a);
    return false;
}

/* A new object appended to arr; NULL when memory runs out. */
static cJSON *push_object(cJSON *arr)
{
    cJSON *o = cJSON_CreateObject();
    if (o && cJSON_AddItemToArray(arr, o))
        return o;
    cJSON_Delete(o);
    return NULL;
}

static bool add_member(cJSON *members, const ar_market_plan_member *m)
{
    cJSON *jm = push_object(members);
    bool ok = jm && cJSON_AddNumberToObject(jm, "provider_id", (double)m->provider_id) &&
              cJSON_AddStringToObject(jm, "device", m->device ? m->device : "") &&
              cJSON_AddStringToObject(jm, "edge", m->relayed ? "relayed" : "direct");
    /* a share only for a member of a tensor-parallel group */
    if (ok && m->share && m->share[0])
        ok = cJSON_AddStringToObject(jm, "share", m->share) && add_range(jm, "heads", m->head_begin, m->head_end) &&
             add_range(jm, "hidden", m->hidden_begin, m->hidden_end);
    return ok;
}

static bool add_stage(cJSON *stages, size_t index, const ar_market_plan_stage *st)
{
    cJSON *js = push_object(stages), *members = NULL;
    bool ok = js && cJSON_AddNumberToObject(js, "stage", (double)index) &&
              cJSON_AddNumberToObject(js, "first_unit", st->first_unit) &&
              cJSON_AddNumberToObject(js, "last_unit", st->last_unit) &&
              cJSON_AddStringToObject(js, "layers", st->layers ? st->layers : "") &&
              cJSON_AddNumberToObject(js, "predicted_ms", st->predicted_ms) &&
              (members = cJSON_AddArrayToObject(js, "members"));
    for (int k = 0; ok && k < st->n_members; k++)
        ok = add_member(members, &st->members[k]);
    return ok;
}

static bool add_pair(cJSON *obj, const char *key, double a, double b)
{
    double v[2] = {a, b};
    cJSON *arr = cJSON_CreateDoubleArray(v, 2);
    if (arr && cJSON_AddItemToObject(obj, key, arr))
        return true;
    cJSON_Delete(arr);
    return false;
}

static bool add_link(cJSON *links, const ar_market_plan_link *l)
{
    cJSON *jl = push_object(links);
    return jl && cJSON_AddNumberToObject(jl, "stage", l->stage) &&
           cJSON_AddStringToObject(jl, "from", l->from ? l->from : "") &&
           cJSON_AddStringToObject(jl, "to", l->to ? l->to : "") &&
           cJSON_AddNumberToObject(jl, "down_mb_s", l->down_mb_s) && cJSON_AddNumberToObject(jl, "up_mb_s", l->up_mb_s) &&
           cJSON_AddNumberToObject(jl, "rtt_ms", l->rtt_ms) &&
           cJSON_AddStringToObject(jl, "compress", l->compress ? l->compress : "") &&
           add_pair(jl, "predicted_mb", l->predicted_down_mb, l->predicted_up_mb) &&
           add_pair(jl, "moved_mb", l->down_mb, l->up_mb) && add_pair(jl, "moved_raw_mb", l->down_raw_mb, l->up_raw_mb);
}

char *ar_dashboard_plan_json(const ar_market_plan *p)
{
    cJSON *root = cJSON_CreateObject(), *stages = NULL, *links = NULL;
    bool ok = root && cJSON_AddStringToObject(root, "model", p->model ? p->model : "") &&
              cJSON_AddNumberToObject(root, "micro_batches", p->micro_batches) &&
              cJSON_AddStringToObject(root, "schedule", p->schedule ? p->schedule : "") &&
              cJSON_AddNumberToObject(root, "predicted_bubble", p->predicted_bubble) &&
              (stages = cJSON_AddArrayToObject(root, "stages"));
    for (size_t i = 0; ok && i < p->n_stages; i++)
        ok = add_stage(stages, i, &p->stages[i]);
    ok = ok && (links = cJSON_AddArrayToObject(root, "links"));
    for (size_t i = 0; ok && i < p->n_links; i++)
        ok = add_link(links, &p->links[i]);
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return text;
}
