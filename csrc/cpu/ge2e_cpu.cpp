// CPU kernels of the GE2E op: the per-row work around the matrix products of
// ge2e_driver.h, parallel over the speakers of a block with at::parallel_for.
// Every sum runs in a fixed order inside one task, so results are bitwise
// reproducible whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ge2e_driver.h"
#include "../ge2e_math.h"

namespace ge2e {
namespace {

template <typename acc_t>
SimilarityParams<acc_t> params_of(const Context& c) {
  return make_params<acc_t>(*c.w.data_ptr<acc_t>(), *c.b.data_ptr<acc_t>(), c.min_cosine,
                            c.clamp);
}

// e.e, e.u and u.u for u = s - e, accumulated directly (see own_cosine).
template <typename scalar_t, typename acc_t>
OwnCosine<acc_t> own_cosine_of(const scalar_t* e, const acc_t* s, int64_t dim) {
  acc_t ee = 0, eu = 0, uu = 0;
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t ev = static_cast<acc_t>(e[d]);
    const acc_t uv = s[d] - ev;
    ee += ev * ev;
    eu += ev * uv;
    uu += uv * uv;
  }
  return own_cosine(ee, eu, uu);
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

// Calls row_fn(j, i, row, block_row) for every utterance of the block, one
// task per speaker so that per-speaker sums stay in one thread.
template <typename RowFn>
void for_each_speaker(const Context& c, const Block& blk, RowFn&& row_fn) {
  at::parallel_for(0, blk.count, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t jb = lo; jb < hi; ++jb) {
      const int64_t j = blk.first + jb;
      for (int64_t i = 0; i < c.utterances; ++i) {
        row_fn(j, i, j * c.utterances + i, jb * c.utterances + i);
      }
    }
  });
}

