// The device-agnostic part of the GE2E op: input checks, buffers, the loop
// over blocks of rows, and the matrix products, done by ATen (BLAS
// on the CPU, cuBLAS on the GPU). The only memory beyond the inputs and the
// gradient is one block of cosines (block rows x K) and O(B + K*D), B the
// number of utterances (N*M when every speaker has M).
//
// A step with one upstream gradient for every row (reduction "sum" or
// "mean") is one sweep: per block, P = E S^T; the row kernel turns P into the
// rows' losses and H (in place); T = H S and Z = H^T E give the cross-speaker
// gradients; the row-gradient kernel adds the own-speaker terms. That is
// three products, the minimum (docs/math.md); the backward then only scales.
//
// The per-row work is a Device policy's (cpu/ge2e_cpu.cpp, cuda/ge2e_cuda.cpp):
//   kBlockInputShare,            size the blocks (rows_per_block)
//   kBoundStepPeak
//   kSparseProducts              whether a method with a sparse gradient
//                                (ContrastLoss) skips T = H S and Z = H^T E
//   speaker_stats(p)             sums, their inverse norms, the rows' own cosines
//   rows(p, buffers, pass, block, cosines)
//   row_gradients(p, block, t_rows, cosines, hardest, z_to_fold, grad)
//   sparse_sum_grads(p, block, cosines, hardest, z, accumulate)   (kSparseProducts)
//   split_speaker_others(p, speaker, q_sums, grad)  adds, to the rows of a speaker that
//                                the blocks split, the sum over its other rows' q
//                                (not a DeviceScratch device's: its fold does)
//   fold(p, z, grad)             adds dLoss/ds_j to every utterance of speaker j
//   finish(p, z, w_part, b_part, loss_rows, loss_scale, grad_w, grad_b, loss_total)
//   unit_rows(p, in, out, norms)       normalize=True: the rows as unit rows, and
//                                      their norms (ge2e_math.h, "unit rows")
//   unit_row_grads(p, in, norms, grad) normalize=True: the gradient through the
//                                      normalisation, in place
// each taking the call's Problem (ge2e_problem.h). A device whose policy has
// kFinishPartials (DeviceScratch; the CUDA device) gets the Problem's scratch
// and runs the finish inside the sweep's last launch instead:
//   row_gradients(..., sparse, grad, others, finish) and fold(p, z, grad, finish),
//   with the FinishArgs on the last launch and nullptr on the others; with
//   several blocks the row gradients leave the other rows' term (others =
//   false) to fold, which runs then even with given sums (z = nullptr).
// The loss method stays an index (p.method) here: each device makes it a
// type once, where it picks its kernels (dispatch_loss_method).
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/library.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Optional.h>

#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ge2e_math.h"
#include "ge2e_problem.h"
#include "ge2e_schema.h"

namespace ge2e {

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false,
                   "ge2e_ext: embeddings must be float32, float64, float16 or bfloat16, got ", t);
}

template <int I = 0>
void append_method_names(std::string& names) {
  using Policy = typename std::tuple_element<I, LossMethods>::type;
  names += std::string(I == 0 ? "'" : ", '") + Policy::kName + "'";
  if constexpr (I + 1 < kNumLossMethods) append_method_names<I + 1>(names);
}

