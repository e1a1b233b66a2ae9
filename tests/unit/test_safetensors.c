/* safetensors: round trip, layout details PyTorch relies on, and corrupted
 * files (each must be an error, never a crash). */
#include "nn/safetensors.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[256];
static char fpath[512];

static void mk_tmp(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/ar_test_st_XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
    snprintf(fpath, sizeof fpath, "%s/model.safetensors", tmpdir);
}

static void rm_tmp(void)
{
    unlink(fpath);
    rmdir(tmpdir);
}

TestSuite(safetensors, .init = mk_tmp, .fini = rm_tmp);

static uint64_t le64(const unsigned char *b)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | b[i];
    return v;
}

Test(safetensors, round_trip)
{
    float w[6] = {1.5f, -2.25f, 3.0f, 0.0f, 1e-8f, -7.0f};
    float bias[3] = {0.1f, 0.2f, 0.3f};
    int32_t step[1] = {123456};
    ar_st_tensor ts[3] = {0};
    snprintf(ts[0].name, sizeof ts[0].name, "layers.0.weight");
    ts[0].dtype = AR_F32;
    ts[0].ndim = 2;
    ts[0].shape[0] = 2;
    ts[0].shape[1] = 3;
    ts[0].nbytes = sizeof w;
    ts[0].data = w;
    snprintf(ts[1].name, sizeof ts[1].name, "layers.0.bias");
    ts[1].dtype = AR_F32;
    ts[1].ndim = 1;
    ts[1].shape[0] = 3;
    ts[1].nbytes = sizeof bias;
    ts[1].data = bias;
    snprintf(ts[2].name, sizeof ts[2].name, "step");
    ts[2].dtype = AR_I32;
    ts[2].ndim = 0; /* a scalar */
    ts[2].nbytes = sizeof step;
    ts[2].data = step;
    const char *keys[2] = {"format", "note"};
    const char *vals[2] = {"pt", "quote \" and \\ and \xc3\xa9"};
    int rc = ar_st_save(fpath, ts, 3, keys, vals, 2);
    cr_assert_eq(rc, 0, "%s", ar_last_error());

    ar_st_file f;
    rc = ar_st_load(fpath, &f);
    cr_assert_eq(rc, 0, "%s", ar_last_error());
    cr_assert_eq(f.count, 3);
    cr_assert_eq(f.meta_count, 2);
    cr_assert_str_eq(ar_st_meta(&f, "format"), "pt");
    cr_assert_str_eq(ar_st_meta(&f, "note"), vals[1]);
    cr_assert_null(ar_st_meta(&f, "missing"));
    /* tensors in the order written */
    cr_assert_str_eq(f.tensors[0].name, "layers.0.weight");
    cr_assert_str_eq(f.tensors[2].name, "step");

    const ar_st_tensor *t = ar_st_find(&f, "layers.0.weight");
    cr_assert_not_null(t);
    cr_assert_eq(t->dtype, AR_F32);
    cr_assert_eq(t->ndim, 2);
    cr_assert_eq(t->shape[0], 2);
    cr_assert_eq(t->shape[1], 3);
    cr_assert_eq(t->nbytes, sizeof w);
    cr_assert_eq((uintptr_t)t->data % 4, 0);
    cr_assert_arr_eq(t->data, w, sizeof w);
    t = ar_st_find(&f, "layers.0.bias");
    cr_assert_not_null(t);
    cr_assert_arr_eq(t->data, bias, sizeof bias);
    t = ar_st_find(&f, "step");
    cr_assert_not_null(t);
    cr_assert_eq(t->dtype, AR_I32);
    cr_assert_eq(t->ndim, 0);
    cr_assert_eq(*(const int32_t *)t->data, 123456);
    cr_assert_null(ar_st_find(&f, "nope"));

    /* the layout of the reference writer */
    const unsigned char *b = (const unsigned char *)f.buffer;
    uint64_t n = le64(b);
    cr_assert_eq(n % 8, 0);
    cr_assert_eq(f.size, 8 + n + sizeof w + sizeof bias + sizeof step);
    cr_assert_eq(b[8], '{');
    const char *hdr = f.buffer + 8;
    const char *meta = strstr(hdr, "\"__metadata__\"");
    cr_assert_not_null(meta);
    cr_assert_eq(meta, hdr + 1, "metadata comes first");
    cr_assert_not_null(strstr(hdr, "\"layers.0.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],"
                                   "\"data_offsets\":[0,24]}"));
    cr_assert_not_null(strstr(hdr, "\"layers.0.bias\":{\"dtype\":\"F32\",\"shape\":[3],"
                                   "\"data_offsets\":[24,36]}"));
    cr_assert_not_null(strstr(hdr, "\"step\":{\"dtype\":\"I32\",\"shape\":[],"
                                   "\"data_offsets\":[36,40]}"));
    ar_st_free(&f);
    cr_assert_null(f.buffer);

    /* from memory too, and a second save overwrites atomically */
    char *copy = NULL;
    size_t len = 0;
    cr_assert_eq(ar_read_file(fpath, &copy, &len), 0);
    cr_assert_eq(ar_st_parse(copy, len, &f), 0, "%s", ar_last_error());
    cr_assert_eq(f.count, 3);
    ar_st_free(&f);
    ar_free(copy);
    cr_assert_eq(ar_st_save(fpath, ts, 1, NULL, NULL, 0), 0);
    cr_assert_eq(ar_st_load(fpath, &f), 0);
    cr_assert_eq(f.count, 1);
    cr_assert_eq(f.meta_count, 0);
    ar_st_free(&f);
}

