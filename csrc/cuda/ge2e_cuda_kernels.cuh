// The CUDA kernels of the GE2E op and their launchers, as a header:
// ge2e_cuda_kernels.cu compiles them for the GPU, and tests/cuda_emulation/
// compiles the same code for the CPU under a small emulation of blocks,
// barriers and warp shuffles (with its own Launch policy, so the grids below
// are the ones both run), so the kernels' indexing and reductions are tested
// on machines without a GPU.
//
// The per-row work around the cuBLAS products of ge2e_driver.h; the formulas
// are ge2e_math.h's, which the CPU kernel and gradcheck exercise. Work is
// linear in the utterances: the speaker passes (statistics, row gradients,
// fold) run one block per speaker and read each of its rows a fixed number of
// times, O(M_j D) for speaker j, and the row kernel runs one block per row
// over the K sums. The numerics are the CPU kernel's: each speaker's rows
// scaled by its power of two sigma_j before they are summed, s'' renormalised,
// cross cosines ((P a)/|e'|)/|s''|, and each row's softmax or contrast state
// saved (float64) for the backward. Blocks are sized in rows and may split a
// speaker; with several blocks, fold_kernel gives every speaker its other
// rows' term after the last one, so the result is the one-block result.
// A training step with one block of speakers is three
// launches (speaker statistics, rows, row gradients with the finish in extra
// blocks) around the three cuBLAS products; the contrast loss, whose gradient
// has one impostor per row, replaces two of the products by one sparse
// kernel (four launches, one product). Every reduction is a fixed shuffle tree or
// a fixed-order loop, and the only atomic is the counter that picks the last
// block of the finish's two-stage reduction (not what it sums), so two runs give
// bitwise-equal results.
//
// The first part is plain C++ (ge2e_cuda.cpp includes it for the launchers'
// declarations); the kernels need __CUDACC__ or the emulation, which also
// declare __half and __nv_bfloat16 with their conversions.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../ge2e_math.h"
#include "../ge2e_problem.h"

namespace ge2e {
namespace cuda {

// Lanes of a warp, the one place that names it: a 64-lane port changes it here
// (and the mask type follows).
constexpr int kWarpSize = 32;

// Blocks of a grid's x dimension: CUDA allows at most 2^31 - 1 (y and z, which
// these kernels do not use, at most 65535).
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
// The error a launcher returns for a grid beyond kMaxGridX (not a cudaError_t).
constexpr int kGridTooLarge = 1 << 20;

// Whether a grid of `blocks` blocks fits CUDA's x dimension.
inline bool grid_fits(int64_t blocks) { return blocks >= 0 && blocks <= kMaxGridX; }

// The two-stage reduction of the finish (dLoss/dw, dLoss/db, the summed loss):
// chunks of at least kFinishChunkRows rows, at most kFinishMaxChunks of them,
// each summed by one block; the last block to finish sums the chunks' partials
// in chunk order. The chunking depends on B only, so the result does not
// depend on which block is last. The CPU emulation compiles smaller ones
// (GE2E_FINISH_CHUNK_ROWS, GE2E_FINISH_MAX_CHUNKS) so that its small batches
// take several chunks.
#ifndef GE2E_FINISH_CHUNK_ROWS
#define GE2E_FINISH_CHUNK_ROWS 2048
#endif
#ifndef GE2E_FINISH_MAX_CHUNKS
#define GE2E_FINISH_MAX_CHUNKS 1024
#endif
constexpr int64_t kFinishChunkRows = GE2E_FINISH_CHUNK_ROWS;
constexpr int64_t kFinishMaxChunks = GE2E_FINISH_MAX_CHUNKS;
constexpr int kFinishSums = 3;  // w, b, loss

GE2E_HD int64_t finish_chunk_rows(int64_t rows) {
  const int64_t spread = (rows + kFinishMaxChunks - 1) / kFinishMaxChunks;
  return spread > kFinishChunkRows ? spread : kFinishChunkRows;
}

GE2E_HD int64_t finish_chunks(int64_t rows) {
  const int64_t chunk = finish_chunk_rows(rows);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  return chunks < 1 ? 1 : chunks;
}

// How the GPU device blocks its rows (ge2e_driver.h, rows_per_block): the
// whole batch while its cosines take at most half the input, else blocks of
// rows whose cosines, with the sums and per-row buffers, keep a step's peak
// within 1.5x of input plus gradient (at least 2^18 cosines per block); a
// block may split a speaker (fold_kernel adds its other rows' term after the
// last block). The device scratch
// (kFinishPartials, see DeviceScratch in ge2e_driver.h) asks the driver for the
// row-to-speaker map, the rows' e . T and the finish's partials, and fuses the
// finish into the last launch of a sweep.
struct BlockPolicy {
  static constexpr int64_t kBlockInputShare = 2;
  static constexpr bool kBoundStepPeak = true;
  // The contrast loss's gradient has one impostor per row: a sparse kernel
  // makes Z = H^T E, the row gradients read H_{r,k*} s_k* for T = H S.
  static constexpr bool kSparseProducts = true;
  static constexpr int64_t kFinishPartials = kFinishSums * kFinishMaxChunks;
};

using Stream = void*;  // a cudaStream_t

// The launchers the CUDA device calls (ge2e_cuda_kernels.cu); each returns a
// cudaError_t (0: success) or kGridTooLarge, and names the kernel that failed
// in *failed. `finish` (nullable) appends the finish's blocks to the launch.
int launch_speaker_stats(const Problem& p, Stream stream, const char** failed);
int launch_rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk, void* cosines,
                Stream stream, const char** failed);
int launch_sparse_sum_grads(const Problem& p, Block blk, const void* cosines,
                            const int64_t* hardest, void* z, bool accumulate, Stream stream,
                            const char** failed);
int launch_row_gradients(const Problem& p, Block blk, bool sparse, const void* t_rows,
                         const void* cosines, const int64_t* hardest, const void* z_to_fold,
                         void* grad, bool others, const FinishArgs* finish, Stream stream,
                         const char** failed);
int launch_fold(const Problem& p, const void* z, void* grad, const FinishArgs* finish,
                Stream stream, const char** failed);
int launch_unit_rows(const Problem& p, const void* in, void* out, void* norms, Stream stream,
                     const char** failed);
int launch_unit_row_grads(const Problem& p, const void* in, const void* norms, void* grad,
                          Stream stream, const char** failed);

}  // namespace cuda
}  // namespace ge2e