inline int parse_loss_method(c10::string_view name) {
  const int index = loss_method_index(name);
  if (index < 0) {
    std::string names;
    append_method_names(names);
    TORCH_CHECK_VALUE(false, "ge2e_ext: loss_method must be one of ", names, ", got '",
                      std::string(name), "'");
  }
  return index;
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

// a * b for sizes (>= 0), or an error naming `what` when it does not fit in int64.
inline int64_t checked_size(int64_t a, int64_t b, const char* what) {
  uint64_t product = 0;
  TORCH_CHECK_VALUE(a >= 0 && b >= 0 && !c10::mul_overflows(static_cast<uint64_t>(a),
                                                              static_cast<uint64_t>(b),
                                                              &product) &&
                        product <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                    "ge2e_ext: ", what, " = ", a, " x ", b, " does not fit in int64");
  return static_cast<int64_t>(product);
}

// block_speakers: 0 (automatic), a positive number of speakers per block, or
// minus a number of rows per block (a test knob: blocks that split a speaker).
inline void check_block_speakers(int64_t block_speakers) {
  TORCH_CHECK_VALUE(block_speakers > std::numeric_limits<int64_t>::min(),
                    "ge2e_ext: block_speakers must be 0 (automatic), a positive number of "
                    "speakers per block or minus a number of rows per block, got ",
                    block_speakers);
}

// The blocks the tests ask for (the _set_block_speakers op), 0 otherwise: a
// setting of the process, not an argument, so that no op's interface carries it.
inline std::atomic<int64_t>& block_speakers_for_tests() {
  static std::atomic<int64_t> block_speakers{0};
  return block_speakers;
}

// The _set_block_speakers op (ge2e_schema.h): the previous setting.
inline int64_t set_block_speakers_for_tests(int64_t blocks) {
  check_block_speakers(blocks);
  return block_speakers_for_tests().exchange(blocks);
}

// Whether a Device asks for the Problem's scratch (row_speakers, row_dots,
// finish_partials, finish_counter) and runs the finish in its sweep's last
// launch: a policy with kFinishPartials, the partials' size in acc elements.
template <class Device, class = void>
struct DeviceScratch : std::false_type {};
template <class Device>
struct DeviceScratch<Device, std::void_t<decltype(Device::kFinishPartials)>> : std::true_type {};

// The tensors of one call, and the Problem that points into them.
struct Call {
  at::Tensor embeddings;  // contiguous, viewed as (B, D); with normalize, the unit rows
  at::Tensor input_rows, row_norms;  // normalize: the input (contiguous), its rows' norms
  at::Tensor speaker_offsets, sums, sum_scales, own_sums_hi, own_sums_lo, speaker_scales,
      inv_sums, own_terms, w, b;
  at::Tensor row_speakers, row_dots, finish_partials, finish_counter;  // DeviceScratch
  at::TensorOptions acc_options;
  std::vector<int64_t> row_shape;  // of the per-row outputs: (N, M), or (B,)
  Problem problem;
};

// The layout of the embeddings: (N, M, D), or (B, D) rows grouped by speaker
// with speaker_offsets (N + 1,) giving where each speaker's rows start.
inline void check_layout(const at::Tensor& embeddings, const c10::optional<at::Tensor>& offsets,
                         Call& c) {
  Problem& p = c.problem;
  TORCH_CHECK_VALUE(embeddings.layout() == at::kStrided,
                    "ge2e_ext: embeddings must be a dense (strided) tensor, got layout ",
                    embeddings.layout());
  if (!offsets.has_value()) {
    TORCH_CHECK_VALUE(embeddings.dim() == 3,
                      "ge2e_ext: embeddings must have shape (N speakers, M utterances, D), got ",
                      embeddings.dim(), " dimensions ", embeddings.sizes());
    p.speakers = embeddings.size(0);
    p.utterances = embeddings.size(1);
    p.dim = embeddings.size(2);
    p.total_rows = p.speakers * p.utterances;
    p.max_utterances = p.utterances;
    p.speaker_offsets = nullptr;
    c.row_shape = {p.speakers, p.utterances};
    TORCH_CHECK_VALUE(p.utterances >= 2,
                      "ge2e_ext: GE2E needs M >= 2 utterances per speaker (the exclusive "
                      "centroid of one utterance is empty), got M = ",
                      p.utterances);
    return;
  }
  const at::Tensor& o = *offsets;
  TORCH_CHECK_VALUE(embeddings.dim() == 2,
                    "ge2e_ext: with speaker_offsets, embeddings must have shape (B rows, D), got ",
                    embeddings.sizes());
  TORCH_CHECK_VALUE(o.dim() == 1 && o.size(0) >= 2 && o.scalar_type() == at::kLong,
                    "ge2e_ext: speaker_offsets must be a 1-D int64 tensor of N + 1 >= 2 row "
                    "offsets, got shape ", o.sizes(), " and dtype ", o.scalar_type());
  TORCH_CHECK(o.device() == embeddings.device(), "ge2e_ext: speaker_offsets are on ", o.device(),
              " but the embeddings are on ", embeddings.device());
  p.speakers = o.size(0) - 1;
  p.utterances = 0;
  p.dim = embeddings.size(1);
  p.total_rows = embeddings.size(0);
  c.speaker_offsets = o.contiguous();
  p.speaker_offsets = c.speaker_offsets.data_ptr<int64_t>();
  c.row_shape = {p.total_rows};
  p.max_utterances = 0;
  // The offsets are checked where reading them is free; on an accelerator the
  // kernels clamp them to the rows (first_row), and ge2e_ext.ge2e_loss builds
  // them itself.
  if (o.device().is_cpu()) {
    const int64_t* off = p.speaker_offsets;
    TORCH_CHECK_VALUE(off[0] == 0 && off[p.speakers] == p.total_rows,
                      "ge2e_ext: speaker_offsets must run from 0 to B = ", p.total_rows,
                      ", got ", off[0], " .. ", off[p.speakers]);
    // Every offset in [0, B] first, so that the differences below cannot overflow.
    for (int64_t j = 0; j <= p.speakers; ++j) {
      TORCH_CHECK_VALUE(off[j] >= 0 && off[j] <= p.total_rows,
                        "ge2e_ext: speaker_offsets must be increasing row offsets in [0, B = ",
                        p.total_rows, "], but offset ", j, " is ", off[j]);
    }
    for (int64_t j = 0; j < p.speakers; ++j) {
      const int64_t count = off[j + 1] - off[j];
      TORCH_CHECK_VALUE(count >= 0, "ge2e_ext: speaker_offsets must be increasing, but offset ",
                        j + 1, " (", off[j + 1], ") is below offset ", j, " (", off[j], ")");
      TORCH_CHECK_VALUE(count >= 2,
                        "ge2e_ext: GE2E needs at least 2 utterances per speaker (the exclusive "
                        "centroid of one utterance is empty), but speaker ", j, " has ", count);
      p.max_utterances = std::max(p.max_utterances, count);
    }
  }
}

// power_of_two_scale (ge2e_math.h) of each element, as a tensor op.
inline at::Tensor power_of_two_scales(const at::Tensor& max_abs, int max_exponent) {
  const at::Tensor exponent = std::get<1>(at::frexp(max_abs));
  const at::Tensor scale =
      at::ldexp(at::ones_like(max_abs), exponent.neg().clamp_max(max_exponent));
  return at::where(max_abs.gt(0).logical_and(max_abs.isfinite()), scale,
                   at::ones_like(max_abs));
}

// Given sums (K, D) as the kernels take them: each row times a power of two
// (its largest coordinate into [0.5, 1), then its norm into [0.5, 1)), and
// those scales, by tensor ops on any device (K x D is small).
inline std::tuple<at::Tensor, at::Tensor> scaled_sums(const at::Tensor& sums) {
  const int max_exponent = sums.scalar_type() == at::kDouble ? 1022 : 126;
  const at::Tensor sigma = power_of_two_scales(sums.abs().amax(1), max_exponent);
  const at::Tensor beta =
      power_of_two_scales(at::linalg_vector_norm(sums * sigma.unsqueeze(1), 2, {1}), max_exponent);
  const at::Tensor scales = sigma * beta;
  return {sums * scales.unsqueeze(1), scales};
}

// Validates the inputs of any of the ops and computes the speaker statistics.
// Messages say what was expected and what came; the Python wrapper checks
// first with the same wording, these guard direct calls of torch.ops.ge2e_ext.*.
template <class Device>
Call make_call(const ProblemArgs& args) {
  const at::Tensor& embeddings = args.embeddings;
  const c10::optional<at::Tensor>& sums = args.sums;
  const int64_t speaker_offset = args.speaker_offset;
  const c10::optional<double> min_cosine = args.min_cosine;
  Call c;
  Problem& p = c.problem;
  check_layout(embeddings, args.speaker_offsets, c);
  p.dtype = dtype_of(embeddings.scalar_type());
  // With sums of other processes' speakers given, one local speaker is enough.
  const int64_t min_speakers = sums.has_value() ? 1 : 2;
  TORCH_CHECK_VALUE(p.speakers >= min_speakers, "ge2e_ext: GE2E needs N >= ", min_speakers,
                    " speakers, got N = ", p.speakers);
  TORCH_CHECK_VALUE(p.dim >= 1, "ge2e_ext: embeddings need D >= 1 features, got D = ", p.dim);
  const auto acc = accumulation_type(embeddings.scalar_type());
  check_scalar(args.w, "w", embeddings, acc);
  check_scalar(args.b, "b", embeddings, acc);
  p.method = parse_loss_method(args.loss_method);
  if (min_cosine.has_value()) {
    TORCH_CHECK_VALUE(*min_cosine < 1.0 && *min_cosine > -HUGE_VAL,
                      "ge2e_ext: min_cosine must be a finite number below 1 (a cosine is at "
                      "most 1, so a clamp at or above it makes the loss constant), got ",
                      *min_cosine);
  }
  p.clamp = min_cosine.has_value();
  p.min_cosine = min_cosine.value_or(0.0);
  c.acc_options = embeddings.options().dtype(acc);
  c.embeddings = embeddings.contiguous();
  if (args.normalize) {  // the loss of the unit rows: one pass, one input-sized buffer
    c.input_rows = c.embeddings;
    c.row_norms = at::empty({p.total_rows}, c.acc_options);
    c.embeddings = at::empty_like(c.input_rows);
    RECORD_FUNCTION("ge2e_ext::unit_rows", {});
    Device::unit_rows(p, c.input_rows.data_ptr(), c.embeddings.data_ptr(),
                      c.row_norms.data_ptr());
  }
  c.w = args.w.dim() == 0 ? args.w : args.w.reshape({});
  c.b = args.b.dim() == 0 ? args.b : args.b.reshape({});
  p.sums_given = sums.has_value();
  c.own_sums_hi = at::empty({p.speakers, p.dim}, c.acc_options);
  c.own_sums_lo = at::empty({p.speakers, p.dim}, c.acc_options);
  if (p.sums_given) {
    const auto& s = *sums;
    TORCH_CHECK_VALUE(s.dim() == 2 && s.size(1) == p.dim,
                      "ge2e_ext: sums must have shape (K speakers, D = ", p.dim, "), got ",
                      s.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == acc, "ge2e_ext: sums must have dtype ", acc, " for ",
                     embeddings.scalar_type(), " embeddings, got ", s.scalar_type());
    TORCH_CHECK(s.device() == embeddings.device(), "ge2e_ext: sums are on ", s.device(),
                " but the embeddings are on ", embeddings.device());
    p.total_speakers = s.size(0);
    TORCH_CHECK_VALUE(p.total_speakers >= 2, "ge2e_ext: GE2E needs K >= 2 speakers in sums, got ",
                      p.total_speakers);
    // Written without speaker_offset + N, which overflows for an offset near INT64_MAX.
    TORCH_CHECK_VALUE(speaker_offset >= 0 && speaker_offset <= p.total_speakers - p.speakers,
                      "ge2e_ext: speaker_offset + N must lie in [0, K]: got speaker_offset = ",
                      speaker_offset, ", N = ", p.speakers, ", K = ", p.total_speakers);
    std::tie(c.sums, c.sum_scales) = scaled_sums(s.contiguous());
    p.speaker_offset = speaker_offset;
  } else {
    TORCH_CHECK_VALUE(speaker_offset == 0,
                      "ge2e_ext: speaker_offset must be 0 when sums are not given, got ",
                      speaker_offset);
    c.sums = at::empty({p.speakers, p.dim}, c.acc_options);
    c.sum_scales = at::empty({p.speakers}, c.acc_options);
    p.total_speakers = p.speakers;
    p.speaker_offset = 0;
  }
  c.speaker_scales = at::empty({p.speakers}, c.acc_options);
  c.inv_sums = at::empty({p.total_speakers}, c.acc_options);
  c.own_terms = at::empty({checked_size(p.total_rows, kOwnTermsSize, "B x own terms")},
                          c.acc_options);
  p.embeddings = c.embeddings.data_ptr();
  p.w = c.w.data_ptr();
  p.b = c.b.data_ptr();
  p.sums = c.sums.data_ptr();
  p.sum_scales = c.sum_scales.data_ptr();
  p.own_sums_hi = c.own_sums_hi.data_ptr();
  p.own_sums_lo = c.own_sums_lo.data_ptr();
  p.speaker_scales = c.speaker_scales.data_ptr();
  p.inv_sums = c.inv_sums.data_ptr();
  p.own_terms = c.own_terms.data_ptr();
  if constexpr (DeviceScratch<Device>::value) {
    if (p.speaker_offsets != nullptr) {
      c.row_speakers = at::empty({p.total_rows}, c.acc_options.dtype(at::kLong));
      p.row_speakers = c.row_speakers.data_ptr<int64_t>();
    }
    c.row_dots = at::empty({p.total_rows}, c.acc_options);
    c.finish_partials = at::empty({Device::kFinishPartials}, c.acc_options);
    c.finish_counter = at::empty({1}, c.acc_options.dtype(at::kInt));
    p.row_dots = c.row_dots.data_ptr();
    p.finish_partials = c.finish_partials.data_ptr();
    p.finish_counter = reinterpret_cast<unsigned int*>(c.finish_counter.data_ptr<int>());
  }
  {
    RECORD_FUNCTION("ge2e_ext::speaker_stats", {});
    Device::speaker_stats(p);
  }
  return c;
}

// Rows per block, from the budget of one block of cosines (rows x K, plus
// rows x D for T = H S when the input is float16/bfloat16):
// max(2^18 elements, input / kBlockInputShare). A device with
// kBoundStepPeak also keeps everything else a step allocates beyond the input
// and its gradient (speaker sums, per-row statistics) within half of input
// plus gradient: the cosines get what is left (at least 2^18 elements). The
// budget is in rows, not speakers, so that it holds for any grouping: a
// speaker with more rows than a block takes is split across blocks.
constexpr int64_t kMinBlockElements = int64_t(1) << 18;

template <class Device>
int64_t rows_per_block(const Call& c) {
  const Problem& p = c.problem;
  const int64_t input_numel = p.total_rows * p.dim;
  const bool widened = c.embeddings.scalar_type() != c.sums.scalar_type();
  const int64_t row_cost = checked_size(1, p.total_speakers + (widened ? p.dim : 0), "K + D");
  int64_t budget = input_numel / Device::kBlockInputShare;
  if constexpr (Device::kBoundStepPeak) {
    const int64_t acc_bytes = c.sums.element_size();
    const int64_t input_bytes = input_numel * c.embeddings.element_size();
    const int64_t allowed = input_bytes / acc_bytes;  // (input + gradient) / 2, in acc elements
    // own_sums_hi/lo (N x D), Z (K x D), 1/|s| and the sums' scales (2 K), the
    // speakers' scales (N), a split speaker's q sums (2 x D); per row: own_terms,
    // loss, state (kRowStateSize float64), hardest (int64), top1 (bool), dLoss/dw and
    // dLoss/db parts.
    const int64_t row_bytes = 8 * kRowStateSize + 8 + 1;
    int64_t others =
        (2 * p.speakers + p.total_speakers + 2) * p.dim + 2 * p.total_speakers + p.speakers +
        p.total_rows * (kOwnTermsSize + 1 + (row_bytes + acc_bytes - 1) / acc_bytes + 2);
    if constexpr (DeviceScratch<Device>::value) {
      // The scratch: row_speakers (int64) and row_dots per row, the finish's partials.
      others += p.total_rows * (1 + 8 / acc_bytes) + Device::kFinishPartials;
    }
    budget = std::min(budget, allowed - others);
  }
  budget = std::max(budget, kMinBlockElements);
  return std::max<int64_t>(1, budget / row_cost);
}

// The blocks of a sweep. block_speakers > 0 asks for blocks of that many whole
// speakers, < 0 for blocks of -block_speakers rows (tests; 0: rows_per_block).
// Blocks by rows take whole speakers while they fit, and split a speaker
// larger than a block into blocks of its own rows. With one block nothing is
// read from the offsets; with several, grouped rows need the offsets on the
// host (on an accelerator, a copy that waits for the device).
// `splits` receives each speaker that the blocks split, as a Block of its own
// (the speaker and all its rows).
template <class Device>
std::vector<Block> blocks_of(const Call& c, int64_t block_speakers, std::vector<Block>& splits) {
  const Problem& p = c.problem;
  std::vector<Block> blocks;
  const int64_t per_block_rows = block_speakers < 0 ? -block_speakers : rows_per_block<Device>(c);
  if (block_speakers >= p.speakers || (block_speakers <= 0 && per_block_rows >= p.total_rows)) {
    blocks.push_back(Block{0, p.speakers, 0, p.total_rows});
    return blocks;
  }
  at::Tensor offsets;
  if (p.speaker_offsets != nullptr) offsets = c.speaker_offsets.cpu();
  const int64_t* off = p.speaker_offsets != nullptr ? offsets.data_ptr<int64_t>() : nullptr;
  const auto row = [&](int64_t j) { return off != nullptr ? off[j] : j * p.utterances; };
  if (block_speakers > 0) {
    for (int64_t first = 0; first < p.speakers; first += block_speakers) {
      const int64_t count = std::min(block_speakers, p.speakers - first);
      blocks.push_back(Block{first, count, row(first), row(first + count) - row(first)});
    }
    return blocks;
  }
  // Rows [start, end) of speakers [first, j] so far.
  int64_t first = 0, start = 0;
  const auto close = [&](int64_t last, int64_t end) {
    blocks.push_back(Block{first, last - first + 1, start, end - start});
  };
  for (int64_t j = 0; j < p.speakers; ++j) {
    const int64_t begin = row(j), end = row(j + 1);
    if (end - start <= per_block_rows) continue;  // speaker j fits in the open block
    if (begin > start) {  // close the block before speaker j
      close(j - 1, begin);
      first = j;
      start = begin;
    }
    if (end - start > per_block_rows) splits.push_back(Block{j, 1, begin, end - begin});
    while (end - start > per_block_rows) {  // speaker j alone is too large: split it
      close(j, start + per_block_rows);
      first = j;
      start += per_block_rows;
    }
  }
  if (start < p.total_rows) close(p.speakers - 1, p.total_rows);
  return blocks;
}

// The block's embeddings as a (rows, D) matrix in the accumulation dtype, for
// the matrix products (a float16/bfloat16 input is widened one block at a time).
inline at::Tensor block_rows(const Call& c, const Block& blk) {
  const Problem& p = c.problem;
  at::Tensor rows =
      c.embeddings.view({p.total_rows, p.dim}).narrow(0, blk.first_row, blk.rows);
  return rows.scalar_type() == c.sums.scalar_type() ? rows : rows.to(c.sums.scalar_type());
}

// The gradient buffers of a sweep.
struct Gradients {
  at::Tensor embeddings;  // like the embeddings, in their dtype
  at::Tensor sums;        // (K, D): Z = H^T E, then dLoss/ds when sums were given
  at::Tensor w_part;      // (B,) per-row dLoss/dw, dLoss/db
  at::Tensor b_part;
};

inline Gradients allocate_gradients(const Call& c) {
  const Problem& p = c.problem;
  return {at::empty_like(c.embeddings, at::MemoryFormat::Contiguous),
          at::empty({p.total_speakers, p.dim}, c.acc_options),
          at::empty({p.total_rows}, c.acc_options), at::empty({p.total_rows}, c.acc_options)};
}

// The matrix products run at the precision of the inputs: IEEE float32 for
// float32 whatever torch.backends.cuda.matmul.allow_tf32 (or
// torch.set_float32_matmul_precision) says, because the impostor cosines come
// from the products while the own cosine is computed exactly, and the contrast
// loss's hardest impostor and the softmax's margin compare the two. TF32 (10
// mantissa bits per operand) errs by about 1e-5 on a cosine at D = 256, enough
// to swap an impostor with the own speaker. The setting is global in ATen, so
// it is restored when the sweep ends (and left alone when it is IEEE already).
class Float32MatmulPrecisionGuard {
 public:
  Float32MatmulPrecisionGuard()
      : legacy_(ctx().float32MatmulPrecision()),
        cuda_(ctx().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL)),
        mkldnn_(ctx().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL)) {
    // The legacy setter sets both APIs consistently (setting only the new one
    // while the legacy one says "high" makes ATen's TF32 query raise).
    changed_ = legacy_ != at::Float32MatmulPrecision::HIGHEST || reduced(cuda_) ||
               reduced(mkldnn_);
    if (changed_) ctx().setFloat32MatmulPrecision("highest");
  }
  ~Float32MatmulPrecisionGuard() {
    if (!changed_) return;
    ctx().setFloat32MatmulPrecision(legacy_ == at::Float32MatmulPrecision::HIGHEST ? "highest"
                                    : legacy_ == at::Float32MatmulPrecision::HIGH  ? "high"
                                                                                   : "medium");
    restore(at::Float32Backend::MKLDNN, mkldnn_);
    restore(at::Float32Backend::CUDA, cuda_);
  }
  Float32MatmulPrecisionGuard(const Float32MatmulPrecisionGuard&) = delete;
  Float32MatmulPrecisionGuard& operator=(const Float32MatmulPrecisionGuard&) = delete;

 private:
  static at::Context& ctx() { return at::globalContext(); }
  static bool reduced(at::Float32Precision p) {
    return p == at::Float32Precision::TF32 || p == at::Float32Precision::BF16;
  }
  static void restore(at::Float32Backend backend, at::Float32Precision p) {
    if (ctx().float32Precision(backend, at::Float32Op::MATMUL) != p) {
      ctx().setFloat32Precision(backend, at::Float32Op::MATMUL, p);
    }
  }
  at::Float32MatmulPrecision legacy_;
  at::Float32Precision cuda_, mkldnn_;
  bool changed_;
};

