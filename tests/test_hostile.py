"""Hostile inputs: the right answer or a clear error, never a crash or a silent wrong value.

- integer arguments of the ops called directly (offsets near INT64_MAX, negative
  or decreasing speaker offsets, negative block sizes): the same ValueError;
- the softmax gradients at large w (up to 1e30 in float32, 1e300 in float64);
- scale: loss(c x) == loss(x) and grad(c x) == grad(x) / c for c over each
  dtype's normal range (power-of-two scales inside, docs/math.md "Scale");
- retained graphs: every backward's gradient is the caller's own;
- per-row losses changed in place, and inference-mode embeddings;
- the autograd nodes' names.

Each on both backends where both apply, and on the CUDA kernels under the CPU
emulation (tests/cuda_emulation) where the kernels are concerned.
"""

import os
import pathlib

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import ge2e_ext
from ge2e_ext.reference import ge2e_loss_reference

from helpers import (CPU_BACKENDS, LOSS_METHODS, assert_close_rel, assert_no_worse_than_torch,
                     blocks, make_embeddings, needs_cpu_extension, problem)

HERE = pathlib.Path(__file__).parent
INT64_MAX = 2**63 - 1


# `emulated`: the CUDA kernels under the CPU emulation (conftest.py).


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalars(dtype, w=10.0, b=-5.0):
    return torch.tensor(w, dtype=_acc(dtype)), torch.tensor(b, dtype=_acc(dtype))


def _fused(ops, x, method, w=10.0, b=-5.0, min_cosine=1e-6):
    """The fused op's (loss, grad_embeddings, grad_w) of a library (CPU or emulated)."""
    wt, bt = _scalars(x.dtype, w, b)
    loss, _, grad, _, grad_w, _ = ops.ge2e_forward_backward(
        **problem(x, wt, bt, method, min_cosine), scale=1.0)
    return loss, grad, grad_w


def _rows_backward(ops, x, method, w=10.0, b=-5.0, min_cosine=1e-6):
    """The per-row forward and backward ops (upstream gradient 1 on every row)."""
    wt, bt = _scalars(x.dtype, w, b)
    args = problem(x, wt, bt, method, min_cosine)
    loss, state, _ = ops.ge2e_forward(**args)
    grads = ops.ge2e_backward(**args, grad_loss=torch.ones_like(loss), state=state)
    return loss.sum(), grads[0], grads[2]


def _torch_reference(x, method, w, b=-5.0, min_cosine=1e-6):
    """The PyTorch path in float64 on the same values: loss, dL/dx, dL/dw."""
    xx = x.detach().double().requires_grad_()
    wt = torch.tensor(float(w), dtype=torch.float64, requires_grad=True)
    loss = ge2e_ext.ge2e_loss(xx, wt, b, method, min_cosine=min_cosine, backend="torch")
    gx, gw = torch.autograd.grad(loss, (xx, wt))
    return loss.detach(), gx, gw


# ------------------------------------------------------------- 1. integer arguments

