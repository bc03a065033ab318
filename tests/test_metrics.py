"""ge2e_ext.metrics: the EER against a direct ROC computation, the batch metrics
against the loop reference's cosines."""

import math

import pytest
import torch

from ge2e_ext import metrics
from ge2e_ext.reference import _cosine_matrix


def direct_roc(scores, labels):
    """ROC points by counting, one threshold per distinct score (plus +inf)."""
    scores, labels = [float(s) for s in scores], [bool(x) for x in labels]
    targets = sum(labels)
    impostors = len(labels) - targets
    points = [(0.0, 1.0)]
    for t in sorted(set(scores), reverse=True):
        fa = sum(1 for s, x in zip(scores, labels) if s >= t and not x)
        fr = sum(1 for s, x in zip(scores, labels) if s < t and x)
        points.append((fa / impostors, fr / targets))
    return points


def direct_eer(scores, labels):
    """RTVC's definition without scikit-learn/scipy: the root of 1 - x - tpr(x),
    tpr the linear interpolation of the ROC (tpr over far), by bisection."""
    points = direct_roc(scores, labels)

    def tpr(x):  # the ROC (far ascending); on a vertical step, its top
        best = None
        for (f0, r0), (f1, r1) in zip(points, points[1:]):
            if f0 <= x <= f1:
                y = 1 - r1 if f1 == f0 else (1 - r0) + (x - f0) / (f1 - f0) * (r0 - r1)
                best = y if best is None else max(best, y)
        return best

    lo, hi = 0.0, 1.0  # 1 - x - tpr(x) decreases from >= 0 to <= 0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 1 - mid - tpr(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("seed", range(6))
