"""The labels form: (B, D) rows and (B,) speaker labels, any order, M_j >= 2 each."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ge2e_ext
from ge2e_ext.methods import METHODS

from helpers import (CPU_BACKENDS, DEVICE_BACKENDS, EXTENSION_DEVICES, LOSS_METHODS,
                     assert_close_rel, blocks, compiled_op, ge2e, leaf, loss_and_grads,
                     make_embeddings, make_scalars, needs_cpu_extension, problem)


def loop_reference(rows, labels, w, b, method, min_cosine=1e-6):
    """Per-row losses (B,) from the paper's definition, one row at a time: the
    centroid of every speaker (the distinct labels), the own speaker's without the
    row, clamped cosines, S = max(w, 1e-6) cos + b, the method's row loss."""
    speakers = sorted(set(labels.tolist()))
    members = {k: [r for r in range(len(labels)) if labels[r].item() == k] for k in speakers}
    w = torch.clamp(torch.as_tensor(w, dtype=rows.dtype), min=1e-6)
    losses = []
    for r in range(rows.shape[0]):
        own = speakers.index(labels[r].item())
        cosines = []
        for k in speakers:
            others = [q for q in members[k] if q != r]
            centroid = rows[others].mean(0)
            cosines.append(torch.dot(rows[r], centroid) / (rows[r].norm() * centroid.norm()))
        cos = torch.stack(cosines)
        if min_cosine is not None:
            cos = cos.clamp(min=min_cosine)
        losses.append(METHODS[method].reference_row(w * cos + b, own))
    return torch.stack(losses)


