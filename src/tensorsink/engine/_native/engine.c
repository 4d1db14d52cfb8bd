/* The Engine type's Python interface: start the threads, number paths (reserve, release), hand over a
 * batch (submit), collect finished ones (reap), stop (close). Everything here runs with the GIL; the
 * threads (commit.c) never take it. */
#include "engine.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void free_batch(Batch *batch) { /* with the GIL */
    for (Py_ssize_t i = 0; i < batch->njobs; i++) {
        Job *job = &batch->jobs[i];
        for (Py_ssize_t k = 0; k < job->nviews; k++) PyBuffer_Release(&job->views[k]);
        PyMem_RawFree(job->views);
        free(job->record);
        archive_free(job->archive);
        free(job->key);
        free(job->final);
        free(job->temporary);
    }
    PyMem_RawFree(batch->jobs);
    PyMem_RawFree(batch->waits);
    Py_XDECREF(batch->token);
    PyMem_RawFree(batch);
}

/* Free the ready route's settled batches (their buffers' views, their tickets' references): with the
 * GIL, from whichever call into the engine comes next, so that no Python thread wakes per batch. */
void collect_garbage(Engine *e) {
    if (!e->garbage) return; /* read without the lock: a batch added meanwhile waits for the next call */
    pthread_mutex_lock(&e->lock);
    Batch *taken = e->garbage;
    e->garbage = NULL;
    pthread_mutex_unlock(&e->lock);
    for (Batch *b = taken, *next; b; b = next) {
        next = b->next;
        free_batch(b);
    }
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
    static char *names[] = {"threads", "durability", "root", "follow_symlinks", "journal", "max_count",
                            "max_bytes", "error_factory", NULL};
    int threads, durability, follow = 0, journal = -1;
    long long max_count = LLONG_MAX, max_bytes = LLONG_MAX;
    PyObject *root, *error_factory = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiU|piLLO", names, &threads, &durability, &root, &follow,
                                     &journal, &max_count, &max_bytes, &error_factory))
        return -1;
    if (e->threads) { PyErr_SetString(PyExc_RuntimeError, "Engine already initialised"); return -1; }
    if (threads < 1 || durability < 0 || durability > 2 || max_count < 1 || max_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "threads, max_count and max_bytes must be >= 1, durability 0, 1 or 2");
        return -1;
    }
    e->max_count = max_count;
    e->max_bytes = max_bytes;
    Py_INCREF(error_factory);
    e->error_factory = error_factory;
    pthread_mutex_init(&e->ticket_lock, NULL);
    pthread_cond_init(&e->ticket_cond, NULL);
    pthread_mutex_init(&e->budget_lock, NULL);
    pthread_cond_init(&e->budget_cond, NULL);
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

/* A CRC the format computed already (`known`, or None): taken, and no checksum pass (`*checksum`
 * cleared). 0, or -1 with an exception set. */
static int known_crc(Job *job, PyObject *known, int *checksum) {
    if (!*checksum || known == Py_None) return 0;
    unsigned long value = PyLong_AsUnsignedLong(known);
    if (value == (unsigned long)-1 && PyErr_Occurred()) return -1;
    if (value > 0xFFFFFFFFul) {
        PyErr_Format(PyExc_ValueError, "a file's crc is 32 bits, not %lu", value);
        return -1;
    }
    job->crc = (uint32_t)value;
    *checksum = 0;
    return 0;
}

/* A job's paths and journal record from Python: 0, or -1 with an exception set. */
static int fill_job(Engine *e, Job *job, PyObject *final, PyObject *temporary, PyObject *record) {
    if (record != Py_None) {
        if (!PyBytes_Check(record) || e->journal < 0) {
            PyErr_SetString(PyExc_TypeError, "a record is bytes, for an engine with a journal");
            return -1;
        }
        job->record_length = (size_t)PyBytes_GET_SIZE(record);
        job->record = malloc(job->record_length + 1);
        if (!job->record) { PyErr_NoMemory(); return -1; }
        memcpy(job->record, PyBytes_AS_STRING(record), job->record_length);
    }
    job->final = copy_path(final);
    job->temporary = job->final ? copy_path(temporary) : NULL;
    if (!job->temporary) return -1;
    char *slash = strrchr(job->final, '/');
    if (!slash) { PyErr_Format(PyExc_ValueError, "final path %R is not absolute", final); return -1; }
    job->directory_length = (size_t)(slash - job->final);
    return 0;
}

