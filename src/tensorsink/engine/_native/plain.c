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

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the plain route writes little-endian headers for native arrays: a big-endian build needs its own"
#endif

#define NAME_MAX_BYTES 255 /* plan._NAME_MAX */
#define PATH_MAX_BYTES 4095 /* plan._PATH_MAX */
#define TEMPORARY_EXTRA 48 /* plan._TEMPORARY_EXTRA */
#define NAME_KEPT 200 /* commit._NAME_KEPT */
#define JOURNAL_DIR ".tensorsink"

static const char *const SUFFIX[] = {"", ".npy", ".safetensors"};
static const char *const FORMAT_NAME[] = {"", "npy", "safetensors"};

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

/* A number in decimal (no printf on this path: its format parsing cost more than the rest of a plan). */
static void put_int(Text *t, unsigned long long value) {
    char digits[24];
    int at = (int)sizeof digits;
    do { digits[--at] = (char)('0' + value % 10); value /= 10; } while (value);
    put(t, digits + at, sizeof digits - (size_t)at);
}

static void put_hex(Text *t, unsigned long long value) {
    char digits[24];
    int at = (int)sizeof digits;
    do { digits[--at] = "0123456789abcdef"[value & 15]; value >>= 4; } while (value);
    put(t, digits + at, sizeof digits - (size_t)at);
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

/* ---- Layouts -------------------------------------------------------------------------------------- */

/* What a write's dtype and shape decide: its header, and its record's tail (after key and path). A
 * stream's outputs mostly share them, so the last one is kept (the formats' lru_cache, in C). */
struct Layout {
    char format[16];
    Py_ssize_t itemsize;
    int ndim;
    Py_ssize_t shape[PyBUF_MAX_NDIM];
    PyObject *header; /* bytes */
    Text tail;        /* the file's suffix, format and arrays: '.npy","format":"npy","arrays":[[...]]' */
};

static void layout_free(Layout *layout) {
    if (!layout) return;
    Py_XDECREF(layout->header);
    free(layout->tail.data);
    free(layout);
}

static int same_layout(const Layout *layout, const Py_buffer *view, const char *format) {
    return layout && layout->itemsize == view->itemsize && layout->ndim == view->ndim &&
           !strcmp(layout->format, format) &&
           !memcmp(layout->shape, view->shape, (size_t)view->ndim * sizeof(Py_ssize_t));
}

/* The layout of the array `view` shows, for the engine's plain format (borrowed: valid until the
 * next call); `*status` 1, or 0 (a dtype Python decides) or -1 (an exception set), with NULL. */
static Layout *layout_of(Engine *e, const Py_buffer *view, int *status) {
    const char *format = view->format ? view->format : "B";
    *status = 1;
    if (same_layout(e->plain_layout, view, format)) return e->plain_layout;
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
    made->header = e->plain_format == PLAIN_NPY ? npy_header(&dtype, view, (size_t)e->plain_alignment)
                                                : safetensors_header(&dtype, view, (size_t)e->plain_alignment);
    put_text(&made->tail, SUFFIX[e->plain_format]); /* manifest.Journal.prefix(), after the path */
    put_text(&made->tail, "\",\"format\":\"");
    put_text(&made->tail, FORMAT_NAME[e->plain_format]);
    put_text(&made->tail, "\",\"arrays\":[[\"arr_0\",\"");
    put_text(&made->tail, dtype.name);
    put_text(&made->tail, "\",");
    put_shape(&made->tail, view, 1);
    put_text(&made->tail, "]]");
    if (!made->header || made->tail.failed) {
        if (made->header) PyErr_NoMemory();
        layout_free(made);
        return NULL;
    }
    layout_free(e->plain_layout);
    e->plain_layout = made;
    *status = 1;
    return made;
}

/* ---- One plain write ------------------------------------------------------------------------------- */

typedef struct {
    const char *key;
    Py_ssize_t key_length;
    Text final, temporary, record; /* record: empty without a journal */
    size_t directory_length;
    PyObject *header;
    Py_buffer view;
    int has_view;
} Plain;

static void plain_clear(Plain *p) {
    free(p->final.data);
    free(p->temporary.data);
    free(p->record.data);
    Py_XDECREF(p->header);
    if (p->has_view) PyBuffer_Release(&p->view);
    memset(p, 0, sizeof *p);
}

/* The array's bytes as a C-contiguous view, for an exact torch.Tensor (through .numpy(), which refuses
 * device, autograd, lazy conjugate and bfloat16 tensors) or numpy.ndarray: 1; 0 if it is none of those
 * (Python decides); -1 with an exception set. */
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
    Py_DECREF(array); /* the view holds it */
    if (got != 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_ValueError)) return -1;
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* Plan write(key, value) as the plain route takes it: 1 (p filled), 0 (Python decides; p cleared),
 * or -1 with an exception set. */
