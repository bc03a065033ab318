// The CPU kernels of the GE2E op: the per-row work around the matrix products
// of ge2e_driver.h, on plain pointers (no ATen), each over a range [lo, hi) of
// speakers (or of sums' rows) that ge2e_cpu.cpp hands to one thread. Every sum
// runs in a fixed order inside one range, so results do not depend on the
// number of threads and repeated calls are bitwise identical.
//
// The loops are written to vectorize: each hot loop is a small function whose
// array parameters are __restrict__ (GCC honours restrict on parameters, not
// on local pointers: without it, it guards the vector loop with a runtime
// overlap check, which buffers that sit close in memory fail) and whose
// scalars come by value; kLanes independent accumulators per reduction (a
// single running sum is a chain of dependent adds, which the compiler may not
// reorder); and ge2e_math.h's inlined exp.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../ge2e_math.h"
#include "../ge2e_problem.h"

namespace ge2e {
namespace cpu {
GE2E_ISA_BEGIN

// The lanes of ge2e_math.h (8 lanes ran 7x slower on AVX-512, the compiler
// interleaving two iterations with shuffles).
constexpr int kLanes = kRowLanes;

template <typename T>
inline T sum_lanes(const T (&part)[kLanes]) {
  T half[kLanes / 2];
  for (int l = 0; l < kLanes / 2; ++l) half[l] = part[l] + part[l + kLanes / 2];
  T quarter[kLanes / 4];
  for (int l = 0; l < kLanes / 4; ++l) quarter[l] = half[l] + half[l + kLanes / 4];
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

template <typename acc_t, typename A, typename B>
inline acc_t dot(const A* __restrict__ a, const B* __restrict__ b, int64_t n) {
  acc_t part[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      part[l] += static_cast<acc_t>(a[d + l]) * static_cast<acc_t>(b[d + l]);
    }
  }
  for (int64_t d = body; d < n; ++d) {
    part[d - body] += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  }
  return sum_lanes(part);
}

template <typename acc_t>
inline acc_t sum(const acc_t* __restrict__ x, int64_t n) {
  acc_t part[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t k = 0; k < body; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += x[k + l];
  }
  for (int64_t k = body; k < n; ++k) part[k - body] += x[k];
  return sum_lanes(part);
}

template <typename acc_t>
SimilarityParams<acc_t> params_of(const Problem& p) {
  return make_params<acc_t>(*static_cast<const acc_t*>(p.w), *static_cast<const acc_t*>(p.b),
                            p.min_cosine, p.clamp);
}

// max_d |x_d| (a NaN is skipped: it reaches the loss through the sums).
template <typename acc_t, typename scalar_t>
inline acc_t max_abs(const scalar_t* __restrict__ x, int64_t n) {
  acc_t part[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = abs_(static_cast<acc_t>(x[d + l]));
      part[l] = v > part[l] ? v : part[l];
    }
  }
  for (int64_t d = body; d < n; ++d) {
    const acc_t v = abs_(static_cast<acc_t>(x[d]));
    part[d - body] = v > part[d - body] ? v : part[d - body];
  }
  acc_t m = acc_t(0);
  for (int l = 0; l < kLanes; ++l) m = part[l] > m ? part[l] : m;
  return m;
}

// max_d |u~_d| of the speaker-scaled exclusive sum u~ = (s_hi - sigma e) + s_lo.
template <typename scalar_t, typename acc_t>
inline acc_t max_abs_exclusive(const scalar_t* __restrict__ e, const acc_t* __restrict__ s_hi,
                               const acc_t* __restrict__ s_lo, acc_t sigma, int64_t dim) {
  acc_t m = acc_t(0);
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t v = abs_(sum_without(s_hi[d], s_lo[d], static_cast<acc_t>(e[d]) * sigma));
    m = v > m ? v : m;
  }
  return m;
}

// s += sigma e as compensated sums (hi, lo), coordinate by coordinate.
template <typename scalar_t, typename acc_t>
void add_utterance(const scalar_t* __restrict__ e, acc_t sigma, acc_t* __restrict__ s_hi,
                   acc_t* __restrict__ s_lo, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    add_compensated(s_hi[d], s_lo[d], static_cast<acc_t>(e[d]) * sigma);
  }
}

