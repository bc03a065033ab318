"""Build of ge2e_ext: a C++ CPU op, plus CUDA kernels when torch has CUDA and nvcc exists.

The extension is compiled against the torch it will run with, so build without
build isolation (isolation would build against another torch download):

    pip install --no-build-isolation -e .                       # development
    python -m build --sdist                                     # source archive (needs no torch)
    pip wheel --no-build-isolation --no-deps -w dist dist/ge2e_ext-*.tar.gz   # a wheel from it

scripts/check_wheel.sh does the last two, installs the wheel into a fresh
environment and checks it (CI runs it).

Environment:

- ``FORCE_CUDA=1``: fail the build when the CUDA kernels cannot be compiled,
  instead of falling back to a CPU-only build (CI sets it).
- ``GE2E_EXT_CUDA=0``: build the CPU op only, even where nvcc and a CUDA torch exist.
- ``CUDA_HOME``: the CUDA toolkit (the folder with bin/nvcc). When unset,
  /usr/local/cuda if it has bin/nvcc, else the toolkit of the nvcc on PATH. A
  CUDA_HOME without bin/nvcc and include/cuda_runtime.h, or whose nvcc's major
  version differs from torch's CUDA, gives a CPU-only build that says why (an
  error with FORCE_CUDA=1); the nvcc on PATH is never used in its place.
- ``TORCH_CUDA_ARCH_LIST``: the GPU architectures to compile for. When unset and
  no GPU is visible, "8.0;9.0+PTX" (A100, H100, and PTX for newer cards).
- ``MAX_JOBS``: parallel compile jobs (torch's ninja build honours it).
- ``GE2E_EXT_MARCH``: ``-march`` of the C++ code. Unset or empty (the default):
  none, the compiler's portable default, so the build runs on any CPU of its
  architecture. ``native`` (opt-in) tunes it to the build machine (AVX2/AVX-512
  where it has them; the result may die with an illegal instruction elsewhere);
  any other value is passed as ``-march=VALUE`` (e.g. ``x86-64-v3``).
- ``GE2E_EXT_ISA``: which instruction-set files (below) to compile: ``auto``
  (default: all of them on x86-64, none elsewhere), ``none``, or a comma list
  such as ``avx2``.

Per-file instruction-set flags (for run-time CPU dispatch). Every
``csrc/cpu/isa/*.cpp`` is part of the CPU op. A file whose name ends in
``_<isa>.cpp`` for an ``<isa>`` of ``ISA_FLAGS`` below is compiled with that
instruction set's flags on x86-64, e.g. ``csrc/cpu/isa/ge2e_cpu_avx2.cpp`` with
``-mavx2 -mfma -mf16c`` and ``csrc/cpu/isa/ge2e_cpu_avx512.cpp`` with the AVX-512
flags; the other files there, and every other source, get the portable flags.
On other architectures (or with ``GE2E_EXT_ISA=none``) the ``_<isa>.cpp`` files
are left out. So that the portable code knows which of them are linked in,
every translation unit of the extension gets ``-DGE2E_ISA_AVX2=1`` when the
``*_avx2.cpp`` files are compiled (likewise ``GE2E_ISA_AVX512``), and each
instruction-set file also gets ``-DGE2E_CPU_ISA=<isa>`` (e.g. for a namespace
of its own). Their objects are linked after the portable ones, so where an
inline function or template exists in both, the linker keeps the portable copy.
How: ``BuildExtensionWithISA`` (torch's BuildExtension) compiles each group of
such files through the same compiler wrapper (ninja or not) with the
extension's flags plus its own, and links the objects into the extension.
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# The torch versions the build supports: from the oldest on which the suite passes
# (the CPU op, 2.8.0: all but a test of torch.clamp's own gradient rule, which
# changed in 2.14; before 2.8, distributed=True fails on gloo, which lacks
# reduce_scatter) to the newest tested. README's Install lists what was tried.
# Keep MIN_TORCH in step with pyproject.toml's dependencies and the README.
MIN_TORCH = "2.8"
NEWEST_TESTED_TORCH = "2.14.1"

# Flags of the instruction-set files csrc/cpu/isa/*_<isa>.cpp, on x86-64.
ISA_DIR = os.path.join("csrc", "cpu", "isa")
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c"],
}

# setup.py commands that compile: only these import torch. The rest (sdist,
# egg_info, dist_info: a source archive, metadata) need no torch.
BUILD_COMMANDS = frozenset({
    "build", "build_ext", "build_clib", "bdist", "bdist_wheel", "bdist_egg", "bdist_dumb",
    "bdist_rpm", "develop", "install", "editable_wheel",
})


def read_version(root=HERE):
    """The version, read from ge2e_ext/_version.py without importing the package."""
    path = os.path.join(root, "ge2e_ext", "_version.py")
    with open(path, encoding="utf-8") as f:
        match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"no __version__ = \"...\" line in {path}")
    return match.group(1)


def _version_tuple(version):
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot read a version from {version!r}")
    return tuple(int(part or 0) for part in match.groups())


def check_torch_version(version):
    """Raises for a torch older than MIN_TORCH; returns a warning (or None) for one
    newer than NEWEST_TESTED_TORCH."""
    if _version_tuple(version) < _version_tuple(MIN_TORCH):
        raise RuntimeError(
            f"ge2e_ext needs torch >= {MIN_TORCH} (tested {MIN_TORCH} to {NEWEST_TESTED_TORCH}); "
            f"this build found torch {version}. Upgrade torch, then build again with "
            "--no-build-isolation.")
    if _version_tuple(version)[:2] > _version_tuple(NEWEST_TESTED_TORCH)[:2]:
        return (f"torch {version} is newer than the newest tested ({NEWEST_TESTED_TORCH}); "
                "building anyway")
    return None


def _truthy(value):
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _falsy(value):
    return (value or "").strip().lower() in ("0", "false", "no", "off")


def cpu_arch_flags(env=None):
    """-march of the C++ code: none by default (portable); GE2E_EXT_MARCH=native opts in."""
    env = os.environ if env is None else env
    march = env.get("GE2E_EXT_MARCH", "").strip()
    return [f"-march={march}"] if march else []


def cxx_flags(env=None):
    """The flags of every C++ file of the extension (the ISA files add theirs)."""
    # The C++ standard is the one torch requires (it adds it). -fno-math-errno
    # lets sqrt inline (errno is never read). -Werror=switch: a loss method or
    # dtype missing from a switch is an error.
    # -ffp-contract=off: the softmax gradient subtracts a row's rounded largest
    # difference from each rounded difference w (c_k - c_own); a fused
    # multiply-add (AVX2, AVX-512, any aarch64 build) would subtract it from the
    # unrounded product instead, which at w = 1e8 is off by more than 1.
    return (["-O3", "-fno-math-errno", "-ffp-contract=off", "-Werror=switch"]
            + cpu_arch_flags(env))


def is_x86_64(machine=None):
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "x64")


def enabled_isas(env=None, machine=None):
    """The instruction sets whose csrc/cpu/isa/*_<isa>.cpp files are compiled."""
    env = os.environ if env is None else env
    value = env.get("GE2E_EXT_ISA", "").strip().lower() or "auto"
    if not is_x86_64(machine):
        return []
    if value == "auto":
        return list(ISA_FLAGS)
    if value == "none":
        return []
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in ISA_FLAGS]
    if unknown:
        raise RuntimeError(f"GE2E_EXT_ISA: unknown instruction sets {unknown}; "
                           f"known: {sorted(ISA_FLAGS)}, or 'auto' or 'none'")
    return names


def isa_sources(root=HERE, env=None, machine=None):
    """(portable, groups): csrc/cpu/isa/*.cpp split into the files compiled with
    the portable flags and {isa: files} of those compiled with ISA_FLAGS[isa].
    Files of an instruction set that is not enabled are in neither."""
    portable, groups = [], {}
    enabled = enabled_isas(env, machine)
    for path in sorted(glob.glob(os.path.join(root, ISA_DIR, "*.cpp"))):
        rel = os.path.relpath(path, root)
        stem = os.path.splitext(os.path.basename(path))[0]
        isa = next((name for name in ISA_FLAGS if stem.endswith("_" + name)), None)
        if isa is None:
            portable.append(rel)
        elif isa in enabled:
            groups.setdefault(isa, []).append(rel)
    return portable, groups


def cpu_sources(root=HERE):
    """The C++ files of the CPU op (paths relative to root), ISA files excluded."""
    sources = []
    for folder in ("csrc", os.path.join("csrc", "autograd"), os.path.join("csrc", "cpu")):
        sources += sorted(os.path.relpath(path, root)
                          for path in glob.glob(os.path.join(root, folder, "*.cpp")))
    return sources


def cuda_sources(root=HERE):
    """The files of the CUDA kernels (paths relative to root)."""
    return [os.path.relpath(path, root) for pattern in ("*.cpp", "*.cu")
            for path in sorted(glob.glob(os.path.join(root, "csrc", "cuda", pattern)))]


def needs_extension(argv):
    """Whether these setup.py arguments compile anything (and so need torch)."""
    return any(arg in BUILD_COMMANDS for arg in argv[1:])


def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def guess_cuda_home(env=None):
    """Sets CUDA_HOME when it is unset, before torch.utils.cpp_extension reads it.

    torch guesses it from the nvcc on PATH, which finds /usr/local on machines
    whose nvcc is a symlink there; prefer /usr/local/cuda, then the real folder of
    the nvcc on PATH. Returns where CUDA_HOME came from (for messages)."""
    env = os.environ if env is None else env
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            return f"{name} in the environment"
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"
        return "the default location"
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        env["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        return f"the toolkit of the nvcc on PATH, {nvcc}"
    return "none found"


def cuda_problem(torch_version, torch_cuda, cuda_home, env=None, origin=""):
    """Why the CUDA kernels cannot be built here, or None when they can.

    torch_cuda: torch.version.cuda; cuda_home: torch.utils.cpp_extension.CUDA_HOME."""
    env = os.environ if env is None else env
    if _falsy(env.get("GE2E_EXT_CUDA")):
        return "GE2E_EXT_CUDA=0"
    if torch_cuda is None:
        return f"torch {torch_version} was built without CUDA"
    where = f" ({origin})" if origin else ""
    if not cuda_home:
        return ("no CUDA toolkit found: set CUDA_HOME to one (the folder with bin/nvcc), "
                f"CUDA {torch_cuda.split('.')[0]}.x for torch {torch_version}")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return (f"CUDA_HOME={cuda_home}{where} has no bin/nvcc: set CUDA_HOME to the CUDA "
                "toolkit (the folder with bin/nvcc and include/cuda_runtime.h)")
    if not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return (f"CUDA_HOME={cuda_home}{where} has no include/cuda_runtime.h: set CUDA_HOME "
                "to the CUDA toolkit")
    nvcc_version = _nvcc_version(nvcc)
    if nvcc_version is None:
        return f"{nvcc} --version failed"
    if nvcc_version.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"{nvcc} is CUDA {nvcc_version} but torch {torch_version} was built with "
                f"CUDA {torch_cuda}: set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit")
    return None


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise SystemExit(
            f"error: this build of ge2e_ext cannot import torch ({error}; Python "
            f"{sys.executable}).\nge2e_ext is compiled against the torch it will run with: "
            f"install torch >= {MIN_TORCH} first, then build without build isolation (which "
            "hides the installed torch), e.g.\n"
            "    pip install --no-build-isolation ge2e_ext\n"
            "    pip install --no-build-isolation -e .      (in a checkout)") from None
    try:
        warning = check_torch_version(torch.__version__)
    except RuntimeError as error:
        raise SystemExit(f"error: {error}") from None
    if warning:
        print(f"ge2e_ext: warning: {warning}")
    return torch


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionWithISA(BuildExtension):
        """torch's BuildExtension, plus the instruction-set files (module docstring):
        each group is compiled through the same compiler wrapper (ninja or not) with
        the extension's macros, include folders and flags plus ISA_FLAGS[isa], and its
        objects are linked after the extension's own."""

        def build_extension(self, ext):
            groups = getattr(ext, "ge2e_isa_groups", None)
            if not groups:
                return super().build_extension(ext)
            extra_objects, depends = list(ext.extra_objects or []), list(ext.depends or [])
            macros = list(ext.define_macros or []) + [(name,) for name in ext.undef_macros or []]
            args = ext.extra_compile_args
            base = list(args["cxx"] if isinstance(args, dict) else args or [])
            objects = []
            for isa, files in groups.items():
                flags = base + ISA_FLAGS[isa] + [f"-DGE2E_CPU_ISA={isa}"]
                print(f"ge2e_ext: compiling {', '.join(files)} with {' '.join(ISA_FLAGS[isa])}")
                objects += self.compiler.compile(
                    files, output_dir=self.build_temp, macros=macros,
                    include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs={"cxx": flags, "nvcc": []}, depends=depends)
            try:
                ext.extra_objects = extra_objects + objects
                # A change to an ISA file alone must relink the extension.
                ext.depends = depends + [f for files in groups.values() for f in files]
                return super().build_extension(ext)
            finally:
                ext.extra_objects, ext.depends = extra_objects, depends

    return BuildExtensionWithISA


def _extension(torch, cuda_home_origin):
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    # Paths relative to the project folder, which pip and build run this file in.
    portable_isa, isa_groups = isa_sources()
    sources = cpu_sources() + portable_isa
    # at::parallel_for is inline: it runs in parallel only where the file that
    # calls it is compiled with OpenMP. Linking with -fopenmp adds a need for
    # libgomp.so.1, which the process already has from torch (its copy).
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    flags = cxx_flags() + openmp
    if not is_x86_64():
        print(f"ge2e_ext: {platform.machine()}: no instruction-set files (x86-64 only)")
    macros = [(f"GE2E_ISA_{isa.upper()}", "1") for isa in isa_groups]
    print(f"ge2e_ext: C++ flags {' '.join(flags)}; instruction-set files: "
          f"{', '.join(f'{isa} ({len(files)})' for isa, files in isa_groups.items()) or 'none'}")

    origin = cuda_home_origin
    problem = cuda_problem(torch.__version__, torch.version.cuda, CUDA_HOME, origin=origin)
    if problem is not None:
        if _truthy(os.environ.get("FORCE_CUDA")):
            raise SystemExit(f"error: FORCE_CUDA=1 but the CUDA kernels cannot be built: {problem}")
        print(f"ge2e_ext: building the CPU op only: {problem}")
        ext = CppExtension("ge2e_ext._C", sources, define_macros=macros,
                           extra_compile_args={"cxx": flags}, extra_link_args=openmp)
    else:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        print(f"ge2e_ext: building CPU and CUDA kernels (CUDA_HOME={CUDA_HOME}: {origin}; "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')})")
        sources += cuda_sources()
        # No --use_fast_math: exp/log accuracy matters for the log-sum-exp.
        nvcc_flags = ["-O3", "-lineinfo", "-Xcompiler", "-Werror=switch"]
        ext = CUDAExtension("ge2e_ext._C", sources,
                            define_macros=[("GE2E_WITH_CUDA", None)] + macros,
                            extra_compile_args={"cxx": flags, "nvcc": nvcc_flags},
                            extra_link_args=openmp)
    ext.ge2e_isa_groups = isa_groups
    return ext


def main():
    kwargs = {}
    if needs_extension(sys.argv):
        # torch.utils.cpp_extension reads CUDA_HOME when imported.
        cuda_home_origin = guess_cuda_home()
        torch = _import_torch()
        kwargs = {"ext_modules": [_extension(torch, cuda_home_origin)],
                  "cmdclass": {"build_ext": _build_ext_class()}}
    # Name, description, dependencies (torch >= MIN_TORCH): pyproject.toml.
    setup(
        version=read_version(),
        packages=find_packages(include=["ge2e_ext", "ge2e_ext.*"]),
        zip_safe=False,
        **kwargs,
    )


# pip and `python -m build` run this file as __main__ too; importing it (the
# packaging tests do) only defines the helpers above.
if __name__ == "__main__":
    main()
