/* tensorsink.bench._bare: the bare loop, what the machine can do, for the benchmark's ceiling.
 *
 * For each file, with its own list of buffers: open, writev, fsync (FILE, FULL), close, rename, fsync the
 * folder (FULL); in POSIX threads, each taking every threads-th file, with the GIL released. Nothing
 * else: no journal, no order, no folders made. It writes with the engine's own write_all (files.c). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../engine/_native/files.h"

typedef struct {
    char **finals, **temporaries;
    Py_buffer **views; /* per file */
    Py_ssize_t *nviews;
    Py_ssize_t first, count, step;
    int durability, error;
} Stripe;

static void *bare_stripe(void *arg) {
    Stripe *s = arg;
    for (Py_ssize_t i = s->first; i < s->count; i += s->step) {
        int fd = open(s->temporaries[i], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || write_all(fd, s->views[i], s->nviews[i]) != 0 ||
            (s->durability != DURABILITY_NONE && fsync(fd) != 0) || close(fd) != 0 ||
            rename(s->temporaries[i], s->finals[i]) != 0) {
            s->error = errno ? errno : EIO;
            return NULL;
        }
        if (s->durability == DURABILITY_FULL) {
            char *slash = strrchr(s->finals[i], '/');
            *slash = '\0';
            int rc = fsync_path(s->finals[i]);
            *slash = '/';
            if (rc != 0) { s->error = errno; return NULL; }
        }
    }
    return NULL;
}

static PyObject *bare_loop(PyObject *module, PyObject *args) {
    PyObject *finals, *temporaries, *buffers;
    int durability, threads;
    if (!PyArg_ParseTuple(args, "O!O!O!ii", &PyList_Type, &finals, &PyList_Type, &temporaries, &PyList_Type,
                          &buffers, &durability, &threads))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(finals);
    if (PyList_GET_SIZE(temporaries) != n || PyList_GET_SIZE(buffers) != n || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "as many temporaries and buffer lists as finals, and threads >= 1");
        return NULL;
    }
    char **paths = PyMem_RawCalloc((size_t)(2 * n + 1), sizeof(char *));
    Py_buffer **views = PyMem_RawCalloc((size_t)(n + 1), sizeof(Py_buffer *));
    Py_ssize_t *nviews = PyMem_RawCalloc((size_t)(n + 1), sizeof(Py_ssize_t));
    Stripe *stripes = PyMem_RawCalloc((size_t)threads, sizeof(Stripe));
    pthread_t *ids = PyMem_RawCalloc((size_t)threads, sizeof(pthread_t));
    PyObject *result = NULL;
    int error = 0, started = 0;
    if (!paths || !views || !nviews || !stripes || !ids) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < n; i++) {
        paths[i] = copy_path(PyList_GET_ITEM(finals, i));
        paths[n + i] = paths[i] ? copy_path(PyList_GET_ITEM(temporaries, i)) : NULL;
        if (!paths[n + i]) goto done;
        PyObject *sequence = PySequence_Fast(PyList_GET_ITEM(buffers, i), "each file's buffers: a sequence");
        if (!sequence) goto done;
        Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
        views[i] = PyMem_RawCalloc((size_t)(count ? count : 1), sizeof(Py_buffer));
        if (!views[i]) { Py_DECREF(sequence); PyErr_NoMemory(); goto done; }
        for (Py_ssize_t k = 0; k < count; k++) {
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(sequence, k), &views[i][k], PyBUF_SIMPLE) != 0) {
                Py_DECREF(sequence);
                goto done;
            }
            nviews[i]++;
        }
        Py_DECREF(sequence);
    }
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++) {
        stripes[t] = (Stripe){paths, paths + n, views, nviews, t, n, threads, durability, 0};
        if (pthread_create(&ids[t], NULL, bare_stripe, &stripes[t]) != 0) { error = EAGAIN; break; }
        started++;
    }
    for (int t = 0; t < started; t++) {
        pthread_join(ids[t], NULL);
        if (stripes[t].error && !error) error = stripes[t].error;
    }
    Py_END_ALLOW_THREADS
    if (error) { errno = error; PyErr_SetFromErrno(PyExc_OSError); goto done; }
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; views && i < n; i++) {
        for (Py_ssize_t k = 0; k < nviews[i]; k++) PyBuffer_Release(&views[i][k]);
        PyMem_RawFree(views[i]);
    }
    if (paths) for (Py_ssize_t i = 0; i < 2 * n; i++) free(paths[i]);
    PyMem_RawFree(paths);
    PyMem_RawFree(views);
    PyMem_RawFree(nviews);
    PyMem_RawFree(stripes);
    PyMem_RawFree(ids);
    return result;
}

static PyMethodDef module_methods[] = {
    {"bare_loop", bare_loop, METH_VARARGS,
     "bare_loop(finals, temporaries, buffers, durability, threads): for each file, with its own list of "
     "buffers: open, writev, fsync (FILE, FULL), close, rename, fsync the folder (FULL); GIL released."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tensorsink.bench._bare",
    .m_doc = "The benchmark's bare loop in C: the machine's ceiling.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__bare(void) { return PyModule_Create(&module_def); }
