/* The plain route: write(key, value) of one host array into .npy or .safetensors, in one call that runs
 * no Python code. The key is checked, the file and its temporary named, the header and the journal
 * record built here, and the file queued as write_ready() queues it; the threads do the rest.
 *
 * It decides only what is plainly fine: a printable ASCII key without quotes or backslashes, a
 * torch.Tensor or numpy.ndarray (not a subclass) whose bytes are C-contiguous host memory in a dtype
 * the format stores, a folder the caller's check has seen. Anything else gets None, and the writer's
 * Python plan (tensorsink.plan, the formats) decides it by the same rules, raising where one is broken;
 * a property test holds the two to the same paths, temporaries' form, headers and records. */
#include "engine.h"

#include "crc.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the plain route writes little-endian headers for native arrays: a big-endian build needs its own"
#endif

#define NAME_MAX_BYTES 255 /* plan._NAME_MAX */
#define PATH_MAX_BYTES 4095 /* plan._PATH_MAX */
#define TEMPORARY_EXTRA 48 /* plan._TEMPORARY_EXTRA */
#define NAME_KEPT 200 /* commit._NAME_KEPT */
#define JOURNAL_DIR ".tensorsink"

static const char *const SUFFIX[] = {"", ".npy", ".safetensors", ".pt"};
static const char *const FORMAT_NAME[] = {"", "npy", "safetensors", "pt"};

/* ---- Text ------------------------------------------------------------------------------------------ */

typedef struct {
    char *data;
    size_t length, capacity;
    int failed; /* out of memory: every later put is ignored */
} Text;

static void put(Text *t, const char *s, size_t n) {
    if (t->failed) return;
    if (t->length + n + 1 > t->capacity) {
        size_t capacity = (t->length + n + 1) * 2;
        char *grown = realloc(t->data, capacity);
        if (!grown) { t->failed = 1; return; }
        t->data = grown;
        t->capacity = capacity;
    }
    memcpy(t->data + t->length, s, n);
    t->length += n;
    t->data[t->length] = '\0';
}

static void put_text(Text *t, const char *s) { put(t, s, strlen(s)); }

/* A number in decimal or hex (engine.h's put_digits: no printf on this path). */
static void put_int(Text *t, unsigned long long value) {
    char digits[24];
    put(t, digits, (size_t)(put_decimal(digits, value, 1) - digits));
}

static void put_hex(Text *t, unsigned long long value) {
    char digits[24];
    put(t, digits, (size_t)(put_hexadecimal(digits, value, 1) - digits));
}

/* The shape as Python's repr() of a tuple writes it ("()", "(3,)", "(3, 4)"), or as JSON ("[3,4]"). */
static void put_shape(Text *t, const Py_buffer *view, int json) {
    put_text(t, json ? "[" : "(");
    for (int d = 0; d < view->ndim; d++) {
        if (d) put_text(t, json ? "," : ", ");
        put_int(t, (unsigned long long)view->shape[d]);
    }
    put_text(t, json ? "]" : (view->ndim == 1 ? ",)" : ")"));
}

/* ---- The rules ------------------------------------------------------------------------------------- */

/* 1 if `key` (n ASCII bytes) is plainly a key (plan.validate_key takes it as it is): printable, without
 * '"' or '\\' (so it is its own JSON text), relative, no empty, "." or ".." part, not under
 * .tensorsink/, no part over NAME_MAX bytes. 0: Python decides. */
static int plain_key(const char *key, Py_ssize_t n) {
    if (n == 0 || key[0] == '/' || key[n - 1] == '/') return 0;
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (i < n) {
            char c = key[i];
            if (c < 0x20 || c > 0x7e || c == '"' || c == '\\') return 0;
            if (c != '/') continue;
        }
        Py_ssize_t length = i - start;
        if (length == 0 || length > NAME_MAX_BYTES) return 0;
        if (key[start] == '.' && (length == 1 || (length == 2 && key[start + 1] == '.'))) return 0;
        if (start == 0 && length == (Py_ssize_t)strlen(JOURNAL_DIR) && !memcmp(key, JOURNAL_DIR, (size_t)length))
            return 0;
        start = i + 1;
    }
    return 1;
}

typedef struct {
    char descr[8];    /* numpy's ("<f4", "|b1") */
    const char *name; /* as users know it ("float32"): torch's and numpy's spelling agree for these */
    const char *tag;  /* safetensors' ("F32"), or NULL: it has none */
} Dtype;

/* The dtype of a buffer's format and item size, if it is one both formats' rules know plainly
 * (native or little-endian numbers and bools): 1, else 0. */
