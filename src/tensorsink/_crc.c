/* tensorsink._crc: CRC-32 for tensorsink.checksum. A leaf: the engine's crc.c and this glue, nothing else
 * of ours, so that the checksum imports no engine (the engine's extension has its own copy of crc.c). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "engine/_native/crc.h"

static PyObject *crc32_py(PyObject *module, PyObject *args) {
    Py_buffer view;
    unsigned long value = 0;
    if (!PyArg_ParseTuple(args, "y*|k:crc32", &view, &value)) return NULL;
    uint32_t crc = (uint32_t)value;
    if (view.len >= (1 << 16)) { /* large: let other threads run meanwhile */
        Py_BEGIN_ALLOW_THREADS
        crc = crc_update(crc, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        crc = crc_update(crc, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

static PyObject *crc32_combine_py(PyObject *module, PyObject *args) {
    unsigned long first, second;
    long long second_length;
    if (!PyArg_ParseTuple(args, "kkL:crc32_combine", &first, &second, &second_length)) return NULL;
    if (second_length < 0) {
        PyErr_Format(PyExc_ValueError, "crc32_combine(len2=%lld): a length from 0 to 2**63 - 1", second_length);
        return NULL;
    }
    return PyLong_FromUnsignedLong(
        crc_combine((uint32_t)first, (uint32_t)second, (uint64_t)second_length) & 0xFFFFFFFFu);
}

static PyObject *crc32_method_py(PyObject *module, PyObject *unused) { return PyUnicode_FromString(crc_method()); }

static PyMethodDef module_methods[] = {
    {"crc32", crc32_py, METH_VARARGS,
     "crc32(data, value=0): zlib.crc32's value; carry-less multiply where the CPU has it, the GIL released "
     "for 64 KiB and more."},
    {"crc32_combine", crc32_combine_py, METH_VARARGS,
     "crc32_combine(crc1, crc2, len2): the CRC-32 of A + B from crc32(A), crc32(B) and len(B)."},
    {"crc32_method", crc32_method_py, METH_NOARGS,
     "crc32_method(): how crc32 computes here: 'vpclmulqdq' (AVX-512), 'pclmulqdq', or 'table' (slice-by-8)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tensorsink._crc",
    .m_doc = "CRC-32, zlib's values, with carry-less multiply where the CPU has it.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__crc(void) {
    crc_setup();
    return PyModule_Create(&module_def);
}
