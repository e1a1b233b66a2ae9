/* IDX and text data sets: loading, validation of bad input, batching. */
#include "data/data.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "tmpfiles.h"

/* An IDX image: header + payload into buf; returns the length. */
static size_t make_idx(unsigned char *buf, int ndim, const uint32_t *dims, const uint8_t *payload)
{
    size_t n = 0, count = 1;
    buf[n++] = 0;
    buf[n++] = 0;
    buf[n++] = 0x08;
    buf[n++] = (unsigned char)ndim;
    for (int i = 0; i < ndim; i++) {
        buf[n++] = (unsigned char)(dims[i] >> 24);
        buf[n++] = (unsigned char)(dims[i] >> 16);
        buf[n++] = (unsigned char)(dims[i] >> 8);
        buf[n++] = (unsigned char)dims[i];
        count *= dims[i];
    }
    memcpy(buf + n, payload, count);
    return n + count;
}

/* images (N, 2, 3) with value i, labels i % 3 */
static void write_set(const char *prefix, uint32_t n_img, uint32_t n_lab, int gz)
{
    unsigned char buf[4096];
    uint8_t pix[1024], lab[256];
    for (int i = 0; i < 1024; i++)
        pix[i] = (uint8_t)(i * 7);
    for (int i = 0; i < 256; i++)
        lab[i] = (uint8_t)(i % 3);
    char name[128];
    uint32_t d3[3] = {n_img, 2, 3};
    size_t len = make_idx(buf, 3, d3, pix);
    snprintf(name, sizeof name, "%s-images-idx3-ubyte%s", prefix, gz ? ".gz" : "");
    tmp_write(name, buf, len, gz);
    uint32_t d1[1] = {n_lab};
    len = make_idx(buf, 1, d1, lab);
    snprintf(name, sizeof name, "%s-labels-idx1-ubyte%s", prefix, gz ? ".gz" : "");
    tmp_write(name, buf, len, gz);
}

TestSuite(idx, .init = tmp_make, .fini = tmp_remove);

static void check_small(int gz)
{
    unsigned char buf[256];
    uint8_t payload[24];
    for (int i = 0; i < 24; i++)
        payload[i] = (uint8_t)(i * 10);
    uint32_t dims[3] = {2, 3, 4};
    size_t len = make_idx(buf, 3, dims, payload);
    tmp_write("a.idx", buf, len, gz);
    ar_idx idx;
    int rc = ar_idx_load(tmp_path("a.idx"), &idx);
    cr_assert_eq(rc, 0, "%s", ar_last_error());
    cr_assert_eq(idx.ndim, 3);
    cr_assert_eq(idx.dims[0], 2);
    cr_assert_eq(idx.dims[1], 3);
    cr_assert_eq(idx.dims[2], 4);
    cr_assert_eq(idx.count, 24);
    cr_assert_arr_eq(idx.data, payload, 24);
    ar_idx_free(&idx);
    cr_assert_null(idx.data);
}

Test(idx, loads_plain)
{
    check_small(0);
}

Test(idx, loads_gzip)
{
    check_small(1);
}

/* expect a failure with code and a message naming the file */
static void expect_fail(const char *name, int code)
{
    ar_idx idx;
    int rc = ar_idx_load(tmp_path(name), &idx);
    cr_assert_eq(rc, code, "rc %d (%s), want %d", rc, ar_last_error(), code);
    cr_assert_not_null(strstr(ar_last_error(), tmp_path(name)), "message: %s", ar_last_error());
    cr_assert_null(idx.data);
}

Test(idx, wrong_magic)
{
    unsigned char buf[64] = {0x00, 0x00, 0x0d, 0x01, 0, 0, 0, 1, 42};
    tmp_write("m.idx", buf, 9, 0);
    expect_fail("m.idx", AR_EFORMAT);
    unsigned char buf2[64] = {0x12, 0x34, 0x08, 0x01, 0, 0, 0, 1, 42};
    tmp_write("m2.idx", buf2, 9, 0);
    expect_fail("m2.idx", AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), "magic"));
    unsigned char buf3[64] = {0x00, 0x00, 0x08, 0x05, 0, 0, 0, 1, 42};
    tmp_write("m3.idx", buf3, 9, 0);
    expect_fail("m3.idx", AR_EFORMAT);
}

