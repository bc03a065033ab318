"""The pure-PyTorch GE2E loss: vectorized, differentiable by autograd, any device.

This is the path used where no compiled kernel exists (``backend="torch"``, or
``"auto"`` without the extension, or under torch.func transforms and forward-mode
AD) and the "eager" provider of the benchmark. It computes the same function as
the compiled op with the same numerics (exclusive sums without subtraction, the
softmax loss from differences, the zero-norm and non-finite rules, the clamp's
gradient), but materialises the N x M x K cosines (B x K in the labels form,
which is never padded).
"""

from __future__ import annotations

import torch

from .labels import Grouping
from .methods import METHODS

MIN_W = 1e-6  # the forward uses max(w, MIN_W): the paper requires w > 0


def power_of_two_scale(max_abs: torch.Tensor) -> torch.Tensor:
    """The power of two 2^-e that brings each ``max_abs`` into [0.5, 1) (1 for 0 and
    non-finite values), as csrc/ge2e_math.h's power_of_two_scale: multiplying by it
    is exact. Tensor ops only (no host read, so torch.compile traces it); detached,
    since a cosine does not depend on it."""
    max_abs = max_abs.detach()
    _, exponent = torch.frexp(max_abs)
    limit = 1022 if max_abs.dtype == torch.float64 else 126
    # The clamp in the floating dtype: inductor's C++ code for an integer minimum
    # does not compile in torch 2.14 (torch.compile(dynamic=True) of the labels form).
    scale = torch.ldexp(torch.ones_like(max_abs), (-exponent).to(max_abs.dtype).clamp(max=limit))
    usable = (max_abs > 0) & torch.isfinite(max_abs)
    return torch.where(usable, scale, torch.ones_like(max_abs))


def inverse_norm(vectors: torch.Tensor) -> torch.Tensor:
    """1/|v| over the last dimension, 0 for a zero vector (and its gradient 0).

    The norm is taken of v times a power of two that brings its largest
    coordinate into [0.5, 1), so its square neither overflows nor underflows
    at any scale. The inner ``where`` keeps 1/0 out of the graph, so the
    unselected branch cannot send inf * 0 = NaN into the gradient.
    """
    scale = power_of_two_scale(vectors.abs().amax(-1)).unsqueeze(-1)
    norm = torch.linalg.vector_norm(vectors * scale, dim=-1)
    positive = norm > 0
    safe = torch.where(positive, norm, torch.ones_like(norm))
    return torch.where(positive, scale.squeeze(-1) / safe, torch.zeros_like(norm))


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """v/|v| over the last dimension (0 for a zero vector): every cosine is a dot
    product of these, so nothing depends on the embeddings' scale."""
    return vectors * inverse_norm(vectors).unsqueeze(-1)


NORMALIZE_EPS = 1e-12  # kNormalizeEps in csrc/ge2e_math.h: torch.nn.functional.normalize's


def normalized_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows / max(|rows|, 1e-12) over the last dimension (``normalize=True``), as
    torch.nn.functional.normalize, with the norm taken of the rows times a power of
    two (no overflow of its square) and computed in the accumulation dtype; the
    result in the rows' dtype. The kernels' unit_rows (csrc/ge2e_math.h)."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    x = rows.to(acc)
    scale = power_of_two_scale(x.abs().amax(-1, keepdim=True))
    norm = torch.linalg.vector_norm(x * scale, dim=-1, keepdim=True) / scale
    return (x / norm.clamp(min=NORMALIZE_EPS)).to(rows.dtype)


def exclusive_sums(embeddings: torch.Tensor) -> torch.Tensor:
    """u_ji = sum_{l != i} e_jl as prefix plus suffix sums: never s_j - e_ji, which
    cancels when e_ji dominates its speaker."""
    zeros = embeddings.new_zeros(embeddings.shape[0], 1, embeddings.shape[2])
    prefix = torch.cat([zeros, embeddings[:, :-1].cumsum(1)], 1)
    suffix = torch.cat([embeddings[:, 1:].flip(1).cumsum(1).flip(1), zeros], 1)
    return prefix + suffix


