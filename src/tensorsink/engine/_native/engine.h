/* The native write engine: the commit protocol for batches of files, run by POSIX threads that never
 * take the GIL.
 *
 * Python hands over a batch (a token and its files: final path, temporary path, buffers or an open
 * descriptor) in one call; the threads create each temporary, write its buffers with writev, fsync by
 * durability, close, rename it into place unless a later write to that path was renamed already
 * (latest write wins), fsync directories together (FULL) and unlink the temporary on failure. Python
 * collects finished batches in one call (`reap`), which releases the buffers it had pinned.
 *
 * This header holds what the engine's files share: the Engine object, its batches and their files
 * (jobs), and the functions one file calls in another:
 *   engine.c   the Engine type's Python interface: init, reserve, release, submit, reap, close
 *   commit.c   the commit protocol a thread runs per file, and the threads' loop
 *   folders.c  folders made (mkdir -p below the root, symlinks refused) and fsynced together (FULL)
 *   order.c    latest write wins: the per-path numbers, striped
 *   journal.c  the journal lines around each rename
 *   module.c   the module: its type, and the CRC chosen at import
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
    /* outcome */
    int replaced, error;
    const char *operation;
    uint64_t size;
    uint32_t crc;
    double renamed_at;
} Job;

struct Batch {
    Batch *next; /* in the done queue */
    PyObject *token;
    Job *jobs;
    Py_ssize_t njobs, remaining;
};

#define STRIPES 64

typedef struct {
    PyObject_HEAD
    int durability, follow_symlinks, nthreads, started, stopping, closed;
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
    /* the journal: records appended whole (cut back on failure) */
    int journal;
    pthread_mutex_t journal_lock;
} Engine;

#pragma GCC visibility push(hidden) /* shared by the extension's files, not exported from it */

/* engine.c: the Python type. */
extern PyTypeObject EngineType;

/* commit.c: a thread's loop, taking jobs off the queue until the engine stops. */
void *worker(void *arg);

/* folders.c: make the folder (once), forget it (removed since), fsync it with others (FULL). */
int make_folders(Engine *e, const char *folder, const char **operation);
void forget_folder(Engine *e, const char *folder);
int sync_directory(Engine *e, const char *folder);

/* order.c: the path's stripe of the order tables (and its hash); give back one number reserved for it. */
size_t stripe_of(const char *path, uint64_t *h);
void release_order(Engine *e, const char *path);

/* journal.c: append the job's journal line, before its rename or after it. */
int journal_line(Engine *e, Job *job, int renaming, double when);

#pragma GCC visibility pop

#endif