// The loop over blocks for one pass of the row kernel; for the gradient passes
// also the products and the row gradients. `finish` (gradient passes) is the
// end of the sweep: a DeviceScratch device runs it in the sweep's last launch,
// the others after the loop.
template <class Device>
void sweep(const Call& c, RowPass pass, const RowBuffers& buffers, Gradients* grads,
           const FinishArgs* finish) {
  const Problem& p = c.problem;
  const Float32MatmulPrecisionGuard precision;
  std::vector<Block> split_speakers;
  const std::vector<Block> blocks =
      blocks_of<Device>(c, block_speakers_for_tests().load(), split_speakers);
  const bool single_block = blocks.size() == 1;
  int64_t max_rows = 0;
  for (const Block& blk : blocks) max_rows = std::max(max_rows, blk.rows);
  const bool sparse = Device::kSparseProducts && has_sparse_gradient(p.method);
  constexpr bool fused_finish = DeviceScratch<Device>::value;
  checked_size(max_rows, p.total_speakers, "the block of cosines, rows x K");
  at::Tensor cosine_block = at::empty({max_rows, p.total_speakers}, c.acc_options);
  // T = H S is written where the rows' gradient goes when the dtypes agree.
  const bool widened = c.embeddings.scalar_type() != c.sums.scalar_type();
  at::Tensor t_block;
  if (grads != nullptr && !sparse && widened) {
    t_block = at::empty({max_rows, p.dim}, c.acc_options);
  }
  // With several blocks, dLoss/ds (the call's own sums) is folded into the
  // rows in one pass at the end; a DeviceScratch device's pass also adds the
  // other rows' term there (so a speaker's rows need not lie in one block), and
  // carries the finish.
  const bool fold_at_end =
      grads != nullptr && !single_block && (fused_finish || !p.sums_given);
  for (const Block& blk : blocks) {
    // Z is written by the first block and accumulated by the others (a split
    // speaker's blocks all start at the same speaker: not blk.first == 0).
    const bool first_block = &blk == &blocks.front();
    const at::Tensor e_rows = block_rows(c, blk);
    at::Tensor cosines = cosine_block.narrow(0, 0, blk.rows);
    at::mm_out(cosines, e_rows, c.sums.t());  // e_r . s_k; the row kernel makes it H
    {
      RECORD_FUNCTION("ge2e_ext::rows", {});
      Device::rows(p, buffers, pass, blk, cosines.data_ptr());
    }
    if (grads == nullptr) continue;
    at::Tensor t_rows;
    if (sparse) {
      RECORD_FUNCTION("ge2e_ext::sparse_sum_grads", {});
      Device::sparse_sum_grads(p, blk, cosines.data_ptr(), buffers.hardest,
                               grads->sums.data_ptr(), !first_block);
    } else {
      t_rows = widened ? t_block.narrow(0, 0, blk.rows)
                      : grads->embeddings.view({p.total_rows, p.dim})
                            .narrow(0, blk.first_row, blk.rows);
      at::mm_out(t_rows, cosines, c.sums);             // T = H S
      if (first_block) {
        at::mm_out(grads->sums, cosines.t(), e_rows);  // Z = H^T E
      } else {
        grads->sums.addmm_(cosines.t(), e_rows);       // Z += H^T E
      }
    }
    // Z is complete after the last block: with one block, the fold of dLoss/ds
    // into the rows happens here; with several, in one pass at the end.
    const bool fold_now = single_block && !p.sums_given;
    RECORD_FUNCTION("ge2e_ext::row_gradients", {});
    const void* t_ptr = sparse ? nullptr : t_rows.data_ptr();
    void* z_to_fold = fold_now ? grads->sums.data_ptr() : nullptr;
    if constexpr (fused_finish) {
      const bool last = &blk == &blocks.back() && !fold_at_end;
      Device::row_gradients(p, blk, sparse, t_ptr, cosines.data_ptr(), buffers.hardest, z_to_fold,
                            grads->embeddings.data_ptr(), /*others=*/single_block,
                            last ? finish : nullptr);
    } else {
      Device::row_gradients(p, blk, sparse, t_ptr, cosines.data_ptr(), buffers.hardest, z_to_fold,
                            grads->embeddings.data_ptr());
    }
  }
  // A speaker split across blocks: the row gradients left out the sum over its
  // other rows' q (their own gradients were not all known yet); add it now. (A
  // DeviceScratch device's fold adds that term for every speaker after the
  // last block of several, split or not.)
  if constexpr (!fused_finish) {
    if (grads != nullptr && !split_speakers.empty()) {
      const at::Tensor q_sums = at::empty({2, p.dim}, c.acc_options);
      for (const Block& speaker : split_speakers) {
        RECORD_FUNCTION("ge2e_ext::split_speaker_others", {});
        Device::split_speaker_others(p, speaker, q_sums.data_ptr(),
                                     grads->embeddings.data_ptr());
      }
    }
  }
  if (fold_at_end) {
    RECORD_FUNCTION("ge2e_ext::fold", {});
    if constexpr (fused_finish) {
      Device::fold(p, p.sums_given ? nullptr : grads->sums.data_ptr(),
                   grads->embeddings.data_ptr(), finish);
    } else {
      Device::fold(p, grads->sums.data_ptr(), grads->embeddings.data_ptr());
    }
  }
  if constexpr (!fused_finish) {
    if (finish != nullptr) {
      RECORD_FUNCTION("ge2e_ext::finish", {});
      Device::finish(p, finish->z, finish->w_part, finish->b_part, finish->loss_rows,
                     finish->loss_scale, finish->grad_w, finish->grad_b, finish->loss_total);
    }
  }
}