// cos(e, u) with u~ = the speaker's scaled sum (hi, lo) without sigma e, from
// e'.e', e'.u', u'.u' of e' = e_scale e and u' = u_scale u~.
template <typename scalar_t, typename acc_t>
OwnCosine<acc_t> own_cosine_of(const scalar_t* __restrict__ e, const acc_t* __restrict__ s_hi,
                               const acc_t* __restrict__ s_lo, acc_t sigma, acc_t e_scale,
                               acc_t u_scale, int64_t dim) {
  acc_t ee[kLanes] = {}, eu[kLanes] = {}, uu[kLanes] = {};
  const int64_t body = dim - dim % kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t raw = static_cast<acc_t>(e[d + l]);
      const acc_t ev = raw * e_scale;
      const acc_t uv = sum_without(s_hi[d + l], s_lo[d + l], raw * sigma) * u_scale;
      ee[l] += ev * ev;
      eu[l] += ev * uv;
      uu[l] += uv * uv;
    }
  }
  for (int64_t d = body; d < dim; ++d) {
    const acc_t raw = static_cast<acc_t>(e[d]);
    const acc_t ev = raw * e_scale;
    const acc_t uv = sum_without(s_hi[d], s_lo[d], raw * sigma) * u_scale;
    ee[d - body] += ev * ev;
    eu[d - body] += ev * uv;
    uu[d - body] += uv * uv;
  }
  return own_cosine(sum_lanes(ee), sum_lanes(eu), sum_lanes(uu), e_scale, u_scale);
}

// out = scale * in.
template <typename acc_t>
void scaled_copy(acc_t factor, const acc_t* __restrict__ in, acc_t* __restrict__ out,
                 int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) out[d] = factor * in[d];
}

// v *= factor.
template <typename acc_t>
void scale_in_place(acc_t factor, acc_t* __restrict__ v, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) v[d] *= factor;
}

// Speakers [lo, hi): their scale sigma_j (from the largest |x| of their
// utterances), the compensated sums of their utterances times sigma_j (hi/lo),
// when the sums are the call's own s''_j (hi once more scaled) with its scale
// and inverse norm, and each utterance's OwnCosine with u = the sum of its
// speaker's other utterances: e' = sigma_j e and u' = u~, unless their squared
// norms underflow (a row far below its speaker's largest), then each scaled
// from its own largest coordinate.
template <typename scalar_t, typename acc_t>
void speaker_stats(const Problem& p, int64_t lo, int64_t hi) {
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  auto* sums_hi = static_cast<acc_t*>(p.own_sums_hi);
  auto* sums_lo = static_cast<acc_t*>(p.own_sums_lo);
  auto* speaker_scales = static_cast<acc_t*>(p.speaker_scales);
  auto* inv_sums = static_cast<acc_t*>(p.inv_sums);
  auto* own_terms = static_cast<acc_t*>(p.own_terms);
  const int64_t D = p.dim;
  for (int64_t j = lo; j < hi; ++j) {
    acc_t* s_hi = sums_hi + j * D;
    acc_t* s_lo = sums_lo + j * D;
    const int64_t begin = first_row(p, j), end = first_row(p, j + 1);
    acc_t largest = acc_t(0);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t m = max_abs<acc_t>(emb + r * D, D);
      largest = m > largest ? m : largest;
    }
    const acc_t sigma = power_of_two_scale(largest);
    speaker_scales[j] = sigma;
    for (int64_t d = 0; d < D; ++d) s_hi[d] = s_lo[d] = acc_t(0);
    for (int64_t r = begin; r < end; ++r) add_utterance(emb + r * D, sigma, s_hi, s_lo, D);
    if (!p.sums_given) {
      // s'' = beta s~ with its largest coordinate, then its norm, in [0.5, 1).
      acc_t beta = power_of_two_scale(max_abs<acc_t>(s_hi, D));
      acc_t* s = static_cast<acc_t*>(p.sums) + j * D;
      scaled_copy(beta, s_hi, s, D);
      const acc_t ss = dot<acc_t>(s, s, D);
      const acc_t beta_norm = power_of_two_scale(sqrt_(ss));
      if (beta_norm != acc_t(1)) scale_in_place(beta_norm, s, D);
      beta *= beta_norm;
      inv_sums[j] = inverse_norm(ss * beta_norm * beta_norm);
      static_cast<acc_t*>(p.sum_scales)[j] = sigma * beta;
    }
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* e = emb + r * D;
      OwnCosine<acc_t> own = own_cosine_of(e, s_hi, s_lo, sigma, sigma, acc_t(1), D);
      if (needs_own_scales(own)) {
        own = own_cosine_of(e, s_hi, s_lo, sigma, power_of_two_scale(max_abs<acc_t>(e, D)),
                            power_of_two_scale(max_abs_exclusive(e, s_hi, s_lo, sigma, D)), D);
      }
      store_own_cosine(own_terms + r * kOwnTermsSize, own);
    }
  }
}

