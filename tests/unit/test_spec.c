/* Model specs: strict JSON validation, round trips, unit and parameter counts. */
#include "core/core.h"
#include "nn/spec.h"
#include "train/stage.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ORIGIN "model-under-test.json"

static int parse(const char *json, ar_model_spec *s)
{
    return ar_spec_parse(json, strlen(json), ORIGIN, s);
}

/* The parse fails with `code` and the message names the origin and `needle`. */
static void expect_fail(const char *json, int code, const char *needle)
{
    ar_model_spec s;
    int rc = parse(json, &s);
    cr_assert_eq(rc, code, "%s: got %d (%s), want %d", json, rc, ar_last_error(), code);
    const char *msg = ar_last_error();
    cr_assert_not_null(strstr(msg, ORIGIN), "message does not name the origin: %s", msg);
    if (needle)
        cr_assert_not_null(strstr(msg, needle), "message \"%s\" does not mention \"%s\"", msg,
                           needle);
}

static const char *gpt_ok =
    "{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":16,\"n_layer\":2,\"n_head\":4,"
    "\"n_embd\":32}";

/* ---- the shipped configs ------------------------------------------------ */

Test(spec, configs_parse)
{
    ar_model_spec s;
    cr_assert_eq(ar_spec_load("configs/gpt-5m.json", &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.type, AR_MODEL_GPT);
    cr_assert_eq(s.vocab_size, 0);
    cr_assert_eq(s.block_size, 128);
    cr_assert_eq(s.n_layer, 6);
    cr_assert_eq(s.n_head, 4);
    cr_assert_eq(s.n_embd, 256);
    cr_assert_eq(s.dropout, 0.0f);
    cr_assert_eq(s.has_vocab, 0);
    /* vocab_size 0 is only complete once the data gives it */
    cr_assert_eq(ar_spec_validate(&s, "gpt-5m"), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "vocab_size"));
    s.vocab_size = 65;
    cr_assert_eq(ar_spec_validate(&s, "gpt-5m"), AR_OK);

    cr_assert_eq(ar_spec_load("configs/gpt-tiny.json", &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.type, AR_MODEL_GPT);
    cr_assert_eq(s.n_layer, 2);
    cr_assert_eq(s.n_head, 8);
    cr_assert_eq(s.n_embd, 32);
    cr_assert_eq(s.block_size, 16);

    cr_assert_eq(ar_spec_load("configs/mlp-fashion.json", &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.type, AR_MODEL_MLP);
    cr_assert_eq(s.inputs, 784);
    cr_assert_eq(s.n_hidden, 2);
    cr_assert_eq(s.hidden[0], 512);
    cr_assert_eq(s.hidden[1], 512);
    cr_assert_eq(s.classes, 10);
    cr_assert_eq(s.activation, AR_ACT_RELU);
    cr_assert_eq(ar_spec_validate(&s, "mlp"), AR_OK);
}

Test(spec, load_missing_file)
{
    ar_model_spec s;
    cr_assert_neq(ar_spec_load("configs/does-not-exist.json", &s), AR_OK);
    cr_assert_not_null(strstr(ar_last_error(), "does-not-exist.json"), "%s", ar_last_error());
}

Test(spec, minimal_valid)
{
    ar_model_spec s;
    cr_assert_eq(parse(gpt_ok, &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.vocab_size, 65);
    cr_assert_eq(parse("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2}", &s), AR_OK, "%s",
                 ar_last_error());
    cr_assert_eq(s.n_hidden, 0);
    cr_assert_eq(ar_spec_units(&s), 1);
    cr_assert_eq(parse("{\"type\":\"mlp\",\"inputs\":4,\"hidden\":[3],\"classes\":2,"
                       "\"activation\":\"gelu\",\"dropout\":0.25}",
                       &s),
                 AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.activation, AR_ACT_GELU);
    cr_assert_eq(s.dropout, 0.25f);
}

/* ---- malformed documents ------------------------------------------------ */

Test(spec, malformed_json)
{
    expect_fail("{\"type\": \"gpt\", ", AR_EFORMAT, "malformed JSON");
    expect_fail("", AR_EFORMAT, "malformed JSON");
    expect_fail("{\"type\": \"mlp\", \"inputs\": [1, 2}", AR_EFORMAT, "malformed JSON");
}

/* Text after the document is an error, not silently ignored. */
Test(spec, trailing_garbage)
{
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2} {\"type\":\"gpt\"}", AR_EFORMAT,
                "unexpected data after the JSON object");
}

Test(spec, root_not_object)
{
    expect_fail("[1, 2, 3]", AR_EFORMAT, "object");
    expect_fail("\"gpt\"", AR_EFORMAT, "object");
    expect_fail("42", AR_EFORMAT, "object");
}

Test(spec, missing_or_bad_type)
{
    expect_fail("{\"n_layer\": 2}", AR_EFORMAT, "\"type\"");
    expect_fail("{}", AR_EFORMAT, "\"type\"");
    expect_fail("{\"type\": 3}", AR_EFORMAT, "\"type\"");
    expect_fail("{\"type\": \"rnn\"}", AR_EINVAL, "rnn");
    expect_fail("{\"type\": \"GPT\"}", AR_EINVAL, "GPT");
}

Test(spec, unknown_keys)
{
    expect_fail("{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":16,\"n_layer\":2,"
                "\"n_heads\":4,\"n_head\":4,\"n_embd\":32}",
                AR_EINVAL, "\"n_heads\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"layers\":[3]}", AR_EINVAL,
                "\"layers\"");
    /* keys of the other model type are unknown too */
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"n_layer\":2}", AR_EINVAL,
                "\"n_layer\"");
    expect_fail("{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":16,\"n_layer\":2,"
                "\"n_head\":4,\"n_embd\":32,\"hidden\":[3]}",
                AR_EINVAL, "\"hidden\"");
}

Test(spec, wrong_types)
{
    expect_fail("{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":16,\"n_layer\":\"2\","
                "\"n_head\":4,\"n_embd\":32}",
                AR_EFORMAT, "\"n_layer\"");
    expect_fail("{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":true,\"n_layer\":2,"
                "\"n_head\":4,\"n_embd\":32}",
                AR_EFORMAT, "\"block_size\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":null,\"classes\":2}", AR_EFORMAT, "\"inputs\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"activation\":\"tanh\"}",
                AR_EINVAL, "\"activation\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"dropout\":\"0.1\"}", AR_EINVAL,
                "\"dropout\"");
}

Test(spec, non_integer)
{
    expect_fail("{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":16,\"n_layer\":2.5,"
                "\"n_head\":4,\"n_embd\":32}",
                AR_EINVAL, "\"n_layer\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4.1,\"classes\":2}", AR_EINVAL, "\"inputs\"");
}

Test(spec, out_of_range)
{
    const char *fmt = "{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":16,\"n_layer\":2,"
                      "\"n_head\":%s,\"n_embd\":32}";
    const char *bad[] = {"0", "-4", "1e9", "2147483648", "99999999999999999999"};
    char buf[256];
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(buf, sizeof buf, fmt, bad[i]);
        expect_fail(buf, AR_EINVAL, "\"n_head\"");
    }
    expect_fail("{\"type\":\"gpt\",\"vocab_size\":257,\"block_size\":16,\"n_layer\":2,"
                "\"n_head\":4,\"n_embd\":32}",
                AR_EINVAL, "\"vocab_size\"");
    expect_fail("{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":16,\"n_layer\":255,"
                "\"n_head\":4,\"n_embd\":32}",
                AR_EINVAL, "\"n_layer\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":1}", AR_EINVAL, "\"classes\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":0,\"classes\":2}", AR_EINVAL, "\"inputs\"");
}

