#!/usr/bin/env bash
# Everything a GPU machine must do for ge2e_ext, in one command of under 7 minutes:
#
#   benchmarks/gpu_check.sh [OUTDIR]      (default: $OUT, the device tool's folder)
#
# Steps, each under `timeout` with its own budget (seconds, BUDGETS below; they add
# up to 415 s and the script refuses to start if an edit takes them past 420):
#   env        15  which runtime this is: GPU, driver, compute-sanitizer version,
#                  python/torch/CUDA versions, commit (GE2E_COMMIT, else git; the
#                  device tool copies no .git) and a hash of the sources
#   build      90  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FORCE_CUDA=1
#                  pip install --no-build-isolation --no-deps --no-index -e .; if pip
#                  fails before compiling anything, python setup.py build_ext --inplace
#                  (a cold build took 55 s on 2 CPU cores)
#   ptxas      15  nvcc -Xptxas -v -arch=sm_90 on csrc/cuda/*.cu: registers, spills
#   tests      75  pytest -q -rfE tests -k "cuda and not emulated" (the CPU emulation
#                  of the kernels runs in CI; here it would cost a cold C++ build),
#                  with --junitxml, --durations and, where pytest-timeout is
#                  installed, 60 s a test
#   memcheck   35  compute-sanitizer --tool memcheck  benchmarks/gpu_sanitize.py
#   racecheck  30  compute-sanitizer --tool racecheck benchmarks/gpu_sanitize.py
#   initcheck  25  compute-sanitizer --tool initcheck benchmarks/gpu_sanitize.py
#   synccheck  20  compute-sanitizer --tool synccheck benchmarks/gpu_sanitize.py
#                  (each with PYTORCH_NO_CUDA_MEMORY_CACHING=1: inside the caching
#                  allocator's segments memcheck cannot see an access out of a tensor;
#                  forward and backward of both methods, dense and labels, float32,
#                  float64, float16, bfloat16)
#   floors     20  benchmarks/gpu_floors.py: launch, bandwidth, cuBLAS, ge2e_ext vs them
#   paper      70  benchmarks/bench_paper.py --quick: 64x10x256, every provider (a cold
#                  torch.compile per loss method), every mode, GPU memory of fwd+bwd
#   sweep      20  benchmarks/bench_sweep.py --quick, N = 8, 64, 256, 1024, 4096 at
#                  M=10 D=256 and 1024x10x512, fwd+bwd, eager, ge2e_ext and the floor
#                  (no torch.compile, which would compile afresh at every size)
# tests and the sanitizers are skipped when the build fails; floors and benchmarks
# still run (ge2e_ext is then "skipped (no kernel)").
#
# Each step's log goes to a work folder; as soon as a step ends, OUTDIR is brought up
# to date, so a step that runs out of time loses nothing before it. OUTDIR holds at
# most 5 files: report.txt (each step's digest and the summary), logs.tar.gz (every
# full log), results.tar.gz (CSVs, PNGs, floors.csv, the tests' junit XML) and the two
# PNGs of the benchmarks. The summary table is printed last.
#
# Exit status: 0 when the build, the tests and the four sanitizers passed (a sanitizer
# that cannot run here counts as n/a, not as a failure), else 1. The floors and
# benchmarks are reported in the summary but do not change it.
# PYTHON (default python3) is the interpreter; MAX_JOBS, TORCH_CUDA_ARCH_LIST and, for
# dry runs, GPU_CHECK_BUDGETS (same form as BUDGETS) may be overridden.
set -uo pipefail

BUDGETS=${GPU_CHECK_BUDGETS:-"env:15 build:90 ptxas:15 tests:75 memcheck:35 racecheck:30 initcheck:25 synccheck:20 floors:20 paper:70 sweep:20"}
TOTAL_LIMIT_S=420
SANITIZERS="memcheck racecheck initcheck synccheck"
GATING_STEPS=" build tests $SANITIZERS "  # their failure fails the whole check

OUTDIR=${1:-${OUT:-}}
if [[ -z $OUTDIR ]]; then
  echo "usage: benchmarks/gpu_check.sh OUTDIR   (or set OUT)" >&2
  exit 2
fi
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PY=${PYTHON:-python3}
export WORK
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
mkdir -p "$WORK/logs" "$WORK/results"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export FORCE_CUDA=1
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
export NVCC
# compute-sanitizer: on PATH, else next to nvcc or in the toolkit.
SANITIZER=$(command -v compute-sanitizer || true)
for dir in "$(dirname "$NVCC")" "${CUDA_HOME:-/usr/local/cuda}/bin" /usr/local/cuda/bin \
    /usr/local/cuda/compute-sanitizer; do
  [[ -z $SANITIZER && -x $dir/compute-sanitizer ]] && SANITIZER=$dir/compute-sanitizer
