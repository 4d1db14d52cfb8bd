/* The ready route's handle (what write() returns there): the uses of a concurrent.futures.Future
 * (done, result, exception, add_done_callback) and of a WriteFuture (staged, wait_staged), settled by
 * the engine's threads (commit.c's settle) without the GIL; waits release the GIL. */
#include "engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- Tickets: what write() returns on the ready route ----------------------------------------------
 * A handle with the uses of a concurrent.futures.Future (done, result, exception, add_done_callback)
 * and of a WriteFuture (staged, wait_staged), made in C and settled by the engine's threads. Its
 * failure is made into an exception by the engine's error_factory, when first asked for. */

static PyObject *path_type;      /* pathlib.Path */
static PyObject *timeout_error;  /* concurrent.futures.TimeoutError */
static PyObject *run_callback;   /* tensorsink.future.run_callback(fn, handle): a Future's way to call */
static PyObject *as_future;      /* tensorsink.future.as_future(handle) */

int import_helpers(void) {
    if (run_callback) return 0;
    PyObject *module = PyImport_ImportModule("pathlib");
    if (!module) return -1;
    path_type = PyObject_GetAttrString(module, "Path");
    Py_DECREF(module);
    module = PyImport_ImportModule("concurrent.futures");
    if (!module) return -1;
    timeout_error = PyObject_GetAttrString(module, "TimeoutError");
    Py_DECREF(module);
    module = PyImport_ImportModule("tensorsink.future");
    if (!module) return -1;
    run_callback = PyObject_GetAttrString(module, "run_callback");
    as_future = PyObject_GetAttrString(module, "as_future");
    Py_DECREF(module);
    return path_type && timeout_error && run_callback && as_future ? 0 : -1;
}

static int ticket_done(Ticket *t) {
    pthread_mutex_lock(&t->engine->ticket_lock);
    int done = t->done;
    pthread_mutex_unlock(&t->engine->ticket_lock);
    return done;
}

/* Whether its sources may be modified again: once settled, or once the copies from a device that its
 * files waited for have landed (commit.c). */
static int ticket_staged(Ticket *t) {
    pthread_mutex_lock(&t->engine->ticket_lock);
    int staged = t->done || t->staged;
    pthread_mutex_unlock(&t->engine->ticket_lock);
    return staged;
}

static int ticket_wait_until(Ticket *t, PyObject *timeout, int staged);

/* Wait until settled, without the GIL: 1 settled, 0 timed out, -1 error (a child of fork()). */
int ticket_wait(Ticket *t, PyObject *timeout) { return ticket_wait_until(t, timeout, 0); }

/* Wait until settled, or with `staged` until staged too. */
static int ticket_wait_until(Ticket *t, PyObject *timeout, int staged) {
    if (staged ? ticket_staged(t) : ticket_done(t)) return 1;
    if (t->engine->pid != getpid()) {
        PyErr_SetString(PyExc_RuntimeError, "this write was made before fork(): it is not settled in this process");
        return -1;
    }
    double seconds = -1;
    if (timeout != Py_None) {
        seconds = PyFloat_AsDouble(timeout);
        if (seconds == -1 && PyErr_Occurred()) return -1;
        if (seconds < 0) seconds = 0;
    }
    Engine *e = t->engine;
    int done;
    Py_BEGIN_ALLOW_THREADS
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    if (seconds >= 0) {
        deadline.tv_sec += (time_t)seconds;
        deadline.tv_nsec += (long)((seconds - (double)(time_t)seconds) * 1e9);
        if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    }
    pthread_mutex_lock(&e->ticket_lock);
    while (!t->done && !(staged && t->staged)) {
        if (seconds < 0) pthread_cond_wait(&e->ticket_cond, &e->ticket_lock);
        else if (pthread_cond_timedwait(&e->ticket_cond, &e->ticket_lock, &deadline) == ETIMEDOUT) break;
    }
    done = t->done || (staged && t->staged);
    pthread_mutex_unlock(&e->ticket_lock);
    Py_END_ALLOW_THREADS
    return done;
}

