"""What every part of the harness shares: sizes, modes, statuses, progress lines, numbers."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Optional

FORWARD, BACKWARD, FWD_BWD = "forward", "backward", "forward+backward"
MODES = (FORWARD, BACKWARD, FWD_BWD)
MODE_ALIASES = {"fwd": FORWARD, "bwd": BACKWARD, "fwd+bwd": FWD_BWD}
MIB = 2 ** 20

STATUS_OK = "ok"
STATUS_WRONG = "wrong"
STATUS_ERROR = "error"
STATUS_TOO_SLOW = "skipped (too slow)"
STATUS_NO_KERNEL = "skipped (no kernel)"
STATUS_OOM = "skipped (out of memory)"
FAILING_STATUSES = (STATUS_WRONG, STATUS_ERROR)

_STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress goes to stderr (stdout holds only the table), stamped with seconds since start."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def unique(items: Iterable) -> list:
    """The items in their first order, duplicates dropped."""
    return list(dict.fromkeys(items))


def format_number(value: Optional[float]) -> str:
    """About three significant digits without exponents: 612, 61.2, 6.12, 0.612."""
    if value is None or not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    decimals = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3
    return f"{value:.{decimals}f}"


def error_status(error: BaseException) -> tuple[str, str]:
    """(status, note) for a provider that raised."""
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return STATUS_OOM, "out of memory"
    first_line = (str(error).splitlines() or [""])[0]
    return STATUS_ERROR, f"{type(error).__name__}: {first_line}"


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True, order=True)
class Size:
    """One batch shape: N speakers x M utterances x D embedding features."""

    n: int
    m: int
    d: int

    @property
    def label(self) -> str:
        return f"{self.n}x{self.m}x{self.d}"

    @property
    def utterance_pairs(self) -> int:
        """N*N*M: how many utterance-centroid similarities there are (the reference's cost)."""
        return self.n * self.n * self.m


PAPER_SIZE = Size(64, 10, 256)
N_SWEEP = [Size(n, 10, 256) for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)]
# Named lists --sizes accepts besides NxMxD.
SIZE_PRESETS = {
    "paper": [PAPER_SIZE],
    "n": N_SWEEP,
    "sweep": N_SWEEP + [Size(64, m, 256) for m in (2, 5, 10, 20)]
    + [Size(64, 10, d) for d in (64, 128, 256, 512, 1024)],
}
SIZE_HELP = ("comma list of NxMxD sizes (e.g. 64x10x256,1024x10x512) and of the names "
             "'paper' (64x10x256), 'n' (N=8,16,..,4096 at M=10 D=256) and 'sweep' (n, then "
             "M=2,5,10,20 and D=64..1024 at N=64)")


def parse_sizes(text: str) -> list[Size]:
    """'64x10x256,n' and the like to a list of sizes, duplicates dropped."""
    sizes: list[Size] = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        if item in SIZE_PRESETS:
            sizes += SIZE_PRESETS[item]
            continue
        parts = item.split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"size {item!r} is not NxMxD (e.g. 64x10x256) or one of "
                             f"{', '.join(SIZE_PRESETS)}")
        n, m, d = (int(p) for p in parts)
        if n < 2 or m < 2 or d < 1:
            raise ValueError(f"size {item!r}: GE2E needs N >= 2, M >= 2 and D >= 1")
        sizes.append(Size(n, m, d))
    if not sizes:
        raise ValueError("no sizes given")
    return unique(sizes)