#if defined(__CUDACC__) || defined(GE2E_CUDA_EMULATION)

namespace ge2e {
namespace cuda {
namespace {

// Threads per block, at most. The CPU emulation may compile the kernels with
// fewer (GE2E_CUDA_THREADS) so that it runs in seconds; any multiple of the
// warp size up to 1024 is valid.
#ifndef GE2E_CUDA_THREADS
#define GE2E_CUDA_THREADS 256
#endif
constexpr int kMaxThreads = GE2E_CUDA_THREADS;
static_assert(kMaxThreads % kWarpSize == 0 && kMaxThreads <= 1024,
              "threads per block: a multiple of the warp size, at most 1024");
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
static_assert(kMaxWarps <= kWarpSize, "the block reduction's second stage is one warp");
// A shuffle mask naming every lane of a warp.
using WarpMask = std::conditional_t<(kWarpSize > 32), unsigned long long, unsigned int>;
constexpr WarpMask kFullWarpMask = ~WarpMask(0);
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

// A row's scan: the method's statistic and whether an impostor takes the
// row's top-1 (takes_top1), reduced in one tree. beaten is an int so that the
// struct shuffles in 32-bit words.
template <typename Statistic>
struct RowScan {
  Statistic stat;
  int beaten = 0;
  __device__ void merge(const RowScan& o) {
    stat.merge(o.stat);
    beaten |= o.beaten;
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
  for (int w = 0; w < kWords; ++w) words[w] = __shfl_down_sync(kFullWarpMask, words[w], offset);
  R out;
  memcpy(&out, words, sizeof(R));
  return out;
}

template <typename R>
__device__ __forceinline__ R warp_reduce(R v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v.merge(shfl_down(v, offset));
  return v;
}

// Reduces one value per thread over the block (a default-constructed R is the
// identity; blockDim.x a multiple of the warp size) and returns the result to
// every thread. Ends with a barrier so the scratch can be reused at once.
template <typename R>
__device__ R block_reduce(R v, unsigned char* scratch) {
  static_assert(sizeof(R) <= kSlotBytes, "reduction type too large for the scratch slots");
  R* slots = reinterpret_cast<R*>(scratch);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
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

// The local speaker of row r: the map speaker_stats_kernel wrote (the labels
// form; clamped, so that offsets no one checked cannot send a kernel out of
// bounds), or r / M.
__device__ __forceinline__ int64_t speaker_of_row(const Problem& p, int64_t r) {
  if (p.row_speakers == nullptr) return r / p.utterances;
  const int64_t j = p.row_speakers[r];
  return j < 0 ? 0 : (j >= p.speakers ? p.speakers - 1 : j);
}

// Blocks [0, N): one per local speaker j, threads over D, as the CPU kernel's
// speaker_stats. One pass over the speaker's rows gives its scale sigma_j (from
// its largest |x|), one more its compensated sum times sigma_j (hi, lo) and,
// unless the sums are given, s''_j (its largest coordinate, then its norm, in
// [0.5, 1)), the sum's scale and 1/|s''_j|; then a block reduction per row
// makes each row's OwnCosine with u = that sum without e_r (e' = sigma_j e,
// u' = u~, or each scaled on its own where their squared norms underflow).
// O(M_j D) for speaker j (a row that needs its own scales reads its speaker
// twice more). The speaker's rows are also written into the row-to-speaker map
// (labels form). Blocks [N, N + K) with given sums (scaled by the driver):
// 1/|s''_k|. Block 0 also resets the finish's counter (the launches of a step
// are ordered on one stream).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) speaker_stats_kernel(Problem p) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  const int64_t D = p.dim;
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.finish_counter != nullptr) *p.finish_counter = 0;
  if (blockIdx.x >= p.speakers) {
    const int64_t k = blockIdx.x - p.speakers;
    const acc_t* row = static_cast<const acc_t*>(p.sums) + k * D;
    Sums<acc_t, 1> part;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) part.v[0] += row[d] * row[d];
    const auto total = block_reduce(part, scratch);
    if (threadIdx.x == 0) static_cast<acc_t*>(p.inv_sums)[k] = inverse_norm(total.v[0]);
    return;
  }
  const int64_t j = blockIdx.x, begin = first_row(p, j), end = first_row(p, j + 1);
  if (p.row_speakers != nullptr) {
    for (int64_t r = begin + threadIdx.x; r < end; r += blockDim.x) p.row_speakers[r] = j;
  }
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  auto* sums_hi = static_cast<acc_t*>(p.own_sums_hi) + j * D;
  auto* sums_lo = static_cast<acc_t*>(p.own_sums_lo) + j * D;
  Maxes<acc_t, 1> largest;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    for (int64_t r = begin; r < end; ++r) largest.add(0, to_acc(emb[r * D + d]));
  }
  const acc_t sigma = power_of_two_scale(block_reduce(largest, scratch).v[0]);
  if (threadIdx.x == 0) static_cast<acc_t*>(p.speaker_scales)[j] = sigma;
  Maxes<acc_t, 1> largest_sum;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t hi = 0, lo = 0;
    for (int64_t r = begin; r < end; ++r) add_compensated(hi, lo, to_acc(emb[r * D + d]) * sigma);
    sums_hi[d] = hi;  // read back below by this thread only
    sums_lo[d] = lo;
    largest_sum.add(0, hi);
  }
  if (!p.sums_given) {
    // s'' = beta s~ with its largest coordinate, then its norm, in [0.5, 1); each
    // thread reads back the coordinates it wrote.
    const acc_t beta = power_of_two_scale(block_reduce(largest_sum, scratch).v[0]);
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
  for (int64_t r = begin; r < end; ++r) {
    Sums<acc_t, 3> part;  // e'.e', e'.u', u'.u'
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t ev = to_acc(emb[r * D + d]) * sigma;
      const acc_t uv = sum_without(sums_hi[d], sums_lo[d], ev);
      part.v[0] += ev * ev;
      part.v[1] += ev * uv;
      part.v[2] += uv * uv;
    }
    const auto total = block_reduce(part, scratch);
    OwnCosine<acc_t> own = own_cosine(total.v[0], total.v[1], total.v[2], sigma, acc_t(1));
    if (needs_own_scales(own)) {  // the same in every thread: the block branches together
      Maxes<acc_t, 2> row_largest;  // |e|, |u~|
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const acc_t raw = to_acc(emb[r * D + d]);
        row_largest.add(0, raw);
        row_largest.add(1, sum_without(sums_hi[d], sums_lo[d], raw * sigma));
      }
      const auto scales = block_reduce(row_largest, scratch);
      const acc_t e_scale = power_of_two_scale(scales.v[0]);
      const acc_t u_scale = power_of_two_scale(scales.v[1]);
      Sums<acc_t, 3> again;
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const acc_t raw = to_acc(emb[r * D + d]);
        const acc_t ev = raw * e_scale;
        const acc_t uv = sum_without(sums_hi[d], sums_lo[d], raw * sigma) * u_scale;
        again.v[0] += ev * ev;
        again.v[1] += ev * uv;
        again.v[2] += uv * uv;
      }
      const auto retotal = block_reduce(again, scratch);
      own = own_cosine(retotal.v[0], retotal.v[1], retotal.v[2], e_scale, u_scale);
    }
    if (threadIdx.x == 0) {
      store_own_cosine(static_cast<acc_t*>(p.own_terms) + r * kOwnTermsSize, own);
    }
  }
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
  const int64_t j = speaker_of_row(p, r), own = p.speaker_offset + j;
  const auto params = params_of<acc_t>(p);
  const auto* inv_sums = static_cast<const acc_t*>(p.inv_sums);
  auto* own_terms = static_cast<acc_t*>(p.own_terms);
  const OwnCosine<acc_t> exclusive = load_own_cosine(own_terms + r * kOwnTermsSize);
  const RowView<acc_t> view{clamp_cosine(exclusive.raw_cos, params), params};
  acc_t* row = cosines + row_in_block * K;

  RowScan<typename Method::template Statistic<acc_t>> scan;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t raw = cross_cosine(row[k], exclusive, inv_sums[k]);
    row[k] = raw;  // read back below by this thread only
    if (pass != RowPass::kGradient && k != own) {
      const acc_t c = clamp_cosine(raw, params);
      scan.stat.add(Method::value(c, view), k);
      scan.beaten |= takes_top1(c, k, own, view.own_cos);
    }
  }
  RowSummary<acc_t> summary;
  double* state = rb.state + r * kRowStateSize;
  if (pass == RowPass::kGradient) {
    summary = Method::template load_state<acc_t>(state);
  } else {
    scan = block_reduce(scan, scratch);
    summary = Method::summarize(scan.stat, view);
    if (threadIdx.x == 0) {
      static_cast<acc_t*>(rb.loss)[r] = summary.loss;
      Method::save_state(summary, state);
      rb.top1[r] = scan.beaten == 0;
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

// s_k . Z_k over the block.
template <typename acc_t>
__device__ acc_t sum_dot_z(const Problem& p, int64_t k, const acc_t* z, unsigned char* scratch) {
  const acc_t* s = static_cast<const acc_t*>(p.sums) + k * p.dim;
  Sums<acc_t, 1> part;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) part.v[0] += s[d] * z[k * p.dim + d];
  return block_reduce(part, scratch).v[0];
}

// One block per row k of the sums, threads over D: Z_k (+)= the sum of
// H_{r,k} e_r over the block's rows whose hardest impostor is k, in increasing
// row order (the CPU kernel's order): the sparse gradient's H^T E, without the
// product. Each block scans the block's B_b impostor indices once.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    sparse_sum_grads_kernel(Problem p, Block blk, const acc_t* cosines, const int64_t* hardest,
                            acc_t* z, bool accumulate) {
  const int64_t k = blockIdx.x, K = p.total_speakers, D = p.dim;
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  acc_t* z_row = z + k * D;
  if (!accumulate) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) z_row[d] = acc_t(0);
  }
  for (int64_t rb = 0; rb < blk.rows; ++rb) {
    const int64_t r = blk.first_row + rb;
    if (hardest[r] != k || k == p.speaker_offset + speaker_of_row(p, r)) continue;
    const acc_t h = cosines[rb * K + k];
    // Each thread adds into its own coordinates only.
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) z_row[d] += h * to_acc(emb[r * D + d]);
  }
}