/* The settled ticket's exception (new reference), or NULL with none set: no failure. */
PyObject *ticket_exception(Ticket *t) {
    if (t->exception) { Py_INCREF(t->exception); return t->exception; }
    if (!t->error) return NULL;
    PyObject *made = PyObject_CallFunction(t->engine->error_factory, "isss", t->error, t->operation,
                                           t->failed_final ? t->failed_final : "",
                                           t->failed_key ? t->failed_key : "");
    if (!made) return NULL;
    t->exception = made;
    Py_INCREF(made);
    return made;
}

static PyObject *Ticket_done(Ticket *t, PyObject *unused) { return PyBool_FromLong(ticket_done(t)); }

static PyObject *Ticket_running(Ticket *t, PyObject *unused) { return PyBool_FromLong(!ticket_done(t)); }

static PyObject *Ticket_false(Ticket *t, PyObject *unused) { Py_RETURN_FALSE; } /* cancel(), cancelled() */

static int parse_timeout(PyObject *args, PyObject *kwargs, PyObject **timeout) {
    static char *names[] = {"timeout", NULL};
    *timeout = Py_None;
    return PyArg_ParseTupleAndKeywords(args, kwargs, "|O", names, timeout);
}

/* result()'s and exception()'s wait, for their `timeout`: 1 settled, else 0 with an exception set
 * (concurrent.futures.TimeoutError, as a Future's). */
static int wait_settled(Ticket *t, PyObject *args, PyObject *kwargs) {
    PyObject *timeout;
    if (!parse_timeout(args, kwargs, &timeout)) return 0;
    int done = ticket_wait(t, timeout);
    if (done == 0) PyErr_SetString(timeout_error, "the write is not done yet");
    return done > 0;
}

static PyObject *Ticket_result(Ticket *t, PyObject *args, PyObject *kwargs) {
    if (!wait_settled(t, args, kwargs)) return NULL;
    PyObject *failure = ticket_exception(t);
    if (failure) {
        PyErr_SetObject((PyObject *)Py_TYPE(failure), failure);
        Py_DECREF(failure);
        return NULL;
    }
    if (PyErr_Occurred()) return NULL;
    if (!t->result) {
        Py_ssize_t n = PyList_GET_SIZE(t->paths);
        PyObject *paths = PyList_New(n);
        if (!paths) return NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *path = PyObject_CallOneArg(path_type, PyList_GET_ITEM(t->paths, i));
            if (!path) { Py_DECREF(paths); return NULL; }
            PyList_SET_ITEM(paths, i, path);
        }
        t->result = paths;
    }
    return PyList_GetSlice(t->result, 0, PyList_GET_SIZE(t->result)); /* a list of its own, as Future's */
}

static PyObject *Ticket_exception(Ticket *t, PyObject *args, PyObject *kwargs) {
    if (!wait_settled(t, args, kwargs)) return NULL;
    PyObject *failure = ticket_exception(t);
    if (failure || PyErr_Occurred()) return failure;
    Py_RETURN_NONE;
}

static PyObject *Ticket_wait_staged(Ticket *t, PyObject *args, PyObject *kwargs) {
    PyObject *timeout;
    if (!parse_timeout(args, kwargs, &timeout)) return NULL;
    int staged = ticket_wait_until(t, timeout, 1); /* host memory is read until the files are written */
    if (staged < 0) return NULL;
    return PyBool_FromLong(staged);
}

static PyObject *Ticket_staged(Ticket *t, PyObject *unused) { return PyBool_FromLong(ticket_staged(t)); }

static PyObject *Ticket_add_done_callback(Ticket *t, PyObject *callback) {
    Engine *e = t->engine;
    /* Made before the lock is taken: an allocation may run the garbage collector, and so any code. */
    PyObject *fresh = PyList_New(1);
    if (!fresh) return NULL;
    Py_INCREF(callback);
    PyList_SET_ITEM(fresh, 0, callback);
    pthread_mutex_lock(&e->ticket_lock);
    int done = t->done;
    int failed = 0;
    if (!done && !t->callbacks) {
        t->callbacks = fresh;
        fresh = NULL;
    } else if (!done) {
        failed = PyList_Append(t->callbacks, callback) != 0; /* a resize: no collection, no code */
    }
    pthread_mutex_unlock(&e->ticket_lock);
    Py_XDECREF(fresh);
    if (failed) return NULL;
    if (done) { /* on the caller's thread, as a Future does */
        PyObject *ran = PyObject_CallFunctionObjArgs(run_callback, callback, (PyObject *)t, NULL);
        if (!ran) return NULL;
        Py_DECREF(ran);
    }
    Py_RETURN_NONE;
}

