// The CUDA kernels of the GE2E op and their launchers, as a header:
// ge2e_cuda_kernels.cu compiles them for the GPU, and tests/cuda_emulation/
// compiles the same code for the CPU under a small emulation of blocks,
// barriers and warp shuffles (with its own Launch policy, so the grids below
// are the ones both run), so the kernels' indexing and reductions are tested
// on machines without a GPU.
//
// The per-row work around the cuBLAS products of ge2e_driver.h; the formulas
// are ge2e_math.h's, which the CPU kernel and gradcheck exercise. A training
// step with one block of speakers is four launches (speaker statistics, rows,
// row gradients, finish) around three cuBLAS products. Every reduction is a
// fixed shuffle tree and no kernel uses atomics, so two runs give bitwise-equal
// results.
//
// The first part is plain C++ (ge2e_cuda.cpp includes it for the launchers'
// declarations); the kernels need __CUDACC__ or the emulation, which also
// declare __half and __nv_bfloat16 with their conversions.
#pragma once

#include <cstdint>
#include <cstring>

#include "../ge2e_math.h"
#include "../ge2e_problem.h"

namespace ge2e {
namespace cuda {

// How the GPU device blocks its rows (ge2e_driver.h, rows_per_block): the
// whole batch while its cosines take at most half the input, else blocks of
// rows whose cosines, with the sums and per-row buffers, keep a step's peak
// within 1.5x of input plus gradient (at least 2^18 cosines per block).
struct BlockPolicy {
  static constexpr int64_t kBlockInputShare = 2;
  static constexpr bool kBoundStepPeak = true;
  // The contrast loss takes the dense products too: cuBLAS makes them cheap.
  static constexpr bool kSparseProducts = false;
};

using Stream = void*;  // a cudaStream_t

// The launchers the CUDA device calls (ge2e_cuda_kernels.cu); each returns a
// cudaError_t (0: success) and names the kernel that failed in *failed.
int launch_speaker_stats(const Problem& p, Stream stream, const char** failed);
int launch_rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk, void* cosines,
                Stream stream, const char** failed);
int launch_row_gradients(const Problem& p, Block blk, const void* t_rows, const void* z_to_fold,
                         void* grad, Stream stream, const char** failed);
int launch_split_speaker_others(const Problem& p, Block speaker, void* q_sums, void* grad,
                                Stream stream, const char** failed);
int launch_fold(const Problem& p, const void* z, void* grad, Stream stream, const char** failed);
int launch_finish(const Problem& p, void* z, const void* w_part, const void* b_part,
                  const void* loss_rows, double loss_scale, void* grad_w, void* grad_b,
                  void* loss_total, Stream stream, const char** failed);

}  // namespace cuda
}  // namespace ge2e

#if defined(__CUDACC__) || defined(GE2E_CUDA_EMULATION)

namespace ge2e {
namespace cuda {
namespace {

// Threads per block, at most. The CPU emulation compiles the kernels with
// fewer (GE2E_CUDA_THREADS) so that it runs in seconds; any multiple of 32 up
// to 1024 is valid.
#ifndef GE2E_CUDA_THREADS
#define GE2E_CUDA_THREADS 256
#endif
constexpr int kMaxThreads = GE2E_CUDA_THREADS;
static_assert(kMaxThreads % 32 == 0 && kMaxThreads <= 1024, "threads per block: a multiple of 32");
constexpr int kMaxWarps = kMaxThreads / 32;
// Shared scratch of a block reduction: one slot per warp plus the result, each
// large enough for the largest reduced type (four doubles).
constexpr int kSlotBytes = 32;

struct CudaTypes {
  using Half = __half;
  using BFloat16 = __nv_bfloat16;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// A few running sums reduced together (one tree, one barrier pair).
template <typename T, int N>
struct Sums {
  T v[N];
  __device__ Sums() {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] = T(0);
  }
  __device__ void merge(const Sums& o) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] += o.v[n];
  }
};

// A few running maxima of absolute values reduced together (0 is the identity).
template <typename T, int N>
struct Maxes {
  T v[N];
  __device__ Maxes() {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] = T(0);
  }
  __device__ void add(int n, T x) {
    const T a = abs_(x);
    v[n] = a > v[n] ? a : v[n];
  }
  __device__ void merge(const Maxes& o) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] = o.v[n] > v[n] ? o.v[n] : v[n];
  }
};

