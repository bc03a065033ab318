// The autograd of _ge2e_loss, in C++ (as torchvision's csrc/ops/autograd/),
// for every device.
//
// A reduced loss ("sum", "mean") has one upstream gradient for every row, so
// its forward computes the loss and every gradient in one sweep
// (ge2e_forward_backward) and its backward only scales them by that scalar,
// as Liger-Kernel's fused linear cross-entropy does. Per-row losses
// (reduction "none") keep a forward and a backward kernel (the upstream
// gradient differs per row). Either way the backward is not differentiable
// again: asked to be (create_graph=True), it returns gradients whose own
// backward raises, never a silently wrong second derivative.
#include <ATen/TensorSubclassLikeUtils.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/python_cpp_function.h>
#include <torch/library.h>

#include <string>

#include "../ge2e_ops.h"

namespace ge2e {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Passes `gradients` through; their backward (a gradient of a gradient) raises.
class NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
 public:
  static variable_list forward(AutogradContext*, at::TensorList gradients,
                               at::TensorList /*depends_on*/) {
    return gradients.vec();
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "ge2e_ext: the compiled GE2E op does not support double backward (a gradient "
                "of its gradient, e.g. backward(create_graph=True) then backward again); use "
                "backend='torch' for higher-order gradients");
  }
};

// `gradients` as the backward's result; when the backward itself is being
// recorded (create_graph=True), tied to what they depend on through
// NoDoubleBackward.
variable_list finish_backward(variable_list gradients, const variable_list& depends_on) {
  if (!at::GradMode::is_enabled()) return gradients;
  variable_list defined, inputs;
  for (const auto& g : gradients) {
    if (g.defined()) defined.push_back(g);
  }
  for (const auto& t : depends_on) {
    if (t.defined()) inputs.push_back(t);
  }
  variable_list tied = NoDoubleBackward::apply(at::TensorList(defined), at::TensorList(inputs));
  size_t next = 0;
  for (auto& g : gradients) {
    if (g.defined()) g = tied[next++];
  }
  return gradients;
}

// Whether the upstream gradient is a plain CPU scalar equal to 1 (loss.backward()),
// so that scaling can be skipped. Reading the value of an accelerator's scalar
// would synchronise with the device, and under tracing, fake tensors and
// dispatch modes the value is unknown: there the scaling is one small kernel.
bool is_plain_cpu_one(const at::Tensor& factor) {
  return factor.device().is_cpu() && factor.numel() == 1 && !at::isTensorSubclassLike(factor) &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set() && factor.item<double>() == 1.0;
}

// A tensor that autograd may save: an inference tensor (made under
// torch.inference_mode(), e.g. embeddings of a frozen encoder, with a trainable
// w or b) cannot be, so it is copied, and only then.
at::Tensor savable(const at::Tensor& t) {
  return t.defined() && t.is_inference() ? t.clone() : t;
}

// Saving a problem's arguments for the backward: its tensors through
// save_for_backward (an absent optional as an undefined tensor), the rest in
// saved_data under the argument's name (any type an IValue holds).
void save_arg(AutogradContext*, variable_list& tensors, const char*, const at::Tensor& t) {
  tensors.push_back(savable(t));
}
void save_arg(AutogradContext*, variable_list& tensors, const char*,
              const c10::optional<at::Tensor>& t) {
  tensors.push_back(savable(t.value_or(at::Tensor())));
}
template <class T>
void save_arg(AutogradContext* ctx, variable_list&, const char* name, const T& value) {
  ctx->saved_data[name] = value;
}

void load_arg(AutogradContext*, const variable_list& saved, size_t& next, const char*,
              at::Tensor& t) {
  t = saved[next++];
}
void load_arg(AutogradContext*, const variable_list& saved, size_t& next, const char*,
              c10::optional<at::Tensor>& t) {
  const at::Tensor& held = saved[next++];
  t = held.defined() ? c10::optional<at::Tensor>(held) : c10::nullopt;
}
template <class T>
void load_arg(AutogradContext* ctx, const variable_list&, size_t&, const char* name, T& value) {
  value = ctx->saved_data[name].to<T>();
}

