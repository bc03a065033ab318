// The CPU kernels for AVX-512 (F, BW, DQ, VL) and FMA (setup.py compiles this file with
// -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma -mf16c),
// and -DGE2E_CPU_ISA=avx512, which puts every inline function it compiles in a
// namespace of its own. ge2e_cpu.cpp uses this table where the CPU has the
// instructions. float32 and float64; float16/bfloat16 go to the portable kernels.
#ifndef GE2E_CPU_ISA
#error "compile this file with -DGE2E_CPU_ISA=avx512 and its instruction-set flags (setup.py does)"
#endif

#include "../ge2e_cpu_table.h"

namespace ge2e {
namespace cpu {

const KernelTable kAvx512Kernels = make_kernel_table<NoHalfTypes>("avx512");

}  // namespace cpu
}  // namespace ge2e