// One block of the finish, which the last launch of a sweep carries in its last
// blocks: `block` in [0, K) with given sums turns Z_k into dLoss/ds_k in place;
// the next finish_chunks(B) blocks each sum a chunk of the rows' dLoss/dw,
// dLoss/db and losses, and the last of them to finish sums the chunks'
// partials in chunk order into dLoss/dw, dLoss/db and scale * the loss.
template <typename acc_t>
__device__ void finish_block(const Problem& p, const FinishArgs& f, int64_t block,
                             unsigned char* scratch) {
  __shared__ int is_last;
  const int64_t D = p.dim;
  const int64_t sum_rows = p.sums_given ? p.total_speakers : 0;
  auto* z = static_cast<acc_t*>(f.z);
  if (block < sum_rows) {
    const int64_t k = block;
    const acc_t s_dot_z = sum_dot_z(p, k, z, scratch);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      z[k * D + d] = sum_grad(p, k, d, z, s_dot_z);  // each thread its own coordinates
    }
    return;
  }
  const int64_t chunk = block - sum_rows, chunks = finish_chunks(p.total_rows);
  const int64_t chunk_rows = finish_chunk_rows(p.total_rows);
  const int64_t lo = chunk * chunk_rows;
  const int64_t hi = lo + chunk_rows < p.total_rows ? lo + chunk_rows : p.total_rows;
  const auto* w_part = static_cast<const acc_t*>(f.w_part);
  const auto* b_part = static_cast<const acc_t*>(f.b_part);
  const auto* loss_rows = static_cast<const acc_t*>(f.loss_rows);
  Sums<acc_t, kFinishSums> part;
  for (int64_t r = lo + threadIdx.x; r < hi; r += blockDim.x) {
    part.v[0] += w_part[r];
    part.v[1] += b_part[r];
    if (loss_rows != nullptr) part.v[2] += loss_rows[r];
  }
  const auto chunk_total = block_reduce(part, scratch);
  auto* partials = static_cast<acc_t*>(p.finish_partials);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int n = 0; n < kFinishSums; ++n) partials[chunk * kFinishSums + n] = chunk_total.v[n];
    __threadfence();  // the partials are visible before the count says so
    is_last = atomicAdd(p.finish_counter, 1u) == static_cast<unsigned int>(chunks - 1);
  }
  __syncthreads();
  if (!is_last) return;
  const volatile acc_t* done = partials;  // written by other blocks: not from a stale cache
  Sums<acc_t, kFinishSums> all;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
