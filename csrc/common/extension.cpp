// The Python module lub_fast._C: an empty module whose import runs the TORCH_LIBRARY_IMPL static
// registrations of every CPU kernel compiled into it (the pattern of pytorch/extension-cpp). The
// ops themselves are called through torch.ops.lub_fast.*, not through this module.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // documentation
      -1,       // per-interpreter state size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