// A warp shuffle of any trivially copyable value (a Sums, a method's
// Statistic), 32 bits at a time, so that a new method's statistic needs no
// shuffle of its own.
template <typename R>
__device__ __forceinline__ R shfl_down(const R& value, int offset) {
  static_assert(sizeof(R) % 4 == 0, "shuffled types are made of 32-bit words");
  constexpr int kWords = sizeof(R) / 4;
  unsigned int words[kWords];
  memcpy(words, &value, sizeof(R));
#pragma unroll
  for (int w = 0; w < kWords; ++w) words[w] = __shfl_down_sync(0xffffffffu, words[w], offset);
  R out;
  memcpy(&out, words, sizeof(R));
  return out;
}

template <typename R>
__device__ __forceinline__ R warp_reduce(R v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v.merge(shfl_down(v, offset));
  return v;
}

// Reduces one value per thread over the block (a default-constructed R is the
// identity; blockDim.x a multiple of 32) and returns the result to every
// thread. Ends with a barrier so the scratch can be reused at once.
template <typename R>
__device__ R block_reduce(R v, unsigned char* scratch) {
  static_assert(sizeof(R) <= kSlotBytes, "reduction type too large for the scratch slots");
  R* slots = reinterpret_cast<R*>(scratch);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  v = warp_reduce(v);
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  if (warp == 0) {
    R w = lane < warps ? slots[lane] : R();
    w = warp_reduce(w);
    if (lane == 0) slots[kMaxWarps] = w;
  }
  __syncthreads();
  const R result = slots[kMaxWarps];
  __syncthreads();
  return result;
}

// The shared memory of a block_reduce, declared in each kernel that reduces.
constexpr int kScratchBytes = (kMaxWarps + 1) * kSlotBytes;

template <typename acc_t>
__device__ SimilarityParams<acc_t> params_of(const Problem& p) {
  return make_params<acc_t>(*static_cast<const acc_t*>(p.w), *static_cast<const acc_t*>(p.b),
                            p.min_cosine, p.clamp);
}

