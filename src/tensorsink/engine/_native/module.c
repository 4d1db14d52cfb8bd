/* tensorsink.engine._native: the module, which holds the Engine type (engine.h says what each file of
 * the engine holds). Its CRC is its own copy of crc.c, chosen for this CPU at import. */
#include "engine.h"

#include "crc.h"

/* line_tail(size, crc, when, renaming): the end the engine gives a journal line (tests hold it to the
 * Python twin's, manifest.Journal.write_line). */
static PyObject *module_line_tail(PyObject *module, PyObject *args) {
    unsigned long long size;
    unsigned int crc;
    double when;
    int renaming;
    if (!PyArg_ParseTuple(args, "KIdp", &size, &crc, &when, &renaming)) return NULL;
    char tail[160];
    size_t n = line_tail(tail, size, crc, renaming, when);
    return PyBytes_FromStringAndSize(tail, (Py_ssize_t)n);
}

static PyMethodDef module_methods[] = {
    {"line_tail", module_line_tail, METH_VARARGS, "line_tail(size, crc, when, renaming): a journal line's end."},
    {"tar_pack", tar_pack, METH_VARARGS, "tar_pack(fd, size, crc, mtime, keys, rows, groups): samples into a shard."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tensorsink.engine._native",
    .m_doc = "The native write engine.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    crc_setup();
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&HandleType) < 0) return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (!module) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(module, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&HandleType);
    if (PyModule_AddObject(module, "Handle", (PyObject *)&HandleType) < 0) {
        Py_DECREF(&HandleType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
