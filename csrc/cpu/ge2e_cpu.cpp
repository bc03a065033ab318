// The CPU device of the GE2E op: the Device policy of ge2e_driver.h over the
// kernels of ge2e_cpu_kernels.h, run in parallel over speakers with
// at::parallel_for, and the op registrations for the CPU dispatch key.
//
// The kernels come as tables (ge2e_cpu_table.h): the portable one, compiled
// here for any CPU of the architecture, and those of cpu/isa/ (AVX2, AVX-512)
// where the build compiled them. The best one the running CPU supports is
// picked once, for float32 and float64 (float16/bfloat16 always run the
// portable kernels); GE2E_EXT_CPU_CAPABILITY=portable|avx2|avx512 asks for one
// (as ATEN_CPU_CAPABILITY does for PyTorch), and ge2e_ext.cpu_capability()
// says which runs.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Logging.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "../ge2e_driver.h"
#include "ge2e_cpu_table.h"

namespace ge2e {
namespace {

struct CpuTypes {
  using Half = c10::Half;
  using BFloat16 = c10::BFloat16;
};

const cpu::KernelTable kPortableKernels = cpu::make_kernel_table<CpuTypes>("portable");

bool cpu_has(const char* isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (std::string(isa) == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  if (std::string(isa) == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma");
  }
#endif
  return false;
}

// The instruction-set tables this build has, best first.
std::vector<const cpu::KernelTable*> built_tables() {
  std::vector<const cpu::KernelTable*> tables;
#ifdef GE2E_ISA_AVX512
  tables.push_back(&cpu::kAvx512Kernels);
#endif
#ifdef GE2E_ISA_AVX2
  tables.push_back(&cpu::kAvx2Kernels);
#endif
  tables.push_back(&kPortableKernels);
  return tables;
}

// The best table the CPU runs, or the one GE2E_EXT_CPU_CAPABILITY names if the
// CPU runs it (else the best below it, with a warning).
const cpu::KernelTable& select_table() {
  const char* requested = std::getenv("GE2E_EXT_CPU_CAPABILITY");
  const std::string wanted = requested != nullptr ? requested : "";
  bool below_wanted = wanted.empty() || wanted == "default";
  for (const cpu::KernelTable* table : built_tables()) {
    const std::string name = table->name;
    if (name == wanted) below_wanted = true;
    if (!below_wanted) continue;
    if (name == "portable" || cpu_has(table->name)) {
      if (!wanted.empty() && wanted != "default" && name != wanted) {
        TORCH_WARN("ge2e_ext: GE2E_EXT_CPU_CAPABILITY=", wanted,
                   " is not available (not built, or not supported by this CPU); using ", name);
      }
      return *table;
    }
  }
  TORCH_WARN("ge2e_ext: GE2E_EXT_CPU_CAPABILITY=", wanted,
             " is not one of the built kernels; using the portable ones");
  return kPortableKernels;
}

const cpu::KernelTable& best_table() {
  static const cpu::KernelTable& table = select_table();
  return table;
}

const cpu::KernelTable& kernels(const Problem& p) {
  return p.dtype == DType::kFloat32 || p.dtype == DType::kFloat64 ? best_table()
                                                                  : kPortableKernels;
}

size_t accumulation_bytes(const Problem& p) {
  return p.dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
}

// fn(lo, hi, scratch) over [0, n) in parallel; scratch: per task, `scratch_size`
// elements of the accumulation type.
template <typename Fn>
void parallel_over(const Problem& p, int64_t n, int64_t scratch_size, Fn&& fn) {
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<unsigned char> scratch(static_cast<size_t>(scratch_size) * accumulation_bytes(p));
    fn(lo, hi, static_cast<void*>(scratch.data()));
  });
}

struct CpuDevice {
  // Cosine blocks up to an eighth of the input: at N=2048, M=10, D=256 a
  // sixteenth made a step 4% slower (smaller matrix products).
  static constexpr int64_t kBlockInputShare = 8;
  // The cosines are the only budget (the sums and per-row buffers come on top).
  static constexpr bool kBoundStepPeak = false;
  // The contrast loss's gradient has two non-zero entries per row, so its
  // products are a gather and a bucketed sum: O(B D) instead of O(B K D).
  static constexpr bool kSparseProducts = true;

  static void speaker_stats(const Problem& p) {
    const auto& k = kernels(p);
    parallel_over(p, p.speakers, 0, [&](int64_t lo, int64_t hi, void*) {
      k.speaker_stats(p, lo, hi);
    });
    if (p.sums_given) {
      parallel_over(p, p.total_speakers, 0, [&](int64_t lo, int64_t hi, void*) {
        k.sum_inverse_norms(p, lo, hi);
      });
    }
  }

  static void rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk,
                   void* cosines) {
    const auto& k = kernels(p);
    parallel_over(p, blk.rows, cpu::rows_scratch(p), [&](int64_t lo, int64_t hi, void* scratch) {
      k.rows(p, rb, pass, blk, cosines, scratch, lo, hi);
    });
  }