/* Views of a job's buffers (released by free_batch): 0, or -1 with an exception set. */
static int job_views(Job *job, PyObject *buffers) {
    PyObject *sequence = PySequence_Fast(buffers, "buffers must be a sequence of bytes-like objects");
    if (!sequence) return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    job->views = PyMem_RawCalloc((size_t)(count ? count : 1), sizeof(Py_buffer));
    if (!job->views) { Py_DECREF(sequence); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t k = 0; k < count; k++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(sequence, k), &job->views[k], PyBUF_SIMPLE) != 0) {
            Py_DECREF(sequence);
            return -1;
        }
        job->nviews++;
    }
    Py_DECREF(sequence);
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
        if (known_crc(job, known, &checksum) != 0) goto error;
        job->number = number;
        if (fill_job(e, job, final, temporary, record) != 0) goto error;
        job->checksum = checksum;
        if (buffers == Py_None) {
            if (fd < 0) { PyErr_SetString(PyExc_ValueError, "a file without buffers needs its fd"); goto error; }
            job->fd = fd;
            continue;
        }
        if (job_views(job, buffers) != 0) goto error;
    }
    pthread_mutex_lock(&e->lock);
    e->unreaped++;
    for (Py_ssize_t i = 0; i < n; i++) {
        jobs[i].next = NULL;
        if (e->tail) e->tail->next = &jobs[i]; else e->head = &jobs[i];
        e->tail = &jobs[i];
    }
    wake_workers(e, n, LLONG_MAX); /* prepared files: the caller's route, waking as before */
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
        int64_t number;
        int reserved = reserve_order(e, path, &number);
        free(path);
        PyObject *value = reserved == 0 ? PyLong_FromLongLong(number) : PyErr_NoMemory();
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
    Batch *taken = NULL, *due = NULL;
    int finished = 0;
    Py_BEGIN_ALLOW_THREADS
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += (time_t)timeout;
    deadline.tv_nsec += (long)((timeout - (double)(time_t)timeout) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&e->lock);
    while (!e->done_head && !e->due_head && !(e->closed && e->unreaped == 0)) {
        if (pthread_cond_timedwait(&e->done, &e->lock, &deadline) == ETIMEDOUT) break;
    }
    taken = e->done_head;
    e->done_head = e->done_tail = NULL;
    for (Batch *b = taken; b; b = b->next) e->unreaped--;
    due = e->due_head;
    e->due_head = e->due_tail = NULL;
    finished = !taken && !due && e->closed && e->unreaped == 0;
    int idle = !taken && !due && !e->closed; /* once closed, the journal may be too */
    pthread_mutex_unlock(&e->lock);
    if (idle) journal_flush(e); /* records held go out */
    Py_END_ALLOW_THREADS
    collect_garbage(e);
    if (finished) Py_RETURN_NONE;
    PyObject *out = PyList_New(0);
    for (Batch *b = taken, *next; b; b = next) {
        next = b->next;
        PyObject *pair = out ? batch_outcome(b) : NULL;
        if (pair) { if (PyList_Append(out, pair) != 0) Py_CLEAR(out); Py_DECREF(pair); }
        else Py_CLEAR(out);
        free_batch(b);
    }
    for (Batch *b = due, *next; b; b = next) { /* (ticket, None): its done-callbacks are due */
        next = b->next;
        PyObject *pair = out ? PyTuple_Pack(2, (PyObject *)b->ticket, Py_None) : NULL;
        if (pair) { if (PyList_Append(out, pair) != 0) Py_CLEAR(out); Py_DECREF(pair); }
        else Py_CLEAR(out);
        free_batch(b);
    }
    return out;
}

/* ---- The budget, and the ready route ------------------------------------------------------------ */

static int budget_fits(Engine *e, long long nbytes) {
    return e->budget_count < e->max_count && (e->budget_count == 0 || e->budget_bytes + nbytes <= e->max_bytes);
}

/* Take room for one write of `nbytes` (waiting without the GIL); the seconds waited. The lock is
 * never held while the GIL is taken: a thread holding the GIL may be waiting for the lock. */
