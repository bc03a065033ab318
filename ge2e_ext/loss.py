"""``GE2ELoss``: the drop-in module."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._torch_impl import MIN_W
from .functional import check_options, ge2e_loss


def _initial_value(name: str, value: Any) -> float:
    """init_w or init_b as a finite float (a number, or anything float() takes)."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _check_init_w(init_w: float) -> float:
    # A w that starts at or below the clamp never trains: no gradient passes there.
    if not init_w > MIN_W:
        raise ValueError(
            f"init_w must be above {MIN_W:g}, got {init_w}: the loss uses max(w, {MIN_W:g}), "
            "and at or below that clamp no gradient reaches w, so training would never move it "
            "(the paper requires w > 0; the original code starts at 10)")
    return init_w


class GE2ELoss(nn.Module):
    r"""Generalized end-to-end loss (Wan et al., 2018; arXiv 1710.10467) with learnable
    ``w`` and ``b``.

    A drop-in replacement for the original pure-PyTorch ``GE2ELoss``: the same first
    three arguments, the same parameter names (``w``, ``b``: ``state_dict`` loads both
    ways) and the same output (the sum over the utterances), computed by fused
    kernels. Each utterance embedding :math:`e_{ji}` is scored against every
    speaker's centroid (its own speaker's without itself) with
    :math:`S_{ji,k} = \max(w, 10^{-6}) \cos(e_{ji}, c_k) + b`; see
    :func:`~ge2e_ext.ge2e_loss` for the loss methods and the keyword arguments.

    Args:
        init_w (float, optional): the initial scale ``w``, above 1e-6 (at or below
            that clamp no gradient reaches ``w``, which would never train). Default: 10.
        init_b (float, optional): the initial bias ``b``. Default: -5.
        loss_method (str, optional): ``"softmax"`` (eq. 6) or ``"contrast"`` (eq. 7),
            one of ``ge2e_ext.LOSS_METHODS``. Default: ``"softmax"``.
        reduction (str, optional): ``"sum"``, ``"mean"`` (over the utterances) or
            ``"none"``. Default: ``"sum"``.
        min_cosine (float or None, optional): lower clamp on every cosine, below 1; None
            is the paper's unclamped formula. Default: ``1e-6`` (the original code's).
        backend (str, optional): ``"auto"``, ``"extension"`` or ``"torch"``.
            Default: ``"auto"``.
        distributed (bool, optional): score against the speakers of every rank
            (docs/distributed.md). Default: False.
        group (ProcessGroup, optional): the process group, with ``distributed=True``.
            Default: None (the default group).
        normalize (bool, optional): score the embeddings scaled to unit length (the
            paper's e_ji; pytorch-metric-learning's ``GE2ELoss``), normalised in the
            compiled op's own pass. Default: False (as given, the original code's).

    Shape:
        - embeddings: :math:`(N, M, D)`: N >= 2 speakers, M >= 2 utterances each, D
          features; or :math:`(B, D)` rows with ``labels`` :math:`(B)`, any number
          of utterances (at least 2) per speaker.
        - Output: a scalar; with ``reduction="none"``, :math:`(N, M)`, or :math:`(B)`
          in the rows' order with labels. float32 (float64 for float64 embeddings).

    Example::

        >>> import torch
        >>> from ge2e_ext import GE2ELoss
        >>> criterion = GE2ELoss(init_w=10.0, init_b=-5.0, loss_method="softmax")
        >>> embeddings = torch.randn(64, 10, 256, requires_grad=True)  # N=64, M=10, D=256
        >>> loss = criterion(embeddings)
        >>> loss.backward()
        >>> rows, labels = torch.randn(8, 256), torch.tensor([3, 3, 7, 9, 7, 3, 9, 7])
        >>> criterion(rows, labels).shape
        torch.Size([])
    """

    # A class default, so that a module pickled whole before the option existed
    # (torch.save(criterion)) loads and runs as it did.
    normalize: bool = False

    def __init__(self, init_w: float = 10.0, init_b: float = -5.0, loss_method: str = "softmax",
                 *, reduction: str = "sum", min_cosine: float | None = 1e-6,
                 backend: str = "auto", distributed: bool = False,
                 group: torch.distributed.ProcessGroup | None = None,
                 normalize: bool = False) -> None:
        super().__init__()
        check_options(loss_method, reduction, min_cosine, backend, distributed, group)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.w = nn.Parameter(torch.tensor(_check_init_w(_initial_value("init_w", init_w))))
        self.b = nn.Parameter(torch.tensor(_initial_value("init_b", init_b)))
        self.loss_method = loss_method
        self.reduction = reduction
        self.min_cosine = min_cosine
        self.backend = backend
        self.distributed = distributed
        self.group = group

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                num_speakers: int | None = None, *, return_top1: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        r"""The loss of ``embeddings`` ``(N, M, D)``, or of ``(B, D)`` rows with their
        ``(B,)`` speaker ``labels`` (and ``num_speakers``, the number of distinct
        labels if known); with ``return_top1``, ``(loss, top1)``, top1 saying for
        each row whether its own speaker is the most similar (``top1.float().mean()``:
        the batch's top-1 accuracy, from the same pass); see
        :func:`~ge2e_ext.ge2e_loss`."""
        return ge2e_loss(embeddings, self.w, self.b, self.loss_method, labels=labels,
                         num_speakers=num_speakers, reduction=self.reduction,
                         min_cosine=self.min_cosine, backend=self.backend,
                         distributed=self.distributed, group=self.group,
                         normalize=self.normalize, return_top1=return_top1)

    def extra_repr(self) -> str:
        return (f"loss_method={self.loss_method!r}, reduction={self.reduction!r}, "
                f"min_cosine={self.min_cosine}, backend={self.backend!r}"
                + (", distributed=True" if self.distributed else "")
                + (", normalize=True" if self.normalize else ""))
