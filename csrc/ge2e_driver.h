// The device-agnostic part of the GE2E op: input checks, the block loop, and
// the one O(N^2 D) matrix product per step, done by ATen (BLAS on the CPU,
// cuBLAS on the GPU) on blocks of whole speakers, so that the only extra
// memory is O(block x K) for the similarities plus O(N*M + K*D).
//
// The per-row work is done by a Kernels policy (cpu/ge2e_cpu.cpp,
// cuda/ge2e_cuda.cpp) with these static functions, all on contiguous tensors:
//   inverse_norms(rows, out)                      out[k] = 1/|rows_k| (0 if 0)
//   forward_rows(ctx, block, P, loss, row_stat, hardest)
//   similarity_grads(ctx, block, P->H, grad_loss, row_stat, hardest,
//                    own_terms, dw_part, db_part)
//   backward_rows(ctx, block, T, own_terms, grad_embeddings, own_sum_grads)
//   finalize(ctx, Z->grad_sums, own_sum_grads, grad_embeddings,
//            dw_part, db_part, grad_w, grad_b)
// and, where kSparseContrast is true, contrast_backward (the contrast loss
// without matrix products; see cpu/ge2e_cpu.cpp); kBlockInputShare sizes the
// blocks (speakers_per_block).
// See ge2e_math.h for what each quantity is.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "ge2e_math.h"

namespace ge2e {

// Everything a kernel needs about one call; tensors are contiguous.
struct Context {
  at::Tensor embeddings;  // (N, M, D), the input dtype
  at::Tensor sums;        // (K, D), accumulation dtype
  at::Tensor inv_sums;    // (K,), 1/|s_k|
  at::Tensor w;           // 0-dim, accumulation dtype
  at::Tensor b;
  int64_t num_speakers;   // N: speakers of these embeddings
  int64_t utterances;     // M
  int64_t dim;            // D
  int64_t total_speakers; // K: rows of sums (N, or all ranks' speakers)
  int64_t speaker_offset; // row of sums that belongs to local speaker 0
  LossMethod method;
  bool clamp;
  double min_cosine;
  bool sums_given;        // false: sums were computed here, and their
                          // gradient is folded into the embeddings' gradient
};

// Whole speakers [first, first + count) of this process's embeddings.
struct Block {
  int64_t first;
  int64_t count;
};

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline LossMethod parse_loss_method(c10::string_view name) {
  if (name == "softmax") return kSoftmax;
  if (name == "contrast") return kContrast;
  TORCH_CHECK_VALUE(false, "ge2e_ext: loss_method must be 'softmax' or 'contrast', got '",
                    std::string(name), "'");
}

// Speakers per block: the whole batch when the similarity block is small,
// else as many as keep it under max(2^18 elements, input / input_share), where
// Kernels::kBlockInputShare trades memory for larger, faster matrix products.
template <class Kernels>
int64_t speakers_per_block(const Context& c, int64_t requested) {
  if (requested > 0) return std::min(requested, c.num_speakers);
  const int64_t input_numel = c.num_speakers * c.utterances * c.dim;
  const int64_t budget =
      std::max<int64_t>(int64_t(1) << 18, input_numel / Kernels::kBlockInputShare);
  const int64_t per_speaker = c.utterances * c.total_speakers;
  return std::max<int64_t>(1, std::min<int64_t>(c.num_speakers, budget / per_speaker));
}

inline void check_scalar(const at::Tensor& t, const char* name, const at::Tensor& emb,
                         at::ScalarType acc) {
  TORCH_CHECK_VALUE(t.numel() == 1, "ge2e_ext: ", name,
                    " must be a scalar (one element), got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "ge2e_ext: ", name, " must have dtype ", acc,
                   " for ", emb.scalar_type(), " embeddings, got ", t.scalar_type());
  TORCH_CHECK(t.device() == emb.device(), "ge2e_ext: ", name, " is on ", t.device(),
              " but the embeddings are on ", emb.device());
}

// Validates the inputs of either op and builds the context. Messages say what
// was expected and what came; the Python wrapper checks first with the same
// wording, these guard direct calls of torch.ops.ge2e_ext.*.
template <class Kernels>
Context make_context(const at::Tensor& embeddings, const c10::optional<at::Tensor>& sums,
                     const at::Tensor& w, const at::Tensor& b, int64_t speaker_offset,
                     c10::string_view loss_method, c10::optional<double> min_cosine) {
  TORCH_CHECK_VALUE(embeddings.dim() == 3,
                    "ge2e_ext: embeddings must have shape (N speakers, M utterances, D), got ",
                    embeddings.dim(), " dimensions ", embeddings.sizes());
  const auto dtype = embeddings.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "ge2e_ext: embeddings must be float32, float64, float16 or bfloat16, got ",
                   dtype);
  Context c;
  c.num_speakers = embeddings.size(0);
  c.utterances = embeddings.size(1);
  c.dim = embeddings.size(2);
  // With sums of other processes' speakers given, one local speaker is enough.
  const int64_t min_speakers = sums.has_value() ? 1 : 2;
  TORCH_CHECK_VALUE(c.num_speakers >= min_speakers, "ge2e_ext: GE2E needs N >= ", min_speakers,
                    " speakers, got N = ", c.num_speakers);
  TORCH_CHECK_VALUE(c.utterances >= 2,
                    "ge2e_ext: GE2E needs M >= 2 utterances per speaker (the exclusive "
                    "centroid of one utterance is empty), got M = ",
                    c.utterances);
  TORCH_CHECK_VALUE(c.dim >= 1, "ge2e_ext: embeddings need D >= 1 features, got D = ", c.dim);
  const auto acc = accumulation_type(dtype);
  check_scalar(w, "w", embeddings, acc);
  check_scalar(b, "b", embeddings, acc);
  c.method = parse_loss_method(loss_method);
  c.clamp = min_cosine.has_value();
  c.min_cosine = min_cosine.value_or(0.0);
  c.embeddings = embeddings.contiguous();
  c.w = w.reshape({});
  c.b = b.reshape({});
  c.sums_given = sums.has_value();
  if (c.sums_given) {
    const auto& s = *sums;
    TORCH_CHECK_VALUE(s.dim() == 2 && s.size(1) == c.dim,
                      "ge2e_ext: sums must have shape (K speakers, D = ", c.dim, "), got ",
                      s.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == acc, "ge2e_ext: sums must have dtype ", acc, " for ",
                     dtype, " embeddings, got ", s.scalar_type());
    TORCH_CHECK(s.device() == embeddings.device(), "ge2e_ext: sums are on ", s.device(),
                " but the embeddings are on ", embeddings.device());
    c.total_speakers = s.size(0);
    TORCH_CHECK_VALUE(c.total_speakers >= 2, "ge2e_ext: GE2E needs K >= 2 speakers in sums, got ",
                      c.total_speakers);
    TORCH_CHECK_VALUE(speaker_offset >= 0 && speaker_offset + c.num_speakers <= c.total_speakers,
                      "ge2e_ext: speaker_offset + N must lie in [0, K]: got speaker_offset = ",
                      speaker_offset, ", N = ", c.num_speakers, ", K = ", c.total_speakers);
    c.sums = s.contiguous();
    c.speaker_offset = speaker_offset;
  } else {
    TORCH_CHECK_VALUE(speaker_offset == 0,
                      "ge2e_ext: speaker_offset must be 0 when sums are not given, got ",
                      speaker_offset);
    c.sums = c.embeddings.sum(1, /*keepdim=*/false, acc);
    c.total_speakers = c.num_speakers;
    c.speaker_offset = 0;
  }
  c.inv_sums = at::empty({c.total_speakers}, c.sums.options());
  Kernels::inverse_norms(c.sums, c.inv_sums);
  return c;
}