#pragma unroll
    for (int n = 0; n < kFinishSums; ++n) all.v[n] += done[c * kFinishSums + n];
  }
  const auto total = block_reduce(all, scratch);
  if (threadIdx.x == 0) {
    const auto params = params_of<acc_t>(p);
    *static_cast<acc_t*>(f.grad_w) = w_grad(total.v[0], params);
    *static_cast<acc_t*>(f.grad_b) = b_grad(total.v[1], params);
    if (f.loss_total != nullptr) {
      *static_cast<acc_t*>(f.loss_total) = static_cast<acc_t>(f.loss_scale) * total.v[2];
    }
    *p.finish_counter = 0;  // for the next sweep on this stream
  }
}

// The cross-speaker part of row r's gradient in coordinate d: T_r[d], or with
// the sparse gradient H_{r,k*} s_k*[d] (NaN where the impostor index is not one:
// see the CPU kernel).
template <bool kSparse, typename acc_t>
__device__ __forceinline__ acc_t cross_term(const Problem& p, Block blk, const acc_t* t_rows,
                                            const acc_t* cosines, const int64_t* hardest,
                                            int64_t own, int64_t r, int64_t d) {
  const int64_t rb = r - blk.first_row;
  if (!kSparse) return t_rows[rb * p.dim + d];
  const int64_t K = p.total_speakers, k = hardest[r];
  const bool valid = k >= 0 && k < K && k != own;
  const acc_t h = valid ? cosines[rb * K + k] : quiet_nan<acc_t>();
  return h * static_cast<const acc_t*>(p.sums)[(valid ? k : 0) * p.dim + d];
}