// Rows [lo, hi) of given sums: their inverse norms.
template <typename acc_t>
void sum_inverse_norms(const Problem& p, int64_t lo, int64_t hi) {
  const auto* sums = static_cast<const acc_t*>(p.sums);
  auto* inv_sums = static_cast<acc_t*>(p.inv_sums);
  for (int64_t k = lo; k < hi; ++k) {
    inv_sums[k] = inverse_norm(dot<acc_t>(sums + k * p.dim, sums + k * p.dim, p.dim));
  }
}

// Rows [lo, hi) of `in` (B, D) as unit rows into `out` (normalize=True;
// ge2e_math.h, "unit rows"), and their norms.
template <typename scalar_t, typename acc_t>
void unit_rows(const Problem& p, const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
               acc_t* __restrict__ norms, int64_t lo, int64_t hi) {
  const int64_t D = p.dim, body = D - D % kLanes;
  for (int64_t r = lo; r < hi; ++r) {
    const scalar_t* e = in + r * D;
    const acc_t scale = power_of_two_scale(max_abs<acc_t>(e, D));
    acc_t part[kLanes] = {};
    for (int64_t d = 0; d < body; d += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t x = scale * static_cast<acc_t>(e[d + l]);
        part[l] += x * x;
      }
    }
    for (int64_t d = body; d < D; ++d) {
      const acc_t x = scale * static_cast<acc_t>(e[d]);
      part[d - body] += x * x;
    }
    const acc_t norm = row_norm(sum_lanes(part), scale);
    norms[r] = norm;
    const acc_t denominator = normalize_denominator(norm);
    for (int64_t d = 0; d < D; ++d) {
      out[r * D + d] = static_cast<scalar_t>(static_cast<acc_t>(e[d]) / denominator);
    }
  }
}

// Rows [lo, hi) of grad, dLoss/d(unit row) on entry, become dLoss/de (the
// gradient through the normalisation, ge2e_math.h), given e and its norms.
template <typename scalar_t, typename acc_t>
void unit_row_grads(const Problem& p, const scalar_t* __restrict__ in,
                    const acc_t* __restrict__ norms, scalar_t* __restrict__ grad, int64_t lo,
                    int64_t hi) {
  const int64_t D = p.dim, body = D - D % kLanes;
  for (int64_t r = lo; r < hi; ++r) {
    const scalar_t* e = in + r * D;
    scalar_t* g = grad + r * D;
    const acc_t norm = norms[r];
    acc_t u_dot_g = 0;
    if (norm_passes_gradient(norm)) {
      acc_t part[kLanes] = {};
      for (int64_t d = 0; d < body; d += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          part[l] += (static_cast<acc_t>(e[d + l]) / norm) * static_cast<acc_t>(g[d + l]);
        }
      }
      for (int64_t d = body; d < D; ++d) {
        part[d - body] += (static_cast<acc_t>(e[d]) / norm) * static_cast<acc_t>(g[d]);
      }
      u_dot_g = sum_lanes(part);
    }
    for (int64_t d = 0; d < D; ++d) {
      g[d] = static_cast<scalar_t>(unit_row_grad(static_cast<acc_t>(g[d]),
                                                 static_cast<acc_t>(e[d]), u_dot_g, norm));
    }
  }
}

// Scratch of one rows range, in acc_t elements: a row's values, and its
// similarity gradients and their gaps.
inline int64_t rows_scratch(const Problem& p) { return 3 * p.total_speakers; }

