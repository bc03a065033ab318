"""The compiled op as a PyTorch op: gradcheck, opcheck, torch.compile, torch.func,
forward-mode AD, double backward, and what one training step runs."""

import pytest
import torch

import ge2e_ext
from ge2e_ext import _ops

from helpers import (EXTENSION_DEVICES, LOSS_METHODS, assert_close_rel, blocks, compiled_op, ge2e,
                     leaf, loss_and_grads, make_embeddings, make_scalars, needs_cpu_extension,
                     problem)


def _inputs(n=3, m=3, d=5, seed=0, offset=0.0, device="cpu"):
    x = make_embeddings(n, m, d, seed=seed, offset=offset, device=device)
    return (x,) + make_scalars(2.0, -0.5, device=device)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("min_cosine", [1e-6, None])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_gradcheck(device, method, min_cosine, reduction):
    """Both paths: one upstream scalar (gradient computed in the forward) and per row."""
    x, w, b = _inputs(seed=1, offset=0.3, device=device)
    fn = ge2e("extension", method, reduction, min_cosine)
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduce", [True, False])
def test_gradcheck_with_external_sums(device, method, reduce):
    """The sums input (fed by other processes in distributed mode) has its own gradient."""
    x, w, b = _inputs(n=2, m=3, d=4, seed=2, offset=0.5, device=device)
    g = torch.Generator().manual_seed(3)
    others = (torch.randn(3, 4, generator=g, dtype=torch.float64) + 0.5).to(device)
    others.requires_grad_()

    def fn(x, others, w, b):
        sums = torch.cat([others[:1], x.sum(1), others[1:]])  # local speakers at rows 1, 2
        return compiled_op(method, reduce, scale=0.5, sums=sums, speaker_offset=1)(x, w, b)

    assert torch.autograd.gradcheck(fn, (x, others, w, b), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("with_sums", [False, True])
def test_opcheck(device, method, with_sums):
    x, w, b = _inputs(n=4, m=2, d=6, seed=4, device=device)
    sums = x.detach().sum(1).requires_grad_() if with_sums else None
    for scale in (1.0, None):
        torch.library.opcheck(torch.ops.ge2e_ext._ge2e_loss.default, (),
                              dict(problem(x, w, b, method, sums=sums), scale=scale))
    if sums is None:
        for reduction in ("sum", "mean", "none"):
            torch.library.opcheck(torch.ops.ge2e_ext.ge2e_loss.default, (x, w, b, method),
                                  dict(reduction=reduction))
    plain = problem(x.detach(), w.detach(), b.detach(), method,
                    sums=None if sums is None else sums.detach())
    kernel_checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ge2e_ext.ge2e_forward.default, (), plain,
                          test_utils=kernel_checks)
    torch.library.opcheck(torch.ops.ge2e_ext.ge2e_forward_backward.default, (),
                          dict(plain, scale=1.0), test_utils=kernel_checks)
    loss, state, _ = torch.ops.ge2e_ext.ge2e_forward(**plain)
    torch.library.opcheck(torch.ops.ge2e_ext.ge2e_backward.default, (),
                          dict(plain, min_cosine=None, grad_loss=torch.ones_like(loss),
                               state=state), test_utils=kernel_checks)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_kernel_ops_refuse_to_be_differentiated(device):
    """The kernel ops are ge2e_loss's building blocks, without autograd of their own."""
    x, w, b = _inputs(device=device)
    loss, _, _ = torch.ops.ge2e_ext.ge2e_forward(**problem(x, w, b))
    with pytest.raises(RuntimeError, match="not implemented|autograd"):
        loss.sum().backward()


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_double_backward_raises_a_clear_error(device, reduction):
    x, w, b = _inputs(device=device)
    loss = ge2e_ext.ge2e_loss(x, w, b, backend="extension", reduction=reduction)
    (gx,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gx.pow(2).sum().backward()


def test_torch_backend_supports_double_backward():
    x, w, b = _inputs()
    loss = ge2e_ext.ge2e_loss(x, w, b, backend="torch")
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    gx.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_retain_graph_and_repeated_backward(device, reduction):
    """The saved gradients survive a first backward and are not changed by it."""
    x, w, b = _inputs(device=device)
    loss = ge2e_ext.ge2e_loss(x, w, b, backend="extension", reduction=reduction).sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert_close_rel(x.grad, 2 * first, 1e-14, "accumulated gradient")


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_strided_upstream_gradient(device):
    """reduction="none" with an upstream gradient that is a strided view."""
    x, w, b = _inputs(n=4, m=3, device=device)
    rows = ge2e_ext.ge2e_loss(x, w, b, backend="extension", reduction="none")
    upstream = torch.randn(3, 4, dtype=torch.float64, device=device).t()  # (4, 3), strided
    grads = torch.autograd.grad(rows, (x, w, b), upstream)
    expected = torch.autograd.grad(ge2e_ext.ge2e_loss(x, w, b, backend="torch", reduction="none"),
                                   (x, w, b), upstream.contiguous())
    for g, e in zip(grads, expected):
        assert_close_rel(g, e, 1e-12, "grad")


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, method, compiler):
    torch._dynamo.reset()
    x, _, _ = _inputs(n=5, m=3, d=8, seed=5, device=device)
    criterion = ge2e_ext.GE2ELoss(loss_method=method, backend="extension").double().to(device)
    params = (x, criterion.w, criterion.b)
    expected_loss = criterion(x)
    expected_grads = torch.autograd.grad(expected_loss, params)
    compiled = torch.compile(lambda x: criterion(x), fullgraph=True, backend=compiler)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, params)
    assert_close_rel(loss.detach(), expected_loss.detach(), 1e-12, "loss")
    for g, e in zip(grads, expected_grads):
        assert_close_rel(g, e, 1e-12, "grad")


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_torch_compile_dynamic_shapes(device):
    """One compiled graph serves several (N, M, D): the fake kernels are symbolic."""
    torch._dynamo.reset()
    for reduction in ("mean", "none"):
        criterion = ge2e_ext.GE2ELoss(backend="extension", reduction=reduction).double()
        criterion = criterion.to(device)
        compiled = torch.compile(lambda x: criterion(x), fullgraph=True, dynamic=True,
                                 backend="aot_eager")
        for shape in [(5, 3, 8), (7, 4, 8), (9, 2, 16)]:
            x, _, _ = _inputs(*shape, seed=sum(shape), device=device)
            loss, grads = loss_and_grads(lambda x, w, b: compiled(x), x, criterion.w, criterion.b)
            expected, expected_grads = loss_and_grads(lambda x, w, b: criterion(x), x,
                                                      criterion.w, criterion.b)
            assert_close_rel(loss, expected, 1e-12, f"loss {shape}")
            for g, e in zip(grads, expected_grads):
                assert_close_rel(g, e, 1e-12, f"grad {shape}")


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_torch_func_transforms_give_the_right_answer(device, method):
    """torch.func.grad, jacrev, vmap and jvp through the default backend are right
    (it takes the PyTorch path under transforms); backend="extension" refuses."""
    x, w, b = _inputs(n=4, m=2, d=5, seed=6, device=device)
    x, w, b = x.detach(), w.detach(), b.detach()

    def loss(x, w=w):
        return ge2e_ext.ge2e_loss(x, w, b, method)

    def torch_loss(x, w=w):
        return ge2e_ext.ge2e_loss(x, w, b, method, backend="torch")

    x_leaf = leaf(x)
    (expected_grad,) = torch.autograd.grad(torch_loss(x_leaf), x_leaf)
    assert_close_rel(torch.func.grad(loss)(x), expected_grad, 1e-12, "func.grad")
    assert_close_rel(torch.func.jacrev(loss)(x), expected_grad, 1e-12, "jacrev")
    batch = torch.stack([x, 2 * x + 0.1])
    assert_close_rel(torch.func.vmap(loss)(batch),
                     torch.stack([torch_loss(x), torch_loss(2 * x + 0.1)]), 1e-12, "vmap")
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(loss, (x,), (tangent,))
    assert_close_rel(jvp, (expected_grad * tangent).sum(), 1e-12, "jvp")
    assert jvp.abs().item() > 0
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        forward = torch.autograd.forward_ad.unpack_dual(loss(dual)).tangent
    assert_close_rel(forward, jvp, 1e-12, "forward-mode AD")
    with pytest.raises(RuntimeError, match="backend='torch'"):
        torch.func.grad(lambda x: ge2e_ext.ge2e_loss(x, w, b, method, backend="extension"))(x)