// One block per utterance r of speaker j, threads over D: the speaker's scale
// sigma_j (from its largest |x|), the compensated sum of speaker j's
// utterances times sigma_j (every block of the speaker sums them again: M_j
// loads a column, from cache), the row's OwnCosine with u = that sum without
// e_r (e' = sigma_j e, u' = u~, or each scaled on its own where their squared
// norms underflow), and, in the speaker's first block, the sums (hi, lo),
// sigma_j, and when the sums are the call's own s''_j, its scale and 1/|s''_j|
// (as the CPU kernel's speaker_stats).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) speaker_stats_kernel(Problem p) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  const int64_t r = blockIdx.x, D = p.dim;
  const int64_t j = speaker_of(p, r), begin = first_row(p, j), end = first_row(p, j + 1);
  const bool first = r == begin;
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  auto* sums_hi = static_cast<acc_t*>(p.own_sums_hi) + j * D;
  auto* sums_lo = static_cast<acc_t*>(p.own_sums_lo) + j * D;
  Maxes<acc_t, 1> largest;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    for (int64_t l = begin; l < end; ++l) largest.add(0, to_acc(emb[l * D + d]));
  }
  const acc_t sigma = power_of_two_scale(block_reduce(largest, scratch).v[0]);
  Sums<acc_t, 3> part;  // e'.e', e'.u', u'.u'
  Maxes<acc_t, 1> largest_sum;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t hi = 0, lo = 0;
    for (int64_t l = begin; l < end; ++l) add_compensated(hi, lo, to_acc(emb[l * D + d]) * sigma);
    const acc_t ev = to_acc(emb[r * D + d]) * sigma;
    const acc_t uv = sum_without(hi, lo, ev);
    part.v[0] += ev * ev;
    part.v[1] += ev * uv;
    part.v[2] += uv * uv;
    largest_sum.add(0, hi);
    if (first) {
      sums_hi[d] = hi;
      sums_lo[d] = lo;
    }
  }
  const auto total = block_reduce(part, scratch);
  OwnCosine<acc_t> own = own_cosine(total.v[0], total.v[1], total.v[2], sigma, acc_t(1));
  if (needs_own_scales(own)) {  // the same in every thread: the block branches together
    Maxes<acc_t, 2> row_largest;  // |e|, |u~|
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t raw = to_acc(emb[r * D + d]);
      acc_t hi = 0, lo = 0;
      for (int64_t l = begin; l < end; ++l) add_compensated(hi, lo, to_acc(emb[l * D + d]) * sigma);
      row_largest.add(0, raw);
      row_largest.add(1, sum_without(hi, lo, raw * sigma));
    }
    const auto scales = block_reduce(row_largest, scratch);
    const acc_t e_scale = power_of_two_scale(scales.v[0]);
    const acc_t u_scale = power_of_two_scale(scales.v[1]);
    Sums<acc_t, 3> again;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t raw = to_acc(emb[r * D + d]);
      acc_t hi = 0, lo = 0;
      for (int64_t l = begin; l < end; ++l) add_compensated(hi, lo, to_acc(emb[l * D + d]) * sigma);
      const acc_t ev = raw * e_scale;
      const acc_t uv = sum_without(hi, lo, raw * sigma) * u_scale;
      again.v[0] += ev * ev;
      again.v[1] += ev * uv;
      again.v[2] += uv * uv;
    }
    const auto retotal = block_reduce(again, scratch);
    own = own_cosine(retotal.v[0], retotal.v[1], retotal.v[2], e_scale, u_scale);
  }
  if (threadIdx.x == 0) {
    store_own_cosine(static_cast<acc_t*>(p.own_terms) + r * kOwnTermsSize, own);
    if (first) static_cast<acc_t*>(p.speaker_scales)[j] = sigma;
  }
  if (first && !p.sums_given) {
    // s'' = beta s~ with its largest coordinate, then its norm, in [0.5, 1); each
    // thread reads back the coordinates it wrote.
    acc_t beta = power_of_two_scale(block_reduce(largest_sum, scratch).v[0]);
    acc_t* s = static_cast<acc_t*>(p.sums) + j * D;
    Sums<acc_t, 1> squares;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      s[d] = sums_hi[d] * beta;
      squares.v[0] += s[d] * s[d];
    }
    const acc_t ss = block_reduce(squares, scratch).v[0];
    const acc_t beta_norm = power_of_two_scale(sqrt_(ss));
    if (beta_norm != acc_t(1)) {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s[d] *= beta_norm;
    }
    if (threadIdx.x == 0) {
      static_cast<acc_t*>(p.inv_sums)[j] = inverse_norm(ss * beta_norm * beta_norm);
      static_cast<acc_t*>(p.sum_scales)[j] = sigma * (beta * beta_norm);
    }
  }
}

// One block per row of given sums: 1/|s_k|.
template <typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) sum_inverse_norms_kernel(Problem p) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  const acc_t* row = static_cast<const acc_t*>(p.sums) + static_cast<int64_t>(blockIdx.x) * p.dim;
  Sums<acc_t, 1> part;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) part.v[0] += row[d] * row[d];
  const auto total = block_reduce(part, scratch);
  if (threadIdx.x == 0) static_cast<acc_t*>(p.inv_sums)[blockIdx.x] = inverse_norm(total.v[0]);
}

