"""The compiled op as a PyTorch op: gradcheck, opcheck, torch.compile, double backward."""

import pytest
import torch

import ge2e_ext

from conftest import assert_close_rel, make_embeddings

pytestmark = pytest.mark.skipif("cpu" not in ge2e_ext.extension_devices(),
                                reason="compiled CPU op not built")


def _inputs(n=3, m=3, d=5, seed=0, offset=0.0):
    x = make_embeddings(n, m, d, seed=seed, offset=offset)
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    return x, w, b


@pytest.mark.parametrize("method", ["softmax", "contrast"])
@pytest.mark.parametrize("min_cosine", [1e-6, None])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck(method, min_cosine, reduction):
    x, w, b = _inputs(seed=1, offset=0.3)

    def fn(x, w, b):
        return ge2e_ext.ge2e_loss(x, w, b, method, reduction=reduction, min_cosine=min_cosine,
                                  backend="extension")

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("method", ["softmax", "contrast"])
def test_gradcheck_with_external_sums(method):
    """The sums input (fed by other processes in distributed mode) has its own gradient."""
    x, w, b = _inputs(n=2, m=3, d=4, seed=2, offset=0.5)
    g = torch.Generator().manual_seed(3)
    others = (torch.randn(3, 4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(x, others, w, b):
        sums = torch.cat([others[:1], x.sum(1), others[1:]])  # local speakers at rows 1, 2
        rows, _, _ = torch.ops.ge2e_ext.ge2e_forward(x, sums, w, b, 1, method, 1e-6)
        return rows

    assert torch.autograd.gradcheck(fn, (x, others, w, b), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("method", ["softmax", "contrast"])
@pytest.mark.parametrize("with_sums", [False, True])
def test_opcheck(method, with_sums):
    x, w, b = _inputs(n=4, m=2, d=6, seed=4)
    sums = x.detach().sum(1).requires_grad_() if with_sums else None
    args = (x, sums, w, b, 0, method, 1e-6, 0)
    torch.library.opcheck(torch.ops.ge2e_ext.ge2e_forward.default, args)
    rows, stat, hardest = torch.ops.ge2e_ext.ge2e_forward(*args)
    backward_args = (torch.ones_like(rows), x.detach(), None if sums is None else sums.detach(),
                     w.detach(), b.detach(), stat, hardest, 0, method, None, 0)
    torch.library.opcheck(torch.ops.ge2e_ext.ge2e_backward.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_double_backward_raises_a_clear_error():
    x, w, b = _inputs()
    loss = ge2e_ext.ge2e_loss(x, w, b, backend="extension")
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gx.pow(2).sum().backward()


def test_torch_backend_supports_double_backward():
    x, w, b = _inputs()
    loss = ge2e_ext.ge2e_loss(x, w, b, backend="torch")
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    gx.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("method", ["softmax", "contrast"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(method, compiler):
    torch._dynamo.reset()
    x, w, b = _inputs(n=5, m=3, d=8, seed=5)
    criterion = ge2e_ext.GE2ELoss(loss_method=method, backend="extension").double()

    def step(x):
        loss = criterion(x)
        return loss, torch.autograd.grad(loss, (x, criterion.w, criterion.b))

    expected_loss, expected_grads = step(x)
    compiled = torch.compile(lambda x: criterion(x), fullgraph=True, backend=compiler)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, (x, criterion.w, criterion.b))
    assert_close_rel(loss.detach(), expected_loss.detach(), 1e-12, "loss")
    for g, e in zip(grads, expected_grads):
        assert_close_rel(g, e, 1e-12, "grad")


def test_torch_compile_dynamic_shapes():
    """One compiled graph serves several (N, M, D): the fake kernels are symbolic."""
    torch._dynamo.reset()
    criterion = ge2e_ext.GE2ELoss(backend="extension", min_cosine=1e-6).double()
    compiled = torch.compile(lambda x: criterion(x), fullgraph=True, dynamic=True,
                             backend="aot_eager")
    for shape in [(5, 3, 8), (7, 4, 8), (9, 2, 16)]:
        x, _, _ = _inputs(*shape, seed=sum(shape))
        loss = compiled(x)
        (grad,) = torch.autograd.grad(loss, x)
        expected = criterion(x)
        (expected_grad,) = torch.autograd.grad(expected, x)
        assert_close_rel(loss.detach(), expected.detach(), 1e-12, f"loss {shape}")
        assert_close_rel(grad, expected_grad, 1e-12, f"grad {shape}")
