"""Every backend on every device computes the original GE2E code's loss and gradients."""

import pytest
import torch

import ge2e_ext
from ge2e_ext.reference import ge2e_loss_reference

from helpers import (CPU_BACKENDS, DEVICE_BACKENDS, LOSS_METHODS, RTOL, assert_close_rel,
                     assert_no_worse_than_torch, ge2e, leaf, loss_and_grads, make_embeddings,
                     make_scalars)

SHAPES = [(2, 2, 3), (2, 5, 4), (3, 2, 7), (5, 4, 16), (7, 3, 33), (4, 6, 1)]


def reference(method, min_cosine, reduction):
    def fn(x, w, b):
        rows = ge2e_loss_reference(x, w, b, method, min_cosine=min_cosine)
        return {"sum": rows.sum(), "mean": rows.mean(), "none": rows}[reduction]
    return fn


def reference_on_cpu(x, method, min_cosine=1e-6, reduction="sum", w=3.0, b=-1.0):
    """The loop reference in float64 on the CPU: loss and grads of (x, w, b)."""
    return loss_and_grads(reference(method, min_cosine, reduction),
                          leaf(x.detach().to("cpu", torch.float64)), *make_scalars(w, b))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("min_cosine", [1e-6, None])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_loop_reference(device, backend, method, min_cosine, shape, dtype):
    x = make_embeddings(*shape, dtype=dtype, device=device, seed=sum(shape))
    ref_loss, ref_grads = reference_on_cpu(x, method, min_cosine)
    loss, grads = loss_and_grads(ge2e(backend, method, min_cosine=min_cosine), x,
                                 *make_scalars(dtype=dtype, device=device))
    assert loss.dtype == dtype and loss.device.type == device
    if dtype == torch.float64:
        assert_close_rel(loss, ref_loss, RTOL[dtype], "loss")
        for name, g, r in zip(("embeddings", "w", "b"), grads, ref_grads):
            assert g.dtype == dtype
            assert_close_rel(g, r, RTOL[dtype], f"grad {name}")
        return
    # float32: no worse than twice the PyTorch path's error on the same input.
    torch_loss, torch_grads = loss_and_grads(ge2e("torch", method, min_cosine=min_cosine), x,
                                             *make_scalars(dtype=dtype, device=device))
    assert_close_rel(loss, ref_loss, RTOL[dtype], "loss")
    for name, g, t, r in zip(("embeddings", "w", "b"), grads, torch_grads, ref_grads):
        assert g.dtype == dtype
        if shape[2] > 1:  # D = 1: every cosine is +-1 and its true gradient 0 (rounding only)
            assert_no_worse_than_torch(g, t, r, f"grad {name}")


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reductions(device, backend, method, reduction):
    x = make_embeddings(4, 3, 8, seed=7, device=device)
    ref_loss, ref_grads = reference_on_cpu(x, method, reduction=reduction)
    loss, grads = loss_and_grads(ge2e(backend, method, reduction), x,
                                 *make_scalars(device=device))
    assert loss.shape == ((4, 3) if reduction == "none" else ())
    assert_close_rel(loss, ref_loss, 1e-10, "loss")
    for g, r in zip(grads, ref_grads):
        assert_close_rel(g, r, 1e-10, "grad")


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_positive_embeddings_and_clamped_w(device, backend, method):
    """Positive embeddings (no clamped cosine), and a w below the floor: max(w, 1e-6)
    is applied and dLoss/dw is zero there (torch.clamp's gradient)."""
    x = make_embeddings(5, 3, 6, seed=3, offset=2.0, device=device)
    for w_value in (2.5, -4.0):
        ref_loss, ref_grads = reference_on_cpu(x, method, w=w_value)
        loss, grads = loss_and_grads(ge2e(backend, method), x,
                                     *make_scalars(w=w_value, device=device))
        assert_close_rel(loss, ref_loss, 1e-10, "loss")
        for g, r in zip(grads, ref_grads):
            assert_close_rel(g, r, 1e-10, "grad")
    assert grads[1].item() == 0.0


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_module_is_a_drop_in(device, backend):
    """GE2ELoss(init_w, init_b, loss_method) as in the original README."""
    torch.manual_seed(0)
    for method in LOSS_METHODS:
        criterion = ge2e_ext.GE2ELoss(init_w=10.0, init_b=-5.0, loss_method=method,
                                      backend=backend).to(device)
        assert criterion.w.shape == () and criterion.b.shape == ()
        assert criterion.w.item() == 10.0 and criterion.b.item() == -5.0
        assert set(criterion.state_dict()) == {"w", "b"}
        x = torch.rand(6, 4, 12, device=device, requires_grad=True)
        loss = criterion(x)
        assert loss.shape == ()
        loss.backward()
        ref = ge2e_loss_reference(x.detach().cpu().double(), 10.0, -5.0, method).sum()
        assert_close_rel(loss.detach(), ref, 1e-5, "loss")
        assert criterion.w.grad is not None and criterion.b.grad is not None
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_non_contiguous_and_no_grad_inputs(device, backend):
    base = make_embeddings(4, 6, 10, seed=5, requires_grad=False, device=device)
    x = base.transpose(1, 2).contiguous().transpose(1, 2)[:, ::2]  # strided view (4, 3, 10)
    assert not x.is_contiguous()
    expected = ge2e_loss_reference(x.cpu(), 3.0, -1.0, "softmax").sum()
    got = ge2e_ext.ge2e_loss(x, 3.0, -1.0, backend=backend)
    assert not got.requires_grad
    assert_close_rel(got, expected, 1e-10, "loss")
    with torch.no_grad():
        got = ge2e_ext.ge2e_loss(x.clone().requires_grad_(), 3.0, -1.0, backend=backend)
        assert not got.requires_grad
        assert_close_rel(got, expected, 1e-10, "loss")
    with torch.inference_mode():
        assert_close_rel(ge2e_ext.ge2e_loss(x.clone(), 3.0, -1.0, backend=backend), expected,
                         1e-10, "loss")
    # A gradient for w alone (a frozen encoder) is a gradient too.
    w, b = make_scalars(device=device)
    loss = ge2e_ext.ge2e_loss(x, w, b.detach(), backend=backend)
    (gw,) = torch.autograd.grad(loss, w)
    _, ref_grads = reference_on_cpu(x, "softmax")
    assert_close_rel(gw, ref_grads[1], 1e-10, "grad w")


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(device, backend, method, dtype):
    x = make_embeddings(16, 5, 32, seed=2, dtype=dtype, device=device)
    loss, grads = loss_and_grads(ge2e(backend, method), x,
                                 *make_scalars(dtype=torch.float32, device=device))
    assert loss.dtype == torch.float32
    assert grads[0].dtype == dtype
    # Against float64 on the same (rounded) input: no worse than twice the
    # PyTorch path, whose gradient is also rounded to the input dtype.
    ref_loss, ref_grads = loss_and_grads(ge2e("torch", method), leaf(x.double()),
                                         *make_scalars(device=device))
    torch_loss, torch_grads = loss_and_grads(ge2e("torch", method), x,
                                             *make_scalars(dtype=torch.float32, device=device))
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_no_worse_than_torch(grads[0], torch_grads[0], ref_grads[0], "grad embeddings")


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_w_and_b_accept_numbers_and_one_element_tensors(device, backend):
    x = make_embeddings(3, 2, 4, requires_grad=False, device=device)
    expected = ge2e_ext.ge2e_loss(x, 3.0, -1.0, backend=backend)
    for w, b in ((3, -1), (torch.tensor([3.0]), torch.tensor([[-1.0]])),
                 (torch.tensor(3.0, dtype=torch.float32), torch.tensor(-1, dtype=torch.int64))):
        assert_close_rel(ge2e_ext.ge2e_loss(x, w, b, backend=backend), expected, 1e-7, "loss")
    # A (1,)-shaped parameter gets a (1,)-shaped gradient.
    w = torch.tensor([3.0], dtype=torch.float64, device=device, requires_grad=True)
    ge2e_ext.ge2e_loss(x.clone().requires_grad_(), w, -1.0, backend=backend).backward()
    assert w.grad.shape == (1,)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_autocast_runs_the_loss_in_float32(device, backend):
    torch.manual_seed(1)
    linear = torch.nn.Linear(16, 16).to(device)
    x = torch.randn(6, 4, 16, device=device)
    half = torch.bfloat16
    with torch.autocast(device, dtype=half):
        embeddings = linear(x)
        assert embeddings.dtype == half
        loss = ge2e_ext.ge2e_loss(embeddings, 10.0, -5.0, backend=backend)
    assert loss.dtype == torch.float32
    expected = ge2e_ext.ge2e_loss(embeddings.detach().float(), 10.0, -5.0, backend="torch")
    assert_close_rel(loss.detach(), expected, 1e-5, "loss")
    loss.backward()
    assert linear.weight.grad.dtype == torch.float32
    assert torch.isfinite(linear.weight.grad).all()


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_cpu_backends_agree_on_larger_batches(method):
    """N = 40 (more speakers than a vector of lanes), D = 70: both CPU backends."""
    x = make_embeddings(40, 4, 70, seed=9, offset=0.1)
    results = [loss_and_grads(ge2e(backend, method, "none"), x, *make_scalars())
               for backend in CPU_BACKENDS]
    for got, expected in zip(results[-1][1], results[0][1]):
        assert_close_rel(got, expected, 1e-12, "grad")
    assert_close_rel(results[-1][0], results[0][0], 1e-12, "loss")
