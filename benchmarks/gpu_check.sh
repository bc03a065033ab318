#!/usr/bin/env bash
# Everything a GPU machine must do for ge2e_ext, in one go (under 8 minutes on
# an H100, fresh build included):
#   1. build for sm_90 (pip install --no-build-isolation --no-deps -e .),
#   2. the compiler's resource report of the CUDA kernels (registers, spills),
#   3. the CUDA tests (-x: stop at the first failure),
#   4. the floors (launch, bandwidth, cuBLAS) and ge2e_ext against them,
#   5. the benchmark: the paper's size in every mode, and a sweep over N to 4096.
# Logs and result tables go to OUTDIR (at most 8 files: the device tool brings
# back no more). Exit status: non-zero if the build or a test failed.
#
#   benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT/paper" "$OUT/sweep"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export FORCE_CUDA=1
PY=${PYTHON:-python3}
REPORT="$OUT/report.txt"
status=0

step() { echo "== $(date +%T) $*" | tee -a "$REPORT"; }

step "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} >> "$REPORT" 2>&1

step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  step "BUILD FAILED (tail of build.log follows)"
  tail -40 "$OUT/build.log" | tee -a "$REPORT"
  exit 1
fi
rm -f "$OUT/build.log"  # kept only when the build fails (the tool brings back 8 files)
"$PY" -c "import ge2e_ext; print('kernels for', sorted(ge2e_ext.extension_devices()))" | tee -a "$REPORT"

step "resource report (nvcc -Xptxas -v, sm_90)"
nvcc -O3 -lineinfo -arch=sm_90 -Xptxas -v -c csrc/cuda/ge2e_cuda_kernels.cu -o /tmp/ge2e_kernels.o 2>&1 \
  | grep -E "Function properties|registers|spill|Compiling entry" >> "$REPORT" || true

step "CUDA tests"
"$PY" -m pytest -x -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
test_status=${PIPESTATUS[0]}
tail -3 "$OUT/test_cuda.log" >> "$REPORT"
[[ $test_status -eq 0 ]] || status=1

step "floors"
"$PY" benchmarks/gpu_floors.py --output "$OUT" 2>&1 | tee -a "$REPORT"

step "benchmark: paper size, every mode"
"$PY" benchmarks/bench_ge2e.py --device cuda --sizes 64x10x256 --output "$OUT/paper" \
  > "$OUT/bench.log" 2>&1 || status=1
step "benchmark: sweep over N (fwd+bwd)"
"$PY" benchmarks/bench_ge2e.py --device cuda --modes forward+backward --no-memory \
  --sizes 8x10x256,64x10x256,256x10x256,1024x10x256,4096x10x256,1024x10x512 \
  --output "$OUT/sweep" >> "$OUT/bench.log" 2>&1 || status=1
tail -60 "$OUT/bench.log" >> "$REPORT"

step "done (status $status)"
exit $status
