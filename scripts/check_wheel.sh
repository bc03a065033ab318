#!/usr/bin/env bash
# ge2e_ext as a user gets it: builds the source archive (python -m build --sdist),
# then a wheel from that archive alone, in an empty folder (pip wheel
# --no-build-isolation), installs the wheel into a fresh virtual environment and
# checks it from outside the checkout with scripts/wheel_smoke.py (import, version,
# extension_devices(), loss and gradients against backend="torch"). It also checks the
# wheel's metadata (licence, py.typed, the Python tag, the exact torch it requires) and
# that pip refuses to install it next to another torch. Each step says what it does,
# how long it usually takes and, every 30 s, what it is doing (scripts/progress.sh).
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
source "$repo/scripts/progress.sh"
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

torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
VPY=$work/venv/bin/python
fresh_venv() {
  "$PY" -m venv "$work/venv"
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  vsite=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site" > "$vsite/_ge2e_check_base_packages.pth"
  "$VPY" -m pip install --progress-bar off --disable-pip-version-check build
}
run_step "fresh virtual environment in $work/venv (with torch $torch_version from $PY)" \
  "10-30 s" fresh_venv

# setuptools leaves ge2e_ext.egg-info in the checkout; remove it unless it was there.
[[ -e $repo/ge2e_ext.egg-info ]] && had_egg_info=yes || had_egg_info=no
sdist_in_empty() { cd "$work/empty" && "$VPY" -m build --sdist --outdir "$work/dist" "$repo"; }
STEP_LOG=$work/sdist.log run_step "source archive: python -m build --sdist" "10-30 s" sdist_in_empty
[[ $had_egg_info == no ]] && rm -rf "$repo/ge2e_ext.egg-info"
sdist=$(ls "$work"/dist/ge2e_ext-*.tar.gz)
files=$(tar tzf "$sdist" | grep -vc '/$')
echo "   $(basename "$sdist"): $files files, $(du -k "$sdist" | cut -f1) KiB"

wheel_in_empty() {
  cd "$work/empty" && "$PY" -m pip wheel -v --no-build-isolation --no-deps --no-index \
    --disable-pip-version-check --wheel-dir "$work/wheels" "$sdist"
}
STEP_LOG=$work/wheel.log run_step \
  "wheel from the source archive alone: pip wheel --no-build-isolation (in $work/empty)" \
  "2-6 minutes on 2 free cores with the CUDA kernels, 1-3 without; 10-15 on a busy machine" \
  wheel_in_empty
# (setup.py runs twice: the metadata pip reads first, then the build.)
grep -E '^ *ge2e_ext: ' "$work/wheel.log" | sed 's/^ */   /' | awk '!seen[$0]++' || true
if [[ ${GE2E_EXT_MARCH:-} != native ]] && grep -q -- '-march=native' "$work/wheel.log"; then
  echo "check_wheel: the wheel was compiled with -march=native" \
       "though GE2E_EXT_MARCH is not 'native'" >&2
  exit 1
fi
wheel=$(ls "$work"/wheels/ge2e_ext-*.whl)
echo "   $(basename "$wheel"): $(du -k "$wheel" | cut -f1) KiB"

echo "== [$(date +%H:%M:%S)] the wheel's metadata: licence, py.typed, Python tag, torch pin (seconds)"
"$PY" - "$wheel" "$torch_version" <<'PYEOF'
import sys, sysconfig, zipfile
wheel, torch_version = sys.argv[1], sys.argv[2]
python_tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"  # one wheel per Python version
soabi = sysconfig.get_config_var("SOABI")                       # e.g. cpython-311-x86_64-linux-gnu
names = zipfile.ZipFile(wheel).namelist()
info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
requires = [l for l in metadata.splitlines() if l.startswith("Requires-Dist:")]
pin = "Requires-Dist: torch==" + torch_version.split("+")[0]
problems = [f"{what}" for what, ok in [
    (f"METADATA requires {requires}, expected exactly [{pin!r}]", requires == [pin]),
    ("METADATA lacks License-Expression: BSD-3-Clause",
     "\nLicense-Expression: BSD-3-Clause\n" in metadata),
    (f"no LICENSE in {info}", any(n.startswith(info) and n.endswith("/LICENSE") for n in names)),
    ("no ge2e_ext/py.typed", "ge2e_ext/py.typed" in names),
    (f"the wheel is not tagged {python_tag}", f"-{python_tag}-{python_tag}-" in wheel),
    (f"no ge2e_ext/_C.{soabi}.so", f"ge2e_ext/_C.{soabi}.so" in names)] if not ok]
for problem in problems:
    print(f"check_wheel: {problem}", file=sys.stderr)
print(f"   {pin}; {'; '.join(n for n in names if 'LICENSE' in n)}; py.typed; {python_tag}")
sys.exit(1 if problems else 0)
PYEOF

# pip resolves the wheel's requirements against the environment of $PY (--dry-run
# installs nothing; --no-index and --isolated: no index, no configured find-links):
# as it is, then with a stand-in torch dist-info of another release first on the path.
echo "== [$(date +%H:%M:%S)] pip accepts the wheel next to torch $torch_version and refuses it" \
     "next to another torch (seconds)"
dry_run=("$PY" -m pip --isolated install --dry-run --no-index --disable-pip-version-check)
"${dry_run[@]}" "$wheel" > "$work/accept.log" 2>&1 \
  || { cat "$work/accept.log"; echo "check_wheel: pip refused the wheel next to torch" \
       "$torch_version, the torch it was built with" >&2; exit 1; }
other=$("$PY" -c 'import sys, torch; major, minor = torch.__version__.split(".")[:2]
print(f"{major}.{int(minor) - 1 if int(minor) > 8 else int(minor) + 1}.0")')
mkdir -p "$work/other_torch/torch-$other.dist-info"
printf 'Metadata-Version: 2.1\nName: torch\nVersion: %s\n' "$other" \
  > "$work/other_torch/torch-$other.dist-info/METADATA"
if PYTHONPATH=$work/other_torch "${dry_run[@]}" "$wheel" > "$work/refuse.log" 2>&1; then
  cat "$work/refuse.log"
  echo "check_wheel: pip would install the wheel next to torch $other" >&2
  exit 1
fi
grep -q "depends on torch==${torch_version%%+*}" "$work/refuse.log" \
  || { cat "$work/refuse.log"; echo "check_wheel: pip failed, but not on torch" >&2; exit 1; }
echo "   next to torch $torch_version: $(tail -n 1 "$work/accept.log")"
echo "   next to torch $other: refused, $(grep -m1 'depends on torch' "$work/refuse.log" \
  | sed 's/^ *//')"

check_installed() {
  "$VPY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index \
    --ignore-installed "$wheel"
  cd "$work/empty" && "$VPY" "$repo/scripts/wheel_smoke.py" --version "$version" \
    --not-under "$repo" "${expect[@]}"
}
STEP_LOG=$work/smoke.log run_step "install into the fresh environment and check from $work/empty" \
  "10-30 s" check_installed
sed 's/^/   /' "$work/smoke.log"
echo "== check_wheel: passed in $(( $(date +%s) - start )) s"