Test(safetensors, empty_and_zero_size_tensors)
{
    ar_st_tensor t = {0};
    snprintf(t.name, sizeof t.name, "empty");
    t.dtype = AR_F32;
    t.ndim = 2;
    t.shape[0] = 0;
    t.shape[1] = 5;
    cr_assert_eq(ar_st_save(fpath, &t, 1, NULL, NULL, 0), 0, "%s", ar_last_error());
    ar_st_file f;
    cr_assert_eq(ar_st_load(fpath, &f), 0, "%s", ar_last_error());
    cr_assert_eq(f.tensors[0].nbytes, 0);
    cr_assert_eq(f.tensors[0].shape[1], 5);
    ar_st_free(&f);
    cr_assert_eq(ar_st_save(fpath, NULL, 0, NULL, NULL, 0), 0);
    cr_assert_eq(ar_st_load(fpath, &f), 0, "%s", ar_last_error());
    cr_assert_eq(f.count, 0);
    ar_st_free(&f);
}

Test(safetensors, writer_rejects_bad_tensors)
{
    float x[4] = {0};
    ar_st_tensor t = {0};
    snprintf(t.name, sizeof t.name, "x");
    t.dtype = AR_F32;
    t.ndim = 1;
    t.shape[0] = 4;
    t.nbytes = 12; /* should be 16 */
    t.data = x;
    cr_assert_eq(ar_st_save(fpath, &t, 1, NULL, NULL, 0), AR_ESHAPE);
    t.nbytes = 16;
    t.dtype = 7;
    cr_assert_eq(ar_st_save(fpath, &t, 1, NULL, NULL, 0), AR_EINVAL);
    t.dtype = AR_F32;
    ar_st_tensor two[2] = {t, t};
    cr_assert_eq(ar_st_save(fpath, two, 2, NULL, NULL, 0), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "duplicate"));
    cr_assert_eq(access(fpath, F_OK), -1, "nothing written on error");
}

/* Build a file from a header string and n data bytes (value i). */
static size_t build(unsigned char *buf, const char *hdr, size_t ndata)
{
    size_t h = strlen(hdr);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(buf + 8, hdr, h);
    for (size_t i = 0; i < ndata; i++)
        buf[8 + h + i] = (unsigned char)i;
    return 8 + h + ndata;
}

