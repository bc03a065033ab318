"""The CUDA kernels, run on the CPU: csrc/cuda/ge2e_cuda_kernels.cuh compiled under
tests/cuda_emulation/emulate.h (threads for a block's threads, barriers, emulated
warp shuffles), launched by its own Launchers (the GPU's grids) behind the real
driver, and compared with the CPU kernel.

This checks the kernels' indexing, striding (K and D beyond one sweep of the
block's threads), reductions, half-precision loads and stores, and how many
kernels a step launches, on machines without a GPU; the device-parametrized
tests run the real thing where a GPU exists."""

import os
import pathlib

import pytest
import torch

from helpers import (LOSS_METHODS, assert_close_rel, blocks, make_embeddings, make_scalars,
                     needs_cpu_extension, problem)
from test_top1 import _argmax_top1, _tied_batch

HERE = pathlib.Path(__file__).parent
# The bulk runs 64 threads per emulated block at most: two warps, so the
# cross-warp reduction runs, and K or D above 64 exercises the striding, in
# seconds. The GPU build's 256 threads (eight warps: the last stage of the block
# reduction over all of its slots) run in test_every_kernel_at_256_threads.
# GE2E_EMU_THREADS=256 runs the bulk at the GPU's count too (minutes more).
EMULATED_THREADS = int(os.environ.get("GE2E_EMU_THREADS", "64"))
GPU_THREADS = 256
# The finish's chunks (the GPU build: 2048 rows, at most 1024 chunks), as
# tests/cuda_emulation/build.py compiles them: small, so that B = 40 rows take 3
# chunks, and B > 80 rows spread over 4 larger chunks.
FINISH_CHUNK_ROWS, FINISH_MAX_CHUNKS = 16, 4

pytestmark = needs_cpu_extension  # the comparison needs the compiled CPU op


# The emulation fixtures (emulated: EMULATED_THREADS; emulated_256: the GPU's 256)
# live in conftest.py, shared with test_hostile.py: a process loads each build once.


def _scalars(x, w, b):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.tensor(w, dtype=acc), torch.tensor(b, dtype=acc)


def _all_ops(ops, x, method, min_cosine, sums=None, offset=0, block=0, w=3.0, b=-1.0,
             scale=0.5, speaker_offsets=None, fused_only=False):
    """Every op of a library on one input: forward, backward, forward_backward
    (or forward_backward's outputs alone)."""
    w, b = _scalars(x, w, b)
    args = problem(x, w, b, method, min_cosine, sums=sums, speaker_offset=offset,
                   speaker_offsets=speaker_offsets)
    with blocks(block, ops):
        if fused_only:
            return ops.ge2e_forward_backward(**args, scale=scale)
        acc = w.dtype
        rows = x.shape[:1] if speaker_offsets is not None else x.shape[:2]
        grad = torch.randn(rows, dtype=acc, generator=torch.Generator().manual_seed(1))
        loss, state, top1 = ops.ge2e_forward(**args)
        backward = ops.ge2e_backward(**args, grad_loss=grad, state=state)
        fused = ops.ge2e_forward_backward(**args, scale=scale)
    return loss, state, backward, fused, top1


def _assert_same(emulated, x, method, min_cosine, rtol=1e-12, **kwargs):
    emu = _all_ops(emulated, x, method, min_cosine, **kwargs)
    cpu = _all_ops(torch.ops.ge2e_ext, x, method, min_cosine, **kwargs)
    assert_close_rel(emu[0], cpu[0], rtol, "loss")
    # The rows' saved state: the hardest impostor (contrast, exactly), or the
    # softmax row's largest difference and log-normaliser (to rounding).
    assert_close_rel(emu[1], cpu[1], rtol, "row state")
    # The rows' top1, from either forward, exactly.
    assert torch.equal(emu[4], cpu[4]) and torch.equal(emu[3][1], cpu[4]), "top1"
    sums_given = kwargs.get("sums") is not None
    for which, e_out, c_out in (("backward", emu[2], cpu[2]), ("fused", emu[3][2:], cpu[3][2:])):
        for name, e, c in zip(("embeddings", "sums", "w", "b"), e_out, c_out):
            if name == "sums" and not sums_given:
                continue  # scratch when the sums are the call's own
            assert_close_rel(e.float() if e.dtype != c.dtype else e, c, rtol,
                             f"{which} grad {name}")
    assert_close_rel(emu[3][0], cpu[3][0], rtol, "fused loss")


