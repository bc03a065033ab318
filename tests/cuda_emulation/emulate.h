// An emulation of CUDA's execution model on the CPU, enough to run
// csrc/cuda/ge2e_cuda_kernels.cuh unchanged (its GE2E_CUDA_EMULATION part).
//
// - A block's threads are real threads; __syncthreads is a barrier over the
//   block, and a warp shuffle goes through a per-warp buffer and a warp barrier
//   (so ThreadSanitizer sees a missing __syncthreads as a data race between the
//   block's threads: scripts/sanitize.sh).
// - Blocks run one at a time, so __shared__ is a function-static; its memory is
//   filled with 0xff bytes (NaN in every floating type, -1 in signed integers)
//   before every block, as a GPU leaves a block's shared memory holding
//   another's garbage. That needs each __shared__ variable's address:
//   tests/cuda_emulation/build.py compiles a copy of the sources in which each
//   `__shared__ T name[...];` is followed by GE2E_EMU_SHARED(name), which
//   registers it.
// - The blocks of a grid run in forward, reverse or shuffled order (a kernel
//   may not depend on the order): GE2E_EMU_BLOCK_ORDER=forward|reverse|shuffled
//   (default: shuffled, a new permutation for every launch, from a seed:
//   shuffled:SEED), or set_block_order() at run time.
// - A launch whose block is not whole warps (the kernels' full-mask shuffles
//   need that), or whose grid exceeds CUDA's 2^31 - 1 blocks in x, is refused
//   with an exception before any thread starts.
// - __threadfence and atomicAdd (unsigned int) are a sequentially consistent
//   fence and atomic.
// - GE2E_EMU_PLANT=barrier|oob plants a defect for the sanitizers to find: the
//   first __syncthreads of every block is skipped (a race, for TSan), or one
//   block past the end of the grid runs (its reads begin one past the end of
//   the arrays, for ASan).
//
// It checks the kernels' indexing, reductions, barriers and shared-memory
// initialization; it says nothing of the GPU's memory model, of blocks running
// at the same time, or of speed.
#pragma once

// Selects the kernels' part of ge2e_cuda_kernels.cuh.
#define GE2E_CUDA_EMULATION 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __align__(n) __attribute__((aligned(n)))
// A plain function-static (one block runs at a time); build.py's copy adds
// GE2E_EMU_SHARED(name) after each declaration so that it is poisoned.
#define __shared__ static
#define GE2E_EMU_SHARED(name)                                               \
  [[maybe_unused]] static const bool ge2e_emu_shared_registered_##name = \
      ::ge2e_emulation::register_shared(&(name), sizeof(name))

struct EmulatedDim3 {
  unsigned int x = 1, y = 1, z = 1;
};

namespace ge2e_emulation {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1, CUDA's limit in x
constexpr unsigned char kSharedFill = 0xff;

enum class BlockOrder { kForward, kReverse, kShuffled };
enum class Plant { kNone, kBarrier, kOutOfBounds };

// The emulation's settings and record (one per process: launches are serialized).
struct State {
  std::mutex launch_mutex;  // one launch at a time: __shared__ is a function-static
  std::mutex registry_mutex;
  std::vector<std::pair<void*, size_t>> shared;  // every registered __shared__ variable
  BlockOrder order = BlockOrder::kShuffled;
  uint64_t seed = 0;
  uint64_t launch_count = 0;
  std::vector<std::pair<int64_t, int64_t>> launch_log;  // (kernel, threads) per launch, until read
  State() {
    const char* order_env = std::getenv("GE2E_EMU_BLOCK_ORDER");
    if (order_env != nullptr && *order_env != '\0') set_order(order_env);
  }
  // "forward", "reverse", "shuffled" or "shuffled:SEED".
  void set_order(const std::string& spec) {
    const std::string name = spec.substr(0, spec.find(':'));
    if (name == "forward") {
      order = BlockOrder::kForward;
    } else if (name == "reverse") {
      order = BlockOrder::kReverse;
    } else if (name == "shuffled") {
      order = BlockOrder::kShuffled;
      seed = spec.size() > name.size() ? std::stoull(spec.substr(name.size() + 1)) : 0;
    } else {
      throw std::invalid_argument("GE2E_EMU_BLOCK_ORDER / block order: expected forward, "
                                  "reverse, shuffled or shuffled:SEED, got '" + spec + "'");
    }
    launch_count = 0;
  }
};

inline State& state() {
  static State s;
  return s;
}

inline Plant plant_from_env() {
  const char* plant = std::getenv("GE2E_EMU_PLANT");
  if (plant == nullptr || *plant == '\0' || std::strcmp(plant, "none") == 0) return Plant::kNone;
  if (std::strcmp(plant, "barrier") == 0) return Plant::kBarrier;
  if (std::strcmp(plant, "oob") == 0) return Plant::kOutOfBounds;
  throw std::invalid_argument(std::string("GE2E_EMU_PLANT: expected none, barrier or oob, got '") +
                              plant + "'");
}

// Called once per __shared__ variable, by the first thread that passes its
// declaration (a guarded static initialization: the other threads wait), so
// it is poisoned before any thread touches it.
inline bool register_shared(void* address, size_t bytes) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.registry_mutex);
  s.shared.emplace_back(address, bytes);
  std::memset(address, kSharedFill, bytes);
  return true;
}