def grouped_batch(sizes, d, seed, shuffle=True, label_values=None):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64) + 0.2
    values = label_values or [7 * k - 3 for k in range(len(sizes))]
    labels = torch.cat([torch.full((s,), values[k], dtype=torch.int64)
                        for k, s in enumerate(sizes)])
    if shuffle:
        order = torch.randperm(len(labels), generator=g)
        rows, labels = rows[order], labels[order]
    return rows, labels


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_equal_groups_equal_the_dense_form_in_any_row_order(device, backend, method, reduction,
                                                            data):
    n, m, d = 5, 4, 6
    x = make_embeddings(n, m, d, seed=3, device=device, requires_grad=False)
    order = torch.tensor(data.draw(st.permutations(range(n * m))), device=device)
    labels = (torch.arange(n * m, device=device) // m * 11 - 5)[order]
    dense_loss, dense_grads = loss_and_grads(ge2e(backend, method, reduction), leaf(x),
                                             *make_scalars(device=device))
    rows = leaf(x.reshape(n * m, d)[order])
    loss, grads = loss_and_grads(ge2e(backend, method, reduction, labels=labels), rows,
                                 *make_scalars(device=device))
    expected = dense_loss.reshape(-1)[order] if reduction == "none" else dense_loss
    assert_close_rel(loss, expected, 1e-12, "loss")
    assert_close_rel(grads[0], dense_grads[0].reshape(n * m, d)[order], 1e-12, "grad rows")
    for g, e in zip(grads[1:], dense_grads[1:]):
        assert_close_rel(g, e, 1e-12, "grad w, b")


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("min_cosine", [1e-6, None])
def test_unequal_groups_match_the_loop_reference(device, backend, method, min_cosine):
    rows, labels = grouped_batch([2, 20, 5, 3, 11, 2], 7, seed=4)
    w, b = make_scalars(device="cpu")
    ref, ref_grads = loss_and_grads(
        lambda x, w, b: loop_reference(x, labels, w, b, method, min_cosine), leaf(rows), w, b)
    loss, grads = loss_and_grads(
        ge2e(backend, method, "none", min_cosine, labels=labels.to(device)),
        leaf(rows.to(device)), *make_scalars(device=device))
    assert_close_rel(loss, ref, 1e-12, "losses")
    for name, g, r in zip("xwb", grads, ref_grads):
        assert_close_rel(g, r, 1e-11, f"grad {name}")


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_a_speaker_with_one_utterance_is_an_error_naming_it(device, backend):
    rows, labels = grouped_batch([3, 1, 4], 5, seed=5, label_values=[10, 42, 7])
    with pytest.raises(ValueError, match="speaker label 42 has 1"):
        ge2e_ext.ge2e_loss(rows.to(device), 3.0, -1.0, labels=labels.to(device), backend=backend)
    # Told the number of speakers, an accelerator reads nothing back: the loss is
    # NaN instead (the CPU reads back for free, and raises).
    told = dict(labels=labels.to(device), num_speakers=3, backend=backend)
    if device == "cpu":
        with pytest.raises(ValueError, match="speaker label 42 has 1"):
            ge2e_ext.ge2e_loss(rows, 3.0, -1.0, **told)
    else:
        assert torch.isnan(ge2e_ext.ge2e_loss(rows.to(device), 3.0, -1.0, **told))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_num_speakers_right_gives_the_same_loss_and_wrong_gives_nan(device, backend, reduction):
    rows, labels = grouped_batch([3, 2, 4, 6], 5, seed=6)
    rows, labels = rows.to(device), labels.to(device)
    expected = ge2e_ext.ge2e_loss(rows, 3.0, -1.0, labels=labels, reduction=reduction,
                                  backend=backend)
    told = ge2e_ext.ge2e_loss(rows, 3.0, -1.0, labels=labels, num_speakers=4,
                              reduction=reduction, backend=backend)
    assert torch.equal(told, expected)
    for wrong in (3, 5):
        options = dict(labels=labels, num_speakers=wrong, reduction=reduction, backend=backend)
        if device == "cpu":
            with pytest.raises(ValueError, match=f"num_speakers={wrong}, but the labels name 4"):
                ge2e_ext.ge2e_loss(rows, 3.0, -1.0, **options)
        else:
            assert torch.isnan(ge2e_ext.ge2e_loss(rows, 3.0, -1.0, **options)).all()


@pytest.mark.parametrize(
    "embeddings, labels, error, words",
    [
        (torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2.0]), TypeError, ["integer", "float"]),
        (torch.randn(6, 4), torch.zeros(6, 1, dtype=torch.long), TypeError, ["1-D", "(6, 1)"]),
        (torch.randn(6, 4), torch.tensor([0, 0, 1, 1]), ValueError, ["4 labels", "6 rows"]),
        (torch.randn(3, 2, 4), torch.tensor([0, 0, 1, 1, 2, 2]), ValueError, ["(B rows, D"]),
        (torch.randn(4, 3), torch.tensor([5, 5, 5, 5]), ValueError, ["2 speakers", "1 distinct"]),
        ([[1.0]], torch.tensor([0]), TypeError, ["torch.Tensor", "list"]),
    ],
)
def test_bad_labels(embeddings, labels, error, words):
    with pytest.raises(error) as info:
        ge2e_ext.ge2e_loss(embeddings, 10.0, -5.0, labels=labels)
    for word in words:
        assert word in str(info.value)


