// The interface of the GE2E ops, written once.
//
// GE2E_PROBLEM_ARGS lists the arguments that describe one GE2E problem, the
// same leading arguments of every op below. From that one list follow the
// schemas' text, the C++ parameters of every kernel (ge2e_driver.h,
// autograd/ge2e_autograd.cpp, ge2e_ops.cpp), ProblemArgs (what the C++ passes
// around and autograd saves), the typed calls through the dispatcher
// (ge2e_ops.h); ge2e_ext/_ops.py's fake kernels read the arguments by name
// from the registered schemas. A new argument is one line here plus its use
// (make_call in ge2e_driver.h, and the Python that passes it).
//
// The ops:
//   ge2e_loss        the public op (ge2e_ext.ge2e_loss calls it): the loss of
//                    this call's own speakers, reduced as `reduction` says;
//                    it decomposes into _ge2e_loss.
//   _ge2e_loss       the loss of a problem, with its autograd
//                    (autograd/ge2e_autograd.cpp): the distributed form's
//                    sums and speaker_offset, and the reduction as a scale.
//   ge2e_forward, ge2e_backward, ge2e_forward_backward
//                    the kernel ops _ge2e_loss is built from, which every
//                    device implements (cpu/, cuda/).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>

namespace ge2e {

// X(name, schema type, C++ parameter type, stored type), separated by SEP().
//
// The GE2E loss of embeddings (N, M, D), or (B, D) rows grouped by speaker
// with speaker_offsets (N + 1,) (speaker j's rows are [offsets[j],
// offsets[j + 1])), scored against the speaker sums (K, D) (sums None: the
// embeddings' own, K = N), local speaker j being row speaker_offset + j of
// the sums, with similarity max(w, 1e-6) cos + b and loss_method's loss of
// each row; cosines clamped below at min_cosine (None: unclamped). With
// normalize, the loss of the rows scaled to unit length, e / max(|e|, 1e-12)
// (torch.nn.functional.normalize), and the gradients through that (given sums
// are taken as sums of unit rows).
#define GE2E_PROBLEM_ARGS(X, SEP)                                                           \
  X(embeddings, "Tensor", const at::Tensor&, at::Tensor) SEP()                              \
  X(sums, "Tensor?", const c10::optional<at::Tensor>&, c10::optional<at::Tensor>) SEP()     \
  X(speaker_offset, "int", int64_t, int64_t) SEP()                                          \
  X(w, "Tensor", const at::Tensor&, at::Tensor) SEP()                                       \
  X(b, "Tensor", const at::Tensor&, at::Tensor) SEP()                                       \
  X(loss_method, "str", c10::string_view, std::string) SEP()                                \
  X(min_cosine, "float?", c10::optional<double>, c10::optional<double>) SEP()               \
  X(speaker_offsets, "Tensor?", const c10::optional<at::Tensor>&, c10::optional<at::Tensor>) \
  SEP() X(normalize, "bool", bool, bool)

#define GE2E_COMMA_() ,
#define GE2E_NOTHING_()
#define GE2E_SCHEMA_COMMA_() ", "
#define GE2E_SCHEMA_ARG_(name, schema, param, stored) schema " " #name
#define GE2E_PARAM_(name, schema, param, stored) param name
#define GE2E_PARAM_TYPE_(name, schema, param, stored) param
#define GE2E_STORED_(name, schema, param, stored) stored(name)
#define GE2E_MEMBER_(name, schema, param, stored) stored name;
#define GE2E_MEMBER_OF_ARGS_(name, schema, param, stored) args.name

// The list as schema text, as C++ parameters, and as their types.
#define GE2E_PROBLEM_SCHEMA GE2E_PROBLEM_ARGS(GE2E_SCHEMA_ARG_, GE2E_SCHEMA_COMMA_)
#define GE2E_PROBLEM_PARAMS GE2E_PROBLEM_ARGS(GE2E_PARAM_, GE2E_COMMA_)
#define GE2E_PROBLEM_PARAM_TYPES GE2E_PROBLEM_ARGS(GE2E_PARAM_TYPE_, GE2E_COMMA_)
// Inside a function taking GE2E_PROBLEM_PARAMS: its arguments as ProblemArgs.
#define GE2E_PROBLEM_FROM_PARAMS \
  ::ge2e::ProblemArgs { GE2E_PROBLEM_ARGS(GE2E_STORED_, GE2E_COMMA_) }

// One problem's arguments, held (autograd keeps them from forward to backward).
struct ProblemArgs {
  GE2E_PROBLEM_ARGS(GE2E_MEMBER_, GE2E_NOTHING_)
};

// fn(problem arguments..., extra...): a call of a function taking
// GE2E_PROBLEM_PARAMS (and then `extra`) with these arguments.
template <class Fn, class... Extra>
decltype(auto) apply_problem(const ProblemArgs& args, Fn&& fn, Extra&&... extra) {
  return fn(GE2E_PROBLEM_ARGS(GE2E_MEMBER_OF_ARGS_, GE2E_COMMA_), std::forward<Extra>(extra)...);
}

// The public op: the loss of this call's speakers (sums None, speaker_offset
// 0), reduced "sum", "mean" (over the rows) or "none" (per row); and the rows'
// top1 (bool, (N, M) or (B,)): whether each row's own speaker is the most
// similar (the arg-max of its clamped cosines, ties to the lower index; false
// where a cosine is NaN), from the same pass. top1 is not differentiable.
inline constexpr const char* kPublicLossSchema =
    "ge2e_loss(Tensor embeddings, Tensor w, Tensor b, str loss_method=\"softmax\", "
    "float? min_cosine=1e-6, str reduction=\"sum\", Tensor? speaker_offsets=None, "
    "bool normalize=False) -> (Tensor, Tensor)";

// The loss of a problem: the per-row losses ((N, M) or (B,)) when scale is
// None, else scale times their sum (0-dim); and the rows' top1 (as ge2e_loss's).
// Differentiable in embeddings, sums, w and b.
using LossResult = std::tuple<at::Tensor, at::Tensor>;
inline constexpr const char* kLossSchema =
    "_ge2e_loss(" GE2E_PROBLEM_SCHEMA ", float? scale) -> (Tensor, Tensor)";

// The per-row losses, (N, M) or (B,), each row's saved state, shaped
// (..., kRowStateSize) float64 (what the method's gradient is taken from:
// softmax, the row's largest difference and its log-normaliser; contrast, the
// hardest impostor), and the rows' top1. The backward reads the state, never
// the losses, so a caller may change the returned losses in place.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
inline constexpr const char* kForwardSchema =
    "ge2e_forward(" GE2E_PROBLEM_SCHEMA ") -> (Tensor, Tensor, Tensor)";

// The gradients (embeddings, sums, w, b) for the upstream gradient of the
// losses, given the forward's state; the cosines are recomputed. When sums are
// not given, their gradient is already folded into the embeddings' (the second
// output is then scratch).
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
inline constexpr const char* kBackwardSchema =
    "ge2e_backward(" GE2E_PROBLEM_SCHEMA ", Tensor grad_loss, Tensor state) "
    "-> (Tensor, Tensor, Tensor, Tensor)";

// scale times the sum of the losses (0-dim), the rows' top1 and the loss's
// gradients (embeddings, sums, w, b), in one sweep: what a training step with
// reduction "sum" or "mean" needs.
using ForwardBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
inline constexpr const char* kForwardBackwardSchema =
    "ge2e_forward_backward(" GE2E_PROBLEM_SCHEMA ", float scale) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";

// Tests only: the blocks every later call sweeps in (the driver's
// blocks_of), returning the previous setting. 0 sizes them from the memory
// budget, > 0 asks for blocks of that many whole speakers, < 0 for blocks of
// -block_speakers rows (which may split a speaker across blocks).
inline constexpr const char* kSetBlockSpeakersSchema = "_set_block_speakers(int blocks) -> int";

}  // namespace ge2e