// q_r[d] = h_r dcos(e_r, u_r)/du_r in coordinate d: what every other row of
// the speaker receives through its u (sigma: the speaker's scale, which the
// sums (s_hi, s_lo) carry).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t through_others(const Problem& p, int64_t r, acc_t ev,
                                                acc_t s_hi, acc_t s_lo, acc_t sigma) {
  const auto* own_terms = static_cast<const acc_t*>(p.own_terms) + r * kOwnTermsSize;
  return own_grad_through_others(own_terms[kOwnGradSlot], load_own_cosine(own_terms), ev,
                                 sum_without(s_hi, s_lo, ev * sigma), sigma);
}

// Q = the sum of the q of rows [begin, end) of a speaker in coordinate d, as a
// compensated pair; without(q_r) is Q - q_r without cancellation (sum_without,
// as the CPU kernel: the other rows' term of row r).
template <typename acc_t>
struct OthersSum {
  acc_t hi = 0, lo = 0;
  __device__ acc_t without(acc_t q) const { return sum_without(hi, lo, q); }
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ OthersSum<acc_t> others_sum(const Problem& p, int64_t begin,
                                                       int64_t end, int64_t d, acc_t s_hi,
                                                       acc_t s_lo, acc_t sigma) {
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  OthersSum<acc_t> q;
  for (int64_t r = begin; r < end; ++r) {
    add_compensated(q.hi, q.lo, through_others<scalar_t>(p, r, to_acc(emb[r * p.dim + d]), s_hi,
                                                         s_lo, sigma));
  }
  return q;
}

// Blocks [0, count): one per speaker j of the block, threads over D; then, with
// `finish`, the finish's blocks. Speaker j's rows (those in the block) get
//   cross part   T_r - e_r (e_r . T_r)/|e_r|^2, T = H S (`t_rows`, which may be
//                the gradient's own memory: each thread reads its elements
//                before it writes them), or with kSparse H_{r,k*} s_k*
//   own part     h (dcos(e, u)/de)
//   other rows   with `others`: Q - q_r, Q = the compensated sum of the
//                speaker's q (others_term)
//   z_to_fold    when given, dLoss/ds_j.
// One block reduction per row (e'_r . T_r, e' = e_scale e_r, kept in
// p.row_dots), then one pass
// over the coordinates that sums Q over the speaker's rows and writes the rows:
// O(M_j D). Q needs the own_grad of every row of speaker j, so `others` is for
// a sweep of one block; with several, fold_kernel adds that term after the
// last block (a block may then split a speaker: this launch takes only the
// speaker's rows in the block, [lo, hi)).
template <bool kSparse, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    row_gradients_kernel(Problem p, Block blk, const acc_t* t_rows, const acc_t* cosines,
                         const int64_t* hardest, const acc_t* z_to_fold, scalar_t* grad,
                         bool others, FinishArgs finish) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  if (blockIdx.x >= blk.count) {
    finish_block<acc_t>(p, finish, blockIdx.x - blk.count, scratch);
    return;
  }
  const int64_t D = p.dim;
  const int64_t j = blk.first + blockIdx.x, own = p.speaker_offset + j;
  const int64_t begin = first_row(p, j), end = first_row(p, j + 1);
  const int64_t block_end = blk.first_row + blk.rows;
  const int64_t lo = begin > blk.first_row ? begin : blk.first_row;  // the speaker's rows
  const int64_t hi = end < block_end ? end : block_end;               // in this block
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const auto* own_terms = static_cast<const acc_t*>(p.own_terms);
  const acc_t* s_hi = static_cast<const acc_t*>(p.own_sums_hi) + j * D;
  const acc_t* s_lo = static_cast<const acc_t*>(p.own_sums_lo) + j * D;
  auto* row_dots = static_cast<acc_t*>(p.row_dots);
  const acc_t sigma = static_cast<const acc_t*>(p.speaker_scales)[j];
  const acc_t s_dot_z = z_to_fold != nullptr ? sum_dot_z(p, own, z_to_fold, scratch) : acc_t(0);
  for (int64_t r = lo; r < hi; ++r) {
    Sums<acc_t, 1> part;  // e . T
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      part.v[0] += to_acc(emb[r * D + d]) *
                   cross_term<kSparse>(p, blk, t_rows, cosines, hardest, own, r, d);
    }
    const acc_t e_dot_t = block_reduce(part, scratch).v[0];
    if (threadIdx.x == 0) row_dots[r] = e_dot_t * load_own_cosine(own_terms + r * kOwnTermsSize).e_scale;
  }
  __syncthreads();  // row_dots, written by thread 0, read by all
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    OthersSum<acc_t> q_sum;
    if (others) q_sum = others_sum<scalar_t>(p, begin, end, d, s_hi[d], s_lo[d], sigma);
    const acc_t fold = z_to_fold != nullptr ? sum_grad(p, own, d, z_to_fold, s_dot_z) : acc_t(0);
    for (int64_t r = lo; r < hi; ++r) {
      const acc_t ev = to_acc(emb[r * D + d]);
      const acc_t uv = sum_without(s_hi[d], s_lo[d], ev * sigma);
      const acc_t own_grad = own_terms[r * kOwnTermsSize + kOwnGradSlot];
      const OwnCosine<acc_t> exclusive = load_own_cosine(own_terms + r * kOwnTermsSize);
      const acc_t t = cross_term<kSparse>(p, blk, t_rows, cosines, hardest, own, r, d);
      const acc_t other_rows =
          others ? q_sum.without(through_others<scalar_t>(p, r, ev, s_hi[d], s_lo[d], sigma))
                 : acc_t(0);
      const acc_t g = remove_projection(t, ev * exclusive.e_scale, row_dots[r],
                                        exclusive.inv_norm_e) +
                      own_grad_through_embedding(own_grad, exclusive, ev, uv) + other_rows +
                      fold;
      store(grad + r * D + d, g);
    }
  }
}

