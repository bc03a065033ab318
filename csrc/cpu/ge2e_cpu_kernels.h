// The CPU kernels of the GE2E op: the per-row work around the matrix products
// of ge2e_driver.h, on plain pointers (no ATen), each over a range [lo, hi) of
// speakers (or of sums' rows) that ge2e_cpu.cpp hands to one thread. Every sum
// runs in a fixed order inside one range, so results do not depend on the
// number of threads and repeated calls are bitwise identical.
//
// The loops are written to vectorize: kLanes independent accumulators per
// reduction (a single running sum is a chain of dependent adds, which the
// compiler may not reorder), scalars by value and arrays __restrict__ where
// they cannot alias, and ge2e_math.h's inlined exp.
#pragma once

#include <cstdint>

#include "../ge2e_math.h"
#include "../ge2e_problem.h"

namespace ge2e {
namespace cpu {

// 16 lanes: one AVX-512 register of floats (8 lanes ran 7x slower there, the
// compiler interleaving two iterations with shuffles).
constexpr int kLanes = 16;

template <typename T>
inline T sum_lanes(const T (&part)[kLanes]) {
  T half[kLanes / 2];
  for (int l = 0; l < kLanes / 2; ++l) half[l] = part[l] + part[l + kLanes / 2];
  T quarter[kLanes / 4];
  for (int l = 0; l < kLanes / 4; ++l) quarter[l] = half[l] + half[l + kLanes / 4];
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

// body(k, lane) for k in [begin, end), lane = (k - begin) % kLanes: blocks of
// kLanes iterations whose lanes are independent, then the tail.
template <typename Body>
inline void for_lanes(int64_t begin, int64_t end, Body&& body) {
  int64_t k = begin;
  for (; k + kLanes <= end; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) body(k + l, l);
  }
  for (int l = 0; k < end; ++k, ++l) body(k, l);
}

template <typename acc_t, typename A, typename B>
inline acc_t dot(const A* __restrict__ a, const B* __restrict__ b, int64_t n) {
  acc_t part[kLanes] = {};
  for_lanes(0, n, [&](int64_t d, int l) {
    part[l] += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  });
  return sum_lanes(part);
}

template <typename acc_t>
inline acc_t sum(const acc_t* __restrict__ x, int64_t n) {
  acc_t part[kLanes] = {};
  for_lanes(0, n, [&](int64_t k, int l) { part[l] += x[k]; });
  return sum_lanes(part);
}

template <typename acc_t>
SimilarityParams<acc_t> params_of(const Problem& p) {
  return make_params<acc_t>(*static_cast<const acc_t*>(p.w), *static_cast<const acc_t*>(p.b),
                            p.min_cosine, p.clamp);
}

// Speakers [lo, hi): the compensated sums of their utterances (hi/lo), the
// inverse norms of those sums when they are the call's own, and each
// utterance's OwnCosine with u = the sum of its speaker's other utterances.
template <typename scalar_t, typename acc_t>
void speaker_stats(const Problem& p, int64_t lo, int64_t hi) {
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  auto* sums_hi = static_cast<acc_t*>(p.own_sums_hi);
  auto* sums_lo = static_cast<acc_t*>(p.own_sums_lo);
  auto* inv_sums = static_cast<acc_t*>(p.inv_sums);
  auto* own_terms = static_cast<acc_t*>(p.own_terms);
  const int64_t M = p.utterances, D = p.dim;
  for (int64_t j = lo; j < hi; ++j) {
    acc_t* __restrict__ s_hi = sums_hi + j * D;
    acc_t* __restrict__ s_lo = sums_lo + j * D;
    for (int64_t d = 0; d < D; ++d) s_hi[d] = s_lo[d] = acc_t(0);
    for (int64_t i = 0; i < M; ++i) {
      const scalar_t* __restrict__ e = emb + (j * M + i) * D;
      for (int64_t d = 0; d < D; ++d) add_compensated(s_hi[d], s_lo[d], static_cast<acc_t>(e[d]));
    }
    if (!p.sums_given) inv_sums[j] = inverse_norm(dot<acc_t>(s_hi, s_hi, D));
    for (int64_t i = 0; i < M; ++i) {
      const scalar_t* __restrict__ e = emb + (j * M + i) * D;
      acc_t ee[kLanes] = {}, eu[kLanes] = {}, uu[kLanes] = {};
      for_lanes(0, D, [&](int64_t d, int l) {
        const acc_t ev = static_cast<acc_t>(e[d]);
        const acc_t uv = sum_without(s_hi[d], s_lo[d], ev);
        ee[l] += ev * ev;
        eu[l] += ev * uv;
        uu[l] += uv * uv;
      });
      store_own_cosine(own_terms + (j * M + i) * kOwnTermsSize,
                       own_cosine(sum_lanes(ee), sum_lanes(eu), sum_lanes(uu)));
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

// The row kernel, speakers [lo, hi) of the block (block-local indices). Each
// row of `cosines` arrives as the dot products e_r . s_k and leaves as the
// raw cosines (kLoss) or as H_rk = dLoss/dcos_rk / (|e_r||s_k|) (the gradient
// passes; with kSparse only the hardest impostor's entry is written, for
// sparse_sum_grads and row_gradients to read). Also writes the rows' losses
// and hardest impostors, their own_grad, and their dLoss/dw, dLoss/db parts.
template <class Method, bool kSparse, typename acc_t>
void rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk, acc_t* cosines,
          int64_t lo, int64_t hi) {
  const auto params = params_of<acc_t>(p);
  const auto* inv_sums = static_cast<const acc_t*>(p.inv_sums);
  auto* own_terms = static_cast<acc_t*>(p.own_terms);
  auto* loss = static_cast<acc_t*>(rb.loss);
  const auto* grad_loss = static_cast<const acc_t*>(rb.grad_loss);
  auto* w_part = static_cast<acc_t*>(rb.w_grad_part);
  auto* b_part = static_cast<acc_t*>(rb.b_grad_part);
  const int64_t M = p.utterances, K = p.total_speakers;
  using Statistic = typename Method::template Statistic<acc_t>;
  for (int64_t jb = lo; jb < hi; ++jb) {
    const int64_t j = blk.first + jb, own = p.speaker_offset + j;
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = j * M + i;
      acc_t* __restrict__ row = cosines + (jb * M + i) * K;
      const OwnCosine<acc_t> oc = load_own_cosine(own_terms + r * kOwnTermsSize);
      const RowView<acc_t> view{clamp_cosine(oc.raw_cos, params), params};
      const acc_t inv_e = oc.inv_norm_e;
      for (int64_t k = 0; k < K; ++k) row[k] = cosine(row[k], inv_e, inv_sums[k]);

      RowSummary<acc_t> summary;
      if (pass == RowPass::kGradient) {
        summary.loss = loss[r];
        summary.hardest = rb.hardest[r];
      } else {
        Statistic lanes[kLanes];
        const auto add = [&](int64_t k, int l) {
          lanes[l].add(Method::value(clamp_cosine(row[k], params), view), k);
        };
        for_lanes(0, own, add);
        for_lanes(own + 1, K, add);
        Statistic stat = lanes[0];
        for (int l = 1; l < kLanes; ++l) stat.merge(lanes[l]);
        summary.loss = Method::row_loss(stat, view);
        summary.hardest = Method::hardest(stat);
        loss[r] = summary.loss;
        rb.hardest[r] = summary.hardest;
        if (pass == RowPass::kLoss) continue;
      }

      acc_t grad_row = pass == RowPass::kGradient
                           ? grad_loss[j * rb.grad_stride_speaker + i * rb.grad_stride_utterance]
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
          row[k] = cosine_grad(g, row[k], params) * inv_e * inv_sums[k];
        }
      } else {
        acc_t g_lanes[kLanes] = {}, gap_lanes[kLanes] = {};
        const auto grad = [&](int64_t k, int l) {
          const acc_t raw = row[k];
          const acc_t c = clamp_cosine(raw, params);
          const acc_t g = Method::impostor_grad(Method::value(c, view), k, summary, view, grad_row);
          g_lanes[l] += g;
          gap_lanes[l] += g * (c - view.own_cos);
          row[k] = cosine_grad(g, raw, params) * inv_e * inv_sums[k];
        };
        for_lanes(0, own, grad);
        for_lanes(own + 1, K, grad);
        row[own] = acc_t(0);  // the own speaker's term goes through u, not s_own
        impostor_sum = sum_lanes(g_lanes);
        gap_sum = sum_lanes(gap_lanes);
      }
      const acc_t own_g = Method::own_grad(impostor_sum, view, grad_row);
      own_terms[r * kOwnTermsSize + kOwnGradSlot] = cosine_grad(own_g, oc.raw_cos, params);
      w_part[r] = row_w_grad(impostor_sum, gap_sum, own_g, view.own_cos);
      b_part[r] = row_b_grad(impostor_sum, own_g);
    }
  }
}

// Z_k = sum of H_{r,k} e_r over the block's rows whose hardest impostor is k,
// for sums' rows [lo, hi) (the sparse gradient's H^T E). bucket_start and
// bucket_rows list the block's rows by hardest impostor, in increasing order.
template <typename scalar_t, typename acc_t>
void sparse_sum_grads(const Problem& p, Block blk, const acc_t* cosines,
                      const int64_t* bucket_start, const int64_t* bucket_rows, acc_t* z,
                      bool accumulate, int64_t lo, int64_t hi) {
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const int64_t M = p.utterances, K = p.total_speakers, D = p.dim;
  for (int64_t k = lo; k < hi; ++k) {
    acc_t* __restrict__ z_row = z + k * D;
    if (!accumulate) {
      for (int64_t d = 0; d < D; ++d) z_row[d] = acc_t(0);
    }
    for (int64_t n = bucket_start[k]; n < bucket_start[k + 1]; ++n) {
      const int64_t rb = bucket_rows[n];
      const scalar_t* __restrict__ e = emb + (blk.first * M + rb) * D;
      const acc_t h = cosines[rb * K + k];
      for (int64_t d = 0; d < D; ++d) z_row[d] += h * static_cast<acc_t>(e[d]);
    }
  }
}

// dLoss/ds_k = Z_k - s_k (s_k . Z_k)/|s_k|^2 into out (which may be z).
template <typename acc_t>
inline void sum_grad(const Problem& p, int64_t k, const acc_t* z, acc_t* out) {
  const auto* s = static_cast<const acc_t*>(p.sums) + k * p.dim;
  const acc_t* z_row = z + k * p.dim;
  const acc_t s_dot_z = dot<acc_t>(s, z_row, p.dim);
  const acc_t inv_s = static_cast<const acc_t*>(p.inv_sums)[k];
  for (int64_t d = 0; d < p.dim; ++d) out[d] = remove_projection(z_row[d], s[d], s_dot_z, inv_s);
}

// Scratch of one row_gradients range, in acc_t elements.
inline int64_t row_gradients_scratch(const Problem& p) { return (p.utterances + 4) * p.dim; }

// The rows' gradients for speakers [lo, hi) of the block:
//   cross part   T_r - e_r (e_r . T_r)/|e_r|^2, T = H S (`cross`, or with
//                kSparse H_{r,k*} s_k* from the hardest entry of `cosines`)
//   own part     h (dcos(e, u)/de), and the other rows' q = h dcos(e, u)/du
//                summed without subtraction (CompensatedSum)
//   z_to_fold    when given, dLoss/ds_j of every speaker j, added to its rows.
// `cross` may be the gradient's own memory: each element is read before it
// is written.
template <bool kSparse, typename scalar_t, typename acc_t>
void row_gradients(const Problem& p, Block blk, const acc_t* cross, const acc_t* cosines,
                   const int64_t* hardest, const acc_t* z_to_fold, scalar_t* grad, acc_t* scratch,
                   int64_t lo, int64_t hi) {
  const auto* emb = static_cast<const scalar_t*>(p.embeddings);
  const auto* sums = static_cast<const acc_t*>(p.sums);
  const auto* sums_hi = static_cast<const acc_t*>(p.own_sums_hi);
  const auto* sums_lo = static_cast<const acc_t*>(p.own_sums_lo);
  const auto* own_terms = static_cast<const acc_t*>(p.own_terms);
  const int64_t M = p.utterances, K = p.total_speakers, D = p.dim;
  acc_t* __restrict__ q = scratch;                  // (M, D): each row's q
  acc_t* __restrict__ q_hi = scratch + M * D;       // (D,): their compensated sum
  acc_t* __restrict__ q_lo = q_hi + D;
  acc_t* __restrict__ fold = q_lo + D;              // (D,): dLoss/ds_j
  acc_t* __restrict__ sparse_cross = fold + D;      // (D,): H_{r,k*} s_k*
  for (int64_t jb = lo; jb < hi; ++jb) {
    const int64_t j = blk.first + jb;
    const acc_t* __restrict__ s_hi = sums_hi + j * D;
    const acc_t* __restrict__ s_lo = sums_lo + j * D;
    for (int64_t d = 0; d < D; ++d) q_hi[d] = q_lo[d] = acc_t(0);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = j * M + i;
      const scalar_t* __restrict__ e = emb + r * D;
      const OwnCosine<acc_t> oc = load_own_cosine(own_terms + r * kOwnTermsSize);
      const acc_t h = own_terms[r * kOwnTermsSize + kOwnGradSlot];
      acc_t* __restrict__ q_row = q + i * D;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t ev = static_cast<acc_t>(e[d]);
        q_row[d] = own_grad_through_others(h, oc, ev, sum_without(s_hi[d], s_lo[d], ev));
        add_compensated(q_hi[d], q_lo[d], q_row[d]);
      }
    }
    if (z_to_fold != nullptr) {
      sum_grad(p, p.speaker_offset + j, z_to_fold, fold);
    } else {
      for (int64_t d = 0; d < D; ++d) fold[d] = acc_t(0);
    }
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = j * M + i, rb = (jb * M + i);
      const scalar_t* __restrict__ e = emb + r * D;
      const OwnCosine<acc_t> oc = load_own_cosine(own_terms + r * kOwnTermsSize);
      const acc_t h = own_terms[r * kOwnTermsSize + kOwnGradSlot];
      const acc_t* t_row = cross + rb * D;
      if constexpr (kSparse) {
        const int64_t k = hardest[r];
        const bool valid = k >= 0 && k < K && k != p.speaker_offset + j;
        const acc_t coefficient = valid ? cosines[rb * K + k] : quiet_nan<acc_t>();
        const acc_t* s_k = sums + (valid ? k : 0) * D;
        for (int64_t d = 0; d < D; ++d) sparse_cross[d] = coefficient * s_k[d];
        t_row = sparse_cross;
      }
      const acc_t e_dot_t = dot<acc_t>(e, t_row, D);
      const acc_t* __restrict__ q_row = q + i * D;
      scalar_t* g_row = grad + r * D;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t ev = static_cast<acc_t>(e[d]);
        const acc_t uv = sum_without(s_hi[d], s_lo[d], ev);
        const acc_t g = remove_projection(t_row[d], ev, e_dot_t, oc.inv_norm_e) +
                        own_grad_through_embedding(h, oc, ev, uv) +
                        sum_without(q_hi[d], q_lo[d], q_row[d]) + fold[d];
        g_row[d] = static_cast<scalar_t>(g);
      }
    }
  }
}

// Local speakers [lo, hi): adds dLoss/ds_j (from Z) to each of their rows.
template <typename scalar_t, typename acc_t>
void fold(const Problem& p, const acc_t* z, scalar_t* grad, acc_t* scratch, int64_t lo,
          int64_t hi) {
  const int64_t M = p.utterances, D = p.dim;
  for (int64_t j = lo; j < hi; ++j) {
    sum_grad(p, p.speaker_offset + j, z, scratch);
    for (int64_t i = 0; i < M; ++i) {
      scalar_t* __restrict__ g = grad + (j * M + i) * D;
      for (int64_t d = 0; d < D; ++d) {
        g[d] = static_cast<scalar_t>(static_cast<acc_t>(g[d]) + scratch[d]);
      }
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
  *grad_w = w_grad(sum(w_part, p.rows()), params);
  *grad_b = b_grad(sum(b_part, p.rows()), params);
  if (loss_total != nullptr) *loss_total = static_cast<acc_t>(loss_scale) * sum(loss_rows, p.rows());
}

}  // namespace cpu
}  // namespace ge2e