// The per-row outputs of a forward: the losses, the rows' saved state
// (row shape + (kRowStateSize,), float64), whether each row's own speaker is
// its top-1 (bool), and the hardest impostors (scratch).
struct RowOutputs {
  at::Tensor loss, state, top1, hardest;
};

inline RowOutputs row_outputs(const Call& c) {
  std::vector<int64_t> state_shape = c.row_shape;
  state_shape.push_back(kRowStateSize);
  return {at::empty(c.row_shape, c.acc_options),
          at::empty(state_shape, c.acc_options.dtype(at::kDouble)),
          at::empty(c.row_shape, c.acc_options.dtype(at::kBool)),
          at::empty({c.problem.total_rows}, c.acc_options.dtype(at::kLong))};
}

inline RowBuffers row_buffers(RowOutputs& out, Gradients* grads) {
  RowBuffers rb{};
  rb.loss = out.loss.defined() ? out.loss.data_ptr() : nullptr;
  rb.state = out.state.data_ptr<double>();
  rb.top1 = out.top1.defined() ? out.top1.data_ptr<bool>() : nullptr;
  rb.hardest = out.hardest.data_ptr<int64_t>();
  if (grads != nullptr) {
    rb.w_grad_part = grads->w_part.data_ptr();
    rb.b_grad_part = grads->b_part.data_ptr();
  }
  return rb;
}

