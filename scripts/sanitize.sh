#!/usr/bin/env bash
# The sanitizers as tests, on the CPU (CI runs this after `make test`):
#
#   scripts/sanitize.sh [--only tsan|asan] [--plant barrier|oob|none] [--work DIR]
#
# - racecheck: ThreadSanitizer over the CUDA kernels under the CPU emulation
#   (tests/cuda_emulation: a block's threads are threads, so a missing
#   __syncthreads is a data race between them);
# - memcheck: AddressSanitizer + UndefinedBehaviorSanitizer over the emulated
#   kernels and over the CPU op on each instruction set the CPU has
#   (GE2E_EXT_CPU_CAPABILITY=portable, avx2, avx512).
# Each builds what it needs under a work folder (never the in-place module the
# tests use), then runs a subset of the tests in its own process, with the
# runtime preloaded into the interpreter. After the clean runs, each sanitizer
# must catch a planted defect (GE2E_EMU_PLANT, tests/cuda_emulation/emulate.h):
# `barrier` skips the first __syncthreads of every block (TSan must report a
# race), `oob` runs one block past the end of the grid, whose reads start one
# past the end of the arrays (ASan must report it). --plant X runs only that
# check (with the build it needs); --plant none skips them.
#
# Exit status: 0 when the clean runs report nothing and each planted defect is
# reported; 1 otherwise; 2 for a usage or setup error. Prints each step and its
# time; the logs stay in the work folder (removed at the end unless --work).
# PYTHON (default .venv/bin/python, else python3) is the interpreter, MAX_JOBS
# the parallel compile jobs (default 2).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

ONLY=both
PLANT=all
WORK=
while (($#)); do
  case $1 in
    --only) ONLY=${2:-}; shift 2 ;;
    --plant) PLANT=${2:-}; shift 2 ;;
    --work) WORK=${2:-}; shift 2 ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "sanitize.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $ONLY in both | tsan | asan) ;; *) echo "sanitize.sh: --only tsan|asan" >&2; exit 2 ;; esac
case $PLANT in all | none) ;;
  barrier) ONLY=tsan ;;
  oob) ONLY=asan ;;
  *) echo "sanitize.sh: --plant barrier|oob|none" >&2; exit 2 ;;
esac
CLEAN=1
[[ $PLANT == barrier || $PLANT == oob ]] && CLEAN=0

PY=${PYTHON:-}
[[ -z $PY && -x .venv/bin/python ]] && PY=.venv/bin/python
PY=${PY:-python3}
# The interpreter itself, not a wrapper: a pyenv shim is a bash script, and the
# preloaded runtime would run (and die) in bash. A venv's python is a symlink to
# the binary: kept as it is (the venv needs its own path), after checking.
PY=$("$PY" -c "import sys; print(sys.executable)") || exit 2
if [[ $(head -c 4 "$(readlink -f "$PY")" | od -An -c | tr -d ' ') != '177ELF' ]]; then
  echo "sanitize.sh: $PY is not an executable binary (a wrapper script?); set PYTHON" >&2
  exit 2
fi
export MAX_JOBS=${MAX_JOBS:-2}
export PYTHONUNBUFFERED=1
CXX_COMPILER=${CXX:-c++}
runtime() { "$CXX_COMPILER" -print-file-name="$1"; }
for lib in libtsan.so libasan.so libubsan.so libstdc++.so; do
  [[ -e $(runtime $lib) ]] || { echo "sanitize.sh: $(runtime $lib) not found" >&2; exit 2; }
done

if [[ -z $WORK ]]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/ge2e_sanitize.XXXXXX") || exit 2
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/logs" && WORK=$(cd "$WORK" && pwd)
REPORTS="WARNING: ThreadSanitizer|ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer"
STATUS=0
SUMMARY=()
STARTED=$SECONDS

# step NAME COMMAND...: runs it with its output in logs/NAME.log, prints its time.
step() {
  local name=$1 started=$SECONDS rc
  shift
  echo "== $(date +%T) $name"
  "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  STEP_SECONDS=$((SECONDS - started))
  return $rc
}
record() {  # record NAME VERDICT
  SUMMARY+=("$(printf '%-22s %-44s %5s s' "$1" "$2" "$STEP_SECONDS")")
  echo "-- $1: $2 in $STEP_SECONDS s"
}
fail() {  # fail NAME VERDICT: the step's log tail and its first report
  STATUS=1
  record "$1" "$2"
  grep -m1 -E -A 25 "$REPORTS" "$WORK/logs/$1.log" || tail -n 25 "$WORK/logs/$1.log"
}

