// The Problem (plain pointers and sizes) of one call's Context: shared by the
// CUDA glue and the CPU emulation of the CUDA kernels (tests/cuda_emulation).
#pragma once

#include "../ge2e_driver.h"
#include "ge2e_cuda_problem.h"

namespace ge2e {
namespace cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "ge2e_ext: unsupported embeddings dtype ", t.scalar_type());
  }
}

inline Problem problem_of(const Context& c) {
  Problem p;
  p.dtype = dtype_of(c.embeddings);
  p.embeddings = c.embeddings.data_ptr();
  p.sums = c.sums.data_ptr();
  p.inv_sums = c.inv_sums.data_ptr();
  p.w = c.w.data_ptr();
  p.b = c.b.data_ptr();
  p.num_speakers = c.num_speakers;
  p.utterances = c.utterances;
  p.dim = c.dim;
  p.total_speakers = c.total_speakers;
  p.speaker_offset = c.speaker_offset;
  p.method = c.method;
  p.clamp = c.clamp;
  p.min_cosine = c.min_cosine;
  p.sums_given = c.sums_given;
  return p;
}

}  // namespace cuda
}  // namespace ge2e
