"""The correctness guard: each provider's loss is checked before it is timed.

The value to reproduce is the loop reference's where one reference call is
affordable, else the pure-PyTorch path's in float64 (float64_loss).
A provider whose loss differs by more than rtol is "wrong" and is not timed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .common import BACKWARD, FORWARD, FWD_BWD, Size, log
from .providers import BUILTINS, Inputs, LossFn, Provider, make_inputs, prepare_call
from .timing import synchronize
from ge2e_ext._torch_impl import ge2e_rows
from ge2e_ext.reference import ge2e_loss_reference

MIN_COSINE = 1e-6  # the cosine clamp of ge2e_loss's and the reference's defaults
YARDSTICK_BLOCK = 256  # speakers per block of the float64 yardstick
# The reference's cost is measured on this size's speakers/utterances and scaled by N*N*M.
CALIBRATION_N, CALIBRATION_M = 16, 10


class ReferenceCostEstimator:
    """Predicts one reference forward+backward from a measured N=16 call scaled by N*N*M.

    The reference's Python loops make N*M stacks of N centroids, so its cost grows as
    N*N*M; measuring on the device itself covers CUDA's per-op launch cost. It
    overestimates by up to about 1.5x (fixed per-call costs are scaled too), which
    errs on the side of a benchmark that finishes.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._seconds_per_pair: dict[int, float] = {}

    def seconds(self, size: Size) -> float:
        if size.d not in self._seconds_per_pair:
            self._seconds_per_pair[size.d] = self._calibrate(size.d)
        return self._seconds_per_pair[size.d] * size.utterance_pairs

    def _calibrate(self, d: int) -> float:
        size = Size(CALIBRATION_N, CALIBRATION_M, d)
        inputs = make_inputs(size, self.device)
        loss_fn = BUILTINS["reference"].build("softmax")
        best = math.inf
        for _ in range(2):  # the first call pays one-time start-up costs
            start = time.perf_counter()
            prepare_call(loss_fn, inputs, FWD_BWD)()
            synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        return best / size.utterance_pairs


def float64_loss(inputs: Inputs, method: str, block: int = YARDSTICK_BLOCK) -> float:
    """The summed loss in float64 by the pure-PyTorch path (ge2e_ext._torch_impl, which
    shares no code with the compiled kernels), ``block`` speakers at a time, each block
    scored against every speaker's sum, so it holds block x M x N similarities (about
    100 MB at N=4096) instead of N x M x N."""
    embeddings, w, b = (t.detach().double() for t in inputs.tensors)
    sums = embeddings.sum(1)
    total = 0.0
    for first in range(0, embeddings.shape[0], block):
        rows = ge2e_rows(embeddings[first:first + block], sums, w, b, first, method, MIN_COSINE)
        total += float(rows.sum())
    return total


@dataclass(frozen=True)
class Yardstick:
    """What one (size, method)'s providers are checked against."""

    expected: float
    source: str  # "reference" or "float64"
    reference_affordable: bool
    reference_estimate_s: float


def yardstick(inputs: Inputs, method: str, estimate_s: float, limit_s: float) -> Yardstick:
    """The reference's loss where one call is estimated at most limit_s, else float64's."""
    affordable = estimate_s <= limit_s
    with torch.no_grad():
        if affordable:
            expected, source = float(ge2e_loss_reference(*inputs.tensors, method).sum()), \
                "reference"
        else:
            expected, source = float64_loss(inputs, method), "float64"
    return Yardstick(expected, source, affordable, estimate_s)


def agrees(value: float, expected: float, rtol: float, utterances: int) -> bool:
    """|value - expected| <= rtol*|expected| + a tiny per-utterance atol; NaN never agrees."""
    atol = 1e-6 * utterances
    return math.isfinite(value) and abs(value - expected) <= rtol * abs(expected) + atol


@dataclass
class Checked:
    """A provider that passed the guard, with the times of its first calls."""

    provider: Provider
    loss_fn: LossFn
    first_forward_s: float
    first_backward_s: Optional[float] = None

    @property
    def first_call_s(self) -> float:
        return self.first_forward_s + (self.first_backward_s or 0.0)

    def compile_s(self, mode: str) -> Optional[float]:
        """A compiling provider's compile time for this mode (its first calls' time)."""
        if not self.provider.compiles:
            return None
        parts = {FORWARD: [self.first_forward_s], BACKWARD: [self.first_backward_s],
                 FWD_BWD: [self.first_forward_s, self.first_backward_s]}[mode]
        return None if None in parts else sum(parts)


def check(provider: Provider, method: str, inputs: Inputs, expected: Yardstick, rtol: float,
          with_backward: bool, device: torch.device) -> tuple[Optional[Checked], str]:
    """Builds the provider and makes its first forward (and backward) call, timed (for a
    compiling provider that is its compile). (Checked, "") if its loss agrees with the
    yardstick, else (None, what it gave); exceptions propagate."""
    log(f"  check {provider.name}" + (" (compiling)" if provider.compiles else ""))
    loss_fn = provider.build(method)
    inputs.clear_grads()
    start = time.perf_counter()
    loss = prepare_call(loss_fn, inputs, FORWARD)()
    synchronize(device)
    checked = Checked(provider, loss_fn, time.perf_counter() - start)
    value = float(loss.detach())
    n, m, _ = inputs.embeddings.shape
    if not agrees(value, expected.expected, rtol, n * m):
        verdict = f"loss {value:.6g} vs {expected.source} {expected.expected:.6g}"
        log(f"  {provider.name} is WRONG: {verdict}")
        return None, verdict
    if with_backward:
        start = time.perf_counter()
        loss.backward()
        synchronize(device)
        checked.first_backward_s = time.perf_counter() - start
    return checked, ""