inline void poison_shared() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.registry_mutex);
  for (const auto& [address, bytes] : s.shared) std::memset(address, kSharedFill, bytes);
}

// The order in which a launch runs its blocks.
inline std::vector<int64_t> block_order(int64_t grid) {
  State& s = state();
  std::vector<int64_t> order(static_cast<size_t>(grid));
  for (int64_t b = 0; b < grid; ++b) order[b] = b;
  if (s.order == BlockOrder::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (s.order == BlockOrder::kShuffled) {
    // A new permutation for every launch, the same sequence for the same seed.
    std::mt19937_64 random(s.seed * 0x9e3779b97f4a7c15ull + s.launch_count);
    for (int64_t b = grid - 1; b > 0; --b) {  // Fisher-Yates, independent of the library
      std::swap(order[b], order[random() % static_cast<uint64_t>(b + 1)]);
    }
  }
  return order;
}

// The state one block's threads share.
struct Block {
  explicit Block(int threads) : barrier(threads), warps(threads / kWarpSize) {
    for (int w = 0; w < warps; ++w) {
      warp_barriers.emplace_back(std::make_unique<std::barrier<>>(kWarpSize));
    }
    lanes.resize(static_cast<size_t>(warps) * 2 * kWarpSize * kLaneBytes);
  }
  static constexpr int kLaneBytes = 16;
  std::barrier<> barrier;
  int warps;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  // Two buffers per warp, used in turn by successive shuffles: a lane writes
  // one, waits for the warp, reads it; the next shuffle writes the other, so
  // a buffer is written again only after every lane has passed the barrier
  // that follows its reads.
  std::vector<unsigned char> lanes;
};

inline thread_local Block* current_block = nullptr;
inline thread_local unsigned shuffle_parity = 0;
inline thread_local int barriers_in_block = 0;
inline thread_local Plant current_plant = Plant::kNone;

}  // namespace ge2e_emulation

inline thread_local EmulatedDim3 threadIdx;
inline thread_local EmulatedDim3 blockIdx;
inline thread_local EmulatedDim3 blockDim;
inline thread_local EmulatedDim3 gridDim;

inline void __syncthreads() {
  using namespace ge2e_emulation;
  if (current_plant == Plant::kBarrier && ++barriers_in_block == 1) return;  // the planted race
  current_block->barrier.arrive_and_wait();
}

