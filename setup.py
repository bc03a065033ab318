"""Build of ge2e_ext against the torch it runs with (pip install --no-build-isolation -e .;
README.md, Install, gives the switches). torch's cpp_extension finds CUDA and compiles; this
decides what: the CUDA kernels or, saying why, the CPU op alone, and the ISA files."""

import glob
import os
import platform
import re
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The oldest torch the suite passes on, and the newest tested (README, Install).
MIN_TORCH, NEWEST_TESTED_TORCH = "2.8", "2.14.1"
# Flags of csrc/cpu/isa/*_<isa>.cpp (x86-64; picked at run time), added to the others' with
# -DGE2E_CPU_ISA=<isa>; all files get -DGE2E_ISA_<ISA>=1 for each set that is linked in.
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c"],
}
# Commands that import torch: those that compile, and dist_info (a wheel's metadata: pinned).
TORCH_COMMANDS = frozenset({"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg",
                            "develop", "install", "editable_wheel", "dist_info"})


def read_version(root=HERE):
    """The version, read from ge2e_ext/_version.py without importing the package."""
    with open(os.path.join(root, "ge2e_ext", "_version.py"), encoding="utf-8") as f:
        return re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", f.read(), re.M).group(1)


def check_torch_version(version):
    """Raises for a torch older than MIN_TORCH; a warning (or None) for one newer than tested."""
    def _release(v):
        return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", v).group().split("."))
    if _release(version) < _release(MIN_TORCH):
        raise RuntimeError(f"ge2e_ext needs torch >= {MIN_TORCH} (tested {MIN_TORCH} to "
                           f"{NEWEST_TESTED_TORCH}); this build found torch {version}. Upgrade "
                           "torch, then build again with --no-build-isolation.")
    if _release(version)[:2] > _release(NEWEST_TESTED_TORCH)[:2]:
        return f"torch {version} is newer than the newest tested ({NEWEST_TESTED_TORCH})"


def torch_requirement(torch_version=None):
    """A wheel's torch is the release it was compiled against (its C++ ABI), as torchvision
    pins it: ``==2.14.1`` matches 2.14.1+cu130 and PyPI's 2.14.1 (PEP 440); an sdist MIN_TORCH."""
    return f"torch=={torch_version.split('+')[0]}" if torch_version else f"torch>={MIN_TORCH}"


def cxx_flags(env=os.environ):
    """Every C++ file's flags: -fno-math-errno inlines sqrt; -Werror=switch catches a loss
    method or dtype missing from a switch; -ffp-contract=off keeps the softmax gradient's
    w (c_k - c_own) - max as written (an FMA subtracts the rounded max from the unrounded
    product: off by more than 1 at w = 1e8); GE2E_EXT_MARCH gives -march (none: portable)."""
    march = env.get("GE2E_EXT_MARCH", "").strip()
    return (["-O3", "-fno-math-errno", "-ffp-contract=off", "-Werror=switch"]
            + ([f"-march={march}"] if march else []))


def sources(root=HERE, env=os.environ, machine=None):
    """(cpu, {isa: files}, cuda), relative to root. GE2E_EXT_ISA=auto (all on x86-64),
    none or a list names the instruction sets whose ``_<isa>.cpp`` files are compiled."""
    def files(*parts):
        return [os.path.relpath(p, root) for p in sorted(glob.glob(os.path.join(root, *parts)))]
    value = env.get("GE2E_EXT_ISA", "").strip().lower() or "auto"
    enabled = {"auto": list(ISA_FLAGS), "none": []}.get(value, [v.strip() for v in
                                                                value.split(",")])
    unknown = sorted(set(enabled) - set(ISA_FLAGS))
    if unknown:
        raise RuntimeError(f"GE2E_EXT_ISA: unknown instruction sets {unknown}; "
                           f"known: {sorted(ISA_FLAGS)}, or 'auto' or 'none'")
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        enabled = []
    cpu, groups = [p for d in ("", "autograd", "cpu") for p in files("csrc", d, "*.cpp")], {}
    for path in files("csrc", "cpu", "isa", "*.cpp"):
        isa = next((i for i in ISA_FLAGS if path.endswith(f"_{i}.cpp")), None)
        if isa is None:
            cpu.append(path)
        elif isa in enabled:
            groups.setdefault(isa, []).append(path)
    return cpu, groups, files("csrc", "cuda", "*.cpp") + files("csrc", "cuda", "*.cu")


def cuda_problem(torch_version, torch_cuda, cuda_home, env=os.environ):
    """Why the CUDA kernels cannot be built with cpp_extension's CUDA_HOME (None: they can)."""
    if env.get("GE2E_EXT_CUDA", "").strip().lower() in ("0", "false", "no", "off"):
        return "GE2E_EXT_CUDA=0"
    if torch_cuda is None:
        return f"torch {torch_version} was built without CUDA"
    major, nvcc = torch_cuda.split(".")[0], os.path.join(cuda_home or "", "bin", "nvcc")
    if not cuda_home or not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return (f"no CUDA toolkit at CUDA_HOME={cuda_home}: set CUDA_HOME to the folder with "
                f"bin/nvcc and include/cuda_runtime.h of a CUDA {major}.x")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
        release = re.search(r"release (\d+)\.(\d+)", out.stdout).group(1, 2)
    except (OSError, subprocess.SubprocessError, AttributeError):
        return f"{nvcc} --version failed"
    if release[0] != major:
        return (f"{nvcc} is CUDA {'.'.join(release)} but torch {torch_version} was built with "
                f"CUDA {torch_cuda}: set CUDA_HOME to a CUDA {major}.x toolkit")
    return None


