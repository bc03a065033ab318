"""The CUDA kernels, run on the CPU: csrc/cuda/ge2e_cuda_kernels.cuh compiled
under tests/cuda_emulation/emulate.h (threads for a block's threads, barriers,
emulated warp shuffles) behind the real driver, compared with the CPU kernel.

This checks the kernels' indexing, striding (K and D beyond one sweep of the
block's threads) and reductions on machines without a GPU; tests/test_cuda.py
runs the real thing on a GPU."""

import os
import pathlib

import pytest
import torch

import ge2e_ext

from conftest import assert_close_rel, make_embeddings

HERE = pathlib.Path(__file__).parent
# 64 threads per emulated block (the GPU build uses 256): two warps, so the
# cross-warp reduction runs, and K or D above 64 exercises the striding.
EMULATED_THREADS = 64

pytestmark = pytest.mark.skipif("cpu" not in ge2e_ext.extension_devices(),
                                reason="the comparison needs the compiled CPU op")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("cuda_emulation")
    load(name="ge2e_cuda_emulation", sources=[str(HERE / "cuda_emulation" / "emulated_ops.cpp")],
         extra_cflags=["-O1", "-std=c++20", f"-DGE2E_CUDA_THREADS={EMULATED_THREADS}"],
         build_directory=str(build), is_python_module=False,
         verbose=bool(os.environ.get("GE2E_VERBOSE_BUILD")))
    return torch.ops.ge2e_emu


def _both(emulated, x, method, min_cosine, sums=None, offset=0, block=0, w=3.0, b=-1.0,
          grad=None):
    """Forward and backward of the emulated CUDA kernels and of the CPU kernel."""
    acc = x.dtype
    w = torch.tensor(w, dtype=acc)
    b = torch.tensor(b, dtype=acc)
    grad = torch.randn(x.shape[:2], dtype=acc, generator=torch.Generator().manual_seed(1)) \
        if grad is None else grad
    results = []
    for ops in (emulated, torch.ops.ge2e_ext):
        forward = ops.ge2e_forward(x, sums, w, b, offset, method, min_cosine, block)
        backward = ops.ge2e_backward(grad, x, sums, w, b, forward[1], forward[2], offset, method,
                                     min_cosine, block)
        results.append((forward, backward))
    return results


def _assert_same(results, rtol):
    (emu_fwd, emu_bwd), (cpu_fwd, cpu_bwd) = results
    assert_close_rel(emu_fwd[0], cpu_fwd[0], rtol, "loss")
    assert_close_rel(emu_fwd[1], cpu_fwd[1], rtol, "row statistic")
    assert torch.equal(emu_fwd[2], cpu_fwd[2]), "hardest impostor"
    for name, e, c in zip(("embeddings", "sums", "w", "b"), emu_bwd, cpu_bwd):
        assert_close_rel(e, c, rtol, f"grad {name}")


@pytest.mark.parametrize("method", ["softmax", "contrast"])
@pytest.mark.parametrize("min_cosine", [1e-6, None])
@pytest.mark.parametrize("shape", [(2, 2, 1), (3, 2, 3), (5, 4, 33), (6, 3, 130)])
def test_kernels_match_the_cpu_kernel(emulated, method, min_cosine, shape):
    x = make_embeddings(*shape, seed=sum(shape), requires_grad=False)
    _assert_same(_both(emulated, x, method, min_cosine), 1e-12)


@pytest.mark.parametrize("method", ["softmax", "contrast"])
def test_more_speakers_than_threads(emulated, method):
    """K = 70 > 64 threads: the similarity kernels stride over K."""
    x = make_embeddings(70, 2, 9, seed=3, requires_grad=False)
    _assert_same(_both(emulated, x, method, 1e-6), 1e-12)


@pytest.mark.parametrize("method", ["softmax", "contrast"])
def test_float32_and_blocks(emulated, method):
    x = make_embeddings(7, 3, 20, seed=4, dtype=torch.float32, requires_grad=False)
    _assert_same(_both(emulated, x, method, 1e-6, block=2), 2e-6)


@pytest.mark.parametrize("method", ["softmax", "contrast"])
def test_external_sums_at_an_offset(emulated, method):
    """The distributed form: 2 local speakers at rows 1-2 of 5 speaker sums."""
    x = make_embeddings(2, 3, 6, seed=5, requires_grad=False)
    g = torch.Generator().manual_seed(6)
    sums = torch.cat([torch.randn(1, 6, generator=g, dtype=torch.float64), x.sum(1),
                      torch.randn(2, 6, generator=g, dtype=torch.float64)])
    _assert_same(_both(emulated, x, method, 1e-6, sums=sums, offset=1), 1e-12)


def test_zero_vectors_ties_and_clamped_w(emulated):
    x = make_embeddings(4, 3, 5, seed=7, offset=0.5, requires_grad=False)
    x[0, 1] = 0     # a zero utterance
    x[3] = x[2]     # two identical speakers: tied impostors
    for method in ("softmax", "contrast"):
        results = _both(emulated, x, method, 1e-6, w=-2.0)  # w below the floor
        _assert_same(results, 1e-12)
        assert results[0][1][2].item() == 0.0  # no gradient for w while clamped


@pytest.mark.parametrize("method", ["softmax", "contrast"])
def test_non_finite_input_stays_non_finite(emulated, method):
    x = make_embeddings(3, 2, 4, seed=8, requires_grad=False)
    x[1, 0, 2] = float("nan")
    (emu_fwd, _), _ = _both(emulated, x, method, 1e-6)
    assert not torch.isfinite(emu_fwd[0].sum())
