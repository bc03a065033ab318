"""The GE2E loss methods: one entry each, read by everything on the Python side.

The functional API checks names against this table, the pure-PyTorch path
(``ge2e_ext._torch_impl``) and the loop reference (``ge2e_ext.reference``) take
each method's row loss from it, and the benchmark and the tests iterate over it.
The compiled kernels have the same methods as policies in csrc/ge2e_math.h
(``LossMethods``); the tests check that both sides accept the same names.

A row is one utterance e_ji scored against all K speakers: ``cos`` holds its
clamped cosines (the own speaker's against the exclusive centroid), ``own`` the
index of its own speaker. docs/math.md gives the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class LossMethod:
    name: str
    equation: str  # where the paper defines it
    # PyTorch path: (cos (N, M, K), own_cos (N, M), own (N, M, 1) indices, w, b) -> (N, M)
    rows: Callable
    # Loop reference, the original code's formula: (similarities (K,), own index) -> 0-dim
    reference_row: Callable


def _softmax_rows(cos: torch.Tensor, own_cos: torch.Tensor, own: torch.Tensor, w: torch.Tensor,
                  b: torch.Tensor) -> torch.Tensor:
    # From the differences d_k = S_k - S_own = w (c_k - c_own), which do not
    # contain b: L = m + log1p(expm1(-m) + sum_{k != own} exp(d_k - m)) with
    # m = max(0, max_k d_k), accurate when the own speaker wins by a margin
    # (m = 0: log1p of the impostors' sum). m cancels, so its gradient is dropped.
    diff = w * (cos - own_cos.unsqueeze(-1))
    impostors = diff.scatter(-1, own, float("-inf"))
    m = impostors.amax(-1).clamp(min=0).detach()
    others = torch.exp(impostors - m.unsqueeze(-1)).sum(-1)
    return m + torch.log1p(torch.expm1(-m) + others)


def _contrast_rows(cos: torch.Tensor, own_cos: torch.Tensor, own: torch.Tensor, w: torch.Tensor,
                   b: torch.Tensor) -> torch.Tensor:
    # 1 - sig(S_own) + max_{k != own} sig(S_k), written sig(-S_own) + sig(S_hardest);
    # the hardest impostor is the arg-max of the cosine (ties: the lowest index).
    hardest_cos = cos.scatter(-1, own, float("-inf")).max(-1).values
    return torch.sigmoid(-(w * own_cos + b)) + torch.sigmoid(w * hardest_cos + b)


def _softmax_reference_row(similarities: torch.Tensor, own: int) -> torch.Tensor:
    return -torch.log_softmax(similarities, dim=0)[own]


def _contrast_reference_row(similarities: torch.Tensor, own: int) -> torch.Tensor:
    sig = torch.sigmoid(similarities)
    impostors = torch.cat((sig[:own], sig[own + 1:]))
    return 1.0 - sig[own] + torch.max(impostors)


METHODS = {
    method.name: method
    for method in (
        LossMethod("softmax", "eq. 6: logsumexp_k S_jik - S_jij", _softmax_rows,
                   _softmax_reference_row),
        LossMethod("contrast", "eq. 7: 1 - sig(S_jij) + max_{k != j} sig(S_jik)",
                   _contrast_rows, _contrast_reference_row),
    )
}
LOSS_METHODS = tuple(METHODS)
