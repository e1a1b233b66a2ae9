/* safetensors reader and writer.
 *
 * Layout: u64 little-endian N, N bytes of JSON header, then the data bytes.
 * The reader trusts nothing: every length, offset, dtype and shape in the
 * header is checked against the file before a pointer into it is handed
 * out. The writer follows the reference implementation: "__metadata__"
 * first, tensors in the caller's order with consecutive data_offsets, and
 * the header padded with spaces so the data starts at a multiple of 8. */
#include "nn/safetensors.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ST_MAX_HEADER ((uint64_t)100 << 20) /* 100 MiB, as the reference */
#define ST_MAX_NDIM 8
#define ST_MAX_NAME 127

static const char *dtype_names[] = {"F32", "I32", "I64"};
static const size_t dtype_sizes[] = {4, 4, 8};

static int dtype_from_name(const char *s)
{
    for (int i = 0; i < 3; i++)
        if (strcmp(s, dtype_names[i]) == 0)
            return i;
    return -1;
}

static uint64_t le64(const unsigned char *b)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | b[i];
    return v;
}

static void put_le64(unsigned char *b, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s);
    char *d = ar_calloc(n + 1, 1);
    if (d)
        memcpy(d, s, n + 1);
    return d;
}

/* A JSON number that is a nonnegative integer exactly representable. */
static int json_uint(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v))
        return -1;
    double d = v->valuedouble;
    if (!(d >= 0) || d > 9007199254740992.0 || floor(d) != d)
        return -1;
    *out = (uint64_t)d;
    return 0;
}

/* ---- reader -------------------------------------------------------------- */