  static void sparse_sum_grads(const Problem& p, Block blk, const void* cosines,
                               const int64_t* hardest, void* z, bool accumulate) {
    // The block's rows by hardest impostor (a counting sort), so that each Z_k
    // sums its rows in increasing order whatever the thread count.
    const int64_t K = p.total_speakers, rows = blk.rows;
    const int64_t* block_hardest = hardest + blk.first_row;
    std::vector<int64_t> bucket_start(static_cast<size_t>(K + 1), 0);
    const auto valid = [&](int64_t rb) {
      const int64_t k = block_hardest[rb];
      return k >= 0 && k < K && k != p.speaker_offset + speaker_of(p, blk.first_row + rb);
    };
    for (int64_t rb = 0; rb < rows; ++rb) {
      if (valid(rb)) ++bucket_start[block_hardest[rb] + 1];
    }
    for (int64_t k = 0; k < K; ++k) bucket_start[k + 1] += bucket_start[k];
    std::vector<int64_t> bucket_rows(static_cast<size_t>(bucket_start[K]));
    std::vector<int64_t> fill(bucket_start.begin(), bucket_start.end() - 1);
    for (int64_t rb = 0; rb < rows; ++rb) {
      if (valid(rb)) bucket_rows[fill[block_hardest[rb]]++] = rb;
    }
    const auto& k = kernels(p);
    parallel_over(p, K, 0, [&](int64_t lo, int64_t hi, void*) {
      k.sparse_sum_grads(p, blk, cosines, bucket_start.data(), bucket_rows.data(), z, accumulate,
                         lo, hi);
    });
  }

  static void row_gradients(const Problem& p, Block blk, bool sparse, const void* t_rows,
                            const void* cosines, const int64_t* hardest, const void* z_to_fold,
                            void* grad) {
    const auto& k = kernels(p);
    parallel_over(p, blk.count, cpu::row_gradients_scratch(p),
                  [&](int64_t lo, int64_t hi, void* scratch) {
                    k.row_gradients(p, blk, sparse, t_rows, cosines, hardest, z_to_fold, grad,
                                    scratch, lo, hi);
                  });
  }

  static void split_speaker_others(const Problem& p, Block speaker, void*, void* grad) {
    const auto& k = kernels(p);
    // Over coordinates (in runs of 16), each summed over the rows in order.
    const int64_t runs = (p.dim + 15) / 16;
    parallel_over(p, runs, cpu::split_speaker_others_scratch(p),
                  [&](int64_t lo, int64_t hi, void* scratch) {
                    k.split_speaker_others(p, speaker.first, grad, scratch, lo * 16,
                                           std::min(hi * 16, p.dim));
                  });
  }

  static void fold(const Problem& p, const void* z, void* grad) {
    const auto& k = kernels(p);
    parallel_over(p, p.speakers, p.dim, [&](int64_t lo, int64_t hi, void* scratch) {
      k.fold(p, z, grad, scratch, lo, hi);
    });
  }

  static void unit_rows(const Problem& p, const void* in, void* out, void* norms) {
    const auto& k = kernels(p);
    parallel_over(p, p.total_rows, 0, [&](int64_t lo, int64_t hi, void*) {
      k.unit_rows(p, in, out, norms, lo, hi);
    });
  }

  static void unit_row_grads(const Problem& p, const void* in, const void* norms, void* grad) {
    const auto& k = kernels(p);
    parallel_over(p, p.total_rows, 0, [&](int64_t lo, int64_t hi, void*) {
      k.unit_row_grads(p, in, norms, grad, lo, hi);
    });
  }

  static void finish(const Problem& p, void* z, const void* w_part, const void* b_part,
                     const void* loss_rows, double loss_scale, void* grad_w, void* grad_b,
                     void* loss_total) {
    const auto& k = kernels(p);
    if (p.sums_given) {
      parallel_over(p, p.total_speakers, 0, [&](int64_t lo, int64_t hi, void*) {
        k.sum_grads(p, z, lo, hi);
      });
    }
    k.scalars(p, w_part, b_part, loss_rows, loss_scale, grad_w, grad_b, loss_total);
  }
};

// The kernels float32 and float64 run on this CPU: "avx512", "avx2" or "portable".
std::string cpu_capability() { return best_table().name; }

// The instruction-set kernels this build has, best first.
std::vector<std::string> cpu_capabilities_built() {
  std::vector<std::string> names;
  for (const cpu::KernelTable* table : built_tables()) names.emplace_back(table->name);
  return names;
}

}  // namespace
}  // namespace ge2e

TORCH_LIBRARY_FRAGMENT(ge2e_ext, m) {
  m.def("cpu_capability() -> str", &ge2e::cpu_capability);
  m.def("cpu_capabilities_built() -> str[]", &ge2e::cpu_capabilities_built);
}

TORCH_LIBRARY_IMPL(ge2e_ext, CPU, m) { ge2e::register_kernel_ops<ge2e::CpuDevice>(m); }