// row[k] = e_r . s''_k becomes cos(e_r, s_k) (cross_cosine).
template <typename acc_t>
void to_cosines(acc_t* __restrict__ row, const acc_t* __restrict__ inv_sums,
                OwnCosine<acc_t> exclusive, int64_t n) {
  for (int64_t k = 0; k < n; ++k) row[k] = cross_cosine(row[k], exclusive, inv_sums[k]);
}

// What the method's statistic is built from, for every k of a row, from its
// raw cosines `row`; returns whether the row's own speaker is its top-1 (no
// impostor takes_top1), decided in the same loop (a compare OR-ed into an
// int, which vectorizes with the rest).
template <class Method, typename acc_t>
bool row_values(const acc_t* __restrict__ row, RowView<acc_t> view, int64_t own,
                acc_t* __restrict__ values, int64_t n) {
  int beaten = 0;
  for (int64_t k = 0; k < n; ++k) {
    const acc_t c = clamp_cosine(row[k], view.params);
    values[k] = Method::value(c, view);
    beaten |= (k != own) & takes_top1(c, k, own, view.own_cos);
  }
  return beaten == 0;
}

// Every k of one row: the similarity gradient g_k (0 for the own speaker),
// g_k (c_k - c_own), and the raw cosines turned into H_rk = dLoss/dcos_rk /
// (|e_r||s_k|). Elementwise, with restrict pointers and scalars by value, so
// that it vectorizes; the sums come after.
template <class Method, typename acc_t>
void impostor_grads(acc_t* __restrict__ row, const acc_t* __restrict__ inv_sums, int64_t n,
                    int64_t own, RowSummary<acc_t> summary, RowView<acc_t> view,
                    OwnCosine<acc_t> exclusive, acc_t grad_row, acc_t* __restrict__ g,
                    acc_t* __restrict__ gap) {
  const SimilarityParams<acc_t> params = view.params;
  for (int64_t k = 0; k < n; ++k) {
    const acc_t raw = row[k];
    const acc_t c = clamp_cosine(raw, params);
    const acc_t g_k = Method::impostor_grad(Method::value(c, view), k, summary, view, grad_row);
    g[k] = k == own ? acc_t(0) : g_k;
    gap[k] = g[k] * (c - view.own_cos);
    row[k] = cross_cosine_weight(cosine_grad(g[k], raw, params), exclusive, inv_sums[k]);
  }
  row[own] = acc_t(0);  // the own speaker's term goes through u, not s_own
}