def top1(cos: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Whether each row's own speaker is its top-1: the arg-max of the row's
    clamped cosines ``cos`` (..., K) (ties to the lower index, as torch.argmax) is
    ``own`` (..., 1), and no cosine of the row is NaN (such a row has no top-1).
    The kernels' rule (takes_top1 in csrc/ge2e_math.h). bool, cos's shape
    without K."""
    with torch.no_grad():
        hit = (cos.argmax(-1, keepdim=True) == own).squeeze(-1)
        return hit & ~cos.isnan().any(-1)


def ge2e_rows(embeddings: torch.Tensor, sums: torch.Tensor | None, w: torch.Tensor,
              b: torch.Tensor, speaker_offset: int, loss_method: str, min_cosine: float | None,
              with_top1: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-utterance GE2E losses (N, M) (with with_top1, and the rows' ``top1``).

    embeddings (N, M, D) and sums (K, D) (None: ``embeddings.sum(1)``) in the
    accumulation dtype; w, b 0-dim tensors of that dtype; local speaker j is row
    ``speaker_offset + j`` of sums.
    """
    n, m, _ = embeddings.shape
    # Each speaker times a power of two (its largest |x| into [0.5, 1)): its sums
    # cannot overflow, and cosines do not change (docs/math.md, "Scale").
    sigma = power_of_two_scale(embeddings.abs().amax((1, 2))).view(n, 1, 1)
    embeddings = embeddings * sigma
    if sums is None:
        sums = embeddings.sum(1)
    else:
        sums = sums * power_of_two_scale(sums.abs().amax(1)).unsqueeze(1)
    unit_e = unit(embeddings)                                           # (N, M, D)
    own_cos = (unit_e * unit(exclusive_sums(embeddings))).sum(-1)       # (N, M)
    cos = torch.matmul(unit_e, unit(sums).t())
    own = (torch.arange(n, device=embeddings.device) + speaker_offset).view(n, 1, 1).expand(n, m, 1)
    cos = cos.scatter(-1, own, own_cos.unsqueeze(-1))                   # (N, M, K)
    if min_cosine is not None:
        cos = cos.clamp(min=min_cosine)
    # (w + b) * 0 is 0 with gradient 0, but NaN when w or b is not finite: then
    # every output is NaN, as in the kernels (a saturated sigmoid, or the
    # softmax loss, which does not depend on b, would otherwise hide it).
    w = w.clamp(min=MIN_W) + (w + b) * 0
    losses = METHODS[loss_method].rows(cos, cos.gather(-1, own).squeeze(-1), own, w, b)
    return (losses, top1(cos, own)) if with_top1 else losses


def _segmented_inclusive_sums(rows: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Row i: the sum of rows l <= i of its segment (``segment`` non-decreasing).

    A Hillis-Steele scan, ceil(log2(B)) steps of O(B D): each step adds the
    partial sum ``shift`` rows back when it belongs to the same segment, so a
    row never sees another segment's rows (no subtraction, no padding). The
    number of steps depends only on B, so nothing is read from the device."""
    b = rows.shape[0]
    total = rows
    shift = 1
    while shift < b:
        same = (segment[shift:] == segment[:-shift]).unsqueeze(-1)
        earlier = torch.where(same, total[:-shift], torch.zeros_like(total[:-shift]))
        total = torch.cat([total[:shift], total[shift:] + earlier])
        shift *= 2
    return total


def _shift_within(sums: torch.Tensor, segment: torch.Tensor, down: bool) -> torch.Tensor:
    """Row i gets row i - 1's value (down) or row i + 1's, 0 across a segment boundary."""
    zeros = sums.new_zeros((1,) + sums.shape[1:])
    if down:
        moved = torch.cat([zeros, sums[:-1]])
        same = torch.cat([segment.new_zeros(1, dtype=torch.bool), segment[1:] == segment[:-1]])
    else:
        moved = torch.cat([sums[1:], zeros])
        same = torch.cat([segment[1:] == segment[:-1], segment.new_zeros(1, dtype=torch.bool)])
    return torch.where(same.unsqueeze(-1), moved, torch.zeros_like(moved))


def ge2e_rows_grouped(rows: torch.Tensor, grouping: Grouping, sums: torch.Tensor | None,
                      w: torch.Tensor, b: torch.Tensor, speaker_offset: int, loss_method: str,
                      min_cosine: float | None, with_top1: bool = False
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-utterance GE2E losses (B,) (with with_top1, and the rows' ``top1``) of
    rows (B, D) grouped by speaker (in the order of ``grouping``), with segment
    sums: no padding, O(B K + B D) memory whatever the groups' sizes, and no
    value read from the device.

    u_ji = (the speaker's rows before it) + (those after it), each a segmented
    scan, never s_j - e_ji (which cancels when e_ji dominates its speaker)."""
    segment = grouping.speaker_of_row
    before = _segmented_inclusive_sums(rows, segment)                     # l <= i
    after = _segmented_inclusive_sums(rows.flip(0), segment.flip(0)).flip(0)  # l >= i
    others = _shift_within(before, segment, True) + _shift_within(after, segment, False)
    if sums is None:
        # The last row of each speaker holds its speaker's sum.
        last = (grouping.offsets[1:] - 1).clamp(min=0)
        sums = before.index_select(0, last)
    inv_e = inverse_norm(rows)                                          # (B,)
    own_cos = (rows * others).sum(-1) * inv_e * inverse_norm(others)
    cos = torch.matmul(rows, sums.t()) * inv_e.unsqueeze(-1) * inverse_norm(sums)
    own = (segment + speaker_offset).unsqueeze(-1)                      # (B, 1)
    cos = cos.scatter(-1, own, own_cos.unsqueeze(-1))                   # (B, K)
    if min_cosine is not None:
        cos = cos.clamp(min=min_cosine)
    w = w.clamp(min=MIN_W) + (w + b) * 0  # NaN everywhere for a non-finite w or b (ge2e_rows)
    losses = METHODS[loss_method].rows(cos, cos.gather(-1, own).squeeze(-1), own, w, b)
    return (losses, top1(cos, own)) if with_top1 else losses