def _offsets(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())


def _given_sums(x, before, after, seed):
    """Speaker sums of the distributed form: `before` and `after` other ranks'
    random rows around x's own (x: (N, M, D))."""
    g = torch.Generator().manual_seed(seed)
    d = x.shape[-1]
    return torch.cat([torch.randn(before, d, generator=g, dtype=torch.float64), x.sum(1),
                      torch.randn(after, d, generator=g, dtype=torch.float64)])


def _kernels_and_threads(ops):
    kernels, threads = ops.launch_log()
    return list(zip(kernels, threads))


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_every_kernel_at_256_threads(emulated_256, method):
    """The GPU build's 256 threads per block, in float64 to 1e-12 against the CPU
    kernel: D = 260 and K = 230 (above 224) give every kernel eight warps, so the
    block reduction's last stage reads all eight slots; the labels form with
    blocks of speakers adds the fold. Every kernel that ran, ran at least once
    at 256 threads."""
    emulated_256.launch_log()  # forget earlier launches
    x = make_embeddings(3, 2, 260, seed=31, requires_grad=False)
    _assert_same(emulated_256, x, method, 1e-6)
    sizes = [2, 5, 3]
    labelled = make_embeddings(sum(sizes), 1, 260, seed=32, requires_grad=False).squeeze(1)
    _assert_same(emulated_256, labelled, method, 1e-6, block=2, speaker_offsets=_offsets(sizes))
    # The rows kernel's threads run over K: 230 speaker sums, of which 2 are local
    # (one fused step only: 230-block kernels at 256 threads take seconds).
    local = make_embeddings(2, 2, 260, seed=33, requires_grad=False)
    sums = _given_sums(local, 100, 128, seed=34)
    kwargs = dict(sums=sums, offset=100)
    emu = _all_ops(emulated_256, local, method, 1e-6, fused_only=True, **kwargs)
    cpu = _all_ops(torch.ops.ge2e_ext, local, method, 1e-6, fused_only=True, **kwargs)
    for name, e, c in zip(("loss", "top1", "embeddings", "sums", "w", "b"), emu, cpu):
        assert_close_rel(e, c, 1e-12, f"fused {name}")
    launches = _kernels_and_threads(emulated_256)
    assert launches and all(threads <= GPU_THREADS for _, threads in launches)
    below = {kernel for kernel, _ in launches} - {k for k, t in launches if t == GPU_THREADS}
    assert not below, f"{len(below)} kernel(s) never ran at {GPU_THREADS} threads here"


def test_results_do_not_depend_on_the_block_order(emulated):
    """The same outputs, bitwise, whichever order the blocks run in (each kernel
    has several blocks here: rows, speakers, blocks of speakers, given sums); the
    other tests run shuffled blocks against the CPU kernel."""
    sizes = [2, 3, 2]
    labelled = make_embeddings(sum(sizes), 1, 40, seed=35, requires_grad=False).squeeze(1)
    dense = make_embeddings(3, 2, 20, seed=36, requires_grad=False)
    cases = [(labelled, dict(block=2, speaker_offsets=_offsets(sizes))),
             (dense, dict(sums=_given_sums(dense, 1, 2, seed=37), offset=1, block=2))]
    orders = ("forward", "reverse", "shuffled:1")
    results = {}
    try:
        for order in orders:
            emulated.set_block_order(order)
            results[order] = torch.utils._pytree.tree_leaves(
                [_all_ops(emulated, case, method, 1e-6, **kwargs)
                 for case, kwargs in cases for method in LOSS_METHODS])
    finally:
        emulated.set_block_order(os.environ.get("GE2E_EMU_BLOCK_ORDER", "shuffled"))
    for order in orders[1:]:
        assert len(results[order]) == len(results["forward"])
        for first, other in zip(results["forward"], results[order]):
            assert torch.equal(first, other) or (first.isnan() & other.isnan()).all(), order


