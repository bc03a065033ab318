// Calls of the GE2E kernel ops through the dispatcher (so that each reaches
// the kernel of its inputs' device, or its fake kernel under torch.compile),
// for the device-independent kernels of ge2e_loss (ge2e_ops.cpp and
// autograd/ge2e_autograd.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>

#include <tuple>

namespace ge2e {
namespace ops {

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& embeddings, const c10::optional<at::Tensor>& sums, const at::Tensor& w,
    const at::Tensor& b, int64_t speaker_offset, c10::string_view loss_method,
    c10::optional<double> min_cosine, int64_t block_speakers,
    const c10::optional<at::Tensor>& speaker_offsets, bool normalize) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ge2e_ext::ge2e_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
              const at::Tensor&, int64_t, c10::string_view, c10::optional<double>, int64_t,
              const c10::optional<at::Tensor>&, bool)>();
  return op.call(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine,
                 block_speakers, speaker_offsets, normalize);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_loss, const at::Tensor& embeddings,
    const c10::optional<at::Tensor>& sums, const at::Tensor& w, const at::Tensor& b,
    const at::Tensor& state, int64_t speaker_offset, c10::string_view loss_method,
    c10::optional<double> min_cosine, int64_t block_speakers,
    const c10::optional<at::Tensor>& speaker_offsets, bool normalize) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ge2e_ext::ge2e_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
              c10::string_view, c10::optional<double>, int64_t,
              const c10::optional<at::Tensor>&, bool)>();
  return op.call(grad_loss, embeddings, sums, w, b, state, speaker_offset, loss_method,
                 min_cosine, block_speakers, speaker_offsets, normalize);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
forward_backward(
    const at::Tensor& embeddings, const c10::optional<at::Tensor>& sums, const at::Tensor& w,
    const at::Tensor& b, int64_t speaker_offset, c10::string_view loss_method,
    c10::optional<double> min_cosine, double scale, int64_t block_speakers,
    const c10::optional<at::Tensor>& speaker_offsets, bool normalize) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ge2e_ext::ge2e_forward_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor>(
              const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
              const at::Tensor&, int64_t, c10::string_view, c10::optional<double>, double,
              int64_t, const c10::optional<at::Tensor>&, bool)>();
  return op.call(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine, scale,
                 block_speakers, speaker_offsets, normalize);
}

}  // namespace ops
}  // namespace ge2e