static int parse_hdr(const char *hdr, size_t ndata)
{
    static unsigned char buf[4096];
    size_t n = build(buf, hdr, ndata);
    ar_st_file f;
    int rc = ar_st_parse(buf, n, &f);
    if (rc == 0)
        ar_st_free(&f);
    else
        cr_assert_null(f.buffer);
    return rc;
}

Test(safetensors, good_hand_written_header)
{
    /* unpadded header (length 67, not a multiple of 8): still read, aligned */
    const char *h = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"I64\","
                    "\"shape\":[1,1],\"data_offsets\":[8,16]}}";
    unsigned char buf[512];
    size_t n = build(buf, h, 16);
    ar_st_file f;
    cr_assert_eq(ar_st_parse(buf, n, &f), 0, "%s", ar_last_error());
    const ar_st_tensor *b = ar_st_find(&f, "b");
    cr_assert_not_null(b);
    cr_assert_eq(b->dtype, AR_I64);
    cr_assert_eq((uintptr_t)b->data % 8, 0);
    cr_assert_eq(((const unsigned char *)b->data)[0], 8);
    ar_st_free(&f);

    FILE *fp = fopen(fpath, "wb");
    cr_assert_eq(fwrite(buf, 1, n, fp), n);
    fclose(fp);
    cr_assert_eq(ar_st_load(fpath, &f), 0, "%s", ar_last_error());
    cr_assert_eq(((const unsigned char *)ar_st_find(&f, "a")->data)[7], 7);
    ar_st_free(&f);
}

Test(safetensors, header_length_beyond_file)
{
    unsigned char buf[64];
    size_t n = build(buf, "{}", 0);
    buf[0] = 200; /* claims 200 header bytes, file has 2 */
    ar_st_file f;
    cr_assert_eq(ar_st_parse(buf, n, &f), AR_EFORMAT);
    memset(buf, 0xff, 8); /* 2^64 - 1 */
    cr_assert_eq(ar_st_parse(buf, n, &f), AR_ELIMIT);
    cr_assert_eq(ar_st_parse(buf, 5, &f), AR_EFORMAT); /* shorter than 8 bytes */
    cr_assert_eq(ar_st_parse(buf, 0, &f), AR_EFORMAT);
}

Test(safetensors, bad_json)
{
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",", 0), AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":}", 0), AR_EFORMAT);
    cr_assert_eq(parse_hdr("[1,2,3]", 0), AR_EFORMAT);
    cr_assert_eq(parse_hdr("{} garbage", 0), AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":5}", 0), AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4), AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"__metadata__\":{\"k\":1}}", 0), AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"__metadata__\":{\"k\":\"v\"}}    ", 0), 0); /* padding is fine */
}

Test(safetensors, unknown_dtype)
{
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4),
                 AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), "F16"));
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":7,\"shape\":[2],\"data_offsets\":[0,4]}}", 4),
                 AR_EFORMAT);
}

Test(safetensors, offsets_out_of_range)
{
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4),
                 AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 8),
                 AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8),
                 AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0.5,4.5]}}",
                           8),
                 AR_EFORMAT);
    cr_assert_eq(
        parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[1e300,1e300]}}", 8),
        AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 8),
                 AR_EFORMAT);
}

Test(safetensors, size_shape_mismatch)
{
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8),
                 AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8),
                 AR_EFORMAT);
    /* a product that overflows 64 bits */
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],"
                           "\"data_offsets\":[0,8]}}",
                           8),
                 AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8),
                 AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,2],"
                           "\"data_offsets\":[0,8]}}",
                           8),
                 AR_ELIMIT);
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,2],"
                           "\"data_offsets\":[0,8]}}",
                           8),
                 0);
}