@needs_cpu_extension
class TestIntegerArguments:
    x = make_embeddings(2, 3, 4, seed=1, requires_grad=False)
    w, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)

    @pytest.mark.parametrize("offset", [INT64_MAX, INT64_MAX - 1, 2**62, -1, -INT64_MAX - 1, 3])
    @pytest.mark.parametrize("op", ["forward", "forward_backward", "loss"])
    def test_speaker_offset_out_of_range_is_a_value_error(self, offset, op):
        sums = torch.randn(4, 4, dtype=torch.float64)
        args = problem(self.x, self.w, self.b, sums=sums, speaker_offset=offset)
        call = {
            "forward": lambda: torch.ops.ge2e_ext.ge2e_forward(**args),
            "forward_backward": lambda: torch.ops.ge2e_ext.ge2e_forward_backward(**args,
                                                                                 scale=1.0),
            "loss": lambda: torch.ops.ge2e_ext._ge2e_loss(**args, scale=1.0),
        }[op]
        with pytest.raises(ValueError, match="speaker_offset"):
            call()

    def test_the_largest_valid_offset_is_accepted(self):
        sums = torch.cat([torch.randn(2, 4, dtype=torch.float64), self.x.sum(1)])
        loss, _, _ = torch.ops.ge2e_ext.ge2e_forward(**problem(self.x, self.w, self.b, sums=sums,
                                                               speaker_offset=2))
        assert torch.isfinite(loss).all()

    @pytest.mark.parametrize("block", [-INT64_MAX - 1])
    def test_negative_block_speakers_is_a_value_error(self, block):
        with pytest.raises(ValueError, match="block_speakers"):
            torch.ops.ge2e_ext._set_block_speakers(block)
        assert torch.ops.ge2e_ext._set_block_speakers(0) == 0  # the setting was left alone

    @pytest.mark.parametrize("block", [INT64_MAX, 1, -1, -INT64_MAX])
    def test_any_positive_block_size_works(self, block):
        with blocks(block):
            loss, _, _ = torch.ops.ge2e_ext.ge2e_forward(**problem(self.x, self.w, self.b))
        ref = ge2e_ext.ge2e_loss(self.x, 10.0, -5.0, reduction="none", backend="torch")
        assert_close_rel(loss, ref, 1e-12, "loss")

    @pytest.mark.parametrize("offsets", [
        [0, INT64_MAX, 6],             # huge
        [0, -INT64_MAX - 1, 6],        # the most negative: off[j+1] - off[j] overflows
        [0, 4, 2, 6],                  # decreasing
        [0, -2, 6],                    # negative
        [0, 3, INT64_MAX],             # last offset is not B
        [INT64_MAX, 3, 6],             # first offset is not 0
    ])
    def test_bad_speaker_offsets_are_a_value_error(self, offsets):
        rows = torch.randn(6, 4, dtype=torch.float64)
        o = torch.tensor(offsets, dtype=torch.int64)
        args = problem(rows, self.w, self.b, speaker_offsets=o)
        with pytest.raises(ValueError, match="speaker_offsets"):
            torch.ops.ge2e_ext.ge2e_forward(**args)
        with pytest.raises(ValueError, match="speaker_offsets"):
            torch.ops.ge2e_ext.ge2e_forward_backward(**args, scale=1.0)

    def test_bad_state_shape_is_a_value_error(self):
        args = problem(self.x, self.w, self.b)
        loss, state, _ = torch.ops.ge2e_ext.ge2e_forward(**args)
        with pytest.raises(ValueError, match="state"):
            torch.ops.ge2e_ext.ge2e_backward(**args, grad_loss=torch.ones_like(loss),
                                             state=state[..., :1])


# ------------------------------------------------------------- 2. large w

LARGE_W = {torch.float32: [1e5, 1e8, 1e10, 1e20, 1e30], torch.float64: [1e8, 1e50, 1e100, 1e300]}
W_CASES = [pytest.param(dt, w, id=f"{str(dt)[6:]}-{w:g}") for dt, ws in LARGE_W.items()
           for w in ws]
W_TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def _assert_matches(got, ref, dtype, what):
    loss, gx, gw = got
    ref_loss, ref_gx, ref_gw = ref
    tol = W_TOL[dtype]
    assert_close_rel(loss.reshape(()), ref_loss, tol, f"{what}: loss")
    assert_close_rel(gx, ref_gx, tol, f"{what}: grad embeddings")
    # dL/dw on the scale of itself (it is small when w is large).
    scale = max(abs(ref_gw.item()), 1e-300)
    assert abs(gw.item() - ref_gw.item()) <= tol * max(scale, 1e-12 * scale + 0) + 1e-30, (
        f"{what}: grad w {gw.item()} vs {ref_gw.item()}")


def _large_w_input(dtype):
    # Close impostors so that several probabilities stay alive even at large w.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    base[1] = base[0] + 1e-3 * torch.randn(3, 8, generator=g, dtype=torch.float64)
    return base.to(dtype)