Test(spec, missing_required)
{
    expect_fail("{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":16,\"n_head\":4,"
                "\"n_embd\":32}",
                AR_EINVAL, "\"n_layer\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4}", AR_EINVAL, "\"classes\"");
}

Test(spec, embd_not_multiple_of_heads)
{
    expect_fail("{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":16,\"n_layer\":2,"
                "\"n_head\":3,\"n_embd\":32}",
                AR_EINVAL, "\"n_embd\"");
    cr_assert_not_null(strstr(ar_last_error(), "\"n_head\""));
}

Test(spec, hidden)
{
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"hidden\":16}", AR_EFORMAT,
                "\"hidden\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"hidden\":{\"a\":1}}",
                AR_EFORMAT, "\"hidden\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"hidden\":[8,0]}", AR_EINVAL,
                "\"hidden\"[1]");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"hidden\":[8,\"8\"]}", AR_EINVAL,
                "\"hidden\"[1]");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"hidden\":[2.5]}", AR_EINVAL,
                "\"hidden\"[0]");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"hidden\":[-3]}", AR_EINVAL,
                "\"hidden\"[0]");
    /* at most AR_MAX_HIDDEN layers */
    char buf[512] = "{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"hidden\":[";
    for (int i = 0; i < AR_MAX_HIDDEN; i++)
        strcat(buf, i ? ",3" : "3");
    char ok[600];
    snprintf(ok, sizeof ok, "%s]}", buf);
    ar_model_spec s;
    cr_assert_eq(parse(ok, &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.n_hidden, AR_MAX_HIDDEN);
    cr_assert_eq(ar_spec_units(&s), AR_MAX_HIDDEN + 1);
    char bad[600];
    snprintf(bad, sizeof bad, "%s,3]}", buf);
    expect_fail(bad, AR_EINVAL, "\"hidden\"");
}