// forward(problem) -> (loss, state, top1): the rows' losses, (N, M) or (B,),
// what each row's backward needs, shaped (..., kRowStateSize), and whether
// each row's own speaker is its top-1 (bool, the losses' shape).
template <class Device>
ForwardResult forward(const ProblemArgs& args) {
  const c10::OptionalDeviceGuard device_guard(args.embeddings.device());
  const Call c = make_call<Device>(args);
  RowOutputs out = row_outputs(c);
  const RowBuffers rb = row_buffers(out, nullptr);
  sweep<Device>(c, RowPass::kLoss, rb, nullptr, nullptr);
  return {out.loss, out.state, out.top1};
}

// normalize=True: the embeddings' gradient through the normalisation, in place
// (the sweep gave the unit rows' gradient).
template <class Device>
void unit_row_grads(const Call& c, Gradients& g) {
  if (!c.input_rows.defined()) return;
  RECORD_FUNCTION("ge2e_ext::unit_row_grads", {});
  Device::unit_row_grads(c.problem, c.input_rows.data_ptr(), c.row_norms.data_ptr(),
                         g.embeddings.data_ptr());
}

// The end of a gradient sweep (FinishArgs) and its outputs: dLoss/ds (when
// given, in g.sums), dLoss/dw, dLoss/db and, for the fused op, the reduced loss.
struct FinishOutputs {
  at::Tensor grad_w, grad_b;
  FinishArgs args;
};

