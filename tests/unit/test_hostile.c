/* Hostile input to the readers of untrusted bytes: for each entry point a
 * table of malformed inputs (truncated, oversized, negative, wrong type, wrong
 * shape, huge counts), each of which must be refused with the right error code
 * and a message naming the problem, without allocating what the input claims.
 * The process-level entry points (worker and market RPCs) have their tables in
 * tests/e2e/test_hostile.py; fuzz/ fuzzes the same readers. */
#include "core/core.h"
#include "data/data.h"
#include "net/net_internal.h"
#include "nn/safetensors.h"
#include "nn/spec.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "tmpfiles.h"

typedef struct {
    const char *what;  /* the row, for the failure message */
    const char *input; /* text, or bytes with len */
    size_t len;        /* 0: strlen(input) */
    int rc;            /* the expected error code */
    const char *words; /* expected in ar_last_error() */
} row;

#define NROWS(t) (sizeof(t) / sizeof(t[0]))

static void expect_refused(const row *r, int rc)
{
    cr_expect_eq(rc, r->rc, "%s: rc %d (%s), expected %d", r->what, rc, ar_last_error(), r->rc);
    if (rc != AR_OK)
        cr_expect(strstr(ar_last_error(), r->words) != NULL, "%s: message \"%s\" lacks \"%s\"", r->what,
                  ar_last_error(), r->words);
}

/* ---- model specs (a Load's spec_json, a config file) --------------------------- */

static const row spec_rows[] = {
    {"empty", "", 0, AR_EFORMAT, "malformed JSON"},
    {"truncated", "{\"type\": \"mlp\", \"inputs\": 8", 0, AR_EFORMAT, "malformed JSON"},
    {"not an object", "[1, 2]", 0, AR_EFORMAT, "object"},
    {"no type", "{\"inputs\": 8}", 0, AR_EFORMAT, "\"type\""},
    {"type of wrong type", "{\"type\": 3}", 0, AR_EFORMAT, "\"type\" must be a string"},
    {"unknown type", "{\"type\": \"cnn\"}", 0, AR_EINVAL, "unknown model type"},
    {"unknown key", "{\"type\": \"mlp\", \"inputs\": 8, \"classes\": 2, \"bogus\": 1}", 0, AR_EINVAL,
     "bogus"},
    {"string for a number", "{\"type\": \"gpt\", \"n_embd\": \"32\"}", 0, AR_EFORMAT,
     "\"n_embd\" must be a number"},
    {"negative", "{\"type\": \"gpt\", \"n_layer\": -1}", 0, AR_EINVAL, "\"n_layer\" must be an integer"},
    {"fraction", "{\"type\": \"gpt\", \"n_head\": 1.5}", 0, AR_EINVAL, "\"n_head\" must be an integer"},
    {"huge", "{\"type\": \"gpt\", \"n_embd\": 1e308}", 0, AR_EINVAL, "\"n_embd\" must be an integer"},
    {"over the limit", "{\"type\": \"gpt\", \"block_size\": 8193}", 0, AR_EINVAL, "block_size"},
    {"huge count of classes", "{\"type\": \"mlp\", \"classes\": 4294967296}", 0, AR_EINVAL, "classes"},
    {"hidden not an array", "{\"type\": \"mlp\", \"hidden\": 5}", 0, AR_EFORMAT, "hidden"},
    {"too many hidden layers",
     "{\"type\": \"mlp\", \"hidden\": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}", 0, AR_EINVAL, "at most 16"},
    {"hidden of wrong type", "{\"type\": \"mlp\", \"hidden\": [\"x\"]}", 0, AR_EINVAL, "\"hidden\"[0] must be"},
    {"bad activation", "{\"type\": \"mlp\", \"activation\": \"tanh\"}", 0, AR_EINVAL, "activation"},
    {"dropout out of range", "{\"type\": \"mlp\", \"dropout\": 1.5}", 0, AR_EINVAL, "dropout"},
    {"negative dropout", "{\"type\": \"mlp\", \"dropout\": -0.1}", 0, AR_EINVAL, "dropout"},
    {"vocab too long", NULL, 0, AR_EINVAL, "\"vocab\" must have 1..256 entries"},
    {"vocab repeats", "{\"type\": \"gpt\", \"vocab\": [1, 2, 1]}", 0, AR_EINVAL, "repeats byte 1"},
    {"vocab not a byte", "{\"type\": \"gpt\", \"vocab\": [256]}", 0, AR_EINVAL, "byte value"},
    {"vocab not an array", "{\"type\": \"gpt\", \"vocab\": \"abc\"}", 0, AR_EFORMAT, "vocab"},
    {"trailing bytes", "{\"type\": \"mlp\"} x", 0, AR_EFORMAT, "after"},
    {"deep nesting", NULL, 0, AR_EFORMAT, "malformed JSON"},
};

