// Calls of the GE2E ops through the dispatcher (so that each reaches the
// kernel of its inputs' device, or its fake kernel under torch.compile), for
// the device-independent kernels (ge2e_ops.cpp, autograd/ge2e_autograd.cpp).
// Their signatures follow from ge2e_schema.h.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include "ge2e_schema.h"

namespace ge2e {
namespace ops {

// The typed handle of op ge2e_ext::<name>, taking the problem's arguments,
// then Extra.
template <class Result, class... Extra>
c10::TypedOperatorHandle<Result(GE2E_PROBLEM_PARAM_TYPES, Extra...)> handle(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<Result(GE2E_PROBLEM_PARAM_TYPES, Extra...)>();
}

inline LossResult loss(const ProblemArgs& args, c10::optional<double> scale) {
  static const auto op = handle<LossResult, c10::optional<double>>("ge2e_ext::_ge2e_loss");
  return apply_problem(args, [](auto&&... a) { return op.call(a...); }, scale);
}

inline ForwardResult forward(const ProblemArgs& args) {
  static const auto op = handle<ForwardResult>("ge2e_ext::ge2e_forward");
  return apply_problem(args, [](auto&&... a) { return op.call(a...); });
}

inline BackwardResult backward(const ProblemArgs& args, const at::Tensor& grad_loss,
                               const at::Tensor& state) {
  static const auto op =
      handle<BackwardResult, const at::Tensor&, const at::Tensor&>("ge2e_ext::ge2e_backward");
  return apply_problem(args, [](auto&&... a) { return op.call(a...); }, grad_loss, state);
}

inline ForwardBackwardResult forward_backward(const ProblemArgs& args, double scale) {
  static const auto op = handle<ForwardBackwardResult, double>("ge2e_ext::ge2e_forward_backward");
  return apply_problem(args, [](auto&&... a) { return op.call(a...); }, scale);
}

}  // namespace ops
}  // namespace ge2e
