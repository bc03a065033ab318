// The CUDA kernels of csrc/cuda/ge2e_cuda_kernels.cuh run on the CPU under
// emulate.h, behind the same driver as the real op (blocks, matrix products),
// registered as ge2e_emu::ge2e_forward / ge2e_emu::ge2e_backward.
// tests/test_cuda_emulated.py compares them with the CPU kernel. The grid sizes
// mirror the launchers in csrc/cuda/ge2e_cuda_kernels.cu.
#include "emulate.h"  // first: its macros stand in for CUDA's keywords

#include <torch/library.h>

#include "../../csrc/cuda/ge2e_cuda_kernels.cuh"
#include "../../csrc/cuda/problem_of.h"
#include "../../csrc/ge2e_schema.h"

namespace {

using ge2e::Block;
using ge2e::Context;
using ge2e::cuda::kThreads;
using ge2e_emulation::launch;

template <typename Fn>
void dispatch(const Context& c, Fn&& fn) {
  switch (c.embeddings.scalar_type()) {
    case at::kFloat: fn(float(), float()); return;
    case at::kDouble: fn(double(), double()); return;
    default: TORCH_CHECK(false, "the emulated kernels run float32 and float64 only");
  }
}

struct EmulatedCudaKernels {
  static constexpr bool kSparseContrast = false;
  static constexpr int64_t kBlockInputShare = 16;

  static void inverse_norms(const at::Tensor& rows, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "emulated_inverse_norms", [&] {
      const scalar_t* x = rows.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t dim = rows.size(1);
      launch(rows.size(0), kThreads, [=] { ge2e::cuda::inverse_norms_kernel<scalar_t>(x, dim, o); });
    });
  }

  static void forward_rows(const Context& c, const Block& blk, const at::Tensor& dots,
                           at::Tensor& loss, at::Tensor& row_stat, at::Tensor& hardest) {
    const auto p = ge2e::cuda::problem_of(c);
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const acc_t* d = dots.data_ptr<acc_t>();
      acc_t* l = loss.data_ptr<acc_t>();
      acc_t* s = row_stat.data_ptr<acc_t>();
      int64_t* h = hardest.data_ptr<int64_t>();
      launch(blk.count * c.utterances, kThreads, [=] {
        ge2e::cuda::forward_rows_kernel<scalar_t, acc_t>(p, blk.first, d, l, s, h);
      });
    });
  }

  static void similarity_grads(const Context& c, const Block& blk, at::Tensor& dots_to_h,
                               const at::Tensor& grad_loss, const at::Tensor& row_stat,
                               const at::Tensor& hardest, at::Tensor& own_terms,
                               at::Tensor& dw_part, at::Tensor& db_part) {
    const auto p = ge2e::cuda::problem_of(c);
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      acc_t* h = dots_to_h.data_ptr<acc_t>();
      const acc_t* g = grad_loss.data_ptr<acc_t>();
      const acc_t* s = row_stat.data_ptr<acc_t>();
      const int64_t* k = hardest.data_ptr<int64_t>();
      acc_t* o = own_terms.data_ptr<acc_t>();
      acc_t* dw = dw_part.data_ptr<acc_t>();
      acc_t* db = db_part.data_ptr<acc_t>();
      launch(blk.count * c.utterances, kThreads, [=] {
        ge2e::cuda::similarity_grads_kernel<scalar_t, acc_t>(p, blk.first, h, g, s, k, o, dw, db);
      });
    });
  }

  static void backward_rows(const Context& c, const Block& blk, const at::Tensor& cross,
                            const at::Tensor& own_terms, at::Tensor& grad_embeddings,
                            at::Tensor& own_sum_grads) {
    const auto p = ge2e::cuda::problem_of(c);
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      const acc_t* t = cross.data_ptr<acc_t>();
      const acc_t* o = own_terms.data_ptr<acc_t>();
      scalar_t* g = grad_embeddings.data_ptr<scalar_t>();
      acc_t* q = own_sum_grads.data_ptr<acc_t>();
      launch(blk.count, kThreads, [=] {
        ge2e::cuda::backward_rows_kernel<scalar_t, acc_t>(p, blk.first, t, o, g, q);
      });
    });
  }

  static void finalize(const Context& c, at::Tensor& grad_sums, const at::Tensor& own_sum_grads,
                       at::Tensor& grad_embeddings, const at::Tensor& dw_part,
                       const at::Tensor& db_part, at::Tensor& grad_w, at::Tensor& grad_b) {
    const auto p = ge2e::cuda::problem_of(c);
    dispatch(c, [&](auto scalar_zero, auto acc_zero) {
      using scalar_t = decltype(scalar_zero);
      using acc_t = decltype(acc_zero);
      acc_t* z = grad_sums.data_ptr<acc_t>();
      const acc_t* q = own_sum_grads.data_ptr<acc_t>();
      scalar_t* g = grad_embeddings.data_ptr<scalar_t>();
      const acc_t* dw = dw_part.data_ptr<acc_t>();
      const acc_t* db = db_part.data_ptr<acc_t>();
      acc_t* gw = grad_w.data_ptr<acc_t>();
      acc_t* gb = grad_b.data_ptr<acc_t>();
      launch(c.total_speakers + 1, kThreads, [=] {
        ge2e::cuda::finalize_kernel<scalar_t, acc_t>(p, z, q, g, dw, db, gw, gb);
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_emulated(
    const at::Tensor& embeddings, const c10::optional<at::Tensor>& sums, const at::Tensor& w,
    const at::Tensor& b, int64_t speaker_offset, c10::string_view loss_method,
    c10::optional<double> min_cosine, int64_t block_speakers) {
  return ge2e::forward<EmulatedCudaKernels>(embeddings, sums, w, b, speaker_offset, loss_method,
                                            min_cosine, block_speakers);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_emulated(
    const at::Tensor& grad_loss, const at::Tensor& embeddings,
    const c10::optional<at::Tensor>& sums, const at::Tensor& w, const at::Tensor& b,
    const at::Tensor& row_stat, const at::Tensor& hardest, int64_t speaker_offset,
    c10::string_view loss_method, c10::optional<double> min_cosine, int64_t block_speakers) {
  return ge2e::backward<EmulatedCudaKernels>(grad_loss, embeddings, sums, w, b, row_stat, hardest,
                                             speaker_offset, loss_method, min_cosine,
                                             block_speakers);
}

}  // namespace

TORCH_LIBRARY(ge2e_emu, m) {
  m.def(ge2e::kForwardSchema);
  m.def(ge2e::kBackwardSchema);
}

TORCH_LIBRARY_IMPL(ge2e_emu, CPU, m) {
  m.impl("ge2e_forward", &forward_emulated);
  m.impl("ge2e_backward", &backward_emulated);
}