// One block per row of the block, threads over K: the row kernel of
// cpu/ge2e_cpu_kernels.h (same outputs), its reductions as shuffle trees.
template <class Method, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    rows_kernel(Problem p, RowBuffers rb, RowPass pass, Block blk, acc_t* cosines) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  const int64_t K = p.total_speakers;
  const int64_t row_in_block = blockIdx.x;
  const int64_t r = blk.first_row + row_in_block;
  const int64_t j = speaker_of(p, r), own = p.speaker_offset + j;
  const auto params = params_of<acc_t>(p);
  const auto* inv_sums = static_cast<const acc_t*>(p.inv_sums);
  auto* own_terms = static_cast<acc_t*>(p.own_terms);
  const OwnCosine<acc_t> exclusive = load_own_cosine(own_terms + r * kOwnTermsSize);
  const RowView<acc_t> view{clamp_cosine(exclusive.raw_cos, params), params};
  acc_t* row = cosines + row_in_block * K;

  typename Method::template Statistic<acc_t> stat;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t raw = cross_cosine(row[k], exclusive, inv_sums[k]);
    row[k] = raw;  // read back below by this thread only
    if (pass != RowPass::kGradient && k != own) {
      stat.add(Method::value(clamp_cosine(raw, params), view), k);
    }
  }
  RowSummary<acc_t> summary;
  double* state = rb.state + r * kRowStateSize;
  if (pass == RowPass::kGradient) {
    summary = Method::template load_state<acc_t>(state);
  } else {
    stat = block_reduce(stat, scratch);
    summary = Method::summarize(stat, view);
    if (threadIdx.x == 0) {
      static_cast<acc_t*>(rb.loss)[r] = summary.loss;
      Method::save_state(summary, state);
    }
  }
  if (threadIdx.x == 0) rb.hardest[r] = summary.hardest;
  if (pass == RowPass::kLoss) return;

  const int64_t i = r - first_row(p, j);
  acc_t grad_row = pass == RowPass::kGradient
                       ? static_cast<const acc_t*>(rb.grad_loss)[upstream_index(p, rb, r, j, i)]
                       : static_cast<acc_t>(rb.grad_scale);
  if (Method::kSparseGradient) {
    const int64_t k = summary.hardest;
    if (k < 0 || k >= K || k == own) grad_row = quiet_nan<acc_t>();  // see the CPU kernel
  }
  Sums<acc_t, 2> part;  // G = sum g_k, sum g_k (c_k - c_own)
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    if (k == own) {
      row[k] = acc_t(0);  // the own speaker's term goes through u, not s_own
      continue;
    }
    const acc_t raw = row[k];
    const acc_t c = clamp_cosine(raw, params);
    const acc_t g = Method::impostor_grad(Method::value(c, view), k, summary, view, grad_row);
    part.v[0] += g;
    part.v[1] += g * (c - view.own_cos);
    row[k] = cross_cosine_weight(cosine_grad(g, raw, params), exclusive, inv_sums[k]);
  }
  const auto total = block_reduce(part, scratch);
  if (threadIdx.x == 0) {
    const acc_t own_g = Method::own_grad(total.v[0], view, grad_row);
    own_terms[r * kOwnTermsSize + kOwnGradSlot] = cosine_grad(own_g, exclusive.raw_cos, params);
    static_cast<acc_t*>(rb.w_grad_part)[r] =
        row_w_grad(total.v[0], total.v[1], own_g, view.own_cos);
    static_cast<acc_t*>(rb.b_grad_part)[r] = row_b_grad(total.v[0], own_g);
  }
}

// dLoss/ds_k . (the part of dLoss/ds_k along s_k is removed) for one coordinate.
template <typename acc_t>
__device__ __forceinline__ acc_t sum_grad(const Problem& p, int64_t k, int64_t d, const acc_t* z,
                                          acc_t s_dot_z) {
  const acc_t* s = static_cast<const acc_t*>(p.sums) + k * p.dim;
  const acc_t inv_s = static_cast<const acc_t*>(p.inv_sums)[k];
  // The gradient for the unscaled sum s_k = s''_k / sum_scales[k].
  return remove_projection(z[k * p.dim + d], s[d], s_dot_z, inv_s) *
         static_cast<const acc_t*>(p.sum_scales)[k];
}