double budget_take(Engine *e, long long nbytes) {
    pthread_mutex_lock(&e->budget_lock);
    if (budget_fits(e, nbytes)) {
        e->budget_count++;
        e->budget_bytes += nbytes;
        pthread_mutex_unlock(&e->budget_lock);
        return 0;
    }
    pthread_mutex_unlock(&e->budget_lock);
    double waited;
    Py_BEGIN_ALLOW_THREADS
    double start = monotonic_seconds();
    pthread_mutex_lock(&e->budget_lock);
    e->budget_waiting++;
    while (!budget_fits(e, nbytes)) pthread_cond_wait(&e->budget_cond, &e->budget_lock);
    e->budget_waiting--;
    e->budget_count++;
    e->budget_bytes += nbytes;
    pthread_mutex_unlock(&e->budget_lock);
    waited = monotonic_seconds() - start;
    Py_END_ALLOW_THREADS
    return waited;
}

static void budget_give(Engine *e, long long nbytes, long long count) {
    pthread_mutex_lock(&e->budget_lock);
    e->budget_count -= count;
    e->budget_bytes -= nbytes;
    if (e->budget_waiting) pthread_cond_broadcast(&e->budget_cond);
    pthread_mutex_unlock(&e->budget_lock);
}

static PyObject *Engine_admit(Engine *e, PyObject *arg) {
    if (!usable(e)) return NULL;
    long long nbytes = PyLong_AsLongLong(arg);
    if (nbytes == -1 && PyErr_Occurred()) return NULL;
    return PyFloat_FromDouble(budget_take(e, nbytes));
}

static PyObject *Engine_give_back(Engine *e, PyObject *args) {
    long long nbytes, count;
    if (!PyArg_ParseTuple(args, "LL", &nbytes, &count) || !usable(e)) return NULL;
    budget_give(e, nbytes, count);
    Py_RETURN_NONE;
}

/* A ready-route batch of `n` files taking `nbytes` of the budget, with its handle (its paths list
 * filled by the caller): NULL with an exception set if out of memory. */
Batch *ready_batch(Engine *e, Py_ssize_t n, long long nbytes) {
    Batch *batch = PyMem_RawCalloc(1, sizeof(Batch));
    Job *jobs = PyMem_RawCalloc((size_t)n, sizeof(Job));
    Ticket *ticket = PyObject_New(Ticket, &HandleType);
    PyObject *paths = PyList_New(n);
    if (!batch || !jobs || !ticket || !paths) {
        PyMem_RawFree(batch);
        PyMem_RawFree(jobs);
        Py_XDECREF((PyObject *)ticket);
        Py_XDECREF(paths);
        PyErr_NoMemory();
        return NULL;
    }
    memset((char *)ticket + sizeof(PyObject), 0, sizeof(Ticket) - sizeof(PyObject));
    PyObject_GC_UnTrack(paths); /* it holds str only, so no cycle: one write less for the collector */
    Py_INCREF(e);
    ticket->engine = e;
    ticket->paths = paths;
    batch->jobs = jobs;
    batch->njobs = n;
    batch->remaining = n;
    batch->token = (PyObject *)ticket; /* the batch's reference, given up with it */
    batch->ticket = ticket;
    batch->budget_bytes = nbytes;
    for (Py_ssize_t i = 0; i < n; i++) {
        jobs[i].batch = batch;
        jobs[i].fd = -1;
    }
    return batch;
}

/* Number a ready batch's files, take its room in the budget (waiting without the GIL) and queue
 * it: its handle (a new reference), or NULL with an exception set (the batch freed). `*waited`: the
 * seconds the budget kept it waiting. */
PyObject *queue_ready(Engine *e, Batch *batch, double *waited) {
    Job *jobs = batch->jobs;
    Py_ssize_t n = batch->njobs, reserved = 0;
    for (; reserved < n; reserved++) { /* numbered in call order: the latest write to a path wins */
        if (reserve_order(e, jobs[reserved].final, &jobs[reserved].number) != 0) {
            for (Py_ssize_t i = 0; i < reserved; i++) release_order(e, jobs[i].final);
            free_batch(batch); /* and the ticket with it */
            return PyErr_NoMemory();
        }
    }
    *waited = budget_take(e, batch->budget_bytes);
    Ticket *ticket = batch->ticket;
    pthread_mutex_lock(&e->ticket_lock);
    ticket->next = e->pending;
    if (e->pending) e->pending->prev = ticket;
    e->pending = ticket;
    e->npending++;
    pthread_mutex_unlock(&e->ticket_lock);
    Py_INCREF(ticket); /* the caller's reference, taken before the threads may settle and free it */
    pthread_mutex_lock(&e->lock);
    for (Py_ssize_t i = 0; i < n; i++) {
        jobs[i].next = NULL;
        if (e->tail) e->tail->next = &jobs[i]; else e->head = &jobs[i];
        e->tail = &jobs[i];
    }
    wake_workers(e, n, batch->budget_bytes);
    pthread_mutex_unlock(&e->lock);
    return (PyObject *)ticket;
}

