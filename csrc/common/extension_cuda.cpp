// The Python module lub_fast._C_cuda: an empty module whose import runs the
// TORCH_LIBRARY_IMPL(lub_fast, CUDA, ...) registrations compiled into it (*_cuda.cpp next to each
// op's *_kernel.cu), as csrc/common/extension.cpp does for the CPU kernels.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C_cuda",  // name
      nullptr,    // documentation
      -1,         // per-interpreter state size
      nullptr,    // methods
  };
  return PyModule_Create(&module_def);
}
}
