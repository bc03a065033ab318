"""Metrics beside the loss, as the code people train with reports them.

- ``equal_error_rate(scores, same_speaker)`` and ``roc_curve``: verification
  trials (a score per trial and whether both sides are the same speaker), in
  torch, without scikit-learn. Equal scores are one threshold (one step of the
  ROC, whatever their labels), and the EER is where the piecewise-linear ROC
  crosses false acceptance = false rejection: the value Real-Time-Voice-Cloning
  computes with ``sklearn.metrics.roc_curve`` and ``brentq``.
- ``similarity_matrix``, ``top1_accuracy``, ``batch_equal_error_rate``: a GE2E
  batch's cosines (each utterance against its own exclusive centroid and the
  other speakers' centroids), the share of utterances whose own centroid is the
  most similar (voxceleb_trainer's ``prec1``, as a fraction) and the EER of all
  of the batch's utterance-centroid pairs (RTVC's training EER).

The batch metrics are computed here by the pure-PyTorch path under
``torch.no_grad()``: they materialise the ``N x M x N`` cosines and cost one
more matrix product than the loss. They are for logging; the loss itself never
builds that matrix. Beside a training step's loss, the top-1 accuracy costs
nothing: ``ge2e_loss(..., return_top1=True)`` (or ``GE2ELoss()(x,
return_top1=True)``) returns each row's top-1 from the loss's own pass, and
``top1.float().mean()`` equals ``top1_accuracy``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _torch_impl
from .labels import check_labels, group_by_label

__all__ = ["roc_curve", "equal_error_rate", "similarity_matrix", "top1_accuracy",
           "batch_equal_error_rate"]


# ------------------------------------------------------------ trial scores
def _check_trials(scores: object, same_speaker: object) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if not isinstance(same_speaker, torch.Tensor):
        same_speaker = torch.as_tensor(same_speaker)
    if scores.shape != same_speaker.shape:
        raise ValueError(f"scores and same_speaker must have the same shape, got "
                         f"{tuple(scores.shape)} and {tuple(same_speaker.shape)}")
    if not (scores.dtype.is_floating_point or scores.dtype in (torch.int8, torch.int16,
                                                               torch.int32, torch.int64,
                                                               torch.uint8)):
        raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}")
    if same_speaker.dtype != torch.bool and (same_speaker.dtype.is_floating_point
                                             or same_speaker.is_complex()):
        raise TypeError(f"same_speaker must be bool or 0/1 integers, got dtype "
                        f"{same_speaker.dtype}")
    scores = scores.detach().reshape(-1).to(torch.float64)
    labels = same_speaker.detach().reshape(-1)
    if labels.dtype != torch.bool:
        if ((labels != 0) & (labels != 1)).any():
            raise ValueError("same_speaker must hold only 0 and 1 (or False and True)")
        labels = labels != 0
    labels = labels.to(scores.device)
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).sum().item()
        raise ValueError(f"scores must be finite, got {bad} NaN or infinite of {scores.numel()}")
    targets = int(labels.sum())
    impostors = labels.numel() - targets
    if targets == 0 or impostors == 0:
        raise ValueError(
            f"an error rate needs both target (same speaker) and impostor trials, got "
            f"{targets} target and {impostors} impostor trials")
    return scores, labels


def roc_curve(scores: object, same_speaker: object
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ROC of verification trials: ``(far, frr, thresholds)``, float64, from the
    strictest threshold to the loosest.

    A trial is accepted when its score is at least the threshold. Point 0 is
    the threshold +inf (nothing accepted: far 0, frr 1); then one point per
    distinct score, in decreasing order, so tied scores (of either label) are
    one step. ``far``: the share of impostor trials accepted; ``frr``: the share
    of target trials rejected.
    """
    scores, labels = _check_trials(scores, same_speaker)
    order = torch.argsort(scores, descending=True)
    scores, labels = scores[order], labels[order]
    # The last trial of each run of equal scores closes a threshold step.
    last_of_run = torch.ones_like(labels)
    last_of_run[:-1] = scores[1:] != scores[:-1]
    accepted_targets = labels.to(torch.float64).cumsum(0)[last_of_run]
    accepted_impostors = (~labels).to(torch.float64).cumsum(0)[last_of_run]
    zero = scores.new_zeros(1)
    far = torch.cat([zero, accepted_impostors / accepted_impostors[-1]])
    frr = torch.cat([zero + 1, 1 - accepted_targets / accepted_targets[-1]])
    thresholds = torch.cat([zero + float("inf"), scores[last_of_run]])
    return far, frr, thresholds


def equal_error_rate(scores: object, same_speaker: object) -> float:
    """Equal error rate of verification trials, as a fraction (0.05 is 5%).

    scores: a score per trial (any shape; higher: more alike); same_speaker:
    bool (or 0/1) of the same shape, True for target trials. The EER is the
    rate where the ROC, joined linearly between its points, has false
    acceptance equal to false rejection; equal scores are one point of the ROC
    (no order is invented among them: two tied trials of different labels give
    0.5, not 0 or 1). Needs both target and impostor trials and finite scores
    (a ValueError otherwise).
    """
    far, frr, _ = roc_curve(scores, same_speaker)
    gap = frr - far  # +1 at the first point, -1 at the last: it crosses 0 once
    k = int(torch.nonzero(gap <= 0)[0])  # first point at or past the crossing (k >= 1)
    t = gap[k - 1] / (gap[k - 1] - gap[k])  # where the segment (k-1, k) crosses
    return float(far[k - 1] + t * (far[k] - far[k - 1]))


