/* The Engine type's Python interface: start the threads, number paths (reserve, release), hand over a
 * batch (submit), collect finished ones (reap), stop (close). Everything here runs with the GIL; the
 * threads (commit.c) never take it. */
#include "engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void free_batch(Batch *batch) { /* with the GIL */
    for (Py_ssize_t i = 0; i < batch->njobs; i++) {
        Job *job = &batch->jobs[i];
        for (Py_ssize_t k = 0; k < job->nviews; k++) PyBuffer_Release(&job->views[k]);
        PyMem_RawFree(job->views);
        free(job->record);
        free(job->final);
        free(job->temporary);
    }
    PyMem_RawFree(batch->jobs);
    Py_XDECREF(batch->token);
    PyMem_RawFree(batch);
}

static void stop_threads(Engine *e) {
    pthread_mutex_lock(&e->lock);
    e->stopping = 1;
    pthread_cond_broadcast(&e->work);
    pthread_mutex_unlock(&e->lock);
    for (int i = 0; i < e->started; i++) pthread_join(e->threads[i], NULL);
    e->started = 0;
}

/* Whether the engine can be used here: __init__ has run (Engine.__new__ alone makes a zeroed object),
 * in this process (a child of fork() inherits the object but not its threads, and the locks may be
 * held by threads that no longer exist). Every method asks first. */
static int usable(Engine *e) {
    if (!e->threads) {
        PyErr_SetString(PyExc_RuntimeError, "Engine not initialised: make it with Engine(threads, durability, root)");
        return 0;
    }
    if (e->pid != getpid()) {
        PyErr_Format(PyExc_RuntimeError,
                     "this engine was started in process %ld and cannot be used after fork() (process %ld): "
                     "make a new writer in the child", (long)e->pid, (long)getpid());
        return 0;
    }
    return 1;
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"threads", "durability", "root", "follow_symlinks", "journal", NULL};
    int threads, durability, follow = 0, journal = -1;
    PyObject *root;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiU|pi", names, &threads, &durability, &root, &follow,
                                     &journal))
        return -1;
    if (e->threads) { PyErr_SetString(PyExc_RuntimeError, "Engine already initialised"); return -1; }
    if (threads < 1 || durability < 0 || durability > 2) {
        PyErr_SetString(PyExc_ValueError, "threads must be >= 1 and durability 0, 1 or 2");
        return -1;
    }
    e->root = copy_path(root);
    if (!e->root) return -1;
    e->durability = durability;
    e->follow_symlinks = follow;
    e->pid = getpid();
    e->journal = journal;
    pthread_mutex_init(&e->journal_lock, NULL);
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->work, NULL);
    pthread_cond_init(&e->done, NULL);
    pthread_mutex_init(&e->sync_lock, NULL);
    pthread_cond_init(&e->sync_cond, NULL);
    pthread_mutex_init(&e->folder_lock, NULL);
    int bad = table_init(&e->syncs, 64) | table_init(&e->folders, 1024);
    for (int i = 0; i < STRIPES; i++) {
        pthread_mutex_init(&e->order_locks[i], NULL);
        bad |= table_init(&e->order[i], 64);
    }
    e->threads = calloc((size_t)threads, sizeof(pthread_t));
    if (bad || !e->threads) { PyErr_NoMemory(); return -1; }
    e->nthreads = threads;
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&e->threads[i], NULL, worker, e) != 0) {
            stop_threads(e);
            PyErr_SetString(PyExc_RuntimeError, "cannot start the engine's threads");
            return -1;
        }
        e->started++;
    }
    return 0;
}