#define GE2E_SAVE_ARG_(name, schema, param, stored) save_arg(ctx, tensors, #name, args.name);
#define GE2E_LOAD_ARG_(name, schema, param, stored) \
  load_arg(ctx, saved, next, #name, args.name);

// Saves args (and then `extra` tensors) for the backward.
void save_problem(AutogradContext* ctx, const ProblemArgs& args, variable_list extra = {}) {
  variable_list tensors;
  GE2E_PROBLEM_ARGS(GE2E_SAVE_ARG_, GE2E_NOTHING_)
  for (auto& t : extra) tensors.push_back(std::move(t));
  ctx->save_for_backward(tensors);
}

// The arguments save_problem saved; `extra` receives the tensors saved after them.
ProblemArgs load_problem(AutogradContext* ctx, variable_list* extra = nullptr) {
  const variable_list saved = ctx->get_saved_variables();
  ProblemArgs args;
  size_t next = 0;
  GE2E_PROBLEM_ARGS(GE2E_LOAD_ARG_, GE2E_NOTHING_)
  if (extra != nullptr) extra->assign(saved.begin() + next, saved.end());
  return args;
}

// The gradients of a loss op's differentiable inputs (embeddings, sums, w, b:
// the arguments of apply below), then none for the rest (args, scale).
constexpr size_t kDifferentiable = 4;
constexpr size_t kLossInputs = kDifferentiable + 2;
const char* const kGradientKeys[kDifferentiable] = {"grad_embeddings", "grad_sums", "grad_w",
                                                    "grad_b"};

// What a create_graph backward depends on: the upstream gradient and the inputs.
variable_list backward_inputs(const at::Tensor& grad_loss, const ProblemArgs& args) {
  return {grad_loss, args.embeddings, args.sums.value_or(at::Tensor()), args.w, args.b};
}

// A reduced loss (a scale: "sum", "mean"). The forward computes the loss and
// its gradients in one sweep; the first backward hands those gradients out,
// released from the saved state and scaled in place by the upstream scalar,
// so the caller owns them (no alias of anything autograd keeps) and the peak
// stays one gradient. A second backward of a retained graph recomputes them
// (one more forward_backward sweep) from the saved inputs.
// Python shows this node as Ge2eLossBackward0 (register_python_node_names).
// The differentiable tensors come first, apart, so that autograd sees them;
// args holds them too, with everything else.
class ReducedLoss : public torch::autograd::Function<ReducedLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor&,
                               const c10::optional<at::Tensor>&, const at::Tensor&,
                               const at::Tensor&, const ProblemArgs& args, double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, top1, grad_embeddings, grad_sums, grad_w, grad_b] =
        ops::forward_backward(args, scale);
    // The inputs are kept for a retained second backward (and for a
    // create_graph backward to depend on).
    save_problem(ctx, args);
    ctx->saved_data["grad_embeddings"] = grad_embeddings;
    ctx->saved_data["grad_sums"] = args.sums.has_value() ? grad_sums : at::Tensor();
    ctx->saved_data["grad_w"] = grad_w;
    ctx->saved_data["grad_b"] = grad_b;
    ctx->saved_data["handed_out"] = false;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({top1});
    return {loss, top1};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const ProblemArgs args = load_problem(ctx);
    const at::Tensor& grad_loss = grad_outputs[0];
    variable_list gradients(kLossInputs);
    if (grad_loss.defined()) {
      if (!ctx->saved_data["handed_out"].toBool()) {
        for (size_t i = 0; i < kDifferentiable; ++i) {
          at::IValue& held = ctx->saved_data[kGradientKeys[i]];
          if (held.isTensor()) gradients[i] = held.toTensor();
          held = at::IValue();  // released: the caller's reference is the only one
        }
        ctx->saved_data["handed_out"] = true;
      } else {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        at::NoGradGuard no_grad;
        auto recomputed = ops::forward_backward(args, ctx->saved_data["scale"].toDouble());
        gradients[0] = std::get<2>(recomputed);
        gradients[1] = args.sums.has_value() ? std::get<3>(recomputed) : at::Tensor();
        gradients[2] = std::get<4>(recomputed);
        gradients[3] = std::get<5>(recomputed);
      }
      if (!is_plain_cpu_one(grad_loss)) {
        at::NoGradGuard no_grad;  // a create_graph backward is tied below instead
        for (size_t i = 0; i < kDifferentiable; ++i) {
          if (gradients[i].defined()) gradients[i].mul_(grad_loss);
        }
      }
    }
    return finish_backward(std::move(gradients), backward_inputs(grad_loss, args));
  }
};