# ------------------------------------------------------------ batch metrics
def _cosines(embeddings: object, labels: Optional[torch.Tensor], min_cosine: Optional[float]
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows (R, K) of cosines, own speaker index (R,)): rows in the input's order
    ((N, M, D): speaker-major), columns the speakers (by increasing label)."""
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    emb = embeddings.detach()
    if emb.dtype in (torch.float16, torch.bfloat16):
        emb = emb.float()  # computed in float32, as the loss is
    if not emb.dtype.is_floating_point:
        raise TypeError(f"embeddings must be floating point, got {emb.dtype}")
    if labels is None:
        if emb.dim() != 3 or emb.shape[0] < 2 or emb.shape[1] < 2:
            raise ValueError(f"embeddings must be (N speakers >= 2, M utterances >= 2, D) "
                             f"without labels, got shape {tuple(emb.shape)}")
        n, m, _ = emb.shape
        padded, grouping = emb, None
    else:
        if emb.dim() != 2:
            raise ValueError(f"embeddings must be (B, D) with labels, got shape "
                             f"{tuple(emb.shape)}")
        check_labels(labels, emb)
        grouping = group_by_label(labels)
        n = grouping.speakers
        counts = grouping.offsets[1:] - grouping.offsets[:-1]
        position = (torch.arange(emb.shape[0], device=emb.device)
                    - grouping.offsets[grouping.speaker_of_row])
        padded = emb.new_zeros(n, int(counts.max()), emb.shape[1]).index_put(
            (grouping.speaker_of_row, position), emb[grouping.order])
        m = padded.shape[1]
    inv_e = _torch_impl.inverse_norm(padded)
    others = _torch_impl.exclusive_sums(padded)
    sums = padded.sum(1)
    cos = torch.matmul(padded, sums.t()) * inv_e.unsqueeze(-1) * _torch_impl.inverse_norm(sums)
    own = torch.arange(n, device=emb.device).view(n, 1, 1).expand(n, m, 1)
    own_cos = (padded * others).sum(-1) * inv_e * _torch_impl.inverse_norm(others)
    cos = cos.scatter(-1, own, own_cos.unsqueeze(-1))
    if min_cosine is not None:
        cos = cos.clamp(min=min_cosine)
    if grouping is None:
        return cos.reshape(n * m, n), own.reshape(n * m)
    rows = cos[grouping.speaker_of_row, position]
    return grouping.restore(rows), grouping.restore(grouping.speaker_of_row)


def similarity_matrix(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                      min_cosine: Optional[float] = 1e-6) -> torch.Tensor:
    """The batch's cosines, as the loss sees them (before ``w * cos + b``).

    ``(N, M, D)`` embeddings give ``(N, M, N)``: utterance i of speaker j against
    every speaker's centroid, its own speaker's taken without the utterance
    (the exclusive centroid). ``(B, D)`` embeddings with ``(B,)`` labels give
    ``(B, K)``, the rows in the input's order and the K speakers by increasing
    label. ``min_cosine`` clamps as the loss does (``None``: unclamped).
    Computed without gradient.
    """
    with torch.no_grad():
        cos, _ = _cosines(embeddings, labels, min_cosine)
    if labels is None:
        return cos.view(embeddings.shape[0], embeddings.shape[1], embeddings.shape[0])
    return cos


def top1_accuracy(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                  min_cosine: Optional[float] = 1e-6) -> torch.Tensor:
    """The share (0 to 1, a 0-dim tensor) of the batch's utterances whose own
    exclusive centroid is the most similar of all centroids: the argmax of
    ``similarity_matrix`` (ties going to the lowest speaker index) is the own
    speaker. Same arguments as ``similarity_matrix``; ``w > 0`` and ``b`` do not
    change an argmax, so they are not needed.
    """
    # The PyTorch path's similarity matrix, under no_grad: one more matrix
    # product than the loss. Beside a loss, ge2e_loss(..., return_top1=True)
    # gives the same rows' top1 from the loss's own pass.
    with torch.no_grad():
        cos, own = _cosines(embeddings, labels, min_cosine)
        return _torch_impl.top1(cos, own.unsqueeze(-1)).to(cos.dtype).mean()


def batch_equal_error_rate(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                           min_cosine: Optional[float] = 1e-6) -> float:
    """EER of every utterance of the batch against every speaker's centroid (its
    own speaker's exclusive), scored by ``similarity_matrix``: RTVC's training
    EER (which it computes on ``w * cos + b``, the same ranking for ``w > 0``)."""
    with torch.no_grad():
        cos, own = _cosines(embeddings, labels, min_cosine)
        same = own.unsqueeze(1) == torch.arange(cos.shape[1], device=cos.device)
        return equal_error_rate(cos, same)
