/* --json output of the market's clients (providers, ledger, jobs, job):
 * a cJSON document built with helpers that remember whether memory ran
 * out, then printed once. Strings are made valid UTF-8 (a byte that is not
 * becomes U+FFFD) so that any JSON parser reads the output; credits are
 * strings of credits with 6 decimals ("12.345678"), exact, as the
 * dashboard's API writes them. */
#ifndef AR_CLI_JSON_H
#define AR_CLI_JSON_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct {
    cJSON *root;
    bool oom;
} ar_cli_json;

/* A document whose root is an object. */
void ar_cli_json_begin(ar_cli_json *j);
cJSON *ar_cli_json_num(ar_cli_json *j, cJSON *obj, const char *key, double v);
cJSON *ar_cli_json_str(ar_cli_json *j, cJSON *obj, const char *key, const char *v);
cJSON *ar_cli_json_bool(ar_cli_json *j, cJSON *obj, const char *key, bool v);
cJSON *ar_cli_json_null(ar_cli_json *j, cJSON *obj, const char *key);
cJSON *ar_cli_json_credits(ar_cli_json *j, cJSON *obj, const char *key, int64_t micro);
cJSON *ar_cli_json_array(ar_cli_json *j, cJSON *obj, const char *key);
cJSON *ar_cli_json_object(ar_cli_json *j, cJSON *obj, const char *key);
/* a new object at the end of an array */
cJSON *ar_cli_json_push(ar_cli_json *j, cJSON *arr);
/* Print the document on stdout (indented, then a newline) and free it:
 * AR_OK, or AR_ENOMEM with the error set (nothing printed). */
int ar_cli_json_end(ar_cli_json *j);

#endif