// Blocks [0, N): one per local speaker j, threads over D, after the last block
// of a sweep of several: adds to each of its rows the other rows' term Q - q_r
// and, with z (the call's own sums), dLoss/ds_j, one s_j . Z_j per speaker:
// O(M_j D), wherever the speaker's rows were in the blocks. Then, with
// `finish`, the finish's blocks.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    fold_kernel(Problem p, const acc_t* z, scalar_t* grad, FinishArgs finish) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  if (blockIdx.x >= p.speakers) {
    finish_block<acc_t>(p, finish, blockIdx.x - p.speakers, scratch);
    return;
  }
  const int64_t j = blockIdx.x, D = p.dim, own = p.speaker_offset + j;
  const int64_t begin = first_row(p, j), end = first_row(p, j + 1);
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const acc_t* s_hi = static_cast<const acc_t*>(p.own_sums_hi) + j * D;
  const acc_t* s_lo = static_cast<const acc_t*>(p.own_sums_lo) + j * D;
  const acc_t sigma = static_cast<const acc_t*>(p.speaker_scales)[j];
  const acc_t s_dot_z = z != nullptr ? sum_dot_z(p, own, z, scratch) : acc_t(0);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const OthersSum<acc_t> q_sum =
        others_sum<scalar_t>(p, begin, end, d, s_hi[d], s_lo[d], sigma);
    const acc_t fold = z != nullptr ? sum_grad(p, own, d, z, s_dot_z) : acc_t(0);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t ev = to_acc(emb[r * D + d]);
      scalar_t* g = grad + r * D + d;
      const acc_t q = through_others<scalar_t>(p, r, ev, s_hi[d], s_lo[d], sigma);
      store(g, to_acc(*g) + (q_sum.without(q) + fold));
    }
  }
}