static int cmp_name(const void *a, const void *b)
{
    const ar_st_tensor *x = *(const ar_st_tensor *const *)a;
    const ar_st_tensor *y = *(const ar_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_begin(const void *a, const void *b)
{
    const ar_st_tensor *x = *(const ar_st_tensor *const *)a;
    const ar_st_tensor *y = *(const ar_st_tensor *const *)b;
    const char *px = x->data, *py = y->data;
    if (px != py)
        return px < py ? -1 : 1;
    return (x->nbytes > y->nbytes) - (x->nbytes < y->nbytes);
}

static int parse_metadata(const cJSON *obj, ar_st_file *out, const char *src)
{
    if (!cJSON_IsObject(obj))
        return ar_fail(AR_EFORMAT, "%s: __metadata__ is not an object", src);
    int n = cJSON_GetArraySize(obj);
    if (n == 0)
        return AR_OK;
    out->meta_keys = ar_calloc((size_t)n, sizeof(char *));
    out->meta_values = ar_calloc((size_t)n, sizeof(char *));
    if (!out->meta_keys || !out->meta_values)
        return AR_ENOMEM;
    const cJSON *it;
    cJSON_ArrayForEach(it, obj)
    {
        if (!cJSON_IsString(it) || !it->string)
            return ar_fail(AR_EFORMAT, "%s: __metadata__ value of '%s' is not a string", src,
                           it->string ? it->string : "?");
        for (int j = 0; j < out->meta_count; j++)
            if (strcmp(out->meta_keys[j], it->string) == 0)
                return ar_fail(AR_EFORMAT, "%s: duplicate __metadata__ key '%s'", src, it->string);
        int k = out->meta_count;
        out->meta_keys[k] = dup_str(it->string);
        out->meta_values[k] = dup_str(it->valuestring);
        if (!out->meta_keys[k] || !out->meta_values[k]) {
            ar_free(out->meta_keys[k]);
            ar_free(out->meta_values[k]);
            out->meta_keys[k] = out->meta_values[k] = NULL;
            return AR_ENOMEM;
        }
        out->meta_count++;
    }
    return AR_OK;
}

static int parse_tensor(const cJSON *obj, ar_st_tensor *t, const char *data, uint64_t data_len,
                        const char *src)
{
    const char *name = obj->string;
    if (strlen(name) > ST_MAX_NAME)
        return ar_fail(AR_ELIMIT, "%s: tensor name of %zu bytes is longer than %d: '%.40s...'", src,
                       strlen(name), ST_MAX_NAME, name);
    memcpy(t->name, name, strlen(name) + 1);
    if (!cJSON_IsObject(obj))
        return ar_fail(AR_EFORMAT, "%s: tensor '%s' is not an object", src, name);

    const cJSON *dt = NULL, *shape = NULL, *offs = NULL, *it;
    cJSON_ArrayForEach(it, obj)
    {
        if (strcmp(it->string, "dtype") == 0 && !dt)
            dt = it;
        else if (strcmp(it->string, "shape") == 0 && !shape)
            shape = it;
        else if (strcmp(it->string, "data_offsets") == 0 && !offs)
            offs = it;
        else
            return ar_fail(AR_EFORMAT, "%s: tensor '%s': unexpected or repeated key '%s'", src,
                           name, it->string);
    }
    if (!dt || !shape || !offs)
        return ar_fail(AR_EFORMAT, "%s: tensor '%s': missing %s", src, name,
                       !dt ? "dtype" : !shape ? "shape" : "data_offsets");
    if (!cJSON_IsString(dt))
        return ar_fail(AR_EFORMAT, "%s: tensor '%s': dtype is not a string", src, name);
    t->dtype = dtype_from_name(dt->valuestring);
    if (t->dtype < 0)
        return ar_fail(AR_EFORMAT, "%s: tensor '%s': unsupported dtype '%.16s' (F32, I32, I64)",
                       src, name, dt->valuestring);

    if (!cJSON_IsArray(shape))
        return ar_fail(AR_EFORMAT, "%s: tensor '%s': shape is not an array", src, name);
    int nd = cJSON_GetArraySize(shape);
    if (nd > ST_MAX_NDIM)
        return ar_fail(AR_ELIMIT, "%s: tensor '%s' has %d dimensions (at most %d)", src, name, nd,
                       ST_MAX_NDIM);
    t->ndim = nd;
    /* elements x element size must stay below the data length, so we can
     * stop as soon as the running product passes it */
    uint64_t elems = 1;
    int overflow = 0;
    int i = 0;
    cJSON_ArrayForEach(it, shape)
    {
        uint64_t d;
        if (json_uint(it, &d))
            return ar_fail(AR_EFORMAT, "%s: tensor '%s': shape[%d] is not a nonnegative integer",
                           src, name, i);
        t->shape[i++] = (int64_t)d;
        if (d == 0)
            elems = 0;
        else if (!overflow && elems > 0) {
            if (elems > UINT64_MAX / d)
                overflow = 1;
            else
                elems *= d;
        }
    }
    if (elems == 0)
        overflow = 0;

    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2)
        return ar_fail(AR_EFORMAT, "%s: tensor '%s': data_offsets is not [begin, end]", src, name);
    uint64_t begin, end;
    if (json_uint(offs->child, &begin) || json_uint(offs->child->next, &end))
        return ar_fail(AR_EFORMAT, "%s: tensor '%s': data_offsets are not nonnegative integers",
                       src, name);
    if (begin > end || end > data_len)
        return ar_fail(AR_EFORMAT,
                       "%s: tensor '%s': data_offsets [%llu, %llu] outside the %llu data bytes", src,
                       name, (unsigned long long)begin, (unsigned long long)end,
                       (unsigned long long)data_len);
    size_t esz = dtype_sizes[t->dtype];
    if (overflow || elems > UINT64_MAX / esz || elems * esz != end - begin)
        return ar_fail(AR_EFORMAT,
                       "%s: tensor '%s': shape needs %s%llu bytes of %s but data_offsets span %llu",
                       src, name, overflow ? "more than " : "",
                       (unsigned long long)(overflow ? UINT64_MAX : elems * esz), dt->valuestring,
                       (unsigned long long)(end - begin));
    /* the data section starts 8-aligned (see align_header), so this keeps
     * every element naturally aligned for direct access */
    if (begin % esz != 0)
        return ar_fail(AR_EFORMAT, "%s: tensor '%s': offset %llu is not a multiple of %zu", src,
                       name, (unsigned long long)begin, esz);
    t->nbytes = (size_t)(end - begin);
    t->data = data + begin;
    return AR_OK;
}

/* Takes ownership of buf (an ar_calloc'd copy of the file, 8-aligned data
 * start). src names the input in messages. */
static int parse_owned(char *buf, size_t size, ar_st_file *out, const char *src)
{
    out->buffer = buf;
    out->size = size;
    if (size < 8)
        return ar_fail(AR_EFORMAT, "%s: %zu bytes, too short for the 8-byte header length", src,
                       size);
    uint64_t hlen = le64((const unsigned char *)buf);
    if (hlen > ST_MAX_HEADER)
        return ar_fail(AR_ELIMIT, "%s: header length %llu exceeds the 100 MiB limit", src,
                       (unsigned long long)hlen);
    if (hlen > size - 8)
        return ar_fail(AR_EFORMAT, "%s: header length %llu but only %zu bytes follow", src,
                       (unsigned long long)hlen, size - 8);
    if (hlen < 2 || buf[8] != '{')
        return ar_fail(AR_EFORMAT, "%s: header does not start with '{'", src);
    const char *data = buf + 8 + hlen;
    uint64_t data_len = size - 8 - hlen;

    const char *jend = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(buf + 8, (size_t)hlen, &jend, 0);
    if (!root)
        return ar_fail(AR_EFORMAT, "%s: header is not valid JSON (near byte %td)", src,
                       (cJSON_GetErrorPtr() ? cJSON_GetErrorPtr() - (buf + 8) : 0));
    int rc = AR_OK;
    /* after the JSON only padding spaces may follow */
    for (const char *p = jend; p < buf + 8 + hlen; p++)
        if (*p != ' ' && *p != '\n' && *p != '\t' && *p != '\r' && *p != '\0') {
            rc = ar_fail(AR_EFORMAT, "%s: unexpected bytes after the JSON header", src);
            goto done;
        }
    if (!cJSON_IsObject(root)) {
        rc = ar_fail(AR_EFORMAT, "%s: header is not a JSON object", src);
        goto done;
    }
    int n = cJSON_GetArraySize(root);
    out->tensors = ar_calloc(n > 0 ? (size_t)n : 1, sizeof(ar_st_tensor));
    if (!out->tensors) {
        rc = AR_ENOMEM;
        goto done;
    }
    int have_meta = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, root)
    {
        if (strcmp(it->string, "__metadata__") == 0) {
            if (have_meta++) {
                rc = ar_fail(AR_EFORMAT, "%s: two __metadata__ entries", src);
                goto done;
            }
            rc = parse_metadata(it, out, src);
        } else {
            rc = parse_tensor(it, &out->tensors[out->count], data, data_len, src);
            if (rc == AR_OK)
                out->count++;
        }
        if (rc)
            goto done;
    }

    if (out->count > 1) {
        const ar_st_tensor **order = ar_calloc((size_t)out->count, sizeof *order);
        if (!order) {
            rc = AR_ENOMEM;
            goto done;
        }
        for (int i = 0; i < out->count; i++)
            order[i] = &out->tensors[i];
        qsort(order, (size_t)out->count, sizeof *order, cmp_name);
        for (int i = 1; i < out->count && !rc; i++)
            if (strcmp(order[i - 1]->name, order[i]->name) == 0)
                rc = ar_fail(AR_EFORMAT, "%s: duplicate tensor name '%s'", src, order[i]->name);
        if (!rc) {
            qsort(order, (size_t)out->count, sizeof *order, cmp_begin);
            /* sorted by begin: a tensor overlaps an earlier one iff it
             * begins before the furthest end seen so far; empty tensors
             * occupy no bytes and are skipped */
            const ar_st_tensor *far = NULL;
            for (int i = 0; i < out->count && !rc; i++) {
                const ar_st_tensor *b = order[i];
                if (!b->nbytes)
                    continue;
                const char *bb = b->data;
                if (far && (const char *)far->data + far->nbytes > bb)
                    rc = ar_fail(AR_EFORMAT, "%s: tensors '%s' and '%s' overlap", src, far->name,
                                 b->name);
                else if (!far || bb + b->nbytes > (const char *)far->data + far->nbytes)
                    far = b;
            }
        }
        ar_free(order);
    }
done:
    cJSON_Delete(root);
    return rc;
}

