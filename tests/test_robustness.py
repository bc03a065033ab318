"""Odd and hostile inputs: zero vectors, NaN/Inf, ties, determinism, memory, layouts;
and what only a GPU can show (CUDA graphs, device memory)."""

import pytest
import torch

import ge2e_ext
from ge2e_ext.reference import ge2e_loss_reference

from helpers import (DEVICE_BACKENDS, EXTENSION_DEVICES, LOSS_METHODS, assert_close_rel, ge2e,
                     largest_allocation, leaf, loss_and_grads, make_embeddings, make_scalars,
                     needs_cpu_extension, needs_cuda, problem)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("min_cosine", [1e-6, None])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_zero_norm_embeddings_give_finite_loss_and_gradient(device, backend, method, min_cosine,
                                                            reduction):
    x = make_embeddings(4, 3, 5, seed=1, requires_grad=False)
    x[1, 0] = 0                      # a zero utterance
    x[2] = 0                         # a speaker whose centroid is zero
    x[3, 1] = -x[3, 0]               # M=3: the exclusive centroid of utterance 2 is zero...
    x[3, 2] = 1.0
    loss, grads = loss_and_grads(ge2e(backend, method, reduction, min_cosine),
                                 leaf(x.to(device)), *make_scalars(10.0, -5.0, device=device))
    assert torch.isfinite(loss).all()
    for g in grads:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_zero_norm_convention_is_shared(device, method):
    """Both backends define cos(0, v) = 0 with gradient 0: same numbers."""
    x = make_embeddings(3, 4, 6, seed=4, requires_grad=False, device=device)
    x[0, 2] = 0
    x[1] = 0
    results = [loss_and_grads(ge2e(backend, method, "none"), leaf(x),
                              *make_scalars(10.0, -5.0, device=device))
               for backend in ("torch", "extension")]
    assert_close_rel(results[1][0], results[0][0], 1e-12, "loss")
    for g, e in zip(results[1][1], results[0][1]):
        assert_close_rel(g, e, 1e-12, "grad")


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_input_gives_non_finite_loss(device, backend, method, bad, dtype):
    for where in [(0, 0, 0), (2, 1, 3)]:
        x = make_embeddings(3, 2, 4, seed=9, dtype=dtype, device=device, requires_grad=False)
        x[where] = bad
        for reduction in ("none", "sum"):
            loss = ge2e_ext.ge2e_loss(leaf(x), 10.0, -5.0, method, reduction=reduction,
                                      backend=backend)
            assert not torch.isfinite(loss.sum()), f"{bad} at {where} gave a finite loss"


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_repeated_calls_are_bitwise_identical(device, method, dtype, reduction):
    x = make_embeddings(37, 5, 19, seed=6, dtype=dtype, device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    outputs = [loss_and_grads(ge2e("extension", method, reduction), x,
                              *make_scalars(10.0, -5.0, acc, device)) for _ in range(3)]
    for other in outputs[1:]:
        assert torch.equal(other[0], outputs[0][0])
        for a, c in zip(other[1], outputs[0][1]):
            assert torch.equal(a, c)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_hardest_impostor_ties_go_to_the_lowest_index(device):
    """Contrast loss with two identical impostor speakers: the gradient goes to
    the first one (documented tie rule), and the loss is the original's."""
    x = make_embeddings(3, 2, 4, seed=12, offset=1.0, requires_grad=False)
    x[2] = x[1]  # speakers 1 and 2 are the same
    scalar = dict(dtype=torch.float64, device=device)
    rows, state, _ = torch.ops.ge2e_ext.ge2e_forward(**problem(
        x.to(device), torch.tensor(10.0, **scalar), torch.tensor(-5.0, **scalar), "contrast"))
    assert state[0, :, 0].tolist() == [1, 1]  # the contrast state: the hardest impostor
    ref = ge2e_loss_reference(x, 10.0, -5.0, "contrast").sum()
    assert_close_rel(rows.sum(), ref, 1e-12, "loss")


@needs_cpu_extension
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_compiled_op_never_allocates_the_n_m_n_similarities(method, reduction):
    """N=512, M=4, D=8: the N x M x N similarities (4 MiB) are 64x the input; the
    op works on blocks and its largest allocation stays far below them, while
    the pure-PyTorch path does materialise them (the measure works)."""
    n, m, d = 512, 4, 8
    x = make_embeddings(n, m, d, dtype=torch.float32)
    nmn_bytes = n * m * n * 4

    def step(backend):
        def run():
            loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, reduction=reduction,
                                      backend=backend)
            torch.autograd.grad(loss.sum(), x)
        return run

    assert largest_allocation(step("torch")) >= nmn_bytes
    assert largest_allocation(step("extension")) <= nmn_bytes // 4


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_opposite_utterances_with_m_2(device, backend, dtype):
    """M = 2 and e_j2 ~ -e_j1: the speaker sum is tiny next to each utterance, so
    |s - e|^2 expanded as |s|^2 - 2 e.s + |e|^2 would cancel; the exclusive
    centroid is computed directly and the loss stays accurate."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(4, 1, 16, generator=g, dtype=torch.float64)
    x = torch.cat([base, -base + 1e-4 * torch.randn(4, 1, 16, generator=g, dtype=torch.float64)],
                  dim=1).to(dtype)
    expected = ge2e_loss_reference(x.double(), 10.0, -5.0, "softmax", min_cosine=None)
    got = ge2e_ext.ge2e_loss(x.to(device), 10.0, -5.0, reduction="none", min_cosine=None,
                             backend=backend)
    assert_close_rel(got, expected, 1e-10 if dtype == torch.float64 else 1e-5, "loss")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_meta_tensors_give_the_loss_shape(reduction):
    """Shape-only tensors (device "meta") go through the pure-PyTorch path."""
    x = torch.empty(4, 3, 5, device="meta", requires_grad=True)
    loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, reduction=reduction)
    assert loss.device.type == "meta" and loss.shape == ((4, 3) if reduction == "none" else ())


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_expanded_embeddings(device, backend, reduction):
    """A stride-0 view (one utterance repeated) gets its gradient summed back."""
    base = make_embeddings(3, 1, 4, seed=13, device=device)
    x = base.expand(3, 2, 4)
    loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, reduction=reduction, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), base)
    expected_x = leaf(x)
    (expected,) = torch.autograd.grad(
        ge2e_ext.ge2e_loss(expected_x, 10.0, -5.0, backend="torch"), expected_x)
    assert_close_rel(grad, expected.sum(1, keepdim=True), 1e-10, "grad")


# ----------------------------------------------------------------- GPU only


@needs_cuda
def test_cuda_embeddings_with_a_cpu_module_and_mismatched_devices():
    x = make_embeddings(4, 3, 8, seed=10, dtype=torch.float32, device="cuda")
    loss = ge2e_ext.GE2ELoss()(x)  # module left on the CPU: its 0-dim parameters follow
    assert loss.device.type == "cuda"
    w = torch.tensor(10.0, device="cuda")
    with pytest.raises(RuntimeError, match="sums are on cpu"):
        torch.ops.ge2e_ext.ge2e_forward(**problem(x, w, w, sums=torch.randn(4, 8)))


@needs_cuda
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_a_training_step_replays_in_a_cuda_graph(method, reduction):
    """No host synchronisation and no allocation that breaks capture: a captured
    step replays with the results of an eager one, on new data too."""
    x = make_embeddings(64, 10, 256, seed=14, dtype=torch.float32, device="cuda")
    criterion = ge2e_ext.GE2ELoss(loss_method=method, reduction=reduction).cuda()

    def step():
        for p in (x, criterion.w, criterion.b):
            p.grad = None
        loss = criterion(x).sum()
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = criterion.w.grad = criterion.b.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()
    for seed in (15, 16):
        with torch.no_grad():
            x.copy_(make_embeddings(64, 10, 256, seed=seed, dtype=torch.float32,
                                    device="cuda", requires_grad=False))
        graph.replay()
        torch.cuda.synchronize()
        replayed = (static_loss.clone(), x.grad.clone(), criterion.w.grad.clone())
        eager_x = leaf(x)
        eager_loss = criterion(eager_x).sum()
        eager_grads = torch.autograd.grad(eager_loss, (eager_x, criterion.w))
        assert torch.equal(replayed[0], eager_loss.detach())
        assert torch.equal(replayed[1], eager_grads[0])
        assert torch.equal(replayed[2], eager_grads[1])


@needs_cuda
def test_cuda_peak_memory_at_large_n_is_within_1_5x_input_and_gradient():
    n, m, d = 1024, 10, 512
    x = torch.randn(n, m, d, device="cuda", requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    criterion = ge2e_ext.GE2ELoss(backend="extension").cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = criterion(x)
    (grad,) = torch.autograd.grad(loss, x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before + input_bytes
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert peak < 1.5 * (2 * input_bytes), f"peak {peak / 2**20:.0f} MiB"
