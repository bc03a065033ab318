"""Memory bounds of the labels form for any grouping: blocks sized by rows (a
speaker larger than a block is split across blocks), the same result as one
block; the pure-PyTorch path without padding; torch.compile of the labels form
with num_speakers."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ge2e_ext

from helpers import (CPU_BACKENDS, LOSS_METHODS, assert_close_rel, blocks, compiled_op,
                     largest_allocation, leaf, loss_and_grads, make_scalars, needs_cpu_extension,
                     problem)

# A dominant speaker among small ones: row budgets of 3, 7, 16 and 41 rows cut
# it (and some small ones) in the middle; 80 takes every speaker whole.
SIZES = [2, 40, 3, 5, 2, 9]
ROW_BUDGETS = [3, 7, 16, 41, 80]


def _forward_backward(**kwargs):
    return torch.ops.ge2e_ext.ge2e_forward_backward(**kwargs)


def _rows(sizes, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64) + 0.2
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
    return rows.to(dtype), offsets


def _op(method, reduce, offsets, sums=None, offset=0):
    return compiled_op(method, reduce, scale=0.5, sums=sums, speaker_offset=offset,
                       speaker_offsets=offsets)


@needs_cpu_extension
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("rows_per_block", ROW_BUDGETS)
def test_blocks_that_split_a_speaker_give_the_one_block_result(method, reduce, rows_per_block):
    rows, offsets = _rows(SIZES, 6, seed=1)
    w, b = make_scalars()
    whole = loss_and_grads(_op(method, reduce, offsets), leaf(rows), w, b)
    with blocks(-rows_per_block):  # < 0: blocks of that many rows
        split = loss_and_grads(_op(method, reduce, offsets), leaf(rows), w, b)
    assert_close_rel(split[0], whole[0], 1e-13, "loss")
    for name, g, r in zip(("embeddings", "w", "b"), split[1], whole[1]):
        assert_close_rel(g, r, 1e-12, f"grad {name}")


@needs_cpu_extension
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small=st.lists(st.integers(2, 6), min_size=1, max_size=8),
       dominant=st.integers(20, 300), position=st.integers(0, 8),
       rows_per_block=st.integers(1, 120), method=st.sampled_from(LOSS_METHODS),
       d=st.integers(1, 9), seed=st.integers(0, 2**16))
@example(small=[2], dominant=20, position=0, rows_per_block=1, method="softmax", d=1, seed=0)
@example(small=[2, 2, 2], dominant=300, position=1, rows_per_block=7, method="contrast", d=3,
         seed=1)
def test_any_grouping_with_a_dominant_speaker_in_any_blocks(small, dominant, position,
                                                            rows_per_block, method, d, seed):
    """One speaker much larger than the others, anywhere in the grouping, in
    blocks of any number of rows: the one-block result (loss and gradients), and
    the PyTorch path's (segment sums, no padding), in float64."""
    sizes = small[:position] + [dominant] + small[position:]
    rows, offsets = _rows(sizes, d, seed=seed)
    w, b = make_scalars()
    whole = loss_and_grads(_op(method, False, offsets), leaf(rows), w, b)
    with blocks(-rows_per_block):
        split = loss_and_grads(_op(method, False, offsets), leaf(rows), w, b)
    assert_close_rel(split[0], whole[0], 1e-12, "losses")
    for name, g, r in zip(("embeddings", "w", "b"), split[1], whole[1]):
        assert_close_rel(g, r, 1e-11, f"grad {name}")
    labels = torch.repeat_interleave(torch.arange(len(sizes)) * 3 - 4, torch.tensor(sizes))
    torch_path = loss_and_grads(
        lambda x, w, b: ge2e_ext.ge2e_loss(x, w, b, method, labels=labels, reduction="none",
                                           backend="torch"), leaf(rows), w, b)
    assert_close_rel(split[0], torch_path[0], 1e-10, "losses against the PyTorch path")
    for name, g, r in zip(("embeddings", "w", "b"), split[1], torch_path[1]):
        assert_close_rel(g, r, 1e-9, f"grad {name} against the PyTorch path")


