// The CPU device of the GE2E op: the Device policy of ge2e_driver.h over the
// kernels of ge2e_cpu_kernels.h, run in parallel over speakers with
// at::parallel_for, and the op registrations for the CPU dispatch key.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "../ge2e_driver.h"
#include "ge2e_cpu_kernels.h"

namespace ge2e {
namespace {

struct CpuTypes {
  using Half = c10::Half;
  using BFloat16 = c10::BFloat16;
};

// fn(scalar_t{}, acc_t{}) for the call's dtype.
template <typename Fn>
void dispatch(const Problem& p, Fn&& fn) {
  dispatch_dtype<CpuTypes>(p.dtype, fn);
}

// fn(lo, hi, scratch) over [0, n) in parallel; scratch: per task, `scratch_size` elements.
template <typename acc_t, typename Fn>
void parallel_over(int64_t n, int64_t scratch_size, Fn&& fn) {
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> scratch(static_cast<size_t>(scratch_size));
    fn(lo, hi, scratch.data());
  });
}

struct CpuDevice {
  // Cosine blocks up to an eighth of the input: at N=2048, M=10, D=256 a
  // sixteenth made a step 4% slower (smaller matrix products).
  static constexpr int64_t kBlockInputShare = 8;
  static constexpr int64_t kMinBlockSpeakers = 1;
  // The contrast loss's gradient has two non-zero entries per row, so its
  // products are a gather and a bucketed sum: O(N M D) instead of O(N M K D).
  static constexpr bool kSparseProducts = true;

  static void speaker_stats(const Problem& p) {
    dispatch(p, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      parallel_over<acc_t>(p.speakers, 0, [&](int64_t lo, int64_t hi, acc_t*) {
        cpu::speaker_stats<scalar_t, acc_t>(p, lo, hi);
      });
      if (p.sums_given) {
        parallel_over<acc_t>(p.total_speakers, 0, [&](int64_t lo, int64_t hi, acc_t*) {
          cpu::sum_inverse_norms<acc_t>(p, lo, hi);
        });
      }
    });
  }

  template <class Method>
  static void rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk,
                   void* cosines) {
    constexpr bool sparse = kSparseProducts && Method::kSparseGradient;
    dispatch(p, [&](auto, auto acc_zero) {
      using acc_t = decltype(acc_zero);
      parallel_over<acc_t>(blk.count, cpu::rows_scratch(p),
                           [&](int64_t lo, int64_t hi, acc_t* scratch) {
                             cpu::rows<Method, sparse, acc_t>(
                                 p, rb, pass, blk, static_cast<acc_t*>(cosines), scratch, lo, hi);
                           });
    });
  }

  static void sparse_sum_grads(const Problem& p, Block blk, const void* cosines,
                               const int64_t* hardest, void* z, bool accumulate) {
    // The block's rows by hardest impostor (a counting sort), so that each Z_k
    // sums its rows in increasing order whatever the thread count.
    const int64_t K = p.total_speakers, rows = blk.rows;
    const int64_t* block_hardest = hardest + blk.first_row;
    std::vector<int64_t> bucket_start(static_cast<size_t>(K + 1), 0);
    const auto valid = [&](int64_t rb) {
      const int64_t k = block_hardest[rb];
      return k >= 0 && k < K && k != p.speaker_offset + speaker_of(p, blk.first_row + rb);
    };
    for (int64_t rb = 0; rb < rows; ++rb) {
      if (valid(rb)) ++bucket_start[block_hardest[rb] + 1];
    }
    for (int64_t k = 0; k < K; ++k) bucket_start[k + 1] += bucket_start[k];
    std::vector<int64_t> bucket_rows(static_cast<size_t>(bucket_start[K]));
    std::vector<int64_t> fill(bucket_start.begin(), bucket_start.end() - 1);
    for (int64_t rb = 0; rb < rows; ++rb) {
      if (valid(rb)) bucket_rows[fill[block_hardest[rb]]++] = rb;
    }
    dispatch(p, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      parallel_over<acc_t>(K, 0, [&](int64_t lo, int64_t hi, acc_t*) {
        cpu::sparse_sum_grads<scalar_t, acc_t>(p, blk, static_cast<const acc_t*>(cosines),
                                               bucket_start.data(), bucket_rows.data(),
                                               static_cast<acc_t*>(z), accumulate, lo, hi);
      });
    });
  }

  template <class Method>
  static void row_gradients(const Problem& p, Block blk, const void* t_rows, const void* cosines,
                            const int64_t* hardest, const void* z_to_fold, void* grad) {
    constexpr bool sparse = kSparseProducts && Method::kSparseGradient;
    dispatch(p, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      parallel_over<acc_t>(
          blk.count, cpu::row_gradients_scratch(p), [&](int64_t lo, int64_t hi, acc_t* scratch) {
            cpu::row_gradients<sparse, scalar_t, acc_t>(
                p, blk, static_cast<const acc_t*>(t_rows), static_cast<const acc_t*>(cosines),
                hardest, static_cast<const acc_t*>(z_to_fold), static_cast<scalar_t*>(grad),
                scratch, lo, hi);
          });
    });
  }

  static void fold(const Problem& p, const void* z, void* grad) {
    dispatch(p, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      parallel_over<acc_t>(p.speakers, p.dim, [&](int64_t lo, int64_t hi, acc_t* scratch) {
        cpu::fold<scalar_t, acc_t>(p, static_cast<const acc_t*>(z), static_cast<scalar_t*>(grad),
                                   scratch, lo, hi);
      });
    });
  }

  static void finish(const Problem& p, void* z, const void* w_part, const void* b_part,
                     const void* loss_rows, double loss_scale, void* grad_w, void* grad_b,
                     void* loss_total) {
    dispatch(p, [&](auto, auto acc_zero) {
      using acc_t = decltype(acc_zero);
      if (p.sums_given) {
        parallel_over<acc_t>(p.total_speakers, 0, [&](int64_t lo, int64_t hi, acc_t*) {
          cpu::sum_grads<acc_t>(p, static_cast<acc_t*>(z), lo, hi);
        });
      }
      cpu::scalars<acc_t>(p, static_cast<const acc_t*>(w_part), static_cast<const acc_t*>(b_part),
                          static_cast<const acc_t*>(loss_rows), loss_scale,
                          static_cast<acc_t*>(grad_w), static_cast<acc_t*>(grad_b),
                          static_cast<acc_t*>(loss_total));
    });
  }
};

}  // namespace
}  // namespace ge2e

TORCH_LIBRARY_IMPL(ge2e_ext, CPU, m) {
  m.impl("ge2e_forward", &ge2e::forward<ge2e::CpuDevice>);
  m.impl("ge2e_backward", &ge2e::backward<ge2e::CpuDevice>);
  m.impl("ge2e_forward_backward", &ge2e::forward_backward<ge2e::CpuDevice>);
}
