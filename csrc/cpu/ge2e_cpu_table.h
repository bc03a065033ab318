// The CPU kernels of one instruction set as a table of entry points, so that
// the CPU device (ge2e_cpu.cpp, portable code) can pick, at run time, the
// kernels compiled for the best instruction set the machine has: the tables of
// cpu/isa/ (AVX2, AVX-512; float32 and float64) or the portable one (every
// dtype). Each entry takes the call's Problem and dispatches the dtype and the
// loss method itself; no ATen here (see GE2E_ISA_BEGIN in ge2e_math.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include "ge2e_cpu_kernels.h"

namespace ge2e {
namespace cpu {

struct KernelTable {
  const char* name;  // "portable", "avx2", "avx512"
  void (*speaker_stats)(const Problem&, int64_t lo, int64_t hi);
  void (*sum_inverse_norms)(const Problem&, int64_t lo, int64_t hi);
  void (*rows)(const Problem&, const RowBuffers&, RowPass, Block, void* cosines, void* scratch,
               int64_t lo, int64_t hi);
  void (*sparse_sum_grads)(const Problem&, Block, const void* cosines,
                           const int64_t* bucket_start, const int64_t* bucket_rows, void* z,
                           bool accumulate, int64_t lo, int64_t hi);
  void (*row_gradients)(const Problem&, Block, bool sparse, const void* t_rows,
                        const void* cosines, const int64_t* hardest, const void* z_to_fold,
                        void* grad, void* scratch, int64_t lo, int64_t hi);
  void (*split_speaker_others)(const Problem&, int64_t j, void* grad, void* scratch, int64_t lo,
                               int64_t hi);
  void (*fold)(const Problem&, const void* z, void* grad, void* scratch, int64_t lo, int64_t hi);
  void (*sum_grads)(const Problem&, void* z, int64_t lo, int64_t hi);
  void (*scalars)(const Problem&, const void* w_part, const void* b_part, const void* loss_rows,
                  double loss_scale, void* grad_w, void* grad_b, void* loss_total);
  void (*unit_rows)(const Problem&, const void* in, void* out, void* norms, int64_t lo,
                    int64_t hi);
  void (*unit_row_grads)(const Problem&, const void* in, const void* norms, void* grad,
                         int64_t lo, int64_t hi);
};

// The tables of the instruction-set files that were compiled (setup.py defines
// GE2E_ISA_AVX2 / GE2E_ISA_AVX512 for every file when it compiles them).
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;

GE2E_ISA_BEGIN

// The half-precision types a table covers: none (HalfTypes = void, float32 and
// float64 only) for the instruction-set tables, c10's for the portable one.
struct NoHalfTypes {
  using Half = void;
  using BFloat16 = void;
};

template <class Types, typename Fn>
void dispatch_table_dtype(DType dtype, Fn&& fn) {
  if constexpr (std::is_void_v<typename Types::Half>) {
    if (dtype == DType::kFloat64) {
      fn(double(), double());
    } else {
      fn(float(), float());
    }
  } else {
    dispatch_dtype<Types>(dtype, fn);
  }
}

// The CPU device exploits a sparse gradient (kSparseProducts): the method's
// kSparseGradient picks the kernels' variant.
template <class Types>
struct Entries {
  static void speaker_stats(const Problem& p, int64_t lo, int64_t hi) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto s, auto a) {
      cpu::speaker_stats<decltype(s), decltype(a)>(p, lo, hi);
    });
  }
  static void sum_inverse_norms(const Problem& p, int64_t lo, int64_t hi) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto, auto a) {
      cpu::sum_inverse_norms<decltype(a)>(p, lo, hi);
    });
  }
  static void rows(const Problem& p, const RowBuffers& rb, RowPass pass, Block blk,
                   void* cosines, void* scratch, int64_t lo, int64_t hi) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto, auto a) {
      using acc_t = decltype(a);
      dispatch_loss_method(p.method, [&](auto method) {
        using Method = decltype(method);
        cpu::rows<Method, Method::kSparseGradient, acc_t>(p, rb, pass, blk,
                                                          static_cast<acc_t*>(cosines),
                                                          static_cast<acc_t*>(scratch), lo, hi);
      });
    });
  }
  static void sparse_sum_grads(const Problem& p, Block blk, const void* cosines,
                               const int64_t* bucket_start, const int64_t* bucket_rows, void* z,
                               bool accumulate, int64_t lo, int64_t hi) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto s, auto a) {
      using acc_t = decltype(a);
      cpu::sparse_sum_grads<decltype(s), acc_t>(p, blk, static_cast<const acc_t*>(cosines),
                                                bucket_start, bucket_rows,
                                                static_cast<acc_t*>(z), accumulate, lo, hi);
    });
  }
  static void row_gradients(const Problem& p, Block blk, bool sparse, const void* t_rows,
                            const void* cosines, const int64_t* hardest, const void* z_to_fold,
                            void* grad, void* scratch, int64_t lo, int64_t hi) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto s, auto a) {
      using scalar_t = decltype(s);
      using acc_t = decltype(a);
      const auto run = [&](auto sparse_products) {
        cpu::row_gradients<decltype(sparse_products)::value, scalar_t, acc_t>(
            p, blk, static_cast<const acc_t*>(t_rows), static_cast<const acc_t*>(cosines),
            hardest, static_cast<const acc_t*>(z_to_fold), static_cast<scalar_t*>(grad),
            static_cast<acc_t*>(scratch), lo, hi);
      };
      if (sparse) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  }
  static void split_speaker_others(const Problem& p, int64_t j, void* grad, void* scratch,
                                   int64_t lo, int64_t hi) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto s, auto a) {
      using acc_t = decltype(a);
      cpu::split_speaker_others<decltype(s), acc_t>(p, j, static_cast<decltype(s)*>(grad),
                                                    static_cast<acc_t*>(scratch), lo, hi);
    });
  }
  static void fold(const Problem& p, const void* z, void* grad, void* scratch, int64_t lo,
                   int64_t hi) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto s, auto a) {
      using acc_t = decltype(a);
      cpu::fold<decltype(s), acc_t>(p, static_cast<const acc_t*>(z),
                                    static_cast<decltype(s)*>(grad),
                                    static_cast<acc_t*>(scratch), lo, hi);
    });
  }
  static void sum_grads(const Problem& p, void* z, int64_t lo, int64_t hi) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto, auto a) {
      cpu::sum_grads<decltype(a)>(p, static_cast<decltype(a)*>(z), lo, hi);
    });
  }
  static void scalars(const Problem& p, const void* w_part, const void* b_part,
                      const void* loss_rows, double loss_scale, void* grad_w, void* grad_b,
                      void* loss_total) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto, auto a) {
      using acc_t = decltype(a);
      cpu::scalars<acc_t>(p, static_cast<const acc_t*>(w_part),
                          static_cast<const acc_t*>(b_part),
                          static_cast<const acc_t*>(loss_rows), loss_scale,
                          static_cast<acc_t*>(grad_w), static_cast<acc_t*>(grad_b),
                          static_cast<acc_t*>(loss_total));
    });
  }
  static void unit_rows(const Problem& p, const void* in, void* out, void* norms, int64_t lo,
                        int64_t hi) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto s, auto a) {
      using scalar_t = decltype(s);
      using acc_t = decltype(a);
      cpu::unit_rows<scalar_t, acc_t>(p, static_cast<const scalar_t*>(in),
                                      static_cast<scalar_t*>(out), static_cast<acc_t*>(norms),
                                      lo, hi);
    });
  }
  static void unit_row_grads(const Problem& p, const void* in, const void* norms, void* grad,
                             int64_t lo, int64_t hi) {
    dispatch_table_dtype<Types>(p.dtype, [&](auto s, auto a) {
      using scalar_t = decltype(s);
      using acc_t = decltype(a);
      cpu::unit_row_grads<scalar_t, acc_t>(p, static_cast<const scalar_t*>(in),
                                           static_cast<const acc_t*>(norms),
                                           static_cast<scalar_t*>(grad), lo, hi);
    });
  }
};

template <class Types>
constexpr KernelTable make_kernel_table(const char* name) {
  using E = Entries<Types>;
  return KernelTable{name,          E::speaker_stats, E::sum_inverse_norms, E::rows,
                     E::sparse_sum_grads, E::row_gradients, E::split_speaker_others, E::fold,  E::sum_grads,
                     E::scalars,    E::unit_rows,     E::unit_row_grads};
}

GE2E_ISA_END

}  // namespace cpu
}  // namespace ge2e