Test(hostile, spec_table)
{
    char vocab[2048] = "{\"type\": \"gpt\", \"vocab\": [";
    for (int i = 0; i < 300; i++)
        snprintf(vocab + strlen(vocab), sizeof vocab - strlen(vocab), "%s%d", i ? "," : "", i % 256);
    strcat(vocab, "]}");
    char deep[4096];
    memset(deep, '[', sizeof deep - 1);
    deep[sizeof deep - 1] = '\0';
    for (size_t i = 0; i < NROWS(spec_rows); i++) {
        row r = spec_rows[i];
        if (!r.input)
            r.input = strcmp(r.what, "deep nesting") == 0 ? deep : vocab;
        ar_model_spec spec;
        int rc = ar_spec_parse(r.input, r.len ? r.len : strlen(r.input), "t.json", &spec);
        if (rc == AR_OK)
            rc = ar_spec_validate(&spec, "t.json");
        expect_refused(&r, rc);
    }
    /* the spec passes each check alone but not together */
    const char *whole[][2] = {
        {"{\"type\": \"gpt\", \"vocab_size\": 5, \"block_size\": 8, \"n_layer\": 1, \"n_head\": 3, "
         "\"n_embd\": 8, \"dropout\": 0.0}", "n_head"},
        {"{\"type\": \"mlp\", \"inputs\": 8, \"hidden\": [4], \"activation\": \"relu\", \"dropout\": 0}",
         "classes"},
    };
    for (size_t i = 0; i < 2; i++) {
        ar_model_spec spec;
        int rc = ar_spec_parse(whole[i][0], strlen(whole[i][0]), "t.json", &spec);
        if (rc == AR_OK)
            rc = ar_spec_validate(&spec, "t.json");
        cr_expect_neq(rc, AR_OK, "%s accepted", whole[i][0]);
        cr_expect(strstr(ar_last_error(), whole[i][1]) != NULL, "\"%s\" lacks %s", ar_last_error(),
                  whole[i][1]);
    }
    printf("spec table: %zu malformed specs refused\n", NROWS(spec_rows) + 2);
}

/* ---- safetensors (checkpoints, a worker's Restore) ------------------------------ */

/* 8-byte header length, the header, then data_len zero bytes; hlen_override
 * replaces the length field when nonzero. */
static size_t st_make(char *buf, size_t cap, const char *header, size_t data_len, uint64_t hlen_override)
{
    size_t h = strlen(header);
    uint64_t hl = hlen_override ? hlen_override : h;
    cr_assert(8 + h + data_len <= cap);
    for (int i = 0; i < 8; i++)
        buf[i] = (char)(hl >> (8 * i));
    memcpy(buf + 8, header, h);
    memset(buf + 8 + h, 0, data_len);
    return 8 + h + data_len;
}

typedef struct {
    const char *what, *header;
    size_t data_len;
    uint64_t hlen;
    int rc;
    const char *words;
} st_row;

