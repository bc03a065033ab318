// The CUDA device of the GE2E op: the Device policy of ge2e_driver.h over the
// launchers of ge2e_cuda_kernels.cu (on the current stream, every launch
// checked), and the op registrations for the CUDA dispatch key. The loss
// method reaches the launchers as p.method and becomes a type there (nvcc
// compiles the kernels apart from ATen).
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../ge2e_driver.h"
#include "ge2e_cuda_kernels.cuh"

namespace ge2e {
namespace {

void check(int error, const char* kernel) {
  TORCH_CHECK(error != cuda::kGridTooLarge, "ge2e_ext: CUDA kernel ",
              kernel ? kernel : "(unknown)", " would need a grid of more than 2^31 - 1 blocks "
              "(CUDA's limit in x); split the batch into fewer rows");
  TORCH_CHECK(error == 0, "ge2e_ext: CUDA kernel ", kernel ? kernel : "(unknown)",
              " failed to launch: ", cudaGetErrorString(static_cast<cudaError_t>(error)));
}

cuda::Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct CudaDevice : cuda::BlockPolicy {
  static void speaker_stats(const Problem& p) {
    const char* failed = nullptr;
    check(cuda::launch_speaker_stats(p, current_stream(), &failed), failed);
  }

  static void rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk,
                   void* cosines) {
    const char* failed = nullptr;
    check(cuda::launch_rows(p, rb, pass, blk, cosines, current_stream(), &failed), failed);
  }

  static void sparse_sum_grads(const Problem& p, Block blk, const void* cosines,
                               const int64_t* hardest, void* z, bool accumulate) {
    const char* failed = nullptr;
    check(cuda::launch_sparse_sum_grads(p, blk, cosines, hardest, z, accumulate,
                                        current_stream(), &failed),
          failed);
  }

  static void row_gradients(const Problem& p, Block blk, bool sparse, const void* t_rows,
                            const void* cosines, const int64_t* hardest, const void* z_to_fold,
                            void* grad, bool others, const FinishArgs* finish) {
    const char* failed = nullptr;
    check(cuda::launch_row_gradients(p, blk, sparse, t_rows, cosines, hardest, z_to_fold, grad,
                                     others, finish, current_stream(), &failed),
          failed);
  }

  static void fold(const Problem& p, const void* z, void* grad, const FinishArgs* finish) {
    const char* failed = nullptr;
    check(cuda::launch_fold(p, z, grad, finish, current_stream(), &failed), failed);
  }

  static void unit_rows(const Problem& p, const void* in, void* out, void* norms) {
    const char* failed = nullptr;
    check(cuda::launch_unit_rows(p, in, out, norms, current_stream(), &failed), failed);
  }

  static void unit_row_grads(const Problem& p, const void* in, const void* norms, void* grad) {
    const char* failed = nullptr;
    check(cuda::launch_unit_row_grads(p, in, norms, grad, current_stream(), &failed), failed);
  }
};

}  // namespace
}  // namespace ge2e

TORCH_LIBRARY_IMPL(ge2e_ext, CUDA, m) { ge2e::register_kernel_ops<ge2e::CudaDevice>(m); }