/* The callbacks added while it was pending, taken (for the writer's callback thread to run). */
static PyObject *Ticket_take_callbacks(Ticket *t, PyObject *unused) {
    pthread_mutex_lock(&t->engine->ticket_lock);
    PyObject *callbacks = t->callbacks;
    t->callbacks = NULL;
    pthread_mutex_unlock(&t->engine->ticket_lock);
    if (!callbacks) return PyList_New(0);
    return callbacks;
}

static PyObject *Ticket_as_future(Ticket *t, PyObject *unused) {
    return PyObject_CallOneArg(as_future, (PyObject *)t);
}

static PyObject *Ticket_repr(Ticket *t) {
    int done = ticket_done(t);
    return PyUnicode_FromFormat("<Handle %s %R>", done ? (t->error ? "failed" : "done") : "pending",
                                t->paths);
}

static void Ticket_dealloc(Ticket *t) {
    pthread_mutex_lock(&t->engine->lock);
    if (t->engine->failed_ticket == t) t->engine->failed_ticket = NULL;
    pthread_mutex_unlock(&t->engine->lock);
    free(t->failed_final);
    free(t->failed_key);
    Py_XDECREF(t->paths);
    Py_XDECREF(t->result);
    Py_XDECREF(t->exception);
    Py_XDECREF(t->callbacks);
    Py_XDECREF((PyObject *)t->engine);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *Ticket_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyErr_SetString(PyExc_TypeError, "write handles are made by the engine (AsyncWriter.write)");
    return NULL;
}

static PyMethodDef Ticket_methods[] = {
    {"done", (PyCFunction)Ticket_done, METH_NOARGS, "Whether the write's files are committed (or it failed)."},
    {"running", (PyCFunction)Ticket_running, METH_NOARGS, "Whether the write is still under way."},
    {"cancel", (PyCFunction)Ticket_false, METH_NOARGS, "Writes cannot be cancelled: False."},
    {"cancelled", (PyCFunction)Ticket_false, METH_NOARGS, "False: writes are never cancelled."},
    {"result", (PyCFunction)(void (*)(void))Ticket_result, METH_VARARGS | METH_KEYWORDS,
     "result(timeout=None): the committed files (a list of Path); raises the write's failure."},
    {"exception", (PyCFunction)(void (*)(void))Ticket_exception, METH_VARARGS | METH_KEYWORDS,
     "exception(timeout=None): the write's failure, or None."},
    {"add_done_callback", (PyCFunction)Ticket_add_done_callback, METH_O,
     "add_done_callback(fn): fn(handle) once settled: at once if it is, else on the writer's callback thread."},
    {"staged", (PyCFunction)Ticket_staged, METH_NOARGS,
     "Whether the source arrays may be modified again (host arrays: once the files are written; device "
     "tensors: once their copies to host memory have landed)."},
    {"wait_staged", (PyCFunction)(void (*)(void))Ticket_wait_staged, METH_VARARGS | METH_KEYWORDS,
     "wait_staged(timeout=None): wait until the sources may be modified again; False on timeout."},
    {"as_future", (PyCFunction)Ticket_as_future, METH_NOARGS,
     "as_future(): a concurrent.futures.Future settled with this write (for concurrent.futures.wait)."},
    {"_take_callbacks", (PyCFunction)Ticket_take_callbacks, METH_NOARGS, "The pending callbacks, taken."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject HandleType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensorsink.engine._native.Handle",
    .tp_basicsize = sizeof(Ticket),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The handle of a write on the ready route: a future settled by the engine's threads.",
    .tp_new = Ticket_new,
    .tp_dealloc = (destructor)Ticket_dealloc,
    .tp_repr = (reprfunc)Ticket_repr,
    .tp_methods = Ticket_methods,
};
