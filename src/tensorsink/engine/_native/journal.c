/* The journal: each journaled file's line, appended whole around its rename (see tensorsink.manifest). */
#include "engine.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
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
    pthread_mutex_lock(&e->journal_lock);
    off_t end = lseek(e->journal, 0, SEEK_END);
    int rc = end < 0 ? -1 : write_all(e->journal, views, 2);
    int saved = errno;
    if (rc != 0 && end >= 0) (void)!ftruncate(e->journal, end);
    pthread_mutex_unlock(&e->journal_lock);
    errno = saved;
    return rc;
}