static int plain_dtype(const char *format, Py_ssize_t itemsize, Dtype *out) {
    static const char *const SIGNED[] = {"int8", "int16", "int32", "int64"}, *const SIGNED_TAG[] = {"I8", "I16", "I32", "I64"};
    static const char *const UNSIGNED[] = {"uint8", "uint16", "uint32", "uint64"},
                             *const UNSIGNED_TAG[] = {"U8", "U16", "U32", "U64"};
    if (*format == '<' || *format == '=' || *format == '@') format++;
    int complex = *format == 'Z';
    if (complex) format++;
    if (!format[0] || format[1]) return 0;
    int rank = itemsize == 1 ? 0 : itemsize == 2 ? 1 : itemsize == 4 ? 2 : itemsize == 8 ? 3 : itemsize == 16 ? 4 : -1;
    char kind;
    switch (format[0]) {
    case '?':
        if (complex || itemsize != 1) return 0;
        snprintf(out->descr, sizeof out->descr, "|b1");
        out->name = "bool";
        out->tag = "BOOL";
        return 1;
    case 'b': case 'h': case 'i': case 'l': case 'q': kind = 'i'; break;
    case 'B': case 'H': case 'I': case 'L': case 'Q': kind = 'u'; break;
    case 'e': case 'f': case 'd': kind = complex ? 'c' : 'f'; break;
    default: return 0;
    }
    if (complex && kind != 'c') return 0;
    if (kind == 'i' || kind == 'u') {
        if (rank < 0 || rank > 3) return 0;
        out->name = kind == 'i' ? SIGNED[rank] : UNSIGNED[rank];
        out->tag = kind == 'i' ? SIGNED_TAG[rank] : UNSIGNED_TAG[rank];
    } else if (kind == 'f') {
        if (rank < 1 || rank > 3) return 0;
        out->name = rank == 1 ? "float16" : rank == 2 ? "float32" : "float64";
        out->tag = rank == 1 ? "F16" : rank == 2 ? "F32" : "F64";
    } else {
        if (rank < 3) return 0;
        out->name = rank == 3 ? "complex64" : "complex128";
        out->tag = rank == 3 ? "C64" : NULL;
    }
    snprintf(out->descr, sizeof out->descr, itemsize == 1 ? "|%c%zd" : "<%c%zd", kind, itemsize);
    return 1;
}

/* ---- Headers --------------------------------------------------------------------------------------- */

static size_t padded(size_t size, size_t alignment) { return (size + alignment - 1) / alignment * alignment; }

/* formats.npy.npy_header(): numpy's dict text, padded with spaces so the data starts at `alignment`. */
static PyObject *npy_header(const Dtype *dtype, const Py_buffer *view, size_t alignment) {
    Text text = {0};
    put_text(&text, "{'descr': '");
    put_text(&text, dtype->descr);
    put_text(&text, "', 'fortran_order': False, 'shape': ");
    put_shape(&text, view, 0);
    put_text(&text, ", }");
    if (text.failed) { free(text.data); return PyErr_NoMemory(); }
    int version = padded(10 + text.length + 1, alignment) - 10 > 0xFFFF ? 2 : 1;
    size_t fixed = version == 1 ? 10 : 12, header_length = padded(fixed + text.length + 1, alignment) - fixed;
    PyObject *header = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(fixed + header_length));
    if (header) {
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(header);
        memcpy(out, "\x93NUMPY", 6);
        out[6] = (unsigned char)version;
        out[7] = 0;
        for (size_t i = 0; i < fixed - 8; i++) out[8 + i] = (unsigned char)(header_length >> (8 * i));
        memcpy(out + fixed, text.data, text.length);
        memset(out + fixed + text.length, ' ', header_length - text.length - 1);
        out[fixed + header_length - 1] = '\n';
    }
    free(text.data);
    return header;
}

/* formats.safetensors.safetensors_header() for one array named arr_0: the length, then the JSON. */
static PyObject *safetensors_header(const Dtype *dtype, const Py_buffer *view, size_t alignment) {
    Text text = {0};
    put_text(&text, "{\"__metadata__\":{\"format\":\"pt\"},\"arr_0\":{\"dtype\":\"");
    put_text(&text, dtype->tag);
    put_text(&text, "\",\"shape\":");
    put_shape(&text, view, 1);
    put_text(&text, ",\"data_offsets\":[0,");
    put_int(&text, (unsigned long long)view->len);
    put_text(&text, "]}}");
    if (text.failed) { free(text.data); return PyErr_NoMemory(); }
    size_t length = padded(8 + text.length, alignment) - 8;
    PyObject *header = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(8 + length));
    if (header) {
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(header);
        for (int i = 0; i < 8; i++) out[i] = (unsigned char)((uint64_t)length >> (8 * i));
        memcpy(out + 8, text.data, text.length);
        memset(out + 8 + text.length, ' ', length - text.length);
    }
    free(text.data);
    return header;
}

/* What a write's dtype and shape decide: its header, and its record's tail (after key and path). A
 * stream's outputs mostly share them, so the last one is kept (the formats' lru_cache, in C). */
