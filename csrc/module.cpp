// The Python module lowrank_ext._C: an empty module. Importing it loads this library, whose
// static initializers register the ops with the dispatcher (torch.ops.lowrank_ext.*).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lowrank_ext compiled ops", -1,
                               nullptr};
  return PyModule_Create(&module);
}