/* The batch's copy waits from Python: (wait, argument, setup, setup_argument, clear, set_device,
 * device) each, the functions as addresses (0: none but wait). 0, or -1 with an exception set. */
static int copy_waits(Batch *batch, PyObject *waits) {
    if (waits == Py_None) return 0;
    PyObject *items = PySequence_Fast(waits, "waits is a list of (wait, argument, setup, setup_argument, clear, set_device, device)");
    if (!items) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
    batch->waits = n ? PyMem_RawCalloc((size_t)n, sizeof(CopyWait)) : NULL;
    if (n && !batch->waits) { Py_DECREF(items); PyErr_NoMemory(); return -1; }
    batch->nwaits = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long wait, argument, setup, clear, set_device;
        int setup_argument, device;
        CopyWait *w = &batch->waits[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, i), "KKKiKKi", &wait, &argument, &setup,
                              &setup_argument, &clear, &set_device, &device)) { Py_DECREF(items); return -1; }
        if (!wait) { Py_DECREF(items); PyErr_SetString(PyExc_ValueError, "a copy wait needs its function"); return -1; }
        w->wait = (int (*)(void *))(uintptr_t)wait;
        w->argument = (void *)(uintptr_t)argument;
        w->setup = (int (*)(int *))(uintptr_t)setup;
        w->setup_argument = setup_argument;
        w->clear = (int (*)(void))(uintptr_t)clear;
        w->set_device = (int (*)(int))(uintptr_t)set_device;
        w->device = device;
    }
    Py_DECREF(items);
    return 0;
}

/* A write that was not queued: its `settled` callable is called here (the caller gives that up to
 * write_ready), with the error that stopped it kept. */
static void not_queued(PyObject *settled) {
    if (settled == Py_None) return;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *ran = PyObject_CallOneArg(settled, Py_None);
    if (!ran) PyErr_WriteUnraisable(settled);
    Py_XDECREF(ran);
    PyErr_Restore(type, value, traceback);
}

/* write_ready(keys, files, nbytes, waits=None, settled=None, staged=False): one write whose bytes are in host
 * memory, in one call: number its files, take room in the budget (waiting without the GIL), queue
 * them, and return its handle with the seconds waited. Each file is (final, temporary, buffers,
 * checksum, record, crc, payload); keys[i] names file i's write in a failure. With `waits` (see
 * copy_waits), the bytes are still on their way from a device: the threads wait for those copies
 * before they write any of them. `settled(handle)` is the handle's first done-callback, in place
 * before the write is queued (so that no interruption can lose it), and called here with None if
 * the write is refused instead; `staged`: the handle is staged at once (the write's arrays are
 * copies). Completion, statistics and the budget are the threads'. */
static PyObject *Engine_write_ready(Engine *e, PyObject *args) {
    PyObject *keys, *files, *waits = Py_None, *settled = Py_None;
    long long nbytes;
    int staged = 0;
    if (!PyArg_ParseTuple(args, "O!O!L|OOp", &PyList_Type, &keys, &PyList_Type, &files, &nbytes, &waits,
                          &settled, &staged))
        return NULL;
    if (!usable(e)) { not_queued(settled); return NULL; }
    if (e->closed) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is closed");
        not_queued(settled);
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(files);
    if (n == 0 || PyList_GET_SIZE(keys) != n) {
        PyErr_SetString(PyExc_ValueError, "write_ready() takes one key per file, and at least one file");
        not_queued(settled);
        return NULL;
    }
    if (import_helpers() != 0) { not_queued(settled); return NULL; }
    collect_garbage(e);
    Batch *batch = ready_batch(e, n, nbytes);
    if (!batch) { not_queued(settled); return NULL; }
    if (copy_waits(batch, waits) != 0) goto error;
    batch->ticket->staged = staged; /* its sources were copied already: the caller may change them */
    if (settled != Py_None && !(batch->ticket->callbacks = PyList_New(1))) goto error;
    if (settled != Py_None) { Py_INCREF(settled); PyList_SET_ITEM(batch->ticket->callbacks, 0, settled); }
    PyObject *paths = batch->ticket->paths;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(files, i), *final, *temporary, *buffers, *record, *known;
        int checksum;
        unsigned long long payload;
        Job *job = &batch->jobs[i];
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "UUOpOOK", &final, &temporary, &buffers, &checksum,
                                                      &record, &known, &payload)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError,
                                "each file is (final, temporary, buffers, checksum, record, crc, payload)");
            goto error;
        }
        Py_INCREF(final);
        PyList_SET_ITEM(paths, i, final);
        job->payload = payload;
        if (known_crc(job, known, &checksum) != 0 || fill_job(e, job, final, temporary, record) != 0 ||
            job_views(job, buffers) != 0)
            goto error;
        job->checksum = checksum;
        PyObject *key = PyUnicode_AsUTF8String(PyList_GET_ITEM(keys, i));
        if (!key) goto error;
        job->key = strdup(PyBytes_AS_STRING(key));
        Py_DECREF(key);
        if (!job->key) { PyErr_NoMemory(); goto error; }
    }
    double waited;
    Py_INCREF(settled); /* queue_ready frees the batch, its ticket and their callbacks if it fails */
    PyObject *handle = queue_ready(e, batch, &waited);
    if (!handle) not_queued(settled);
    Py_DECREF(settled);
    return handle ? Py_BuildValue("(Nd)", handle, waited) : NULL;
