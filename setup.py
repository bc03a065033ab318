"""Build of ge2e_ext: a C++ CPU op, plus CUDA kernels when torch has CUDA and nvcc exists.

Install with ``pip install --no-build-isolation -e .`` (build isolation would pull
another torch). Environment:

- ``FORCE_CUDA=1``: fail the build when the CUDA kernels cannot be compiled,
  instead of falling back to a CPU-only build (CI sets it).
- ``TORCH_CUDA_ARCH_LIST``: the GPU architectures to compile for. When unset and
  no GPU is visible, "8.0;9.0+PTX" (A100, H100, and PTX for newer cards).
- ``MAX_JOBS``: parallel compile jobs (torch's ninja build honours it).
- ``CUDA_HOME``: the CUDA toolkit; when unset, /usr/local/cuda is used if it exists.
- ``GE2E_EXT_CUDA=0``: build the CPU op only, even where nvcc and a CUDA torch exist.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME when imported; guessing it from the
# nvcc on PATH finds /usr/local on machines whose nvcc is a symlink there.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_problem():
    """Why the CUDA kernels cannot be built here, or None when they can."""
    if os.environ.get("GE2E_EXT_CUDA", "").strip().lower() in ("0", "false", "no", "off"):
        return "GE2E_EXT_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    if not os.path.isfile(nvcc) and shutil.which("nvcc") is None:
        return f"nvcc not found under CUDA_HOME={CUDA_HOME}"
    return None


def _cpu_arch_flags():
    """-march for the CPU kernel: the build machine's (native) by default.

    The CPU kernel's loops are written to vectorize; -march=native lets them use
    AVX2/AVX-512 where the build machine has them. Set GE2E_EXT_MARCH to another
    -march value (e.g. x86-64-v2) to build for other machines, or to "" for the
    compiler's default.
    """
    march = os.environ.get("GE2E_EXT_MARCH", "native").strip()
    return [f"-march={march}"] if march else []


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "autograd", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # The C++ standard is the one torch requires (it adds it). -fno-math-errno
    # lets sqrt inline (errno is never read); see _cpu_arch_flags for -march.
    # -Werror=switch: a loss method or dtype missing from a switch is an error.
    cxx_flags = ["-O3", "-fno-math-errno", "-Werror=switch"] + _cpu_arch_flags()
    problem = _cuda_problem()
    if problem is not None:
        if _truthy("FORCE_CUDA"):
            raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {problem}")
        print(f"ge2e_ext: building the CPU op only ({problem})")
        return CppExtension("ge2e_ext._C", sources, extra_compile_args={"cxx": cxx_flags})

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    print(f"ge2e_ext: building CPU and CUDA kernels (CUDA_HOME={CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')})")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # No --use_fast_math: exp/log accuracy matters for the log-sum-exp.
    nvcc_flags = ["-O3", "-lineinfo", "-Xcompiler", "-Werror=switch"]
    return CUDAExtension(
        "ge2e_ext._C",
        sources,
        define_macros=[("GE2E_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )


setup(
    name="ge2e_ext",
    version="0.1.0",
    description="Fused C++/CUDA GE2E loss (generalized end-to-end speaker verification loss) for PyTorch",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ge2e_ext", "ge2e_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