static int plan(Engine *e, PyObject *key, PyObject *value, Plain *p) {
    memset(p, 0, sizeof *p);
    if (!PyUnicode_CheckExact(key) || !PyUnicode_IS_ASCII(key)) return 0;
    p->key = (const char *)PyUnicode_DATA(key);
    p->key_length = PyUnicode_GET_LENGTH(key);
    if (!plain_key(p->key, p->key_length)) return 0;
    const char *suffix = SUFFIX[e->plain_format];
    put_text(&p->final, e->root);
    put_text(&p->final, "/");
    put(&p->final, p->key, (size_t)p->key_length);
    put_text(&p->final, suffix);
    if (p->final.failed) goto no_memory;
    const char *name = strrchr(p->final.data, '/') + 1;
    p->directory_length = (size_t)(name - 1 - p->final.data);
    size_t name_length = strlen(name);
    if (name_length > NAME_MAX_BYTES || p->final.length > PATH_MAX_BYTES - TEMPORARY_EXTRA ||
        strstr(name, ".partial"))
        goto decline;
    if (!e->follow_symlinks) {
        p->final.data[p->directory_length] = '\0';
        Slot *seen = table_find(&e->checked, p->final.data, hash_of(p->final.data), 0);
        p->final.data[p->directory_length] = '/';
        if (!seen) goto decline;
    }
    int viewed = plain_view(e, value, &p->view);
    if (viewed <= 0) { plain_clear(p); return viewed; }
    p->has_view = 1;
    int laid = 0;
    Layout *layout = layout_of(e, &p->view, &laid);
    if (laid <= 0) {
        plain_clear(p);
        return laid;
    }
    p->header = Py_NewRef(layout->header);
    put(&p->temporary, p->final.data, p->directory_length);
    put_text(&p->temporary, "/.");
    put(&p->temporary, name, name_length < NAME_KEPT ? name_length : NAME_KEPT);
    put_text(&p->temporary, ".tsink-");
    put_text(&p->temporary, e->plain_token);
    put_hex(&p->temporary, e->plain_counter++);
    put_text(&p->temporary, ".partial");
    if (e->journal >= 0) { /* manifest.Journal.prefix() */
        put_text(&p->record, "{\"key\":\"");
        put(&p->record, p->key, (size_t)p->key_length);
        put_text(&p->record, "\",\"path\":\"");
        put(&p->record, p->key, (size_t)p->key_length);
        put(&p->record, layout->tail.data, layout->tail.length);
    }
    if (p->temporary.failed || p->record.failed) goto no_memory;
    return 1;
no_memory:
    plain_clear(p);
    PyErr_NoMemory();
    return -1;
decline:
    plain_clear(p);
    return 0;
}

/* The plain route is open for this call: configured, not failed, not closed, in its own process. */
static int plain_open(Engine *e) {
    return e->plain_format && !e->failed && !e->closed && e->threads && e->pid == getpid();
}