def test_shared_memory_is_garbage_at_each_block(emulated):
    """Each block finds its __shared__ memory filled with 0xff bytes (NaN as a
    float, -1 as an int), though the block before it wrote 1.0 and 7 there."""
    seen, ran = emulated.probe_shared(12, 64)
    assert seen[:, 0].isnan().all() and (seen[:, 1] == -1).all()
    assert sorted(ran.tolist()) == list(range(12))


def test_block_orders(emulated):
    try:
        emulated.set_block_order("forward")
        assert emulated.probe_shared(9, 32)[1].tolist() == list(range(9))
        emulated.set_block_order("reverse")
        assert emulated.probe_shared(9, 32)[1].tolist() == list(range(8, -1, -1))
        emulated.set_block_order("shuffled:5")
        first, second = (emulated.probe_shared(16, 32)[1].tolist() for _ in range(2))
        assert sorted(first) == sorted(second) == list(range(16))
        assert first != list(range(16)) and first != second  # a new permutation per launch
        emulated.set_block_order("shuffled:5")
        assert emulated.probe_shared(16, 32)[1].tolist() == first  # reproducible
        with pytest.raises(ValueError, match="expected forward, reverse, shuffled"):
            emulated.set_block_order("sideways")
    finally:
        emulated.set_block_order(os.environ.get("GE2E_EMU_BLOCK_ORDER", "shuffled"))


@pytest.mark.parametrize("threads", [0, 16, 48, 1056])
def test_a_block_of_partial_warps_is_refused(emulated, threads):
    with pytest.raises(ValueError, match=f"a block of {threads} threads; expected whole warps"):
        emulated.probe_launch(2, threads)