Test(safetensors, overlapping_and_duplicate_tensors)
{
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                           "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                           12),
                 AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), "overlap"));
    /* an empty tensor between the two must not hide the overlap */
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                           "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
                           "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
                           16),
                 AR_EFORMAT);
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                           "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                           16),
                 AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), "duplicate"));
    /* same data twice is an overlap too */
    cr_assert_eq(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                           "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                           8),
                 AR_EFORMAT);
}

Test(safetensors, long_name)
{
    char hdr[512];
    char name[200];
    memset(name, 'n', 128);
    name[128] = 0;
    snprintf(hdr, sizeof hdr, "{\"%s\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
             name);
    cr_assert_eq(parse_hdr(hdr, 4), AR_ELIMIT);
    name[127] = 0;
    snprintf(hdr, sizeof hdr, "{\"%s\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
             name);
    cr_assert_eq(parse_hdr(hdr, 4), 0, "%s", ar_last_error());
}

Test(safetensors, truncated_file)
{
    float w[16];
    for (int i = 0; i < 16; i++)
        w[i] = (float)i;
    ar_st_tensor t = {0};
    snprintf(t.name, sizeof t.name, "w");
    t.dtype = AR_F32;
    t.ndim = 2;
    t.shape[0] = 4;
    t.shape[1] = 4;
    t.nbytes = sizeof w;
    t.data = w;
    const char *k = "format", *v = "pt";
    cr_assert_eq(ar_st_save(fpath, &t, 1, &k, &v, 1), 0);
    char *buf;
    size_t len;
    cr_assert_eq(ar_read_file(fpath, &buf, &len), 0);
    /* every prefix of the file fails cleanly; only the whole file loads */
    for (size_t cut = 0; cut < len; cut++) {
        ar_st_file f;
        int rc = ar_st_parse(buf, cut, &f);
        cr_assert(rc < 0, "prefix of %zu bytes parsed", cut);
        cr_assert_null(f.tensors);
    }
    ar_st_file f;
    cr_assert_eq(ar_st_parse(buf, len, &f), 0);
    ar_st_free(&f);
    /* and so does a truncated file on disk */
    FILE *fp = fopen(fpath, "wb");
    cr_assert_eq(fwrite(buf, 1, len - 1, fp), len - 1);
    fclose(fp);
    cr_assert_eq(ar_st_load(fpath, &f), AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), fpath));
    ar_free(buf);
}

Test(safetensors, random_corruption_never_crashes)
{
    float w[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    ar_st_tensor t[2];
    memset(t, 0, sizeof t);
    snprintf(t[0].name, sizeof t[0].name, "a");
    snprintf(t[1].name, sizeof t[1].name, "b");
    for (int i = 0; i < 2; i++) {
        t[i].dtype = AR_F32;
        t[i].ndim = 1;
        t[i].shape[0] = 4;
        t[i].nbytes = 16;
        t[i].data = w + 4 * i;
    }
    cr_assert_eq(ar_st_save(fpath, t, 2, NULL, NULL, 0), 0);
    char *buf;
    size_t len;
    cr_assert_eq(ar_read_file(fpath, &buf, &len), 0);
    ar_rng r;
    ar_rng_seed(&r, 7);
    for (int iter = 0; iter < 3000; iter++) {
        char *m = malloc(len);
        cr_assert_not_null(m);
        memcpy(m, buf, len);
        int flips = 1 + (int)ar_rng_below(&r, 3);
        for (int j = 0; j < flips; j++)
            m[ar_rng_below(&r, len)] = (char)ar_rng_below(&r, 256);
        ar_st_file f;
        if (ar_st_parse(m, len, &f) == 0) {
            /* whatever parsed must point inside the buffer */
            for (int i = 0; i < f.count; i++)
                cr_assert((const char *)f.tensors[i].data + f.tensors[i].nbytes <=
                          f.buffer + f.size);
            ar_st_free(&f);
        }
        free(m);
    }
    ar_free(buf);
}