inline FinishOutputs finish_outputs(const Call& c, Gradients& g, const at::Tensor* loss_rows,
                                    double loss_scale, at::Tensor* loss_total) {
  FinishOutputs out{at::empty({}, c.acc_options), at::empty({}, c.acc_options), FinishArgs{}};
  out.args.z = g.sums.data_ptr();
  out.args.w_part = g.w_part.data_ptr();
  out.args.b_part = g.b_part.data_ptr();
  out.args.loss_rows = loss_rows ? loss_rows->data_ptr() : nullptr;
  out.args.loss_scale = loss_scale;
  out.args.grad_w = out.grad_w.data_ptr();
  out.args.grad_b = out.grad_b.data_ptr();
  out.args.loss_total = loss_total ? loss_total->data_ptr() : nullptr;
  return out;
}

// backward(problem, grad_loss, state) -> (grad_embeddings, grad_sums (K, D),
// grad_w, grad_b), with grad_loss shaped like the forward's losses and state
// as the forward gave it. Recomputes the cosines (one block at a time);
// grad_sums is folded into grad_embeddings when sums were not given (and is
// then scratch).
template <class Device>
BackwardResult backward(const ProblemArgs& args, const at::Tensor& grad_loss,
                        const at::Tensor& state) {
  const c10::OptionalDeviceGuard device_guard(args.embeddings.device());
  const Call c = make_call<Device>(args);
  const Problem& p = c.problem;
  std::vector<int64_t> state_shape = c.row_shape;
  state_shape.push_back(kRowStateSize);
  TORCH_CHECK_VALUE(grad_loss.sizes() == c.row_shape && state.sizes() == state_shape,
                    "ge2e_ext: grad_loss must have the losses' shape ", c.row_shape,
                    " and state the shape ", state_shape, " (the forward's), got ",
                    grad_loss.sizes(), " and ", state.sizes());
  // The upstream gradient is read through its strides (an expanded scalar is
  // not copied); the saved state is small.
  const at::Tensor grad_rows = grad_loss.to(c.acc_options);
  RowOutputs given{at::Tensor(), state.to(c.acc_options.dtype(at::kDouble)).contiguous(),
                   at::Tensor(), at::empty({p.total_rows}, c.acc_options.dtype(at::kLong))};
  Gradients g = allocate_gradients(c);
  RowBuffers rb = row_buffers(given, &g);
  rb.grad_loss = grad_rows.data_ptr();
  rb.grad_stride_speaker = grad_rows.stride(0);
  rb.grad_stride_utterance = grad_rows.stride(grad_rows.dim() - 1);
  const FinishOutputs f = finish_outputs(c, g, nullptr, 1.0, nullptr);
  sweep<Device>(c, RowPass::kGradient, rb, &g, &f.args);
  unit_row_grads<Device>(c, g);
  return {g.embeddings, g.sums, f.grad_w.view(args.w.sizes()), f.grad_b.view(args.b.sizes())};
}

