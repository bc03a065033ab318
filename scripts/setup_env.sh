#!/usr/bin/env bash
# Prepares .venv for ge2e_ext: creates it once, installs torch and what the
# tests and the benchmark need, and builds the extension in place. Safe to rerun:
# installed packages are kept, and the build is skipped when the compiled module
# is newer than every source and imports.
#
# Environment: PYTHON (default python3), GE2E_TORCH (default torch==2.14.1),
# FORCE_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME, GE2E_EXT_MARCH (setup.py).
# Each step says what it does, how long it usually takes, what it is doing every
# 30 s, and how long it took (scripts/progress.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/progress.sh

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${GE2E_TORCH:-torch==2.14.1}
VENV_PY=.venv/bin/python

if [[ ! -x $VENV_PY ]]; then
  echo "== [$(date +%H:%M:%S)] creating .venv with $($PYTHON --version) (a few seconds)"
  if ! "$PYTHON" -m venv .venv; then
    rm -rf .venv
    echo "error: '$PYTHON -m venv' failed; on Debian/Ubuntu install the venv module" \
         "(apt-get install python3-venv) or set PYTHON to another Python >= 3.9" >&2
    exit 1
  fi
fi

# pip's own lines (Collecting, Downloading, Installing) are what the progress shows.
# soundfile (its wheel bundles libsndfile) reads the examples' corpus folders; torchaudio
# gives them its resampler and mel filterbank: pip picks the release that goes with the
# torch (for torch >= 2.11, torchaudio 2.11.1, built against PyTorch's stable ABI).
run_step "installing $TORCH_SPEC and the test/benchmark dependencies into .venv" \
  "2-4 minutes the first time: torch and its CUDA libraries are about 3 GB; seconds later" \
  "$VENV_PY" -m pip install --progress-bar off --disable-pip-version-check \
  "$TORCH_SPEC" numpy pytest hypothesis matplotlib ninja "setuptools>=77" wheel espeakng-loader tqdm \
  soundfile torchaudio

# torch guesses CUDA_HOME from the nvcc on PATH, which can be a symlink outside
# the toolkit; prefer the standard location when it exists.
if [[ -z ${CUDA_HOME:-} && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda
fi

so=$(ls ge2e_ext/_C*.so 2>/dev/null | head -n 1 || true)
stale=yes
if [[ -n $so ]] && [[ -z $(find csrc setup.py -newer "$so" -print -quit) ]] \
   && "$VENV_PY" -c "import ge2e_ext._C" 2>/dev/null; then
  stale=no
fi
# A CUDA build is required (FORCE_CUDA=1) but the module has no CUDA kernels.
if [[ $stale == no && ${FORCE_CUDA:-0} == 1 ]] \
   && ! "$VENV_PY" -c "import sys, ge2e_ext; sys.exit('cuda' not in ge2e_ext.extension_devices())"; then
  stale=yes
fi
if [[ $stale == yes ]]; then
  # -v: the compiler's lines, which the progress reports ("compiled 3 of 7, the last ...").
  what="building ge2e_ext in place (the C++ CPU op; CUDA kernels where torch has CUDA, nvcc too)"
  run_step "$what" "1-3 minutes on 2 cores, CUDA kernels included; about 1 minute without" \
    "$VENV_PY" -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e .
else
  echo "== [$(date +%H:%M:%S)] ge2e_ext is built and up to date"
fi
"$VENV_PY" -c "import torch, ge2e_ext; print('== torch', torch.__version__, '| ge2e_ext kernels for:', sorted(ge2e_ext.extension_devices()))"
