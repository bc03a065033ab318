// The emulation's own ops, next to the kernels' (emulated_ops.cpp): its block
// order, the threads per block of each launch, and small probe kernels that
// show what a kernel sees of the launch (shared memory before it is written,
// the order of the blocks, the refused configurations).
#include "emulate.h"  // first: its macros stand in for CUDA's keywords

#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

namespace {

// What thread 0 of each block reads from its __shared__ variables before any
// thread writes them (then it writes them, as a kernel's garbage for the next
// block), and in which order the blocks ran.
__global__ void probe_shared_kernel(double* seen, int64_t* ran, int64_t* next) {
  __shared__ float cell[3];
  __shared__ int flag;
  if (threadIdx.x == 0) {
    seen[blockIdx.x * 2] = cell[blockIdx.x % 3];
    seen[blockIdx.x * 2 + 1] = flag;
    ran[(*next)++] = blockIdx.x;
  }
  __syncthreads();
  if (threadIdx.x < 3) cell[threadIdx.x] = 1.0f;
  if (threadIdx.x == 0) flag = 7;
}

// (seen: grid x 2, float values read from __shared__ before a write; ran: grid,
// the blocks in the order they ran).
std::tuple<at::Tensor, at::Tensor> probe_shared(int64_t grid, int64_t threads) {
  auto seen = at::zeros({grid, 2}, at::kDouble);
  auto ran = at::full({grid}, -1, at::kLong);
  int64_t next = 0;
  double* seen_ptr = seen.data_ptr<double>();
  int64_t* ran_ptr = ran.data_ptr<int64_t>();
  ge2e_emulation::launch(grid, static_cast<int>(threads),
                         [=, &next] { probe_shared_kernel(seen_ptr, ran_ptr, &next); });
  return {seen, ran};
}

// A launch of an empty kernel: raises for a configuration the emulation refuses.
void probe_launch(int64_t grid, int64_t threads) {
  ge2e_emulation::launch(grid, static_cast<int>(threads), [] {});
}

void set_block_order(std::string order) { ge2e_emulation::state().set_order(order); }

// The kernels (an id each) and threads per block of the launches since the last call.
std::tuple<std::vector<int64_t>, std::vector<int64_t>> launch_log() {
  std::vector<int64_t> kernels, threads;
  for (const auto& [kernel, block_threads] : ge2e_emulation::take_launch_log()) {
    kernels.push_back(kernel);
    threads.push_back(block_threads);
  }
  return {kernels, threads};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ge2e_emu, m) {
  m.def("set_block_order(str order) -> ()", &set_block_order);
  m.def("launch_log() -> (int[], int[])", &launch_log);
  m.def("probe_launch(int grid, int threads) -> ()", &probe_launch);
  m.def("probe_shared(int grid, int threads) -> (Tensor, Tensor)", &probe_shared);
}