# A clean run: the command passes and its log holds no sanitizer report.
clean_run() {
  local name=$1
  shift
  if step "$name" "$@" && ! grep -qE "$REPORTS" "$WORK/logs/$name.log"; then
    record "$name" "clean ($(grep -E '[0-9]+ passed' "$WORK/logs/$name.log" | tail -1 \
      | sed -E 's/^=* *//; s/ in [0-9.]+s.*//'))"
  else
    fail "$name" "REPORTED or failed (see below)"
  fi
}
# A planted run: the sanitizer must report `pattern`.
planted_run() {
  local name=$1 pattern=$2
  shift 2
  step "$name" "$@"
  if grep -qE "$pattern" "$WORK/logs/$name.log"; then
    record "$name" "caught: $(grep -m1 -oE "$pattern.{0,60}" "$WORK/logs/$name.log")"
    grep -m1 -E -A 12 "$pattern" "$WORK/logs/$name.log" | sed 's/^/   /'
  else
    STATUS=1
    record "$name" "NOT CAUGHT (the planted defect went unreported)"
    tail -n 20 "$WORK/logs/$name.log"
  fi
}

# The emulation's build for the tests' fixture `emulated` (64 threads per block;
# the 256-thread case, which has its own build, is left out under the
# sanitizers), with the flags the fixture is told through GE2E_EMU_CFLAGS (it
# then finds it built).
build_emulation() {  # DIR CFLAGS LDFLAGS
  "$PY" tests/cuda_emulation/build.py "$1/ge2e_emu" --threads 64 --namespace ge2e_emu \
    --cflags="$2" --ldflags="$3"
}

# pytest under a sanitizer: -s (pytest's capture would swallow the report), the
# prebuilt emulation, the test files given.
sanitized_pytest() {  # PRELOAD BUILD_DIR CFLAGS LDFLAGS [env...] -- pytest args
  local preload=$1 build=$2 cflags=$3 ldflags=$4
  shift 4
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  env LD_PRELOAD="$preload" GE2E_EMU_BUILD_DIR="$build" GE2E_EMU_CFLAGS="$cflags" \
    GE2E_EMU_LDFLAGS="$ldflags" GE2E_EMU_PREBUILT=1 "${envs[@]}" \
    "$PY" -m pytest -s -q -p no:cacheprovider -x "$@"
}

# ------------------------------------------------------------------ racecheck
TSAN_CFLAGS="-O1 -g -fsanitize=thread"
TSAN_LDFLAGS="-fsanitize=thread"
# torch and libgomp are not instrumented: their OpenMP barriers would look like races.
TSAN_ENV=(TSAN_OPTIONS="ignore_noninstrumented_modules=1 halt_on_error=1 exitcode=66 history_size=4")
# The emulated tests, less the slowest repeats of what others cover (the 256-thread
# case and the launch count: minutes under TSan; the block orders run uninstrumented).
TSAN_TESTS="not 256 and not launches and not more_speakers and not block_order"
if [[ $ONLY != asan ]]; then
  step tsan-build build_emulation "$WORK/tsan" "$TSAN_CFLAGS" "$TSAN_LDFLAGS" \
    && record tsan-build "built" || fail tsan-build "FAILED"
  if ((STATUS == 0)); then
    if ((CLEAN)); then
      clean_run tsan-emulated sanitized_pytest "$(runtime libtsan.so)" "$WORK/tsan" \
        "$TSAN_CFLAGS" "$TSAN_LDFLAGS" "${TSAN_ENV[@]}" -- tests/test_cuda_emulated.py \
        -k "$TSAN_TESTS"
    fi
    if [[ $PLANT == all || $PLANT == barrier ]]; then
      planted_run tsan-planted-barrier "WARNING: ThreadSanitizer: data race" \
        sanitized_pytest "$(runtime libtsan.so)" "$WORK/tsan" "$TSAN_CFLAGS" "$TSAN_LDFLAGS" \
        "${TSAN_ENV[@]}" GE2E_EMU_PLANT=barrier -- tests/test_cuda_emulated.py \
        -k "test_kernels_match_the_cpu_kernel and shape2 and 1e-06 and softmax"
    fi
  fi
fi

# ------------------------------------------------------------------- memcheck
# Python's CFLAGS carry -fwrapv, under which signed overflow is defined and
# unchecked: -fno-wrapv comes after it.
ASAN_CFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow -fno-wrapv"
ASAN_LDFLAGS="-fsanitize=address,undefined"
# libstdc++ with libasan, else ASan aborts at the first C++ exception (torch's
# own are caught); Python's allocator would hide heap overflows from ASan.
ASAN_PRELOAD="$(runtime libasan.so) $(runtime libstdc++.so)"
ASAN_ENV=(ASAN_OPTIONS="detect_leaks=0 halt_on_error=1 abort_on_error=0 exitcode=67"
  UBSAN_OPTIONS="print_stacktrace=1 halt_on_error=1 exitcode=68" PYTHONMALLOC=malloc)