// forward_backward(problem, scale) -> (loss, top1, grad_embeddings, grad_sums,
// grad_w, grad_b): loss = scale * sum of the rows' losses (0-dim), the rows'
// top1 (as forward's) and the loss's gradients, in one sweep.
template <class Device>
ForwardBackwardResult forward_backward(const ProblemArgs& args, double scale) {
  const c10::OptionalDeviceGuard device_guard(args.embeddings.device());
  const Call c = make_call<Device>(args);
  RowOutputs out = row_outputs(c);
  Gradients g = allocate_gradients(c);
  RowBuffers rb = row_buffers(out, &g);
  rb.grad_scale = scale;
  at::Tensor loss_total = at::empty({}, c.acc_options);
  const FinishOutputs f = finish_outputs(c, g, &out.loss, scale, &loss_total);
  sweep<Device>(c, RowPass::kLossAndGradient, rb, &g, &f.args);
  unit_row_grads<Device>(c, g);
  return {loss_total,  out.top1,
          g.embeddings, g.sums,
          f.grad_w.view(args.w.sizes()), f.grad_b.view(args.b.sizes())};
}

// The kernel ops of a Device, with the schemas' signatures (the registration
// checks them against ge2e_schema.h).
template <class Device>
struct KernelOps {
  static ForwardResult forward(GE2E_PROBLEM_PARAMS) {
    return ge2e::forward<Device>(GE2E_PROBLEM_FROM_PARAMS);
  }
  static BackwardResult backward(GE2E_PROBLEM_PARAMS, const at::Tensor& grad_loss,
                                 const at::Tensor& state) {
    return ge2e::backward<Device>(GE2E_PROBLEM_FROM_PARAMS, grad_loss, state);
  }
  static ForwardBackwardResult forward_backward(GE2E_PROBLEM_PARAMS, double scale) {
    return ge2e::forward_backward<Device>(GE2E_PROBLEM_FROM_PARAMS, scale);
  }
};

template <class Device>
void register_kernel_ops(torch::Library& m) {
  m.impl("ge2e_forward", &KernelOps<Device>::forward);
  m.impl("ge2e_backward", &KernelOps<Device>::backward);
  m.impl("ge2e_forward_backward", &KernelOps<Device>::forward_backward);
}

}  // namespace ge2e
