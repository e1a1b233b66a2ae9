/* The --json output of the market's clients (json.h). */
#include "cli/json.h"
#include "arceus.h"
#include "core/core.h"
#include "market/money.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The length of a valid UTF-8 sequence at s (overlong forms, surrogates and
 * code points past U+10FFFF are not), or 0. */
static size_t utf8_len(const unsigned char *s)
{
    size_t n = s[0] < 0x80 ? 1 : (s[0] & 0xE0) == 0xC0 ? 2 : (s[0] & 0xF0) == 0xE0 ? 3 : (s[0] & 0xF8) == 0xF0 ? 4 : 0;
    if (n <= 1)
        return n;
    uint32_t c = (uint32_t)(s[0] & (0x7F >> n));
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        c = c << 6 | (uint32_t)(s[i] & 0x3F);
    }
    static const uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};
    return c < least[n] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF) ? 0 : n;
}

/* text with every byte that is not part of valid UTF-8 replaced by U+FFFD
 * (3 bytes): malloc'd, NULL when memory ran out */
static char *utf8_clean(const char *text)
{
    const unsigned char *s = (const unsigned char *)(text ? text : "");
    size_t len = strlen((const char *)s);
    char *out = malloc(3 * len + 1), *o = out;
    if (!out)
        return NULL;
    while (*s) {
        size_t n = utf8_len(s);
        if (n == 0) {
            memcpy(o, "\xEF\xBF\xBD", 3);
            o += 3;
            s++;
        } else {
            memcpy(o, s, n);
            o += n;
            s += n;
        }
    }
    *o = '\0';
    return out;
}

static cJSON *checked(ar_cli_json *j, cJSON *x)
{
    j->oom = j->oom || !x;
    return x;
}

void ar_cli_json_begin(ar_cli_json *j)
{
    j->root = cJSON_CreateObject();
    j->oom = !j->root;
}

cJSON *ar_cli_json_num(ar_cli_json *j, cJSON *obj, const char *key, double v)
{
    return checked(j, obj ? cJSON_AddNumberToObject(obj, key, isfinite(v) ? v : 0) : NULL);
}

cJSON *ar_cli_json_str(ar_cli_json *j, cJSON *obj, const char *key, const char *v)
{
    char *clean = obj ? utf8_clean(v) : NULL;
    cJSON *x = clean ? cJSON_AddStringToObject(obj, key, clean) : NULL;
    free(clean);
    return checked(j, x);
}

cJSON *ar_cli_json_bool(ar_cli_json *j, cJSON *obj, const char *key, bool v)
{
    return checked(j, obj ? cJSON_AddBoolToObject(obj, key, v) : NULL);
}

cJSON *ar_cli_json_null(ar_cli_json *j, cJSON *obj, const char *key)
{
    return checked(j, obj ? cJSON_AddNullToObject(obj, key) : NULL);
}

cJSON *ar_cli_json_credits(ar_cli_json *j, cJSON *obj, const char *key, int64_t micro)
{
    char text[48];
    return ar_cli_json_str(j, obj, key, ar_credits_text(micro, text, sizeof text));
}

cJSON *ar_cli_json_array(ar_cli_json *j, cJSON *obj, const char *key)
{
    return checked(j, obj ? cJSON_AddArrayToObject(obj, key) : NULL);
}

cJSON *ar_cli_json_object(ar_cli_json *j, cJSON *obj, const char *key)
{
    return checked(j, obj ? cJSON_AddObjectToObject(obj, key) : NULL);
}

cJSON *ar_cli_json_push(ar_cli_json *j, cJSON *arr)
{
    cJSON *o = arr ? cJSON_CreateObject() : NULL;
    if (o && !cJSON_AddItemToArray(arr, o)) {
        cJSON_Delete(o);
        o = NULL;
    }
    return checked(j, o);
}

int ar_cli_json_end(ar_cli_json *j)
{
    char *text = j->oom ? NULL : cJSON_Print(j->root);
    cJSON_Delete(j->root);
    j->root = NULL;
    if (!text)
        return ar_fail(AR_ENOMEM, "out of memory writing the JSON output");
    fputs(text, stdout);
    fputc('\n', stdout);
    cJSON_free(text);
    return AR_OK;
}