def _products_of_one_step(method, reduction, **kwargs):
    x = make_embeddings(64, 10, 32, dtype=torch.float32)
    w, b = make_scalars(dtype=torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ge2e_ext.ge2e_loss(x, w, b, method, reduction=reduction, backend="extension",
                           **kwargs).sum().backward()
    return sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm"))


@needs_cpu_extension
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_one_training_step_runs_the_minimum_of_matrix_products(reduction):
    """Softmax: E S^T, H S and H^T E, once each (the gradient comes from the
    forward's sweep). Contrast: E S^T alone (its gradient is sparse)."""
    assert _products_of_one_step("softmax", reduction) == 3
    assert _products_of_one_step("contrast", reduction) == 1
    # Per-row losses with a backward recompute E S^T once more.
    assert _products_of_one_step("softmax", "none") == 4


@needs_cpu_extension
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("block", [1, 2, 3])
@pytest.mark.parametrize("reduce", [True, False])
def test_blocks_of_speakers_give_the_same_numbers(method, block, reduce):
    """The op processes speakers in blocks; any block size gives the same numbers."""
    x, w, b = _inputs(n=7, m=3, d=5, seed=11)
    whole = loss_and_grads(compiled_op(method, reduce), x, w, b)
    with blocks(block):
        blocked = loss_and_grads(compiled_op(method, reduce), x, w, b)
    assert_close_rel(blocked[0], whole[0], 1e-13, "loss")
    for g, r in zip(blocked[1], whole[1]):
        assert_close_rel(g, r, 1e-13, "grad")
