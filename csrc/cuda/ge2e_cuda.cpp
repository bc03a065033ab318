// ATen glue of the CUDA kernels: device guard, current stream, pointers, and a
// check of every launch. The block loop and the cuBLAS products are the shared
// driver's (ge2e_driver.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ge2e_driver.h"
#include "ge2e_cuda.h"
#include "problem_of.h"

namespace ge2e {
namespace {

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "ge2e_ext: CUDA kernel ", kernel,
              " failed to launch: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct CudaKernels {
  // The contrast loss takes the dense path too: cuBLAS makes its products cheap,
  // and one code path is what the tests exercise.
  static constexpr bool kSparseContrast = false;
  // Similarity blocks up to a sixteenth of the input, so that a step's peak
  // memory stays within 1.2x of input + gradient (the CUDA issue's goal).
  static constexpr int64_t kBlockInputShare = 16;

  static void inverse_norms(const at::Tensor& rows, at::Tensor& out) {
    check_launch(cuda::launch_inverse_norms(rows.scalar_type() == at::kDouble, rows.data_ptr(),
                                            rows.size(0), rows.size(1), out.data_ptr(),
                                            current_stream()),
                 "inverse_norms");
  }

  static void forward_rows(const Context& c, const Block& blk, const at::Tensor& dots,
                           at::Tensor& loss, at::Tensor& row_stat, at::Tensor& hardest) {
    check_launch(cuda::launch_forward_rows(cuda::problem_of(c), blk.first, blk.count,
                                           dots.data_ptr(), loss.data_ptr(), row_stat.data_ptr(),
                                           hardest.data_ptr<int64_t>(), current_stream()),
                 "forward_rows");
  }

  static void similarity_grads(const Context& c, const Block& blk, at::Tensor& dots_to_h,
                               const at::Tensor& grad_loss, const at::Tensor& row_stat,
                               const at::Tensor& hardest, at::Tensor& own_terms,
                               at::Tensor& dw_part, at::Tensor& db_part) {
    check_launch(cuda::launch_similarity_grads(
                     cuda::problem_of(c), blk.first, blk.count, dots_to_h.data_ptr(),
                     grad_loss.data_ptr(), row_stat.data_ptr(), hardest.data_ptr<int64_t>(),
                     own_terms.data_ptr(), dw_part.data_ptr(), db_part.data_ptr(),
                     current_stream()),
                 "similarity_grads");
  }

  static void backward_rows(const Context& c, const Block& blk, const at::Tensor& cross,
                            const at::Tensor& own_terms, at::Tensor& grad_embeddings,
                            at::Tensor& own_sum_grads) {
    check_launch(cuda::launch_backward_rows(cuda::problem_of(c), blk.first, blk.count,
                                            cross.data_ptr(), own_terms.data_ptr(),
                                            grad_embeddings.data_ptr(), own_sum_grads.data_ptr(),
                                            current_stream()),
                 "backward_rows");
  }

  static void finalize(const Context& c, at::Tensor& grad_sums, const at::Tensor& own_sum_grads,
                       at::Tensor& grad_embeddings, const at::Tensor& dw_part,
                       const at::Tensor& db_part, at::Tensor& grad_w, at::Tensor& grad_b) {
    check_launch(cuda::launch_finalize(cuda::problem_of(c), grad_sums.data_ptr(),
                                       own_sum_grads.data_ptr(), grad_embeddings.data_ptr(),
                                       dw_part.data_ptr(), db_part.data_ptr(), grad_w.data_ptr(),
                                       grad_b.data_ptr(), current_stream()),
                 "finalize");
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& embeddings, const c10::optional<at::Tensor>& sums, const at::Tensor& w,
    const at::Tensor& b, int64_t speaker_offset, c10::string_view loss_method,
    c10::optional<double> min_cosine, int64_t block_speakers) {
  const c10::cuda::CUDAGuard guard(embeddings.device());
  return forward<CudaKernels>(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine,
                              block_speakers);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& embeddings,
    const c10::optional<at::Tensor>& sums, const at::Tensor& w, const at::Tensor& b,
    const at::Tensor& row_stat, const at::Tensor& hardest, int64_t speaker_offset,
    c10::string_view loss_method, c10::optional<double> min_cosine, int64_t block_speakers) {
  const c10::cuda::CUDAGuard guard(embeddings.device());
  return backward<CudaKernels>(grad_loss, embeddings, sums, w, b, row_stat, hardest,
                               speaker_offset, loss_method, min_cosine, block_speakers);
}

}  // namespace
}  // namespace ge2e

TORCH_LIBRARY_IMPL(ge2e_ext, CUDA, m) {
  m.impl("ge2e_forward", &ge2e::forward_cuda);
  m.impl("ge2e_backward", &ge2e::backward_cuda);
}
