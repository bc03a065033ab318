// CPU kernels of the GE2E op: the per-row work around the matrix products of
// ge2e_driver.h, parallel over the speakers of a block with at::parallel_for.
// Every sum runs in a fixed order inside one task (no atomics, no reduction
// across threads), so repeated calls give bitwise-identical results.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../ge2e_driver.h"
#include "../ge2e_math.h"

namespace ge2e {
namespace {

template <typename acc_t>
SimilarityParams<acc_t> params_of(const Context& c) {
  return make_params<acc_t>(*c.w.data_ptr<acc_t>(), *c.b.data_ptr<acc_t>(), c.min_cosine,
                            c.clamp);
}

// Dot products over D keep kLanes independent partial sums: a single running
// sum is one long chain of dependent adds (latency-bound, and the compiler may
// not reorder float adds to vectorize it). The order is fixed, so results are
// still reproducible. 16 lanes: one AVX-512 register of floats (8 lanes ran 7x
// slower there, the compiler interleaving two iterations with shuffles).
constexpr int kLanes = 16;

template <typename acc_t>
acc_t sum_lanes(const acc_t (&part)[kLanes]) {
  acc_t half[kLanes / 2];
  for (int l = 0; l < kLanes / 2; ++l) half[l] = part[l] + part[l + kLanes / 2];
  acc_t quarter[kLanes / 4];
  for (int l = 0; l < kLanes / 4; ++l) quarter[l] = half[l] + half[l + kLanes / 4];
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

template <typename acc_t, typename A, typename B>
acc_t dot(const A* __restrict__ a, const B* __restrict__ b, int64_t dim) {
  acc_t part[kLanes] = {};
  const int64_t body = dim - dim % kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      part[l] += static_cast<acc_t>(a[d + l]) * static_cast<acc_t>(b[d + l]);
    }
  }
  for (int64_t d = body; d < dim; ++d) {
    part[d - body] += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  }
  return sum_lanes(part);
}

// e.e, e.u and u.u for u = s - e, accumulated directly (see own_cosine).
template <typename scalar_t, typename acc_t>
OwnCosine<acc_t> own_cosine_of(const scalar_t* __restrict__ e, const acc_t* __restrict__ s,
                               int64_t dim) {
  acc_t ee[kLanes] = {}, eu[kLanes] = {}, uu[kLanes] = {};
  const int64_t body = dim - dim % kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t ev = static_cast<acc_t>(e[d + l]);
      const acc_t uv = s[d + l] - ev;
      ee[l] += ev * ev;
      eu[l] += ev * uv;
      uu[l] += uv * uv;
    }
  }
  for (int64_t d = body; d < dim; ++d) {
    const acc_t ev = static_cast<acc_t>(e[d]);
    const acc_t uv = s[d] - ev;
    ee[d - body] += ev * ev;
    eu[d - body] += ev * uv;
    uu[d - body] += uv * uv;
  }
  return own_cosine(sum_lanes(ee), sum_lanes(eu), sum_lanes(uu));
}

// Runs fn(scalar_t, acc_t) for the embeddings' dtype.
template <typename Fn>
void dispatch(const Context& c, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.embeddings.scalar_type(), "ge2e_cpu",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    fn(scalar_t(0), acc_t(0));
                                  });
}

// Calls row_fn(j, i, row, block_row, scratch) for every utterance of the
// block, one task per speaker so that per-speaker sums stay in one thread;
// scratch holds scratch_size elements of the task's own.
template <typename acc_t, typename RowFn>
void for_each_speaker(const Context& c, const Block& blk, int64_t scratch_size, RowFn&& row_fn) {
  at::parallel_for(0, blk.count, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> scratch(static_cast<size_t>(scratch_size));
    for (int64_t jb = lo; jb < hi; ++jb) {
      const int64_t j = blk.first + jb;
      for (int64_t i = 0; i < c.utterances; ++i) {
        row_fn(j, i, j * c.utterances + i, jb * c.utterances + i, scratch.data());
      }
    }
  });
}

