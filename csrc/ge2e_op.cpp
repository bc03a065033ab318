// Schemas of the ge2e_ext ops and the Python module stub that loads them.
// The kernels are registered per device in cpu/ and cuda/; autograd, fake
// (meta) kernels and the public API live in Python (ge2e_ext/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ge2e_schema.h"

namespace {

std::vector<std::string> built_devices() {
#ifdef GE2E_WITH_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

}  // namespace

TORCH_LIBRARY(ge2e_ext, m) {
  m.def(ge2e::kForwardSchema);
  m.def(ge2e::kBackwardSchema);
  m.def("built_devices() -> str[]", &built_devices);
}

// A module with no Python functions: importing it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