// One block per row of the block (several per speaker), threads over D: the
// cross-speaker part from T = H S (`t_rows`, which may be the gradient's own memory:
// each thread reads its elements before it writes them, after the barriers of
// the reduction), the own part, the other rows' q summed directly over the
// speaker's other utterances (no subtraction; for a speaker the block splits,
// split_speaker_others adds it after the last block), and with z_to_fold the
// speaker's dLoss/ds.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    row_gradients_kernel(Problem p, Block blk, const acc_t* t_rows, const acc_t* z_to_fold,
                         scalar_t* grad) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  const int64_t D = p.dim;
  const int64_t row_in_block = blockIdx.x;
  const int64_t r = blk.first_row + row_in_block;
  const int64_t j = speaker_of(p, r), own = p.speaker_offset + j;
  const int64_t begin = first_row(p, j), end = first_row(p, j + 1);
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const auto* own_terms = static_cast<const acc_t*>(p.own_terms);
  const acc_t* s_hi = static_cast<const acc_t*>(p.own_sums_hi) + j * D;
  const acc_t* s_lo = static_cast<const acc_t*>(p.own_sums_lo) + j * D;
  const acc_t* sums = static_cast<const acc_t*>(p.sums) + own * D;
  const scalar_t* e = emb + r * D;
  const acc_t* t_row = t_rows + row_in_block * D;
  Sums<acc_t, 2> part;  // e . T, s_j . Z_j
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    part.v[0] += to_acc(e[d]) * t_row[d];
    if (z_to_fold != nullptr) part.v[1] += sums[d] * z_to_fold[own * D + d];
  }
  const auto dots = block_reduce(part, scratch);
  const OwnCosine<acc_t> exclusive = load_own_cosine(own_terms + r * kOwnTermsSize);
  const acc_t own_grad = own_terms[r * kOwnTermsSize + kOwnGradSlot];
  const bool split = begin < blk.first_row || end > blk.first_row + blk.rows;
  const acc_t sigma = static_cast<const acc_t*>(p.speaker_scales)[j];
  const acc_t scaled_dot = dots.v[0] * exclusive.e_scale;  // e' . T
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const acc_t ev = to_acc(e[d]);
    acc_t others = 0;  // sum over the speaker's other rows r2 of their q
    for (int64_t r2 = begin; r2 < (split ? begin : end); ++r2) {
      if (r2 == r) continue;
      const acc_t e2 = to_acc(emb[r2 * D + d]);
      others += own_grad_through_others(own_terms[r2 * kOwnTermsSize + kOwnGradSlot],
                                        load_own_cosine(own_terms + r2 * kOwnTermsSize), e2,
                                        sum_without(s_hi[d], s_lo[d], e2 * sigma), sigma);
    }
    const acc_t uv = sum_without(s_hi[d], s_lo[d], ev * sigma);
    acc_t g = remove_projection(t_row[d], ev * exclusive.e_scale, scaled_dot,
                                exclusive.inv_norm_e) +
              own_grad_through_embedding(own_grad, exclusive, ev, uv) + others;
    if (z_to_fold != nullptr) g += sum_grad(p, own, d, z_to_fold, dots.v[1]);
    store(grad + r * D + d, g);
  }
}

// Speaker j, which the blocks split, one thread per coordinate d: the
// compensated sum (q_sums[d], q_sums[D + d]) of its rows' q.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    split_speaker_q_kernel(Problem p, int64_t j, acc_t* q_sums) {
  const int64_t D = p.dim;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const auto* own_terms = static_cast<const acc_t*>(p.own_terms);
  const acc_t s_hi = static_cast<const acc_t*>(p.own_sums_hi)[j * D + d];
  const acc_t s_lo = static_cast<const acc_t*>(p.own_sums_lo)[j * D + d];
  const acc_t sigma = static_cast<const acc_t*>(p.speaker_scales)[j];
  acc_t hi = 0, lo = 0;
  for (int64_t r = first_row(p, j); r < first_row(p, j + 1); ++r) {
    const acc_t ev = to_acc(emb[r * D + d]);
    add_compensated(hi, lo,
                    own_grad_through_others(own_terms[r * kOwnTermsSize + kOwnGradSlot],
                                            load_own_cosine(own_terms + r * kOwnTermsSize), ev,
                                            sum_without(s_hi, s_lo, ev * sigma), sigma));
  }
  q_sums[d] = hi;
  q_sums[D + d] = lo;
}

