/* The native write engine: the commit protocol for batches of files, run by POSIX threads that never
 * take the GIL.
 *
 * Python hands over a batch (a token and its files: final path, temporary path, buffers or an open
 * descriptor) in one call; the threads create each temporary, write its buffers with writev, fsync by
 * durability, close, rename it into place unless a later write to that path was renamed already
 * (latest write wins), fsync directories together (FULL) and unlink the temporary on failure. Python
 * collects finished batches in one call (`reap`), which releases the buffers it had pinned. A write
 * whose bytes are in host memory takes the ready route instead (`write_ready`): numbered, admitted
 * under the budget and queued in one call, then settled, counted and given its budget back by the
 * threads, its Python objects freed by the next call that holds the GIL.
 *
 * This header holds what the engine's files share: the Engine object, its batches and their files
 * (jobs), and the functions one file calls in another:
 *   engine.c   the Engine type's Python interface: init, reserve, release, submit, reap, close
 *   commit.c   the commit protocol a thread runs per file, and the threads' loop
 *   folders.c  folders made (mkdir -p below the root, symlinks refused) and fsynced together (FULL)
 *   order.c    latest write wins: the per-path numbers, striped
 *   journal.c  the journal lines around each rename
 *   handle.c   the ready route's handle: a future settled by the threads, without the GIL
 *   plain.c    the plain route: write(key, array) in one call, key, path, header and record made in C
 *   tar.c      shards: a batch of samples appended to an open tar as members, with their journal entries
 *   module.c   the module: its types, and the CRC chosen at import
 */
#ifndef TENSORSINK_ENGINE_H
#define TENSORSINK_ENGINE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "files.h"
#include "table.h"

/* ---- Jobs and batches ---------------------------------------------------------------------------- */

typedef struct Batch Batch;
typedef struct Archive Archive;

typedef struct Job {
    struct Job *next; /* in the work queue */
    Batch *batch;
    char *final, *temporary;
    size_t directory_length; /* final[:directory_length] is its folder */
    Py_buffer *views;
    Py_ssize_t nviews;
    int fd; /* >= 0: a temporary Python already wrote; the engine syncs, closes and renames it */
    int checksum;
    char *record; /* the journal line's start ({"key":...,"arrays":[...]), or NULL: no journal */
    size_t record_length;
    int64_t number; /* order of reserve(): the latest number renamed wins */
    char *key;        /* the write's key, on the ready route (to name it in a failure), else NULL */
    uint64_t payload; /* the arrays' bytes, for the statistics (the ready route) */
    Archive *archive; /* a plain .pt: the archive after its storage (its third view), filled on writing */
    /* outcome */
    int replaced, error;
    const char *operation;
    uint64_t size;
    uint32_t crc;
    double renamed_at;
} Job;

typedef struct Ticket Ticket;
typedef struct Layout Layout;

/* A copy into host memory that a batch's files wait for before they are written (a CUDA event's, its
 * functions found by Python in the runtime torch loaded): wait(argument) returns 0 once the bytes are
 * there. Before each, set_device(device) where the thread's device differs (CUDA: the event's, so no
 * context is made on another device), then, before a thread's first wait, setup(&setup_argument)
 * (CUDA: relaxed capture mode, so that a producer capturing a graph is not disturbed); after a
 * failed wait, clear() (the thread's last error). */
typedef struct {
    int (*wait)(void *);
    void *argument;
    int (*setup)(int *);
    int setup_argument;
    int (*clear)(void);
    int (*set_device)(int);
    int device;
} CopyWait;

struct Batch {
    Batch *next; /* in the done queue, or the garbage */
    CopyWait *waits; /* the copies its files wait for (the ready route), or NULL */
    Py_ssize_t nwaits;
    PyObject *token;
    Ticket *ticket; /* the ready route's handle, settled here (the token holds it); NULL: reaped */
    long long budget_bytes; /* what the ready route's write took of the budget */
    Job *jobs;
    Py_ssize_t njobs, remaining;
};

#define STRIPES 64