def test_num_speakers_without_labels_is_an_error():
    with pytest.raises(ValueError, match="num_speakers goes with labels"):
        ge2e_ext.ge2e_loss(torch.randn(3, 2, 4), 10.0, -5.0, num_speakers=3)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_module_forward_takes_labels(device, backend):
    rows, labels = grouped_batch([2, 3, 4], 6, seed=7)
    criterion = ge2e_ext.GE2ELoss(backend=backend, reduction="none").double().to(device)
    loss = criterion(rows.to(device), labels.to(device))
    assert loss.shape == (9,)
    expected = ge2e_ext.ge2e_loss(rows.to(device), criterion.w, criterion.b,
                                  labels=labels.to(device), reduction="none", backend="torch")
    assert_close_rel(loss, expected, 1e-12, "loss")


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck(device, method, reduction):
    rows, labels = grouped_batch([2, 3, 4], 5, seed=8)
    fn = ge2e("extension", method, reduction, labels=labels.to(device))
    assert torch.autograd.gradcheck(fn, (leaf(rows.to(device)),) + make_scalars(device=device),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_opcheck_with_speaker_offsets(device, method):
    rows = make_embeddings(9, 5, 1, seed=9, device=device).reshape(9, 5)
    rows = leaf(rows)
    offsets = torch.tensor([0, 2, 5, 9], device=device)
    w, b = make_scalars(device=device)
    for reduction in ("sum", "mean", "none"):
        torch.library.opcheck(torch.ops.ge2e_ext.ge2e_loss.default, (rows, w, b, method),
                              dict(reduction=reduction, speaker_offsets=offsets))


@needs_cpu_extension
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("block", [1, 2, 3])
@pytest.mark.parametrize("reduce", [True, False])
def test_blocks_of_unequal_speakers(method, block, reduce):
    sizes = [2, 5, 3, 4, 2, 6, 3]
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
    rows = leaf(torch.randn(sum(sizes), 6, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(10)))
    w, b = make_scalars()

    op = compiled_op(method, reduce, speaker_offsets=offsets)
    whole = loss_and_grads(op, rows, w, b)
    with blocks(block):
        blocked = loss_and_grads(op, rows, w, b)
    assert_close_rel(blocked[0], whole[0], 1e-13, "loss")
    for g, r in zip(blocked[1], whole[1]):
        assert_close_rel(g, r, 1e-13, "grad")


@needs_cpu_extension
def test_bad_offsets_of_a_direct_op_call_are_errors():
    rows = torch.randn(6, 4)
    w, b = torch.tensor(1.0), torch.tensor(0.0)
    with pytest.raises(ValueError, match="speaker 1 has 1"):
        torch.ops.ge2e_ext.ge2e_forward(**problem(rows, w, b,
                                                  speaker_offsets=torch.tensor([0, 3, 4, 6])))
    with pytest.raises(ValueError, match="from 0 to B = 6"):
        torch.ops.ge2e_ext.ge2e_forward(**problem(rows, w, b,
                                                  speaker_offsets=torch.tensor([0, 3, 5])))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_num_speakers(backend, dynamic):
    """With num_speakers the grouping has static shapes (sort, boundaries,
    cumulative sum, searchsorted against arange(num_speakers + 1)): the labels
    form traces with fullgraph=True, and gives the eager loss and gradients."""
    import torch._dynamo

    torch._dynamo.reset()
    rows, labels = grouped_batch([2, 7, 3, 4], 5, seed=30)
    w, b = make_scalars()

    def loss_fn(x, labels, w, b):
        return ge2e_ext.ge2e_loss(x, w, b, labels=labels, num_speakers=4, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=dynamic)
    eager = loss_and_grads(lambda x, w, b: loss_fn(x, labels, w, b), leaf(rows), w, b)
    got = loss_and_grads(lambda x, w, b: compiled(x, labels, w, b), leaf(rows), w, b)
    assert_close_rel(got[0], eager[0], 1e-12, "loss")
    for g, r in zip(got[1], eager[1]):
        assert_close_rel(g, r, 1e-12, "grad")
    if dynamic:  # another batch size, another speaker count's values: the same graph
        rows2, labels2 = grouped_batch([3, 2, 5, 2], 5, seed=31)
        x2 = leaf(rows2)
        assert_close_rel(compiled(x2, labels2, w, b), loss_fn(x2, labels2, w, b), 1e-12, "loss")
        # A wrong count (3 speakers, not 4): under compile nothing is read back, so
        # the PyTorch path gives a NaN loss; the CPU op still checks its offsets.
        bad = torch.where(labels2 == labels2[0], labels2[-1], labels2)
        if backend == "torch":
            assert torch.isnan(compiled(x2, bad, w, b))
        else:
            with pytest.raises(ValueError, match="utterances per speaker"):
                compiled(x2, bad, w, b)


def test_compile_without_num_speakers_says_to_pass_it():
    import torch._dynamo

    torch._dynamo.reset()
    rows, labels = grouped_batch([2, 3], 4, seed=32)

    @torch.compile(fullgraph=True)
    def loss_fn(x, labels):
        return ge2e_ext.ge2e_loss(x, 1.0, 0.0, labels=labels, backend="torch")

    with pytest.raises(Exception, match="num_speakers"):
        loss_fn(rows, labels)
