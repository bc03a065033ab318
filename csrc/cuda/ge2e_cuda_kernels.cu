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

int launch_row_gradients(const Problem& p, Block blk, const void* t_rows, const void* z_to_fold,
                         void* grad, Stream stream, const char** failed) {
  return Gpu::row_gradients(p, blk, t_rows, z_to_fold, grad, stream, failed);
}

int launch_split_speaker_others(const Problem& p, Block speaker, void* q_sums, void* grad,
                                Stream stream, const char** failed) {
  return Gpu::split_speaker_others(p, speaker, q_sums, grad, stream, failed);
}

int launch_fold(const Problem& p, const void* z, void* grad, Stream stream, const char** failed) {
  return Gpu::fold(p, z, grad, stream, failed);
}

int launch_finish(const Problem& p, void* z, const void* w_part, const void* b_part,
                  const void* loss_rows, double loss_scale, void* grad_w, void* grad_b,
                  void* loss_total, Stream stream, const char** failed) {
  return Gpu::finish(p, z, w_part, b_part, loss_rows, loss_scale, grad_w, grad_b, loss_total,
                     stream, failed);
}

}  // namespace cuda
}  // namespace ge2e
