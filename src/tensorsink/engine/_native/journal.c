/* The journal: each journaled file's lines, appended whole around its rename (see tensorsink.manifest).
 *
 * A file's "renaming" line is appended before its rename: a kill after the rename must find it. Its
 * record, the line after the rename, only confirms it, so records are held in memory and go out with
 * the next renaming line, in the same write() (one system call a file, not two), or when drain(),
 * close() or an idle reaper asks (journal_flush). A kill loses at most the records held, and each of
 * those files keeps its renaming line, which verify and resume accept for the file that is there. */
#include "engine.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define HOLD_BYTES (64 << 10) /* records held beyond this are written at once */

/* Append `n` pieces as one whole under the journal lock: one writev() as a rule; a short one is
 * finished, a failed finish cut back off. 0, or -1 with errno. */
static int append_whole(Engine *e, struct iovec *pieces, int n) {
    size_t total = 0;
    for (int i = 0; i < n; i++) total += pieces[i].iov_len;
    ssize_t wrote;
    do wrote = writev(e->journal, pieces, n);
    while (wrote < 0 && errno == EINTR);
    if (wrote < 0) return -1;
    if ((size_t)wrote == total) return 0;
    off_t start = lseek(e->journal, 0, SEEK_END) - wrote; /* only this writer appends, under the lock */
    Py_buffer views[3];
    memset(views, 0, sizeof views);
    size_t skip = (size_t)wrote;
    for (int i = 0; i < n; i++) {
        size_t taken = skip < pieces[i].iov_len ? skip : pieces[i].iov_len;
        views[i].buf = (char *)pieces[i].iov_base + taken;
        views[i].len = (Py_ssize_t)(pieces[i].iov_len - taken);
        skip -= taken;
    }
    int rc = start < 0 ? -1 : write_all(e->journal, views, n);
    int saved = errno;
    if (rc != 0 && start >= 0) (void)!ftruncate(e->journal, start);
    errno = saved;
    return rc;
}

/* Hold a job's record (under the journal lock); 0, or -1 (out of memory: the caller writes it itself).
 * The first held names the file and key that a failure to write them is reported with. */
static int hold(Engine *e, const Job *job, const char *tail, size_t tail_length) {
    const char *record = job->record;
    size_t record_length = job->record_length;
    if (!e->held_length) {
        free(e->held_final);
        free(e->held_key);
        e->held_final = strdup(job->final);
        e->held_key = strdup(job->key ? job->key : "");
        if (!e->held_final || !e->held_key) return -1;
    }
    size_t need = e->held_length + record_length + tail_length;
    if (need > e->held_capacity) {
        size_t capacity = e->held_capacity ? e->held_capacity : 4096;
        while (capacity < need) capacity *= 2;
        char *grown = realloc(e->held, capacity);
        if (!grown) return -1;
        e->held = grown;
        e->held_capacity = capacity;
    }
    memcpy(e->held + e->held_length, record, record_length);
    memcpy(e->held + e->held_length + record_length, tail, tail_length);
    e->held_length = need;
    return 0;
}

static char *literal(char *at, const char *text) {
    size_t n = strlen(text);
    memcpy(at, text, n);
    return at + n;
}

/* The line's end: what the Python twin writes with f'...{when:.6f}...' (Journal.write_line), made
 * without printf, which is a noticeable part of a small file's cost. */
size_t line_tail(char *tail, uint64_t size, uint32_t crc, int renaming, double when) {
    /* The seconds and their fraction apart, each exact (the fraction of a double is one): only the
     * fraction's one rounding to microseconds remains, as in printf's %.6f. */
    double seconds = floor(when), micro = nearbyint((when - seconds) * 1e6);
    if (micro >= 1e6) { seconds += 1; micro = 0; }
    char *at = literal(tail, ",\"bytes\":");
    at = put_decimal(at, (unsigned long long)size, 1);
    at = literal(at, ",\"crc32\":\"");
    at = put_hexadecimal(at, crc, 8);
    at = literal(at, "\",\"time\":");
    at = put_decimal(at, (unsigned long long)seconds, 1);
    *at++ = '.';
    at = put_decimal(at, (unsigned long long)micro, 6);
    at = literal(at, renaming ? ",\"renaming\":true}\n" : "}\n");
    return (size_t)(at - tail);
}

/* Append the job's journal line: `renaming` before its rename (the rename may follow), else its record
 * after it (held, see above). 0, or -1 with errno. */
int journal_line(Engine *e, Job *job, int renaming, double when) {
    char tail[160];
    size_t n = line_tail(tail, job->size, job->crc, renaming, when);
    int rc = 0, saved = 0;
    pthread_mutex_lock(&e->journal_lock);
    if (!renaming && e->held_length + job->record_length + n <= HOLD_BYTES &&
        hold(e, job, tail, n) == 0) {
        pthread_mutex_unlock(&e->journal_lock);
        return 0;
    }
    struct iovec pieces[3] = {{e->held, e->held_length}, {job->record, job->record_length}, {tail, n}};
    rc = e->held_length ? append_whole(e, pieces, 3) : append_whole(e, pieces + 1, 2);
    saved = errno;
    if (rc == 0) e->held_length = 0;
    pthread_mutex_unlock(&e->journal_lock);
    errno = saved;
    return rc;
}

/* After close: the journal is the writer's to close, and nothing may be written to its number again
 * (records still held were refused, and that failure is the engine's already). */
void journal_forget(Engine *e) {
    pthread_mutex_lock(&e->journal_lock);
    e->journal = -1;
    e->held_length = 0;
    pthread_mutex_unlock(&e->journal_lock);
}

/* Write the records held. A failure is the engine's, if it is the first, reported as the first held
 * file's (they stay held, for the next try). */
void journal_flush(Engine *e) {
    if (e->journal < 0) return;
    pthread_mutex_lock(&e->journal_lock);
    if (e->held_length) {
        struct iovec whole = {e->held, e->held_length};
        if (append_whole(e, &whole, 1) == 0) {
            e->held_length = 0;
        } else {
            int error = errno;
            pthread_mutex_lock(&e->lock);
            if (!e->failed) {
                e->failed = 1;
                e->failed_at = monotonic_seconds();
                e->fail_errno = error;
                e->fail_operation = "journal";
                e->fail_final = e->held_final;
                e->fail_key = e->held_key;
                e->held_final = e->held_key = NULL;
            }
            pthread_mutex_unlock(&e->lock);
        }
    }
    pthread_mutex_unlock(&e->journal_lock);
}