def test_eer_equals_direct_computation_random_scores(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 40 + 37 * seed
    labels = torch.rand(n, generator=gen) < 0.3
    scores = torch.randn(n, generator=gen) + 1.2 * labels
    assert metrics.equal_error_rate(scores, labels) == pytest.approx(
        direct_eer(scores, labels), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_eer_equals_direct_computation_tied_scores(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    n = 60 + 20 * seed
    labels = torch.rand(n, generator=gen) < 0.4
    # few distinct values: ties across both classes at most thresholds
    scores = torch.randint(0, 4 + seed, (n,), generator=gen).double() + labels.double()
    assert len(set(scores.tolist())) < n // 4
    eer = metrics.equal_error_rate(scores, labels)
    assert eer == pytest.approx(direct_eer(scores, labels), abs=1e-12)
    # the same trials in another order: ties must not depend on it
    perm = torch.randperm(n, generator=gen)
    assert metrics.equal_error_rate(scores[perm], labels[perm]) == eer


def test_roc_curve_equals_direct_points():
    gen = torch.Generator().manual_seed(7)
    labels = torch.rand(50, generator=gen) < 0.5
    scores = torch.randint(0, 9, (50,), generator=gen).float()
    far, frr, thresholds = metrics.roc_curve(scores, labels)
    points = direct_roc(scores, labels)
    assert far.tolist() == pytest.approx([p[0] for p in points], abs=1e-15)
    assert frr.tolist() == pytest.approx([p[1] for p in points], abs=1e-15)
    assert thresholds[0] == math.inf and (thresholds[1:].diff() < 0).all()


def test_eer_hand_cases():
    eer = metrics.equal_error_rate
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    assert eer(torch.tensor([.9, .8, .7, .6, .5, .4, .3, .2]), labels) == 0.0
    assert eer(torch.tensor([.1, .2, .3, .4, .5, .6, .7, .8]), labels) == 1.0
    # one target below one impostor: 1 of 4 rejected where 1 of 4 is accepted
    assert eer(torch.tensor([.9, .8, .7, .45, .5, .4, .3, .2]), labels) == 0.25
    # a tie across the classes is one threshold: neither 0 nor 1, but 0.5
    assert eer(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == 0.5
    assert eer(torch.full((8,), 3.0), labels) == 0.5
    # lists and 0/1 labels are accepted; the shape does not matter
    assert eer([[0.9, 0.1], [0.2, 0.8]], [[1, 0], [0, 1]]) == 0.0


@pytest.mark.parametrize("labels, words", [
    ([True, True, True], "3 target and 0 impostor"),
    ([False, False, False], "0 target and 3 impostor"),
])
def test_eer_needs_both_classes(labels, words):
    with pytest.raises(ValueError, match=words):
        metrics.equal_error_rate(torch.tensor([0.1, 0.5, 0.9]), torch.tensor(labels))


def test_eer_errors():
    with pytest.raises(ValueError, match="same shape"):
        metrics.equal_error_rate(torch.zeros(3), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="finite"):
        metrics.equal_error_rate(torch.tensor([0.1, float("nan")]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        metrics.equal_error_rate(torch.tensor([0.1, 0.2]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="0 target and 0 impostor"):
        metrics.equal_error_rate(torch.zeros(0), torch.zeros(0, dtype=torch.bool))


@pytest.mark.parametrize("min_cosine", [1e-6, None])
def test_similarity_matrix_is_the_reference_cosines(min_cosine):
    emb = torch.randn(5, 4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cos = metrics.similarity_matrix(emb, min_cosine=min_cosine)
    torch.testing.assert_close(cos, _cosine_matrix(emb, min_cosine), rtol=0, atol=1e-12)


def test_labels_form_is_the_dense_form_in_any_row_order():
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(4, 3, 6, dtype=torch.float64, generator=gen)
    labels = torch.tensor([5, 9, 11, 20]).repeat_interleave(3)
    perm = torch.randperm(12, generator=gen)
    rows, lab = emb.reshape(12, 6)[perm], labels[perm]
    dense = metrics.similarity_matrix(emb).reshape(12, 4)
    torch.testing.assert_close(metrics.similarity_matrix(rows, lab), dense[perm])
    assert metrics.top1_accuracy(rows, lab) == metrics.top1_accuracy(emb)
    assert metrics.batch_equal_error_rate(rows, lab) == metrics.batch_equal_error_rate(emb)


def test_top1_accuracy_is_the_argmax_of_the_similarity_matrix():
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 1, 16, generator=gen)
    emb = centres + 0.9 * torch.randn(6, 5, 16, generator=gen)  # some rows misplaced
    ref = _cosine_matrix(emb.double(), 1e-6)
    expected = (ref.argmax(-1) == torch.arange(6).view(6, 1)).double().mean()
    acc = metrics.top1_accuracy(emb)
    assert 0 < acc < 1 and acc.dim() == 0
    assert acc.item() == pytest.approx(expected.item())
    # w > 0 and b do not change the argmax; separated speakers are all right
    assert metrics.top1_accuracy(centres + 0.01 * torch.randn(6, 5, 16, generator=gen)) == 1


def test_batch_eer():
    gen = torch.Generator().manual_seed(4)
    emb = torch.randn(5, 4, 8, generator=gen, requires_grad=True)
    cos = _cosine_matrix(emb.detach().double(), None)
    same = torch.eye(5, dtype=torch.bool).unsqueeze(1).expand(5, 4, 5)
    assert metrics.batch_equal_error_rate(emb, min_cosine=None) == pytest.approx(
        direct_eer(cos.flatten(), same.flatten()), abs=1e-9)
    assert emb.grad is None  # nothing entered the graph


def test_batch_metrics_errors():
    with pytest.raises(ValueError, match=r"\(N speakers >= 2, M utterances >= 2, D\)"):
        metrics.top1_accuracy(torch.randn(4, 1, 8))
    with pytest.raises(ValueError, match=r"\(B, D\) with labels"):
        metrics.top1_accuracy(torch.randn(4, 2, 8), torch.arange(4))
    with pytest.raises(ValueError, match="at least 2 utterances"):
        metrics.top1_accuracy(torch.randn(3, 8), torch.tensor([0, 0, 1]))