// The row kernel, speakers [lo, hi) of the block (block-local indices). Each
// row of `cosines` arrives as the dot products e_r . s_k and leaves as the
// raw cosines (kLoss) or as H_rk = dLoss/dcos_rk / (|e_r||s_k|) (the gradient
// passes; with kSparse only the hardest impostor's entry is written, for
// sparse_sum_grads and row_gradients to read). Also writes the rows' losses
// and hardest impostors, their own_grad, and their dLoss/dw, dLoss/db parts.
template <class Method, bool kSparse, typename acc_t>
void rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk, acc_t* cosines,
          acc_t* scratch, int64_t lo, int64_t hi) {
  // lo, hi: rows of the block (a block may hold part of a speaker's rows).
  const auto params = params_of<acc_t>(p);
  const auto* inv_sums = static_cast<const acc_t*>(p.inv_sums);
  auto* own_terms = static_cast<acc_t*>(p.own_terms);
  auto* loss = static_cast<acc_t*>(rb.loss);
  const auto* grad_loss = static_cast<const acc_t*>(rb.grad_loss);
  auto* w_part = static_cast<acc_t*>(rb.w_grad_part);
  auto* b_part = static_cast<acc_t*>(rb.b_grad_part);
  acc_t* values = scratch;
  const int64_t K = p.total_speakers;
  int64_t j = speaker_of(p, blk.first_row + lo);
  int64_t begin = first_row(p, j), end = first_row(p, j + 1);
  for (int64_t r = blk.first_row + lo; r < blk.first_row + hi; ++r) {
    while (r >= end) {  // the next speaker (skipping any empty one)
      ++j;
      begin = end;
      end = first_row(p, j + 1);
    }
    const int64_t own = p.speaker_offset + j;
    {
      acc_t* row = cosines + (r - blk.first_row) * K;
      const OwnCosine<acc_t> exclusive = load_own_cosine(own_terms + r * kOwnTermsSize);
      const RowView<acc_t> view{clamp_cosine(exclusive.raw_cos, params), params};
      to_cosines(row, inv_sums, exclusive, K);

      RowSummary<acc_t> summary;
      double* state = rb.state + r * kRowStateSize;
      if (pass == RowPass::kGradient) {
        summary = Method::template load_state<acc_t>(state);
      } else {
        rb.top1[r] = row_values<Method>(row, view, own, values, K);
        const auto stat = Method::row_statistic(values, K, own);
        summary = Method::summarize(stat, view);
        loss[r] = summary.loss;
        Method::save_state(summary, state);
      }
      rb.hardest[r] = summary.hardest;
      if (pass == RowPass::kLoss) continue;

      acc_t grad_row = pass == RowPass::kGradient
                           ? grad_loss[upstream_index(p, rb, r, j, r - begin)]
                           : static_cast<acc_t>(rb.grad_scale);
      acc_t impostor_sum = 0, gap_sum = 0;  // G = sum g_k and sum g_k (c_k - c_own)
      if constexpr (Method::kSparseGradient) {
        const int64_t k = summary.hardest;
        // A hardest index from outside (a direct call of the backward op)
        // that is not an impostor poisons the row instead of reading astray.
        if (k < 0 || k >= K || k == own) grad_row = quiet_nan<acc_t>();
      }
      if constexpr (kSparse) {
        const int64_t k = summary.hardest;
        if (k >= 0 && k < K && k != own) {
          const acc_t c = clamp_cosine(row[k], params);
          const acc_t g = Method::impostor_grad(Method::value(c, view), k, summary, view, grad_row);
          impostor_sum = g;
          gap_sum = g * (c - view.own_cos);
          row[k] = cross_cosine_weight(cosine_grad(g, row[k], params), exclusive, inv_sums[k]);
        }
      } else {
        acc_t* g = scratch + K;
        acc_t* gap = scratch + 2 * K;
        impostor_grads<Method>(row, inv_sums, K, own, summary, view, exclusive, grad_row, g, gap);
        impostor_sum = sum(g, K);
        gap_sum = sum(gap, K);
      }
      const acc_t own_g = Method::own_grad(impostor_sum, view, grad_row);
      own_terms[r * kOwnTermsSize + kOwnGradSlot] = cosine_grad(own_g, exclusive.raw_cos, params);
      w_part[r] = row_w_grad(impostor_sum, gap_sum, own_g, view.own_cos);
      b_part[r] = row_b_grad(impostor_sum, own_g);
    }
  }
}

// out += factor * in.
template <typename scalar_t, typename acc_t>
void add_scaled(acc_t factor, const scalar_t* __restrict__ in, acc_t* __restrict__ out,
                int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) out[d] += factor * static_cast<acc_t>(in[d]);
}

// Z_k = sum of H_{r,k} e_r over the block's rows whose hardest impostor is k,
// for sums' rows [lo, hi) (the sparse gradient's H^T E). bucket_start and
// bucket_rows list the block's rows by hardest impostor, in increasing order.
template <typename scalar_t, typename acc_t>
void sparse_sum_grads(const Problem& p, Block blk, const acc_t* cosines,
                      const int64_t* bucket_start, const int64_t* bucket_rows, acc_t* z,
                      bool accumulate, int64_t lo, int64_t hi) {
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const int64_t K = p.total_speakers, D = p.dim;
  for (int64_t k = lo; k < hi; ++k) {
    acc_t* z_row = z + k * D;
    if (!accumulate) {
      for (int64_t d = 0; d < D; ++d) z_row[d] = acc_t(0);
    }
    for (int64_t n = bucket_start[k]; n < bucket_start[k + 1]; ++n) {
      const int64_t rb = bucket_rows[n];
      add_scaled(cosines[rb * K + k], emb + (blk.first_row + rb) * D, z_row, D);
    }
  }
}

template <typename acc_t>
void remove_projections(const acc_t* z, const acc_t* __restrict__ s, acc_t s_dot_z, acc_t inv_s,
                        acc_t scale, acc_t* out, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) out[d] = remove_projection(z[d], s[d], s_dot_z, inv_s) * scale;
}