@pytest.mark.parametrize("dtype, w", W_CASES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_softmax_gradients_at_large_w(dtype, w, backend, reduction):
    x = _large_w_input(dtype)
    xx = x.clone().requires_grad_()
    wt = torch.tensor(w, dtype=_acc(dtype), requires_grad=True)
    loss = ge2e_ext.ge2e_loss(xx, wt, -5.0, "softmax", reduction=reduction, backend=backend)
    total = loss.sum()
    gx, gw = torch.autograd.grad(total, (xx, wt))
    ref_loss, ref_gx, ref_gw = _torch_reference(x, "softmax", w)
    if reduction == "mean":
        ref_loss, ref_gx, ref_gw = ref_loss / 12, ref_gx / 12, ref_gw / 12
    assert torch.isfinite(gx).all() and torch.isfinite(gw)
    _assert_matches((total.detach(), gx, gw), (ref_loss, ref_gx, ref_gw), dtype,
                    f"{backend} {reduction}")


@needs_cpu_extension
@pytest.mark.parametrize("dtype, w", W_CASES)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("form", ["fused", "rows"])
def test_large_w_on_the_emulated_cuda_kernels(emulated, dtype, w, method, form):
    x = _large_w_input(dtype)
    run = _fused if form == "fused" else _rows_backward
    ref = _torch_reference(x, method, w)
    for ops, name in ((emulated, "emulated cuda"), (torch.ops.ge2e_ext, "cpu")):
        _assert_matches(run(ops, x, method, w=w), ref, dtype, f"{name} {form} {method}")


# ------------------------------------------------------------- 3. scale

# c over each dtype's normal range (x ~ N(0, 1): |c x| stays normal and finite).
SCALES = {
    torch.float32: [2.0**-100, 1e-30, 1e-23, 1e-20, 1e10, 1e19, 1e30, 1e35],
    torch.float64: [1e-300, 1e-162, 1e-100, 1e100, 1e200, 1e300],
    torch.float16: [2.0**-10, 1e-2, 1e2, 1e3],
    torch.bfloat16: [1e-35, 1e-23, 1e19, 1e35],
}
SCALE_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5,
             torch.bfloat16: 2e-5}
SCALE_CASES = [pytest.param(dt, c, id=f"{str(dt)[6:]}-{c:g}") for dt, cs in SCALES.items()
               for c in cs]


