"""Sizes, modes, statuses, progress lines, and the providers with their inputs and the floor."""

import argparse
import math
import re
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from ge2e_ext import ge2e_loss
from ge2e_ext.reference import ge2e_loss_reference

FORWARD, BACKWARD, FWD_BWD = MODES = ("forward", "backward", "forward+backward")
MODE_ALIASES = {"fwd": FORWARD, "bwd": BACKWARD, "fwd+bwd": FWD_BWD}
STATUS_OK, STATUS_WRONG, STATUS_ERROR = "ok", "wrong", "error"
STATUS_TOO_SLOW, STATUS_NO_KERNEL = "skipped (too slow)", "skipped (no kernel)"
INIT_W, INIT_B, MIB = 10.0, -5.0, 2 ** 20  # w and b: the original code's and GE2ELoss's
BASELINE, FLOOR = "ge2e_ext", "floor"  # speed-ups are against the baseline; the floor: no loss
FLOOR_NOTE = "3 float32 matrix products, not a loss"
_STARTED = time.perf_counter()

def log(message: str) -> None:
    """Progress goes to stderr (stdout holds only the table), stamped with seconds since start."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)

def format_number(value: Optional[float]) -> str:
    """About three significant digits without exponents: 612, 61.2, 6.12, 0.612."""
    if value is None or not math.isfinite(value):
        return "-"
    size = abs(value)
    return f"{value:.{0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3}f}"

def error_status(error: BaseException) -> tuple[str, str]:  # of a provider that raised
    return STATUS_ERROR, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"

class Size(NamedTuple):
    """One batch shape: N speakers x M utterances x D embedding features."""
    n: int
    m: int
    d: int

    @property
    def label(self) -> str:
        return f"{self.n}x{self.m}x{self.d}"

PAPER_SIZE = Size(64, 10, 256)
N_SWEEP = [Size(n, 10, 256) for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)]
SIZE_PRESETS = {"paper": [PAPER_SIZE], "n": N_SWEEP, "sweep": N_SWEEP + [
    Size(64, m, 256) for m in (2, 5, 10, 20)] + [Size(64, 10, 64 << i) for i in range(5)]}
SIZE_HELP = ("comma list of NxMxD sizes (e.g. 64x10x256,1024x10x512) and of 'paper' (64x10x256), "
             "'n' (N=8,16,..,4096 at M=10 D=256), 'sweep' (n, M=2..20 and D=64..1024 at N=64)")

class SizeError(ValueError, argparse.ArgumentTypeError):  # argparse prints its message as is
    pass

def parse_sizes(text: str) -> list[Size]:
    """'64x10x256,n' and the like to a list of sizes, duplicates dropped."""
    sizes: list[Size] = []
    for item in filter(None, (part.strip().lower() for part in text.split(","))):
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", item)
        size = Size(*map(int, match.groups())) if match else None
        if item in SIZE_PRESETS or (size and size.n >= 2 and size.m >= 2 and size.d >= 1):
            sizes += SIZE_PRESETS.get(item, [size])
        else:
            raise SizeError(f"size {item!r}: expected NxMxD with N, M >= 2 and D >= 1 (e.g. "
                             f"64x10x256) or one of {', '.join(SIZE_PRESETS)}")
    if not sizes:
        raise SizeError("no sizes given")
    return list(dict.fromkeys(sizes))

def _compiled(method: str) -> Callable:
    # From scratch: compile_s is a new shape's cost, and no recompile limit (then eager) is hit.
    torch._dynamo.reset()
    return torch.compile(lambda x, w, b: ge2e_loss(x, w, b, method, backend="torch"))

# name -> build(loss_method) -> loss_fn(embeddings, w, b), the summed loss
BUILDERS: dict[str, Callable[[str], Callable]] = {
    "reference": lambda method: lambda x, w, b: ge2e_loss_reference(x, w, b, method).sum(),
    "eager": lambda method: lambda x, w, b: ge2e_loss(x, w, b, method, backend="torch"),
    "compiled": _compiled,
    BASELINE: lambda method: lambda x, w, b: ge2e_loss(x, w, b, method, backend="extension")}
PROVIDERS = (*BUILDERS, FLOOR)

def make_inputs(size: Size, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(embeddings, w, b): float32 leaves requiring grad, the same on every device."""
    x = torch.randn(*size, generator=torch.Generator().manual_seed(seed))
    return tuple(t.to(device).requires_grad_(True)
                 for t in (x, torch.tensor(INIT_W), torch.tensor(INIT_B)))

def prepare_call(loss_fn: Callable, inputs: Sequence[torch.Tensor], mode: str) -> Callable:
    """Does the unmeasured part of one call (grads set to None, so each call allocates and
    writes them afresh; in "backward" the graph built) and returns the part to measure."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    for tensor in inputs:
        tensor.grad = None
    if mode == FORWARD:
        return lambda: loss_fn(*inputs)
    graphs = [loss_fn(*inputs)] if mode == BACKWARD else []
    # In "backward" a second call, a warm-up (Timer makes two after one setup), needs a graph.
    return lambda: (graphs.pop() if graphs else loss_fn(*inputs)).backward()

class MatrixProducts(NamedTuple):
    """A call that computes out = a @ b by torch.mm for each (name, a, b, out)."""
    operands: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]

    def __call__(self) -> None:
        for _, a, b, out in self.operands:
            torch.mm(a, b, out=out)

def matrix_products(size: Size, device: torch.device,
                    names: Sequence[str] = ("E S^T", "H S", "H^T E")) -> MatrixProducts:
    """The floor, float32 on randn data into preallocated outputs: with E the embeddings as
    (N*M, D), S the (N, D) speaker sums and H an (N*M, N) matrix (the similarities' gradient),
    E @ S.T (the forward's), H @ S and H.T @ E (the backward's); ``names`` picks some."""
    g = torch.Generator().manual_seed(1)
    e, s, h = (torch.randn(*shape, generator=g).to(device) for shape in
               ((size.n * size.m, size.d), (size.n, size.d), (size.n * size.m, size.n)))
    pairs = {"E S^T": (e, s.t()), "H S": (h, s), "H^T E": (h.t(), e)}
    return MatrixProducts([(name, *pairs[name], torch.empty(
        len(pairs[name][0]), pairs[name][1].shape[1], device=device)) for name in names])