@needs_cpu_extension
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_split_blocks_of_the_dense_form_and_with_given_sums(method):
    """M=5 rows per speaker in blocks of 3 rows; and the distributed form (sums
    of other speakers given, at an offset), where dLoss/ds is returned."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 7, generator=g, dtype=torch.float64) + 0.3
    w, b = make_scalars()
    for block in (-3, -4, -6):
        whole = _forward_backward(**problem(x, w, b, method), scale=1.0)
        with blocks(block):
            split = _forward_backward(**problem(x, w, b, method), scale=1.0)
        for name, s, r in zip(("loss", "top1", "embeddings", "sums", "w", "b"), split, whole):
            if name != "sums":
                assert_close_rel(s, r, 1e-12, f"block {block}: {name}")
    rows, offsets = _rows(SIZES, 6, seed=3)
    sums = torch.cat([torch.randn(2, 6, generator=g, dtype=torch.float64),
                      torch.stack([rows[offsets[j]:offsets[j + 1]].sum(0)
                                   for j in range(len(SIZES))]),
                      torch.randn(1, 6, generator=g, dtype=torch.float64)])
    args = dict(problem(rows, w, b, method, sums=sums, speaker_offset=2, speaker_offsets=offsets),
                scale=1.0)
    whole = _forward_backward(**args)
    for block in (-5, -17):
        with blocks(block):
            split = _forward_backward(**args)
        for name, s, r in zip(("loss", "top1", "embeddings", "sums", "w", "b"), split, whole):
            assert_close_rel(s, r, 1e-12, f"block {block}: {name}")


@needs_cpu_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_blocks_in_float32_and_half_precision(dtype):
    """float32 (T = H S written into the gradient) and bfloat16 (T in its own
    buffer): a split speaker's rows get their gradient in two stores."""
    rows, offsets = _rows(SIZES, 20, seed=4, dtype=dtype)
    w, b = make_scalars(dtype=torch.float32)
    args = dict(problem(rows, w, b, speaker_offsets=offsets), scale=1.0)
    whole = _forward_backward(**args)
    with blocks(-7):
        split = _forward_backward(**args)
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for name, s, r in zip(("loss", "top1", "embeddings", "sums", "w", "b"), split, whole):
        if name != "sums":
            assert_close_rel(s.double(), r.double(), tol, name)


def _dominant_batch(big=3000, small=200, d=8, seed=5):
    """One speaker of `big` rows among `small` speakers of 2, shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.zeros(big, dtype=torch.int64),
                        torch.arange(1, small + 1).repeat_interleave(2)])
    order = torch.randperm(labels.shape[0], generator=g)
    rows = torch.randn(labels.shape[0], d, generator=g) + 0.1
    return rows[order], labels[order]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_one_dominant_speaker_allocates_no_padded_block(backend, method):
    """3,000 rows of one speaker among 200 speakers of 2 (B = 3,400, K = 201):
    padding to N x M_max x K would be 201 x 3000 x 201 cosines (485 MB in
    float32); a block of rows x K cosines, or a (B, K) tensor, is at most
    B x K x 8 bytes (5.5 MB) on either backend."""
    rows, labels = _dominant_batch()
    x = leaf(rows)
    bound = rows.shape[0] * 201 * 8

    def step():
        loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, labels=labels, backend=backend)
        torch.autograd.grad(loss, x)

    assert 0 < largest_allocation(step) <= bound


@needs_cpu_extension
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_the_extension_block_stays_within_the_documented_budget(method):
    """The same batch at D=64: input 0.87 MB; one block of cosines may take
    max(2^18 elements, input / 8) = 1 MB, however the rows are grouped (before:
    all 3,000 rows of the dominant speaker in one block, 2.4 MB)."""
    rows, labels = _dominant_batch(d=64)
    x = leaf(rows)

    def step():
        loss = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, labels=labels, backend="extension")
        torch.autograd.grad(loss, x)

    block_bound = max(2 ** 18, rows.numel() // 8) * 4
    input_bytes = rows.numel() * 4
    # Every allocation is one block of cosines or smaller, but for the input-sized
    # ones (the rows in speaker order, the gradient and its scatter back).
    assert largest_allocation(step) <= max(block_bound, input_bytes)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_dominant_speaker_matches_the_other_backend(backend, method):
    """Loss and gradients of a smaller dominant-speaker batch (float64): the
    two backends agree."""
    rows, labels = _dominant_batch(big=60, small=7, d=5)
    rows = rows.double()
    w, b = make_scalars()
    fn = {be: (lambda be: lambda x, w, b: ge2e_ext.ge2e_loss(
        x, w, b, method, labels=labels, backend=be))(be) for be in CPU_BACKENDS}
    got = loss_and_grads(fn[backend], leaf(rows), w, b)
    other = loss_and_grads(fn[CPU_BACKENDS[0]], leaf(rows), w, b)
    assert_close_rel(got[0], other[0], 1e-12, "loss")
    for g, r in zip(got[1], other[1]):
        assert_close_rel(g, r, 1e-11, "grad")


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_labels_form_under_torch_func(method):
    """The grouped PyTorch path (segment sums) under torch.func: grad, vmap and
    jvp of the labels form with the default backend equal the autograd answer."""
    rows, offsets = _rows([2, 9, 3, 4], 5, seed=7)
    labels = torch.repeat_interleave(torch.tensor([4, 1, 7, 2]), torch.tensor([2, 9, 3, 4]))
    w, b = make_scalars()

    def loss(x):
        return ge2e_ext.ge2e_loss(x, w, b, method, labels=labels)

    x = leaf(rows)
    expected = torch.autograd.grad(ge2e_ext.ge2e_loss(x, w, b, method, labels=labels,
                                                      backend="torch"), x)[0]
    assert_close_rel(torch.func.grad(loss)(rows), expected, 1e-12, "func.grad")
    batch = torch.stack([rows, 2 * rows + 0.1])
    assert_close_rel(torch.func.vmap(loss)(batch), torch.stack([loss(rows), loss(batch[1])]),
                     1e-12, "vmap")
    tangent = torch.randn(rows.shape, dtype=rows.dtype, generator=torch.Generator().manual_seed(8))
    _, jvp = torch.func.jvp(loss, (rows,), (tangent,))
    assert_close_rel(jvp, (expected * tangent).sum(), 1e-11, "jvp")