template <typename acc_t>
acc_t sum(const acc_t* x, int64_t n) {
  acc_t part[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t k = 0; k < body; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += x[k + l];
  }
  for (int64_t k = body; k < n; ++k) part[k - body] += x[k];
  return sum_lanes(part);
}

// max over x; NaNs are skipped here and caught by the sum of exponentials.
template <typename acc_t>
acc_t max_of(const acc_t* x, int64_t n) {
  acc_t part[kLanes];
  for (int l = 0; l < kLanes; ++l) part[l] = -infinity<acc_t>();
  const int64_t body = n - n % kLanes;
  for (int64_t k = 0; k < body; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] = x[k + l] > part[l] ? x[k + l] : part[l];
  }
  for (int64_t k = body; k < n; ++k) part[k - body] = x[k] > part[k - body] ? x[k] : part[k - body];
  acc_t m = part[0];
  for (int l = 1; l < kLanes; ++l) m = part[l] > m ? part[l] : m;
  return m;
}

// log sum_k exp(x_k), two passes (max, then independent exponentials that
// vectorize) instead of the online update's serial chain.
template <typename acc_t>
acc_t log_sum_exp(const acc_t* x, int64_t n) {
  const acc_t m = max_of(x, n);
  acc_t part[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t k = 0; k < body; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += exp_(x[k + l] - m);
  }
  for (int64_t k = body; k < n; ++k) part[k - body] += exp_(x[k] - m);
  return m + log_(sum_lanes(part));
}

// The row loops below take their scalars by value and their arrays as
// __restrict__ so that the compiler sees no aliasing and vectorizes them.

// row[k] = S_k = w * clamp(cos(e, s_k)) + b from row[k] = e . s_k.
template <typename acc_t>
void similarity_row(acc_t* __restrict__ row, const acc_t* __restrict__ inv_sums, int64_t K,
                    acc_t inv_norm_e, SimilarityParams<acc_t> p) {
  for (int64_t k = 0; k < K; ++k) row[k] = similarity(cosine(row[k], inv_norm_e, inv_sums[k]), p);
}

// Softmax backward of one row: from row[k] = e . s_k, writes H_rk into row,
// dLoss/dS_k into sim_grad and the clamped cosine into clamped (every k treated
// as an impostor; the caller redoes the own entry).
template <typename acc_t>
void softmax_row_grads(acc_t* __restrict__ row, const acc_t* __restrict__ inv_sums,
                       acc_t* __restrict__ sim_grad, acc_t* __restrict__ clamped, int64_t K,
                       acc_t inv_norm_e, acc_t lse, acc_t grad_row, SimilarityParams<acc_t> p) {
  for (int64_t k = 0; k < K; ++k) {
    const acc_t raw = cosine(row[k], inv_norm_e, inv_sums[k]);
    const acc_t g = softmax_similarity_grad(similarity(raw, p), lse, false, grad_row);
    sim_grad[k] = g;
    clamped[k] = clamp_cosine(raw, p);
    row[k] = cosine_grad(g, raw, p) * inv_norm_e * inv_sums[k];
  }
}

// One row's gradient: the cross-speaker part from t_row = (H S)_r with the
// projection of ge2e_math.h, plus the own-speaker part; adds the row's q (the
// own term's gradient on s_j) into q_row (overwrites it for the first utterance).
// t_row may alias grad_row: each element is read before it is written.
template <typename scalar_t, typename acc_t>
void row_gradient(const scalar_t* e, const acc_t* s, const acc_t* t_row, acc_t e_dot_t, acc_t h,
                  const OwnCosine<acc_t>& oc, int64_t dim, bool first_utterance,
                  scalar_t* grad_row, acc_t* __restrict__ q_row) {
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t ev = static_cast<acc_t>(e[d]);
    const acc_t uv = s[d] - ev;
    const acc_t q = own_grad_wrt_centroid(h, oc, ev, uv);
    const acc_t g = remove_projection(t_row[d], ev, e_dot_t, oc.inv_norm_e) +
                    own_grad_wrt_embedding(h, oc, ev, uv) - q;
    grad_row[d] = static_cast<scalar_t>(g);
    q_row[d] = first_utterance ? q : q_row[d] + q;
  }
}