struct Layout {
    char format[16];
    Py_ssize_t itemsize;
    int ndim;
    Py_ssize_t shape[PyBUF_MAX_NDIM];
    PyObject *header;  /* bytes: for .pt, the archive up to the storage */
    Text record_tail;  /* the file's suffix, format and arrays: '.npy","format":"npy","arrays":[[...]]' */
    Archive *archive;  /* .pt: the archive after the storage, to fill once the storage's CRC is known */
    int references;    /* the engine's cache and each call using it (with the GIL, which a call may
                        * give up meanwhile: another thread's call must not free it under this one) */
};

/* ---- .pt archives ---------------------------------------------------------------------------------- */

/* The archive after a plain tensor's storage in its .pt (formats.pt.PtTemplate): what its CRC decides
 * is left as holes, filled by the thread that writes the file (fill_archive). */
struct Archive {
    unsigned char *bytes;
    size_t length;
    uint32_t head_crc;        /* of the archive before the storage */
    uint64_t seed;            /* the serialization id's CRC hash over the records before the storage */
    uint32_t crcs_after[8];   /* the CRCs of the records between the storage and the id */
    int ncrcs_after;
    size_t payload_crc_at[2]; /* where the storage's CRC goes: its descriptor, its central entry */
    size_t id_at;             /* the id's 20 digits that the CRCs decide */
    size_t id_crc_at[2];      /* where the id record's CRC goes */
};

void archive_free(Archive *archive) {
    if (!archive) return;
    free(archive->bytes);
    free(archive);
}

/* A copy of `archive` for one file (its holes its own), or NULL: out of memory. */
static Archive *archive_copy(const Archive *archive) {
    Archive *copy = malloc(sizeof *copy);
    if (!copy) return NULL;
    *copy = *archive;
    copy->bytes = malloc(archive->length);
    if (!copy->bytes) { free(copy); return NULL; }
    memcpy(copy->bytes, archive->bytes, archive->length);
    return copy;
}

static void put_le32(unsigned char *at, uint32_t value) {
    for (int i = 0; i < 4; i++) at[i] = (unsigned char)(value >> (8 * i));
}

static uint64_t hash_combine(uint64_t seed, uint64_t value) { /* formats.pt._hash_combine */
    return seed ^ (value + 0x9E3779B9ull + (seed << 6) + (seed >> 2));
}

/* Fill the job's archive (its third view) from its storage's CRC (the second), and, if the file is
 * checksummed, take the whole file's CRC from the pieces' (no second pass over the storage). On the
 * writing thread, without the GIL. */
void fill_archive(Job *job) {
    Archive *archive = job->archive;
    const Py_buffer *storage = &job->views[1];
    uint32_t crc = crc_update(0, storage->buf, (size_t)storage->len);
    for (int i = 0; i < 2; i++) put_le32(archive->bytes + archive->payload_crc_at[i], crc);
    uint64_t hash = hash_combine(archive->seed, crc);
    for (int i = 0; i < archive->ncrcs_after; i++) hash = hash_combine(hash, archive->crcs_after[i]);
    for (int digit = 19; digit >= 0; digit--, hash /= 10) archive->bytes[archive->id_at + (size_t)digit] = (unsigned char)('0' + hash % 10);
    uint32_t id_crc = crc_update(0, archive->bytes + archive->id_at - 20, 40);
    for (int i = 0; i < 2; i++) put_le32(archive->bytes + archive->id_crc_at[i], id_crc);
    if (job->checksum) {
        uint32_t whole = crc_combine(archive->head_crc, crc, (uint64_t)storage->len);
        job->crc = crc_update(whole, archive->bytes, archive->length);
        job->checksum = 0; /* known */
    }
}

/* Whether `array`'s own strides (its `strides`, not the buffer's: numpy tidies those on dimensions of
 * one) are a C-contiguous array's of the view's shape: a .pt records the strides, and its template
 * was made with these. 1, 0, or -1 with an exception set. */
static int canonical_strides(PyObject *array, const Py_buffer *view) {
    PyObject *strides = PyObject_GetAttrString(array, "strides");
    if (!strides) return -1;
    int canonical = PyTuple_Check(strides) && PyTuple_GET_SIZE(strides) == view->ndim;
    Py_ssize_t stride = view->itemsize;
    for (int d = view->ndim - 1; canonical && d >= 0; d--) {
        Py_ssize_t own = PyLong_AsSsize_t(PyTuple_GET_ITEM(strides, d));
        if (own == -1 && PyErr_Occurred()) { Py_DECREF(strides); return -1; }
        canonical = own == stride;
        stride *= view->shape[d];
    }
    Py_DECREF(strides);
    return canonical;
}

static int in_range(Py_ssize_t at, size_t width, size_t length) { return at >= 0 && (size_t)at + width <= length; }

/* The .pt layout of `made` from Python's template (formats.pt.pt_template(dtype, shape)): 1, 0 (no
 * template: Python writes it), or -1 with an exception set. */
