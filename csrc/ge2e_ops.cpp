// The ge2e_ext op library: its schemas, ge2e_loss without autograd (for every
// device: the forward kernel op and the reduction), and the Python module
// stub that loads it. The kernel ops are implemented per device (cpu/,
// cuda/); ge2e_loss's autograd is in autograd/; fake kernels for
// torch.compile and meta tensors are in ge2e_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ge2e_ops.h"
#include "ge2e_schema.h"

namespace ge2e {
namespace {

std::vector<std::string> built_devices() {
#ifdef GE2E_WITH_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

// ge2e_loss where no gradient is needed (or below autograd): the losses, reduced,
// and the rows' top1.
std::tuple<at::Tensor, at::Tensor> loss_without_autograd(const at::Tensor& embeddings,
                                 const c10::optional<at::Tensor>& sums, const at::Tensor& w,
                                 const at::Tensor& b, int64_t speaker_offset,
                                 c10::string_view loss_method, c10::optional<double> min_cosine,
                                 bool reduce, double scale, int64_t block_speakers,
                                 const c10::optional<at::Tensor>& speaker_offsets,
                                 bool normalize) {
  auto [loss, state, top1] = ops::forward(embeddings, sums, w, b, speaker_offset, loss_method,
                                          min_cosine, block_speakers, speaker_offsets, normalize);
  if (!reduce) return {loss, top1};
  return {scale == 1.0 ? loss.sum() : loss.sum().mul_(scale), top1};
}

}  // namespace

void register_python_node_names();  // autograd/ge2e_autograd.cpp

}  // namespace ge2e

TORCH_LIBRARY(ge2e_ext, m) {
  m.def(ge2e::kLossSchema);
  m.def(ge2e::kForwardSchema);
  m.def(ge2e::kBackwardSchema);
  m.def(ge2e::kForwardBackwardSchema);
  m.def("built_devices() -> str[]", &ge2e::built_devices);
}

TORCH_LIBRARY_IMPL(ge2e_ext, CompositeExplicitAutograd, m) {
  m.impl("ge2e_loss", &ge2e::loss_without_autograd);
}

// A module with no Python functions: importing it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) ge2e::register_python_node_names();
  return module;
}