// dLoss/ds_k = scale_k (Z_k - s''_k (s''_k . Z_k)/|s''_k|^2) into out (which
// may be Z_k): the gradient for the unscaled sum s_k = s''_k / scale_k.
template <typename acc_t>
inline void sum_grad(const Problem& p, int64_t k, const acc_t* z, acc_t* out) {
  const auto* s = static_cast<const acc_t*>(p.sums) + k * p.dim;
  const acc_t* z_row = z + k * p.dim;
  remove_projections(z_row, s, dot<acc_t>(s, z_row, p.dim),
                     static_cast<const acc_t*>(p.inv_sums)[k],
                     static_cast<const acc_t*>(p.sum_scales)[k], out, p.dim);
}

// A speaker's rows whose q row_gradients keeps (a speaker with more computes
// each q twice instead), so that its scratch is O(D) per task: it does not
// grow with the largest speaker.
constexpr int64_t kStoredQRows = 16;

// Scratch of one row_gradients range, in acc_t elements.
inline int64_t row_gradients_scratch(const Problem& p) {
  const int64_t stored = p.max_utterances > 0 && p.max_utterances < kStoredQRows
                             ? p.max_utterances : kStoredQRows;
  return (stored + 8) * p.dim;
}

// A row's q = h dcos(e, u)/du, and q added to the compensated sum (q_hi, q_lo).
template <typename scalar_t, typename acc_t>
void own_grads_through_others(const scalar_t* __restrict__ e, const acc_t* __restrict__ s_hi,
                              const acc_t* __restrict__ s_lo, acc_t sigma, acc_t own_grad,
                              OwnCosine<acc_t> exclusive,
                              acc_t* __restrict__ q, acc_t* __restrict__ q_hi,
                              acc_t* __restrict__ q_lo, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t ev = static_cast<acc_t>(e[d]);
    q[d] = own_grad_through_others(own_grad, exclusive, ev,
                                   sum_without(s_hi[d], s_lo[d], ev * sigma), sigma);
    add_compensated(q_hi[d], q_lo[d], q[d]);
  }
}

// A row's gradient into out: its cross-speaker part from t = (H S)_r, its own part,
// the other rows' q (their compensated sum without this row's), and fold.
template <typename scalar_t, typename acc_t>
void row_gradient(const scalar_t* __restrict__ e, const acc_t* __restrict__ t,
                  const acc_t* __restrict__ s_hi, const acc_t* __restrict__ s_lo,
                  const acc_t* __restrict__ q, const acc_t* __restrict__ q_hi,
                  const acc_t* __restrict__ q_lo, const acc_t* __restrict__ fold, acc_t own_grad,
                  OwnCosine<acc_t> exclusive, acc_t sigma, acc_t e_dot_t,
                  acc_t* __restrict__ out, int64_t dim) {
  // e' = e_scale e: e'/|e'| = e/|e| and e' . t / |e'| = e . t / |e|.
  const acc_t scaled_dot = e_dot_t * exclusive.e_scale;
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t ev = static_cast<acc_t>(e[d]);
    const acc_t uv = sum_without(s_hi[d], s_lo[d], ev * sigma);
    out[d] = remove_projection(t[d], ev * exclusive.e_scale, scaled_dot, exclusive.inv_norm_e) +
             own_grad_through_embedding(own_grad, exclusive, ev, uv) +
             sum_without(q_hi[d], q_lo[d], q[d]) + fold[d];
  }
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* __restrict__ in, scalar_t* __restrict__ out, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(in[d]);
}