static int pt_layout(Engine *e, const Dtype *dtype, const Py_buffer *view, Layout *made) {
    PyObject *shape = PyTuple_New(view->ndim);
    if (!shape) return -1;
    for (int d = 0; d < view->ndim; d++) {
        PyObject *size = PyLong_FromSsize_t(view->shape[d]);
        if (!size) { Py_DECREF(shape); return -1; }
        PyTuple_SET_ITEM(shape, d, size);
    }
    PyObject *template = PyObject_CallFunction(e->pt_template, "sN", dtype->name, shape);
    if (!template) return -1;
    if (template == Py_None) { Py_DECREF(template); return 0; }
    PyObject *head, *tail, *crcs_after;
    unsigned long head_crc;
    unsigned long long seed;
    Py_ssize_t payload_at[2], id_at, id_crc_at[2];
    Archive *archive = calloc(1, sizeof(Archive));
    int ok = archive && PyArg_ParseTuple(template, "SSkKO!(nn)n(nn)", &head, &tail, &head_crc, &seed, &PyTuple_Type,
                                         &crcs_after, &payload_at[0], &payload_at[1], &id_at, &id_crc_at[0],
                                         &id_crc_at[1]);
    if (ok) {
        size_t length = (size_t)PyBytes_GET_SIZE(tail);
        archive->ncrcs_after = (int)PyTuple_GET_SIZE(crcs_after);
        ok = archive->ncrcs_after <= 8 && in_range(payload_at[0], 4, length) && in_range(payload_at[1], 4, length) &&
             id_at >= 20 && in_range(id_at, 20, length) && in_range(id_crc_at[0], 4, length) &&
             in_range(id_crc_at[1], 4, length);
        if (!ok) PyErr_SetString(PyExc_ValueError, "a .pt template's holes lie outside its tail");
        for (int i = 0; ok && i < archive->ncrcs_after; i++) {
            archive->crcs_after[i] = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(crcs_after, i));
            ok = !PyErr_Occurred();
        }
        archive->bytes = ok ? malloc(length) : NULL;
        if (ok && !archive->bytes) { PyErr_NoMemory(); ok = 0; }
        if (ok) {
            memcpy(archive->bytes, PyBytes_AS_STRING(tail), length);
            archive->length = length;
            archive->head_crc = (uint32_t)head_crc;
            archive->seed = seed;
            archive->payload_crc_at[0] = (size_t)payload_at[0];
            archive->payload_crc_at[1] = (size_t)payload_at[1];
            archive->id_at = (size_t)id_at;
            archive->id_crc_at[0] = (size_t)id_crc_at[0];
            archive->id_crc_at[1] = (size_t)id_crc_at[1];
            made->header = Py_NewRef(head);
            made->archive = archive;
        }
    } else if (!archive) {
        PyErr_NoMemory();
    }
    Py_DECREF(template);
    if (!ok) { archive_free(archive); return -1; }
    return 1;
}

/* ---- Layouts -------------------------------------------------------------------------------------- */


static void layout_free(Layout *layout) {
    if (!layout) return;
    Py_XDECREF(layout->header);
    free(layout->record_tail.data);
    archive_free(layout->archive);
    free(layout);
}

/* Give up a reference to a layout (with the GIL). */
static void layout_release(Layout *layout) {
    if (layout && --layout->references == 0) layout_free(layout);
}

static int same_layout(const Layout *layout, const Py_buffer *view, const char *format) {
    return layout && layout->itemsize == view->itemsize && layout->ndim == view->ndim &&
           !strcmp(layout->format, format) &&
           !memcmp(layout->shape, view->shape, (size_t)view->ndim * sizeof(Py_ssize_t));
}

/* The layout of the array `view` shows, for the engine's plain format (a reference: layout_release
 * it); `*status` 1, or 0 (a dtype Python decides) or -1 (an exception set), with NULL. */