static const st_row st_rows[] = {
    {"truncated length", NULL, 0, 0, AR_EFORMAT, "too short"},
    {"header length 2^63", "{}", 0, (uint64_t)1 << 63, AR_ELIMIT, "100 MiB"},
    {"header longer than the file", "{}", 0, 4096, AR_EFORMAT, "only"},
    {"not an object", "[]", 0, 0, AR_EFORMAT, "does not start with '{'"},
    {"invalid JSON", "{\"a\": ", 0, 0, AR_EFORMAT, "not valid JSON"},
    {"junk after the JSON", "{} x", 0, 0, AR_EFORMAT, "unexpected bytes"},
    {"tensor not an object", "{\"w\": 3}", 0, 0, AR_EFORMAT, "is not an object"},
    {"unknown dtype", "{\"w\": {\"dtype\": \"F16\", \"shape\": [1], \"data_offsets\": [0, 2]}}", 2, 0,
     AR_EFORMAT, "unsupported dtype"},
    {"dtype of wrong type", "{\"w\": {\"dtype\": 1, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, 0,
     AR_EFORMAT, "dtype is not a string"},
    {"shape of wrong type", "{\"w\": {\"dtype\": \"F32\", \"shape\": 1, \"data_offsets\": [0, 4]}}", 4, 0,
     AR_EFORMAT, "shape is not an array"},
    {"negative dimension", "{\"w\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4,
     0, AR_EFORMAT, "nonnegative integer"},
    {"fractional dimension", "{\"w\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}",
     4, 0, AR_EFORMAT, "nonnegative integer"},
    {"nine dimensions",
     "{\"w\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 4]}}", 4, 0,
     AR_ELIMIT, "at most 8"},
    {"2^40 elements in 4 bytes",
     "{\"w\": {\"dtype\": \"F32\", \"shape\": [1099511627776], \"data_offsets\": [0, 4]}}", 4, 0,
     AR_EFORMAT, "shape needs 4398046511104 bytes"},
    {"shape product overflows",
     "{\"w\": {\"dtype\": \"I64\", \"shape\": [4294967296, 4294967296, 16], \"data_offsets\": [0, 8]}}",
     8, 0, AR_EFORMAT, "more than"},
    {"offsets past the data", "{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}",
     4, 0, AR_EFORMAT, "outside"},
    {"offsets reversed", "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 0]}}", 4, 0,
     AR_EFORMAT, "outside"},
    {"huge offsets",
     "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [9007199254740990, "
     "9007199254740994]}}", 4, 0, AR_EFORMAT, "not nonnegative integers"},
    {"three offsets", "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4, 8]}}", 8, 0,
     AR_EFORMAT, "not [begin, end]"},
    {"unaligned offset", "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [2, 6]}}", 8, 0,
     AR_EFORMAT, "not a multiple"},
    {"overlapping tensors",
     "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
     "\"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8, 0, AR_EFORMAT, "overlap"},
    {"duplicate name",
     "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
     "\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8, 0, AR_EFORMAT,
     "duplicate tensor name"},
    {"missing data_offsets", "{\"w\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, 0, AR_EFORMAT,
     "missing data_offsets"},
    {"extra key",
     "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4], \"x\": 1}}", 4, 0,
     AR_EFORMAT, "unexpected or repeated key"},
    {"metadata not an object", "{\"__metadata__\": [1]}", 0, 0, AR_EFORMAT, "not an object"},
    {"metadata value not a string", "{\"__metadata__\": {\"k\": 1}}", 0, 0, AR_EFORMAT, "not a string"},
    {"overlong name", NULL, 4, 0, AR_ELIMIT, "longer than 127"},
};

Test(hostile, safetensors_table)
{
    static char buf[8192];
    char longname[512];
    snprintf(longname, sizeof longname, "{\"%0300d\": {\"dtype\": \"F32\", \"shape\": [1], "
             "\"data_offsets\": [0, 4]}}", 0);
    for (size_t i = 0; i < NROWS(st_rows); i++) {
        const st_row *r = &st_rows[i];
        size_t n;
        if (!r->header && strcmp(r->what, "truncated length") == 0)
            n = 5, memset(buf, 0, 5);
        else
            n = st_make(buf, sizeof buf, r->header ? r->header : longname, r->data_len, r->hlen);
        ar_st_file f;
        int rc = ar_st_parse(buf, n, &f);
        if (rc == AR_OK)
            ar_st_free(&f);
        row as_row = {r->what, NULL, 0, r->rc, r->words};
        expect_refused(&as_row, rc);
    }
    printf("safetensors table: %zu malformed files refused\n", NROWS(st_rows));
}

/* ---- IDX files (the data sets) --------------------------------------------------- */

typedef struct {
    const char *what;
    unsigned char bytes[32];
    size_t len;
    int gz;
    int rc;
    const char *words;
} idx_row;

static const idx_row idx_rows[] = {
    {"empty", {0}, 0, 0, AR_EFORMAT, "truncated header"},
    {"3 bytes", {0, 0, 8}, 3, 0, AR_EFORMAT, "truncated header"},
    {"bad magic", {1, 0, 8, 1, 0, 0, 0, 1, 7}, 9, 0, AR_EFORMAT, "bad IDX magic"},
    {"float elements", {0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0}, 12, 0, AR_EFORMAT, "not supported"},
    {"no dimensions", {0, 0, 8, 0}, 4, 0, AR_EFORMAT, "0 dimensions"},
    {"five dimensions", {0, 0, 8, 5}, 4, 0, AR_EFORMAT, "5 dimensions"},
    {"dimensions cut short", {0, 0, 8, 3, 0, 0, 0, 2, 0, 0}, 10, 0, AR_EFORMAT, "truncated header"},
    {"zero dimension", {0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 0}, 12, 0, AR_EFORMAT, "dimension 1 is zero"},
    {"2^96 bytes claimed", {0, 0, 8, 3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                            0xff}, 16, 0, AR_ELIMIT, "payload larger than"},
    {"2 GiB claimed, 1 byte there", {0, 0, 8, 1, 0x80, 0, 0, 0, 7}, 9, 0, AR_EFORMAT,
     "the header says 2147483648 bytes"},
    {"2 GiB claimed, 1 byte there, gzip'd", {0, 0, 8, 1, 0x80, 0, 0, 0, 7}, 9, 1, AR_EFORMAT,
     "truncated payload: 1 of 2147483648"},
    {"payload short by one", {0, 0, 8, 1, 0, 0, 0, 3, 1, 2}, 10, 0, AR_EFORMAT, "truncated payload"},
    {"trailing byte", {0, 0, 8, 1, 0, 0, 0, 1, 1, 2}, 10, 0, AR_EFORMAT, "trailing data"},
    {"trailing byte, gzip'd", {0, 0, 8, 1, 0, 0, 0, 1, 1, 2}, 10, 1, AR_EFORMAT, "trailing data"},
    {"not gzip after the magic", {0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff}, 13, 0,
     AR_EFORMAT, "corrupt gzip data"},
};

Test(hostile, idx_table, .init = tmp_make, .fini = tmp_remove)
{
    for (size_t i = 0; i < NROWS(idx_rows); i++) {
        const idx_row *r = &idx_rows[i];
        char name[32];
        snprintf(name, sizeof name, "%zu.idx", i);
        const char *p = tmp_write(name, r->bytes, r->len, r->gz);
        ar_idx idx;
        int rc = ar_idx_load(p, &idx);
        if (rc == AR_OK)
            ar_idx_free(&idx);
        row as_row = {r->what, NULL, 0, r->rc, r->words};
        expect_refused(&as_row, rc);
    }
    /* a gzip stream cut in the middle */
    unsigned char ok[] = {0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3, 4};
    const char *p = tmp_write("cut.gz", ok, sizeof ok, 1);
    FILE *f = fopen(p, "r+");
    cr_assert_not_null(f);
    cr_assert_eq(ftruncate(fileno(f), 15), 0);
    fclose(f);
    ar_idx idx;
    cr_expect_eq(ar_idx_load(p, &idx), AR_EFORMAT, "cut gzip stream: %s", ar_last_error());
    /* a directory, and a file that is not there */
    cr_expect_eq(ar_idx_load(tmpdir, &idx), AR_EIO, "a directory: %s", ar_last_error());
    cr_expect_eq(ar_idx_load(tmp_path("nope"), &idx), AR_ENOTFOUND);
    cr_expect(strstr(ar_last_error(), "nope") != NULL);
    printf("IDX table: %zu malformed files refused\n", NROWS(idx_rows) + 3);
}

/* ---- frames as a worker receives them ------------------------------------------ */

static size_t put_varint(unsigned char *p, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (unsigned char)v;
    return n;
}

/* "k=v" varint fields, then optional raw bytes appended. */
typedef struct {
    unsigned char b[2048];
    size_t n;
} msg;

static void field(msg *m, int f, uint64_t v)
{
    m->n += put_varint(m->b + m->n, (uint64_t)f << 3);
    m->n += put_varint(m->b + m->n, v);
}

static void field_bytes(msg *m, int f, const void *data, size_t len)
{
    m->n += put_varint(m->b + m->n, (uint64_t)f << 3 | 2);
    m->n += put_varint(m->b + m->n, len);
    memcpy(m->b + m->n, data, len);
    m->n += len;
}

static void raw(msg *m, const void *data, size_t len)
{
    memcpy(m->b + m->n, data, len);
    m->n += len;
}

/* A valid ACT frame header: kind, step, mb 0 of 1, F32. */
static msg act_header(void)
{
    msg m = {.n = 0};
    field(&m, 1, 1);
    field(&m, 2, 1);
    field(&m, 4, 1);
    field(&m, 5, 1);
    field(&m, 6, 0);
    return m;
}

/* n SYNC frames coalesced behind the one in m */
static void coalesce_syncs(msg *m, int n)
{
    for (int i = 0; i < n; i++)
        field_bytes(m, 15, "\x08\x09", 2);
}

static int receive(const msg *m)
{
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)m->b, m->n);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    static ar_frame fs[1 + NET_MAX_COALESCED];
    static size_t at[1 + NET_MAX_COALESCED];
    int count = 0;
    int rc = net_frames_receive(bb, (size_t)1 << 20, fs, at, &count);
    for (int k = 0; k < count; k++)
        ar_frame_free(&fs[k]);
    grpc_byte_buffer_destroy(bb);
    return rc;
}