/* Copy the file so that the data section starts 8-aligned: if the header
 * length is not a multiple of 8 (files from other writers), pad the header
 * with spaces, which leaves the meaning unchanged. */
static char *align_copy(const void *data, size_t size, size_t *new_size)
{
    size_t pad = 0;
    if (size >= 8) {
        uint64_t hlen = le64(data);
        if (hlen <= ST_MAX_HEADER && hlen <= size - 8)
            pad = (8 - (8 + hlen) % 8) % 8;
        if (pad) {
            char *b = ar_calloc(size + pad + 1, 1);
            if (!b)
                return NULL;
            put_le64((unsigned char *)b, hlen + pad);
            memcpy(b + 8, (const char *)data + 8, hlen);
            memset(b + 8 + hlen, ' ', pad);
            memcpy(b + 8 + hlen + pad, (const char *)data + 8 + hlen, size - 8 - hlen);
            *new_size = size + pad;
            return b;
        }
    }
    char *b = ar_calloc(size + 1, 1);
    if (!b)
        return NULL;
    if (size)
        memcpy(b, data, size);
    *new_size = size;
    return b;
}

int ar_st_parse(const void *data, size_t size, ar_st_file *out)
{
    if (!out)
        return ar_fail(AR_EINVAL, "ar_st_parse: out is NULL");
    memset(out, 0, sizeof *out);
    if (!data && size)
        return ar_fail(AR_EINVAL, "ar_st_parse: data is NULL");
    size_t n;
    char *buf = align_copy(data, size, &n);
    if (!buf)
        return AR_ENOMEM;
    int rc = parse_owned(buf, n, out, "safetensors buffer");
    if (rc)
        ar_st_free(out);
    return rc;
}