static Layout *layout_of(Engine *e, const Py_buffer *view, int *status) {
    const char *format = view->format ? view->format : "B";
    *status = 1;
    if (same_layout(e->plain_layout, view, format)) {
        e->plain_layout->references++;
        return e->plain_layout;
    }
    Dtype dtype;
    *status = 0;
    if (strlen(format) >= sizeof e->plain_layout->format || !plain_dtype(format, view->itemsize, &dtype) ||
        (e->plain_format == PLAIN_SAFETENSORS && !dtype.tag))
        return NULL;
    *status = -1;
    Layout *made = calloc(1, sizeof(Layout));
    if (!made) { PyErr_NoMemory(); return NULL; }
    strcpy(made->format, format);
    made->itemsize = view->itemsize;
    made->ndim = view->ndim;
    memcpy(made->shape, view->shape, (size_t)view->ndim * sizeof(Py_ssize_t));
    Text *tail = &made->record_tail; /* manifest.Journal.prefix(), after the path */
    put_text(tail, SUFFIX[e->plain_format]);
    put_text(tail, "\",\"format\":\"");
    put_text(tail, FORMAT_NAME[e->plain_format]);
    put_text(tail, "\",\"arrays\":[[\"arr_0\",\"");
    put_text(tail, dtype.name);
    put_text(tail, "\",");
    put_shape(tail, view, 1);
    put_text(tail, "]]");
    if (tail->failed) {
        PyErr_NoMemory();
        layout_free(made);
        return NULL;
    }
    if (e->plain_format == PLAIN_PT) {
        *status = pt_layout(e, &dtype, view, made);
        if (*status <= 0) {
            layout_free(made);
            return NULL;
        }
    } else {
        made->header = e->plain_format == PLAIN_NPY ? npy_header(&dtype, view, (size_t)e->plain_alignment)
                                                    : safetensors_header(&dtype, view, (size_t)e->plain_alignment);
        if (!made->header) {
            layout_free(made);
            return NULL;
        }
    }
    layout_release(e->plain_layout); /* (pt_layout ran Python: the cache may have changed meanwhile) */
    made->references = 2; /* the cache's and the caller's */
    e->plain_layout = made;
    *status = 1;
    return made;
}

/* ---- One file --------------------------------------------------------------------------------------- */

/* A file of a plain write: its key, paths and journal record (empty without a journal). */
typedef struct {
    const char *key;
    Py_ssize_t key_length;
    Text final, temporary, record;
    size_t directory_length;
} File;

static void file_clear(File *f) {
    free(f->final.data);
    free(f->temporary.data);
    free(f->record.data);
    memset(f, 0, sizeof *f);
}

/* Whether the folder `folder` (under the root) has no symlink on the way to it: commit.find_symlink()
 * found nothing (missing parts are fine). Any other answer, a link or an error, is Python's to raise. */
static int free_of_symlinks(Engine *e, char *folder) {
    size_t root_length = strlen(e->root);
    for (char *at = folder + root_length + 1;; at++) {
        char ending = *at;
        if (ending != '/' && ending != '\0') continue;
        *at = '\0';
        struct stat status;
        int found = lstat(folder, &status);
        int missing = found != 0 && errno == ENOENT;
        *at = ending;
        if (missing) return 1;
        if (found != 0 || S_ISLNK(status.st_mode)) return 0;
        if (ending == '\0') return 1;
    }
}

/* Whether plain writes may go into the folder of `f` (its final path cut at directory_length): the
 * writer's check has seen it, or the same check here finds no symlink on the way (then it is kept). */
static int folder_fit(Engine *e, File *f) {
    if (e->follow_symlinks) return 1;
    char *folder = f->final.data;
    folder[f->directory_length] = '\0';
    uint64_t h = hash_of(folder);
    int fit = table_find(&e->checked, folder, h, 0) != NULL;
    if (!fit && f->directory_length > strlen(e->root) && free_of_symlinks(e, folder))
        fit = table_find(&e->checked, folder, h, 1) != NULL; /* out of memory: Python checks it again */
    folder[f->directory_length] = '/';
    return fit;
}

/* The file for `key` in the writer's format: 1 (f filled), 0 (Python decides; f cleared), or -1 with
 * an exception set. `tail` is the layout's record tail. */
static int plan_file(Engine *e, PyObject *key, const Layout *layout, File *f) {
    memset(f, 0, sizeof *f);
    if (!PyUnicode_CheckExact(key) || !PyUnicode_IS_ASCII(key)) return 0;
    f->key = (const char *)PyUnicode_DATA(key);
    f->key_length = PyUnicode_GET_LENGTH(key);
    if (!plain_key(f->key, f->key_length)) return 0;
    put_text(&f->final, e->root);
    put_text(&f->final, "/");
    put(&f->final, f->key, (size_t)f->key_length);
    put_text(&f->final, SUFFIX[e->plain_format]);
    if (f->final.failed) goto no_memory;
    const char *name = strrchr(f->final.data, '/') + 1;
    f->directory_length = (size_t)(name - 1 - f->final.data);
    size_t name_length = strlen(name);
    if (name_length > NAME_MAX_BYTES || f->final.length > PATH_MAX_BYTES - TEMPORARY_EXTRA ||
        strstr(name, ".partial") || !folder_fit(e, f))
        goto decline;
    put(&f->temporary, f->final.data, f->directory_length);
    put_text(&f->temporary, "/.");
    put(&f->temporary, name, name_length < NAME_KEPT ? name_length : NAME_KEPT);
    put_text(&f->temporary, ".tsink-");
    put_text(&f->temporary, e->plain_token);
    put_hex(&f->temporary, e->plain_counter++);
    put_text(&f->temporary, ".partial");
    if (e->journal >= 0) { /* manifest.Journal.prefix() */
        put_text(&f->record, "{\"key\":\"");
        put(&f->record, f->key, (size_t)f->key_length);
        put_text(&f->record, "\",\"path\":\"");
        put(&f->record, f->key, (size_t)f->key_length);
        put(&f->record, layout->record_tail.data, layout->record_tail.length);
    }
    if (f->temporary.failed || f->record.failed) goto no_memory;
    return 1;
no_memory:
    file_clear(f);
    PyErr_NoMemory();
    return -1;
decline:
    file_clear(f);
    return 0;
}

