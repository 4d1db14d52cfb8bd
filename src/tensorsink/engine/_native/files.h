/* Writing files, as the engine and the benchmark's bare loop both do: every byte of a list of buffers,
 * a folder's fsync, and a Python path as the bytes the system calls take. */
#ifndef TENSORSINK_FILES_H
#define TENSORSINK_FILES_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* The durability levels as Python passes them. */
enum { DURABILITY_NONE = 0, DURABILITY_FILE = 1, DURABILITY_FULL = 2 };

#pragma GCC visibility push(hidden) /* shared by the extension's files, not exported from it */

/* Write every byte of the views to fd, resuming after short writes; 0 or -1 with errno. */
int write_all(int fd, Py_buffer *views, Py_ssize_t n);

/* fsync the folder at `path`; 0 or -1 with errno. */
int fsync_path(const char *path);

/* A str path encoded for the file system, in memory from malloc; NULL with a Python error set. With the
 * GIL. */
char *copy_path(PyObject *text);

#pragma GCC visibility pop

#endif
