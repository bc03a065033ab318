// One call of the GE2E op as the kernels see it: plain pointers and sizes, no
// ATen or CUDA types, so that the CPU kernels, the CUDA kernels and their CPU
// emulation (tests/cuda_emulation) all take the same description. The driver
// (ge2e_driver.h) allocates the buffers and fills it in.
#pragma once

#include <cstdint>

#include "ge2e_math.h"

namespace ge2e {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// The tensors and sizes of one call. Pointers are on the call's device and
// contiguous; "acc" is the accumulation type: double for float64 embeddings,
// float otherwise.
struct Problem {
  DType dtype;             // of the embeddings and of their gradient
  int method;              // index in LossMethods (ge2e_math.h)
  int64_t speakers;        // N: speakers of these embeddings
  int64_t utterances;      // M, when every speaker has M utterances (0 otherwise)
  int64_t dim;             // D
  int64_t total_rows;      // B: the local utterances (N * M when every speaker has M)
  // Speaker j's utterances are rows [speaker_offsets[j], speaker_offsets[j + 1])
  // (N + 1 int64 on the call's device), or nullptr: rows [j * M, (j + 1) * M).
  const int64_t* speaker_offsets;
  int64_t max_utterances;  // the most utterances of one speaker (host-side buffers only)
  int64_t total_speakers;  // K: rows of sums (N, or every rank's speakers)
  int64_t speaker_offset;  // the row of sums that holds local speaker 0
  bool sums_given;         // false: sums are this call's own, and their
                           // gradient is folded into the embeddings' gradient
  bool clamp;              // the cosine clamp is on (min_cosine is not None)
  double min_cosine;

  const void* embeddings;  // (B, D): the rows of speaker 0, then of speaker 1, ...
  const void* w;           // 0-dim acc: the raw w (max(w, kMinW) is taken inside)
  const void* b;           // 0-dim acc
  void* sums;              // (K, D) acc: s''_k = sum_scales[k] s_k, the speaker sums scaled
                           //   by powers of two (from the given sums, or written by
                           //   the speaker statistics)
  void* sum_scales;        // (K,) acc: the power of two of each row of sums
  void* own_sums_hi;       // (N, D) acc: the compensated sums of the local speakers'
  void* own_sums_lo;       //   utterances times speaker_scales[j] (add_compensated)
  void* speaker_scales;    // (N,) acc: sigma_j, the power of two of local speaker j
  void* inv_sums;          // (K,) acc: 1/|s''_k| (0 for a zero sum)
  void* own_terms;         // (B, kOwnTermsSize) acc: each row's OwnCosine and own_grad

  // Scratch of a device whose policy asks for it (ge2e_driver.h, DeviceScratch;
  // the CUDA kernels), nullptr otherwise:
  int64_t* row_speakers = nullptr;         // (B,) the local speaker of each row (the labels form
                                           //   only), written by the speaker statistics
  void* row_dots = nullptr;                // (B,) acc: each row's e_r . T_r in the row gradients
  void* finish_partials = nullptr;         // acc: the finish's per-chunk sums
  unsigned int* finish_counter = nullptr;  // the finish's chunks done (zeroed by the statistics)
};

// The end of a gradient sweep (ge2e_driver.h): dLoss/ds in place (given sums),
// dLoss/dw, dLoss/db and, for the fused op, scale * the summed loss. Plain
// pointers on the call's device; acc.
struct FinishArgs {
  void* z;                // (K, D): Z = H^T E, made dLoss/ds when the sums are given
  const void* w_part;     // (B,) the rows' dLoss/dw, dLoss/db parts
  const void* b_part;
  const void* loss_rows;  // (B,) the rows' losses, or nullptr (no loss_total)
  double loss_scale;
  void* grad_w;           // 0-dim
  void* grad_b;
  void* loss_total;       // 0-dim, or nullptr
};

GE2E_ISA_BEGIN

// The first row of local speaker j (j = N: B). Offsets are clamped to the
// rows, so that offsets from a direct call of an op that nothing checked
// (on an accelerator) cannot send a kernel out of bounds.
GE2E_HD int64_t first_row(const Problem& p, int64_t j) {
  if (p.speaker_offsets == nullptr) return j * p.utterances;
  const int64_t row = p.speaker_offsets[j];
  return row < 0 ? 0 : (row > p.total_rows ? p.total_rows : row);
}

// The local speaker of row r.
GE2E_HD int64_t speaker_of(const Problem& p, int64_t r) {
  if (p.speaker_offsets == nullptr) return r / p.utterances;
  int64_t lo = 0, hi = p.speakers;  // speaker_offsets[lo] <= r < speaker_offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (p.speaker_offsets[mid] <= r) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

GE2E_ISA_END

// The rows [first_row, first_row + rows) of the local embeddings, which touch
// speakers [first, first + count): whole speakers, except that a speaker with
// more rows than a block holds is split, its first and last speaker then
// having rows outside the block (ge2e_driver.h, blocks_of).
struct Block {
  int64_t first;
  int64_t count;
  int64_t first_row;
  int64_t rows;
};

// What the row kernel does with a block of cosines.
enum class RowPass : int {
  kLoss,             // the rows' losses (and hardest impostors)
  kLossAndGradient,  // the losses, and the gradient for the upstream `grad_scale` on every row
  kGradient,         // the gradient for upstream grad_loss, given the forward's losses
};

// The per-row inputs and outputs of the row kernel; acc unless said.
struct RowBuffers {
  void* loss;                 // (B): written (kLoss*)
  double* state;              // (B, kRowStateSize) float64: written (kLoss*) or read (kGradient)
  int64_t* hardest;           // (B): the hardest impostor (-1 where the method has none),
                              //   written by every pass for the sparse products
  bool* top1;                 // (B): whether the row's own speaker is its top-1 (takes_top1
                              //   in ge2e_math.h), written (kLoss*)
  const void* grad_loss;      // kGradient: dLoss/dL of row r = utterance i of speaker j, at
  int64_t grad_stride_speaker;    // j * stride_speaker + i * stride_utterance (N, M),
  int64_t grad_stride_utterance;  // or r * stride_utterance (B,) with speaker_offsets
  double grad_scale;          // kLossAndGradient: dLoss/dL_ji of every row
  void* w_grad_part;          // (B): the row's dLoss/dw (before the clamp rule)
  void* b_grad_part;          // (B): the row's dLoss/db
};

GE2E_ISA_BEGIN

// Where the upstream gradient of row r (utterance i of speaker j) is.
GE2E_HD int64_t upstream_index(const Problem& p, const RowBuffers& rb, int64_t r, int64_t j,
                               int64_t i) {
  return p.speaker_offsets != nullptr ? r * rb.grad_stride_utterance
                                      : j * rb.grad_stride_speaker + i * rb.grad_stride_utterance;
}

// Calls fn(scalar_t{}, acc_t{}) for the embeddings' dtype. Types names the
// half-precision types of the caller's world (c10's on the CPU, CUDA's on
// the GPU): the one dtype switch of the kernels.
template <class Types, typename Fn>
auto dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float(), float());
    case DType::kFloat64: return fn(double(), double());
    case DType::kFloat16: return fn(typename Types::Half(), float());
    case DType::kBFloat16: return fn(typename Types::BFloat16(), float());
  }
  __builtin_unreachable();
}

GE2E_ISA_END
}  // namespace ge2e