// The block of embeddings as a (rows, D) matrix in the accumulation dtype, for
// the matrix products (a float16/bfloat16 input is widened one block at a time).
inline at::Tensor block_rows(const Context& c, const Block& blk) {
  at::Tensor rows = c.embeddings.view({c.num_speakers * c.utterances, c.dim})
                        .narrow(0, blk.first * c.utterances, blk.count * c.utterances);
  return rows.scalar_type() == c.sums.scalar_type() ? rows : rows.to(c.sums.scalar_type());
}

// forward(embeddings, sums?, w, b) -> (loss (N, M), row_stat (N, M), hardest (N, M))
// row_stat: the row's log-sum-exp (softmax) or hardest-impostor similarity
// (contrast); hardest: the index k != j of the most similar other speaker
// (contrast; -1 for softmax, which does not need it).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& embeddings, const c10::optional<at::Tensor>& sums, const at::Tensor& w,
    const at::Tensor& b, int64_t speaker_offset, c10::string_view loss_method,
    c10::optional<double> min_cosine, int64_t block_speakers) {
  Context c = make_context<Kernels>(embeddings, sums, w, b, speaker_offset, loss_method,
                                    min_cosine);
  const auto acc_options = c.sums.options();
  at::Tensor loss = at::empty({c.num_speakers, c.utterances}, acc_options);
  at::Tensor row_stat = at::empty({c.num_speakers, c.utterances}, acc_options);
  at::Tensor hardest =
      at::empty({c.num_speakers, c.utterances}, acc_options.dtype(at::kLong));
  const int64_t per_block = speakers_per_block<Kernels>(c, block_speakers);
  at::Tensor similarity_block =
      at::empty({per_block * c.utterances, c.total_speakers}, acc_options);
  for (int64_t first = 0; first < c.num_speakers; first += per_block) {
    const Block blk{first, std::min(per_block, c.num_speakers - first)};
    at::Tensor dots = similarity_block.narrow(0, 0, blk.count * c.utterances);
    at::mm_out(dots, block_rows(c, blk), c.sums.t());  // e_r . s_k for every k
    Kernels::forward_rows(c, blk, dots, loss, row_stat, hardest);
  }
  return {loss, row_stat, hardest};
}

