"""The rows' top-1 from the loss's own pass (return_top1=True): each row's own
speaker is the arg-max of its clamped cosines, as the PyTorch path's similarity
matrix says (ties to the lower index, NaN rows never), on every backend and
form (tests/test_cuda_emulated.py: the CUDA kernels), at no extra matrix product."""

import pytest
import torch

import ge2e_ext
from ge2e_ext import metrics
from ge2e_ext.voxceleb_trainer import LossFunction
from helpers import LOSS_METHODS, make_embeddings, needs_cpu_extension

BACKENDS = ["torch", pytest.param("extension", marks=needs_cpu_extension)]


def _argmax_top1(embeddings, labels=None, min_cosine=1e-6):
    """The arg-max of metrics.similarity_matrix (the PyTorch path's cosines) is the
    row's own speaker: what top1 must equal."""
    cos = metrics.similarity_matrix(embeddings, labels, min_cosine=min_cosine)
    if labels is None:
        n, m, _ = embeddings.shape
        own = torch.arange(n).view(n, 1).expand(n, m)
    else:
        own = torch.unique(labels, return_inverse=True)[1]
    return cos.argmax(-1) == own


def _tied_batch(seed):
    """Speakers whose cosines the clamp at min_cosine=0.5 makes equal: many rows
    have impostors tied with each other and with their own speaker, before and
    after it. Each speaker points along its own axis (sign alternating), so
    most cosines of other speakers are below the clamp."""
    g = torch.Generator().manual_seed(seed)
    n, m, d = 6, 3, 6
    axis = torch.eye(d, dtype=torch.float64)[:n] * torch.tensor([1.0, -1.0] * 3).view(n, 1)
    noise = torch.randn(n, m, d, generator=g, dtype=torch.float64)
    return axis.unsqueeze(1) * 0.3 + noise


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_top1_is_the_argmax_of_the_similarity_matrix(backend, method, reduction):
    for seed in range(4):
        x = make_embeddings(7, 4, 12, seed=seed, requires_grad=True)
        loss, top1 = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, reduction=reduction,
                                        backend=backend, return_top1=True)
        assert top1.dtype == torch.bool and top1.shape == (7, 4) and not top1.requires_grad
        assert torch.equal(top1, _argmax_top1(x.detach()))
        # The loss is the one without return_top1, and still trains.
        plain = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, reduction=reduction, backend=backend)
        assert torch.equal(loss, plain)
        loss.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_top1_of_labelled_rows_is_in_the_rows_order(backend, reduction):
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(23, 10, generator=g, dtype=torch.float64)
    labels = torch.tensor([5, 2, 9, 2, 5, 7, 9, 9, 2, 7, 5, 5, 7, 2, 9, 9, 7, 2, 5, 9, 7, 2, 5])
    _, top1 = ge2e_ext.ge2e_loss(rows, 10.0, -5.0, labels=labels, reduction=reduction,
                                 backend=backend, return_top1=True)
    assert top1.shape == (23,)
    assert torch.equal(top1, _argmax_top1(rows, labels))
    assert torch.equal(top1.double().mean(), metrics.top1_accuracy(rows, labels).double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_ties_go_to_the_lower_speaker_index(backend, method):
    """With the clamp at 0.5, exact ties decide many rows: an impostor before the
    own speaker takes the top-1 on a tie, one after it does not (torch.argmax)."""
    ties_decided = 0
    for seed in range(6):
        x = _tied_batch(seed)
        _, top1 = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, min_cosine=0.5, backend=backend,
                                     return_top1=True)
        expected = _argmax_top1(x, min_cosine=0.5)
        assert torch.equal(top1, expected), seed
        cos = metrics.similarity_matrix(x, min_cosine=0.5)
        own_cos = cos.diagonal(dim1=0, dim2=2).t()             # (N, M)
        ties_decided += int(((cos == own_cos.unsqueeze(-1)).sum(-1) > 1).sum())
    assert ties_decided > 10  # the batches do test ties


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_with_a_nan_cosine_has_no_top1(backend):
    x = make_embeddings(4, 3, 8, seed=5, requires_grad=False)
    x[2, 1, 3] = float("nan")  # speaker 2's centroids, and so every row's cosine to it
    _, top1 = ge2e_ext.ge2e_loss(x, 10.0, -5.0, reduction="none", backend=backend,
                                 return_top1=True)
    assert not top1.any()


@needs_cpu_extension
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_top1_costs_no_matrix_product(method):
    """A training step with return_top1 runs the products of one without."""
    x = make_embeddings(64, 10, 32, dtype=torch.float32)

    def products(**kwargs):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, backend="extension", **kwargs)
            (out[0] if kwargs else out).backward()
        return sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm"))

    assert products(return_top1=True) == products() == {"softmax": 3, "contrast": 1}[method]


@pytest.mark.parametrize("backend", BACKENDS)
def test_voxceleb_trainer_prec1_is_the_batch_accuracy(backend):
    criterion = LossFunction()
    criterion.backend = backend
    x = make_embeddings(8, 3, 16, seed=7, dtype=torch.float32)
    loss, prec1 = criterion(x)
    assert prec1.dim() == 0 and not prec1.requires_grad
    assert torch.allclose(prec1, 100.0 * metrics.top1_accuracy(x.detach()))
    loss.backward()


@needs_cpu_extension
def test_top1_under_torch_compile():
    x = make_embeddings(5, 3, 8, seed=9, requires_grad=False)
    fn = torch.compile(lambda x: ge2e_ext.ge2e_loss(x, 10.0, -5.0, backend="extension",
                                                    return_top1=True), backend="eager",
                       fullgraph=True)
    loss, top1 = fn(x)
    assert torch.equal(top1, _argmax_top1(x))


def test_return_top1_must_be_a_bool():
    with pytest.raises(TypeError, match="return_top1 must be a bool, got str"):
        ge2e_ext.ge2e_loss(make_embeddings(2, 2, 3), 10.0, -5.0, return_top1="yes")

