/* tensorsink.engine._native: the module, which holds the Engine type (engine.h says what each file of
 * the engine holds). Its CRC is its own copy of crc.c, chosen for this CPU at import. */
#include "engine.h"

#include "crc.h"

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tensorsink.engine._native",
    .m_doc = "The native write engine.",
    .m_size = -1,
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
