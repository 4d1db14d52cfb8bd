/* tar_pack: a batch of samples appended to an open shard as tar members, without the GIL.
 *
 * What tensorsink.shards.writer's Python twin (_append) does per sample, here per batch: each member's
 * header (ustar, or pax first for a name over 100 bytes or not ASCII), its CRC-32, the shard's running
 * CRC, the gathered writes, and the sample's entry in the shard's journal line. Every sample of a batch
 * has the same members: a suffix, a header made once by the format, and a slice of each array's rows.
 */
#include "engine.h"

#include <limits.h>
#include <sys/uio.h>

#include "crc.h"

#define BLOCK 512
#define NAME_LIMIT 100
#define CHUNK 128 /* samples whose headers and writes are gathered at once, at most ... */
#define CHUNK_BYTES (512 << 10) /* ... and about this much data: still in cache when written after its CRC */
#define USTAR_SIZE_LIMIT (1ULL << 33) /* 8 GiB: what an 11-digit octal size field holds */

typedef struct {
    const char *suffix;
    Py_ssize_t suffix_length;
    const char *header;
    Py_ssize_t header_length;
    Py_ssize_t parts;
    Py_buffer *views;
    Py_ssize_t *strides;
    unsigned long long size; /* of each sample's member */
} Group;

typedef struct {
    char *data;
    size_t length, capacity;
} Text;

static const unsigned char zeros[BLOCK];

static int text_reserve(Text *t, size_t more) {
    if (t->length + more <= t->capacity) return 0;
    size_t capacity = t->capacity ? t->capacity : 4096;
    while (capacity < t->length + more) capacity *= 2;
    char *data = realloc(t->data, capacity);
    if (!data) return -1;
    t->data = data, t->capacity = capacity;
    return 0;
}

/* A JSON string as json.dumps writes it (ensure_ascii): non-ASCII text as \u escapes, surrogate
 * pairs above U+FFFF. `s` is valid UTF-8 (CPython's own encoding of a str); at most 6 bytes out per
 * byte in. */
static char *put_json(char *at, const char *s, Py_ssize_t n) {
    static const char short_escapes[32] = {['\b'] = 'b', ['\f'] = 'f', ['\n'] = 'n', ['\r'] = 'r', ['\t'] = 't'};
    *at++ = '"';
    for (Py_ssize_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        unsigned long code;
        int length;
        if (c < 0x80) {
            i++;
            if (c == '"' || c == '\\') *at++ = '\\', *at++ = (char)c;
            else if (c < 0x20 && short_escapes[c]) *at++ = '\\', *at++ = short_escapes[c];
            else if (c < 0x20 || c == 0x7f) *at++ = '\\', *at++ = 'u', at = put_hexadecimal(at, c, 4);
            else *at++ = (char)c;
            continue;
        }
        if (c >= 0xf0) code = c & 0x07, length = 4;
        else if (c >= 0xe0) code = c & 0x0f, length = 3;
        else code = c & 0x1f, length = 2;
        for (int k = 1; k < length && i + k < n; k++) code = code << 6 | ((unsigned char)s[i + k] & 0x3f);
        i += length;
        if (code >= 0x10000) {
            code -= 0x10000;
            *at++ = '\\', *at++ = 'u', at = put_hexadecimal(at, 0xd800 | (code >> 10), 4);
            code = 0xdc00 | (code & 0x3ff);
        }
        *at++ = '\\', *at++ = 'u', at = put_hexadecimal(at, code, 4);
    }
    *at++ = '"';
    return at;
}

static void put_octal(unsigned char *field, unsigned long long value, int digits) {
    char *end = put_digits((char *)field, value, digits, 8);
    *end = '\0';
}

/* One ustar block for `name` (cut to 100 bytes), of `size` bytes, of type `kind`. */
static void ustar(unsigned char *block, const char *name, size_t name_length, unsigned long long size,
                  long long mtime, char kind) {
    memset(block, 0, BLOCK);
    memcpy(block, name, name_length < NAME_LIMIT ? name_length : NAME_LIMIT);
    memcpy(block + 100, "0000644", 8);
    memcpy(block + 108, "0000000", 8);
    memcpy(block + 116, "0000000", 8);
    put_octal(block + 124, size < USTAR_SIZE_LIMIT ? size : 0, 11);
    put_octal(block + 136, (unsigned long long)mtime, 11);
    memset(block + 148, ' ', 8);
    block[156] = (unsigned char)kind;
    memcpy(block + 257, "ustar\0" "00", 8);
    unsigned sum = 0;
    for (int i = 0; i < BLOCK; i++) sum += block[i];
    char *end = put_digits((char *)block + 148, sum, 6, 8);
    end[0] = '\0', end[1] = ' ';
}