// The end of every backward: grad_sums from Z and the q sums (folded into the
// rows' gradients when the sums were computed here), and dLoss/dw, dLoss/db.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_backward(
    const Context& c, const at::Tensor& w, const at::Tensor& b, at::Tensor& grad_sums,
    const at::Tensor& own_sum_grads, at::Tensor& grad_embeddings, const at::Tensor& dw_part,
    const at::Tensor& db_part) {
  at::Tensor grad_w = at::empty_like(c.w);
  at::Tensor grad_b = at::empty_like(c.b);
  Kernels::finalize(c, grad_sums, own_sum_grads, grad_embeddings, dw_part, db_part, grad_w,
                    grad_b);
  return {grad_embeddings, grad_sums, grad_w.view(w.sizes()), grad_b.view(b.sizes())};
}

// backward -> (grad_embeddings, grad_sums (K, D), grad_w, grad_b). When sums
// were not given, grad_sums is already folded into grad_embeddings.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_loss, const at::Tensor& embeddings,
    const c10::optional<at::Tensor>& sums, const at::Tensor& w, const at::Tensor& b,
    const at::Tensor& row_stat, const at::Tensor& hardest, int64_t speaker_offset,
    c10::string_view loss_method, c10::optional<double> min_cosine, int64_t block_speakers) {
  Context c = make_context<Kernels>(embeddings, sums, w, b, speaker_offset, loss_method,
                                    min_cosine);
  const int64_t rows = c.num_speakers * c.utterances;
  const std::vector<int64_t> row_shape{c.num_speakers, c.utterances};
  TORCH_CHECK_VALUE(grad_loss.sizes() == row_shape && row_stat.sizes() == row_shape &&
                        hardest.sizes() == row_shape,
                    "ge2e_ext: grad_loss, row_stat and hardest must have shape (N, M) = ",
                    row_shape, ", got ", grad_loss.sizes(), ", ", row_stat.sizes(), ", ",
                    hardest.sizes());
  const auto acc_options = c.sums.options();
  const at::Tensor grad_rows = grad_loss.to(acc_options).contiguous();
  const at::Tensor row_stat_c = row_stat.to(acc_options).contiguous();
  const at::Tensor hardest_c = hardest.to(acc_options.dtype(at::kLong)).contiguous();

  at::Tensor grad_embeddings = at::empty_like(c.embeddings);
  // Accumulates Z = H^T E over the blocks (the first block writes it).
  at::Tensor grad_sums = at::empty({c.total_speakers, c.dim}, acc_options);
  at::Tensor own_sum_grads = at::empty({c.num_speakers, c.dim}, acc_options);
  // Per row: h = dLoss/dcos(e, s - e), 1/|e|, 1/|s - e| and that cosine (the
  // OwnTerms of ge2e_math.h), so the second pass need not recompute them.
  at::Tensor own_terms = at::empty({rows, kOwnTermsSize}, acc_options);
  at::Tensor dw_part = at::empty({rows}, acc_options);
  at::Tensor db_part = at::empty({rows}, acc_options);

  if constexpr (Kernels::kSparseContrast) {
    if (c.method == kContrast) {
      Kernels::contrast_backward(c, grad_rows, hardest_c, grad_embeddings, own_sum_grads, dw_part,
                                 db_part, grad_sums);
      return finish_backward<Kernels>(c, w, b, grad_sums, own_sum_grads, grad_embeddings, dw_part,
                                      db_part);
    }
  }
  const int64_t per_block = speakers_per_block<Kernels>(c, block_speakers);
  at::Tensor similarity_block =
      at::empty({per_block * c.utterances, c.total_speakers}, acc_options);
  // T = H S is written where the row's gradient goes when the dtypes agree.
  const bool widened = c.embeddings.scalar_type() != c.sums.scalar_type();
  at::Tensor cross_block =
      widened ? at::empty({per_block * c.utterances, c.dim}, acc_options) : at::Tensor();
  at::Tensor grad_rows_2d = grad_embeddings.view({rows, c.dim});
  for (int64_t first = 0; first < c.num_speakers; first += per_block) {
    const Block blk{first, std::min(per_block, c.num_speakers - first)};
    const int64_t blk_rows = blk.count * c.utterances;
    at::Tensor e_rows = block_rows(c, blk);
    at::Tensor h = similarity_block.narrow(0, 0, blk_rows);
    at::mm_out(h, e_rows, c.sums.t());  // recompute e_r . s_k
    Kernels::similarity_grads(c, blk, h, grad_rows, row_stat_c, hardest_c, own_terms, dw_part,
                              db_part);  // h now holds H
    at::Tensor cross = widened ? cross_block.narrow(0, 0, blk_rows)
                               : grad_rows_2d.narrow(0, blk.first * c.utterances, blk_rows);
    at::mm_out(cross, h, c.sums);                // T = H S
    if (first == 0) {
      at::mm_out(grad_sums, h.t(), e_rows);      // Z = H^T E
    } else {
      grad_sums.addmm_(h.t(), e_rows);           // Z += H^T E
    }
    Kernels::backward_rows(c, blk, cross, own_terms, grad_embeddings, own_sum_grads);
  }
  return finish_backward<Kernels>(c, w, b, grad_sums, own_sum_grads, grad_embeddings, dw_part,
                                  db_part);
}

}  // namespace ge2e
