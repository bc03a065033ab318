"""Packaging, checked cheaply (no network, no compiler): the source archive holds
everything a build and the tests need, the version has one source, and the build's
defaults are portable. setup.py's helpers are imported without running setup().

The real thing (sdist, a wheel built from it in an empty folder, installed into a
fresh environment and run) is scripts/check_wheel.sh, which CI runs after the tests.
"""

import importlib.util
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

import ge2e_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Never part of the archive: build products and caches.
BUILD_PRODUCTS = re.compile(r"(\.so|\.o|\.pyc|\.pyo)$")


def _load_setup():
    spec = importlib.util.spec_from_file_location("ge2e_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


setup_py = _load_setup()


def without_force_cuda(**switches):
    """The environment with FORCE_CUDA unset (CI sets it) and switches added: for builds
    that leave the kernels out on purpose, which FORCE_CUDA=1 turns into an error."""
    env = {k: v for k, v in os.environ.items() if k != "FORCE_CUDA"}
    env.update(switches)
    return env


def _files_under(root, folder):
    """Files under root/folder, as archive-relative paths, build products left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        found += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                  for f in filenames if not BUILD_PRODUCTS.search(f)]
    return found


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The source archive of a copy of the checkout (build outputs and all), made with
    torch made unimportable: (the copy, {archive-relative path: member})."""
    tmp = tmp_path_factory.mktemp("sdist")
    copy = tmp / "src"
    top_level_skip = {".git", ".venv", "build", "dist", ".hypothesis", ".pytest_cache",
                      "bench_results", "example_results"}

    def ignore(folder, names):
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if os.path.abspath(folder) == ROOT:
            skip |= top_level_skip & set(names)
        return skip

    shutil.copytree(ROOT, copy, ignore=ignore, symlinks=True)
    code = ("import sys; sys.modules['torch'] = None; "  # making the archive needs no torch
            f"sys.argv = ['setup.py', '-q', 'sdist', '--dist-dir', {str(tmp / 'dist')!r}]; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), "
            f"{{'__name__': '__main__', '__file__': {str(copy / 'setup.py')!r}}})")
    result = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    (archive,) = (tmp / "dist").iterdir()
    assert archive.name == f"ge2e_ext-{setup_py.read_version()}.tar.gz"
    prefix = archive.name[:-len(".tar.gz")] + "/"
    with tarfile.open(archive) as tar:
        members = {m.name[len(prefix):]: m for m in tar.getmembers() if m.isfile()}
        metadata = {name: tar.extractfile(prefix + name).read().decode()
                    for name in ("PKG-INFO", "ge2e_ext.egg-info/requires.txt")}
    return str(copy), members, metadata


def test_sdist_has_every_source_header_and_test_file(sdist):
    copy, members, _ = sdist
    wanted = ["README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "Makefile"]
    for folder in ("csrc", "ge2e_ext", "tests", "docs", "scripts", "benchmarks", "examples"):
        wanted += _files_under(copy, folder)
    assert any(f.endswith(".h") for f in wanted) and any(f.endswith(".cuh") for f in wanted)
    assert "tests/cuda_emulation/emulate.h" in wanted
    missing = sorted(set(wanted) - set(members))
    assert not missing, f"missing from the source archive: {missing}"


def test_sdist_has_no_build_products(sdist):
    copy, members, _ = sdist
    built = sorted(f for f in members if BUILD_PRODUCTS.search(f) or "__pycache__" in f)
    assert not built, f"build products in the source archive: {built}"
    assert not any(f.startswith(("build/", ".venv/", ".git/")) for f in members)


def test_sdist_keeps_the_scripts_executable(sdist):
    _, members, _ = sdist
    for name in ("scripts/check_wheel.sh", "scripts/setup_env.sh"):
        if name in members:
            assert members[name].mode & stat.S_IXUSR, f"{name} lost its executable bit"


def test_sdist_has_what_the_readme_links(sdist):
    _, members, _ = sdist
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        targets = re.findall(r"\]\(([^)\s]+)\)", f.read())
    local = {t.split("#")[0] for t in targets
             if not re.match(r"[a-z]+:", t) and not t.startswith("#")}
    assert local, "expected the README to link some of the project's files"
    missing = sorted(t for t in local
                     if t not in members and not any(m.startswith(t.rstrip("/") + "/")
                                                     for m in members))
    assert not missing, f"the README links files the source archive lacks: {missing}"


def test_sdist_metadata(sdist):
    """The archive is unpinned (it is compiled later, against whatever torch is there),
    and says its licence, which it carries."""
    _, members, metadata = sdist
    pkg_info = metadata["PKG-INFO"]
    assert f"\nVersion: {setup_py.read_version()}\n" in pkg_info
    assert f"torch>={setup_py.MIN_TORCH}" in metadata["ge2e_ext.egg-info/requires.txt"].split()
    assert "\nLicense-Expression: BSD-3-Clause\n" in pkg_info
    assert "\nLicense-File: LICENSE\n" in pkg_info
    assert "\nClassifier: Programming Language :: Python :: 3\n" in pkg_info
    for name in ("LICENSE", "CHANGELOG.md", "CITATION.cff", "ge2e_ext/py.typed"):
        assert name in members, f"{name} is missing from the source archive"


def test_build_metadata_pins_the_torch_it_compiles_against(sdist, tmp_path):
    """dist_info (what pip reads before building a wheel) and the wheel say the torch
    release the module is compiled against; scripts/check_wheel.sh checks the wheel."""
    import torch
    copy, _, _ = sdist
    result = subprocess.run([sys.executable, "setup.py", "-q", "dist_info", "--output-dir",
                             str(tmp_path)], cwd=copy, capture_output=True, text=True,
                            timeout=300, env=without_force_cuda(GE2E_EXT_CUDA="0"))
    assert result.returncode == 0, result.stdout + result.stderr
    (info,) = tmp_path.glob("ge2e_ext-*.dist-info")
    requires = [line for line in (info / "METADATA").read_text().splitlines()
                if line.startswith("Requires-Dist:")]
    assert requires == [f"Requires-Dist: torch=={torch.__version__.split('+')[0]}"]


def test_torch_pin_refuses_another_torch():
    requirements = pytest.importorskip("packaging.requirements")
    pin = requirements.Requirement(setup_py.torch_requirement("2.14.1+cu130"))
    assert pin.name == "torch"
    # Every build of the release (PEP 440: a specifier without a local label ignores it)...
    for version in ("2.14.1", "2.14.1+cu130", "2.14.1+cpu"):
        assert pin.specifier.contains(version), version
    # ...and no other release, older or newer, though it meets the sdist's >= MIN_TORCH.
    unpinned = requirements.Requirement(setup_py.torch_requirement())
    for version in ("2.13.0", "2.14.0", "2.14.2", "2.15.0"):
        assert not pin.specifier.contains(version), version
        assert unpinned.specifier.contains(version), version
    assert str(unpinned) == f"torch>={setup_py.MIN_TORCH}"


def test_one_version_source():
    assert ge2e_ext.__version__ == setup_py.read_version()
    with open(os.path.join(ROOT, "ge2e_ext", "__init__.py"), encoding="utf-8") as f:
        init = f.read()
    assert not re.search(r"__version__\s*=", init), "the version belongs in ge2e_ext/_version.py"
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert "version" not in project and "version" in project["dynamic"]


def test_torch_range_is_stated_alike():
    """setup.py's MIN_TORCH is the source archive's dependency and the README's."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert "dependencies" not in project and "dependencies" in project["dynamic"]
    assert setup_py.torch_requirement() == f"torch>={setup_py.MIN_TORCH}"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    assert f"PyTorch {setup_py.MIN_TORCH} to {setup_py.NEWEST_TESTED_TORCH}" in readme


def test_torch_version_check():
    with pytest.raises(RuntimeError, match=rf"needs torch >= {re.escape(setup_py.MIN_TORCH)}"):
        setup_py.check_torch_version("2.3.1")
    assert setup_py.check_torch_version(setup_py.MIN_TORCH + ".0") is None
    assert setup_py.check_torch_version(setup_py.NEWEST_TESTED_TORCH + "+cu130") is None
    assert "newer than the newest tested" in setup_py.check_torch_version("99.1.0")


def test_default_flags_are_portable():
    assert not any(f.startswith("-march") for f in setup_py.cxx_flags({}))
    assert not any(f.startswith("-march") for f in setup_py.cxx_flags({"GE2E_EXT_MARCH": ""}))
    assert setup_py.cxx_flags({"GE2E_EXT_MARCH": "native"})[-1] == "-march=native"
    assert setup_py.cxx_flags({"GE2E_EXT_MARCH": "x86-64-v3"})[-1] == "-march=x86-64-v3"
    for flags in setup_py.ISA_FLAGS.values():
        assert not any(f.startswith("-march") for f in flags)


def test_instruction_set_files(tmp_path):
    assert setup_py.sources(str(tmp_path), {}, "x86_64") == ([], {}, [])  # no csrc
    isa = tmp_path / "csrc" / "cpu" / "isa"
    isa.mkdir(parents=True)
    for name in ("rows_avx2.cpp", "rows_avx512.cpp", "dispatch.cpp", "rows.h"):
        (isa / name).write_text("")
    (tmp_path / "csrc" / "cpu" / "kernel.cpp").write_text("")
    (tmp_path / "csrc" / "cuda").mkdir()
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("")
    path = os.path.join("csrc", "cpu", "{}").format
    portable = [path("kernel.cpp"), path(os.path.join("isa", "dispatch.cpp"))]
    avx2, avx512 = path(os.path.join("isa", "rows_avx2.cpp")), path(
        os.path.join("isa", "rows_avx512.cpp"))
    assert setup_py.sources(str(tmp_path), {}, "x86_64") == (
        portable, {"avx2": [avx2], "avx512": [avx512]}, [os.path.join("csrc", "cuda", "k.cu")])
    assert setup_py.sources(str(tmp_path), {}, "aarch64")[:2] == (portable, {})
    assert setup_py.sources(str(tmp_path), {"GE2E_EXT_ISA": "none"}, "x86_64")[1] == {}
    assert setup_py.sources(str(tmp_path), {"GE2E_EXT_ISA": "avx2"}, "x86_64")[1] == {
        "avx2": [avx2]}
    with pytest.raises(RuntimeError, match=r"unknown instruction sets \['sse9'\]"):
        setup_py.sources(str(tmp_path), {"GE2E_EXT_ISA": "sse9"}, "x86_64")


def test_only_some_commands_import_torch():
    """The commands that compile, and dist_info (the metadata of a wheel build: pinned),
    import torch; the source archive's commands do not. Any argument that names one
    counts (a needless torch import is harmless, a wheel without the module is not)."""
    def imports_torch(argv):
        return any(arg in setup_py.TORCH_COMMANDS for arg in argv)

    for argv in (["sdist", "--dist-dir", "/tmp/d"], ["egg_info"], ["--version"]):
        assert not imports_torch(argv), argv
    for argv in (["bdist_wheel", "--dist-dir", "x"], ["editable_wheel"], ["build_ext", "-i"],
                 ["develop"], ["install"], ["dist_info", "--output-dir", "/tmp/m"]):
        assert imports_torch(argv), argv


def test_importing_setup_py_runs_nothing():
    path = os.path.join(ROOT, "setup.py")
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('s', {path!r}); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "assert 'torch' not in sys.modules, 'importing setup.py imported torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr


def _fake_toolkit(root, release):
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return str(root)


def test_cuda_problems_are_named(tmp_path):
    problem = setup_py.cuda_problem
    assert problem("2.14.1", "13.0", "/x", {"GE2E_EXT_CUDA": "0"}) == "GE2E_EXT_CUDA=0"
    assert "without CUDA" in problem("2.13.0+cpu", None, "/usr/local/cuda", {})
    assert "no CUDA toolkit at CUDA_HOME=None" in problem("2.14.1", "13.0", None, {})
    assert "no CUDA toolkit at CUDA_HOME=/nonexistent" in problem("2.14.1", "13.0",
                                                                  "/nonexistent", {})
    cuda12 = _fake_toolkit(tmp_path / "cuda12", "12.1")
    assert problem("2.4.0", "12.4", cuda12, {}) is None
    assert "CUDA 12.1 but torch 2.14.1 was built with CUDA 13.0" in problem(
        "2.14.1", "13.0", cuda12, {})
    no_headers = tmp_path / "no_headers"
    shutil.copytree(cuda12, no_headers)
    os.remove(no_headers / "include" / "cuda_runtime.h")
    assert "no CUDA toolkit" in problem("2.4.0", "12.4", str(no_headers), {})


@pytest.mark.parametrize("switches, message", [
    ({"CUDA_HOME": "/nonexistent"}, "no CUDA toolkit at CUDA_HOME=/nonexistent"),
    ({"GE2E_EXT_CUDA": "0"}, "GE2E_EXT_CUDA=0"),
])
def test_force_cuda_stops_a_build_that_would_lose_the_kernels(switches, message, tmp_path):
    """README's switches as a build sees them: with FORCE_CUDA=1, a CUDA_HOME that
    points nowhere (never replaced by the nvcc on PATH) or GE2E_EXT_CUDA=0 stops the
    build before anything is compiled, naming the reason."""
    import torch
    if torch.version.cuda is None and "CUDA_HOME" in switches:
        message = "was built without CUDA"
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH", "GE2E_EXT_CUDA")}
    env.update(switches, FORCE_CUDA="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "setup.py"), "build_ext",
                             "--build-temp", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "FORCE_CUDA=1 but the CUDA kernels cannot be built: " in result.stderr, result.stderr
    assert message in result.stderr


def test_long_steps_say_what_they_do(tmp_path):
    """scripts/progress.sh (setup_env.sh, check_wheel.sh): the step and its estimate, what
    the command last said while it runs (ninja's finished files as "compiled i of n"), the
    seconds it took; a failing step shows its log's end and passes its exit status on."""
    # The step's command goes on only once the progress line for what it said is
    # out (it watches run_step's output file), so no machine load can reorder them.
    shown = tmp_path / "shown.txt"
    wait_for = "until grep -q {0} {1}; do sleep 0.1; done".format
    step = ("echo starting; " + wait_for("'s: starting$'", shown)
            + "; echo '[2/5] c++ -O3 -c /x/csrc/cpu/k.cpp -o k.o'; "
            + wait_for("'s: compiled 2 of 5'", shown))
    script = (f"source {os.path.join(ROOT, 'scripts', 'progress.sh')!r}; "
              f"exec > {shown}; "
              f"run_step 'a step' 'about 3 s' bash -c {shlex.quote(step)}; "
              "run_step 'a failing step' 'a moment' bash -c 'echo the reason; exit 7'; "
              "echo not reached")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PROGRESS_EVERY": "1", "TMPDIR": str(tmp_path)})
    out = shown.read_text()
    assert result.returncode == 7, out + result.stderr
    assert re.search(r"^== \[\d\d:\d\d:\d\d\] a step \(usually about 3 s\)$", out, re.M), out
    assert re.search(r"^   \.\.\. \d+ s: starting$", out, re.M), out
    assert re.search(r"^   \.\.\. \d+ s: compiled 2 of 5, the last csrc/cpu/k\.cpp$", out,
                     re.M), out
    assert re.search(r"^   done in \d+ s \(\d+ s in all\)$", out, re.M), out
    assert "the reason" in out and "not reached" not in out
    assert "'a failing step' failed after" in result.stderr
