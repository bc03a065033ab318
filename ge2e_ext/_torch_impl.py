"""The pure-PyTorch GE2E loss: vectorized, differentiable by autograd, any device.

This is the fallback used where no compiled kernel exists (``backend="torch"``,
or ``"auto"`` without the extension) and the "eager" provider of the benchmark.
It computes the same function as the compiled op (same exclusive centroid
``s_j - e_ji``, same zero-norm convention, same tie rule), but materialises the
N x M x K similarities and an N x M x D tensor of exclusive centroids.
"""

from __future__ import annotations

import torch

MIN_W = 1e-6  # the forward uses max(w, MIN_W): the paper requires w > 0


def inverse_norm(vectors: torch.Tensor) -> torch.Tensor:
    """1/|v| over the last dimension, 0 for a zero vector (and its gradient 0).

    The inner ``where`` keeps 1/0 out of the graph, so the unselected branch
    cannot send inf * 0 = NaN into the gradient.
    """
    norm = torch.linalg.vector_norm(vectors, dim=-1)
    positive = norm > 0
    safe = torch.where(positive, norm, torch.ones_like(norm))
    return torch.where(positive, 1.0 / safe, torch.zeros_like(norm))


def ge2e_rows(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine):
    """Per-utterance GE2E losses (N, M).

    embeddings (N, M, D) and sums (K, D) (None: ``embeddings.sum(1)``) in the
    accumulation dtype; w, b 0-dim tensors of that dtype; local speaker j is row
    ``speaker_offset + j`` of sums.
    """
    n, m, _ = embeddings.shape
    if sums is None:
        sums = embeddings.sum(1)
    inv_e = inverse_norm(embeddings)                                     # (N, M)
    inv_s = inverse_norm(sums)                                           # (K,)
    exclusive = sums[speaker_offset:speaker_offset + n].unsqueeze(1) - embeddings  # (N, M, D)
    own_cos = (embeddings * exclusive).sum(-1) * inv_e * inverse_norm(exclusive)  # (N, M)
    cos = torch.matmul(embeddings, sums.t()) * inv_e.unsqueeze(-1) * inv_s       # (N, M, K)
    own = (torch.arange(n, device=embeddings.device) + speaker_offset).view(n, 1, 1).expand(n, m, 1)
    cos = cos.scatter(-1, own, own_cos.unsqueeze(-1))
    if min_cosine is not None:
        cos = cos.clamp(min=min_cosine)
    # A non-finite w or b makes every similarity NaN (as in the kernels): the
    # contrast loss would otherwise saturate into a finite, meaningless number.
    finite = torch.isfinite(w) & torch.isfinite(b)
    w = torch.where(finite, w.clamp(min=MIN_W), torch.full_like(w, float("nan")))
    sim = w * cos + b
    own_sim = sim.gather(-1, own).squeeze(-1)
    if loss_method == "softmax":
        return torch.logsumexp(sim, dim=-1) - own_sim
    impostors = sim.scatter(-1, own, torch.full_like(own_sim.unsqueeze(-1), float("-inf")))
    hardest = impostors.max(dim=-1).values
    return 1.0 - torch.sigmoid(own_sim) + torch.sigmoid(hardest)
