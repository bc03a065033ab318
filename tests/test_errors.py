"""Bad input gets an error that says what was expected and what came."""

import pytest
import torch

import ge2e_ext
from ge2e_ext import _ops

from helpers import (CPU_BACKENDS, needs_cpu_extension, problem)

GOOD = torch.randn(3, 2, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "embeddings, error, words",
    [
        (torch.randn(3, 4), ValueError, ["(N speakers, M utterances, D", "2 dimensions"]),
        (torch.randn(2, 3, 4, 5), ValueError, ["4 dimensions"]),
        (torch.randn(1, 3, 4), ValueError, ["N >= 2", "N = 1"]),
        (torch.randn(3, 1, 4), ValueError, ["M >= 2", "M = 1"]),
        (torch.randn(3, 2, 0), ValueError, ["D >= 1", "D = 0"]),
        (torch.ones(3, 2, 4, dtype=torch.int64), TypeError, ["float32", "torch.int64"]),
        (torch.ones(3, 2, 4, dtype=torch.complex64), TypeError, ["torch.complex64"]),
        (torch.ones(3, 2, 4, dtype=torch.bool), TypeError, ["torch.bool"]),
        ([[[1.0]]], TypeError, ["torch.Tensor", "list"]),
    ],
)
def test_bad_embeddings(backend, embeddings, error, words):
    with pytest.raises(error) as info:
        ge2e_ext.ge2e_loss(embeddings, 10.0, -5.0, backend=backend)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("name", ["w", "b"])
@pytest.mark.parametrize(
    "value, error, words",
    [
        (torch.ones(2), ValueError, ["scalar", "(2,)"]),
        (torch.ones(2, 2), ValueError, ["(2, 2)"]),
        (torch.tensor(1 + 1j), TypeError, ["complex"]),
        (torch.tensor(True), TypeError, ["torch.bool"]),
        ("10", TypeError, ["str"]),
        (None, TypeError, ["NoneType"]),
        (True, TypeError, ["bool"]),
    ],
)
def test_bad_scalars(name, value, error, words):
    kwargs = {"w": 10.0, "b": -5.0, name: value}
    with pytest.raises(error) as info:
        ge2e_ext.ge2e_loss(GOOD, kwargs["w"], kwargs["b"])
    assert name in str(info.value)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"loss_method": "softmx"}, ValueError, ["loss_method", "'softmx'", "contrast"]),
        ({"reduction": "avg"}, ValueError, ["reduction", "'avg'", "mean"]),
        ({"backend": "cuda"}, ValueError, ["backend", "'cuda'", "extension"]),
        ({"min_cosine": "0.1"}, TypeError, ["min_cosine", "str"]),
        ({"min_cosine": float("nan")}, ValueError, ["min_cosine", "nan"]),
        ({"min_cosine": 1.0}, ValueError, ["min_cosine", "below 1", "1.0"]),
        ({"min_cosine": 3}, ValueError, ["min_cosine", "below 1", "3"]),
        ({"group": object()}, ValueError, ["group", "distributed=True"]),
    ],
)
def test_bad_options(kwargs, error, words):
    method = kwargs.pop("loss_method", "softmax")
    with pytest.raises(error) as info:
        ge2e_ext.ge2e_loss(GOOD, 10.0, -5.0, method, **kwargs)
    for word in words:
        assert word in str(info.value)
    # The module checks its options when it is built, not at the first batch.
    with pytest.raises(error):
        ge2e_ext.GE2ELoss(loss_method=method, **kwargs)


def test_extension_backend_without_kernel_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ops, "EXTENSION_DEVICES", frozenset())
    assert ge2e_ext.extension_devices() == frozenset()
    with pytest.raises(RuntimeError) as info:
        ge2e_ext.ge2e_loss(GOOD, 10.0, -5.0, backend="extension")
    message = str(info.value)
    assert "backend='extension'" in message and "cpu" in message
    assert "pip install --no-build-isolation -e ." in message
    # "auto" falls back to pure PyTorch with the same result.
    expected = ge2e_ext.ge2e_loss(GOOD, 10.0, -5.0, backend="torch")
    assert torch.equal(ge2e_ext.ge2e_loss(GOOD, 10.0, -5.0), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_embeddings_are_refused(backend):
    with pytest.raises(TypeError, match="dense .strided. tensor, got layout torch.sparse_coo"):
        ge2e_ext.ge2e_loss(GOOD.to_sparse(), 10.0, -5.0, backend=backend)


def test_meta_embeddings_with_the_extension_backend_say_what_is_wrong():
    with pytest.raises(RuntimeError, match="meta .shape-only. tensors go through "
                                           "backend='torch' or 'auto'"):
        ge2e_ext.ge2e_loss(torch.empty(3, 2, 4, device="meta"), 10.0, -5.0,
                           backend="extension")


@needs_cpu_extension
class TestOpChecks:
    """Direct calls of torch.ops.ge2e_ext.* are checked in C++ as well."""

    @staticmethod
    def op(x, sums, w, b, speaker_offset, method, min_cosine):
        return torch.ops.ge2e_ext.ge2e_forward(**problem(x, w, b, method, min_cosine, sums=sums,
                                                         speaker_offset=speaker_offset))

    def test_wrong_scalar_dtype(self):
        with pytest.raises(TypeError,
                           match="w must have dtype Float for Float embeddings, got Double"):
            self.op(GOOD, None, torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0),
                    0, "softmax", 1e-6)

    def test_bad_sums(self):
        w, b = torch.tensor(1.0), torch.tensor(0.0)
        with pytest.raises(ValueError, match=r"sums must have shape \(K speakers, D = 4\)"):
            self.op(GOOD, torch.randn(3, 5), w, b, 0, "softmax", 1e-6)
        with pytest.raises(ValueError, match="speaker_offset"):
            self.op(GOOD, torch.randn(4, 4), w, b, 2, "softmax", 1e-6)
        with pytest.raises(TypeError, match="sums must have dtype Float"):
            self.op(GOOD, torch.randn(4, 4, dtype=torch.float64), w, b, 0, "softmax", 1e-6)

    def test_bad_method(self):
        with pytest.raises(ValueError, match="one of 'softmax', 'contrast', got 'hinge'"):
            self.op(GOOD, None, torch.tensor(1.0), torch.tensor(0.0), 0, "hinge", 1e-6)

    def test_bad_min_cosine(self):
        with pytest.raises(ValueError, match="min_cosine must be a finite number below 1"):
            self.op(GOOD, None, torch.tensor(1.0), torch.tensor(0.0), 0, "softmax", 1.5)

    def test_bad_hardest_index_poisons_the_rows(self):
        """A hardest impostor that is not one (only a direct call of the backward op can
        pass one) gives NaN gradients, never a read out of bounds or a finite answer."""
        w, b = torch.tensor(1.0), torch.tensor(0.0)
        _, state, _ = self.op(GOOD, None, w, b, 0, "contrast", 1e-6)
        # out of range, negative, the own speaker of row 0, not a whole number, NaN
        for bad in (7, -1, 0, 0.5, float("nan")):
            grads = torch.ops.ge2e_ext.ge2e_backward(**problem(GOOD, w, b, "contrast"),
                                                     grad_loss=torch.ones(3, 2),
                                                     state=torch.full_like(state, bad))
            assert torch.isnan(grads[0][0]).all() and torch.isnan(grads[2])
