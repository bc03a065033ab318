// One call of the GE2E op as the CUDA kernels see it: plain pointers and
// sizes, no CUDA or ATen types (the CPU emulation of the kernels includes it).
#pragma once

#include <cstdint>

namespace ge2e {
namespace cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// One call's inputs. Pointers are device pointers; the accumulation type
// (float, or double for kFloat64 embeddings) is that of sums, inv_sums, w, b
// and every buffer below except grad_embeddings (the embeddings' dtype).
struct Problem {
  DType dtype;
  const void* embeddings;  // (N, M, D)
  const void* sums;        // (K, D)
  const void* inv_sums;    // (K,)
  const void* w;           // 0-dim, the raw w (clamped in the kernels)
  const void* b;
  int64_t num_speakers, utterances, dim, total_speakers, speaker_offset;
  int method;  // ge2e::LossMethod
  bool clamp;
  double min_cosine;
  bool sums_given;
};

}  // namespace cuda
}  // namespace ge2e