/* Hand `f` and its buffers to job i of `batch` (its paths, key, header and payload views): 0, or -1
 * with an exception set. The payload view becomes the job's, and f's texts too, on success. */
static int fill_file_job(Engine *e, Batch *batch, Py_ssize_t i, File *f, PyObject *header, const Archive *archive,
                         Py_buffer *payload) {
    Job *job = &batch->jobs[i];
    PyObject *path = PyUnicode_FromStringAndSize(f->final.data, (Py_ssize_t)f->final.length);
    if (!path) return -1;
    PyList_SET_ITEM(batch->ticket->paths, i, path);
    job->views = PyMem_RawCalloc(3, sizeof(Py_buffer));
    job->key = malloc((size_t)f->key_length + 1);
    if (!job->views || !job->key) { PyErr_NoMemory(); return -1; }
    if (PyObject_GetBuffer(header, &job->views[0], PyBUF_SIMPLE) != 0) return -1;
    job->nviews = 1;
    memcpy(job->key, f->key, (size_t)f->key_length);
    job->key[f->key_length] = '\0';
    if (archive) {
        job->archive = archive_copy(archive);
        if (!job->archive) { PyErr_NoMemory(); return -1; }
    }
    job->views[job->nviews++] = *payload;
    if (job->archive) { /* its bytes are the job's: a view of them owns nothing */
        Py_buffer *view = &job->views[job->nviews++];
        view->buf = job->archive->bytes;
        view->len = (Py_ssize_t)job->archive->length;
        view->readonly = 1;
        view->itemsize = 1;
    }
    job->final = f->final.data;
    job->temporary = f->temporary.data;
    job->directory_length = f->directory_length;
    job->payload = (uint64_t)payload->len;
    job->checksum = e->journal >= 0;
    if (e->journal >= 0) {
        job->record = f->record.data;
        job->record_length = f->record.length;
        f->record.data = NULL;
    }
    f->final.data = f->temporary.data = NULL;
    return 0;
}

/* ---- Plain writes ---------------------------------------------------------------------------------- */

/* The array's bytes as a C-contiguous view, for an exact torch.Tensor (through .numpy(), which refuses
 * device, autograd, lazy conjugate and bfloat16 tensors) or numpy.ndarray (with a .pt's strides): 1;
 * 0 if it is none of those (Python decides); -1 with an exception set. */
static int plain_view(Engine *e, PyObject *value, Py_buffer *view) {
    static PyObject *numpy_name;
    PyObject *array;
    if (Py_IS_TYPE(value, (PyTypeObject *)e->ndarray_type)) {
        array = Py_NewRef(value);
    } else if (Py_IS_TYPE(value, (PyTypeObject *)e->tensor_type)) {
        if (!numpy_name && !(numpy_name = PyUnicode_InternFromString("numpy"))) return -1;
        array = PyObject_CallMethodNoArgs(value, numpy_name);
        if (!array) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_RuntimeError) &&
                !PyErr_ExceptionMatches(PyExc_ValueError))
                return -1;
            PyErr_Clear();
            return 0;
        }
    } else {
        return 0;
    }
    int got = PyObject_GetBuffer(array, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT);
    if (got != 0) {
        Py_DECREF(array);
        if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_ValueError)) return -1;
        PyErr_Clear();
        return 0;
    }
    int plain = e->plain_format == PLAIN_PT ? canonical_strides(array, view) : 1;
    Py_DECREF(array); /* the view holds it */
    if (plain <= 0) PyBuffer_Release(view);
    return plain;
}

/* The plain route is open for this call: configured, not failed, not closed, in its own process. */
static int plain_open(Engine *e) {
    return e->plain_format && !e->failed && !e->closed && e->threads && e->pid == getpid();
}

/* Queue a filled batch, unless a close() got in meanwhile (code that .numpy() ran may let one in):
 * the handle, None (the batch freed: Python decides, and refuses) or NULL with an exception set. */
