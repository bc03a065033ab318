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

// A launcher's error as the CUDA device reports it (csrc/cuda/ge2e_cuda.cpp).
void check(int error, const char* kernel) {
  TORCH_CHECK(error != ge2e::cuda::kGridTooLarge, "ge2e_ext: CUDA kernel ",
              kernel ? kernel : "(unknown)", " would need a grid of more than 2^31 - 1 blocks "
              "(CUDA's limit in x); split the batch into fewer rows");
  TORCH_CHECK(error == 0, "ge2e_ext: emulated kernel ", kernel ? kernel : "(unknown)",
              " failed: ", error);
}

// The ATen float32 matmul precision (CUDA) seen by the last row-kernel launch:
// the products run between that launch and the previous one.
std::string precision_at_rows = "none";

// The CUDA device of csrc/cuda/ge2e_cuda.cpp, with emulated launches.
struct EmulatedDevice : ge2e::cuda::BlockPolicy {
  static void speaker_stats(const Problem& p) {
    const char* failed = nullptr;
    check(Emulated::speaker_stats(p, nullptr, &failed), failed);
  }
  static void rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk,
                   void* cosines) {
    precision_at_rows = at::precision2str(at::globalContext().float32Precision(
        at::Float32Backend::CUDA, at::Float32Op::MATMUL));
    const char* failed = nullptr;
    check(Emulated::rows(p, rb, pass, blk, cosines, nullptr, &failed), failed);
  }
  static void sparse_sum_grads(const Problem& p, Block blk, const void* cosines,
                               const int64_t* hardest, void* z, bool accumulate) {
    const char* failed = nullptr;
    check(Emulated::sparse_sum_grads(p, blk, cosines, hardest, z, accumulate, nullptr, &failed),
          failed);
  }
  static void row_gradients(const Problem& p, Block blk, bool sparse, const void* t_rows,
                            const void* cosines, const int64_t* hardest, const void* z_to_fold,
                            void* grad, bool others, const ge2e::FinishArgs* finish) {
    const char* failed = nullptr;
    check(Emulated::row_gradients(p, blk, sparse, t_rows, cosines, hardest, z_to_fold, grad,
                                  others, finish, nullptr, &failed),
          failed);
  }
  static void fold(const Problem& p, const void* z, void* grad, const ge2e::FinishArgs* finish) {
    const char* failed = nullptr;
    check(Emulated::fold(p, z, grad, finish, nullptr, &failed), failed);
  }
  static void unit_rows(const Problem& p, const void* in, void* out, void* norms) {
    const char* failed = nullptr;
    check(Emulated::unit_rows(p, in, out, norms, nullptr, &failed), failed);
  }
  static void unit_row_grads(const Problem& p, const void* in, const void* norms, void* grad) {
    const char* failed = nullptr;
    check(Emulated::unit_row_grads(p, in, norms, grad, nullptr, &failed), failed);
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

// What the launchers say of a grid of `blocks` blocks: 0 (it fits) or
// kGridTooLarge, without launching (a grid that large cannot be allocated here).
int64_t grid_check(int64_t blocks) {
  return ge2e::cuda::grid_fits(blocks) ? 0 : ge2e::cuda::kGridTooLarge;
}

// The launch of a kernel on a grid of `blocks` blocks through the launchers
// (the row-gradient kernel of a fake problem, which a grid that fits would run;
// only grids that do not fit are passed here): raises as the CUDA device does.
void launch_with_grid(int64_t blocks) {
  TORCH_CHECK(!ge2e::cuda::grid_fits(blocks), "launch_with_grid takes grids that do not fit");
  Problem p{};
  p.dtype = ge2e::DType::kFloat32;
  const Block blk{0, blocks, 0, 0};
  const char* failed = nullptr;
  check(Emulated::row_gradients(p, blk, false, nullptr, nullptr, nullptr, nullptr, nullptr,
                                false, nullptr, nullptr, &failed),
        failed);
}

std::string matmul_precision_at_rows() { return precision_at_rows; }

}  // namespace

TORCH_LIBRARY(ge2e_emu, m) {
  m.def(ge2e::kForwardSchema);
  m.def(ge2e::kBackwardSchema);
  m.def(ge2e::kForwardBackwardSchema);
  m.def(ge2e::kSetBlockSpeakersSchema, &ge2e::set_block_speakers_for_tests);
  m.def("kernel_launches() -> int", &kernel_launches);
  m.def("block_rows(int rows, int speakers, int total_speakers, int dim, ScalarType dtype) -> int",
        &block_rows);
  m.def("grid_check(int blocks) -> int", &grid_check);
  m.def("launch_with_grid(int blocks) -> ()", &launch_with_grid);
  m.def("matmul_precision_at_rows() -> str", &matmul_precision_at_rows);
}

TORCH_LIBRARY_IMPL(ge2e_emu, CPU, m) { ge2e::register_kernel_ops<EmulatedDevice>(m); }
