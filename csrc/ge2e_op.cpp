// Schemas of the ge2e_ext ops and the Python module stub that loads them.
// The kernels are registered per device in cpu/ and cuda/; autograd, fake
// (meta) kernels and the public API live in Python (ge2e_ext/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

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
  // Per-utterance GE2E losses of embeddings (N, M, D) scored against the speaker
  // sums (K, D) (sums=None: the embeddings' own, K = N). Returns the losses
  // (N, M) and what the backward needs instead of the N x M x K similarities:
  // the row log-sum-exp (softmax) or hardest-impostor similarity (contrast),
  // and the hardest impostor's index (contrast; -1 for softmax).
  m.def(
      "ge2e_forward(Tensor embeddings, Tensor? sums, Tensor w, Tensor b, int speaker_offset, "
      "str loss_method, float? min_cosine, int block_speakers=0) -> (Tensor, Tensor, Tensor)");
  // Gradients for embeddings, sums (already folded into the embeddings'
  // gradient when sums=None), w and b; recomputes the cosines.
  m.def(
      "ge2e_backward(Tensor grad_loss, Tensor embeddings, Tensor? sums, Tensor w, Tensor b, "
      "Tensor row_stat, Tensor hardest, int speaker_offset, str loss_method, float? min_cosine, "
      "int block_speakers=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("built_devices() -> str[]", &built_devices);
}

// A module with no Python functions: importing it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