struct CpuKernels {
  static void inverse_norms(const at::Tensor& rows, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "ge2e_inverse_norms", [&] {
      const scalar_t* x = rows.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t dim = rows.size(1);
      at::parallel_for(0, rows.size(0), 16, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          scalar_t sq = 0;
          for (int64_t d = 0; d < dim; ++d) sq += x[k * dim + d] * x[k * dim + d];
          o[k] = inverse_norm(sq);
        }
      });
    });
  }

  static void forward_rows(const Context& c, const Block& blk, const at::Tensor& dots,
                           at::Tensor& loss, at::Tensor& row_stat, at::Tensor& hardest) {
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const auto p = params_of<acc_t>(c);
      const scalar_t* emb = c.embeddings.data_ptr<scalar_t>();
      const acc_t* sums = c.sums.data_ptr<acc_t>();
      const acc_t* inv_sums = c.inv_sums.data_ptr<acc_t>();
      const acc_t* dot = dots.data_ptr<acc_t>();
      acc_t* loss_out = loss.data_ptr<acc_t>();
      acc_t* stat_out = row_stat.data_ptr<acc_t>();
      int64_t* hardest_out = hardest.data_ptr<int64_t>();
      const int64_t K = c.total_speakers, D = c.dim;
      for_each_speaker(c, blk, [&](int64_t j, int64_t, int64_t r, int64_t rb) {
        const int64_t own = c.speaker_offset + j;
        const auto oc = own_cosine_of(emb + r * D, sums + own * D, D);
        const acc_t own_sim = similarity(oc.raw_cos, p);
        const acc_t* dot_row = dot + rb * K;
        HardestImpostor<acc_t> impostor;
        if (c.method == kSoftmax) {
          LogSumExp<acc_t> lse;
          for (int64_t k = 0; k < K; ++k) {
            if (k == own) {
              lse.add(own_sim);
              continue;
            }
            const acc_t s = similarity(cosine(dot_row[k], oc.inv_norm_e, inv_sums[k]), p);
            lse.add(s);
            impostor.add(s, k);
          }
          stat_out[r] = lse.value();
          loss_out[r] = softmax_row_loss(stat_out[r], own_sim);
        } else {
          for (int64_t k = 0; k < K; ++k) {
            if (k == own) continue;
            impostor.add(similarity(cosine(dot_row[k], oc.inv_norm_e, inv_sums[k]), p), k);
          }
          stat_out[r] = impostor.value;
          loss_out[r] = contrast_row_loss(own_sim, impostor.value);
        }
        hardest_out[r] = impostor.index;
      });
    });
  }

  // Turns the block of dot products into H_rk = h_rk / (|e_r||s_k|) (own
  // column 0), and writes h for the own speaker and the row's dLoss/dw, dLoss/db.
  static void similarity_grads(const Context& c, const Block& blk, at::Tensor& dots_to_h,
                               const at::Tensor& grad_loss, const at::Tensor& row_stat,
                               const at::Tensor& hardest, at::Tensor& h_own,
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
      acc_t* h_own_out = h_own.data_ptr<acc_t>();
      acc_t* dw_out = dw_part.data_ptr<acc_t>();
      acc_t* db_out = db_part.data_ptr<acc_t>();
      const int64_t K = c.total_speakers, D = c.dim;
      for_each_speaker(c, blk, [&](int64_t j, int64_t, int64_t r, int64_t rb) {
        const int64_t own = c.speaker_offset + j;
        const auto oc = own_cosine_of(emb + r * D, sums + own * D, D);
        acc_t* h_row = h + rb * K;
        const acc_t g_r = grad_row[r];
        acc_t dw = 0, db = 0;
        // dLoss/dS -> (dLoss/dw, dLoss/db) partials and h = dLoss/d(raw cos).
        auto accumulate = [&](acc_t raw_cos, acc_t sim_grad) {
          dw += sim_grad * clamp_cosine(raw_cos, p);
          db += sim_grad;
          return cosine_grad(sim_grad, raw_cos, p);
        };
        const acc_t own_s = similarity(oc.raw_cos, p);
        if (c.method == kSoftmax) {
          const acc_t lse = stat[r];
          for (int64_t k = 0; k < K; ++k) {
            if (k == own) {
              h_own_out[r] = accumulate(oc.raw_cos, softmax_similarity_grad(own_s, lse, true, g_r));
              h_row[k] = 0;
              continue;
            }
            const acc_t raw = cosine(h_row[k], oc.inv_norm_e, inv_sums[k]);
            const acc_t hk =
                accumulate(raw, softmax_similarity_grad(similarity(raw, p), lse, false, g_r));
            h_row[k] = hk * oc.inv_norm_e * inv_sums[k];
          }
        } else {
          h_own_out[r] = accumulate(oc.raw_cos, contrast_similarity_grad(own_s, true, g_r));
          const int64_t star = hardest_idx[r];
          TORCH_CHECK(star >= 0 && star < K && star != own,
                      "ge2e_ext: hardest impostor index ", star, " of row ", r,
                      " is invalid (own speaker ", own, ", K = ", K, ")");
          const acc_t raw = cosine(h_row[star], oc.inv_norm_e, inv_sums[star]);
          const acc_t h_star =
              accumulate(raw, contrast_similarity_grad(similarity(raw, p), false, g_r));
          for (int64_t k = 0; k < K; ++k) h_row[k] = 0;
          h_row[star] = h_star * oc.inv_norm_e * inv_sums[star];
        }
        dw_out[r] = dw;
        db_out[r] = db;
      });
    });
  }

  // Row gradients of the block from T = H S and the own-speaker terms, and
  // each speaker's q-sum (the own terms' gradient on its sum).
  static void backward_rows(const Context& c, const Block& blk, const at::Tensor& cross,
                            const at::Tensor& h_own, at::Tensor& grad_embeddings,
                            at::Tensor& own_sum_grads) {
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const scalar_t* emb = c.embeddings.data_ptr<scalar_t>();
      const acc_t* sums = c.sums.data_ptr<acc_t>();
      // May alias grad: each element is read before the same element is written.
      const acc_t* t = cross.data_ptr<acc_t>();
      const acc_t* h_own_in = h_own.data_ptr<acc_t>();
      scalar_t* grad = grad_embeddings.data_ptr<scalar_t>();
      acc_t* q_sum = own_sum_grads.data_ptr<acc_t>();
      const int64_t D = c.dim;
      for_each_speaker(c, blk, [&](int64_t j, int64_t i, int64_t r, int64_t rb) {
        const scalar_t* e = emb + r * D;
        const acc_t* s = sums + (c.speaker_offset + j) * D;
        const acc_t* t_row = t + rb * D;
        acc_t* q_row = q_sum + j * D;
        const auto oc = own_cosine_of(e, s, D);
        acc_t e_dot_t = 0;
        for (int64_t d = 0; d < D; ++d) e_dot_t += static_cast<acc_t>(e[d]) * t_row[d];
        const acc_t h = h_own_in[r];
        for (int64_t d = 0; d < D; ++d) {
          const acc_t ev = static_cast<acc_t>(e[d]);
          const acc_t uv = s[d] - ev;
          const acc_t q = own_grad_wrt_centroid(h, oc, ev, uv);
          const acc_t g = remove_projection(t_row[d], ev, e_dot_t, oc.inv_norm_e) +
                          own_grad_wrt_embedding(h, oc, ev, uv) - q;
          grad[r * D + d] = static_cast<scalar_t>(g);
          q_row[d] = i == 0 ? q : q_row[d] + q;
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
          acc_t s_dot_z = 0;
          for (int64_t d = 0; d < D; ++d) s_dot_z += s[d] * z_row[d];
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