def _build_kwargs():
    """setup()'s ext_modules, cmdclass and pinned install_requires, from the torch here. torch
    guesses CUDA_HOME above the nvcc on PATH (/usr/local for a wrapper): /usr/local/cuda first."""
    if os.path.isfile("/usr/local/cuda/bin/nvcc") and not os.environ.get("CUDA_PATH"):
        os.environ["CUDA_HOME"] = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
        warning = check_torch_version(torch.__version__)
    except (ImportError, RuntimeError) as error:  # no torch here, or too old
        raise SystemExit(f"error: ge2e_ext's build: {error} (Python {sys.executable}). It is "
                         f"compiled against the torch it runs with: install torch >= {MIN_TORCH}, "
                         "then build without build isolation: pip install --no-build-isolation .")
    if warning:
        print(f"ge2e_ext: warning: {warning}; building anyway")
    cpu, isa_groups, cuda = sources()  # relative: pip runs this file in its folder
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []  # at::parallel_for
    print(f"ge2e_ext: C++ flags {' '.join(cxx_flags() + openmp)}; instruction-set files: "
          f"{', '.join(f'{isa} ({len(f)})' for isa, f in isa_groups.items()) or 'none'}")
    # Not py_limited_api: the ops go through torch's dispatcher, but the autograd nodes'
    # Python names (Ge2eLossBackward0, csrc/autograd/ge2e_autograd.cpp) take torch's
    # Python C++ API, which needs CPython's full headers: one wheel per Python version.
    kwargs = dict(define_macros=[(f"GE2E_ISA_{isa.upper()}", "1") for isa in isa_groups],
                  extra_compile_args={"cxx": cxx_flags() + openmp}, extra_link_args=openmp)
    problem = cuda_problem(torch.__version__, torch.version.cuda, cpp_extension.CUDA_HOME)
    if problem is None:
        print(f"ge2e_ext: building CPU and CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME})")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # A100, H100, PTX for newer
        kwargs["define_macros"].append(("GE2E_WITH_CUDA", None))
        # No --use_fast_math: exp/log accuracy matters for the log-sum-exp.
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", "-Xcompiler", "-Werror=switch"]
        ext = cpp_extension.CUDAExtension("ge2e_ext._C", cpu + cuda, **kwargs)
    elif os.environ.get("FORCE_CUDA", "").strip().lower() in ("1", "true", "yes", "on"):
        raise SystemExit(f"error: FORCE_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    else:
        print(f"ge2e_ext: building the CPU op only: {problem}")
        ext = cpp_extension.CppExtension("ge2e_ext._C", cpu, **kwargs)
    class BuildExtension(cpp_extension.BuildExtension):
        """torch's, also compiling each instruction set's files with its flags added."""
        def build_extension(self, ext):
            extra_objects, depends = list(ext.extra_objects), list(ext.depends)
            for isa, files in isa_groups.items():
                print(f"ge2e_ext: compiling {', '.join(files)} with {' '.join(ISA_FLAGS[isa])}")
                flags = ext.extra_compile_args["cxx"] + ISA_FLAGS[isa] + [f"-DGE2E_CPU_ISA={isa}"]
                ext.extra_objects += self.compiler.compile(
                    files, output_dir=self.build_temp, macros=ext.define_macros, debug=self.debug,
                    include_dirs=ext.include_dirs, depends=depends,
                    extra_postargs={"cxx": flags, "nvcc": []})
                ext.depends += files  # a change to one relinks
            try:
                super().build_extension(ext)
            finally:
                ext.extra_objects, ext.depends = extra_objects, depends
            built = os.path.basename(self.get_ext_filename(ext.name))  # _C.cpython-*.so
            for path in glob.glob(os.path.join(HERE, "ge2e_ext", "_C.*.so")):
                if os.path.basename(path) != built:  # another build's _C.*.so, imported first
                    os.remove(path)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension},
            "install_requires": [torch_requirement(torch.__version__)]}


def main(argv=sys.argv):
    uses_torch = any(arg in TORCH_COMMANDS for arg in argv[1:])  # sdist, egg_info: no torch
    kwargs = _build_kwargs() if uses_torch else {"install_requires": [torch_requirement()]}
    setup(version=read_version(), packages=find_packages(include=["ge2e_ext", "ge2e_ext.*"]),
          package_data={"ge2e_ext": ["py.typed"]}, zip_safe=False, **kwargs)


if __name__ == "__main__":  # pip and build run it so; the tests import the helpers
    main()
