// Launchers of the CUDA kernels (ge2e_cuda_kernels.cu), in plain C++ types so
// that the .cu includes only the CUDA runtime and ge2e_math.h (nvcc compiles
// it in seconds; torch/extension.h would cost minutes per file). The ATen glue
// in ge2e_cuda.cpp checks the tensors and passes their pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ge2e_cuda_problem.h"

namespace ge2e {
namespace cuda {

// out[k] = 1/|rows_k| (0 for a zero row); rows (n, dim) of the accumulation type.
cudaError_t launch_inverse_norms(bool is_double, const void* rows, int64_t n, int64_t dim,
                                 void* out, cudaStream_t stream);

// Speakers [first, first + count): losses, row statistics and hardest impostors
// from dots (count*M, K) = e_r . s_k.
cudaError_t launch_forward_rows(const Problem& p, int64_t first, int64_t count, const void* dots,
                                void* loss, void* row_stat, int64_t* hardest,
                                cudaStream_t stream);

// Overwrites dots with H_rk = h_rk / (|e_r||s_k|); writes the own terms
// (kOwnTermsSize per row), dw_part and db_part per row.
cudaError_t launch_similarity_grads(const Problem& p, int64_t first, int64_t count, void* dots,
                                    const void* grad_loss, const void* row_stat,
                                    const int64_t* hardest, void* own_terms, void* dw_part,
                                    void* db_part, cudaStream_t stream);

// Row gradients from cross (count*M, D) = H S and the own terms; per-speaker q sums.
cudaError_t launch_backward_rows(const Problem& p, int64_t first, int64_t count,
                                 const void* cross, const void* own_terms, void* grad_embeddings,
                                 void* own_sum_grads, cudaStream_t stream);

// grad_sums (holding Z = sum H^T E) becomes dLoss/ds; folded into
// grad_embeddings when !sums_given; grad_w, grad_b from the row partials.
cudaError_t launch_finalize(const Problem& p, void* grad_sums, const void* own_sum_grads,
                            void* grad_embeddings, const void* dw_part, const void* db_part,
                            void* grad_w, void* grad_b, cudaStream_t stream);

}  // namespace cuda
}  // namespace ge2e
