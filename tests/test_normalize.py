"""normalize=True: the loss of the rows scaled to unit length, e / max(|e|, 1e-12),
equal (loss and gradients, 1e-12 in float64) to normalising the input first with
torch.nn.functional.normalize and calling the loss, on both backends and both forms
(tests/test_cuda_emulated.py: the CUDA kernels); the compiled op normalises in its own pass."""

import pytest
import torch
import torch.nn.functional as F

import ge2e_ext
from helpers import (LOSS_METHODS, assert_close_rel, compiled_op, make_embeddings, make_scalars,
                     needs_cpu_extension)

BACKENDS = ["torch", pytest.param("extension", marks=needs_cpu_extension)]
LABELS = torch.tensor([4, 1, 4, 2, 1, 2, 4, 2, 1, 1, 4, 7, 7])


def _loss_and_grads(x, backend, method, reduction, normalize, first=None, labels=None,
                    min_cosine=1e-6):
    """The loss and its gradients (x, w, b); `first` transforms x before the loss
    (differentiably), e.g. F.normalize."""
    x = x.detach().clone().requires_grad_(True)
    w, b = make_scalars(10.0, -5.0, dtype=x.dtype if x.dtype == torch.float64 else torch.float32)
    inputs = first(x) if first is not None else x
    loss = ge2e_ext.ge2e_loss(inputs, w, b, method, labels=labels, reduction=reduction,
                              min_cosine=min_cosine, backend=backend, normalize=normalize)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
    grads = torch.autograd.grad((loss * upstream).sum(), (x, w, b))
    return (loss.detach(), *grads)


def _assert_equal_to_normalising_first(x, backend, method, reduction, labels=None, rtol=1e-12,
                                       **kwargs):
    ours = _loss_and_grads(x, backend, method, reduction, True, labels=labels, **kwargs)
    first = _loss_and_grads(x, backend, method, reduction, False, labels=labels,
                            first=lambda v: F.normalize(v, dim=-1), **kwargs)
    for name, a, e in zip(("loss", "embeddings", "w", "b"), ours, first):
        assert_close_rel(a, e, rtol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_equals_normalising_first(backend, method, reduction):
    # Rows of very different lengths: normalising changes the centroids.
    x = make_embeddings(5, 4, 9, seed=1, requires_grad=False)
    x = x * torch.logspace(-3, 3, 20, dtype=torch.float64).view(5, 4, 1)
    _assert_equal_to_normalising_first(x, backend, method, reduction)
    _assert_equal_to_normalising_first(x, backend, method, reduction, min_cosine=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_labelled_rows_equal_normalising_first(backend, method, reduction):
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(13, 6, generator=g, dtype=torch.float64) * torch.logspace(
        -2, 2, 13, dtype=torch.float64).unsqueeze(1)
    _assert_equal_to_normalising_first(rows, backend, method, reduction, labels=LABELS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_tiny_rows_as_functional_normalize(backend):
    """A zero row stays zero, a row shorter than 1e-12 is divided by 1e-12 (no
    gradient through its norm), as torch.nn.functional.normalize."""
    x = make_embeddings(3, 3, 5, seed=3, requires_grad=False)
    x[0, 1] = 0.0
    x[2, 0] *= 1e-14
    for method in LOSS_METHODS:
        _assert_equal_to_normalising_first(x, backend, method, "sum", rtol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_loss_does_not_depend_on_the_rows_lengths(backend, dtype):
    """Each row times its own factor, from 1e-9 (its norm still above the 1e-12 below
    which a row is divided by 1e-12 instead) to 1e300 in float64 and 1e30 in float32
    (squares that overflow the dtype), gives the same loss."""
    x = make_embeddings(4, 3, 8, seed=4, dtype=dtype, requires_grad=False)
    top = 300 if dtype == torch.float64 else 30
    factors = torch.logspace(-9, top, 12, dtype=torch.float64).view(4, 3, 1).to(dtype)
    for method in LOSS_METHODS:
        plain = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, backend=backend, normalize=True)
        scaled = ge2e_ext.ge2e_loss(x * factors, 10.0, -5.0, method, backend=backend,
                                    normalize=True)
        assert torch.isfinite(scaled)
        assert_close_rel(scaled, plain, 1e-12 if dtype == torch.float64 else 1e-5, method)


@needs_cpu_extension
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduce", [True, False])
def test_gradcheck(method, reduce):
    x = make_embeddings(3, 3, 4, seed=5) * torch.tensor([0.5, 2.0, 7.0]).view(3, 1, 1)
    w, b = make_scalars()

    def fn(x, w, b):
        return compiled_op(method, reduce, scale=0.5, normalize=True)(x, w, b)

    assert torch.autograd.gradcheck(fn, (x.detach().requires_grad_(True), w, b), eps=1e-6,
                                    atol=1e-7, rtol=1e-6)


@needs_cpu_extension
def test_normalize_under_torch_compile():
    x = make_embeddings(4, 3, 8, seed=8)
    fn = torch.compile(lambda x: ge2e_ext.ge2e_loss(x, 10.0, -5.0, backend="extension",
                                                    normalize=True), backend="eager",
                       fullgraph=True)
    expected = ge2e_ext.ge2e_loss(F.normalize(x, dim=-1), 10.0, -5.0, backend="torch")
    assert_close_rel(fn(x), expected, 1e-12, "loss")


def test_module_option():
    criterion = ge2e_ext.GE2ELoss(normalize=True)
    assert "normalize=True" in repr(criterion)
    x = make_embeddings(3, 2, 4, seed=9)
    assert_close_rel(criterion(x), ge2e_ext.GE2ELoss()(F.normalize(x, dim=-1)), 1e-12, "loss")
    with pytest.raises(TypeError, match="normalize must be a bool, got int"):
        ge2e_ext.GE2ELoss(normalize=1)
    with pytest.raises(TypeError, match="normalize must be a bool, got str"):
        ge2e_ext.ge2e_loss(x, 10.0, -5.0, normalize="yes")
