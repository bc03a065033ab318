"""pytest configuration shared by every test module.

Hypothesis: CI (the environment variable CI set to true, as .ci/run and CI
services do) runs the "ci" profile, derandomized (the examples are a function
of each test's source, the same on every clean clone) and without the example
database, so a CI run is reproducible; a failure found there is kept as an
@example. Elsewhere the default profile draws new examples each run.
HYPOTHESIS_PROFILE names a profile explicitly.
"""

import importlib.util
import os
import pathlib
import shlex

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")

_profile = os.environ.get("HYPOTHESIS_PROFILE")
if _profile is None and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    _profile = "ci"
if _profile is not None:
    settings.load_profile(_profile)


# ------------------------------------------------ the CUDA kernels' CPU emulation

HERE = pathlib.Path(__file__).parent
# The bulk runs 64 threads per emulated block at most: two warps, so the
# cross-warp reduction runs, and K or D above 64 exercises the striding, in
# seconds. The GPU build's 256 threads (eight warps: the last stage of the block
# reduction over all of its slots) run in test_every_kernel_at_256_threads.
# GE2E_EMU_THREADS=256 runs the bulk at the GPU's count too (minutes more).
EMULATED_THREADS = int(os.environ.get("GE2E_EMU_THREADS", "64"))
GPU_THREADS = 256


def _emulation_build():
    spec = importlib.util.spec_from_file_location("cuda_emulation_build",
                                                  HERE / "cuda_emulation" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_emulation(tmp_path_factory, threads, namespace):
    """The emulation built at `threads` threads per block (tests/cuda_emulation/
    build.py: __shared__ poisoned before each block), loaded as torch.ops.<namespace>,
    blocks in shuffled order (GE2E_EMU_BLOCK_ORDER may choose another). A process
    loads each namespace once (a second load would register its ops twice).
    scripts/sanitize.sh builds it beforehand with the sanitizers' flags and says
    where (GE2E_EMU_BUILD_DIR, GE2E_EMU_CFLAGS, GE2E_EMU_LDFLAGS, GE2E_EMU_PREBUILT)."""
    ops = getattr(torch.ops, namespace)
    if hasattr(ops, "ge2e_forward"):
        return ops
    env = os.environ
    build_dir = (pathlib.Path(env["GE2E_EMU_BUILD_DIR"]) / namespace
                 if env.get("GE2E_EMU_BUILD_DIR")
                 else tmp_path_factory.mktemp(f"cuda_emulation_{threads}"))
    library = _emulation_build().build(
        build_dir, threads=threads, namespace=namespace,
        cflags=shlex.split(env.get("GE2E_EMU_CFLAGS", "-O1")),
        ldflags=shlex.split(env.get("GE2E_EMU_LDFLAGS", "")),
        verbose=bool(env.get("GE2E_VERBOSE_BUILD")), prebuilt=bool(env.get("GE2E_EMU_PREBUILT")))
    torch.ops.load_library(str(library))
    return getattr(torch.ops, namespace)


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """The CUDA kernels compiled for the CPU under the emulation, EMULATED_THREADS per block."""
    return _load_emulation(tmp_path_factory, EMULATED_THREADS, "ge2e_emu")


@pytest.fixture(scope="session")
def emulated_256(tmp_path_factory):
    """The same at the GPU build's 256 threads per block."""
    return _load_emulation(tmp_path_factory, GPU_THREADS, "ge2e_emu256")