static PyObject *Engine_submit(Engine *e, PyObject *args) {
    PyObject *token, *files;
    if (!PyArg_ParseTuple(args, "OO!", &token, &PyList_Type, &files) || !usable(e)) return NULL;
    if (e->closed) { PyErr_SetString(PyExc_RuntimeError, "the engine is closed"); return NULL; }
    Py_ssize_t n = PyList_GET_SIZE(files);
    if (n == 0) { PyErr_SetString(PyExc_ValueError, "a batch needs at least one file"); return NULL; }
    Batch *batch = PyMem_RawCalloc(1, sizeof(Batch));
    Job *jobs = PyMem_RawCalloc((size_t)n, sizeof(Job));
    if (!batch || !jobs) { PyMem_RawFree(batch); PyMem_RawFree(jobs); return PyErr_NoMemory(); }
    batch->jobs = jobs;
    batch->njobs = n;
    batch->remaining = n;
    Py_INCREF(token);
    batch->token = token;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(files, i);
        PyObject *final, *temporary, *buffers, *record, *known = Py_None;
        int fd, checksum;
        long long number;
        Job *job = &jobs[i];
        job->batch = batch;
        job->fd = -1;
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "UUOipLO|O", &final, &temporary, &buffers, &fd,
                                                      &checksum, &number, &record, &known)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError,
                                "each file is (final, temporary, buffers, fd, checksum, number, record, crc)");
            goto error;
        }
        if (checksum && known != Py_None) { /* the format has it already: no second pass */
            unsigned long value = PyLong_AsUnsignedLong(known);
            if (value == (unsigned long)-1 && PyErr_Occurred()) goto error;
            if (value > 0xFFFFFFFFul) {
                PyErr_Format(PyExc_ValueError, "a file's crc is 32 bits, not %lu", value);
                goto error;
            }
            job->crc = (uint32_t)value;
            checksum = 0;
        }
        job->number = number;
        if (record != Py_None) {
            if (!PyBytes_Check(record) || e->journal < 0) {
                PyErr_SetString(PyExc_TypeError, "a record is bytes, for an engine with a journal");
                goto error;
            }
            job->record_length = (size_t)PyBytes_GET_SIZE(record);
            job->record = malloc(job->record_length + 1);
            if (!job->record) { PyErr_NoMemory(); goto error; }
            memcpy(job->record, PyBytes_AS_STRING(record), job->record_length);
        }
        job->final = copy_path(final);
        job->temporary = job->final ? copy_path(temporary) : NULL;
        if (!job->temporary) goto error;
        char *slash = strrchr(job->final, '/');
        if (!slash) { PyErr_Format(PyExc_ValueError, "final path %R is not absolute", final); goto error; }
        job->directory_length = (size_t)(slash - job->final);
        job->checksum = checksum;
        if (buffers == Py_None) {
            if (fd < 0) { PyErr_SetString(PyExc_ValueError, "a file without buffers needs its fd"); goto error; }
            job->fd = fd;
            continue;
        }
        PyObject *sequence = PySequence_Fast(buffers, "buffers must be a sequence of bytes-like objects");
        if (!sequence) goto error;
        Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
        job->views = PyMem_RawCalloc((size_t)(count ? count : 1), sizeof(Py_buffer));
        if (!job->views) { Py_DECREF(sequence); PyErr_NoMemory(); goto error; }
        for (Py_ssize_t k = 0; k < count; k++) {
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(sequence, k), &job->views[k], PyBUF_SIMPLE) != 0) {
                Py_DECREF(sequence);
                goto error;
            }
            job->nviews++;
        }
        Py_DECREF(sequence);
    }
    pthread_mutex_lock(&e->lock);
    e->unreaped++;
    for (Py_ssize_t i = 0; i < n; i++) {
        jobs[i].next = NULL;
        if (e->tail) e->tail->next = &jobs[i]; else e->head = &jobs[i];
        e->tail = &jobs[i];
    }
    if (n == 1) pthread_cond_signal(&e->work); else pthread_cond_broadcast(&e->work);
    pthread_mutex_unlock(&e->lock);
    Py_RETURN_NONE;
error:
    free_batch(batch);
    return NULL;
}

/* Number paths in the order of write() calls, before their batch is submitted: the latest number wins. */
static PyObject *Engine_reserve(Engine *e, PyObject *paths) {
    if (!usable(e)) return NULL;
    if (!PyList_Check(paths)) { PyErr_SetString(PyExc_TypeError, "reserve() takes a list of paths"); return NULL; }
    Py_ssize_t n = PyList_GET_SIZE(paths);
    PyObject *numbers = PyList_New(n);
    if (!numbers) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        char *path = copy_path(PyList_GET_ITEM(paths, i));
        if (!path) goto error;
        uint64_t h;
        size_t stripe = stripe_of(path, &h);
        pthread_mutex_lock(&e->order_locks[stripe]);
        Slot *s = table_find(&e->order[stripe], path, h, 1);
        int64_t number = ++e->counter; /* under the GIL: reserve() calls do not overlap */
        if (s && s->a++ == 0) s->b = -1;
        pthread_mutex_unlock(&e->order_locks[stripe]);
        free(path);
        PyObject *value = s ? PyLong_FromLongLong(number) : PyErr_NoMemory();
        if (!value) goto error;
        PyList_SET_ITEM(numbers, i, value);
    }
    return numbers;
error: /* give back the numbers taken so far */
    for (Py_ssize_t k = 0; k < n && PyList_GET_ITEM(numbers, k); k++) {
        char *path = copy_path(PyList_GET_ITEM(paths, k));
        if (path) { release_order(e, path); free(path); }
    }
    Py_DECREF(numbers);
    return NULL;
}

