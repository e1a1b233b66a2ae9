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
              cJSON_AddStringToObject(jm, "device", m->device ? m->device : "");
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

char *ar_dashboard_plan_json(const ar_market_plan *p)
{
    cJSON *root = cJSON_CreateObject(), *stages = NULL;
    bool ok = root && cJSON_AddStringToObject(root, "model", p->model ? p->model : "") &&
              cJSON_AddNumberToObject(root, "micro_batches", p->micro_batches) &&
              cJSON_AddStringToObject(root, "schedule", p->schedule ? p->schedule : "") &&
              cJSON_AddNumberToObject(root, "predicted_bubble", p->predicted_bubble) &&
              (stages = cJSON_AddArrayToObject(root, "stages"));
    for (size_t i = 0; ok && i < p->n_stages; i++)
        ok = add_stage(stages, i, &p->stages[i]);
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return text;
}