Test(spec, dropout_range)
{
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"dropout\":1.0}", AR_EINVAL,
                "\"dropout\"");
    expect_fail("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"dropout\":-0.1}", AR_EINVAL,
                "\"dropout\"");
    expect_fail("{\"type\":\"gpt\",\"vocab_size\":65,\"block_size\":16,\"n_layer\":2,"
                "\"n_head\":4,\"n_embd\":32,\"dropout\":1}",
                AR_EINVAL, "\"dropout\"");
    ar_model_spec s;
    cr_assert_eq(parse("{\"type\":\"mlp\",\"inputs\":4,\"classes\":2,\"dropout\":0.999}", &s),
                 AR_OK);
}

static char *vocab_json(int n, int vocab_size, int dup)
{
    size_t cap = 64 + (size_t)n * 8 + 200;
    char *buf = malloc(cap);
    cr_assert_not_null(buf);
    int at = snprintf(buf, cap,
                      "{\"type\":\"gpt\",\"block_size\":8,\"n_layer\":1,\"n_head\":2,"
                      "\"n_embd\":8,");
    if (vocab_size >= 0)
        at += snprintf(buf + at, cap - at, "\"vocab_size\":%d,", vocab_size);
    at += snprintf(buf + at, cap - at, "\"vocab\":[");
    for (int i = 0; i < n; i++) {
        int v = dup && i == n - 1 ? 0 : i % 256;
        at += snprintf(buf + at, cap - at, "%s%d", i ? "," : "", v);
    }
    snprintf(buf + at, cap - at, "]}");
    return buf;
}