/* The length of the pax record "<length> path=<name>\n", which counts its own digits. */
static size_t pax_record_length(size_t name_length) {
    size_t body = 7 + name_length, length = body + 1;
    for (;;) {
        size_t digits = 1;
        for (size_t v = length; v >= 10; v /= 10) digits++;
        if (digits + body == length) return length;
        length = digits + body;
    }
}

static int plain_name(const char *key, Py_ssize_t key_length, const Group *g) {
    if (key_length + 1 + g->suffix_length > NAME_LIMIT) return 0;
    for (Py_ssize_t i = 0; i < key_length; i++)
        if ((unsigned char)key[i] >= 0x80) return 0;
    return 1;
}

/* Bytes of header blocks a member needs. */
static size_t header_bytes(const char *key, Py_ssize_t key_length, const Group *g) {
    if (plain_name(key, key_length, g)) return BLOCK;
    size_t records = pax_record_length((size_t)key_length + 1 + (size_t)g->suffix_length);
    return BLOCK + (records + BLOCK - 1) / BLOCK * BLOCK + BLOCK;
}

/* Fill a member's header blocks at `at` (header_bytes() of them). */
static void fill_header(unsigned char *at, const char *key, Py_ssize_t key_length, const Group *g,
                        long long mtime) {
    char name[NAME_LIMIT];
    size_t name_length = (size_t)key_length + 1 + (size_t)g->suffix_length;
    if (plain_name(key, key_length, g)) {
        memcpy(name, key, (size_t)key_length);
        name[key_length] = '.';
        memcpy(name + key_length + 1, g->suffix, (size_t)g->suffix_length);
        ustar(at, name, name_length, g->size, mtime, '0');
        return;
    }
    size_t records = pax_record_length(name_length);
    size_t padded = (records + BLOCK - 1) / BLOCK * BLOCK;
    ustar(at, "././@PaxHeader", 14, records, mtime, 'x');
    unsigned char *r = at + BLOCK;
    memset(r, 0, padded);
    char *p = put_decimal((char *)r, records, 1);
    memcpy(p, " path=", 6), p += 6;
    memcpy(p, key, (size_t)key_length), p += key_length;
    *p++ = '.';
    memcpy(p, g->suffix, (size_t)g->suffix_length), p += g->suffix_length;
    *p = '\n';
    /* The ustar name: the first 100 bytes, non-ASCII bytes as '?' (what tarfile writes). */
    size_t cut = name_length < NAME_LIMIT ? name_length : NAME_LIMIT;
    for (size_t i = 0; i < cut; i++) {
        unsigned char c = i < (size_t)key_length ? (unsigned char)key[i]
                          : i == (size_t)key_length ? '.'
                                                    : (unsigned char)g->suffix[i - (size_t)key_length - 1];
        name[i] = c >= 0x80 ? '?' : (char)c;
    }
    ustar(at + BLOCK + padded, name, cut, g->size, mtime, '0');
}