// Blocks [0, B): one per row, threads over D (normalize=True; ge2e_math.h,
// "unit rows"): the row's largest |x|, the scaled sum of squares, its norm
// (into norms) and the unit row (into out), as the CPU kernel's unit_rows.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    unit_rows_kernel(Problem p, const scalar_t* in, scalar_t* out, acc_t* norms) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  const int64_t D = p.dim, r = blockIdx.x;
  const scalar_t* e = in + r * D;
  Maxes<acc_t, 1> largest;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) largest.add(0, to_acc(e[d]));
  const acc_t scale = power_of_two_scale(block_reduce(largest, scratch).v[0]);
  Sums<acc_t, 1> squares;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const acc_t x = scale * to_acc(e[d]);
    squares.v[0] += x * x;
  }
  const acc_t norm = row_norm(block_reduce(squares, scratch).v[0], scale);
  if (threadIdx.x == 0) norms[r] = norm;
  const acc_t denominator = normalize_denominator(norm);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    store(out + r * D + d, to_acc(e[d]) / denominator);
  }
}

// Blocks [0, B): one per row, threads over D: dLoss/d(unit row) in grad
// becomes dLoss/de (unit_row_grad), as the CPU kernel's unit_row_grads.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    unit_row_grads_kernel(Problem p, const scalar_t* in, const acc_t* norms, scalar_t* grad) {
  __shared__ __align__(16) unsigned char scratch[kScratchBytes];
  const int64_t D = p.dim, r = blockIdx.x;
  const scalar_t* e = in + r * D;
  scalar_t* g = grad + r * D;
  const acc_t norm = norms[r];
  Sums<acc_t, 1> u_dot_g;
  if (norm_passes_gradient(norm)) {  // the same for every thread of the block
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      u_dot_g.v[0] += (to_acc(e[d]) / norm) * to_acc(g[d]);
    }
    u_dot_g = block_reduce(u_dot_g, scratch);
  }
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    store(g + d, unit_row_grad(to_acc(g[d]), to_acc(e[d]), u_dot_g.v[0], norm));
  }
}

// Threads for a loop over n elements: whole warps, at most kMaxThreads.
inline int threads_for(int64_t n) {
  const int64_t warps = (n + kWarpSize - 1) / kWarpSize;
  return static_cast<int>(kWarpSize *
                          (warps < 1 ? 1 : (warps > kMaxWarps ? kMaxWarps : warps)));
}

// The blocks the finish adds to a launch (none without `finish`).
inline int64_t finish_blocks(const Problem& p, const FinishArgs* finish) {
  if (finish == nullptr) return 0;
  return (p.sums_given ? p.total_speakers : 0) + finish_chunks(p.total_rows);
}

