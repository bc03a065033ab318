// The CPU kernels for AVX2 and FMA (setup.py compiles this file with -mavx2 -mfma -mf16c),
// and -DGE2E_CPU_ISA=avx2, which puts every inline function it compiles in a
// namespace of its own. ge2e_cpu.cpp uses this table where the CPU has the
// instructions. float32 and float64; float16/bfloat16 go to the portable kernels.
#ifndef GE2E_CPU_ISA
#error "compile this file with -DGE2E_CPU_ISA=avx2 and its instruction-set flags (setup.py does)"
#endif

#include "../ge2e_cpu_table.h"

namespace ge2e {
namespace cpu {

const KernelTable kAvx2Kernels = make_kernel_table<NoHalfTypes>("avx2");

}  // namespace cpu
}  // namespace ge2e