// One block per row of speaker j (split by the blocks), threads over D: adds
// the sum of the speaker's other rows' q, all of them without the row's own.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    split_speaker_others_kernel(Problem p, int64_t j, const acc_t* q_sums, scalar_t* grad) {
  const int64_t D = p.dim;
  const int64_t r = first_row(p, j) + blockIdx.x;
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const auto* own_terms = static_cast<const acc_t*>(p.own_terms);
  const acc_t* s_hi = static_cast<const acc_t*>(p.own_sums_hi) + j * D;
  const acc_t* s_lo = static_cast<const acc_t*>(p.own_sums_lo) + j * D;
  const OwnCosine<acc_t> exclusive = load_own_cosine(own_terms + r * kOwnTermsSize);
  const acc_t own_grad = own_terms[r * kOwnTermsSize + kOwnGradSlot];
  const acc_t sigma = static_cast<const acc_t*>(p.speaker_scales)[j];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const acc_t ev = to_acc(emb[r * D + d]);
    const acc_t q = own_grad_through_others(own_grad, exclusive, ev,
                                            sum_without(s_hi[d], s_lo[d], ev * sigma), sigma);
    scalar_t* g = grad + r * D + d;
    store(g, to_acc(*g) + sum_without(q_sums[d], q_sums[D + d], q));
  }
}

// One block per local row: adds its speaker's dLoss/ds (from Z).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    fold_kernel(Problem p, const acc_t* z, scalar_t* grad) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  const int64_t r = blockIdx.x, D = p.dim;
  const int64_t own = p.speaker_offset + speaker_of(p, r);
  const acc_t* s = static_cast<const acc_t*>(p.sums) + own * D;
  Sums<acc_t, 1> part;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) part.v[0] += s[d] * z[own * D + d];
  const acc_t s_dot_z = block_reduce(part, scratch).v[0];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    scalar_t* g = grad + r * D + d;
    store(g, to_acc(*g) + sum_grad(p, own, d, z, s_dot_z));
  }
}

// Blocks [0, sum_rows): Z becomes dLoss/ds in place (given sums); the last
// block: dLoss/dw, dLoss/db and scale * the sum of the losses, in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    finish_kernel(Problem p, int64_t sum_rows, acc_t* z, const acc_t* w_part,
                  const acc_t* b_part, const acc_t* loss_rows, double loss_scale, acc_t* grad_w,
                  acc_t* grad_b, acc_t* loss_total) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  if (blockIdx.x < sum_rows) {
    const int64_t k = blockIdx.x, D = p.dim;
    const acc_t* s = static_cast<const acc_t*>(p.sums) + k * D;
    Sums<acc_t, 1> part;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) part.v[0] += s[d] * z[k * D + d];
    const acc_t s_dot_z = block_reduce(part, scratch).v[0];
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      z[k * D + d] = sum_grad(p, k, d, z, s_dot_z);
    }
    return;
  }
  Sums<acc_t, 3> part;
  for (int64_t r = threadIdx.x; r < p.total_rows; r += blockDim.x) {
    part.v[0] += w_part[r];
    part.v[1] += b_part[r];
    if (loss_rows != nullptr) part.v[2] += loss_rows[r];
  }
  const auto total = block_reduce(part, scratch);
  if (threadIdx.x == 0) {
    const auto params = params_of<acc_t>(p);
    *grad_w = w_grad(total.v[0], params);
    *grad_b = b_grad(total.v[1], params);
    if (loss_total != nullptr) *loss_total = static_cast<acc_t>(loss_scale) * total.v[2];
  }
}

// Threads for a loop over n elements: whole warps, at most kMaxThreads.
inline int threads_for(int64_t n) {
  const int64_t warps = (n + 31) / 32;
  return static_cast<int>(32 * (warps < 1 ? 1 : (warps > kMaxWarps ? kMaxWarps : warps)));
}