/* write_plain(key, value): the write's handle, or None where the plain route does not decide it. */
PyObject *Engine_write_plain(Engine *e, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "write_plain() takes a key and a value (%zd given)", nargs);
        return NULL;
    }
    if (!plain_open(e)) Py_RETURN_NONE;
    double start = monotonic_seconds();
    Plain p;
    int planned = plan(e, args[0], args[1], &p);
    if (planned <= 0) {
        if (planned == 0) Py_RETURN_NONE;
        return NULL;
    }
    collect_garbage(e);
    long long nbytes = (long long)p.view.len;
    Batch *batch = ready_batch(e, 1, nbytes);
    if (!batch) { plain_clear(&p); return NULL; }
    Job *job = &batch->jobs[0];
    PyObject *path = PyUnicode_FromStringAndSize(p.final.data, (Py_ssize_t)p.final.length);
    job->views = PyMem_RawCalloc(2, sizeof(Py_buffer));
    job->key = malloc((size_t)p.key_length + 1);
    if (path) PyList_SET_ITEM(batch->ticket->paths, 0, path);
    if (!path || !job->views || !job->key || PyObject_GetBuffer(p.header, &job->views[0], PyBUF_SIMPLE) != 0) {
        free_batch(batch);
        plain_clear(&p);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    job->nviews = 1;
    memcpy(job->key, p.key, (size_t)p.key_length);
    job->key[p.key_length] = '\0';
    job->views[job->nviews++] = p.view; /* the job's now: released with it */
    p.has_view = 0;
    job->final = p.final.data;
    job->temporary = p.temporary.data;
    job->directory_length = p.directory_length;
    job->payload = (uint64_t)nbytes;
    job->checksum = e->journal >= 0;
    if (e->journal >= 0) {
        job->record = p.record.data;
        job->record_length = p.record.length;
        p.record.data = NULL;
    }
    p.final.data = p.temporary.data = NULL;
    plain_clear(&p);
    pthread_mutex_lock(&e->budget_lock);
    e->plain_inside++; /* before asking again: plain_off(wait=True) waits for it from here on */
    pthread_mutex_unlock(&e->budget_lock);
    PyObject *handle = NULL;
    double waited = 0;
    int open = plain_open(e); /* code that .numpy() ran may have let a close() in */
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

/* plan_plain(key, value): (final, temporary, header, record | None) as write_plain() would queue them,
 * or None where it would leave the write to Python; queues nothing (a temporary's number is used up). */
PyObject *Engine_plan_plain(Engine *e, PyObject *args) {
    PyObject *key, *value;
    if (!PyArg_ParseTuple(args, "OO", &key, &value)) return NULL;
    if (!plain_open(e)) Py_RETURN_NONE;
    Plain p;
    int planned = plan(e, key, value, &p);
    if (planned <= 0) {
        if (planned == 0) Py_RETURN_NONE;
        return NULL;
    }
    PyObject *record = e->journal >= 0 ? PyBytes_FromStringAndSize(p.record.data, (Py_ssize_t)p.record.length)
                                       : Py_NewRef(Py_None);
    PyObject *out = record ? Py_BuildValue("(ssON)", p.final.data, p.temporary.data, p.header, record) : NULL;
    plain_clear(&p);
    return out;
}

/* plain(format, alignment, tensor_type, ndarray_type, token): open the plain route for one format
 * (1 .npy, 2 .safetensors) whose headers pad to `alignment`; its temporaries carry `token`. */
PyObject *Engine_plain(Engine *e, PyObject *args) {
    int format;
    Py_ssize_t alignment;
    PyObject *tensor_type, *ndarray_type;
    const char *token;
    if (!PyArg_ParseTuple(args, "inO!O!s", &format, &alignment, &PyType_Type, &tensor_type, &PyType_Type,
                          &ndarray_type, &token))
        return NULL;
    if (!e->threads) { PyErr_SetString(PyExc_RuntimeError, "Engine not initialised"); return NULL; }
    if ((format != PLAIN_NPY && format != PLAIN_SAFETENSORS) || alignment < 1 ||
        strlen(token) >= sizeof e->plain_token || strspn(token, "0123456789abcdef") != strlen(token)) {
        PyErr_Format(PyExc_ValueError,
                     "plain(format=%d, alignment=%zd, token=%s): format is 1 (npy) or 2 (safetensors), "
                     "alignment >= 1, token lowercase hex of at most %zu digits",
                     format, alignment, token, sizeof e->plain_token - 1);
        return NULL;
    }
    if (import_helpers() != 0) return NULL; /* what its handles need, once: the route itself imports nothing */
    if (!e->checked.buckets && table_init(&e->checked, 256) != 0) return PyErr_NoMemory();
    if (!table_find(&e->checked, e->root, hash_of(e->root), 1)) return PyErr_NoMemory();
    Py_XSETREF(e->tensor_type, Py_NewRef(tensor_type));
    Py_XSETREF(e->ndarray_type, Py_NewRef(ndarray_type));
    strcpy(e->plain_token, token);
    e->plain_alignment = alignment;
    layout_free(e->plain_layout); /* made for the format before */
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
    layout_free(e->plain_layout);
    e->plain_layout = NULL;
    if (e->checked.buckets) table_free(&e->checked);
    Py_CLEAR(e->tensor_type);
    Py_CLEAR(e->ndarray_type);
}