static int write_vectors(int fd, struct iovec *v, int n) {
    while (n > 0) {
        int batch = n < IOV_MAX ? n : IOV_MAX;
        ssize_t wrote = writev(fd, v, batch);
        if (wrote < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        while (batch && (size_t)wrote >= v->iov_len) wrote -= (ssize_t)v->iov_len, v++, n--, batch--;
        if (wrote) v->iov_base = (char *)v->iov_base + wrote, v->iov_len -= (size_t)wrote;
    }
    return 0;
}

typedef struct {
    int fd;
    long long mtime;
    unsigned long long size;
    uint32_t crc;
    Py_ssize_t count, groups;
    const char **keys;
    Py_ssize_t *key_lengths, *rows;
    Group *group;
    Text journal;
    int error; /* errno, or -1 out of memory */
} Pack;

static void pack_samples(Pack *k) {
    size_t vectors = 0, journal_per_sample = 16; /* per sample */
    for (Py_ssize_t m = 0; m < k->groups; m++) {
        vectors += 3 + (size_t)k->group[m].parts;
        journal_per_sample += 6 * (size_t)k->group[m].suffix_length + 80;
    }
    struct iovec *v = malloc(sizeof *v * vectors * CHUNK);
    if (!v) { k->error = -1; return; }
    unsigned long long sample_bytes = 1;
    for (Py_ssize_t m = 0; m < k->groups; m++) sample_bytes += k->group[m].size;
    Py_ssize_t per_chunk = sample_bytes >= CHUNK_BYTES ? 1 : (Py_ssize_t)(CHUNK_BYTES / sample_bytes);
    if (per_chunk > CHUNK) per_chunk = CHUNK;
    for (Py_ssize_t first = 0; first < k->count && !k->error; first += per_chunk) {
        Py_ssize_t last = first + per_chunk < k->count ? first + per_chunk : k->count;
        size_t arena_length = 0;
        for (Py_ssize_t s = first; s < last; s++)
            for (Py_ssize_t j = 0; j < k->groups; j++)
                arena_length += header_bytes(k->keys[s], k->key_lengths[s], &k->group[j]);
        unsigned char *arena = malloc(arena_length);
        if (!arena) { k->error = -1; break; }
        unsigned char *at = arena;
        int n = 0;
        for (Py_ssize_t s = first; s < last; s++) {
            const char *key = k->keys[s];
            Py_ssize_t key_length = k->key_lengths[s];
            if (text_reserve(&k->journal, journal_per_sample + 6 * (size_t)key_length)) {
                k->error = -1;
                break;
            }
            char *j = k->journal.data + k->journal.length;
            if (k->journal.length) *j++ = ',';
            *j++ = '[', j = put_json(j, key, key_length), *j++ = ',', *j++ = '[';
            for (Py_ssize_t m = 0; m < k->groups; m++) {
                const Group *g = &k->group[m];
                size_t header = header_bytes(key, key_length, g);
                fill_header(at, key, key_length, g, k->mtime);
                uint32_t member = crc_update(0, (const unsigned char *)g->header, (size_t)g->header_length);
                v[n++] = (struct iovec){at, header};
                if (g->header_length) v[n++] = (struct iovec){(void *)g->header, (size_t)g->header_length};
                for (Py_ssize_t p = 0; p < g->parts; p++) {
                    const unsigned char *row = (const unsigned char *)g->views[p].buf + k->rows[s] * g->strides[p];
                    member = crc_update(member, row, (size_t)g->strides[p]);
                    if (g->strides[p]) v[n++] = (struct iovec){(void *)row, (size_t)g->strides[p]};
                }
                size_t padding = (size_t)(-g->size % BLOCK);
                if (padding) v[n++] = (struct iovec){(void *)zeros, padding};
                unsigned long long offset = k->size + header;
                k->crc = crc_update(k->crc, at, header);
                k->crc = crc_combine(k->crc, member, g->size);
                k->crc = crc_update(k->crc, zeros, padding);
                k->size = offset + g->size + padding;
                at += header;
                if (m) *j++ = ',';
                *j++ = '[', j = put_json(j, g->suffix, g->suffix_length), *j++ = ',';
                j = put_decimal(j, offset, 1), *j++ = ',';
                j = put_decimal(j, g->size, 1), *j++ = ',', *j++ = '"';
                j = put_hexadecimal(j, member, 8), *j++ = '"', *j++ = ']';
            }
            *j++ = ']', *j++ = ']';
            k->journal.length = (size_t)(j - k->journal.data);
        }
        if (!k->error && write_vectors(k->fd, v, n) < 0) k->error = errno ? errno : EIO;
        free(arena);
    }
    free(v);
}

/* tar_pack(fd, size, crc, mtime, keys, rows, groups) -> (size, crc, journal): append sample i (keys[i],
 * row rows[i] of each array) as one member per group, groups being (suffix, header, [(buffer, stride)]);
 * `size` and `crc` are the shard's so far. `journal` is the samples' entries, comma-separated. */
PyObject *tar_pack(PyObject *module, PyObject *args) {
    (void)module;
    Pack k = {0};
    unsigned int crc;
    PyObject *keys, *rows, *groups;
    if (!PyArg_ParseTuple(args, "iKILO!O!O!", &k.fd, &k.size, &crc, &k.mtime, &PyList_Type, &keys,
                          &PyList_Type, &rows, &PyTuple_Type, &groups))
        return NULL;
    k.crc = crc;
    k.count = PyList_GET_SIZE(keys);
    k.groups = PyTuple_GET_SIZE(groups);
    if (PyList_GET_SIZE(rows) != k.count) return PyErr_Format(PyExc_ValueError, "one row per key");
    PyObject *result = NULL;
    k.keys = PyMem_Calloc((size_t)k.count + 1, sizeof *k.keys);
    k.key_lengths = PyMem_Calloc((size_t)k.count + 1, sizeof *k.key_lengths);
    k.rows = PyMem_Calloc((size_t)k.count + 1, sizeof *k.rows);
    k.group = PyMem_Calloc((size_t)k.groups + 1, sizeof *k.group);
    Py_ssize_t made = 0; /* groups whose views are taken */
    if (!k.keys || !k.key_lengths || !k.rows || !k.group) {
        PyErr_NoMemory();
        goto done;
    }
    for (; made < k.groups; made++) {
        Group *g = &k.group[made];
        PyObject *parts;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(groups, made), "y#y#O!", &g->suffix, &g->suffix_length,
                              &g->header, &g->header_length, &PyList_Type, &parts))
            goto done;
        g->parts = PyList_GET_SIZE(parts);
        g->views = PyMem_Calloc((size_t)g->parts + 1, sizeof *g->views);
        g->strides = PyMem_Calloc((size_t)g->parts + 1, sizeof *g->strides);
        if (!g->views || !g->strides) {
            PyErr_NoMemory();
            made++;
            goto done;
        }
        g->size = (unsigned long long)g->header_length;
        for (Py_ssize_t p = 0; p < g->parts; p++) {
            PyObject *view, *part = PyList_GET_ITEM(parts, p);
            if (!PyArg_ParseTuple(part, "On", &view, &g->strides[p]) ||
                PyObject_GetBuffer(view, &g->views[p], PyBUF_SIMPLE) < 0) {
                g->parts = p;
                made++;
                goto done;
            }
            g->size += (unsigned long long)g->strides[p];
        }
        if (g->size >= USTAR_SIZE_LIMIT) {
            PyErr_SetString(PyExc_ValueError, "a member of 8 GiB or more: the Python packer writes it");
            made++;
            goto done;
        }
    }
    for (Py_ssize_t s = 0; s < k.count; s++) {
        k.keys[s] = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(keys, s), &k.key_lengths[s]);
        k.rows[s] = PyLong_AsSsize_t(PyList_GET_ITEM(rows, s));
        if (!k.keys[s] || (k.rows[s] == -1 && PyErr_Occurred())) goto done;
        for (Py_ssize_t m = 0; m < k.groups; m++)
            for (Py_ssize_t p = 0; p < k.group[m].parts; p++)
                if (k.rows[s] < 0 || (k.rows[s] + 1) * k.group[m].strides[p] > k.group[m].views[p].len) {
                    PyErr_Format(PyExc_IndexError, "row %zd is outside the batch", k.rows[s]);
                    goto done;
                }
    }
    Py_BEGIN_ALLOW_THREADS
    pack_samples(&k);
    Py_END_ALLOW_THREADS
    if (k.error == -1) {
        PyErr_NoMemory();
        goto done;
    }
    if (k.error) {
        errno = k.error;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = Py_BuildValue("KIy#", k.size, (unsigned int)k.crc, k.journal.data ? k.journal.data : "",
                           (Py_ssize_t)k.journal.length);
done:
    for (Py_ssize_t m = 0; m < made; m++) {
        for (Py_ssize_t p = 0; p < k.group[m].parts; p++) PyBuffer_Release(&k.group[m].views[p]);
        PyMem_Free(k.group[m].views);
        PyMem_Free(k.group[m].strides);
    }
    free(k.journal.data);
    PyMem_Free(k.keys);
    PyMem_Free(k.key_lengths);
    PyMem_Free(k.rows);
    PyMem_Free(k.group);
    return result;
}