// Per-row losses (no scale: reduction "none"): the forward keeps each row's
// state (not its losses, which the caller owns and may change in place); the
// backward recomputes the cosines. Python shows this node as Ge2eLossBackward1.
class RowLosses : public torch::autograd::Function<RowLosses> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor&,
                               const c10::optional<at::Tensor>&, const at::Tensor&,
                               const at::Tensor&, const ProblemArgs& args) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, state, top1] = ops::forward(args);
    save_problem(ctx, args, {state});
    ctx->mark_non_differentiable({top1});
    return {loss, top1};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list state;
    const ProblemArgs args = load_problem(ctx, &state);
    const at::Tensor& grad_loss = grad_outputs[0];
    variable_list gradients(kLossInputs - 1);
    if (grad_loss.defined()) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [grad_embeddings, grad_sums, grad_w, grad_b] =
          ops::backward(args, grad_loss, state.at(0));
      gradients[0] = grad_embeddings;
      gradients[1] = args.sums.has_value() ? grad_sums : at::Tensor();
      gradients[2] = grad_w;
      gradients[3] = grad_b;
    }
    return finish_backward(std::move(gradients), backward_inputs(grad_loss, args));
  }
};

LossResult loss_autograd(GE2E_PROBLEM_PARAMS, c10::optional<double> scale) {
  const bool needs_grad =
      at::GradMode::is_enabled() &&
      (embeddings.requires_grad() || w.requires_grad() || b.requires_grad() ||
       (sums.has_value() && sums->requires_grad()));
  const ProblemArgs args = GE2E_PROBLEM_FROM_PARAMS;
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::loss(args, scale);
  }
  const variable_list outputs =
      scale.has_value() ? ReducedLoss::apply(embeddings, sums, w, b, args, *scale)
                        : RowLosses::apply(embeddings, sums, w, b, args);
  return {outputs[0], outputs[1]};
}

}  // namespace

// The Python names of the autograd nodes, as PyTorch names its own
// (`loss.grad_fn` prints <Ge2eLossBackward0 object at ...>); called once when
// the module is imported (ge2e_ops.cpp).
void register_python_node_names() {
  static PyTypeObject reduced_type, rows_type, double_backward_type;
  torch::autograd::_initFunctionPyTypeObject(reduced_type, "Ge2eLossBackward0", nullptr, nullptr);
  torch::autograd::_initFunctionPyTypeObject(rows_type, "Ge2eLossBackward1", nullptr, nullptr);
  torch::autograd::_initFunctionPyTypeObject(double_backward_type, "Ge2eLossBackwardBackward0",
                                             nullptr, nullptr);
  torch::autograd::registerCppFunction(typeid(torch::autograd::CppNode<ReducedLoss>),
                                       &reduced_type);
  torch::autograd::registerCppFunction(typeid(torch::autograd::CppNode<RowLosses>), &rows_type);
  torch::autograd::registerCppFunction(typeid(torch::autograd::CppNode<NoDoubleBackward>),
                                       &double_backward_type);
}

}  // namespace ge2e

TORCH_LIBRARY_IMPL(ge2e_ext, Autograd, m) {
  m.impl("_ge2e_loss", &ge2e::loss_autograd);
  // The kernel ops are ge2e_loss's building blocks: called with inputs that
  // require grad, they say that they have no autograd.
  m.impl("ge2e_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("ge2e_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("ge2e_forward_backward", torch::autograd::autogradNotImplementedFallback());
}