error:
    free_batch(batch); /* and the ticket with it */
    not_queued(settled);
    return NULL;
}

/* drain(): wait for every ready-route write made before this call. */
static PyObject *Engine_drain(Engine *e, PyObject *unused) {
    if (!usable(e)) return NULL;
    collect_garbage(e);
    pthread_mutex_lock(&e->ticket_lock);
    Py_ssize_t n = e->npending, k = 0;
    Ticket **waiting = n ? PyMem_Malloc((size_t)n * sizeof(Ticket *)) : NULL;
    if (n && !waiting) { pthread_mutex_unlock(&e->ticket_lock); return PyErr_NoMemory(); }
    for (Ticket *t = e->pending; t && k < n; t = t->next) { Py_INCREF(t); waiting[k++] = t; }
    pthread_mutex_unlock(&e->ticket_lock);
    int failed = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (!failed && ticket_wait(waiting[i], Py_None) < 0) failed = 1;
        Py_DECREF(waiting[i]);
    }
    PyMem_Free(waiting);
    if (failed) return NULL;
    Py_BEGIN_ALLOW_THREADS /* and for their done-callbacks to be handed on (see handed()) */
    pthread_mutex_lock(&e->lock);
    while (e->due_count > 0 && !e->closed) pthread_cond_wait(&e->done, &e->lock);
    pthread_mutex_unlock(&e->lock);
    journal_flush(e); /* their records, held until now (a failure is the engine's first, or not) */
    Py_END_ALLOW_THREADS
    collect_garbage(e);
    Py_RETURN_NONE;
}

/* handed(n): the reaper has handed on the callbacks of `n` settled handles that reap() gave it. */
static PyObject *Engine_handed(Engine *e, PyObject *arg) {
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&e->lock);
    e->due_count -= n;
    pthread_cond_broadcast(&e->done);
    pthread_mutex_unlock(&e->lock);
    Py_RETURN_NONE;
}

/* counters(): the ready route's (files committed, their payload bytes, files failed, time of the
 * latest in time.perf_counter()'s clock, writes in flight, time of the first failure), and the plain
 * route's as one tuple (write_plain() calls that wrote, seconds in them, seconds of those waiting for
 * room, time of the first). */
static PyObject *Engine_counters(Engine *e, PyObject *unused) {
    pthread_mutex_lock(&e->lock);
    long long files = e->files_done, nbytes = e->bytes_done, failed = e->files_failed;
    double last = e->last_commit, failed_at = e->failed_at;
    pthread_mutex_unlock(&e->lock);
    pthread_mutex_lock(&e->ticket_lock);
    Py_ssize_t pending = e->npending;
    pthread_mutex_unlock(&e->ticket_lock);
    return Py_BuildValue("(LLLdnd(Lddd))", files, nbytes, failed, last, pending, failed_at, e->plain_calls,
                         e->plain_seconds, e->plain_blocked, e->plain_first);
}

static PyObject *Engine_budget_waiting(Engine *e, void *unused) {
    pthread_mutex_lock(&e->budget_lock);
    int waiting = e->budget_waiting;
    pthread_mutex_unlock(&e->budget_lock);
    return PyLong_FromLong(waiting);
}