def test_a_grid_beyond_cudas_limit_is_refused(emulated):
    with pytest.raises(ValueError, match="CUDA's limit in x is 2"):
        emulated.probe_launch(2**31, 32)


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("min_cosine", [1e-6, None])
@pytest.mark.parametrize("shape", [(2, 2, 1), (3, 2, 3), (5, 4, 33), (6, 3, 130)])
def test_kernels_match_the_cpu_kernel(emulated, method, min_cosine, shape):
    x = make_embeddings(*shape, seed=sum(shape), requires_grad=False)
    _assert_same(emulated, x, method, min_cosine)


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_more_speakers_than_threads(emulated, method):
    """K = 70 > 64 threads: the row kernel strides over K."""
    x = make_embeddings(70, 2, 9, seed=3, requires_grad=False)
    _assert_same(emulated, x, method, 1e-6)


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("block", [1, 2, 3])
def test_float32_and_blocks(emulated, method, block):
    x = make_embeddings(7, 3, 20, seed=4, dtype=torch.float32, requires_grad=False)
    _assert_same(emulated, x, method, 1e-6, rtol=2e-6, block=block)


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(emulated, method, dtype):
    """float16/bfloat16 embeddings are read and their gradient written in their
    dtype, everything else in float32: as the CPU kernel, up to one rounding."""
    x = make_embeddings(6, 3, 40, seed=12, dtype=dtype, requires_grad=False)
    _assert_same(emulated, x, method, 1e-6, rtol=2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("block", [0, 2])
def test_speakers_with_different_numbers_of_utterances(emulated, method, block):
    """The labels form's segments: speaker j's rows [offsets[j], offsets[j + 1])."""
    sizes = [2, 7, 3, 2, 5]
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
    x = make_embeddings(sum(sizes), 70, 1, seed=11, requires_grad=False).reshape(sum(sizes), 70)
    _assert_same(emulated, x, method, 1e-6, block=block, speaker_offsets=offsets)


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("block", [-3, -7, -16])
def test_blocks_that_split_a_speaker(emulated, method, block):
    """Blocks of 3, 7 or 16 rows (block < 0) cut the 12-row speaker and others in
    the middle: the row gradients leave out a split speaker's sum over its other
    rows, added after the last block by the fold pass (every speaker's Q - q_r)."""
    sizes = [2, 12, 3, 5, 2]
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
    x = make_embeddings(sum(sizes), 70, 1, seed=13, requires_grad=False).reshape(sum(sizes), 70)
    _assert_same(emulated, x, method, 1e-6, block=block, speaker_offsets=offsets)
    dense = make_embeddings(4, 5, 9, seed=14, requires_grad=False)
    _assert_same(emulated, dense, method, 1e-6, block=block)


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_split_blocks_with_sums_given(emulated, method):
    sizes = [2, 9, 3]
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
    x = make_embeddings(sum(sizes), 6, 1, seed=15, requires_grad=False).reshape(sum(sizes), 6)
    g = torch.Generator().manual_seed(16)
    own = torch.stack([x[offsets[j]:offsets[j + 1]].sum(0) for j in range(len(sizes))])
    sums = torch.cat([torch.randn(2, 6, generator=g, dtype=torch.float64), own])
    _assert_same(emulated, x, method, 1e-6, sums=sums, offset=2, block=-4,
                 speaker_offsets=offsets)


def _step_extra_bytes(rows, speakers, d, dtype, block_rows):
    """What a fused step allocates beyond the input and its gradient (ge2e_driver.h:
    make_call, allocate_gradients, row_outputs, sweep), in bytes."""
    acc = 8 if dtype == torch.float64 else 4
    k = speakers
    block = min(block_rows, rows)
    widened = dtype in (torch.float16, torch.bfloat16)
    return (acc * (2 * speakers * d     # own_sums_hi, own_sums_lo
                  + k * d + k           # Z (dLoss/ds), 1/|s|
                  + k + speakers        # the sums' and the speakers' power-of-two scales
                  + rows * 4            # own_terms
                  + rows * 3            # losses, dLoss/dw and dLoss/db parts
                  + block * k           # one block of cosines
                  + (block * d if widened else 0)  # T = H S of a half-precision input
                  + 2 * d               # a split speaker's q sums (the CPU device's)
                  + rows                # row_dots (the CUDA device's scratch)
                  + 3 * 1024)           # the finish's partials (the CUDA device's)
            + 8 * rows                  # hardest (int64)
            + 16 * rows)                # the rows' saved state (2 float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("d", [8, 16, 64, 128, 256, 512, 1024])
@pytest.mark.parametrize("n, m", [(4096, 10), (1024, 3), (16384, 4), (300, 64)])
def test_gpu_block_policy_holds_the_step_bound_for_every_d(emulated, dtype, d, n, m):
    """The GPU's blocks (the driver's rows_per_block with the CUDA policy): a
    step's peak is at most 1.5x input plus gradient for any D, M >= 3, wherever
    the blocks are larger than the 2^18-element floor; before, the 128-speaker
    floor made it 1.65x at D=128 and 2.15x at D=64 (N=4096, M=10)."""
    rows = n * m
    block_rows = emulated.block_rows(rows, n, n, d, dtype)
    assert block_rows >= 1
    elem = torch.finfo(dtype).bits // 8
    acc = 8 if dtype == torch.float64 else 4
    bound = (rows * d * elem + rows * d * elem) // 2  # half of input plus gradient
    extra = _step_extra_bytes(rows, n, d, dtype, block_rows)
    fixed = _step_extra_bytes(rows, n, d, dtype, 0)  # everything but the block
    at_floor = min(block_rows, rows) * n <= 2 ** 18 + n  # the block's minimum, 2^18 cosines
    if fixed + (2 ** 18 + n) * acc <= bound:
        assert extra <= bound, (block_rows, extra / bound)
    else:
        # Where the sums and per-row statistics alone (nearly) exceed it, as the
        # README says (small D, M or half precision): the block is at its floor.
        assert at_floor, (block_rows, extra / bound)


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("block", [0, 1])
def test_external_sums_at_an_offset(emulated, method, block):
    """The distributed form: 2 local speakers at rows 1-2 of 5 speaker sums, in
    one block or one speaker per block (the other rows' term then comes in the
    fold pass, which also carries the finish)."""
    x = make_embeddings(2, 3, 6, seed=5, requires_grad=False)
    g = torch.Generator().manual_seed(6)
    sums = torch.cat([torch.randn(1, 6, generator=g, dtype=torch.float64), x.sum(1),
                      torch.randn(2, 6, generator=g, dtype=torch.float64)])
    _assert_same(emulated, x, method, 1e-6, sums=sums, offset=1, block=block)


def test_zero_vectors_ties_clamped_w_and_the_clamp_bound(emulated):
    x = make_embeddings(4, 3, 5, seed=7, offset=0.5, requires_grad=False)
    x[0, 1] = 0     # a zero utterance
    x[3] = x[2]     # two identical speakers: tied impostors
    bound = torch.tensor([[[1.0, 0, 0], [2.0, 0.5, 0]], [[0, 0, 1.0], [0, 0.5, 3.0]],
                          [[0, 1.0, 0], [0.5, 2.0, 0]]], dtype=torch.float64)
    for method in LOSS_METHODS:
        _assert_same(emulated, x, method, 1e-6, w=-2.0)   # w below the floor
        _assert_same(emulated, x, method, 1e-6, w=1e-6)   # w at the floor
        _assert_same(emulated, bound, method, 0.0)        # cosines exactly at the bound


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_dominant_utterance_and_converged_rows(emulated, method):
    """The numerics cases: an utterance 1e8 times its speaker's other one, and
    rows whose loss is tiny next to w + b."""
    x = torch.tensor([[[1e4, 0.0], [1e-4, 1e-4]], [[0.0, 1.0], [0.1, 1.0]],
                      [[1.0, 0.2], [1.0, 0.1]]], dtype=torch.float64)
    _assert_same(emulated, x, method, 1e-6, w=10.0, b=-5.0)
    g = torch.Generator().manual_seed(9)
    centres = torch.nn.functional.normalize(torch.randn(8, 1, 16, generator=g,
                                                        dtype=torch.float64), dim=-1)
    converged = centres + 0.05 * torch.randn(8, 4, 16, generator=g, dtype=torch.float64)
    _assert_same(emulated, converged, method, 1e-6, w=30.0, b=-5.0)


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_w_or_b_gives_nan_everywhere(emulated, method, bad):
    x = make_embeddings(3, 2, 4, seed=8, requires_grad=False)
    for w, b in ((bad, -1.0), (3.0, bad)):
        loss, _, backward, fused, _ = _all_ops(emulated, x, method, 1e-6, w=w, b=b)
        assert torch.isnan(loss).all() and torch.isnan(fused[0])
        for grad in (backward[0], backward[2], backward[3], fused[2], fused[4], fused[5]):
            assert torch.isnan(grad).all()


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_non_finite_input_stays_non_finite(emulated, method):
    x = make_embeddings(3, 2, 4, seed=8, requires_grad=False)
    x[1, 0, 2] = float("nan")
    loss, _, _, fused, top1 = _all_ops(emulated, x, method, 1e-6)
    assert not torch.isfinite(loss.sum()) and not torch.isfinite(fused[0])


# Launches of a step with one block of speakers: speaker statistics, rows, row
# gradients (which carry the finish), and for the contrast loss the sparse H^T E.
STEP_LAUNCHES = {"softmax": 3, "contrast": 4}


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_a_training_step_is_at_most_four_kernel_launches(emulated, method):
    """The paper's batch (N=64, M=10): at most four launches around the matrix
    products (three products for softmax, one for contrast), the finish's
    scalars folded into the last launch."""
    x = make_embeddings(64, 10, 32, seed=10, dtype=torch.float32, requires_grad=False)
    w, b = _scalars(x, 10.0, -5.0)
    args = problem(x, w, b, method)
    emulated.kernel_launches()  # reset
    emulated.ge2e_forward_backward(**args, scale=1.0)
    assert emulated.kernel_launches() == STEP_LAUNCHES[method] <= 4
    # The backward op (the unfused autograd path): the same launches.
    loss, state, _ = emulated.ge2e_forward(**args)
    assert emulated.kernel_launches() == 2  # inference: statistics and rows
    emulated.ge2e_backward(**args, grad_loss=torch.ones_like(loss), state=state)
    assert emulated.kernel_launches() == STEP_LAUNCHES[method]
    # Several blocks (forced: 16 speakers each): rows, (sparse,) row gradients per
    # block, then one pass that folds dLoss/ds into the rows and carries the finish.
    with blocks(16, emulated):
        emulated.ge2e_forward_backward(**args, scale=1.0)
    assert emulated.kernel_launches() == 1 + 4 * (STEP_LAUNCHES[method] - 1) + 1


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("block", [0, 2])
def test_labels_with_given_sums_and_blocks(emulated, method, block):
    """The labels form with other ranks' sums (the distributed form) and blocks."""
    sizes = [3, 2, 6, 2]
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
    x = make_embeddings(sum(sizes), 1, 40, seed=21, requires_grad=False).reshape(sum(sizes), 40)
    g = torch.Generator().manual_seed(22)
    own = torch.stack([x[offsets[j]:offsets[j + 1]].sum(0) for j in range(len(sizes))])
    sums = torch.cat([torch.randn(2, 40, generator=g, dtype=torch.float64), own,
                      torch.randn(1, 40, generator=g, dtype=torch.float64)])
    _assert_same(emulated, x, method, 1e-6, sums=sums, offset=2, block=block,
                 speaker_offsets=offsets)


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_one_speaker_with_many_rows(emulated, method):
    """A speaker of 100 rows (> the threads per block) next to small ones: the
    speaker passes loop over its rows once, and the finish sums 105 rows."""
    sizes = [100, 2, 3]
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
    x = make_embeddings(sum(sizes), 1, 5, seed=23, requires_grad=False).reshape(sum(sizes), 5)
    _assert_same(emulated, x, method, 1e-6, speaker_offsets=offsets)


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("n", [4, 10, 13])
def test_the_finish_over_several_chunks(emulated, method, n):
    """The finish's two-stage reduction: B = 40 rows in 3 chunks of 16, B = 100 and
    130 in 4 chunks of ceil(B / 4) rows; the last block to finish sums the
    chunks' partials in chunk order."""
    x = make_embeddings(n, 10, 3, seed=24, requires_grad=False)
    _assert_same(emulated, x, method, 1e-6)


def test_grids_beyond_cuda_limits_raise(emulated):
    """A grid of 2^31 blocks or more is refused before launch (a cast to unsigned
    would truncate 2^32 blocks to 0), with a message that says what to change."""
    assert emulated.grid_check(2**31 - 1) == 0
    for blocks in (2**31, 2**32, 2**32 + 5):
        assert emulated.grid_check(blocks) != 0
        with pytest.raises(RuntimeError, match=r"more than 2\^31 - 1 blocks"):
            emulated.launch_with_grid(blocks)


def _matmul_settings():
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision)