Test(spec, vocab)
{
    ar_model_spec s;
    char *j = vocab_json(65, 65, 0);
    cr_assert_eq(parse(j, &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.has_vocab, 1);
    cr_assert_eq(s.vocab_size, 65);
    cr_assert_eq(s.vocab[64], 64);
    free(j);
    /* vocab_size taken from the vocabulary when absent or 0 */
    j = vocab_json(40, -1, 0);
    cr_assert_eq(parse(j, &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.vocab_size, 40);
    free(j);
    j = vocab_json(40, 0, 0);
    cr_assert_eq(parse(j, &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.vocab_size, 40);
    free(j);
    /* every byte value once is the largest vocabulary */
    j = vocab_json(256, 256, 0);
    cr_assert_eq(parse(j, &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.vocab_size, 256);
    free(j);

    j = vocab_json(10, 10, 1);
    expect_fail(j, AR_EINVAL, "\"vocab\" repeats byte 0");
    free(j);
    j = vocab_json(257, -1, 0);
    expect_fail(j, AR_EINVAL, "\"vocab\"");
    cr_assert_not_null(strstr(ar_last_error(), "257"), "%s", ar_last_error());
    free(j);
    j = vocab_json(300, -1, 0);
    expect_fail(j, AR_EINVAL, "\"vocab\"");
    free(j);
    j = vocab_json(65, 64, 0);
    expect_fail(j, AR_EINVAL, "\"vocab_size\"");
    cr_assert_not_null(strstr(ar_last_error(), "\"vocab\""), "%s", ar_last_error());
    free(j);
    j = vocab_json(0, -1, 0);
    expect_fail(j, AR_EINVAL, "\"vocab\"");
    free(j);

    expect_fail("{\"type\":\"gpt\",\"block_size\":8,\"n_layer\":1,\"n_head\":2,\"n_embd\":8,"
                "\"vocab\":\"abc\"}",
                AR_EFORMAT, "\"vocab\"");
    expect_fail("{\"type\":\"gpt\",\"block_size\":8,\"n_layer\":1,\"n_head\":2,\"n_embd\":8,"
                "\"vocab\":[1,256]}",
                AR_EINVAL, "\"vocab\"[1]");
    expect_fail("{\"type\":\"gpt\",\"block_size\":8,\"n_layer\":1,\"n_head\":2,\"n_embd\":8,"
                "\"vocab\":[1,-1]}",
                AR_EINVAL, "\"vocab\"[1]");
    expect_fail("{\"type\":\"gpt\",\"block_size\":8,\"n_layer\":1,\"n_head\":2,\"n_embd\":8,"
                "\"vocab\":[1,2.5]}",
                AR_EINVAL, "\"vocab\"[1]");
}

/* ---- round trip ----------------------------------------------------------- */

static void round_trip(const ar_model_spec *in)
{
    char *text = ar_spec_to_json(in);
    cr_assert_not_null(text, "%s", ar_last_error());
    ar_model_spec out;
    int rc = ar_spec_parse(text, strlen(text), "round-trip", &out);
    cr_assert_eq(rc, AR_OK, "%s\n%s", ar_last_error(), text);
    cr_assert_eq(out.type, in->type);
    cr_assert_eq(out.dropout, in->dropout);
    cr_assert_eq(out.vocab_size, in->vocab_size);
    cr_assert_eq(out.block_size, in->block_size);
    cr_assert_eq(out.n_layer, in->n_layer);
    cr_assert_eq(out.n_head, in->n_head);
    cr_assert_eq(out.n_embd, in->n_embd);
    cr_assert_eq(out.inputs, in->inputs);
    cr_assert_eq(out.n_hidden, in->n_hidden);
    for (int i = 0; i < in->n_hidden; i++)
        cr_assert_eq(out.hidden[i], in->hidden[i]);
    cr_assert_eq(out.classes, in->classes);
    cr_assert_eq(out.activation, in->activation);
    cr_assert_eq(out.has_vocab, in->has_vocab);
    if (in->has_vocab)
        cr_assert_arr_eq(out.vocab, in->vocab, (size_t)in->vocab_size);
    /* the whole struct, when the input was zero-filled the same way */
    cr_assert_arr_eq(&out, in, sizeof out, "round trip differs:\n%s", text);
    free(text);
}

Test(spec, round_trip)
{
    ar_model_spec s;
    memset(&s, 0, sizeof s);
    s.type = AR_MODEL_GPT;
    s.vocab_size = 65;
    s.block_size = 128;
    s.n_layer = 6;
    s.n_head = 4;
    s.n_embd = 256;
    s.dropout = 0.1f;
    round_trip(&s);
    /* with a vocabulary: a scrambled set of byte values */
    s.has_vocab = 1;
    for (int i = 0; i < 65; i++)
        s.vocab[i] = (uint8_t)((i * 37 + 11) % 256);
    round_trip(&s);
    s.vocab_size = 256;
    for (int i = 0; i < 256; i++)
        s.vocab[i] = (uint8_t)(255 - i);
    round_trip(&s);

    memset(&s, 0, sizeof s);
    s.type = AR_MODEL_MLP;
    s.inputs = 784;
    s.n_hidden = 3;
    s.hidden[0] = 512;
    s.hidden[1] = 256;
    s.hidden[2] = 7;
    s.classes = 10;
    s.activation = AR_ACT_GELU;
    s.dropout = 0.3f;
    round_trip(&s);
    s.n_hidden = 0;
    memset(s.hidden, 0, sizeof s.hidden);
    s.activation = AR_ACT_RELU;
    s.dropout = 0;
    round_trip(&s);
}

Test(spec, round_trip_of_configs)
{
    const char *paths[] = {"configs/gpt-5m.json", "configs/gpt-tiny.json",
                           "configs/mlp-fashion.json"};
    for (int i = 0; i < 3; i++) {
        ar_model_spec s;
        cr_assert_eq(ar_spec_load(paths[i], &s), AR_OK, "%s", ar_last_error());
        round_trip(&s);
    }
}

/* ---- units and parameter counts ----------------------------------------- */

Test(spec, units)
{
    ar_model_spec s;
    cr_assert_eq(ar_spec_load("configs/gpt-5m.json", &s), AR_OK);
    cr_assert_eq(ar_spec_units(&s), 6 + 2);
    cr_assert_eq(ar_spec_load("configs/gpt-tiny.json", &s), AR_OK);
    cr_assert_eq(ar_spec_units(&s), 2 + 2);
    cr_assert_eq(ar_spec_load("configs/mlp-fashion.json", &s), AR_OK);
    cr_assert_eq(ar_spec_units(&s), 3);
}

/* Parameters actually allocated by a stage holding every unit. */
static long stage_param_count(const ar_model_spec *spec)
{
    ar_stage st;
    ar_optim_config o = {.kind = AR_OPT_ADAMW, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
                         .weight_decay = 0.1f};
    int rc = ar_stage_create(&st, spec, 0, ar_spec_units(spec), 1, 1, 1234, &o);
    cr_assert_eq(rc, AR_OK, "%s", ar_last_error());
    long n = 0;
    for (int i = 0; i < st.nparams; i++)
        n += st.params[i]->numel;
    cr_assert_eq(n, st.param_floats);
    ar_stage_destroy(&st);
    return n;
}

Test(spec, param_count_gpt_5m)
{
    ar_model_spec s;
    cr_assert_eq(ar_spec_load("configs/gpt-5m.json", &s), AR_OK);
    s.vocab_size = 65;
    long n = ar_spec_param_count(&s);
    /* by hand: wte 65*256 + wpe 128*256 + 6 blocks of (12 C^2 + 13 C) + ln_f 2C
     * (the head is tied to wte) */
    long C = 256;
    long want = 65 * C + 128 * C + 6 * (12 * C * C + 13 * C) + 2 * C;
    cr_assert_eq(want, 4788480);
    cr_assert_eq(n, want, "ar_spec_param_count = %ld", n);
    cr_assert_eq(stage_param_count(&s), n);
}

Test(spec, param_count_gpt_tiny)
{
    ar_model_spec s;
    cr_assert_eq(ar_spec_load("configs/gpt-tiny.json", &s), AR_OK);
    s.vocab_size = 37;
    cr_assert_eq(stage_param_count(&s), ar_spec_param_count(&s));
}

Test(spec, param_count_mlp)
{
    ar_model_spec s;
    cr_assert_eq(ar_spec_load("configs/mlp-fashion.json", &s), AR_OK);
    cr_assert_eq(ar_spec_param_count(&s), 669706);
    cr_assert_eq(stage_param_count(&s), 669706);
    cr_assert_eq(parse("{\"type\":\"mlp\",\"inputs\":20,\"hidden\":[16,12],\"classes\":5}", &s),
                 AR_OK);
    cr_assert_eq(ar_spec_param_count(&s), 20 * 16 + 16 + 16 * 12 + 12 + 12 * 5 + 5);
    cr_assert_eq(stage_param_count(&s), ar_spec_param_count(&s));
}
