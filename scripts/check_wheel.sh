#!/usr/bin/env bash
# ge2e_ext as a user gets it: builds the source archive (python -m build --sdist),
# then a wheel from that archive alone, in an empty folder (pip wheel
# --no-build-isolation), installs the wheel into a fresh virtual environment and
# checks it from outside the checkout with scripts/wheel_smoke.py (import, version,
# extension_devices(), loss and gradients against backend="torch").
#
# Usage: scripts/check_wheel.sh [WORKDIR]   (default: a temporary folder, removed after)
#
# Environment:
#   PYTHON  the interpreter whose torch the wheel is built against and run with
#           (default .venv/bin/python). The fresh environment sees that
#           interpreter's packages (torch, numpy) through a .pth file, after its own.
#   FORCE_CUDA, GE2E_EXT_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS,
#   GE2E_EXT_MARCH, GE2E_EXT_ISA: the build's (setup.py).
#   GE2E_EXPECT_DEVICES  the expected extension_devices(), comma-separated; default
#           "cpu,cuda" with FORCE_CUDA=1, "cpu" with GE2E_EXT_CUDA=0, otherwise any
#           set that has "cpu".
# Needs the network (or a local index) once: `build` for the fresh environment and
# setuptools/wheel for build's isolated environment.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$repo/.venv/bin/python}
PY=$(command -v "$PY")
start=$(date +%s)
if [[ $# -ge 1 ]]; then
  work=$(mkdir -p "$1" && cd "$1" && pwd)
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/ge2e_wheel.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work/empty" "$work/dist" "$work/wheels"
version=$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$repo/ge2e_ext/_version.py")
if [[ -n ${GE2E_EXPECT_DEVICES:-} ]]; then
  expect=(--devices "$GE2E_EXPECT_DEVICES")
elif [[ ${FORCE_CUDA:-0} == 1 ]]; then
  expect=(--devices cpu,cuda)
elif [[ ${GE2E_EXT_CUDA:-} == 0 ]]; then
  expect=(--devices cpu)
else
  expect=()
fi
# torch finds ninja on PATH; the interpreter's environment may have it (pip's ninja).
export PATH="$(dirname "$PY"):$PATH"

step_start=0
step() { step_start=$(date +%s); echo "== check_wheel: $*"; }
done_step() { echo "   ($(( $(date +%s) - step_start )) s)"; }

torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
step "fresh virtual environment in $work/venv (with torch $torch_version from $PY)"
"$PY" -m venv "$work/venv"
VPY=$work/venv/bin/python
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
vsite=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" > "$vsite/_ge2e_check_base_packages.pth"
"$VPY" -m pip install --quiet --disable-pip-version-check build
done_step

step "source archive: python -m build --sdist"
# setuptools leaves ge2e_ext.egg-info in the checkout; remove it unless it was there.
[[ -e $repo/ge2e_ext.egg-info ]] && had_egg_info=yes || had_egg_info=no
(cd "$work/empty" && "$VPY" -m build --sdist --outdir "$work/dist" "$repo") \
  > "$work/sdist.log" 2>&1 \
  || { tail -n 40 "$work/sdist.log"; echo "check_wheel: the source archive failed" >&2; exit 1; }
[[ $had_egg_info == no ]] && rm -rf "$repo/ge2e_ext.egg-info"
sdist=$(ls "$work"/dist/ge2e_ext-*.tar.gz)
files=$(tar tzf "$sdist" | grep -vc '/$')
echo "   $(basename "$sdist"): $files files, $(du -k "$sdist" | cut -f1) KiB"
done_step

step "wheel from the source archive alone: pip wheel --no-build-isolation (in $work/empty)"
(cd "$work/empty" && "$PY" -m pip wheel -v --no-build-isolation --no-deps --no-index \
   --disable-pip-version-check --wheel-dir "$work/wheels" "$sdist") > "$work/wheel.log" 2>&1 \
  || { tail -n 60 "$work/wheel.log"; echo "check_wheel: the wheel build failed" >&2; exit 1; }
grep -E '^ *ge2e_ext: ' "$work/wheel.log" | sed 's/^ */   /' || true
if [[ ${GE2E_EXT_MARCH:-} != native ]] && grep -q -- '-march=native' "$work/wheel.log"; then
  echo "check_wheel: the wheel was compiled with -march=native" \
       "though GE2E_EXT_MARCH is not 'native'" >&2
  exit 1
fi
wheel=$(ls "$work"/wheels/ge2e_ext-*.whl)
echo "   $(basename "$wheel"): $(du -k "$wheel" | cut -f1) KiB"
done_step

step "install into the fresh environment and check from $work/empty"
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index \
  --ignore-installed "$wheel"
(cd "$work/empty" && "$VPY" "$repo/scripts/wheel_smoke.py" --version "$version" \
   --not-under "$repo" "${expect[@]}")
done_step
echo "== check_wheel: passed in $(( $(date +%s) - start )) s"
