"""Odd and hostile inputs: zero vectors, NaN/Inf, determinism, memory."""

import pytest
import torch

import ge2e_ext
from ge2e_ext.reference import ge2e_loss_reference

from conftest import CPU_BACKENDS, assert_close_rel, make_embeddings


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["softmax", "contrast"])
@pytest.mark.parametrize("min_cosine", [1e-6, None])
def test_zero_norm_embeddings_give_finite_loss_and_gradient(backend, method, min_cosine):
    x = make_embeddings(4, 3, 5, seed=1, requires_grad=False)
    x[1, 0] = 0                      # a zero utterance
    x[2] = 0                         # a speaker whose centroid is zero
    x[3, 1] = -x[3, 0]               # M=3: the exclusive centroid of utterance 2 is zero...
    x[3, 2] = 1.0
    x = x.requires_grad_()
    w = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    loss = ge2e_ext.ge2e_loss(x, w, b, method, min_cosine=min_cosine, backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    for g in (x.grad, w.grad, b.grad):
        assert torch.isfinite(g).all()


def test_zero_norm_convention_is_shared():
    """Both backends define cos(0, v) = 0 with gradient 0: same numbers."""
    if "cpu" not in ge2e_ext.extension_devices():
        pytest.skip("compiled op not built")
    x = make_embeddings(3, 4, 6, seed=4, requires_grad=False)
    x[0, 2] = 0
    x[1] = 0
    results = []
    for backend in ("torch", "extension"):
        xb = x.clone().requires_grad_()
        loss = ge2e_ext.ge2e_loss(xb, 10.0, -5.0, reduction="none", backend=backend)
        loss.sum().backward()
        results.append((loss.detach(), xb.grad))
    assert_close_rel(results[1][0], results[0][0], 1e-12, "loss")
    assert_close_rel(results[1][1], results[0][1], 1e-12, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["softmax", "contrast"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_input_gives_non_finite_loss(backend, method, bad, dtype):
    for where in [(0, 0, 0), (2, 1, 3)]:
        x = make_embeddings(3, 2, 4, seed=9, dtype=dtype, requires_grad=False)
        x[where] = bad
        rows = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, reduction="none", backend=backend)
        assert not torch.isfinite(rows.sum()), f"{bad} at {where} gave a finite loss"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_w_or_b_gives_non_finite_loss(backend, bad):
    x = make_embeddings(3, 2, 4, seed=9, requires_grad=False)
    for w, b in ((bad, -5.0), (10.0, bad)):
        for method in ("softmax", "contrast"):
            loss = ge2e_ext.ge2e_loss(x, w, b, method, backend=backend)
            assert not torch.isfinite(loss), (w, b, method)


@pytest.mark.parametrize("method", ["softmax", "contrast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_calls_are_bitwise_identical(method, dtype):
    if "cpu" not in ge2e_ext.extension_devices():
        pytest.skip("compiled op not built")
    x = make_embeddings(37, 5, 19, seed=6, dtype=dtype)
    outputs = []
    for _ in range(3):
        w = torch.tensor(10.0, dtype=dtype, requires_grad=True)
        b = torch.tensor(-5.0, dtype=dtype, requires_grad=True)
        loss = ge2e_ext.ge2e_loss(x, w, b, method, backend="extension")
        gx, gw, gb = torch.autograd.grad(loss, (x, w, b))
        outputs.append((loss, gx, gw, gb))
    for other in outputs[1:]:
        for a, c in zip(outputs[0], other):
            assert torch.equal(a, c)


def test_hardest_impostor_ties_go_to_the_lowest_index():
    """Contrast loss with two identical impostor speakers: the gradient goes to
    the first one (documented tie rule), and w, b gradients are unaffected."""
    if "cpu" not in ge2e_ext.extension_devices():
        pytest.skip("compiled op not built")
    x = make_embeddings(3, 2, 4, seed=12, offset=1.0, requires_grad=False)
    x[2] = x[1]  # speakers 1 and 2 are the same
    rows, stat, hardest = torch.ops.ge2e_ext.ge2e_forward(
        x, None, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64),
        0, "contrast", 1e-6)
    assert hardest[0].tolist() == [1, 1]
    ref = ge2e_loss_reference(x, 10.0, -5.0, "contrast").sum()
    assert_close_rel(rows.sum(), ref, 1e-12, "loss")


def _largest_allocation(fn):
    """Largest single CPU allocation (bytes) made while fn runs, per the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    return max(sizes) if sizes else 0


@pytest.mark.parametrize("method", ["softmax", "contrast"])
def test_compiled_op_never_allocates_the_n_m_n_similarities(method):
    """N=512, M=4, D=8: the N x M x N similarities (4 MiB) are 64x the input; the
    op works on blocks and its largest allocation stays far below them, while
    the pure-PyTorch path does materialise them (the measure works)."""
    if "cpu" not in ge2e_ext.extension_devices():
        pytest.skip("compiled op not built")
    n, m, d = 512, 4, 8
    x = make_embeddings(n, m, d, dtype=torch.float32)
    nmn_bytes = n * m * n * 4

    def step(backend):
        def run():
            loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, backend=backend)
            torch.autograd.grad(loss, x)
        return run

    assert _largest_allocation(step("torch")) >= nmn_bytes
    assert _largest_allocation(step("extension")) <= nmn_bytes // 4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_opposite_utterances_with_m_2(backend, dtype):
    """M = 2 and e_j2 ~ -e_j1: the speaker sum is tiny next to each utterance, so
    |s - e|^2 expanded as |s|^2 - 2 e.s + |e|^2 would cancel; the exclusive
    centroid is computed directly and the loss stays accurate."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(4, 1, 16, generator=g, dtype=torch.float64)
    x = torch.cat([base, -base + 1e-4 * torch.randn(4, 1, 16, generator=g, dtype=torch.float64)],
                  dim=1)
    x = x.to(dtype)
    expected = ge2e_loss_reference(x.double(), 10.0, -5.0, "softmax", min_cosine=None)
    got = ge2e_ext.ge2e_loss(x, 10.0, -5.0, reduction="none", min_cosine=None,
                             backend=backend)
    assert_close_rel(got, expected, 1e-10 if dtype == torch.float64 else 1e-5, "loss")


def test_meta_tensors_give_the_loss_shape():
    """Shape-only tensors (device "meta") go through the pure-PyTorch path."""
    for reduction, shape in (("sum", ()), ("none", (4, 3))):
        x = torch.empty(4, 3, 5, device="meta", requires_grad=True)
        loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, reduction=reduction)
        assert loss.device.type == "meta" and loss.shape == shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_expanded_embeddings(backend):
    """A stride-0 view (one utterance repeated) gets its gradient summed back."""
    base = make_embeddings(3, 1, 4, seed=13)
    x = base.expand(3, 2, 4)
    loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, base)
    expected_x = x.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(
        ge2e_ext.ge2e_loss(expected_x, 10.0, -5.0, backend="torch"), expected_x)
    assert_close_rel(grad, expected.sum(1, keepdim=True), 1e-10, "grad")