def _scaled_input(dtype, c, seed=5, n=4, m=3, d=8):
    """x ~ N(0, 1) and c x, both rounded to dtype (c a power of two for half
    precision, whose spacing would otherwise change the values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, d, generator=g, dtype=torch.float64)
    if dtype in (torch.float16, torch.bfloat16):
        c = 2.0 ** round(torch.log2(torch.tensor(c)).item())
    return x.to(dtype), (x * c).to(dtype), c


def _loss_and_grad(x, method, backend, reduction="sum", min_cosine=1e-6):
    xx = x.clone().requires_grad_()
    loss = ge2e_ext.ge2e_loss(xx, 10.0, -5.0, method, reduction=reduction,
                              min_cosine=min_cosine, backend=backend)
    (g,) = torch.autograd.grad(loss.sum(), xx)
    return loss.detach().double(), g.double()


@pytest.mark.parametrize("dtype, c", SCALE_CASES)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_loss_does_not_depend_on_scale(dtype, c, method, backend):
    x, cx, c = _scaled_input(dtype, c)
    ref_loss, ref_g = _loss_and_grad(x.double(), method, "torch")
    if dtype in (torch.float16, torch.bfloat16):  # the scaled values are exact in the dtype
        ref_loss, ref_g = _loss_and_grad(x.double(), method, "torch")
    loss, g = _loss_and_grad(cx, method, backend)
    tol = SCALE_TOL[dtype]
    assert_close_rel(loss, ref_loss, tol, f"loss at scale {c:g}")
    assert torch.isfinite(g).all(), f"non-finite gradient at scale {c:g}"
    # grad(c x) = grad(x) / c, compared as c grad(c x) (a half-precision gradient
    # is rounded to its dtype and may leave its range: compared where representable).
    finite = torch.isfinite(g * c)
    assert_close_rel((g * c)[finite], ref_g[finite],
                     tol if dtype in (torch.float32, torch.float64) else
                     4 * torch.finfo(dtype).eps, f"grad at scale {c:g}")


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_far_below_their_speaker_and_zero_vectors(method, backend, dtype):
    """Rows far below (and far above) their speaker's largest, whose own terms are
    scaled on their own, against the float64 loop reference; and exact zero
    vectors (finite, as before)."""
    x = make_embeddings(4, 3, 8, seed=9, requires_grad=False)
    far = 1e-12 if dtype == torch.float32 else 1e-100  # beyond 2^-30 / 2^-300 of the speaker
    x[0, 1] *= far
    x[2, 0] /= far
    x = x.to(dtype)
    loss, g = _loss_and_grad(x, method, backend)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    reference = ge2e_loss_reference(x.double(), 10.0, -5.0, method).sum()
    assert_close_rel(loss, reference, 1e-5 if dtype == torch.float32 else 1e-10, "loss")
    zero = x.clone()
    zero[3, 2] = 0.0
    loss, g = _loss_and_grad(zero, method, backend)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    reference = ge2e_ext.ge2e_loss(zero.double(), 10.0, -5.0, method, backend="torch")
    assert_close_rel(loss, reference, 1e-5 if dtype == torch.float32 else 1e-10, "zero row")


@needs_cpu_extension
@pytest.mark.parametrize("dtype, c", [p for p in SCALE_CASES
                                      if p.values[0] in (torch.float32, torch.float64)])
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("form", ["fused", "rows"])
def test_scale_on_the_emulated_cuda_kernels(emulated, dtype, c, method, form):
    x, cx, c = _scaled_input(dtype, c)
    run = _fused if form == "fused" else _rows_backward
    ref_loss, ref_g, _ = _torch_reference(x, method, 10.0)
    for ops, name in ((emulated, "emulated cuda"), (torch.ops.ge2e_ext, "cpu")):
        loss, g, _ = run(ops, cx, method)
        assert_close_rel(loss.reshape(()), ref_loss, SCALE_TOL[dtype], f"{name}: loss")
        assert_close_rel(g.double() * c, ref_g, SCALE_TOL[dtype], f"{name}: grad")


@needs_cpu_extension
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_given_sums_at_any_scale(method):
    """Sums of other ranks (distributed form) at a scale of their own: their
    gradient is for the unscaled sums."""
    x = make_embeddings(2, 3, 6, seed=5, requires_grad=False)
    g = torch.Generator().manual_seed(6)
    others = torch.randn(2, 6, generator=g, dtype=torch.float64)
    w, b = _scalars(torch.float64)

    def run(scale_x, scale_others):
        xx = x * scale_x
        sums = torch.cat([others[:1] * scale_others, xx.sum(1), others[1:] * scale_others])
        out = torch.ops.ge2e_ext.ge2e_forward_backward(
            **problem(xx, w, b, method, sums=sums, speaker_offset=1), scale=1.0)
        return out[0], out[2] * scale_x, out[3] * torch.tensor(
            [scale_others, scale_x, scale_x, scale_others], dtype=torch.float64).unsqueeze(1)

    base = run(1.0, 1.0)
    for sx, so in ((1e-300, 1e300), (1e300, 1e-250), (1e-160, 1.0)):
        got = run(sx, so)
        for name, a, e in zip(("loss", "grad x", "grad sums"), got, base):
            assert_close_rel(a, e, 1e-12, f"{name} at {sx:g}, {so:g}")


# Hypothesis: scales over each dtype's range, w up to 1e30 (float32) / 1e300 (float64).
def _property_case(seed, dtype, c, w, method, reduction):
    x = _large_w_input(torch.float64) + 0.1 * make_embeddings(4, 3, 8, seed=seed,
                                                              requires_grad=False)
    values = x.to(dtype)  # the values at scale 1; c is a power of two: c x is exact
    # The gradient is about w / c: where that overflows there is nothing to compare.
    assume(w / c < torch.finfo(dtype).max * 1e-4)

    def run(backend, inputs):
        xx = inputs.clone().requires_grad_()
        wt = torch.tensor(w, dtype=inputs.dtype, requires_grad=True)
        loss = ge2e_ext.ge2e_loss(xx, wt, -5.0, method, reduction=reduction, backend=backend)
        gx, gw = torch.autograd.grad(loss.sum(), (xx, wt))
        return loss.detach().sum(), gx, gw

    ref = run("torch", values.double())
    torch_path = run("torch", values * c)
    for backend in CPU_BACKENDS:
        got = run(backend, values * c)
        assert all(torch.isfinite(t).all() for t in got), f"{backend}: non-finite"
        got = (got[0], got[1] * c, got[2])
        torch_scaled = (torch_path[0], torch_path[1] * c, torch_path[2])
        for name, a, t, e in zip(("loss", "grad x", "grad w"), got, torch_scaled, ref):
            if dtype == torch.float64:
                assert_close_rel(a, e, 1e-9 * max(1.0, w * 1e-6), f"{backend} {name}")
            else:
                assert_no_worse_than_torch(a, t, e, f"{backend} {name}")
            # and the same at scale 1 (c is a power of two: the scale is exact)
        unscaled = run(backend, values)
        assert_close_rel(got[0], unscaled[0], 1e-6 if dtype == torch.float32 else 1e-13,
                         f"{backend}: loss(c x) vs loss(x)")
        assert_close_rel(got[1], unscaled[1], 1e-6 if dtype == torch.float32 else 1e-13,
                         f"{backend}: c grad(c x) vs grad(x)")


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), log2_scale=st.integers(-120, 120),
       log10_w=st.floats(-1, 30), method=st.sampled_from(LOSS_METHODS),
       reduction=st.sampled_from(["sum", "mean", "none"]))
@example(seed=0, log2_scale=-76, log10_w=1.0, method="softmax", reduction="sum")  # ~1e-23
@example(seed=0, log2_scale=63, log10_w=1.0, method="softmax", reduction="sum")   # ~1e19
@example(seed=1, log2_scale=0, log10_w=10.0, method="softmax", reduction="sum")   # w = 1e10
@example(seed=2, log2_scale=-66, log10_w=30.0, method="softmax", reduction="none")  # w/c overflows
@example(seed=2, log2_scale=-20, log10_w=30.0, method="softmax", reduction="none")
def test_float32_scale_and_w_property(seed, log2_scale, log10_w, method, reduction):
    _property_case(seed, torch.float32, 2.0 ** log2_scale, 10.0 ** log10_w, method, reduction)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), log2_scale=st.integers(-1000, 1000),
       log10_w=st.floats(-1, 300), method=st.sampled_from(LOSS_METHODS),
       reduction=st.sampled_from(["sum", "mean", "none"]))
@example(seed=0, log2_scale=-538, log10_w=1.0, method="softmax", reduction="sum")  # ~1e-162
@example(seed=1, log2_scale=0, log10_w=100.0, method="softmax", reduction="sum")   # w = 1e100
def test_float64_scale_and_w_property(seed, log2_scale, log10_w, method, reduction):
    _property_case(seed, torch.float64, 2.0 ** log2_scale, 10.0 ** log10_w, method, reduction)


# ------------------------------------------------------------- 4. retained graphs

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_retained_graph_thrice_with_a_view_input(backend, reduction):
    flat = make_embeddings(4, 3, 8, seed=2, requires_grad=False).reshape(12, 8).requires_grad_()
    x = flat.view(4, 3, 8)
    loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, reduction=reduction, backend=backend)
    grads = [torch.autograd.grad(loss, flat, retain_graph=True)[0] for _ in range(3)]
    ref = grads[0].clone()
    grads[0].mul_(7.0)  # the caller's own: changing it changes no other
    for g in grads[1:]:
        assert g.data_ptr() != grads[0].data_ptr()
        assert torch.equal(g, ref)
    loss.backward(torch.tensor(2.0, dtype=loss.dtype))
    assert_close_rel(flat.grad, 2 * ref, 1e-12, "accumulated")


@needs_cpu_extension
def test_first_backward_hands_out_the_saved_gradient_and_later_ones_their_own():
    """The first backward's gradient is the buffer the forward filled (no copy:
    peak one gradient); a retained second one gets a fresh tensor."""
    x = make_embeddings(4, 3, 8, seed=2)
    loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, backend="extension")
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x, retain_graph=True)[0]
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, second)
    # The saved buffer is handed out: profile the first backward of a fresh graph
    # and count input-sized allocations (none but what the op itself makes).
    loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, backend="extension")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        (g,) = torch.autograd.grad(loss, x, torch.tensor(3.0, dtype=loss.dtype))
    input_bytes = x.numel() * x.element_size()
    big = [e for e in prof.events() if e.cpu_memory_usage >= input_bytes]
    assert not big, f"the backward allocated input-sized memory: {[e.name for e in big]}"
    assert_close_rel(g, 3 * first, 1e-12, "scaled")


# ------------------------------------------------------------- 8. what the PyTorch path accepts

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_per_row_losses_changed_in_place(backend, method):
    x = make_embeddings(4, 3, 8, seed=4)
    rows = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, reduction="none", backend=backend)
    expected = torch.autograd.grad(rows.sum() * 2, x, retain_graph=True)[0]
    rows.mul_(2)
    (g,) = torch.autograd.grad(rows.sum(), x, retain_graph=True)
    assert_close_rel(g, expected, 1e-12, "after mul_")
    rows2 = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, reduction="none", backend=backend)
    mask = torch.zeros_like(rows2, dtype=torch.bool)
    mask[0] = True
    rows2[mask] = 0
    (g2,) = torch.autograd.grad(rows2.sum(), x)
    keep = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, reduction="none", backend="torch")
    (ref2,) = torch.autograd.grad((keep * (~mask)).sum(), x)
    assert_close_rel(g2, ref2, 1e-12, "after masked assignment")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_inference_mode_embeddings_with_trainable_w_and_b(backend, reduction):
    with torch.inference_mode():
        x = make_embeddings(4, 3, 8, seed=6, requires_grad=False)
    criterion = ge2e_ext.GE2ELoss(reduction=reduction, backend=backend).double()
    loss = criterion(x).sum()
    loss.backward()
    ref = ge2e_ext.GE2ELoss(reduction=reduction, backend="torch").double()
    ref(x.clone()).sum().backward()
    assert_close_rel(criterion.w.grad, ref.w.grad, 1e-10, "w grad")
    assert_close_rel(criterion.b.grad, ref.b.grad, 1e-10, "b grad")


# ------------------------------------------------------------- node names

@needs_cpu_extension
def test_autograd_nodes_are_named_as_pytorch_names_its_own():
    x = make_embeddings(4, 3, 8, seed=8)
    reduced = ge2e_ext.ge2e_loss(x, 10.0, -5.0, backend="extension")
    rows = ge2e_ext.ge2e_loss(x, 10.0, -5.0, reduction="none", backend="extension")
    assert type(reduced.grad_fn).__name__ == "Ge2eLossBackward0"
    assert repr(reduced.grad_fn).startswith("<Ge2eLossBackward0 object at ")
    assert type(rows.grad_fn).__name__ == "Ge2eLossBackward1"
    assert repr(rows.grad_fn).startswith("<Ge2eLossBackward1 object at ")
    # still a full autograd node
    assert reduced.grad_fn.next_functions


# ------------------------------------------------------------- every CPU instruction set

_LARGE_W_SCRIPT = """
import torch, ge2e_ext
g = torch.Generator().manual_seed(3)
x = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
x[1] = x[0] + 1e-3 * torch.randn(3, 8, generator=g, dtype=torch.float64)
assert ge2e_ext.cpu_capability() == {capability!r}, ge2e_ext.cpu_capability()
for w in (1e5, 1e8, 1e30):
    out = []
    for backend, dtype in (("extension", torch.float32), ("torch", torch.float64)):
        xx = x.to(dtype).requires_grad_()
        wt = torch.tensor(w, dtype=dtype, requires_grad=True)
        loss = ge2e_ext.ge2e_loss(xx, wt, -5.0, backend=backend)
        out.append([t.double() for t in torch.autograd.grad(loss, (xx, wt))])
    (gx, gw), (rx, rw) = out
    err = ((gx - rx).abs().max() / rx.abs().max()).item()
    assert err < 2e-5, (w, err)
    assert abs(gw - rw) <= 2e-5 * abs(rw), (w, gw.item(), rw.item())
"""


def _runnable_capabilities():
    """The CPU kernels this build has and this CPU runs (the best, and all below it)."""
    if "cpu" not in ge2e_ext.extension_devices():
        return []
    built = list(torch.ops.ge2e_ext.cpu_capabilities_built())  # best first
    return built[built.index(ge2e_ext.cpu_capability()):]


@pytest.mark.parametrize("capability", _runnable_capabilities())
def test_large_w_with_every_instruction_set(capability):
    """The kernels of every instruction set (compiled with FMA for AVX2/AVX-512,
    where a fused multiply-add once broke the softmax state's exactness)."""
    import subprocess
    import sys

    env = dict(os.environ, GE2E_EXT_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", _LARGE_W_SCRIPT.format(capability=capability)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