typedef struct {
    PyObject_HEAD
    int durability, follow_symlinks, nthreads, started, stopping, closed;
    int busy;           /* workers running a job (lock) */
    long long queued;   /* jobs in the queue (lock) */
    pid_t pid; /* the process that started the threads: a child of fork() has none of them */
    char *root;
    pthread_t *threads;
    /* work queue */
    pthread_mutex_t lock;
    pthread_cond_t work, done;
    Job *head, *tail;
    Batch *done_head, *done_tail;
    Py_ssize_t unreaped; /* batches submitted and not yet reaped */
    int64_t counter;
    /* latest-write-wins per path: a = writes in flight, b = number of the latest rename */
    pthread_mutex_t order_locks[STRIPES];
    Table order[STRIPES];
    /* group-committed directory fsyncs: a = requested, b = synced, c = users */
    pthread_mutex_t sync_lock;
    pthread_cond_t sync_cond;
    Table syncs;
    /* folders made or checked: a != 0 */
    pthread_mutex_t folder_lock;
    Table folders;
    /* the journal: lines appended whole (cut back on failure); records held to go out with the next */
    int journal;
    pthread_mutex_t journal_lock;
    char *held, *held_final, *held_key; /* the records held, and the first one's file and key */
    size_t held_length, held_capacity;
    /* The ready route (see "Tickets" below). Lock order: lock, then ticket_lock or budget_lock. */
    pthread_mutex_t ticket_lock; /* tickets' states, the pending list */
    pthread_cond_t ticket_cond;  /* a ticket was settled */
    Ticket *pending;             /* tickets not yet settled (a doubly linked list) */
    Py_ssize_t npending;
    Batch *due_head, *due_tail;  /* settled batches whose done-callbacks the reaper must hand on (lock) */
    long long due_count;         /* of those, not yet handed on (lock): drain() waits for them too */
    Batch *garbage;              /* settled batches whose Python objects wait for the GIL (lock) */
    pthread_mutex_t budget_lock; /* the writer's budget: writes and bytes in flight */
    pthread_cond_t budget_cond;
    long long budget_count, budget_bytes, max_count, max_bytes;
    int budget_waiting;
    long long files_done, bytes_done, files_failed; /* the ready route's statistics (lock) */
    double last_commit;                             /* CLOCK_MONOTONIC seconds of the latest (lock) */
    double failed_at;                               /* and of the first failure (lock) */
    int failed; /* the ready route's first failure (lock): its errno, operation, file and key */
    int fail_errno;
    const char *fail_operation;
    char *fail_final, *fail_key;
    PyObject *failure;       /* that failure as an exception, made on first ask (with the GIL) */
    Ticket *failed_ticket;   /* its ticket while alive (lock; cleared when freed): they share it */
    PyObject *error_factory; /* error_factory(errno, operation, final, key) -> the exception */
    /* The plain route (plain.c), with the GIL: off until Python configures it, and off again once the
     * writer fails or closes. */
    int plain_format;            /* 0: off; PLAIN_NPY, PLAIN_SAFETENSORS or PLAIN_PT */
    PyObject *pt_template;       /* formats.pt.pt_template, for PLAIN_PT */
    Py_ssize_t plain_alignment;  /* where the header pads the data to */
    PyObject *tensor_type, *ndarray_type; /* the exact types it takes (subclasses go to Python) */
    char plain_token[24];        /* its temporaries' token (not the Python committer's) */
    uint64_t plain_counter;
    Table checked;               /* folders the caller's check found free of symlinks */
    Layout *plain_layout;        /* the last dtype and shape's header and record tail */
    int plain_inside;            /* calls inside (budget_lock): close() waits for them */
    long long plain_calls;       /* its statistics: calls, seconds in them, seconds of those blocked, */
    double plain_seconds, plain_blocked, plain_first; /* and when the first began */
} Engine;

#define PLAIN_NPY 1
#define PLAIN_SAFETENSORS 2
#define PLAIN_PT 3

/* The handle of one ready-route write: settled by the thread that finishes its last file, which
 * needs no GIL for it (see "Tickets" below for its Python side). Fields below `done` are written
 * under the engine's ticket_lock until `done` is set, and only read after. */
struct Ticket {
    PyObject_HEAD
    Engine *engine;             /* a reference: its lock and condition outlive the ticket's waits */
    Ticket *prev, *next;        /* in the engine's pending list while not settled */
    int done;
    int staged;                 /* the copies from a device its files waited for have landed */
    int error;                  /* the first failed file's errno, 0 if none failed */
    const char *operation;
    char *failed_final, *failed_key;
    PyObject *paths;            /* the final paths (str), in order */
    PyObject *result;           /* the paths as pathlib.Path, made on first ask */
    PyObject *exception;        /* the failure as an exception, made on first ask */
    PyObject *callbacks;        /* done-callbacks added while pending (a list), or NULL */
};