Test(idx, truncated_payload)
{
    unsigned char buf[256];
    uint8_t payload[24] = {0};
    uint32_t dims[3] = {2, 3, 4};
    size_t len = make_idx(buf, 3, dims, payload);
    tmp_write("t.idx", buf, len - 1, 0);
    expect_fail("t.idx", AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), "truncated"));
    tmp_write("t.idx.gz", buf, len - 5, 1);
    expect_fail("t.idx.gz", AR_EFORMAT);
}

Test(idx, truncated_gzip_stream)
{
    unsigned char buf[256];
    uint8_t payload[24] = {1, 2, 3};
    uint32_t dims[3] = {2, 3, 4};
    size_t len = make_idx(buf, 3, dims, payload);
    tmp_write("g.gz", buf, len, 1);
    /* cut the compressed file in half */
    FILE *f = fopen(tmp_path("g.gz"), "rb");
    unsigned char z[512];
    size_t zn = fread(z, 1, sizeof z, f);
    fclose(f);
    tmp_write("g2.gz", z, zn / 2, 0);
    expect_fail("g2.gz", AR_EFORMAT);
    /* a bad CRC in the gzip trailer is caught too */
    z[zn - 6] ^= 0x55;
    tmp_write("g3.gz", z, zn, 0);
    expect_fail("g3.gz", AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), "gzip"), "%s", ar_last_error());
}

Test(idx, trailing_bytes)
{
    unsigned char buf[256];
    uint8_t payload[24] = {0};
    uint32_t dims[1] = {4};
    size_t len = make_idx(buf, 1, dims, payload);
    tmp_write("x.idx", buf, len + 3, 0);
    expect_fail("x.idx", AR_EFORMAT);
}

Test(idx, truncated_header)
{
    unsigned char buf[8] = {0, 0, 8, 3, 0, 0, 0, 2};
    tmp_write("h.idx", buf, 8, 0); /* needs 16 header bytes */
    expect_fail("h.idx", AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), "header"));
    tmp_write("h2.idx", buf, 3, 0);
    expect_fail("h2.idx", AR_EFORMAT);
    tmp_write("h3.idx", buf, 0, 0);
    expect_fail("h3.idx", AR_EFORMAT);
}

Test(idx, zero_dim)
{
    unsigned char buf[64];
    uint32_t dims[2] = {5, 0};
    size_t len = make_idx(buf, 2, dims, (const uint8_t *)"");
    tmp_write("z.idx", buf, len, 0);
    expect_fail("z.idx", AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), "zero"));
}

Test(idx, too_large)
{
    /* 4 billion x 4 billion x 2 bytes: over the 2 GiB limit (and 64 bits) */
    unsigned char buf[16] = {0, 0, 8, 3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2};
    tmp_write("big.idx", buf, sizeof buf, 0);
    expect_fail("big.idx", AR_ELIMIT);
}

Test(idx, missing_file)
{
    expect_fail("nope.idx", AR_ENOTFOUND);
}

Test(idx, image_set_plain_and_gzip)
{
    write_set("train", 5, 5, 0);
    write_set("t10k", 4, 4, 1);
    ar_image_set s;
    int rc = ar_image_set_load(tmpdir, "train", &s);
    cr_assert_eq(rc, 0, "%s", ar_last_error());
    cr_assert_eq(s.count, 5);
    cr_assert_eq(s.features, 6);
    cr_assert_eq(s.classes, 3);
    for (int i = 0; i < 30; i++)
        cr_assert_float_eq(s.images[i], (float)(uint8_t)(i * 7) / 255.0f, 1e-7);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(s.labels[i], i % 3);
    ar_image_set_free(&s);
    cr_assert_null(s.images);

    char dir[300];
    snprintf(dir, sizeof dir, "%s/", tmpdir); /* a trailing slash is fine too */
    rc = ar_image_set_load(dir, "t10k", &s);
    cr_assert_eq(rc, 0, "%s", ar_last_error());
    cr_assert_eq(s.count, 4);
    ar_image_set_free(&s);
}

Test(idx, image_set_count_mismatch)
{
    write_set("train", 5, 4, 1);
    ar_image_set s;
    int rc = ar_image_set_load(tmpdir, "train", &s);
    cr_assert_eq(rc, AR_ESHAPE, "%d %s", rc, ar_last_error());
    cr_assert_not_null(strstr(ar_last_error(), tmpdir));
    cr_assert_null(s.images);
    cr_assert_null(s.labels);
}

