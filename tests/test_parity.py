"""Every backend computes the original GE2E code's loss and gradients."""

import pytest
import torch

import ge2e_ext
from ge2e_ext.reference import ge2e_loss_reference

from conftest import (CPU_BACKENDS, RTOL, assert_close_rel, loss_and_grads, make_embeddings,
                      make_scalars)

SHAPES = [(2, 2, 3), (2, 5, 4), (3, 2, 7), (5, 4, 16), (7, 3, 33), (4, 6, 1)]


def reference(method, min_cosine, reduction):
    def fn(x, w, b):
        rows = ge2e_loss_reference(x, w, b, method, min_cosine=min_cosine)
        return {"sum": rows.sum(), "mean": rows.mean(), "none": rows}[reduction]
    return fn


def ours(method, min_cosine, reduction, backend):
    def fn(x, w, b):
        return ge2e_ext.ge2e_loss(x, w, b, method, reduction=reduction, min_cosine=min_cosine,
                                  backend=backend)
    return fn


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["softmax", "contrast"])
@pytest.mark.parametrize("min_cosine", [1e-6, None])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_loop_reference(backend, method, min_cosine, shape, dtype):
    if shape[2] == 1 and dtype == torch.float32:
        # With D = 1 every cosine is +-1 and its true gradient 0: what float32
        # returns is rounding of terms of size w / |e|, not a measure of parity.
        pytest.skip("D = 1 is checked in float64")
    x = make_embeddings(*shape, dtype=dtype, seed=sum(shape))
    w, b = make_scalars(dtype=dtype)
    ref_loss, ref_grads = loss_and_grads(reference(method, min_cosine, "sum"),
                                         x.detach().double().requires_grad_(),
                                         *make_scalars())
    loss, grads = loss_and_grads(ours(method, min_cosine, "sum", backend), x, w, b)
    rtol = RTOL[dtype]
    assert loss.dtype == dtype
    assert_close_rel(loss, ref_loss, rtol, "loss")
    for name, g, r in zip(("embeddings", "w", "b"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close_rel(g, r, rtol, f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["softmax", "contrast"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reductions(backend, method, reduction):
    x = make_embeddings(4, 3, 8, seed=7)
    w, b = make_scalars()
    ref_loss, ref_grads = loss_and_grads(reference(method, 1e-6, reduction), x, w, b)
    loss, grads = loss_and_grads(ours(method, 1e-6, reduction, backend), x, w, b)
    assert loss.shape == ((4, 3) if reduction == "none" else ())
    assert_close_rel(loss, ref_loss, 1e-10, "loss")
    for g, r in zip(grads, ref_grads):
        assert_close_rel(g, r, 1e-10, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["softmax", "contrast"])
def test_positive_embeddings_and_clamped_w(backend, method):
    """Positive embeddings (no clamped cosine), and a w below the floor: max(w, 1e-6)
    is applied and dLoss/dw is zero there (torch.clamp's gradient)."""
    x = make_embeddings(5, 3, 6, seed=3, offset=2.0)
    for w_value in (2.5, -4.0):
        w, b = make_scalars(w=w_value)
        ref_loss, ref_grads = loss_and_grads(reference(method, 1e-6, "sum"), x, w, b)
        loss, grads = loss_and_grads(ours(method, 1e-6, "sum", backend), x, w, b)
        assert_close_rel(loss, ref_loss, 1e-10, "loss")
        for g, r in zip(grads, ref_grads):
            assert_close_rel(g, r, 1e-10, "grad")
    assert grads[1].item() == 0.0


@pytest.mark.parametrize("block", [1, 2, 3])
@pytest.mark.parametrize("method", ["softmax", "contrast"])
def test_block_loop_matches_single_block(block_speakers, block, method):
    """The op processes speakers in blocks; any block size gives the same numbers."""
    if "cpu" not in ge2e_ext.extension_devices():
        pytest.skip("compiled CPU op not built")
    from ge2e_ext import _ops
    x = make_embeddings(7, 3, 5, seed=11)
    w, b = make_scalars()
    fn = ours(method, 1e-6, "none", "extension")
    whole_loss, whole_grads = loss_and_grads(fn, x, w, b)
    _ops.BLOCK_SPEAKERS = block
    loss, grads = loss_and_grads(fn, x, w, b)
    assert_close_rel(loss, whole_loss, 1e-13, "loss")
    for g, r in zip(grads, whole_grads):
        assert_close_rel(g, r, 1e-13, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_is_a_drop_in(backend):
    """GE2ELoss(init_w, init_b, loss_method) as in the original README."""
    torch.manual_seed(0)
    for method in ("softmax", "contrast"):
        criterion = ge2e_ext.GE2ELoss(init_w=10.0, init_b=-5.0, loss_method=method,
                                      backend=backend)
        assert criterion.w.shape == () and criterion.b.shape == ()
        assert criterion.w.item() == 10.0 and criterion.b.item() == -5.0
        x = torch.rand(6, 4, 12, requires_grad=True)
        loss = criterion(x)
        assert loss.shape == ()
        loss.backward()
        ref = ge2e_loss_reference(x.detach().double(), 10.0, -5.0, method).sum()
        assert_close_rel(loss.detach(), ref, 1e-5, "loss")
        assert criterion.w.grad is not None and criterion.b.grad is not None
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_no_grad_inputs(backend):
    base = make_embeddings(4, 6, 10, seed=5, requires_grad=False)
    x = base.transpose(1, 2).contiguous().transpose(1, 2)[:, ::2]  # strided view (4, 3, 10)
    assert not x.is_contiguous()
    expected = ge2e_loss_reference(x, 3.0, -1.0, "softmax").sum()
    got = ge2e_ext.ge2e_loss(x, 3.0, -1.0, backend=backend)
    assert not got.requires_grad
    assert_close_rel(got, expected, 1e-10, "loss")
    with torch.no_grad():
        assert_close_rel(ge2e_ext.ge2e_loss(x.clone().requires_grad_(), 3.0, -1.0,
                                            backend=backend), expected, 1e-10, "loss")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(backend, dtype):
    x = make_embeddings(5, 4, 16, seed=2, dtype=dtype)
    w, b = make_scalars(dtype=torch.float32)
    loss, grads = loss_and_grads(ours("softmax", 1e-6, "sum", backend), x, w, b)
    assert loss.dtype == torch.float32
    assert grads[0].dtype == dtype
    upcast = x.detach().float().requires_grad_()
    ref_loss, ref_grads = loss_and_grads(ours("softmax", 1e-6, "sum", "torch"), upcast,
                                         *make_scalars(dtype=torch.float32))
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    # The gradient is rounded once or twice to the input dtype.
    assert_close_rel(grads[0].float(), ref_grads[0], 2 * torch.finfo(dtype).eps, "grad")


def test_w_and_b_accept_numbers_and_one_element_tensors():
    x = make_embeddings(3, 2, 4, requires_grad=False)
    expected = ge2e_ext.ge2e_loss(x, 3.0, -1.0)
    for w, b in ((3, -1), (torch.tensor([3.0]), torch.tensor([[-1.0]])),
                 (torch.tensor(3.0, dtype=torch.float32), torch.tensor(-1, dtype=torch.int64))):
        assert_close_rel(ge2e_ext.ge2e_loss(x, w, b), expected, 1e-7, "loss")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_autocast_runs_the_loss_in_float32(backend):
    torch.manual_seed(1)
    linear = torch.nn.Linear(16, 16)
    x = torch.randn(6, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = linear(x)
        assert embeddings.dtype == torch.bfloat16
        loss = ge2e_ext.ge2e_loss(embeddings, 10.0, -5.0, backend=backend)
    assert loss.dtype == torch.float32
    expected = ge2e_ext.ge2e_loss(embeddings.detach().float(), 10.0, -5.0, backend="torch")
    assert_close_rel(loss.detach(), expected, 1e-5, "loss")
    loss.backward()
    assert linear.weight.grad is not None and torch.isfinite(linear.weight.grad).all()