@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("setting", ["allow_tf32", "high", "default"])
def test_products_in_ieee_float32_whatever_allow_tf32(emulated, method, setting):
    """With torch.backends.cuda.matmul.allow_tf32 = True (or matmul precision
    "high"), the products still run in IEEE float32: ATen's setting as the row
    kernel's launch sees it, just after P = E S^T. The user's settings are back
    after the call, and readable (no mix of ATen's two APIs is left behind)."""
    x = make_embeddings(5, 3, 16, seed=25, dtype=torch.float32, requires_grad=False)
    w, b = _scalars(x, 10.0, -5.0)
    before = _matmul_settings()
    expected = _all_ops(torch.ops.ge2e_ext, x, method, 1e-6)
    try:
        if setting == "allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        elif setting == "high":
            torch.set_float32_matmul_precision("high")
        chosen = _matmul_settings()
        emulated.ge2e_forward_backward(**problem(x, w, b, method), scale=1.0)
        # "none" is ATen's default: no reduced precision was asked for.
        allowed = ("ieee", "none") if setting == "default" else ("ieee",)
        assert emulated.matmul_precision_at_rows() in allowed
        assert _matmul_settings() == chosen
        assert torch.backends.cuda.matmul.allow_tf32 == (setting != "default")
        # The CPU op under the same settings: its products are IEEE too.
        got = _all_ops(torch.ops.ge2e_ext, x, method, 1e-6)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[3][0], expected[3][0])
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.mkldnn.matmul.fp32_precision = before[2]
        torch.backends.cuda.matmul.fp32_precision = before[1]
    assert _matmul_settings() == before