Test(idx, image_set_wrong_rank)
{
    /* labels file given 2 dimensions */
    unsigned char buf[256];
    uint8_t pix[64] = {0};
    uint32_t d3[3] = {2, 2, 2};
    tmp_write("train-images-idx3-ubyte", buf, make_idx(buf, 3, d3, pix), 0);
    uint32_t d2[2] = {2, 1};
    tmp_write("train-labels-idx1-ubyte", buf, make_idx(buf, 2, d2, pix), 0);
    ar_image_set s;
    cr_assert_eq(ar_image_set_load(tmpdir, "train", &s), AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), "labels"));
}

Test(idx, image_set_missing)
{
    ar_image_set s;
    int rc = ar_image_set_load(tmpdir, "train", &s);
    cr_assert_eq(rc, AR_ENOTFOUND);
    cr_assert_not_null(strstr(ar_last_error(), "train-images-idx3-ubyte"));
}

Test(idx, fashion_mnist_t10k)
{
    const char *dir = "/usr/share/datasets/fashion-mnist";
    if (access("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz", R_OK) != 0)
        cr_skip("Fashion-MNIST not installed");
    ar_image_set s;
    int rc = ar_image_set_load(dir, "t10k", &s);
    cr_assert_eq(rc, 0, "%s", ar_last_error());
    cr_assert_eq(s.count, 10000);
    cr_assert_eq(s.features, 784);
    cr_assert_eq(s.classes, 10);
    int hist[10] = {0};
    for (int i = 0; i < s.count; i++) {
        cr_assert(s.labels[i] >= 0 && s.labels[i] <= 9);
        hist[s.labels[i]]++;
    }
    for (int c = 0; c < 10; c++)
        cr_assert_eq(hist[c], 1000); /* the test set is balanced */
    float mx = 0;
    for (size_t i = 0; i < (size_t)s.count * 784; i++) {
        cr_assert(s.images[i] >= 0.0f && s.images[i] <= 1.0f);
        if (s.images[i] > mx)
            mx = s.images[i];
    }
    cr_assert_float_eq(mx, 1.0f, 1e-7);
    ar_image_set_free(&s);
}

/* ---- text ---------------------------------------------------------------- */

TestSuite(text, .init = tmp_make, .fini = tmp_remove);

Test(text, vocab_and_split)
{
    const char *s = "hello world, hello arceus!\n"; /* 27 bytes */
    tmp_write("t.txt", s, strlen(s), 0);
    ar_text_set t;
    int rc = ar_text_load(tmp_path("t.txt"), &t);
    cr_assert_eq(rc, 0, "%s", ar_last_error());
    cr_assert_eq(t.count, 27);
    cr_assert_eq(t.train_count, 27 * 9 / 10);
    const char *want = "\n !,acdehlorsuw";
    cr_assert_eq(t.vocab_size, (int)strlen(want));
    for (int i = 0; i < t.vocab_size; i++) {
        cr_assert_eq(t.vocab[i], (uint8_t)want[i]);
        cr_assert_eq(t.lookup[(uint8_t)want[i]], i);
    }
    cr_assert_eq(t.lookup['z'], -1);
    for (long i = 0; i < t.count; i++)
        cr_assert_eq(t.vocab[t.tokens[i]], (uint8_t)s[i]);

    int32_t enc[16];
    long n = -1;
    cr_assert_eq(ar_text_encode(&t, "hello", enc, &n), 0);
    cr_assert_eq(n, 5);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(enc[i], t.lookup[(uint8_t)"hello"[i]]);
    cr_assert_eq(ar_text_encode(&t, "hez", enc, &n), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "'z'"));
    ar_text_free(&t);
    cr_assert_null(t.tokens);
}

Test(text, vocab_init)
{
    ar_text_set t;
    const uint8_t v[3] = {'a', 'b', 'c'};
    cr_assert_eq(ar_text_vocab_init(&t, v, 3), 0);
    cr_assert_eq(t.lookup['c'], 2);
    cr_assert_eq(t.lookup['d'], -1);
    int32_t out[4];
    long n;
    cr_assert_eq(ar_text_encode(&t, "cab", out, &n), 0);
    cr_assert_eq(n, 3);
    cr_assert_eq(out[0], 2);
    cr_assert_eq(out[1], 0);
    ar_text_free(&t);
    const uint8_t dup[3] = {'a', 'b', 'a'};
    cr_assert_eq(ar_text_vocab_init(&t, dup, 3), AR_EINVAL);
    cr_assert_eq(ar_text_vocab_init(&t, v, 0), AR_EINVAL);
}

