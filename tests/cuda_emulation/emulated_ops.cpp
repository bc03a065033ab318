// The CUDA kernels of csrc/cuda/ge2e_cuda_kernels.cuh run on the CPU under
// emulate.h, launched by the same Launchers (grids, dispatch) as on the GPU,
// behind the same driver (blocks, matrix products), and registered as
// ge2e_emu::ge2e_forward / ge2e_backward / ge2e_forward_backward.
// tests/test_cuda_emulated.py compares them with the CPU kernel and counts
// their launches (ge2e_emu::kernel_launches).
#include "emulate.h"  // first: its macros stand in for CUDA's keywords

#include <torch/library.h>

#include <atomic>

#include "../../csrc/cuda/ge2e_cuda_kernels.cuh"
#include "../../csrc/ge2e_driver.h"
#include "../../csrc/ge2e_schema.h"

namespace {

using ge2e::Block;
using ge2e::Problem;
using ge2e::RowBuffers;
using ge2e::RowPass;

std::atomic<int64_t> launches{0};

struct EmulatedLaunch {
  template <typename... Params, typename... Args>
  static int run(void (*kernel)(Params...), int64_t blocks, int threads, ge2e::cuda::Stream,
                 Args... args) {
    if (blocks == 0) return 0;
    ++launches;
    ge2e_emulation::launch(blocks, threads, [=] { kernel(args...); },
                           reinterpret_cast<const void*>(kernel));
    return 0;
  }
};

using Emulated = ge2e::cuda::Launchers<EmulatedLaunch>;

// The CUDA device of csrc/cuda/ge2e_cuda.cpp, with emulated launches.
struct EmulatedDevice : ge2e::cuda::BlockPolicy {
  static void speaker_stats(const Problem& p) {
    const char* failed;
    Emulated::speaker_stats(p, nullptr, &failed);
  }
  template <class Method>
  static void rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk,
                   void* cosines) {
    const char* failed;
    Emulated::rows(p, rb, pass, blk, cosines, nullptr, &failed);
  }
  template <class Method>
  static void row_gradients(const Problem& p, Block blk, const void* t_rows, const void*,
                            const int64_t*, const void* z_to_fold, void* grad) {
    const char* failed;
    Emulated::row_gradients(p, blk, t_rows, z_to_fold, grad, nullptr, &failed);
  }
  static void split_speaker_others(const Problem& p, Block speaker, void* q_sums, void* grad) {
    const char* failed;
    Emulated::split_speaker_others(p, speaker, q_sums, grad, nullptr, &failed);
  }
  static void fold(const Problem& p, const void* z, void* grad) {
    const char* failed;
    Emulated::fold(p, z, grad, nullptr, &failed);
  }
  static void finish(const Problem& p, void* z, const void* w_part, const void* b_part,
                     const void* loss_rows, double loss_scale, void* grad_w, void* grad_b,
                     void* loss_total) {
    const char* failed;
    Emulated::finish(p, z, w_part, b_part, loss_rows, loss_scale, grad_w, grad_b, loss_total,
                     nullptr, &failed);
  }
};

// The rows per block the driver takes with the CUDA device's policy, for a
// (rows, D) input of `dtype` with `speakers` local speakers among
// `total_speakers` (tests check the step's allocations against the bound).
int64_t block_rows(int64_t rows, int64_t speakers, int64_t total_speakers, int64_t dim,
                   at::ScalarType dtype) {
  ge2e::Call c;
  Problem& p = c.problem;
  p.total_rows = rows;
  p.speakers = speakers;
  p.total_speakers = total_speakers;
  p.dim = dim;
  c.embeddings = at::empty({0}, at::TensorOptions().dtype(dtype));
  c.sums = at::empty({0}, at::TensorOptions().dtype(ge2e::accumulation_type(dtype)));
  return ge2e::rows_per_block<EmulatedDevice>(c);
}

// Kernel launches since the last call (and resets the count).
int64_t kernel_launches() { return launches.exchange(0); }

}  // namespace

TORCH_LIBRARY(ge2e_emu, m) {
  m.def(ge2e::kForwardSchema);
  m.def(ge2e::kBackwardSchema);
  m.def(ge2e::kForwardBackwardSchema);
  m.def("kernel_launches() -> int", &kernel_launches);
  m.def("block_rows(int rows, int speakers, int total_speakers, int dim, ScalarType dtype) -> int",
        &block_rows);
}

TORCH_LIBRARY_IMPL(ge2e_emu, CPU, m) {
  m.impl("ge2e_forward", &ge2e::forward<EmulatedDevice>);
  m.impl("ge2e_backward", &ge2e::backward<EmulatedDevice>);
  m.impl("ge2e_forward_backward", &ge2e::forward_backward<EmulatedDevice>);
}
