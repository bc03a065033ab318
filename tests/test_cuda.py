"""The CUDA kernels: parity, dtypes, gradcheck, opcheck, determinism, compile,
autocast, memory. Skipped cleanly where no GPU (or no compiled CUDA kernel) exists.
benchmarks/gpu_check.sh runs this file on a GPU machine."""

import pytest
import torch

import ge2e_ext
from ge2e_ext import _ops
from ge2e_ext.reference import ge2e_loss_reference

from conftest import HAS_CUDA, assert_close_rel, make_embeddings

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and ge2e_ext's CUDA kernels")

METHODS = ["softmax", "contrast"]
# D not a multiple of 4 or 32, K beyond one 256-thread sweep, M = 2 and N = 2.
ODD_SHAPES = [(2, 2, 1), (3, 2, 3), (5, 7, 33), (9, 3, 257), (300, 2, 5), (40, 4, 1000)]


def _run(x, method, min_cosine=1e-6, backend="extension", reduction="sum", w=3.0, b=-1.0):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = torch.tensor(w, dtype=acc, device=x.device, requires_grad=True)
    b = torch.tensor(b, dtype=acc, device=x.device, requires_grad=True)
    x = x.detach().requires_grad_()
    loss = ge2e_ext.ge2e_loss(x, w, b, method, reduction=reduction, min_cosine=min_cosine,
                              backend=backend)
    grads = torch.autograd.grad(loss.sum(), (x, w, b))
    return loss.detach(), grads


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("min_cosine", [1e-6, None])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_float64_matches_loop_reference(method, min_cosine, shape):
    x = make_embeddings(*shape, seed=sum(shape), requires_grad=False)
    if shape[0] * shape[0] * shape[1] > 20000:  # the loop reference is slow: CPU backend instead
        ref_loss, ref_grads = _run(x, method, min_cosine, backend="torch")
    else:
        xr = x.clone().requires_grad_()
        w = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
        ref_loss = ge2e_loss_reference(xr, w, b, method, min_cosine=min_cosine).sum()
        ref_grads = torch.autograd.grad(ref_loss, (xr, w, b))
    loss, grads = _run(x.cuda(), method, min_cosine)
    assert_close_rel(loss.cpu(), ref_loss.detach(), 1e-10, "loss")
    for name, g, r in zip("xwb", grads, ref_grads):
        assert_close_rel(g.cpu(), r, 1e-10, f"grad {name}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(64, 10, 256), (1024, 10, 512), (4096, 10, 100)])
def test_float32_matches_float64(method, shape):
    x = make_embeddings(*shape, seed=1, requires_grad=False, device="cuda")
    ref_loss, ref_grads = _run(x, method, backend="torch")  # float64 on the GPU
    loss, grads = _run(x.float(), method)
    assert loss.dtype == torch.float32
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    for name, g, r in zip("xwb", grads, ref_grads):
        # Relative to the whole gradient (norm-wise), as float32 sums of N terms.
        err = (g.double() - r).norm() / r.norm().clamp_min(1.0)
        assert err < 1e-5, f"grad {name}: {err:.2e}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_worse_than_twice_pytorch(method, dtype):
    x64 = make_embeddings(128, 10, 256, seed=3, requires_grad=False, device="cuda")
    ref_loss, ref_grads = _run(x64, method, backend="torch")
    x = x64.to(dtype)
    ours_loss, ours_grads = _run(x, method)
    torch_loss, torch_grads = _run(x, method, backend="torch")
    assert ours_loss.dtype == torch.float32 and ours_grads[0].dtype == dtype

    def err(a, r):
        return ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()

    assert err(ours_loss, ref_loss) <= 2 * err(torch_loss, ref_loss) + 1e-6
    assert err(ours_grads[0], ref_grads[0]) <= 2 * err(torch_grads[0], ref_grads[0]) + 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_matches_cpu_kernel_and_blocks(method, block_speakers):
    x = make_embeddings(37, 4, 45, seed=5, requires_grad=False)
    cpu_loss, cpu_grads = _run(x, method, reduction="none")
    for block in (0, 1, 5):
        _ops.BLOCK_SPEAKERS = block
        loss, grads = _run(x.cuda(), method, reduction="none")
        assert_close_rel(loss.cpu(), cpu_loss, 1e-12, f"loss, block {block}")
        for g, r in zip(grads, cpu_grads):
            assert_close_rel(g.cpu(), r, 1e-12, f"grad, block {block}")


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck(method):
    x = make_embeddings(3, 3, 5, seed=1, offset=0.3, device="cuda")
    w = torch.tensor(2.0, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.tensor(-0.5, dtype=torch.float64, device="cuda", requires_grad=True)
    fn = lambda x, w, b: ge2e_ext.ge2e_loss(x, w, b, method, reduction="none",  # noqa: E731
                                            backend="extension")
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_opcheck(method):
    x = make_embeddings(4, 2, 6, seed=4, device="cuda")
    w = torch.tensor(2.0, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.tensor(-0.5, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.ge2e_ext.ge2e_forward.default,
                          (x, None, w, b, 0, method, 1e-6, 0))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitwise_deterministic(method, dtype):
    x = make_embeddings(300, 10, 200, seed=7, dtype=dtype, device="cuda", requires_grad=False)
    first = _run(x, method)
    for _ in range(3):
        again = _run(x, method)
        assert torch.equal(again[0], first[0])
        for g, f in zip(again[1], first[1]):
            assert torch.equal(g, f)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = make_embeddings(16, 5, 32, seed=8, dtype=torch.float32, device="cuda")
    criterion = ge2e_ext.GE2ELoss(backend="extension").cuda()
    expected = criterion(x)
    (expected_grad,) = torch.autograd.grad(expected, x)
    compiled = torch.compile(criterion, fullgraph=True)
    loss = compiled(x)
    (grad,) = torch.autograd.grad(loss, x)
    assert_close_rel(loss.detach(), expected.detach(), 1e-6, "loss")
    assert_close_rel(grad, expected_grad, 1e-6, "grad")


def test_autocast_runs_the_loss_in_float32():
    x = make_embeddings(8, 4, 16, seed=9, dtype=torch.float32, device="cuda")
    linear = torch.nn.Linear(16, 16).cuda()
    criterion = ge2e_ext.GE2ELoss().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        embeddings = linear(x)
        assert embeddings.dtype == torch.bfloat16
        loss = criterion(embeddings)
        torch_loss = ge2e_ext.ge2e_loss(embeddings, criterion.w, criterion.b, backend="torch")
    assert loss.dtype == torch.float32 and torch_loss.dtype == torch.float32
    loss.backward()
    assert linear.weight.grad.dtype == torch.float32
    assert_close_rel(loss.detach(), torch_loss.detach(), 1e-4, "loss")


def test_cpu_parameters_are_moved_and_device_mismatch_is_an_error():
    x = make_embeddings(4, 3, 8, seed=10, dtype=torch.float32, device="cuda")
    loss = ge2e_ext.GE2ELoss()(x)  # module left on the CPU: its 0-dim parameters follow
    assert loss.device.type == "cuda"
    w = torch.tensor(10.0, device="cuda")
    with pytest.raises(RuntimeError, match="sums are on cpu"):
        torch.ops.ge2e_ext.ge2e_forward(x, torch.randn(4, 8), w, w, 0, "softmax", 1e-6)


def test_large_n_peak_memory_stays_under_twice_the_input():
    n, m, d = 4096, 10, 512
    x = torch.randn(n, m, d, device="cuda", requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    criterion = ge2e_ext.GE2ELoss(backend="extension").cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = criterion(x)
    (grad,) = torch.autograd.grad(loss, x)
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - before
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # The gradient itself is one input's worth; the rest must be small.
    assert growth < 2 * input_bytes, f"peak growth {growth / 2**20:.0f} MiB"