namespace ge2e_emulation {

[[noreturn]] inline void device_fault(const char* what) {
  // As a device-side fault ends a CUDA context: the other threads wait at a barrier.
  std::fprintf(stderr, "ge2e CUDA emulation: block %u thread %u: %s\n", blockIdx.x, threadIdx.x,
               what);
  std::abort();
}

// A warp shuffle: every lane of the warp (the full mask) publishes `value`,
// and gets the value of lane source(lane) (its own where that is outside the warp).
template <typename T, typename Source>
T shuffle(unsigned int mask, T value, Source source) {
  static_assert(sizeof(T) <= Block::kLaneBytes, "shuffle of a type larger than the lane buffer");
  if (mask != 0xffffffffu) device_fault("a warp shuffle with a partial mask is not emulated");
  Block* block = current_block;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  unsigned char* lanes =
      block->lanes.data() + (static_cast<size_t>(warp) * 2 + shuffle_parity) * kWarpSize *
                                Block::kLaneBytes;
  shuffle_parity ^= 1u;
  std::memcpy(lanes + lane * Block::kLaneBytes, &value, sizeof(T));
  block->warp_barriers[warp]->arrive_and_wait();
  const int from = source(lane);
  T result;
  std::memcpy(&result, lanes + (from >= 0 && from < kWarpSize ? from : lane) * Block::kLaneBytes,
              sizeof(T));
  return result;
}

}  // namespace ge2e_emulation

template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta) {
  return ge2e_emulation::shuffle(mask, value, [delta](int lane) { return lane + int(delta); });
}
template <typename T>
T __shfl_up_sync(unsigned int mask, T value, unsigned int delta) {
  return ge2e_emulation::shuffle(mask, value, [delta](int lane) { return lane - int(delta); });
}
template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask) {
  return ge2e_emulation::shuffle(mask, value, [lane_mask](int lane) { return lane ^ lane_mask; });
}
template <typename T>
T __shfl_sync(unsigned int mask, T value, int source_lane) {
  return ge2e_emulation::shuffle(mask, value, [source_lane](int) { return source_lane & 31; });
}

// The device primitives of the CUDA finish's last-block count: a fence and an
// atomic add on global memory (blocks run one at a time here, but the block's
// threads are real threads, so both are the real thing).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

namespace ge2e_emulation {

// Runs kernel() as grid blocks of `threads` threads, one block after another
// on one set of threads, in the configured order, with __shared__ poisoned
// before each block (a barrier between blocks keeps __shared__ to one block).
// `id` names the kernel in the launch log (its address, or null).
template <typename Kernel>
void launch(int64_t grid, int threads, Kernel kernel, const void* id = nullptr) {
  if (threads <= 0 || threads % kWarpSize != 0 || threads > kMaxThreadsPerBlock) {
    throw std::invalid_argument(
        "ge2e CUDA emulation: a block of " + std::to_string(threads) +
        " threads; expected whole warps (a multiple of 32) up to 1024");
  }
  if (grid < 0 || grid > kMaxGridX) {
    throw std::invalid_argument("ge2e CUDA emulation: a grid of " + std::to_string(grid) +
                                " blocks; CUDA's limit in x is 2^31 - 1");
  }
  const Plant plant = plant_from_env();
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  const std::vector<int64_t> order = block_order(grid);
  ++s.launch_count;
  s.launch_log.emplace_back(reinterpret_cast<int64_t>(id), threads);
  // The planted out-of-bounds defect: one block past the grid, as a grid
  // rounded up without the kernel's bounds check.
  const int64_t blocks = grid + (plant == Plant::kOutOfBounds ? 1 : 0);
  Block block(threads);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      current_block = &block;
      current_plant = plant;
      shuffle_parity = 0;
      threadIdx.x = static_cast<unsigned int>(t);
      blockDim.x = static_cast<unsigned int>(threads);
      gridDim.x = static_cast<unsigned int>(grid);
      for (int64_t i = 0; i < blocks; ++i) {
        if (t == 0) poison_shared();
        block.barrier.arrive_and_wait();  // the poison before anyone's first access
        blockIdx.x = static_cast<unsigned int>(i < grid ? order[i] : grid);
        barriers_in_block = 0;
        kernel();
        block.barrier.arrive_and_wait();  // the block ends before the next is poisoned
      }
    });
  }
  for (auto& w : workers) w.join();
}

// (kernel, threads per block) of each launch since the last call (and forgets them).
inline std::vector<std::pair<int64_t, int64_t>> take_launch_log() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  return std::exchange(s.launch_log, {});
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