// The grids of the kernels and their dtype and method dispatch, for an
// execution model Launch: Launch::run(name, kernel, blocks, threads, stream,
// args...) launches and returns a cudaError_t (0: success). The GPU's Launch
// is in ge2e_cuda_kernels.cu, the CPU emulation's in tests/cuda_emulation.
template <class Launch>
struct Launchers {
  // The first failure of a sequence of launches, and its kernel's name.
  struct Status {
    int error = 0;
    const char* failed = nullptr;
    void operator()(int e, const char* name) {
      if (error == 0 && e != 0) {
        error = e;
        failed = name;
      }
    }
  };

  static int speaker_stats(const Problem& p, Stream stream, const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      status(Launch::run(speaker_stats_kernel<scalar_t, acc_t>, p.total_rows, threads_for(p.dim),
                         stream, p),
             "speaker_stats");
      if (p.sums_given) {
        status(Launch::run(sum_inverse_norms_kernel<acc_t>, p.total_speakers,
                           threads_for(p.dim), stream, p),
               "sum_inverse_norms");
      }
    });
    *failed = status.failed;
    return status.error;
  }

  static int rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk, void* cosines,
                  Stream stream, const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto, auto acc_zero) {
      using acc_t = decltype(acc_zero);
      dispatch_loss_method(p.method, [&](auto method) {
        status(Launch::run(rows_kernel<decltype(method), acc_t>, blk.rows,
                           threads_for(p.total_speakers), stream, p, rb, pass, blk,
                           static_cast<acc_t*>(cosines)),
               "rows");
      });
    });
    *failed = status.failed;
    return status.error;
  }

  static int row_gradients(const Problem& p, Block blk, const void* t_rows, const void* z_to_fold,
                           void* grad, Stream stream, const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      status(Launch::run(row_gradients_kernel<scalar_t, acc_t>, blk.rows,
                         threads_for(p.dim), stream, p, blk, static_cast<const acc_t*>(t_rows),
                         static_cast<const acc_t*>(z_to_fold), static_cast<scalar_t*>(grad)),
             "row_gradients");
    });
    *failed = status.failed;
    return status.error;
  }

  // speaker: one speaker (first) and its rows.
  static int split_speaker_others(const Problem& p, Block speaker, void* q_sums, void* grad,
                                  Stream stream, const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const int threads = threads_for(p.dim);
      status(Launch::run(split_speaker_q_kernel<scalar_t, acc_t>, (p.dim + threads - 1) / threads,
                         threads, stream, p, speaker.first, static_cast<acc_t*>(q_sums)),
             "split_speaker_q");
      status(Launch::run(split_speaker_others_kernel<scalar_t, acc_t>,
                         speaker.rows, threads, stream, p, speaker.first,
                         static_cast<const acc_t*>(q_sums), static_cast<scalar_t*>(grad)),
             "split_speaker_others");
    });
    *failed = status.failed;
    return status.error;
  }

  static int fold(const Problem& p, const void* z, void* grad, Stream stream,
                  const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      status(Launch::run(fold_kernel<scalar_t, acc_t>, p.total_rows, threads_for(p.dim), stream, p,
                         static_cast<const acc_t*>(z), static_cast<scalar_t*>(grad)),
             "fold");
    });
    *failed = status.failed;
    return status.error;
  }

  static int finish(const Problem& p, void* z, const void* w_part, const void* b_part,
                    const void* loss_rows, double loss_scale, void* grad_w, void* grad_b,
                    void* loss_total, Stream stream, const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto, auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const int64_t sum_rows = p.sums_given ? p.total_speakers : 0;
      status(Launch::run(finish_kernel<acc_t>, sum_rows + 1, kMaxThreads, stream, p, sum_rows,
                         static_cast<acc_t*>(z), static_cast<const acc_t*>(w_part),
                         static_cast<const acc_t*>(b_part), static_cast<const acc_t*>(loss_rows),
                         loss_scale, static_cast<acc_t*>(grad_w), static_cast<acc_t*>(grad_b),
                         static_cast<acc_t*>(loss_total)),
             "finish");
    });
    *failed = status.failed;
    return status.error;
  }
};

}  // namespace
}  // namespace cuda
}  // namespace ge2e

#endif  // __CUDACC__ || GE2E_CUDA_EMULATION
