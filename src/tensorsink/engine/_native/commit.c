/* The commit protocol, as a thread runs it for each file: make the folder, write the temporary (and its
 * CRC) or take the one Python wrote, fsync by durability, close, rename unless a later write to the path
 * was renamed already, journal, fsync the folder (FULL), unlink the temporary on failure; then settle
 * the file's batch. */
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "crc.h"

static void fail(Job *job, const char *operation) {
    if (!job->error) { job->error = errno ? errno : EIO; job->operation = operation; }
}

/* write_all() and the CRC of what it wrote. A large view is checksummed and written a piece at a
 * time, each piece written while the CRC has it in cache, so its bytes come from memory once; small
 * views go out together in one writev, then are checksummed (still in cache). */
enum { CRC_PIECE = 256 << 10 };

static int write_checksummed(int fd, Py_buffer *views, Py_ssize_t n, uint32_t *crc) {
    Py_ssize_t i = 0;
    while (i < n) {
        if (views[i].len >= CRC_PIECE) { /* a large view: checksum a piece, write it, and on */
            const unsigned char *data = views[i].buf;
            for (size_t offset = 0, length = (size_t)views[i].len; offset < length; offset += CRC_PIECE) {
                Py_buffer piece = {0};
                piece.buf = (void *)(data + offset);
                piece.len = (Py_ssize_t)(length - offset < CRC_PIECE ? length - offset : CRC_PIECE);
                *crc = crc_update(*crc, piece.buf, (size_t)piece.len);
                if (write_all(fd, &piece, 1) != 0) return -1;
            }
            i++;
            continue;
        }
        /* small views, up to a piece's worth: one writev, then their CRC while they are in cache */
        Py_ssize_t end = i;
        size_t bytes = 0;
        while (end < n && views[end].len < CRC_PIECE && bytes < CRC_PIECE) bytes += (size_t)views[end++].len;
        if (write_all(fd, views + i, end - i) != 0) return -1;
        for (; i < end; i++) *crc = crc_update(*crc, views[i].buf, (size_t)views[i].len);
    }
    return 0;
}

static double wall_clock(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

double monotonic_seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now); /* time.perf_counter()'s clock on Linux */
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* A ready-route batch is finished (called under e->lock by the thread that finished its last file):
 * count it, give its room back, record a failure, settle its ticket; its Python objects are freed
 * later with the GIL (the garbage), or by the reaper once it has handed on the ticket's callbacks. */
void settle(Engine *e, Batch *batch) {
    Ticket *t = batch->ticket;
    Job *failed = NULL;
    for (Py_ssize_t i = 0; i < batch->njobs; i++) {
        Job *job = &batch->jobs[i];
        if (job->error) {
            e->files_failed++;
            if (!failed) failed = job;
        } else {
            e->files_done++;
            e->bytes_done += (long long)job->payload;
        }
    }
    e->last_commit = monotonic_seconds();
    if (failed && !e->failed) {
        e->failed = 1;
        e->failed_at = e->last_commit;
        e->failed_ticket = t;
        e->fail_errno = failed->error;
        e->fail_operation = failed->operation;
        e->fail_final = strdup(failed->final);
        e->fail_key = strdup(failed->key ? failed->key : "");
    }
    pthread_mutex_lock(&e->budget_lock);
    e->budget_count -= 1;
    e->budget_bytes -= batch->budget_bytes;
    if (e->budget_waiting) pthread_cond_broadcast(&e->budget_cond);
    pthread_mutex_unlock(&e->budget_lock);
    pthread_mutex_lock(&e->ticket_lock);
    if (failed) {
        t->error = failed->error;
        t->operation = failed->operation;
        t->failed_final = strdup(failed->final);
        t->failed_key = strdup(failed->key ? failed->key : "");
    }
    t->done = 1;
    if (t->prev) t->prev->next = t->next; else e->pending = t->next;
    if (t->next) t->next->prev = t->prev;
    t->prev = t->next = NULL;
    e->npending--;
    int due = t->callbacks != NULL;
    pthread_cond_broadcast(&e->ticket_cond);
    pthread_mutex_unlock(&e->ticket_lock);
    batch->next = NULL;
    if (due) { /* the reaper hands the callbacks on, then frees the batch */
        e->due_count++;
        if (e->due_tail) e->due_tail->next = batch; else e->due_head = batch;
        e->due_tail = batch;
        pthread_cond_broadcast(&e->done);
    } else {
        batch->next = e->garbage;
        e->garbage = batch;
    }
}