/* failure: the ready route's first failed write as an exception (the same object each time), or None. */
static PyObject *Engine_failure(Engine *e, void *unused) {
    if (e->failure) { Py_INCREF(e->failure); return e->failure; }
    pthread_mutex_lock(&e->lock);
    int failed = e->failed;
    Ticket *ticket = e->failed_ticket;
    if (ticket) Py_INCREF(ticket); /* with the GIL: it cannot be freed meanwhile */
    pthread_mutex_unlock(&e->lock);
    if (!failed) Py_RETURN_NONE;
    if (ticket) { /* the same exception its write's handle raises */
        PyObject *shared = ticket_exception(ticket);
        Py_DECREF(ticket);
        if (!shared) return NULL;
        if (!e->failure) { e->failure = shared; Py_INCREF(shared); }
        return shared;
    }
    PyObject *made = PyObject_CallFunction(e->error_factory, "isss", e->fail_errno, e->fail_operation,
                                           e->fail_final ? e->fail_final : "", e->fail_key ? e->fail_key : "");
    if (!made) return NULL;
    if (!e->failure) { e->failure = made; Py_INCREF(made); }
    return made;
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
    journal_flush(e);
    journal_forget(e);
    Py_END_ALLOW_THREADS
    collect_garbage(e);
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
        for (Batch *b = e->due_head, *n; b; b = n) { n = b->next; free_batch(b); }
        collect_garbage(e);
        table_free(&e->syncs);
        table_free(&e->folders);
        for (int i = 0; i < STRIPES; i++) table_free(&e->order[i]);
        free(e->threads);
    }
    plain_free(e);
    free(e->held);
    free(e->held_final);
    free(e->held_key);
    free(e->root);
    free(e->fail_final);
    free(e->fail_key);
    Py_XDECREF(e->failure);
    Py_XDECREF(e->error_factory);
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
    {"admit", (PyCFunction)Engine_admit, METH_O,
     "admit(nbytes): take room in the budget for one write (waiting for it); the seconds waited."},
    {"give_back", (PyCFunction)Engine_give_back, METH_VARARGS,
     "give_back(nbytes, count): return the room of `count` writes that took `nbytes` in all."},
    {"write_ready", (PyCFunction)Engine_write_ready, METH_VARARGS,
     "write_ready(keys, files, nbytes): queue one write whose bytes are in host memory; (handle, waited)."},
    {"drain", (PyCFunction)Engine_drain, METH_NOARGS, "drain(): wait for every write_ready() made so far."},
    {"handed", (PyCFunction)Engine_handed, METH_O, "handed(n): n handles' due callbacks were handed on."},
    {"counters", (PyCFunction)Engine_counters, METH_NOARGS,
     "counters(): (files, payload bytes, files failed, latest commit time, writes in flight, first failure "
     "time) of the ready route, and (calls, seconds, seconds blocked, first time) of write_plain()."},
    {"plain", (PyCFunction)Engine_plain, METH_VARARGS,
     "plain(format, alignment, tensor_type, ndarray_type, token, pt_template=None): open the plain route "
     "(1 npy, 2 safetensors, 3 pt with formats.pt.pt_template)."},
    {"plain_off", (PyCFunction)Engine_plain_off, METH_VARARGS,
     "plain_off(wait=False): close the plain route; with wait, wait for the calls inside it."},
    {"folder_checked", (PyCFunction)Engine_folder_checked, METH_O,
     "folder_checked(folder): the caller found `folder` free of symlinks; plain writes may go there."},
    {"plan_plain", (PyCFunction)Engine_plan_plain, METH_VARARGS,
     "plan_plain(key, value): (final, temporary, header, record) as write_plain() would queue them, or None."},
    {"write_plain", (PyCFunction)(void (*)(void))Engine_write_plain, METH_FASTCALL,
     "write_plain(key, value): one host array's write in one call: its handle, or None (Python decides)."},
    {"write_plain_batch", (PyCFunction)(void (*)(void))Engine_write_plain_batch, METH_FASTCALL,
     "write_plain_batch(keys, batch): write_batch() of one host array, a file per sample: handle or None."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"pending", (getter)Engine_pending, NULL, "batches submitted and not yet reaped", NULL},
    {"failure", (getter)Engine_failure, NULL, "the first write_ready() failure as an exception, or None", NULL},
    {"budget_waiting", (getter)Engine_budget_waiting, NULL, "callers waiting for room in the budget", NULL},
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
