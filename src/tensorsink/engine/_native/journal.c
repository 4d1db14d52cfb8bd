/* The journal: each journaled file's line, appended whole around its rename (see tensorsink.manifest). */
#include "engine.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* Append the job's journal line: `renaming` before its rename (the rename may follow), else after it.
 * A line is written whole or cut back off; 0, or -1 with errno. */
int journal_line(Engine *e, Job *job, int renaming, double when) {
    char tail[160];
    int n = snprintf(tail, sizeof tail, ",\"bytes\":%llu,\"crc32\":\"%08x\",\"time\":%.6f%s}\n",
                     (unsigned long long)job->size, job->crc, when, renaming ? ",\"renaming\":true" : "");
    Py_buffer views[2];
    memset(views, 0, sizeof views);
    views[0].buf = job->record;
    views[0].len = (Py_ssize_t)job->record_length;
    views[1].buf = tail;
    views[1].len = n;
    struct iovec whole[2] = {{job->record, job->record_length}, {tail, (size_t)n}};
    size_t total = job->record_length + (size_t)n;
    pthread_mutex_lock(&e->journal_lock);
    ssize_t wrote;
    do wrote = writev(e->journal, whole, 2); /* the journal appends: one call, as a rule */
    while (wrote < 0 && errno == EINTR);
    int rc = wrote < 0 ? -1 : 0;
    int saved = errno;
    if (wrote >= 0 && (size_t)wrote < total) { /* short: finish the line, or cut it back off */
        off_t start = lseek(e->journal, 0, SEEK_END) - wrote; /* only this writer appends, under the lock */
        size_t skip = (size_t)wrote;
        for (int i = 0; i < 2; i++) {
            size_t taken = skip < (size_t)views[i].len ? skip : (size_t)views[i].len;
            views[i].buf = (char *)views[i].buf + taken;
            views[i].len -= (Py_ssize_t)taken;
            skip -= taken;
        }
        rc = start < 0 ? -1 : write_all(e->journal, views, 2);
        saved = errno;
        if (rc != 0 && start >= 0) (void)!ftruncate(e->journal, start);
    }
    pthread_mutex_unlock(&e->journal_lock);
    errno = saved;
    return rc;
}
