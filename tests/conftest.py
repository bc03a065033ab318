"""Shared helpers: backends under test, tolerances, input makers."""

import pytest
import torch

import ge2e_ext
from ge2e_ext import _ops

# Relative tolerances against the float64 loop reference (issue: 1e-10 / 1e-5).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}

CPU_BACKENDS = ["torch"] + (["extension"] if "cpu" in ge2e_ext.extension_devices() else [])
HAS_CUDA = torch.cuda.is_available() and "cuda" in ge2e_ext.extension_devices()


def make_embeddings(n, m, d, *, dtype=torch.float64, device="cpu", seed=0, offset=0.0,
                    requires_grad=True):
    """Random (N, M, D) embeddings. offset=0 gives many negative cosines."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, d, generator=g, dtype=torch.float64) + offset
    return x.to(dtype=dtype, device=device).requires_grad_(requires_grad)


def make_scalars(w=3.0, b=-1.0, dtype=torch.float64, device="cpu"):
    return (torch.tensor(w, dtype=dtype, device=device, requires_grad=True),
            torch.tensor(b, dtype=dtype, device=device, requires_grad=True))


def loss_and_grads(fn, x, w, b):
    """fn(x, w, b) -> loss tensor; returns the loss and d(sum of loss)/d(x, w, b)."""
    loss = fn(x, w, b)
    grads = torch.autograd.grad(loss.sum(), (x, w, b), allow_unused=True)
    return loss.detach(), [g if g is None else g.detach() for g in grads]


def assert_close_rel(actual, expected, rtol, what=""):
    """|actual - expected| <= rtol * max(|expected|_inf, 1) elementwise (a gradient
    that is zero in exact arithmetic, like dLoss/db of the softmax loss, is
    compared on the scale of 1)."""
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.1e} * {scale:.3e}"


@pytest.fixture
def block_speakers(request):
    """Sets the op's speakers-per-block (0 = automatic) for one test."""
    old = _ops.BLOCK_SPEAKERS
    _ops.BLOCK_SPEAKERS = getattr(request, "param", 0)
    yield _ops.BLOCK_SPEAKERS
    _ops.BLOCK_SPEAKERS = old