int ar_st_load(const char *path, ar_st_file *out)
{
    if (!out)
        return ar_fail(AR_EINVAL, "ar_st_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!path)
        return ar_fail(AR_EINVAL, "ar_st_load: path is NULL");
    char *buf;
    size_t size;
    int rc = ar_read_file(path, &buf, &size);
    if (rc)
        return rc;
    if (size >= 8 && le64((unsigned char *)buf) % 8 != 0) {
        size_t n;
        char *b = align_copy(buf, size, &n);
        ar_free(buf);
        if (!b)
            return AR_ENOMEM;
        buf = b;
        size = n;
    }
    rc = parse_owned(buf, size, out, path);
    if (rc)
        ar_st_free(out);
    return rc;
}

const ar_st_tensor *ar_st_find(const ar_st_file *f, const char *name)
{
    if (!f || !name)
        return NULL;
    for (int i = 0; i < f->count; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    return NULL;
}

const char *ar_st_meta(const ar_st_file *f, const char *key)
{
    if (!f || !key)
        return NULL;
    for (int i = 0; i < f->meta_count; i++)
        if (strcmp(f->meta_keys[i], key) == 0)
            return f->meta_values[i];
    return NULL;
}

void ar_st_free(ar_st_file *f)
{
    if (!f)
        return;
    for (int i = 0; i < f->meta_count; i++) {
        ar_free(f->meta_keys[i]);
        ar_free(f->meta_values[i]);
    }
    ar_free(f->meta_keys);
    ar_free(f->meta_values);
    ar_free(f->tensors);
    ar_free(f->buffer);
    memset(f, 0, sizeof *f);
}

/* ---- writer -------------------------------------------------------------- */

static int check_tensor(const ar_st_tensor *t, int i, const char *path, uint64_t *nbytes)
{
    size_t nl = strnlen(t->name, sizeof t->name);
    if (nl == 0 || nl > ST_MAX_NAME)
        return ar_fail(AR_EINVAL, "%s: tensor %d has an empty or unterminated name", path, i);
    if (strcmp(t->name, "__metadata__") == 0)
        return ar_fail(AR_EINVAL, "%s: a tensor may not be called __metadata__", path);
    if (t->dtype < 0 || t->dtype > AR_I64)
        return ar_fail(AR_EINVAL, "%s: tensor '%s' has unknown dtype %d", path, t->name, t->dtype);
    if (t->ndim < 0 || t->ndim > ST_MAX_NDIM)
        return ar_fail(AR_EINVAL, "%s: tensor '%s' has %d dimensions (0 to %d)", path, t->name,
                       t->ndim, ST_MAX_NDIM);
    uint64_t elems = 1;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0)
            return ar_fail(AR_EINVAL, "%s: tensor '%s' has negative shape[%d]", path, t->name, d);
        uint64_t s = (uint64_t)t->shape[d];
        if (s >= 1000000000000000ULL)
            return ar_fail(AR_ELIMIT, "%s: tensor '%s': shape[%d] too large", path, t->name, d);
        if (s != 0 && elems > UINT64_MAX / 8 / s)
            return ar_fail(AR_ELIMIT, "%s: tensor '%s' is too large", path, t->name);
        elems *= s;
    }
    uint64_t want = elems * dtype_sizes[t->dtype];
    if (want != t->nbytes)
        return ar_fail(AR_ESHAPE, "%s: tensor '%s': shape needs %llu bytes, nbytes is %zu", path,
                       t->name, (unsigned long long)want, t->nbytes);
    if (t->nbytes && !t->data)
        return ar_fail(AR_EINVAL, "%s: tensor '%s' has no data", path, t->name);
    *nbytes = want;
    return AR_OK;
}