def _tf32(t):
    """t rounded to TF32 (10 explicit mantissa bits, to nearest even), as the
    tensor cores read float32 operands."""
    bits = t.contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def test_tf32_products_would_break_the_exact_hardest_impostor():
    """Why the products are IEEE: an impostor whose cosine is 1e-5 above the own
    cosine (computed exactly, as the kernels do) stays above it when its cosine
    comes from a float32 product, and falls below it, in a quarter of these
    rows, when it comes from TF32 operands (what cuBLAS reads with allow_tf32):
    the contrast loss's hardest impostor and its gradient would go astray."""
    g = torch.Generator().manual_seed(26)
    tf32_flips = 0
    for _ in range(100):
        e = torch.randn(256, generator=g)
        s = e + 1.5 * torch.randn(256, generator=g)
        norms = e.double().norm() * s.double().norm()
        exact = torch.dot(e.double(), s.double()) / norms
        own = exact - 1e-5
        ieee = torch.dot(e, s).double() / norms
        tf32 = torch.dot(_tf32(e).double(), _tf32(s).double()) / norms
        assert ieee > own
        tf32_flips += bool(tf32 <= own)
    assert tf32_flips >= 10


def test_the_cuda_kernels_normalise_alike(emulated):
    """The CUDA kernels (emulated) give the CPU kernel's numbers with normalize, in
    each op: forward, backward, forward_backward; the dense and the labels form."""
    w, b = make_scalars()
    x = make_embeddings(4, 3, 40, seed=6, requires_grad=False) * torch.logspace(
        -4, 4, 12, dtype=torch.float64).view(4, 3, 1)
    rows = make_embeddings(13, 1, 40, seed=7, requires_grad=False).squeeze(1)
    offsets = torch.tensor([0, 4, 7, 13])
    for inputs, speaker_offsets in ((x, None), (rows, offsets)):
        for method in LOSS_METHODS:
            results = []
            for ops in (emulated, torch.ops.ge2e_ext):
                args = problem(inputs, w, b, method, speaker_offsets=speaker_offsets,
                               normalize=True)
                loss, state, top1 = ops.ge2e_forward(**args)
                grads = ops.ge2e_backward(**args, grad_loss=torch.ones_like(loss), state=state)
                fused = ops.ge2e_forward_backward(**args, scale=1.0)
                results.append((loss, grads[0], grads[2], fused[0], fused[2], fused[4]))
            for name, e, c in zip(("loss", "grad", "grad w", "fused loss", "fused grad",
                                   "fused grad w"), *results):
                assert_close_rel(e, c, 1e-12, f"{method}: {name}")


def test_the_cuda_kernels_break_ties_alike(emulated):
    """The CUDA kernels (under the CPU emulation: threads over K, a block-wide OR)
    give the same top1 from both forwards, ties and all."""
    w, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    for seed in range(3):
        x = _tied_batch(seed)
        expected = _argmax_top1(x, min_cosine=0.5)
        for method in LOSS_METHODS:
            args = problem(x, w, b, method, 0.5)
            _, _, top1 = emulated.ge2e_forward(**args)
            fused = emulated.ge2e_forward_backward(**args, scale=1.0)
            assert torch.equal(top1, expected) and torch.equal(fused[1], expected), (seed, method)