done
export SANITIZER
REPORT="$OUTDIR/report.txt"
: > "$REPORT"

budget_total=0
for entry in $BUDGETS; do budget_total=$((budget_total + ${entry#*:})); done
if ((budget_total > TOTAL_LIMIT_S)); then
  echo "gpu_check.sh: the step budgets add up to $budget_total s, over $TOTAL_LIMIT_S s" >&2
  exit 2
fi
budget_of() {
  local entry
  for entry in $BUDGETS; do [[ ${entry%%:*} == "$1" ]] && echo "${entry#*:}"; done
}

# ---------------------------------------------------------------- the steps

step_env() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  if [[ -n $SANITIZER ]]; then
    echo "compute-sanitizer $SANITIZER: $("$SANITIZER" --version | grep -i version | tail -1)"
  else
    echo "compute-sanitizer: not found (PATH, $(dirname "$NVCC"), /usr/local/cuda/bin)"
  fi
  "$PY" - <<'PYTHON'
import sys, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", gpu)
PYTHON
  "$NVCC" --version | tail -1
  local commit
  commit=${GE2E_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no .git; set GE2E_COMMIT)")}
  echo "commit $commit"
  echo "sources sha1 $(find csrc ge2e_ext setup.py -type f | grep -E '\.(py|h|cuh|cu|cpp)$' | sort \
    | xargs sha1sum | sha1sum | cut -c1-12)"
}

step_build() {
  if "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . ; then
    :
  elif grep -qE "(: |\): )error|Error compiling objects|ninja: build stopped|FORCE_CUDA=1 but" \
      "$WORK/logs/build.log"; then
    return 1  # a compile error: the fallback would only repeat it
  else
    echo "== pip could not install; falling back to setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" -c "import sys, ge2e_ext; d = ge2e_ext.extension_devices()
print('kernels for', sorted(d)); sys.exit('cuda' not in d)"
}

step_ptxas() {
  local cu found=0 status=0
  for cu in csrc/cuda/*.cu; do
    [[ -e $cu ]] || continue
    found=1
    echo "== $cu"
    "$NVCC" -O3 -lineinfo -arch=sm_90 -Xptxas -v -I csrc -c "$cu" \
      -o "$WORK/$(basename "$cu").o" 2>&1 | (c++filt 2>/dev/null || cat) || status=1
  done
  ((found)) || { echo "no .cu file under csrc/cuda/"; return 1; }
  return $status
}

step_tests() {
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra=(--timeout=60)
  "$PY" -m pytest -q -p no:cacheprovider -rfE tests -k "cuda and not emulated" \
    --junitxml="$WORK/results/junit-cuda-tests.xml" --durations=15 "${extra[@]}"
}

sanitize() {
  [[ -n $SANITIZER ]] || { echo "n/a: compute-sanitizer not found"; return 0; }
  # Without the caching allocator every tensor is its own cudaMalloc, so an access
  # past a tensor's end is outside any allocation (memcheck sees it).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$1" --error-exitcode 3 \
    --print-limit 20 "$PY" benchmarks/gpu_sanitize.py
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }
step_initcheck() { sanitize initcheck; }
step_synccheck() { sanitize synccheck; }

step_floors() { "$PY" benchmarks/gpu_floors.py --output "$WORK/results"; }

step_paper() {
  "$PY" benchmarks/bench_paper.py --device cuda --quick --output "$WORK/results"
}

step_sweep() {
  "$PY" benchmarks/bench_sweep.py --device cuda --quick --providers eager,ge2e_ext,floor \
    --sizes 8x10x256,64x10x256,256x10x256,1024x10x256,4096x10x256,1024x10x512 \
    --reference-limit-s 0 --output "$WORK/results"
}
export -f step_env step_build step_ptxas step_tests sanitize step_memcheck step_racecheck \
  step_initcheck step_synccheck step_floors step_paper step_sweep

# What of a step's log goes into report.txt (full) and onto stdout (brief).
digest() {
  local log="$WORK/logs/$1.log"
  case $1 in
    env) cat "$log" ;;
    build) grep -E "^kernels for|ge2e_ext: building|Successfully|falling back" "$log"
      grep -E "(: |\): )error" "$log" | sort -u | head -n 20 ;;
    ptxas) if [[ $2 == full ]]; then grep -E "^== |Compiling entry|registers|spill|error" "$log"
      else grep -E "error" "$log" | head -n 10; awk '/Compiling entry/ {n++}
        /Used [0-9]+ registers/ {for (i = 1; i < NF; i++) if ($(i + 1) == "registers,") r = $i + 0
          if (r > most) most = r}
        /spill stores/ {spill += $5 + $9; stack += $1}
        END {if (n) printf "%d kernel entries for sm_90: at most %d registers, %d bytes" \
          " spilled, %d bytes of stack\n", n, most, spill, stack}' "$log"
      fi ;;
    tests) grep -E "^(FAILED|ERROR) |passed|failed|skipped|error" "$log" | tail -n 40
      [[ $2 == full ]] && grep -E "^[0-9.]+s (call|setup|teardown) " "$log" ;;
    memcheck | racecheck | initcheck | synccheck)
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^n/a|cases finite|not finite|FAILED|rror" "$log" \
        | tail -n 25 ;;
    floors) grep -vE "^\[ *[0-9.]+ s\]" "$log" | tail -n 20 ;;
    *) if [[ $2 == full ]]; then grep -vE "^\[ *[0-9.]+ s\]" "$log"
       else sed -n '/^Summary:/,$p' "$log" | grep -v "^\[ *[0-9.]* s\]"
         grep -E "  (wrong|error)" "$log"; fi ;;
  esac
}

# logs.tar.gz and results.tar.gz (and the PNGs), replaced whole, as soon as a step ends.
publish() {
  local name png
  for name in logs results; do
    tar -czf "$WORK/$name.tar.gz" -C "$WORK" "$name" && mv -f "$WORK/$name.tar.gz" "$OUTDIR/"
  done
  for png in "$WORK"/results/*.png; do [[ -e $png ]] && cp -f "$png" "$OUTDIR/"; done
}

SUMMARY=()
FAILED=0
BUILD_OK=1
run_step() {
  local name=$1 budget started seconds rc status brief
  budget=$(budget_of "$name")
  echo "== $(date +%T) $name (budget $budget s)" | tee -a "$REPORT"
  started=$SECONDS
  timeout -k 2 $((budget - 2)) bash -o pipefail -c "step_$name" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  seconds=$((SECONDS - started))
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT" ;;
    *) status="FAILED (rc $rc)" ;;
  esac
  if [[ $rc == 0 ]] && grep -q "^n/a" "$WORK/logs/$name.log"; then status=n/a; fi
  if [[ " $SANITIZERS " == *" $name "* ]] \
      && grep -qE "Device not supported|terminated before first instrumented API call" \
        "$WORK/logs/$name.log"; then
    status="n/a (sanitizer cannot run here)"
  fi
  digest "$name" full >> "$REPORT"
  brief=$(digest "$name" brief)
  [[ -n $brief ]] && echo "$brief"
  if [[ $status == TIMED* || ($status == FAILED* && -z $brief) ]]; then
    echo "   (last lines of its log:)"; tail -n 12 "$WORK/logs/$name.log" | tee -a "$REPORT"
  fi
  echo "-- $name: $status in $seconds s" | tee -a "$REPORT"
  if [[ $status == TIMED* || $status == FAILED* ]]; then
    [[ $GATING_STEPS == *" $name "* ]] && FAILED=1
    [[ $name == build ]] && BUILD_OK=0
  fi
  SUMMARY+=("$(printf '%-10s %-34s %5s s %5s s' "$name" "$status" "$seconds" "$budget")")
  publish
}

skip_step() {
  SUMMARY+=("$(printf '%-10s %-34s %5s   %5s s' "$1" "skipped ($2)" "-" "$(budget_of "$1")")")
  echo "-- $1: skipped ($2)" | tee -a "$REPORT"
}

echo "gpu_check: work folder $WORK, results to $OUTDIR; step budgets $BUDGETS" \
  "(total $budget_total s)" | tee -a "$REPORT"
run_step env
run_step build
run_step ptxas
for name in tests $SANITIZERS; do
  if ((BUILD_OK)); then run_step "$name"; else skip_step "$name" "build failed"; FAILED=1; fi
done
run_step floors
run_step paper
run_step sweep

{
  echo
  echo "== gpu_check summary: $(date +%T), $SECONDS s in all (step budgets $budget_total s)"
  printf '%-10s %-34s %7s %7s\n' step status time budget
  printf '%s\n' "${SUMMARY[@]}"
  echo "files in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')($(ls "$OUTDIR" | wc -l) files)"
  if ((FAILED)); then
    echo "exit status 1: the build, the tests or a sanitizer failed (see above and logs.tar.gz)"
  else
    echo "exit status 0: build, tests and the four sanitizers passed"
  fi
} | tee -a "$REPORT"
exit $FAILED
