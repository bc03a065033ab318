// The CUDA kernels of ge2e_cuda_kernels.cuh launched on the GPU: the Launch
// policy of its Launchers, and the launchers that the CUDA device
// (ge2e_cuda.cpp) calls. Includes only the CUDA runtime and the math headers
// (nvcc compiles it in seconds; ATen would cost minutes).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ge2e_cuda_kernels.cuh"

namespace ge2e {
namespace cuda {
namespace {

struct CudaLaunch {
  template <typename... Params, typename... Args>
  static int run(void (*kernel)(Params...), int64_t blocks, int threads, Stream stream,
                 Args... args) {
    if (blocks == 0) return cudaSuccess;
    // The Launchers checked blocks against kMaxGridX: the cast cannot truncate.
    kernel<<<dim3(static_cast<unsigned int>(blocks)), threads, 0,
             static_cast<cudaStream_t>(stream)>>>(args...);
    return cudaGetLastError();
  }
};

using Gpu = Launchers<CudaLaunch>;

}  // namespace

int launch_speaker_stats(const Problem& p, Stream stream, const char** failed) {
  return Gpu::speaker_stats(p, stream, failed);
}

int launch_rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk, void* cosines,
                Stream stream, const char** failed) {
  return Gpu::rows(p, rb, pass, blk, cosines, stream, failed);
}

int launch_sparse_sum_grads(const Problem& p, Block blk, const void* cosines,
                            const int64_t* hardest, void* z, bool accumulate, Stream stream,
                            const char** failed) {
  return Gpu::sparse_sum_grads(p, blk, cosines, hardest, z, accumulate, stream, failed);
}

int launch_row_gradients(const Problem& p, Block blk, bool sparse, const void* t_rows,
                         const void* cosines, const int64_t* hardest, const void* z_to_fold,
                         void* grad, bool others, const FinishArgs* finish, Stream stream,
                         const char** failed) {
  return Gpu::row_gradients(p, blk, sparse, t_rows, cosines, hardest, z_to_fold, grad, others,
                            finish, stream, failed);
}

int launch_fold(const Problem& p, const void* z, void* grad, const FinishArgs* finish,
                Stream stream, const char** failed) {
  return Gpu::fold(p, z, grad, finish, stream, failed);
}

int launch_unit_rows(const Problem& p, const void* in, void* out, void* norms, Stream stream,
                     const char** failed) {
  return Gpu::unit_rows(p, in, out, norms, stream, failed);
}

int launch_unit_row_grads(const Problem& p, const void* in, const void* norms, void* grad,
                          Stream stream, const char** failed) {
  return Gpu::unit_row_grads(p, in, norms, grad, stream, failed);
}

}  // namespace cuda
}  // namespace ge2e