Test(hostile, frame_table)
{
    int rows = 0;
    float four[4] = {0};
#define ROW(what_, build_, rc_, words_)                                                              \
    do {                                                                                             \
        msg m = {.n = 0};                                                                            \
        build_;                                                                                      \
        row r = {what_, NULL, 0, rc_, words_};                                                       \
        expect_refused(&r, receive(&m));                                                             \
        rows++;                                                                                      \
    } while (0)
    ROW("empty message", (void)0, AR_EPROTO, "unknown frame kind 0");
    ROW("unknown kind", field(&m, 1, 99), AR_EPROTO, "unknown frame kind 99");
    ROW("negative kind", field(&m, 1, (uint64_t)-5), AR_EPROTO, "unknown frame kind -5");
    ROW("unknown dtype", (m = act_header(), field(&m, 6, 9)), AR_EPROTO, "unknown dtype 9");
    ROW("five dimensions", (m = act_header(), field(&m, 7, 1), field(&m, 7, 1), field(&m, 7, 1),
                            field(&m, 7, 1), field(&m, 7, 1)), AR_EPROTO, "more than 4 dimensions");
    ROW("negative dimension", (m = act_header(), field(&m, 7, (uint64_t)-1)), AR_EPROTO,
        "bad or oversized shape");
    ROW("2^40 elements claimed", (m = act_header(), field(&m, 7, (uint64_t)1 << 40)), AR_EPROTO,
        "oversized");
    ROW("over the frame limit", (m = act_header(), field(&m, 7, 1 << 19)), AR_ELIMIT,
        "exceeds the 1048576 byte limit");
    ROW("shape and payload disagree", (m = act_header(), field(&m, 7, 10), field_bytes(&m, 10, four, 12)),
        AR_EPROTO, "shape gives 40 bytes but the payload has 12");
    ROW("payload cut short", (m = act_header(), field(&m, 7, 4), raw(&m, "\x52\x10\0\0", 4)), AR_EPROTO,
        "truncated frame");
    ROW("varint cut short", raw(&m, "\x08\x80", 2), AR_EPROTO, "truncated frame");
    ROW("varint of 11 bytes", raw(&m, "\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 12), AR_EPROTO,
        "truncated frame");
    ROW("targets not whole int32", (m = act_header(), field_bytes(&m, 9, four, 6)), AR_EPROTO,
        "not whole int32");
    ROW("five scalars", (m = act_header(), field_bytes(&m, 8, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
                                                          "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 40)),
        AR_EPROTO, "more than 4 scalars");
    ROW("scalars of 7 bytes", (m = act_header(), field_bytes(&m, 8, "\0\0\0\0\0\0\0", 7)), AR_EPROTO,
        "malformed frame scalars");
    ROW("wire type 3", raw(&m, "\x0b", 1), AR_EPROTO, "wire type 3");
    ROW("micro-batch past the count", (m = act_header(), field(&m, 3, 1)), AR_EPROTO,
        "micro-batch 1 out of range [0, 1)");
    ROW("negative micro-batch", (m = act_header(), field(&m, 3, (uint64_t)-2)), AR_EPROTO,
        "micro-batch -2");
    ROW("coalesced frame cut short", (m = act_header(), raw(&m, "\x7a\x20\x08", 3)), AR_EPROTO,
        "truncated coalesced frame");
    ROW("coalesced frame of unknown kind", (m = act_header(), field_bytes(&m, 15, "\x08\x63", 2)),
        AR_EPROTO, "unknown frame kind 99");
    ROW("257 coalesced frames", (m = act_header(), coalesce_syncs(&m, 257)), AR_EPROTO,
        "more than 256 frames");
#undef ROW
    /* too many targets: 1 MiB of them in a frame limited to 1 MiB */
    size_t big = ((size_t)1 << 20) + 4;
    unsigned char *b = calloc(1, big + 64);
    cr_assert_not_null(b);
    msg h = act_header();
    memcpy(b, h.b, h.n);
    size_t n = h.n;
    n += put_varint(b + n, 9 << 3 | 2);
    n += put_varint(b + n, big);
    n += big;
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)b, n);
    free(b);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    static ar_frame fs[1 + NET_MAX_COALESCED];
    static size_t at[1 + NET_MAX_COALESCED];
    int count = 0;
    cr_expect_eq(net_frames_receive(bb, (size_t)1 << 20, fs, at, &count), AR_ELIMIT);
    cr_expect(strstr(ar_last_error(), "too many targets") != NULL, "%s", ar_last_error());
    cr_expect_eq(count, 0);
    grpc_byte_buffer_destroy(bb);
    printf("frame table: %d malformed frames refused\n", rows + 1);
}