/* A copy wait failed: clear the thread's error it left; -1 with errno EIO. */
static int copy_failed(const CopyWait *w) {
    if (w->clear) (void)w->clear();
    errno = EIO;
    return -1;
}

/* Wait for the copies the job's batch waits for (each file of a batch asks; after the first, each
 * wait returns at once). 0, or -1 with errno EIO. */
static int wait_for_copies(const Batch *batch) {
    static __thread int (*set_up)(int *) = NULL; /* the setup this thread has run */
    static __thread int (*device_set_by)(int) = NULL, device = -1; /* and the device it set */
    for (Py_ssize_t i = 0; i < batch->nwaits; i++) {
        const CopyWait *w = &batch->waits[i];
        if (w->set_device && (device_set_by != w->set_device || device != w->device)) { /* first */
            if (w->set_device(w->device) != 0) return copy_failed(w);
            device_set_by = w->set_device;
            device = w->device;
        }
        if (w->setup && set_up != w->setup) {
            int argument = w->setup_argument;
            (void)w->setup(&argument);
            set_up = w->setup;
        }
        if (w->wait(w->argument) != 0) return copy_failed(w);
    }
    return 0;
}

static void run_job(Engine *e, Job *job) {
    char *folder = strndup(job->final, job->directory_length);
    int fd = job->fd;
    int created = 0;
    if (!folder) { errno = ENOMEM; fail(job, "open"); goto finish; }
    if (job->batch->nwaits) {
        if (wait_for_copies(job->batch) != 0) { fail(job, "copy from the device"); goto finish; }
        Ticket *ticket = job->batch->ticket;
        pthread_mutex_lock(&e->ticket_lock); /* the sources may be modified again: say so */
        if (ticket && !ticket->staged) { ticket->staged = 1; pthread_cond_broadcast(&e->ticket_cond); }
        pthread_mutex_unlock(&e->ticket_lock);
    }
    if (fd < 0) {
        const char *operation = "open";
        if (make_folders(e, folder, &operation) != 0) { fail(job, operation); goto finish; }
        fd = open(job->temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno == ENOENT) { /* the folder was removed since: make it again */
            forget_folder(e, folder);
            if (make_folders(e, folder, &operation) != 0) { fail(job, operation); goto finish; }
            fd = open(job->temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        }
        if (fd < 0) { fail(job, "open"); goto finish; }
        created = 1;
        if (job->archive) fill_archive(job);
        int written = job->checksum ? write_checksummed(fd, job->views, job->nviews, &job->crc)
                                    : write_all(fd, job->views, job->nviews);
        if (written != 0) { fail(job, "write"); goto close_and_unlink; }
        for (Py_ssize_t i = 0; i < job->nviews; i++) job->size += (uint64_t)job->views[i].len;
    } else {
        created = 1;
        if (job->checksum) { /* read back what Python's writer put there */
            unsigned char *chunk = malloc(1 << 20);
            if (!chunk) { errno = ENOMEM; fail(job, "read"); goto close_and_unlink; }
            for (;;) {
                ssize_t got = pread(fd, chunk, 1 << 20, (off_t)job->size);
                if (got < 0 && errno == EINTR) continue;
                if (got < 0) { free(chunk); fail(job, "read"); goto close_and_unlink; }
                if (got == 0) break;
                job->crc = crc_update(job->crc, chunk, (size_t)got);
                job->size += (uint64_t)got;
            }
            free(chunk);
        } else {
            struct stat st;
            if (fstat(fd, &st) != 0) { fail(job, "fstat"); goto close_and_unlink; }
            job->size = (uint64_t)st.st_size;
        }
    }
    if (e->durability != DURABILITY_NONE && fsync(fd) != 0) { fail(job, "fsync"); goto close_and_unlink; }
    int closed = close(fd);
    fd = -1;
    if (closed != 0) { fail(job, "close"); goto unlink; }

    uint64_t h;
    size_t stripe = stripe_of(job->final, &h);
    pthread_mutex_lock(&e->order_locks[stripe]);
    Slot *s = table_find(&e->order[stripe], job->final, h, 0);
    int latest = !s || s->b <= job->number;
    if (latest) {
        if (job->record && journal_line(e, job, 1, wall_clock()) != 0) {
            fail(job, "journal");
            pthread_mutex_unlock(&e->order_locks[stripe]);
            goto unlink;
        }
        if (rename(job->temporary, job->final) != 0) {
            fail(job, "rename");
            pthread_mutex_unlock(&e->order_locks[stripe]);
            goto unlink;
        }
        if (s) s->b = job->number;
        job->renamed_at = wall_clock();
        job->replaced = 1;
        created = 0;
        if (job->record && journal_line(e, job, 0, job->renamed_at) != 0) fail(job, "journal");
    }
    pthread_mutex_unlock(&e->order_locks[stripe]);
    if (!latest) goto unlink;
    if (e->durability == DURABILITY_FULL && sync_directory(e, folder) != 0) fail(job, "fsync directory");
    goto finish;

close_and_unlink:
    if (fd >= 0) close(fd);
unlink:
    if (created) {
        int saved = errno;
        unlink(job->temporary);
        errno = saved;
    }
finish:
    free(folder);
    release_order(e, job->final);
    pthread_mutex_lock(&e->lock);
    Batch *batch = job->batch;
    if (--batch->remaining == 0) {
        if (batch->ticket) {
            settle(e, batch);
        } else {
            batch->next = NULL;
            if (e->done_tail) e->done_tail->next = batch; else e->done_head = batch;
            e->done_tail = batch;
            pthread_cond_broadcast(&e->done);
        }
    }
    pthread_mutex_unlock(&e->lock);
}

void *worker(void *arg) {
    Engine *e = arg;
#ifdef SCHED_BATCH
    /* A woken worker must not preempt the thread that woke it: that is the producer, whose next kernel
     * launch is due. SCHED_BATCH is ordinary time-sharing without wakeup preemption (Linux). */
    struct sched_param batch = {0};
    (void)pthread_setschedparam(pthread_self(), SCHED_BATCH, &batch);
#endif
    pthread_mutex_lock(&e->lock);
    for (;;) {
        while (!e->head && !e->stopping) pthread_cond_wait(&e->work, &e->lock);
        Job *job = e->head;
        if (!job) { pthread_mutex_unlock(&e->lock); return NULL; }
        e->head = job->next;
        if (!e->head) e->tail = NULL;
        e->queued--;
        e->busy++;
        pthread_mutex_unlock(&e->lock);
        run_job(e, job);
        pthread_mutex_lock(&e->lock);
        e->busy--;
    }
}

/* `n` jobs of `nbytes` in all were queued (under e->lock): wake workers for them. Without fsyncs a
 * small file costs only CPU, and a worker already running takes the next job as soon as it is done:
 * waking another would only make it and the caller take turns on the CPUs (on 2 cores, 16 KiB files
 * in memory went from 26,000 to 45,000 a second). So then a sleeping worker is woken only for a large
 * job, or when the queue grows longer than the running workers drain. */
#define WAKE_BYTES (1 << 20)
#define BACKLOG_PER_WORKER 8
void wake_workers(Engine *e, Py_ssize_t n, long long nbytes) {
    e->queued += n;
    if (e->durability == DURABILITY_NONE && e->busy > 0 && nbytes < WAKE_BYTES &&
        e->queued <= (long long)e->busy * BACKLOG_PER_WORKER)
        return;
    if (n == 1) pthread_cond_signal(&e->work); else pthread_cond_broadcast(&e->work);
}