// The rows' gradients for speakers [lo, hi) of the block:
//   cross part   T_r - e_r (e_r . T_r)/|e_r|^2, T = H S (`t_rows`, or with
//                kSparse H_{r,k*} s_k* from the hardest entry of `cosines`)
//   own part     h (dcos(e, u)/de), and the other rows' q = h dcos(e, u)/du
//                summed without subtraction (CompensatedSum); for a speaker
//                the block splits, that sum is left to split_speaker_others
//   z_to_fold    when given, dLoss/ds_j of every speaker j, added to its rows.
// `t_rows` may be the gradient's own memory: each row is computed into scratch
// first.
template <bool kSparse, typename scalar_t, typename acc_t>
void row_gradients(const Problem& p, Block blk, const acc_t* t_rows, const acc_t* cosines,
                   const int64_t* hardest, const acc_t* z_to_fold, scalar_t* grad, acc_t* scratch,
                   int64_t lo, int64_t hi) {
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const auto* sums = static_cast<const acc_t*>(p.sums);
  const auto* sums_hi = static_cast<const acc_t*>(p.own_sums_hi);
  const auto* sums_lo = static_cast<const acc_t*>(p.own_sums_lo);
  const auto* own_terms = static_cast<const acc_t*>(p.own_terms);
  const int64_t K = p.total_speakers, D = p.dim;
  const int64_t stored = row_gradients_scratch(p) / D - 8;
  acc_t* q_stored = scratch;                 // (stored, D): the rows' q, small speakers
  acc_t* q_hi = scratch + stored * D;        // (D,): their compensated sum
  acc_t* q_lo = q_hi + D;
  acc_t* fold = q_lo + D;              // (D,): dLoss/ds_j
  acc_t* sparse_cross = fold + D;      // (D,): H_{r,k*} s_k*
  acc_t* out = sparse_cross + D;       // (D,): the row's gradient
  acc_t* q_row = out + D;              // (D,): one row's q, large speakers
  acc_t* unused_hi = q_row + D;        // (2 D): where a recomputed q's sum goes
  acc_t* unused_lo = unused_hi + D;
  const int64_t block_end = blk.first_row + blk.rows;
  for (int64_t jb = lo; jb < hi; ++jb) {
    const int64_t j = blk.first + jb;
    const acc_t* s_hi = sums_hi + j * D;
    const acc_t* s_lo = sums_lo + j * D;
    const acc_t sigma = static_cast<const acc_t*>(p.speaker_scales)[j];
    const int64_t speaker_begin = first_row(p, j), speaker_end = first_row(p, j + 1);
    const int64_t begin = std::max(speaker_begin, blk.first_row);
    const int64_t end = std::min(speaker_end, block_end);
    const bool whole = begin == speaker_begin && end == speaker_end;
    const bool keep_q = end - begin <= stored;
    const auto q_of = [&](int64_t r, acc_t* q, acc_t* sum_hi, acc_t* sum_lo) {
      own_grads_through_others(emb + r * D, s_hi, s_lo, sigma,
                               own_terms[r * kOwnTermsSize + kOwnGradSlot],
                               load_own_cosine(own_terms + r * kOwnTermsSize), q, sum_hi, sum_lo,
                               D);
    };
    for (int64_t d = 0; d < D; ++d) q_hi[d] = q_lo[d] = acc_t(0);
    if (whole) {
      for (int64_t r = begin; r < end; ++r) {
        q_of(r, keep_q ? q_stored + (r - begin) * D : q_row, q_hi, q_lo);
      }
    } else {
      for (int64_t d = 0; d < D; ++d) q_row[d] = acc_t(0);  // q_hi = q_lo = q = 0: no sum
    }
    if (z_to_fold != nullptr) {
      sum_grad(p, p.speaker_offset + j, z_to_fold, fold);
    } else {
      for (int64_t d = 0; d < D; ++d) fold[d] = acc_t(0);
    }
    for (int64_t r = begin; r < end; ++r) {
      const int64_t rb = r - blk.first_row;
      const scalar_t* e = emb + r * D;
      const acc_t* t_row = t_rows + rb * D;
      if constexpr (kSparse) {
        const int64_t k = hardest[r];
        const bool valid = k >= 0 && k < K && k != p.speaker_offset + j;
        scaled_copy(valid ? cosines[rb * K + k] : quiet_nan<acc_t>(), sums + (valid ? k : 0) * D,
                    sparse_cross, D);
        t_row = sparse_cross;
      }
      const acc_t* q = q_row;
      if (whole && keep_q) {
        q = q_stored + (r - begin) * D;
      } else if (whole) {
        q_of(r, q_row, unused_hi, unused_lo);  // the same q as in the sum, computed again
      }
      row_gradient(e, t_row, s_hi, s_lo, q, q_hi, q_lo, fold,
                   own_terms[r * kOwnTermsSize + kOwnGradSlot],
                   load_own_cosine(own_terms + r * kOwnTermsSize), sigma, dot<acc_t>(e, t_row, D),
                   out, D);
      store_row(out, grad + r * D, D);
    }
  }
}

