/* Writing files (see files.h). */
#include "files.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

int write_all(int fd, Py_buffer *views, Py_ssize_t n) {
    struct iovec iov[64];
    Py_ssize_t first = 0;
    size_t skip = 0; /* bytes of views[first] already written */
    while (first < n) {
        int count = 0;
        for (Py_ssize_t i = first; i < n && count < 64 && count < IOV_MAX; i++) {
            size_t offset = i == first ? skip : 0;
            if ((size_t)views[i].len == offset) continue;
            iov[count].iov_base = (char *)views[i].buf + offset;
            iov[count].iov_len = (size_t)views[i].len - offset;
            count++;
        }
        if (count == 0) return 0;
        ssize_t written = writev(fd, iov, count);
        if (written < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (written == 0) { errno = EIO; return -1; } /* no progress: never loop forever */
        size_t left = (size_t)written;
        while (first < n && left) {
            size_t rest = (size_t)views[first].len - skip;
            if (left >= rest) { left -= rest; first++; skip = 0; }
            else { skip += left; left = 0; }
        }
        while (first < n && (size_t)views[first].len == skip) { first++; skip = 0; }
    }
    return 0;
}

int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

char *copy_path(PyObject *text) {
    PyObject *encoded = PyUnicode_EncodeFSDefault(text);
    if (!encoded) return NULL;
    char *copy = strdup(PyBytes_AS_STRING(encoded));
    Py_DECREF(encoded);
    if (!copy) PyErr_NoMemory();
    return copy;
}