static PyObject *Engine_release(Engine *e, PyObject *paths) {
    if (!usable(e)) return NULL;
    if (!PyList_Check(paths)) { PyErr_SetString(PyExc_TypeError, "release() takes a list of paths"); return NULL; }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(paths); i++) {
        char *path = copy_path(PyList_GET_ITEM(paths, i));
        if (!path) return NULL;
        release_order(e, path);
        free(path);
    }
    Py_RETURN_NONE;
}

static PyObject *batch_outcome(Batch *batch) {
    PyObject *results = PyList_New(batch->njobs);
    if (!results) return NULL;
    for (Py_ssize_t i = 0; i < batch->njobs; i++) {
        Job *job = &batch->jobs[i];
        PyObject *item = Py_BuildValue(
            "(OKkdis)", job->replaced ? Py_True : Py_False, (unsigned long long)job->size,
            (unsigned long)job->crc, job->renamed_at, job->error, job->error ? job->operation : NULL);
        if (!item) { Py_DECREF(results); return NULL; }
        PyList_SET_ITEM(results, i, item);
    }
    PyObject *pair = PyTuple_Pack(2, batch->token, results);
    Py_DECREF(results);
    return pair;
}

static PyObject *Engine_reap(Engine *e, PyObject *args) {
    double timeout;
    if (!PyArg_ParseTuple(args, "d", &timeout)) return NULL;
    if (!usable(e)) return NULL;
    Batch *taken = NULL;
    int finished = 0;
    Py_BEGIN_ALLOW_THREADS
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += (time_t)timeout;
    deadline.tv_nsec += (long)((timeout - (double)(time_t)timeout) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&e->lock);
    while (!e->done_head && !(e->closed && e->unreaped == 0)) {
        if (pthread_cond_timedwait(&e->done, &e->lock, &deadline) == ETIMEDOUT) break;
    }
    taken = e->done_head;
    e->done_head = e->done_tail = NULL;
    for (Batch *b = taken; b; b = b->next) e->unreaped--;
    finished = !taken && e->closed && e->unreaped == 0;
    pthread_mutex_unlock(&e->lock);
    Py_END_ALLOW_THREADS
    if (finished) Py_RETURN_NONE;
    PyObject *out = PyList_New(0);
    for (Batch *b = taken, *next; b; b = next) {
        next = b->next;
        PyObject *pair = out ? batch_outcome(b) : NULL;
        if (pair) { if (PyList_Append(out, pair) != 0) Py_CLEAR(out); Py_DECREF(pair); }
        else Py_CLEAR(out);
        free_batch(b);
    }
    return out;
}

static PyObject *Engine_close(Engine *e, PyObject *unused) {
    if (!usable(e)) return NULL;
    if (e->closed) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    stop_threads(e); /* the threads finish the queue first */
    pthread_mutex_lock(&e->lock);
    e->closed = 1;
    pthread_cond_broadcast(&e->done);
    pthread_mutex_unlock(&e->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void Engine_dealloc(Engine *e) {
    if (e->threads && e->pid != getpid()) { /* a child of fork(): no threads to stop, locks maybe held */
        Py_TYPE(e)->tp_free((PyObject *)e);
        return;
    }
    if (e->threads) {
        Py_BEGIN_ALLOW_THREADS
        stop_threads(e);
        Py_END_ALLOW_THREADS
        for (Batch *b = e->done_head, *n; b; b = n) { n = b->next; free_batch(b); }
        table_free(&e->syncs);
        table_free(&e->folders);
        for (int i = 0; i < STRIPES; i++) table_free(&e->order[i]);
        free(e->threads);
    }
    free(e->root);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_pending(Engine *e, void *unused) {
    if (!usable(e)) return NULL;
    pthread_mutex_lock(&e->lock);
    Py_ssize_t n = e->unreaped;
    pthread_mutex_unlock(&e->lock);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef Engine_methods[] = {
    {"reserve", (PyCFunction)Engine_reserve, METH_O, "reserve(paths): a number for each path, in call order."},
    {"release", (PyCFunction)Engine_release, METH_O, "release(paths): give back numbers never submitted."},
    {"submit", (PyCFunction)Engine_submit, METH_VARARGS,
     "submit(token, files): queue a batch; files are (final, temporary, buffers | None, fd, checksum, "
     "number, record | None[, crc | None]); a crc given is the file's, and spares the checksum pass."},
    {"reap", (PyCFunction)Engine_reap, METH_VARARGS,
     "reap(timeout): finished batches as (token, [(replaced, size, crc, renamed_at, errno, operation)]); "
     "[] on timeout, None once closed and all reaped."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "close(): finish every queued file, stop the threads."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"pending", (getter)Engine_pending, NULL, "batches submitted and not yet reaped", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensorsink.engine._native.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(threads, durability, root, follow_symlinks=False, journal=-1): the commit protocol in "
              "threads; with a journal descriptor, files given a record are journaled around their rename.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};
