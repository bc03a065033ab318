"""Guards a new user meets: an initial w that could never train, non-tensor inputs."""

import math

import numpy as np
import pytest
import torch

import ge2e_ext
from ge2e_ext._torch_impl import MIN_W

from helpers import CPU_BACKENDS


@pytest.mark.parametrize("init_w, words", [
    (-1, ["init_w", "above 1e-06", "-1", "no gradient reaches w"]),
    (0, ["init_w", "above 1e-06", "got 0", "never move it"]),
    (MIN_W, ["init_w", "above 1e-06"]),
    (float("nan"), ["init_w", "finite", "nan"]),
    (float("inf"), ["init_w", "finite", "inf"]),
    (-math.inf, ["init_w", "finite", "-inf"]),
])
def test_an_initial_w_at_or_below_the_clamp_is_refused(init_w, words):
    with pytest.raises(ValueError) as info:
        ge2e_ext.GE2ELoss(init_w=init_w)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("init_b", [float("nan"), float("inf")])
def test_a_non_finite_initial_b_is_refused(init_b):
    with pytest.raises(ValueError, match="init_b must be finite"):
        ge2e_ext.GE2ELoss(init_b=init_b)


def test_initial_values_accept_what_float_accepts():
    criterion = ge2e_ext.GE2ELoss(torch.tensor(3.0), np.float64(-2.0))
    assert criterion.w.item() == 3.0 and criterion.b.item() == -2.0
    assert criterion.w.dtype == torch.float32 and criterion.w.dim() == 0
    with pytest.raises(TypeError, match="init_w must be a real number, got str"):
        ge2e_ext.GE2ELoss(init_w="ten")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_why_the_clamp_is_refused_at_construction(backend):
    """What the message says: at the clamp w gets no gradient, just above it does."""
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    grads = {}
    for init_w in (MIN_W, 2 * MIN_W):
        w = torch.tensor(init_w, requires_grad=True)
        ge2e_ext.ge2e_loss(x, w, torch.tensor(-5.0), backend=backend).backward()
        grads[init_w] = w.grad.item()
    assert grads[MIN_W] == 0.0
    assert grads[2 * MIN_W] != 0.0


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 0, 1, 1])])
@pytest.mark.parametrize("value, hint", [
    (np.zeros((2, 2, 4), dtype=np.float32), "(convert it with torch.from_numpy)"),
    ([[[0.0] * 4] * 2] * 2, "(convert it with torch.tensor)"),
])
def test_a_non_tensor_input_says_how_to_convert_it(value, hint, labels):
    if labels is not None:
        value = np.zeros((4, 4)) if isinstance(value, np.ndarray) else [[0.0] * 4] * 4
    with pytest.raises(TypeError) as info:
        ge2e_ext.GE2ELoss()(value, labels)
    message = str(info.value)
    assert "must be a torch.Tensor" in message and hint in message
    assert type(value).__name__ in message


def test_other_non_tensors_get_no_conversion_hint():
    with pytest.raises(TypeError) as info:
        ge2e_ext.ge2e_loss("embeddings", 10.0, -5.0)
    assert "got str" in str(info.value) and "convert" not in str(info.value)