// Scratch of one split_speaker_others range, in acc_t elements.
inline int64_t split_speaker_others_scratch(const Problem& p) { return 5 * p.dim; }

// Coordinates [lo, hi) of the rows of speaker j, which the blocks split: adds
// the sum over the speaker's other rows of their q (the compensated sum of
// all its rows' q, without the row's own), once every block has written its
// rows' own gradients. Each q is computed twice, by the same code.
template <typename scalar_t, typename acc_t>
void split_speaker_others(const Problem& p, int64_t j, scalar_t* grad, acc_t* scratch,
                          int64_t lo, int64_t hi) {
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const auto* own_terms = static_cast<const acc_t*>(p.own_terms);
  const int64_t D = p.dim, width = hi - lo;
  const acc_t* s_hi = static_cast<const acc_t*>(p.own_sums_hi) + j * D + lo;
  const acc_t* s_lo = static_cast<const acc_t*>(p.own_sums_lo) + j * D + lo;
  acc_t* q_hi = scratch;
  acc_t* q_lo = q_hi + width;
  acc_t* q = q_lo + width;
  acc_t* unused_hi = q + width;
  acc_t* unused_lo = unused_hi + width;
  const acc_t sigma = static_cast<const acc_t*>(p.speaker_scales)[j];
  const int64_t begin = first_row(p, j), end = first_row(p, j + 1);
  for (int64_t d = 0; d < width; ++d) q_hi[d] = q_lo[d] = unused_hi[d] = unused_lo[d] = acc_t(0);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t r = begin; r < end; ++r) {
      own_grads_through_others(emb + r * D + lo, s_hi, s_lo, sigma,
                               own_terms[r * kOwnTermsSize + kOwnGradSlot],
                               load_own_cosine(own_terms + r * kOwnTermsSize), q,
                               pass == 0 ? q_hi : unused_hi, pass == 0 ? q_lo : unused_lo, width);
      if (pass == 0) continue;
      scalar_t* row = grad + r * D + lo;
      for (int64_t d = 0; d < width; ++d) {
        row[d] = static_cast<scalar_t>(static_cast<acc_t>(row[d]) +
                                       sum_without(q_hi[d], q_lo[d], q[d]));
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void add_to_row(const acc_t* __restrict__ in, scalar_t* __restrict__ row, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    row[d] = static_cast<scalar_t>(static_cast<acc_t>(row[d]) + in[d]);
  }
}

// Local speakers [lo, hi): adds dLoss/ds_j (from Z) to each of their rows.
template <typename scalar_t, typename acc_t>
void fold(const Problem& p, const acc_t* z, scalar_t* grad, acc_t* scratch, int64_t lo,
          int64_t hi) {
  const int64_t D = p.dim;
  for (int64_t j = lo; j < hi; ++j) {
    sum_grad(p, p.speaker_offset + j, z, scratch);
    for (int64_t r = first_row(p, j); r < first_row(p, j + 1); ++r) {
      add_to_row(scratch, grad + r * D, D);
    }
  }
}

// Sums' rows [lo, hi): Z becomes dLoss/ds in place (given sums only).
template <typename acc_t>
void sum_grads(const Problem& p, acc_t* z, int64_t lo, int64_t hi) {
  for (int64_t k = lo; k < hi; ++k) sum_grad(p, k, z, z + k * p.dim);
}

// dLoss/dw, dLoss/db and (when loss_total is given) scale * the sum of the
// rows' losses, each summed in a fixed order.
template <typename acc_t>
void scalars(const Problem& p, const acc_t* w_part, const acc_t* b_part, const acc_t* loss_rows,
             double loss_scale, acc_t* grad_w, acc_t* grad_b, acc_t* loss_total) {
  const auto params = params_of<acc_t>(p);
  *grad_w = w_grad(sum(w_part, p.total_rows), params);
  *grad_b = b_grad(sum(b_part, p.total_rows), params);
  if (loss_total != nullptr) {
    *loss_total = static_cast<acc_t>(loss_scale) * sum(loss_rows, p.total_rows);
  }
}

GE2E_ISA_END
}  // namespace cpu
}  // namespace ge2e