Test(text, batch_targets_shifted_and_deterministic)
{
    char s[1000];
    for (int i = 0; i < 1000; i++)
        s[i] = (char)('a' + (i * 31 + i / 7) % 26);
    tmp_write("t.txt", s, sizeof s, 0);
    ar_text_set t;
    cr_assert_eq(ar_text_load(tmp_path("t.txt"), &t), 0, "%s", ar_last_error());
    cr_assert_eq(t.train_count, 900);
    enum { B = 4, T = 16 };
    int32_t in[B * T], tg[B * T], in2[B * T], tg2[B * T];
    for (int val = 0; val <= 1; val++) {
        ar_rng r1, r2, r3;
        ar_rng_seed(&r1, 1234);
        ar_rng_seed(&r2, 1234);
        ar_rng_seed(&r3, 1234);
        long base = val ? 900 : 0, span = val ? 100 : 900;
        for (int rep = 0; rep < 20; rep++) {
            cr_assert_eq(ar_text_batch(&t, val, &r1, B, T, in, tg), 0, "%s", ar_last_error());
            cr_assert_eq(ar_text_batch(&t, val, &r2, B, T, in2, tg2), 0);
            cr_assert_arr_eq(in, in2, sizeof in);
            cr_assert_arr_eq(tg, tg2, sizeof tg);
            for (int b = 0; b < B; b++) {
                /* the documented sampling: one draw per row, inside the split */
                long st = base + (long)ar_rng_below(&r3, (uint64_t)(span - T));
                cr_assert_leq(st + T, base + span - 1);
                for (int i = 0; i < T; i++) {
                    cr_assert_eq(in[b * T + i], t.tokens[st + i]);
                    cr_assert_eq(tg[b * T + i], t.tokens[st + i + 1]);
                }
                for (int i = 0; i + 1 < T; i++)
                    cr_assert_eq(tg[b * T + i], in[b * T + i + 1]);
            }
        }
    }
    /* a different seed gives a different batch */
    ar_rng r3;
    ar_rng_seed(&r3, 1234);
    cr_assert_eq(ar_text_batch(&t, 0, &r3, B, T, in, tg), 0);
    ar_rng_seed(&r3, 99);
    cr_assert_eq(ar_text_batch(&t, 0, &r3, B, T, in2, tg2), 0);
    cr_assert_neq(memcmp(in, in2, sizeof in), 0);
    ar_text_free(&t);
}

Test(text, empty_file)
{
    tmp_write("e.txt", "", 0, 0);
    ar_text_set t;
    cr_assert_eq(ar_text_load(tmp_path("e.txt"), &t), AR_EFORMAT);
    cr_assert_not_null(strstr(ar_last_error(), "empty text file"));
    cr_assert_not_null(strstr(ar_last_error(), tmp_path("e.txt")));
    cr_assert_null(t.tokens);
}

Test(text, missing_file)
{
    ar_text_set t;
    cr_assert_eq(ar_text_load(tmp_path("none.txt"), &t), AR_ENOTFOUND);
}

Test(text, too_short_for_block)
{
    const char *s = "abcdefghijklmnopqrst"; /* 20 tokens: 18 train, 2 val */
    tmp_write("s.txt", s, strlen(s), 0);
    ar_text_set t;
    cr_assert_eq(ar_text_load(tmp_path("s.txt"), &t), 0);
    int32_t in[64], tg[64];
    ar_rng r;
    ar_rng_seed(&r, 1);
    cr_assert_eq(ar_text_batch(&t, 0, &r, 2, 17, in, tg), 0); /* 18 = T + 1: just fits */
    cr_assert_eq(ar_text_batch(&t, 0, &r, 2, 18, in, tg), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "training"));
    cr_assert_not_null(strstr(ar_last_error(), "18"));
    cr_assert_eq(ar_text_batch(&t, 1, &r, 1, 2, in, tg), AR_EINVAL);
    cr_assert_not_null(strstr(ar_last_error(), "validation"));
    cr_assert_eq(ar_text_batch(&t, 1, &r, 1, 1, in, tg), 0);
    cr_assert_eq(in[0], t.lookup['s']);
    cr_assert_eq(tg[0], t.lookup['t']);
    cr_assert_eq(ar_text_batch(&t, 0, &r, 0, 4, in, tg), AR_EINVAL);
    ar_text_free(&t);
}