int ar_st_save(const char *path, const ar_st_tensor *tensors, int count, const char *const *meta_keys,
               const char *const *meta_values, int meta_count)
{
    if (!path || count < 0 || (count > 0 && !tensors) || meta_count < 0 ||
        (meta_count > 0 && (!meta_keys || !meta_values)))
        return ar_fail(AR_EINVAL, "ar_st_save: bad arguments");
    int rc = AR_OK;
    char *json = NULL, *file = NULL;
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return ar_fail(AR_ENOMEM, "%s: out of memory building the header", path);

    if (meta_count > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        if (!meta)
            goto nomem;
        for (int i = 0; i < meta_count; i++) {
            if (!meta_keys[i] || !meta_values[i]) {
                rc = ar_fail(AR_EINVAL, "%s: metadata pair %d is NULL", path, i);
                goto done;
            }
            for (int j = 0; j < i; j++)
                if (strcmp(meta_keys[i], meta_keys[j]) == 0) {
                    rc = ar_fail(AR_EINVAL, "%s: duplicate metadata key '%s'", path, meta_keys[i]);
                    goto done;
                }
            if (!cJSON_AddStringToObject(meta, meta_keys[i], meta_values[i]))
                goto nomem;
        }
    }
    uint64_t offset = 0;
    for (int i = 0; i < count; i++) {
        const ar_st_tensor *t = &tensors[i];
        uint64_t nb = 0;
        rc = check_tensor(t, i, path, &nb);
        if (rc)
            goto done;
        for (int j = 0; j < i; j++)
            if (strcmp(tensors[j].name, t->name) == 0) {
                rc = ar_fail(AR_EINVAL, "%s: duplicate tensor name '%s'", path, t->name);
                goto done;
            }
        cJSON *o = cJSON_AddObjectToObject(root, t->name);
        if (!o || !cJSON_AddStringToObject(o, "dtype", dtype_names[t->dtype]))
            goto nomem;
        cJSON *shape = cJSON_AddArrayToObject(o, "shape");
        if (!shape)
            goto nomem;
        for (int d = 0; d < t->ndim; d++) {
            cJSON *v = cJSON_CreateNumber((double)t->shape[d]);
            if (!v || !cJSON_AddItemToArray(shape, v)) {
                cJSON_Delete(v);
                goto nomem;
            }
        }
        cJSON *offs = cJSON_AddArrayToObject(o, "data_offsets");
        if (!offs)
            goto nomem;
        double ov[2] = {(double)offset, (double)(offset + nb)};
        for (int k = 0; k < 2; k++) {
            cJSON *v = cJSON_CreateNumber(ov[k]);
            if (!v || !cJSON_AddItemToArray(offs, v)) {
                cJSON_Delete(v);
                goto nomem;
            }
        }
        offset += nb;
        /* below 10^15 cJSON prints the offsets as plain integers */
        if (offset >= 1000000000000000ULL) {
            rc = ar_fail(AR_ELIMIT, "%s: tensors too large", path);
            goto done;
        }
    }
    json = cJSON_PrintUnformatted(root);
    if (!json)
        goto nomem;
    size_t jlen = strlen(json);
    size_t hlen = (jlen + 7) / 8 * 8; /* 8 + hlen is then a multiple of 8 too */
    if (hlen > ST_MAX_HEADER) {
        rc = ar_fail(AR_ELIMIT, "%s: header of %zu bytes exceeds 100 MiB", path, hlen);
        goto done;
    }
    if (offset > SIZE_MAX - 8 - hlen) {
        rc = ar_fail(AR_ELIMIT, "%s: file too large", path);
        goto done;
    }
    size_t total = 8 + hlen + (size_t)offset;
    file = ar_calloc(total, 1);
    if (!file) {
        rc = AR_ENOMEM;
        goto done;
    }
    put_le64((unsigned char *)file, hlen);
    memcpy(file + 8, json, jlen);
    memset(file + 8 + jlen, ' ', hlen - jlen);
    char *p = file + 8 + hlen;
    /* Host order is written as is: every platform we build for is little-endian. */
    for (int i = 0; i < count; i++) {
        if (tensors[i].nbytes)
            memcpy(p, tensors[i].data, tensors[i].nbytes);
        p += tensors[i].nbytes;
    }
    rc = ar_write_file_atomic(path, file, total);
    goto done;
nomem:
    rc = ar_fail(AR_ENOMEM, "%s: out of memory building the header", path);
done:
    cJSON_free(json);
    cJSON_Delete(root);
    ar_free(file);
    return rc;
}