#pragma GCC visibility push(hidden) /* shared by the extension's files, not exported from it */

/* engine.c: the Python type. */
extern PyTypeObject EngineType;

/* commit.c: a thread's loop, taking jobs off the queue until the engine stops. */
void *worker(void *arg);

/* folders.c: make the folder (once), forget it (removed since), fsync it with others (FULL). */
int make_folders(Engine *e, const char *folder, const char **operation);
void forget_folder(Engine *e, const char *folder);
int sync_directory(Engine *e, const char *folder);

/* order.c: the path's stripe of the order tables (and its hash); number a path, give one number back. */
size_t stripe_of(const char *path, uint64_t *h);
int reserve_order(Engine *e, const char *path, int64_t *number);
void release_order(Engine *e, const char *path);

/* Numbers as text at `at`, returning the end (no printf: its format parsing cost more than the rest of
 * a plain write's plan, or of a journal line): decimal or lower-case hex, at least `width` digits. */
static inline char *put_digits(char *at, unsigned long long value, int width, unsigned base) {
    char digits[24];
    int n = 0;
    do digits[n++] = "0123456789abcdef"[value % base], value /= base;
    while (value || n < width);
    while (n) *at++ = digits[--n];
    return at;
}
static inline char *put_decimal(char *at, unsigned long long value, int width) {
    return put_digits(at, value, width, 10);
}
static inline char *put_hexadecimal(char *at, unsigned long long value, int width) {
    return put_digits(at, value, width, 16);
}

/* tar.c: tar_pack(fd, size, crc, mtime, keys, rows, groups), a batch of samples appended to a shard. */
PyObject *tar_pack(PyObject *module, PyObject *args);

/* journal.c: append the job's journal line, before its rename or after it (held); write those held. */
int journal_line(Engine *e, Job *job, int renaming, double when);
size_t line_tail(char *tail, uint64_t size, uint32_t crc, int renaming, double when); /* 160 bytes */
void journal_flush(Engine *e);
void journal_forget(Engine *e);

/* commit.c: time.perf_counter()'s clock; wake workers for jobs queued (under e->lock); a ready-route
 * batch is finished: count it, give its budget back, settle its handle (under e->lock). */
double monotonic_seconds(void);
void wake_workers(Engine *e, Py_ssize_t n, long long nbytes);
void settle(Engine *e, Batch *batch);

/* engine.c: free a batch, and the ready route's settled ones (with the GIL); take room in the budget
 * (the seconds waited); a new ready-route batch of n files, and queue one (its handle, or NULL). */
void free_batch(Batch *batch);
void collect_garbage(Engine *e);
double budget_take(Engine *e, long long nbytes);
Batch *ready_batch(Engine *e, Py_ssize_t n, long long nbytes);
PyObject *queue_ready(Engine *e, Batch *batch, double *waited);

/* plain.c: the plain route's methods, listed in the Engine type; its state freed. */
PyObject *Engine_plain(Engine *e, PyObject *args);
PyObject *Engine_plain_off(Engine *e, PyObject *args);
PyObject *Engine_folder_checked(Engine *e, PyObject *folder);
PyObject *Engine_plan_plain(Engine *e, PyObject *args);
PyObject *Engine_write_plain(Engine *e, PyObject *const *args, Py_ssize_t nargs);
PyObject *Engine_write_plain_batch(Engine *e, PyObject *const *args, Py_ssize_t nargs);
void plain_free(Engine *e);
/* plain.c: fill a plain .pt's archive once its storage's CRC is known (a writing thread); free one. */
void fill_archive(Job *job);
void archive_free(Archive *archive);

/* handle.c: the ready route's handle type; wait for one (1 settled, 0 timed out, -1 error); its
 * failure as an exception (new reference, or NULL: none, or an error set); the Python helpers. */
extern PyTypeObject HandleType;
int ticket_wait(Ticket *t, PyObject *timeout);
PyObject *ticket_exception(Ticket *t);
int import_helpers(void);

#pragma GCC visibility pop

#endif