// The grids of the kernels and their dtype and method dispatch, for an
// execution model Launch: Launch::run(kernel, blocks, threads, stream, args...)
// launches and returns a cudaError_t (0: success). The GPU's Launch is in
// ge2e_cuda_kernels.cu, the CPU emulation's in tests/cuda_emulation. Every grid
// is checked against CUDA's limit here first (kGridTooLarge), for both.
template <class Launch>
struct Launchers {
  // The first failure of a sequence of launches, and its kernel's name.
  struct Status {
    int error = 0;
    const char* failed = nullptr;
    template <typename... Params, typename... Args>
    void launch(const char* name, void (*kernel)(Params...), int64_t blocks, int threads,
                Stream stream, Args... args) {
      if (error != 0) return;
      const int e = grid_fits(blocks) ? Launch::run(kernel, blocks, threads, stream, args...)
                                      : kGridTooLarge;
      if (e != 0) {
        error = e;
        failed = name;
      }
    }
    int done(const char** name) const {
      *name = failed;
      return error;
    }
  };

  static FinishArgs none() { return FinishArgs{}; }

  static int speaker_stats(const Problem& p, Stream stream, const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const int64_t blocks = p.speakers + (p.sums_given ? p.total_speakers : 0);
      status.launch("speaker_stats", speaker_stats_kernel<scalar_t, acc_t>, blocks,
                    threads_for(p.dim), stream, p);
    });
    return status.done(failed);
  }

  static int rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk, void* cosines,
                  Stream stream, const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto, auto acc_zero) {
      using acc_t = decltype(acc_zero);
      dispatch_loss_method(p.method, [&](auto method) {
        status.launch("rows", rows_kernel<decltype(method), acc_t>, blk.rows,
                      threads_for(p.total_speakers), stream, p, rb, pass, blk,
                      static_cast<acc_t*>(cosines));
      });
    });
    return status.done(failed);
  }

  static int sparse_sum_grads(const Problem& p, Block blk, const void* cosines,
                              const int64_t* hardest, void* z, bool accumulate, Stream stream,
                              const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      status.launch("sparse_sum_grads", sparse_sum_grads_kernel<scalar_t, acc_t>,
                    p.total_speakers, threads_for(p.dim), stream, p, blk,
                    static_cast<const acc_t*>(cosines), hardest, static_cast<acc_t*>(z),
                    accumulate);
    });
    return status.done(failed);
  }

  static int row_gradients(const Problem& p, Block blk, bool sparse, const void* t_rows,
                           const void* cosines, const int64_t* hardest, const void* z_to_fold,
                           void* grad, bool others, const FinishArgs* finish, Stream stream,
                           const char** failed) {
    Status status;
    const int64_t blocks = blk.count + finish_blocks(p, finish);
    const FinishArgs f = finish != nullptr ? *finish : none();
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const auto run = [&](auto kernel) {
        status.launch("row_gradients", kernel, blocks, threads_for(p.dim), stream, p, blk,
                      static_cast<const acc_t*>(t_rows), static_cast<const acc_t*>(cosines),
                      hardest, static_cast<const acc_t*>(z_to_fold),
                      static_cast<scalar_t*>(grad), others, f);
      };
      if (sparse) {
        run(row_gradients_kernel<true, scalar_t, acc_t>);
      } else {
        run(row_gradients_kernel<false, scalar_t, acc_t>);
      }
    });
    return status.done(failed);
  }

  static int fold(const Problem& p, const void* z, void* grad, const FinishArgs* finish,
                  Stream stream, const char** failed) {
    Status status;
    const int64_t blocks = p.speakers + finish_blocks(p, finish);
    const FinishArgs f = finish != nullptr ? *finish : none();
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      status.launch("fold", fold_kernel<scalar_t, acc_t>, blocks, threads_for(p.dim), stream, p,
                    static_cast<const acc_t*>(z), static_cast<scalar_t*>(grad), f);
    });
    return status.done(failed);
  }

  static int unit_rows(const Problem& p, const void* in, void* out, void* norms, Stream stream,
                       const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      status.launch("unit_rows", unit_rows_kernel<scalar_t, acc_t>, p.total_rows,
                    threads_for(p.dim), stream, p, static_cast<const scalar_t*>(in),
                    static_cast<scalar_t*>(out), static_cast<acc_t*>(norms));
    });
    return status.done(failed);
  }

  static int unit_row_grads(const Problem& p, const void* in, const void* norms, void* grad,
                            Stream stream, const char** failed) {
    Status status;
    dispatch_dtype<CudaTypes>(p.dtype, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      status.launch("unit_row_grads", unit_row_grads_kernel<scalar_t, acc_t>, p.total_rows,
                    threads_for(p.dim), stream, p, static_cast<const scalar_t*>(in),
                    static_cast<const acc_t*>(norms), static_cast<scalar_t*>(grad));
    });
    return status.done(failed);
  }
};

}  // namespace
}  // namespace cuda
}  // namespace ge2e

#endif  // __CUDACC__ || GE2E_CUDA_EMULATION