struct CpuKernels {
  // Similarity blocks up to an eighth of the input: at N=2048, M=10, D=256
  // a sixteenth made a step 4% slower (smaller matrix products).
  static constexpr int64_t kBlockInputShare = 8;

  static void inverse_norms(const at::Tensor& rows, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "ge2e_inverse_norms", [&] {
      const scalar_t* x = rows.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t dim = rows.size(1);
      at::parallel_for(0, rows.size(0), 16, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          o[k] = inverse_norm(dot<scalar_t>(x + k * dim, x + k * dim, dim));
        }
      });
    });
  }

  static void forward_rows(const Context& c, const Block& blk, at::Tensor& dots,
                           at::Tensor& loss, at::Tensor& row_stat, at::Tensor& hardest) {
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const auto p = params_of<acc_t>(c);
      const scalar_t* emb = c.embeddings.data_ptr<scalar_t>();
      const acc_t* sums = c.sums.data_ptr<acc_t>();
      const acc_t* inv_sums = c.inv_sums.data_ptr<acc_t>();
      acc_t* dot = dots.data_ptr<acc_t>();
      acc_t* loss_out = loss.data_ptr<acc_t>();
      acc_t* stat_out = row_stat.data_ptr<acc_t>();
      int64_t* hardest_out = hardest.data_ptr<int64_t>();
      const int64_t K = c.total_speakers, D = c.dim;
      for_each_speaker<acc_t>(c, blk, 0, [&](int64_t j, int64_t, int64_t r, int64_t rb, acc_t*) {
        const int64_t own = c.speaker_offset + j;
        const auto oc = own_cosine_of(emb + r * D, sums + own * D, D);
        const acc_t own_sim = similarity(oc.raw_cos, p);
        // The block of dot products is this call's own: turn the row into S.
        acc_t* sim_row = dot + rb * K;
        similarity_row(sim_row, inv_sums, K, oc.inv_norm_e, p);
        sim_row[own] = own_sim;  // against the exclusive centroid, not s_j
        if (c.method == kSoftmax) {
          stat_out[r] = log_sum_exp(sim_row, K);
          loss_out[r] = softmax_row_loss(stat_out[r], own_sim);
          hardest_out[r] = -1;  // only the contrast loss needs it
        } else {
          HardestImpostor<acc_t> impostor;
          for (int64_t k = 0; k < K; ++k) {
            if (k != own) impostor.add(sim_row[k], k);
          }
          stat_out[r] = impostor.value;
          loss_out[r] = contrast_row_loss(own_sim, impostor.value);
          hardest_out[r] = impostor.index;
        }
      });
    });
  }

  // Turns the block of dot products into H_rk = h_rk / (|e_r||s_k|) (own
  // column 0), and writes h for the own speaker and the row's dLoss/dw, dLoss/db.
  static void similarity_grads(const Context& c, const Block& blk, at::Tensor& dots_to_h,
                               const at::Tensor& grad_loss, const at::Tensor& row_stat,
                               const at::Tensor& hardest, at::Tensor& own_terms,
                               at::Tensor& dw_part, at::Tensor& db_part) {
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const auto p = params_of<acc_t>(c);
      const scalar_t* emb = c.embeddings.data_ptr<scalar_t>();
      const acc_t* sums = c.sums.data_ptr<acc_t>();
      const acc_t* inv_sums = c.inv_sums.data_ptr<acc_t>();
      acc_t* h = dots_to_h.data_ptr<acc_t>();
      const acc_t* grad_row = grad_loss.data_ptr<acc_t>();
      const acc_t* stat = row_stat.data_ptr<acc_t>();
      const int64_t* hardest_idx = hardest.data_ptr<int64_t>();
      acc_t* own_out = own_terms.data_ptr<acc_t>();
      acc_t* dw_out = dw_part.data_ptr<acc_t>();
      acc_t* db_out = db_part.data_ptr<acc_t>();
      const int64_t K = c.total_speakers, D = c.dim;
      for_each_speaker<acc_t>(c, blk, 2 * K, [&](int64_t j, int64_t, int64_t r, int64_t rb,
                                                  acc_t* scratch) {
        const int64_t own = c.speaker_offset + j;
        const auto oc = own_cosine_of(emb + r * D, sums + own * D, D);
        acc_t* h_row = h + rb * K;
        const acc_t g_r = grad_row[r];
        const acc_t own_s = similarity(oc.raw_cos, p);
        if (c.method == kSoftmax) {
          // dLoss/dS (and the clamped cosine, for dLoss/dw) per entry, kept so
          // that the row's dw, db sums vectorize after the loop.
          acc_t* sim_grad = scratch;
          acc_t* clamped = scratch + K;
          const acc_t lse = stat[r];
          softmax_row_grads(h_row, inv_sums, sim_grad, clamped, K, oc.inv_norm_e, lse, g_r, p);
          // The own entry was computed against s_j; redo it against s_j - e.
          const acc_t g_own = softmax_similarity_grad(own_s, lse, true, g_r);
          sim_grad[own] = g_own;
          clamped[own] = clamp_cosine(oc.raw_cos, p);
          h_row[own] = 0;
          store_own_terms(own_out + r * kOwnTermsSize, cosine_grad(g_own, oc.raw_cos, p), oc);
          dw_out[r] = dot<acc_t>(sim_grad, clamped, K);
          db_out[r] = sum(sim_grad, K);
        } else {
          const int64_t star = hardest_idx[r];
          TORCH_CHECK(star >= 0 && star < K && star != own,
                      "ge2e_ext: hardest impostor index ", star, " of row ", r,
                      " is invalid (own speaker ", own, ", K = ", K, ")");
          const acc_t raw = cosine(h_row[star], oc.inv_norm_e, inv_sums[star]);
          const acc_t g_star = contrast_similarity_grad(similarity(raw, p), false, g_r);
          const acc_t g_own = contrast_similarity_grad(own_s, true, g_r);
          for (int64_t k = 0; k < K; ++k) h_row[k] = 0;
          h_row[star] = cosine_grad(g_star, raw, p) * oc.inv_norm_e * inv_sums[star];
          store_own_terms(own_out + r * kOwnTermsSize, cosine_grad(g_own, oc.raw_cos, p), oc);
          dw_out[r] = g_own * clamp_cosine(oc.raw_cos, p) + g_star * clamp_cosine(raw, p);
          db_out[r] = g_own + g_star;
        }
      });
    });
  }

  // Row gradients of the block from T = H S and the own-speaker terms, and
  // each speaker's q-sum (the own terms' gradient on its sum).
  static void backward_rows(const Context& c, const Block& blk, const at::Tensor& cross,
                            const at::Tensor& own_terms, at::Tensor& grad_embeddings,
                            at::Tensor& own_sum_grads) {
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const scalar_t* emb = c.embeddings.data_ptr<scalar_t>();
      const acc_t* sums = c.sums.data_ptr<acc_t>();
      // May alias grad: each element is read before the same element is written.
      const acc_t* t = cross.data_ptr<acc_t>();
      const acc_t* own_in = own_terms.data_ptr<acc_t>();
      scalar_t* grad = grad_embeddings.data_ptr<scalar_t>();
      acc_t* q_sum = own_sum_grads.data_ptr<acc_t>();
      const int64_t D = c.dim;
      for_each_speaker<acc_t>(c, blk, 0, [&](int64_t j, int64_t i, int64_t r, int64_t rb, acc_t*) {
        const scalar_t* e = emb + r * D;
        const acc_t* s = sums + (c.speaker_offset + j) * D;
        const acc_t* t_row = t + rb * D;
        acc_t* q_row = q_sum + j * D;
        acc_t h;
        const auto oc = load_own_terms(own_in + r * kOwnTermsSize, &h);
        row_gradient(e, s, t_row, dot<acc_t>(e, t_row, D), h, oc, D, i == 0, grad + r * D, q_row);
      });
    });
  }

  // The contrast loss has two non-zero dLoss/dS per row (own speaker and
  // hardest impostor), so its backward needs no matrix product: O(N M D) work.
  static constexpr bool kSparseContrast = true;

  // Writes the rows' gradients, the q sums, the dw/db partials, and
  // grad_sums = Z = sum_r H_{r,k*} e_r, for the contrast loss.
  static void contrast_backward(const Context& c, const at::Tensor& grad_loss,
                                const at::Tensor& hardest, at::Tensor& grad_embeddings,
                                at::Tensor& own_sum_grads, at::Tensor& dw_part,
                                at::Tensor& db_part, at::Tensor& grad_sums) {
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const auto p = params_of<acc_t>(c);
      const scalar_t* emb = c.embeddings.data_ptr<scalar_t>();
      const acc_t* sums = c.sums.data_ptr<acc_t>();
      const acc_t* inv_sums = c.inv_sums.data_ptr<acc_t>();
      const acc_t* grad_row = grad_loss.data_ptr<acc_t>();
      const int64_t* hardest_idx = hardest.data_ptr<int64_t>();
      scalar_t* grad = grad_embeddings.data_ptr<scalar_t>();
      acc_t* q_sum = own_sum_grads.data_ptr<acc_t>();
      acc_t* dw_out = dw_part.data_ptr<acc_t>();
      acc_t* db_out = db_part.data_ptr<acc_t>();
      const int64_t K = c.total_speakers, D = c.dim, rows = c.num_speakers * c.utterances;
      std::vector<acc_t> coefficient(static_cast<size_t>(rows));  // H_{r,k*}
      const Block all{0, c.num_speakers};
      for_each_speaker<acc_t>(c, all, D, [&](int64_t j, int64_t i, int64_t r, int64_t,
                                             acc_t* t_row) {
        const int64_t own = c.speaker_offset + j;
        const scalar_t* e = emb + r * D;
        const acc_t* s_own = sums + own * D;
        const auto oc = own_cosine_of(e, s_own, D);
        const int64_t star = hardest_idx[r];
        TORCH_CHECK(star >= 0 && star < K && star != own, "ge2e_ext: hardest impostor index ",
                    star, " of row ", r, " is invalid (own speaker ", own, ", K = ", K, ")");
        const acc_t* s_star = sums + star * D;
        const acc_t e_dot_s = dot<acc_t>(e, s_star, D);
        const acc_t raw = cosine(e_dot_s, oc.inv_norm_e, inv_sums[star]);
        const acc_t g_r = grad_row[r];
        const acc_t g_star = contrast_similarity_grad(similarity(raw, p), false, g_r);
        const acc_t g_own = contrast_similarity_grad(similarity(oc.raw_cos, p), true, g_r);
        dw_out[r] = g_own * clamp_cosine(oc.raw_cos, p) + g_star * clamp_cosine(raw, p);
        db_out[r] = g_own + g_star;
        const acc_t h_star = cosine_grad(g_star, raw, p) * oc.inv_norm_e * inv_sums[star];
        coefficient[r] = h_star;
        for (int64_t d = 0; d < D; ++d) t_row[d] = h_star * s_star[d];  // (H S)_r
        row_gradient(e, s_own, t_row, h_star * e_dot_s, cosine_grad(g_own, oc.raw_cos, p), oc,
                     D, i == 0, grad + r * D, q_sum + j * D);
      });
      // Z_k sums its rows in increasing order (bucketed by hardest impostor),
      // so the result does not depend on the thread count.
      std::vector<int64_t> bucket_start(static_cast<size_t>(K + 1), 0);
      for (int64_t r = 0; r < rows; ++r) ++bucket_start[hardest_idx[r] + 1];
      for (int64_t k = 0; k < K; ++k) bucket_start[k + 1] += bucket_start[k];
      std::vector<int64_t> bucket_rows(static_cast<size_t>(rows));
      std::vector<int64_t> fill(bucket_start.begin(), bucket_start.end() - 1);
      for (int64_t r = 0; r < rows; ++r) bucket_rows[fill[hardest_idx[r]]++] = r;
      acc_t* z = grad_sums.data_ptr<acc_t>();
      at::parallel_for(0, K, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          acc_t* __restrict__ z_row = z + k * D;
          for (int64_t d = 0; d < D; ++d) z_row[d] = 0;
          for (int64_t n = bucket_start[k]; n < bucket_start[k + 1]; ++n) {
            const int64_t r = bucket_rows[n];
            const scalar_t* __restrict__ e = emb + r * D;
            const acc_t h = coefficient[r];
            for (int64_t d = 0; d < D; ++d) z_row[d] += h * static_cast<acc_t>(e[d]);
          }
        }
      });
    });
  }

  static void finalize(const Context& c, at::Tensor& grad_sums, const at::Tensor& own_sum_grads,
                       at::Tensor& grad_embeddings, const at::Tensor& dw_part,
                       const at::Tensor& db_part, at::Tensor& grad_w, at::Tensor& grad_b) {
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      acc_t* z = grad_sums.data_ptr<acc_t>();
      const acc_t* sums = c.sums.data_ptr<acc_t>();
      const acc_t* inv_sums = c.inv_sums.data_ptr<acc_t>();
      const acc_t* q_sum = own_sum_grads.data_ptr<acc_t>();
      scalar_t* grad = grad_embeddings.data_ptr<scalar_t>();
      const int64_t D = c.dim, M = c.utterances;
      at::parallel_for(0, c.total_speakers, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          acc_t* z_row = z + k * D;
          const acc_t* s = sums + k * D;
          const acc_t s_dot_z = dot<acc_t>(s, z_row, D);
          const int64_t j = k - c.speaker_offset;  // local speaker, if it is one
          const bool local = j >= 0 && j < c.num_speakers;
          for (int64_t d = 0; d < D; ++d) {
            z_row[d] = remove_projection(z_row[d], s[d], s_dot_z, inv_sums[k]) +
                       (local ? q_sum[j * D + d] : acc_t(0));
          }
          if (!c.sums_given) {
            // ds_j/de_ji = I: every utterance of speaker j receives grad s_j.
            for (int64_t i = 0; i < M; ++i) {
              scalar_t* g = grad + (j * M + i) * D;
              for (int64_t d = 0; d < D; ++d) {
                g[d] = static_cast<scalar_t>(static_cast<acc_t>(g[d]) + z_row[d]);
              }
            }
          }
        }
      });
      const int64_t rows = c.num_speakers * M;
      const acc_t* dw = dw_part.data_ptr<acc_t>();
      const acc_t* db = db_part.data_ptr<acc_t>();
      acc_t dw_total = 0, db_total = 0;
      for (int64_t r = 0; r < rows; ++r) {
        dw_total += dw[r];
        db_total += db[r];
      }
      const auto p = params_of<acc_t>(c);
      *grad_w.data_ptr<acc_t>() = p.w_active ? dw_total : acc_t(0);
      *grad_b.data_ptr<acc_t>() = db_total;
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& embeddings, const c10::optional<at::Tensor>& sums, const at::Tensor& w,
    const at::Tensor& b, int64_t speaker_offset, c10::string_view loss_method,
    c10::optional<double> min_cosine, int64_t block_speakers) {
  return forward<CpuKernels>(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine,
                             block_speakers);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& embeddings,
    const c10::optional<at::Tensor>& sums, const at::Tensor& w, const at::Tensor& b,
    const at::Tensor& row_stat, const at::Tensor& hardest, int64_t speaker_offset,
    c10::string_view loss_method, c10::optional<double> min_cosine, int64_t block_speakers) {
  return backward<CpuKernels>(grad_loss, embeddings, sums, w, b, row_stat, hardest,
                              speaker_offset, loss_method, min_cosine, block_speakers);
}

}  // namespace
}  // namespace ge2e

TORCH_LIBRARY_IMPL(ge2e_ext, CPU, m) {
  m.impl("ge2e_forward", &ge2e::forward_cpu);
  m.impl("ge2e_backward", &ge2e::backward_cpu);
}
