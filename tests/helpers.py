"""What the tests share: the devices and backends under test, inputs, tolerances.

Tests are parametrized by device (cpu, and cuda where a GPU and the CUDA kernels
exist) and backend ("torch", and "extension" where the compiled kernel for the
device exists), as torchvision's op tests are; an empty parametrization is
skipped by pytest, which is the one skip style of the suite (plus the markers
below for whole tests).
"""

import contextlib

import pytest
import torch

import ge2e_ext
from ge2e_ext import LOSS_METHODS  # noqa: F401  (re-exported for the tests)

# Relative tolerances against the float64 loop reference.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends(device):
    return ["torch"] + (["extension"] if device in ge2e_ext.extension_devices() else [])


DEVICE_BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in backends(d)]
EXTENSION_DEVICES = [pytest.param(d, id=d) for d in DEVICES
                     if d in ge2e_ext.extension_devices()]
CPU_BACKENDS = backends("cpu")

needs_cpu_extension = pytest.mark.skipif("cpu" not in ge2e_ext.extension_devices(),
                                         reason="the compiled CPU op is not built")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and "cuda" in ge2e_ext.extension_devices()),
    reason="needs a CUDA GPU and ge2e_ext's CUDA kernels")


def make_embeddings(n, m, d, *, dtype=torch.float64, device="cpu", seed=0, offset=0.0,
                    requires_grad=True):
    """Random (N, M, D) embeddings, drawn on the CPU in float64 (the same values on
    every device). offset=0 gives many negative cosines."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, d, generator=g, dtype=torch.float64) + offset
    return x.to(dtype=dtype, device=device).requires_grad_(requires_grad)


def make_scalars(w=3.0, b=-1.0, dtype=torch.float64, device="cpu"):
    return (torch.tensor(w, dtype=dtype, device=device, requires_grad=True),
            torch.tensor(b, dtype=dtype, device=device, requires_grad=True))


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def loss_and_grads(fn, x, w, b):
    """fn(x, w, b) -> loss tensor; the loss and d(sum of loss)/d(x, w, b) (zeros
    for an input the loss does not use)."""
    loss = fn(x, w, b)
    grads = torch.autograd.grad(loss.sum(), (x, w, b), allow_unused=True,
                                materialize_grads=True)
    return loss.detach(), [g.detach() for g in grads]


def ge2e(backend, method="softmax", reduction="sum", min_cosine=1e-6, **kwargs):
    """fn(x, w, b) computing ge2e_loss with these options."""
    def fn(x, w, b):
        return ge2e_ext.ge2e_loss(x, w, b, method, reduction=reduction, min_cosine=min_cosine,
                                  backend=backend, **kwargs)
    return fn


def problem(x, w, b, method="softmax", min_cosine=1e-6, *, sums=None, speaker_offset=0,
            speaker_offsets=None, normalize=False):
    """The arguments that describe a problem to the compiled ops
    (GE2E_PROBLEM_ARGS in csrc/ge2e_schema.h), by name."""
    return dict(embeddings=x, sums=sums, speaker_offset=speaker_offset, w=w, b=b,
                loss_method=method, min_cosine=min_cosine, speaker_offsets=speaker_offsets,
                normalize=normalize)


@contextlib.contextmanager
def blocks(block_speakers, ops=None):
    """Every compiled call in the block sweeps blocks of block_speakers speakers
    (> 0), or of -block_speakers rows (< 0); 0 is the automatic size. ops: the
    library (torch.ops.ge2e_ext, or an emulation's)."""
    ops = torch.ops.ge2e_ext if ops is None else ops
    previous = ops._set_block_speakers(block_speakers)
    try:
        yield
    finally:
        ops._set_block_speakers(previous)


def compiled_op(method="softmax", reduce=True, min_cosine=1e-6, scale=1.0, **problem_args):
    """fn(x, w, b) calling the compiled op directly: the per-row losses, or scale
    times their sum when reduce (problem_args: sums, speaker_offset, ...)."""
    def fn(x, w, b):
        return torch.ops.ge2e_ext._ge2e_loss(**problem(x, w, b, method, min_cosine,
                                                       **problem_args),
                                             scale=scale if reduce else None)[0]
    return fn


def relative_error(actual, expected):
    """max |actual - expected| / max(max |expected|, 1)."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    if expected.numel() == 0:
        return 0.0
    scale = max(expected.abs().max().item(), 1.0)
    return (actual - expected).abs().max().item() / scale


def assert_close_rel(actual, expected, rtol, what=""):
    """|actual - expected| <= rtol * max(|expected|_inf, 1) elementwise (a gradient
    that is zero in exact arithmetic is compared on the scale of 1)."""
    err = relative_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def norm_error(actual, reference):
    """|actual - reference| / |reference| (norms over all elements), in float64."""
    actual = actual.detach().to("cpu", torch.float64)
    reference = reference.detach().to("cpu", torch.float64)
    return ((actual - reference).norm() / reference.norm().clamp_min(1e-300)).item()


def assert_no_worse_than_torch(ours, torch_path, reference, what="", factor=2.0):
    """The rule of flash-attention's tests: our error against a float64 reference is
    at most `factor` times the PyTorch path's error on the same input, plus a few
    units of rounding of the accumulation dtype on the scale of max(|reference|, 1)
    (a cancelling scalar such as dLoss/db can be off by an ulp of its terms on
    either path)."""
    accumulation = torch.float64 if ours.dtype == torch.float64 else torch.float32
    reference = reference.detach().to("cpu", torch.float64)
    scale = max(reference.norm().item(), 1.0)

    def error(x):
        return (x.detach().to("cpu", torch.float64) - reference).norm().item()

    floor = 4 * torch.finfo(accumulation).eps * scale
    ours_err, torch_err = error(ours), error(torch_path)
    assert ours_err <= factor * torch_err + floor, (
        f"{what}: error {ours_err:.3e} > {factor} x the PyTorch path's {torch_err:.3e} "
        f"+ {floor:.1e}")


def largest_allocation(fn):
    """Largest single CPU allocation (bytes) made while fn runs, per the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    return max(sizes) if sizes else 0
