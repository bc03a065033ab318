// Launchers of the CUDA kernels (ge2e_cuda_kernels.cuh): dtype dispatch, grid
// sizes, the current stream, and the launch error of every kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ge2e_cuda.h"
#include "ge2e_cuda_kernels.cuh"

namespace ge2e {
namespace cuda {
namespace {

// Calls fn(scalar_t{}, acc_t{}) for the embeddings' dtype.
template <typename Fn>
cudaError_t dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float(), float());
    case DType::kFloat64: return fn(double(), double());
    case DType::kFloat16: return fn(__half(), float());
    case DType::kBFloat16: return fn(__nv_bfloat16(), float());
  }
  return cudaErrorInvalidValue;
}

dim3 grid_of(int64_t blocks) { return dim3(static_cast<unsigned int>(blocks)); }

}  // namespace

cudaError_t launch_inverse_norms(bool is_double, const void* rows, int64_t n, int64_t dim,
                                 void* out, cudaStream_t stream) {
  if (is_double) {
    inverse_norms_kernel<double><<<grid_of(n), kThreads, 0, stream>>>(
        static_cast<const double*>(rows), dim, static_cast<double*>(out));
  } else {
    inverse_norms_kernel<float><<<grid_of(n), kThreads, 0, stream>>>(
        static_cast<const float*>(rows), dim, static_cast<float*>(out));
  }
  return cudaGetLastError();
}

cudaError_t launch_forward_rows(const Problem& p, int64_t first, int64_t count, const void* dots,
                                void* loss, void* row_stat, int64_t* hardest,
                                cudaStream_t stream) {
  return dispatch(p.dtype, [&](auto scalar_zero, auto acc_zero) {
    using scalar_t = decltype(scalar_zero);
    using acc_t = decltype(acc_zero);
    forward_rows_kernel<scalar_t, acc_t><<<grid_of(count * p.utterances), kThreads, 0, stream>>>(
        p, first, static_cast<const acc_t*>(dots), static_cast<acc_t*>(loss),
        static_cast<acc_t*>(row_stat), hardest);
    return cudaGetLastError();
  });
}

cudaError_t launch_similarity_grads(const Problem& p, int64_t first, int64_t count, void* dots,
                                    const void* grad_loss, const void* row_stat,
                                    const int64_t* hardest, void* own_terms, void* dw_part,
                                    void* db_part, cudaStream_t stream) {
  return dispatch(p.dtype, [&](auto scalar_zero, auto acc_zero) {
    using scalar_t = decltype(scalar_zero);
    using acc_t = decltype(acc_zero);
    similarity_grads_kernel<scalar_t, acc_t><<<grid_of(count * p.utterances), kThreads, 0,
                                                  stream>>>(
        p, first, static_cast<acc_t*>(dots), static_cast<const acc_t*>(grad_loss),
        static_cast<const acc_t*>(row_stat), hardest, static_cast<acc_t*>(own_terms),
        static_cast<acc_t*>(dw_part), static_cast<acc_t*>(db_part));
    return cudaGetLastError();
  });
}

cudaError_t launch_backward_rows(const Problem& p, int64_t first, int64_t count,
                                 const void* cross, const void* own_terms, void* grad_embeddings,
                                 void* own_sum_grads, cudaStream_t stream) {
  return dispatch(p.dtype, [&](auto scalar_zero, auto acc_zero) {
    using scalar_t = decltype(scalar_zero);
    using acc_t = decltype(acc_zero);
    backward_rows_kernel<scalar_t, acc_t><<<grid_of(count), kThreads, 0, stream>>>(
        p, first, static_cast<const acc_t*>(cross), static_cast<const acc_t*>(own_terms),
        static_cast<scalar_t*>(grad_embeddings), static_cast<acc_t*>(own_sum_grads));
    return cudaGetLastError();
  });
}

cudaError_t launch_finalize(const Problem& p, void* grad_sums, const void* own_sum_grads,
                            void* grad_embeddings, const void* dw_part, const void* db_part,
                            void* grad_w, void* grad_b, cudaStream_t stream) {
  return dispatch(p.dtype, [&](auto scalar_zero, auto acc_zero) {
    using scalar_t = decltype(scalar_zero);
    using acc_t = decltype(acc_zero);
    finalize_kernel<scalar_t, acc_t><<<grid_of(p.total_speakers + 1), kThreads, 0, stream>>>(
        p, static_cast<acc_t*>(grad_sums), static_cast<const acc_t*>(own_sum_grads),
        static_cast<scalar_t*>(grad_embeddings), static_cast<const acc_t*>(dw_part),
        static_cast<const acc_t*>(db_part), static_cast<acc_t*>(grad_w),
        static_cast<acc_t*>(grad_b));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace ge2e
