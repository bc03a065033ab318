// A small emulation of CUDA's execution model on the CPU, enough to run
// csrc/cuda/ge2e_cuda_kernels.cuh unchanged (its GE2E_CUDA_EMULATION part): a
// block's threads are real threads (one block at a time, so __shared__ can be
// a function-static), __syncthreads is a barrier over the block, and a warp
// shuffle goes through a per-warp buffer between two warp barriers. It checks the kernels' indexing and
// reductions; it says nothing of the GPU's memory model or speed.
#pragma once

// Selects the kernels' part of ge2e_cuda_kernels.cuh.
#define GE2E_CUDA_EMULATION 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct EmulatedDim3 {
  unsigned int x = 0, y = 0, z = 0;
};

namespace ge2e_emulation {

constexpr int kWarpSize = 32;

// The state one block's threads share.
struct Block {
  explicit Block(int threads)
      : barrier(threads),
        warps((threads + kWarpSize - 1) / kWarpSize),
        lanes(static_cast<size_t>(warps) * kWarpSize * 16) {
    for (int w = 0; w < warps; ++w) {
      const int size = std::min(kWarpSize, threads - w * kWarpSize);
      warp_barriers.emplace_back(std::make_unique<std::barrier<>>(size));
    }
  }
  std::barrier<> barrier;
  int warps;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<unsigned char> lanes;  // 16 bytes per lane for shuffles
};

inline thread_local Block* current_block = nullptr;

}  // namespace ge2e_emulation

inline thread_local EmulatedDim3 threadIdx;
inline thread_local EmulatedDim3 blockIdx;
inline thread_local EmulatedDim3 blockDim;

inline void __syncthreads() { ge2e_emulation::current_block->barrier.arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned int /*mask*/, T value, int offset) {
  static_assert(sizeof(T) <= 16, "shuffle of a type larger than the lane buffer");
  auto* block = ge2e_emulation::current_block;
  const int lane = threadIdx.x % ge2e_emulation::kWarpSize;
  const int warp = threadIdx.x / ge2e_emulation::kWarpSize;
  unsigned char* lanes = block->lanes.data() + warp * ge2e_emulation::kWarpSize * 16;
  std::memcpy(lanes + lane * 16, &value, sizeof(T));
  block->warp_barriers[warp]->arrive_and_wait();
  const int source = lane + offset < ge2e_emulation::kWarpSize ? lane + offset : lane;
  T result;
  std::memcpy(&result, lanes + source * 16, sizeof(T));
  block->warp_barriers[warp]->arrive_and_wait();
  return result;
}

namespace ge2e_emulation {

// Runs kernel() as grid blocks of `threads` threads, one block after another
// on one set of threads (a barrier between blocks keeps __shared__ to one block).
template <typename Kernel>
void launch(int64_t grid, int threads, Kernel kernel) {
  Block block(threads);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      current_block = &block;
      threadIdx.x = static_cast<unsigned int>(t);
      blockDim.x = static_cast<unsigned int>(threads);
      for (int64_t b = 0; b < grid; ++b) {
        blockIdx.x = static_cast<unsigned int>(b);
        kernel();
        block.barrier.arrive_and_wait();
      }
    });
  }
  for (auto& w : workers) w.join();
}

}  // namespace ge2e_emulation

// Stand-ins for cuda_fp16.h / cuda_bf16.h with the same rounding (to
// nearest even), through c10's conversions: the emulated kernels run float16
// and bfloat16 inputs too.
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};
inline float __half2float(__half h) { return c10::detail::fp16_ieee_to_fp32_value(h.bits); }
inline __half __float2half_rn(float x) { return __half{c10::detail::fp16_ieee_from_fp32_value(x)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return c10::detail::f32_from_bits(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  return __nv_bfloat16{c10::detail::round_to_nearest_even(x)};
}