ASAN_EMULATED_TESTS="not 256 and not launches and not block_order"
# The CPU op's tests against the loop reference and the float64 numerics.
ASAN_CPU_TESTS=(tests/test_parity.py tests/test_labels.py)

# The CPU op with the sanitizers, into WORK/asan/pkg/ge2e_ext (a copy of the
# package with that module); setup.py's build and temp folders under WORK.
build_cpu_op() {
  local out=$WORK/asan
  # The CPU op alone (GE2E_EXT_CUDA=0), which FORCE_CUDA=1 (CI's) would refuse.
  env -u FORCE_CUDA CFLAGS="$ASAN_CFLAGS" LDFLAGS="$ASAN_LDFLAGS" GE2E_EXT_CUDA=0 \
    "$PY" setup.py build_ext --build-lib "$out/lib" --build-temp "$out/tmp" || return 1
  rm -rf "$out/pkg" && mkdir -p "$out/pkg/ge2e_ext" || return 1
  cp ge2e_ext/*.py "$out/pkg/ge2e_ext/" && cp "$out"/lib/ge2e_ext/_C*.so "$out/pkg/ge2e_ext/"
}
# The instruction sets the CPU op was built with that this CPU has.
cpu_capabilities() {
  local built flags c
  built=$(cd "$WORK/asan/pkg" && env LD_PRELOAD="$ASAN_PRELOAD" "${ASAN_ENV[@]}" "$PY" -c \
    "import torch, ge2e_ext; print(*torch.ops.ge2e_ext.cpu_capabilities_built())" 2>/dev/null)
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  for c in ${built:-portable}; do
    case $c in
      avx2) [[ $flags == *" avx2 "* && $flags == *" fma "* && $flags == *" f16c "* ]] || continue ;;
      avx512) [[ $flags == *" avx512f "* && $flags == *" avx512bw "* && $flags == *" avx512dq "* \
        && $flags == *" avx512vl "* ]] || continue ;;
    esac
    echo "$c"
  done
}
# From WORK/asan/pkg, so that `import ge2e_ext` finds the sanitized copy first.
asan_pytest() {
  (cd "$WORK/asan/pkg" && sanitized_pytest "$ASAN_PRELOAD" "$WORK/asan" "$ASAN_CFLAGS" \
    "$ASAN_LDFLAGS" "${ASAN_ENV[@]}" "$@")
}
if [[ $ONLY != tsan ]]; then
  asan_ok=1
  step asan-build-emulation build_emulation "$WORK/asan" "$ASAN_CFLAGS" "$ASAN_LDFLAGS" \
    && record asan-build-emulation "built" || { fail asan-build-emulation "FAILED"; asan_ok=0; }
  if ((asan_ok)); then
    # (the planted check needs it too: the tests compare with the CPU op)
    step asan-build-cpu-op build_cpu_op && record asan-build-cpu-op "built" \
      || { fail asan-build-cpu-op "FAILED"; asan_ok=0; }
  fi
  if ((asan_ok)); then
    if ((CLEAN)); then
      clean_run asan-emulated asan_pytest -- "$ROOT/tests/test_cuda_emulated.py" \
        -k "$ASAN_EMULATED_TESTS"
      for capability in $(cpu_capabilities); do
        clean_run "asan-cpu-op-$capability" asan_pytest \
          GE2E_EXT_CPU_CAPABILITY="$capability" -- "${ASAN_CPU_TESTS[@]/#/$ROOT/}"
      done
    fi
    if [[ $PLANT == all || $PLANT == oob ]]; then
      planted_run asan-planted-oob "ERROR: AddressSanitizer: [a-z-]+" \
        asan_pytest GE2E_EMU_PLANT=oob -- "$ROOT/tests/test_cuda_emulated.py" \
        -k "test_kernels_match_the_cpu_kernel and shape2 and 1e-06 and softmax"
    fi
  fi
fi

echo
echo "== sanitize.sh summary: $((SECONDS - STARTED)) s in all"
printf '%s\n' "${SUMMARY[@]}"
if ((STATUS)); then
  echo "exit status 1: a sanitizer reported, a planted defect went unreported, or a step failed" \
    "(logs in $WORK/logs)"
else
  echo "exit status 0: clean runs clean, planted defects caught"
fi
exit $STATUS
