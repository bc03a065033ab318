// The CUDA device of the GE2E op: the Device policy of ge2e_driver.h over the
// launchers of ge2e_cuda_kernels.cu (on the current stream, every launch
// checked), and the op registrations for the CUDA dispatch key. The loss
// method reaches the launchers as p.method and becomes a type again there
// (nvcc compiles the kernels apart from ATen).
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../ge2e_driver.h"
#include "ge2e_cuda_kernels.cuh"

namespace ge2e {
namespace {

void check(int error, const char* kernel) {
  TORCH_CHECK(error == 0, "ge2e_ext: CUDA kernel ", kernel ? kernel : "(unknown)",
              " failed to launch: ", cudaGetErrorString(static_cast<cudaError_t>(error)));
}

cuda::Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct CudaDevice : cuda::BlockPolicy {
  static void speaker_stats(const Problem& p) {
    const char* failed = nullptr;
    check(cuda::launch_speaker_stats(p, current_stream(), &failed), failed);
  }

  template <class Method>
  static void rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk,
                   void* cosines) {
    const char* failed = nullptr;
    check(cuda::launch_rows(p, rb, pass, blk, cosines, current_stream(), &failed), failed);
  }

  template <class Method>
  static void row_gradients(const Problem& p, Block blk, const void* t_rows, const void*,
                            const int64_t*, const void* z_to_fold, void* grad) {
    const char* failed = nullptr;
    check(cuda::launch_row_gradients(p, blk, t_rows, z_to_fold, grad, current_stream(), &failed),
          failed);
  }

  static void split_speaker_others(const Problem& p, Block speaker, void* q_sums, void* grad) {
    const char* failed = nullptr;
    check(cuda::launch_split_speaker_others(p, speaker, q_sums, grad, current_stream(), &failed),
          failed);
  }

  static void fold(const Problem& p, const void* z, void* grad) {
    const char* failed = nullptr;
    check(cuda::launch_fold(p, z, grad, current_stream(), &failed), failed);
  }

  static void finish(const Problem& p, void* z, const void* w_part, const void* b_part,
                     const void* loss_rows, double loss_scale, void* grad_w, void* grad_b,
                     void* loss_total) {
    const char* failed = nullptr;
    check(cuda::launch_finish(p, z, w_part, b_part, loss_rows, loss_scale, grad_w, grad_b,
                              loss_total, current_stream(), &failed),
          failed);
  }
};

}  // namespace
}  // namespace ge2e

TORCH_LIBRARY_IMPL(ge2e_ext, CUDA, m) {
  m.impl("ge2e_forward", &ge2e::forward<ge2e::CudaDevice>);
  m.impl("ge2e_backward", &ge2e::backward<ge2e::CudaDevice>);
  m.impl("ge2e_forward_backward", &ge2e::forward_backward<ge2e::CudaDevice>);
}
