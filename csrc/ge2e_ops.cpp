// The ge2e_ext op library: its schemas (ge2e_schema.h), the public ge2e_loss
// (a composite of _ge2e_loss), _ge2e_loss without autograd (for every device:
// the forward kernel op and the reduction), the tests' block setting, and the
// Python module stub that loads it. The kernel ops are implemented per device
// (cpu/, cuda/); _ge2e_loss's autograd is in autograd/; fake kernels for
// torch.compile and meta tensors are in ge2e_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ge2e_driver.h"
#include "ge2e_ops.h"

namespace ge2e {
namespace {

std::vector<std::string> built_devices() {
#ifdef GE2E_WITH_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

// The scale of the summed losses for a reduction ("none": no sum), with
// "mean" over the rows of embeddings (N, M, D) or (B, D). A wrong layout is
// left to the kernels' checks, which say what they expected.
c10::optional<double> reduction_scale(const at::Tensor& embeddings, c10::string_view reduction,
                                      bool grouped) {
  if (reduction == "none") return c10::nullopt;
  if (reduction == "sum") return 1.0;
  TORCH_CHECK_VALUE(reduction == "mean",
                    "ge2e_ext: reduction must be one of 'sum', 'mean', 'none', got '",
                    std::string(reduction), "'");
  const int64_t row_dims = grouped ? 1 : 2;
  if (embeddings.dim() != row_dims + 1) return 1.0;
  c10::SymInt rows = embeddings.sym_size(0);
  if (!grouped) rows = rows * embeddings.sym_size(1);
  const int64_t count = rows.guard_int(__FILE__, __LINE__);  // specialises a traced shape
  return count > 0 ? 1.0 / static_cast<double>(count) : 1.0;
}

// ge2e_loss: this call's speakers only, the reduction by name.
LossResult public_loss(const at::Tensor& embeddings, const at::Tensor& w, const at::Tensor& b,
                       c10::string_view loss_method, c10::optional<double> min_cosine,
                       c10::string_view reduction,
                       const c10::optional<at::Tensor>& speaker_offsets, bool normalize) {
  // The problem's arguments this op does not take, under their names in
  // GE2E_PROBLEM_ARGS (GE2E_PROBLEM_FROM_PARAMS reads every argument by name).
  const c10::optional<at::Tensor> sums;
  const int64_t speaker_offset = 0;
  const auto scale = reduction_scale(embeddings, reduction, speaker_offsets.has_value());
  return ops::loss(GE2E_PROBLEM_FROM_PARAMS, scale);
}

// _ge2e_loss where no gradient is needed (or below autograd): the losses,
// reduced, and the rows' top1.
LossResult loss_without_autograd(GE2E_PROBLEM_PARAMS, c10::optional<double> scale) {
  auto [loss, state, top1] = ops::forward(GE2E_PROBLEM_FROM_PARAMS);
  if (!scale.has_value()) return {loss, top1};
  return {*scale == 1.0 ? loss.sum() : loss.sum().mul_(*scale), top1};
}

}  // namespace

void register_python_node_names();  // autograd/ge2e_autograd.cpp

}  // namespace ge2e

TORCH_LIBRARY(ge2e_ext, m) {
  m.def(ge2e::kPublicLossSchema, &ge2e::public_loss);  // CompositeImplicitAutograd
  m.def(ge2e::kLossSchema);
  m.def(ge2e::kForwardSchema);
  m.def(ge2e::kBackwardSchema);
  m.def(ge2e::kForwardBackwardSchema);
  m.def(ge2e::kSetBlockSpeakersSchema, &ge2e::set_block_speakers_for_tests);
  m.def("built_devices() -> str[]", &ge2e::built_devices);
}

TORCH_LIBRARY_IMPL(ge2e_ext, CompositeExplicitAutograd, m) {
  m.impl("_ge2e_loss", &ge2e::loss_without_autograd);
}

// A module with no Python functions: importing it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) ge2e::register_python_node_names();
  return module;
}
