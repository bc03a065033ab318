"""``GE2ELoss``: the drop-in module."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._torch_impl import MIN_W
from .functional import check_options, ge2e_loss


def _initial_value(name, value):
    """init_w or init_b as a finite float (a number, or anything float() takes)."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _check_init_w(init_w):
    # A w that starts at or below the clamp never trains: no gradient passes there.
    if not init_w > MIN_W:
        raise ValueError(
            f"init_w must be above {MIN_W:g}, got {init_w}: the loss uses max(w, {MIN_W:g}), "
            "and at or below that clamp no gradient reaches w, so training would never move it "
            "(the paper requires w > 0; the original code starts at 10)")
    return init_w


class GE2ELoss(nn.Module):
    """Generalized End-to-End loss (arXiv 1710.10467) with learnable ``w`` and ``b``.

    A drop-in replacement for the original pure-PyTorch ``GE2ELoss``: the same
    first three arguments and the same output (the sum over utterances), computed
    by fused kernels. ``forward(embeddings)`` takes (N speakers, M utterances, D),
    or ``forward(embeddings, labels)`` (B, D) rows with their (B,) speaker labels.
    See ``ge2e_ext.ge2e_loss`` for the keyword arguments.
    """

    def __init__(self, init_w=10.0, init_b=-5.0, loss_method="softmax", *, reduction="sum",
                 min_cosine=1e-6, backend="auto", distributed=False, group=None):
        super().__init__()
        check_options(loss_method, reduction, min_cosine, backend, distributed, group)
        self.w = nn.Parameter(torch.tensor(_check_init_w(_initial_value("init_w", init_w))))
        self.b = nn.Parameter(torch.tensor(_initial_value("init_b", init_b)))
        self.loss_method = loss_method
        self.reduction = reduction
        self.min_cosine = min_cosine
        self.backend = backend
        self.distributed = distributed
        self.group = group

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None,
                num_speakers: Optional[int] = None) -> torch.Tensor:
        """embeddings (N speakers, M utterances, D), or (B, D) rows with labels (B,);
        see ``ge2e_ext.ge2e_loss``."""
        return ge2e_loss(embeddings, self.w, self.b, self.loss_method, labels=labels,
                         num_speakers=num_speakers, reduction=self.reduction,
                         min_cosine=self.min_cosine, backend=self.backend,
                         distributed=self.distributed, group=self.group)

    def extra_repr(self) -> str:
        return (f"loss_method={self.loss_method!r}, reduction={self.reduction!r}, "
                f"min_cosine={self.min_cosine}, backend={self.backend!r}"
                + (", distributed=True" if self.distributed else ""))
