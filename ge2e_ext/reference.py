"""The loop reference: the original GE2E-Loss code's computation, step by step.

This transcribes the semantics of the pure-PyTorch ``ge2e.py`` that users train
with today: for every utterance a fresh stack of centroids with the own
speaker's replaced by the mean of its other utterances, cosines through
``torch.norm``, ``torch.clamp(cos, 1e-6)``, ``w * cos + b``, then a Python loop
of per-row losses (``ge2e_ext.methods``: ``-log_softmax(S)[own]``, or
``1 - sig(S_own) + max sig(S_impostor)``). It is deliberately as slow as the
original (that is what the benchmark compares against) and serves the tests and
the benchmark as the ground truth; run it in float64 for a yardstick.

Two knobs make it cover both conventions:
- ``clamp_w=True`` applies ``max(w, 1e-6)`` as ge2e_ext does; the original meant
  to but discarded the result (``clamp_w=False`` reproduces that).
- ``min_cosine=None`` drops the cosine clamp (the paper's formula).

Zero-norm embeddings give NaN here, as in the original (0/0).
"""

from __future__ import annotations

import torch

from .methods import LOSS_METHODS, METHODS


def _cosine_matrix(embeddings: torch.Tensor, min_cosine: float | None) -> torch.Tensor:
    n, m, _ = embeddings.shape
    centroids = embeddings.mean(dim=1)
    rows = []
    for j in range(n):
        per_utterance = []
        for i in range(m):
            exclusive = torch.cat((embeddings[j, :i], embeddings[j, i + 1:])).mean(dim=0)
            candidates = torch.stack([exclusive if k == j else centroids[k] for k in range(n)])
            utterance = embeddings[j, i]
            cos = torch.mv(candidates, utterance) / (
                torch.norm(utterance) * torch.norm(candidates, dim=1)
            )
            if min_cosine is not None:
                cos = torch.clamp(cos, min_cosine)
            per_utterance.append(cos)
        rows.append(torch.stack(per_utterance))
    return torch.stack(rows)  # (N, M, N)


def ge2e_loss_reference(embeddings: torch.Tensor, w: torch.Tensor | float,
                        b: torch.Tensor | float, loss_method: str = "softmax", *,
                        min_cosine: float | None = 1e-6, clamp_w: bool = True) -> torch.Tensor:
    """Per-utterance GE2E losses (N, M) computed by loops, as the original code does.

    ``w`` and ``b`` are 0-dim tensors (or numbers); gradients flow by autograd.
    """
    if loss_method not in METHODS:
        raise ValueError(f"loss_method must be one of {LOSS_METHODS}, got {loss_method!r}")
    row_loss = METHODS[loss_method].reference_row
    w = torch.as_tensor(w, dtype=embeddings.dtype, device=embeddings.device)
    b = torch.as_tensor(b, dtype=embeddings.dtype, device=embeddings.device)
    if clamp_w:
        w = torch.clamp(w, min=1e-6)
    sim = _cosine_matrix(embeddings, min_cosine) * w + b
    n, m, _ = sim.shape
    return torch.stack([torch.stack([row_loss(sim[j, i], j) for i in range(m)])
                        for j in range(n)])