static PyObject *queue_plain(Engine *e, Batch *batch, double start) {
    pthread_mutex_lock(&e->budget_lock);
    e->plain_inside++; /* before asking again: plain_off(wait=True) waits for it from here on */
    pthread_mutex_unlock(&e->budget_lock);
    PyObject *handle = NULL;
    double waited = 0;
    int open = plain_open(e);
    if (open)
        handle = queue_ready(e, batch, &waited);
    else
        free_batch(batch);
    pthread_mutex_lock(&e->budget_lock);
    if (--e->plain_inside == 0) pthread_cond_broadcast(&e->budget_cond);
    pthread_mutex_unlock(&e->budget_lock);
    if (!open) Py_RETURN_NONE;
    if (!e->plain_calls++) e->plain_first = start;
    e->plain_blocked += waited;
    e->plain_seconds += monotonic_seconds() - start;
    return handle;
}

/* write_plain(key, value): the write's handle, or None where the plain route does not decide it. */
PyObject *Engine_write_plain(Engine *e, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "write_plain() takes a key and a value (%zd given)", nargs);
        return NULL;
    }
    if (!plain_open(e)) Py_RETURN_NONE;
    double start = monotonic_seconds();
    Py_buffer view;
    int status = plain_view(e, args[1], &view);
    if (status <= 0) return status < 0 ? NULL : Py_NewRef(Py_None);
    Layout *layout = layout_of(e, &view, &status);
    File f;
    if (status > 0) status = plan_file(e, args[0], layout, &f);
    if (status <= 0) {
        layout_release(layout);
        PyBuffer_Release(&view);
        return status < 0 ? NULL : Py_NewRef(Py_None);
    }
    collect_garbage(e);
    Batch *batch = ready_batch(e, 1, (long long)view.len);
    if (!batch || fill_file_job(e, batch, 0, &f, layout->header, layout->archive, &view) != 0) { /* the view not taken */
        if (batch) free_batch(batch);
        layout_release(layout);
        PyBuffer_Release(&view);
        file_clear(&f);
        return NULL;
    }
    layout_release(layout);
    file_clear(&f);
    return queue_plain(e, batch, start);
}

/* write_plain_batch(keys, batch): write_batch(keys, batch) of one array whose first dimension indexes
 * the samples, each sample a file: the handle, or None where the plain route does not decide it. */
PyObject *Engine_write_plain_batch(Engine *e, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "write_plain_batch() takes keys and a batch (%zd given)", nargs);
        return NULL;
    }
    PyObject *keys = args[0];
    if (!plain_open(e) || !(PyList_CheckExact(keys) || PyTuple_CheckExact(keys))) Py_RETURN_NONE;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    if (n == 0) Py_RETURN_NONE;
    double start = monotonic_seconds();
    Py_buffer view;
    int status = plain_view(e, args[1], &view);
    if (status <= 0) return status < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *out = Py_None;
    Batch *batch = NULL;
    Layout *layout = NULL;
    Table finals = {0};
    File f = {0};
    if (view.ndim < 1 || view.shape[0] != n) goto done; /* Python says what is wrong */
    Py_buffer sample = view; /* what one sample's file holds: the shape after the first dimension */
    sample.ndim = view.ndim - 1;
    sample.shape = view.shape + 1;
    sample.strides = view.strides ? view.strides + 1 : NULL;
    sample.len = view.len / n;
    layout = layout_of(e, &sample, &status);
    if (status <= 0) { out = status < 0 ? NULL : Py_None; goto done; }
    if (table_init(&finals, (size_t)n * 2 + 1) != 0) { out = PyErr_NoMemory(); goto done; }
    if (!(batch = ready_batch(e, n, (long long)view.len))) { out = NULL; goto done; }
    PyObject *header = layout->header;
    const Archive *archive = layout->archive;
    collect_garbage(e);
    for (Py_ssize_t i = 0; i < n; i++) {
        status = plan_file(e, PySequence_Fast_GET_ITEM(keys, i), layout, &f);
        if (status > 0 && table_find(&finals, f.final.data, hash_of(f.final.data), 0)) status = 0; /* twice */
        if (status > 0 && !table_find(&finals, f.final.data, hash_of(f.final.data), 1)) {
            PyErr_NoMemory();
            status = -1;
        }
        Py_buffer payload;
        if (status > 0 && PyObject_GetBuffer(view.obj, &payload, PyBUF_SIMPLE) != 0) status = -1;
        if (status <= 0) break;
        payload.buf = (char *)payload.buf + i * sample.len; /* this sample's rows */
        payload.len = sample.len;
        if (fill_file_job(e, batch, i, &f, header, archive, &payload) != 0) {
            PyBuffer_Release(&payload);
            status = -1;
            break;
        }
        file_clear(&f);
    }
    if (status <= 0) {
        file_clear(&f);
        free_batch(batch);
        out = status < 0 ? NULL : Py_None;
        goto done;
    }
    layout_release(layout);
    table_free(&finals);
    PyBuffer_Release(&view);
    return queue_plain(e, batch, start);
done:
    layout_release(layout);
    table_free(&finals);
    PyBuffer_Release(&view);
    Py_XINCREF(out);
    return out;
}

