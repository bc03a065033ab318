// The CUDA kernels of the GE2E op, as a header: ge2e_cuda_kernels.cu compiles
// them for the GPU, and tests/cuda_emulation/ compiles the same code for the
// CPU under a small emulation of blocks, barriers and warp shuffles, so the
// kernels' indexing and reductions are tested on machines without a GPU.
//
// The per-row work around the cuBLAS products of ge2e_driver.h. The similarity
// kernels take one thread block per utterance (threads stride over K); the
// row-gradient kernel one block per speaker, which walks its M utterances so
// that the speaker's q sum needs no atomics. Threads stride over D for dot
// products and gradients, and every reduction is a fixed shuffle tree, so two
// runs give bitwise-equal results. The formulas are those of ge2e_math.h,
// which the CPU kernel and gradcheck exercise.
//
// Expects __half, __nv_bfloat16 and their conversions to be declared
// (cuda_fp16.h and cuda_bf16.h, or the emulation's stand-ins).
#pragma once

#include "../ge2e_math.h"
#include "ge2e_cuda_problem.h"

namespace ge2e {
namespace cuda {
namespace {

// Threads per block. The CPU emulation of these kernels compiles them with
// fewer (GE2E_CUDA_THREADS) so that it runs in seconds; any multiple of 32
// up to 1024 is valid.
#ifndef GE2E_CUDA_THREADS
#define GE2E_CUDA_THREADS 256
#endif
constexpr int kThreads = GE2E_CUDA_THREADS;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "threads per block: a multiple of 32");
constexpr int kWarps = kThreads / 32;
// Shared scratch of a block reduction: one slot per warp plus the result, each
// large enough for the largest reduced type (four doubles).
constexpr int kSlotBytes = 32;

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

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int offset) {
  return __shfl_down_sync(0xffffffffu, v, offset);
}
template <typename T, int N>
__device__ __forceinline__ Sums<T, N> shfl_down(const Sums<T, N>& s, int offset) {
  Sums<T, N> o;
#pragma unroll
  for (int n = 0; n < N; ++n) o.v[n] = shfl_down(s.v[n], offset);
  return o;
}
template <typename T>
__device__ __forceinline__ LogSumExp<T> shfl_down(const LogSumExp<T>& s, int offset) {
  LogSumExp<T> o;
  o.max = shfl_down(s.max, offset);
  o.sum = shfl_down(s.sum, offset);
  return o;
}
template <typename T>
__device__ __forceinline__ HardestImpostor<T> shfl_down(const HardestImpostor<T>& s, int offset) {
  HardestImpostor<T> o;
  o.value = shfl_down(s.value, offset);
  o.index = static_cast<int64_t>(shfl_down(static_cast<long long>(s.index), offset));
  return o;
}

template <typename R>
__device__ __forceinline__ R warp_reduce(R v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v.merge(shfl_down(v, offset));
  return v;
}

// Reduces one value per thread over the block (a default-constructed R is the
// identity) and returns the result to every thread. Ends with a barrier so the
// scratch can be reused at once.
template <typename R>
__device__ R block_reduce(R v, unsigned char* scratch) {
  static_assert(sizeof(R) <= kSlotBytes, "reduction type too large for the scratch slots");
  R* slots = reinterpret_cast<R*>(scratch);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce(v);
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  if (warp == 0) {
    R w = lane < kWarps ? slots[lane] : R();
    w = warp_reduce(w);
    if (lane == 0) slots[kWarps] = w;
  }
  __syncthreads();
  const R result = slots[kWarps];
  __syncthreads();
  return result;
}

#define GE2E_SCRATCH __shared__ __align__(16) unsigned char scratch[(kWarps + 1) * kSlotBytes]

template <typename acc_t>
__device__ SimilarityParams<acc_t> params_of(const Problem& p) {
  return make_params<acc_t>(*static_cast<const acc_t*>(p.w), *static_cast<const acc_t*>(p.b),
                            p.min_cosine, p.clamp);
}

// cos(e, s - e) of one row, the block's threads striding over D.
template <typename scalar_t, typename acc_t>
__device__ OwnCosine<acc_t> block_own_cosine(const scalar_t* e, const acc_t* s, int64_t dim,
                                             unsigned char* scratch) {
  Sums<acc_t, 3> part;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
    const acc_t ev = to_acc(e[d]);
    const acc_t uv = s[d] - ev;
    part.v[0] += ev * ev;
    part.v[1] += ev * uv;
    part.v[2] += uv * uv;
  }
  const auto total = block_reduce(part, scratch);
  return own_cosine(total.v[0], total.v[1], total.v[2]);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    inverse_norms_kernel(const acc_t* __restrict__ rows, int64_t dim, acc_t* __restrict__ out) {
  GE2E_SCRATCH;
  const acc_t* row = rows + static_cast<int64_t>(blockIdx.x) * dim;
  Sums<acc_t, 1> part;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) part.v[0] += row[d] * row[d];
  const auto total = block_reduce(part, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = inverse_norm(total.v[0]);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_rows_kernel(Problem p, int64_t first, const acc_t* __restrict__ dots,
                        acc_t* __restrict__ loss, acc_t* __restrict__ row_stat,
                        int64_t* __restrict__ hardest) {
  GE2E_SCRATCH;
  const int64_t rb = blockIdx.x;  // row in the block
  const int64_t r = first * p.utterances + rb, own = p.speaker_offset + r / p.utterances;
  const int64_t D = p.dim, K = p.total_speakers;
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const auto* sums = static_cast<const acc_t*>(p.sums);
  const auto* inv_sums = static_cast<const acc_t*>(p.inv_sums);
  const auto prm = params_of<acc_t>(p);
  const auto oc = block_own_cosine(emb + r * D, sums + own * D, D, scratch);
  const acc_t own_sim = similarity(oc.raw_cos, prm);
  const acc_t* dot_row = dots + rb * K;
  HardestImpostor<acc_t> impostor;
  LogSumExp<acc_t> lse;
  const bool softmax = p.method == kSoftmax;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    if (k == own) {
      if (softmax) lse.add(own_sim);
      continue;
    }
    const acc_t s = similarity(cosine(dot_row[k], oc.inv_norm_e, inv_sums[k]), prm);
    if (softmax) {
      lse.add(s);
    } else {
      impostor.add(s, k);
    }
  }
  if (softmax) {
    lse = block_reduce(lse, scratch);
  } else {
    impostor = block_reduce(impostor, scratch);
  }
  if (threadIdx.x == 0) {
    if (softmax) {
      row_stat[r] = lse.value();
      loss[r] = softmax_row_loss(row_stat[r], own_sim);
      hardest[r] = -1;  // only the contrast loss needs it
    } else {
      row_stat[r] = impostor.value;
      loss[r] = contrast_row_loss(own_sim, impostor.value);
      hardest[r] = impostor.index;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    similarity_grads_kernel(Problem p, int64_t first, acc_t* __restrict__ h,
                            const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ row_stat,
                            const int64_t* __restrict__ hardest, acc_t* __restrict__ own_terms,
                            acc_t* __restrict__ dw_part, acc_t* __restrict__ db_part) {
  GE2E_SCRATCH;
  const int64_t rb = blockIdx.x;  // row in the block
  const int64_t r = first * p.utterances + rb, own = p.speaker_offset + r / p.utterances;
  const int64_t D = p.dim, K = p.total_speakers;
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const auto* sums = static_cast<const acc_t*>(p.sums);
  const auto* inv_sums = static_cast<const acc_t*>(p.inv_sums);
  const auto prm = params_of<acc_t>(p);
  const bool softmax = p.method == kSoftmax;
  const auto oc = block_own_cosine(emb + r * D, sums + own * D, D, scratch);
  const acc_t g_r = grad_loss[r];
  const acc_t own_s = similarity(oc.raw_cos, prm);
  const acc_t lse = row_stat[r];
  const int64_t star = softmax ? -1 : hardest[r];
  acc_t* h_row = h + rb * K;
  Sums<acc_t, 2> part;  // dLoss/dw, dLoss/db of this thread's entries
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    if (k == own || (!softmax && k != star)) {
      h_row[k] = acc_t(0);
      continue;
    }
    const acc_t raw = cosine(h_row[k], oc.inv_norm_e, inv_sums[k]);
    const acc_t s = similarity(raw, prm);
    const acc_t g = softmax ? softmax_similarity_grad(s, lse, false, g_r)
                            : contrast_similarity_grad(s, false, g_r);
    part.v[0] += g * clamp_cosine(raw, prm);
    part.v[1] += g;
    h_row[k] = cosine_grad(g, raw, prm) * oc.inv_norm_e * inv_sums[k];
  }
  if (threadIdx.x == 0) {
    const acc_t g = softmax ? softmax_similarity_grad(own_s, lse, true, g_r)
                            : contrast_similarity_grad(own_s, true, g_r);
    part.v[0] += g * clamp_cosine(oc.raw_cos, prm);
    part.v[1] += g;
    store_own_terms(own_terms + r * kOwnTermsSize, cosine_grad(g, oc.raw_cos, prm), oc);
  }
  const auto total = block_reduce(part, scratch);
  if (threadIdx.x == 0) {
    dw_part[r] = total.v[0];
    db_part[r] = total.v[1];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(Problem p, int64_t first, const acc_t* cross,
                         const acc_t* __restrict__ own_terms, scalar_t* grad,
                         acc_t* __restrict__ own_sum_grads) {
  GE2E_SCRATCH;
  const int64_t jb = blockIdx.x, j = first + jb;
  const int64_t D = p.dim, M = p.utterances;
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const acc_t* s = static_cast<const acc_t*>(p.sums) + (p.speaker_offset + j) * D;
  acc_t* q_row = own_sum_grads + j * D;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t r = j * M + i, rb = jb * M + i;
    const scalar_t* e = emb + r * D;
    // cross may alias grad: each thread reads t_row[d] before it writes grad[d].
    const acc_t* t_row = cross + rb * D;
    Sums<acc_t, 1> part;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) part.v[0] += to_acc(e[d]) * t_row[d];
    const acc_t e_dot_t = block_reduce(part, scratch).v[0];
    acc_t hv;
    const auto oc = load_own_terms(own_terms + r * kOwnTermsSize, &hv);
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      const acc_t ev = to_acc(e[d]);
      const acc_t uv = s[d] - ev;
      const acc_t q = own_grad_wrt_centroid(hv, oc, ev, uv);
      const acc_t g = remove_projection(t_row[d], ev, e_dot_t, oc.inv_norm_e) +
                      own_grad_wrt_embedding(hv, oc, ev, uv) - q;
      store(grad + r * D + d, g);
      q_row[d] = i == 0 ? q : q_row[d] + q;
    }
  }
}

// dLoss/dw and dLoss/db from the rows' partials, in a fixed order.
template <typename acc_t>
__device__ void finalize_scalars(const Problem& p, const acc_t* __restrict__ dw_part,
                                 const acc_t* __restrict__ db_part, acc_t* __restrict__ grad_w,
                                 acc_t* __restrict__ grad_b, unsigned char* scratch) {
  const int64_t rows = p.num_speakers * p.utterances;
  Sums<acc_t, 2> part;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
    part.v[0] += dw_part[r];
    part.v[1] += db_part[r];
  }
  const auto total = block_reduce(part, scratch);
  if (threadIdx.x == 0) {
    *grad_w = params_of<acc_t>(p).w_active ? total.v[0] : acc_t(0);
    *grad_b = total.v[1];
  }
}

// Blocks 0..K-1: grad_sums from Z and the q sums (and the fold into the rows);
// block K: dLoss/dw and dLoss/db. One launch for the end of the backward.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(Problem p, acc_t* __restrict__ z, const acc_t* __restrict__ own_sum_grads,
                    scalar_t* __restrict__ grad, const acc_t* __restrict__ dw_part,
                    const acc_t* __restrict__ db_part, acc_t* __restrict__ grad_w,
                    acc_t* __restrict__ grad_b) {
  GE2E_SCRATCH;
  if (blockIdx.x == p.total_speakers) {
    finalize_scalars(p, dw_part, db_part, grad_w, grad_b, scratch);
    return;
  }
  const int64_t k = blockIdx.x, D = p.dim, M = p.utterances;
  acc_t* z_row = z + k * D;
  const acc_t* s = static_cast<const acc_t*>(p.sums) + k * D;
  const acc_t inv_s = static_cast<const acc_t*>(p.inv_sums)[k];
  Sums<acc_t, 1> part;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) part.v[0] += s[d] * z_row[d];
  const acc_t s_dot_z = block_reduce(part, scratch).v[0];
  const int64_t j = k - p.speaker_offset;  // local speaker, if it is one
  const bool local = j >= 0 && j < p.num_speakers;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const acc_t value = remove_projection(z_row[d], s[d], s_dot_z, inv_s) +
                        (local ? own_sum_grads[j * D + d] : acc_t(0));
    z_row[d] = value;
    if (!p.sums_given) {
      // ds_j/de_ji = I: every utterance of speaker j receives grad s_j.
      for (int64_t i = 0; i < M; ++i) {
        scalar_t* g = grad + (j * M + i) * D + d;
        store(g, to_acc(*g) + value);
      }
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace ge2e