/* plan_plain(key, value): (final, temporary, header, record | None) as write_plain() would queue them,
 * or None where it would leave the write to Python; queues nothing (a temporary's number is used up). */
PyObject *Engine_plan_plain(Engine *e, PyObject *args) {
    PyObject *key, *value;
    if (!PyArg_ParseTuple(args, "OO", &key, &value)) return NULL;
    if (!plain_open(e)) Py_RETURN_NONE;
    Py_buffer view;
    int status = plain_view(e, value, &view);
    if (status <= 0) return status < 0 ? NULL : Py_NewRef(Py_None);
    Layout *layout = layout_of(e, &view, &status);
    File f;
    if (status > 0) status = plan_file(e, key, layout, &f);
    PyBuffer_Release(&view);
    if (status <= 0) return status < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *record = e->journal >= 0 ? PyBytes_FromStringAndSize(f.record.data, (Py_ssize_t)f.record.length)
                                       : Py_NewRef(Py_None);
    PyObject *out = record ? Py_BuildValue("(ssON)", f.final.data, f.temporary.data, layout->header, record) : NULL;
    file_clear(&f);
    return out;
}

/* plain(format, alignment, tensor_type, ndarray_type, token, pt_template=None): open the plain route
 * for one format (1 .npy, 2 .safetensors, whose headers pad to `alignment`; 3 .pt, whose archives
 * pt_template(dtype, shape) lays out); its temporaries carry `token`. */
PyObject *Engine_plain(Engine *e, PyObject *args) {
    int format;
    Py_ssize_t alignment;
    PyObject *tensor_type, *ndarray_type, *template = Py_None;
    const char *token;
    if (!PyArg_ParseTuple(args, "inO!O!s|O", &format, &alignment, &PyType_Type, &tensor_type, &PyType_Type,
                          &ndarray_type, &token, &template))
        return NULL;
    if (!e->threads) { PyErr_SetString(PyExc_RuntimeError, "Engine not initialised"); return NULL; }
    if (format < PLAIN_NPY || format > PLAIN_PT || alignment < 1 || (format == PLAIN_PT) != PyCallable_Check(template) ||
        strlen(token) >= sizeof e->plain_token || strspn(token, "0123456789abcdef") != strlen(token)) {
        PyErr_Format(PyExc_ValueError,
                     "plain(format=%d, alignment=%zd, token=%s): format is 1 (npy), 2 (safetensors) or 3 (pt, with "
                     "its template maker), alignment >= 1, token lowercase hex of at most %zu digits",
                     format, alignment, token, sizeof e->plain_token - 1);
        return NULL;
    }
    if (import_helpers() != 0) return NULL; /* what its handles need, once: the route itself imports nothing */
    if (!e->checked.buckets && table_init(&e->checked, 256) != 0) return PyErr_NoMemory();
    if (!table_find(&e->checked, e->root, hash_of(e->root), 1)) return PyErr_NoMemory();
    Py_XSETREF(e->pt_template, format == PLAIN_PT ? Py_NewRef(template) : NULL);
    Py_XSETREF(e->tensor_type, Py_NewRef(tensor_type));
    Py_XSETREF(e->ndarray_type, Py_NewRef(ndarray_type));
    strcpy(e->plain_token, token);
    e->plain_alignment = alignment;
    layout_release(e->plain_layout); /* made for the format before */
    e->plain_layout = NULL;
    /* A root of "/" makes paths that start "//", which the journal names otherwise: Python's. */
    e->plain_format = strcmp(e->root, "/") ? format : 0;
    Py_RETURN_NONE;
}

/* plain_off(wait=False): close the plain route (the writer failed, or is closing); with `wait`, also
 * wait (without the GIL) for the calls inside it, which may be waiting for room in the budget. */
PyObject *Engine_plain_off(Engine *e, PyObject *args) {
    int wait = 0;
    if (!PyArg_ParseTuple(args, "|p", &wait)) return NULL;
    e->plain_format = 0;
    if (!wait || !e->threads) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&e->budget_lock);
    while (e->plain_inside > 0) pthread_cond_wait(&e->budget_cond, &e->budget_lock);
    pthread_mutex_unlock(&e->budget_lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* folder_checked(folder): the caller's check found `folder` free of symlinks; the plain route may
 * write there. */
PyObject *Engine_folder_checked(Engine *e, PyObject *folder) {
    const char *text = PyUnicode_AsUTF8(folder);
    if (!text) return NULL;
    if (!e->checked.buckets) Py_RETURN_NONE; /* not configured: nothing consults it */
    if (!table_find(&e->checked, text, hash_of(text), 1)) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

void plain_free(Engine *e) {
    layout_release(e->plain_layout);
    e->plain_layout = NULL;
    if (e->checked.buckets) table_free(&e->checked);
    Py_CLEAR(e->pt_template);
    Py_CLEAR(e->tensor_type);
    Py_CLEAR(e->ndarray_type);
}
