"""Time of one call, and repeats in which the providers take turns (round robin).

CPU times come from timeit.default_timer (time.perf_counter), CUDA times from a
pair of torch.cuda.Event around the call after a synchronize. The repeats are
not torch.utils.benchmark.Timer's: its timeit(n) makes max(n // 100, 2) unmeasured
calls before every measurement and blocked_autorange times one statement in a
block, so neither gives single samples that alternate between providers (and for
the loop reference, 0.6 s a call, the extra calls would triple the run).
"""

from __future__ import annotations

import os
import statistics
import time
import timeit
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

MIN_REPEATS = 3  # fewer samples make the percentiles meaningless


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call_ms(call: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call; its result is freed only after the clock stops."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        result = call()
        end.record()
        end.synchronize()
        del result
        return start.elapsed_time(end)
    start_s = timeit.default_timer()
    result = call()
    elapsed = timeit.default_timer() - start_s
    del result
    return elapsed * 1e3


def median_ms(call: Callable[[], object], device: torch.device, repeats: int = 50,
              warmup: int = 10) -> float:
    """Median of one call repeated on its own (for the GPU floors, which interleave nothing)."""
    for _ in range(warmup):
        call()
    return statistics.median(time_call_ms(call, device) for _ in range(repeats))


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


def stats(samples: Sequence[float]) -> Optional[Stats]:
    """Median and 20th/80th percentiles (linear interpolation between samples)."""
    if not samples:
        return None
    if len(samples) == 1:
        return Stats(samples[0], samples[0], samples[0], 1)
    cuts = statistics.quantiles(samples, n=5, method="inclusive")
    return Stats(statistics.median(samples), cuts[0], cuts[3], len(samples))


Prepare = Callable[[str], Callable[[], object]]  # mode -> the call to measure


def interleaved_samples(prepares: Mapping[str, Prepare], mode: str, device: torch.device,
                        repeats: int, budget_s: float, warmup: int = 0,
                        first_call_s: Optional[Mapping[str, float]] = None,
                        ) -> tuple[dict[str, list[float]], dict[str, BaseException]]:
    """Samples (ms) per provider, taking turns within every repeat, and who raised.

    Warm-up: up to ``warmup`` unmeasured calls each, none for a provider whose first
    (checked) call took over a quarter of the budget. Then each repeat times every
    provider once, starting one provider further along the rotation each time, so
    no provider always runs right after the same other one and load that drifts
    during the run hits all of them alike. A provider leaves the rotation once it
    has MIN_REPEATS samples and has spent budget_s seconds (set-up included), or
    when it raises.
    """
    errors: dict[str, BaseException] = {}
    for name, prepare in prepares.items():
        if (first_call_s or {}).get(name, 0.0) > budget_s / 4:
            continue
        started = time.perf_counter()
        try:
            for _ in range(warmup):
                time_call_ms(prepare(mode), device)
                if time.perf_counter() - started > budget_s / 4:
                    break
        except Exception as error:  # noqa: BLE001 (reported in the row)
            errors[name] = error
    samples: dict[str, list[float]] = {name: [] for name in prepares}
    spent = dict.fromkeys(prepares, 0.0)
    least = min(MIN_REPEATS, repeats)
    for repeat in range(repeats):
        active = [name for name in prepares if name not in errors
                  and (len(samples[name]) < least or spent[name] < budget_s)]
        if not active:
            break
        shift = repeat % len(active)
        for name in active[shift:] + active[:shift]:
            started = time.perf_counter()
            try:
                samples[name].append(time_call_ms(prepares[name](mode), device))
            except Exception as error:  # noqa: BLE001 (reported in the row)
                errors[name] = error
            spent[name] += time.perf_counter() - started
    return samples, errors


class CompetingCpuMeter:
    """How much CPU time processes other than this one used over a stretch.

    From /proc/stat (all CPUs' busy and steal time) minus this process's own CPU
    time, as a share of all CPUs' capacity; None where /proc/stat is missing.
    """

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: busy is all but idle/iowait.
        busy_ticks = sum(fields) - fields[3] - fields[4]
        own = os.times()
        return (busy_ticks / os.sysconf("SC_CLK_TCK"), own.user + own.system,
                time.perf_counter())

    def others_share(self) -> Optional[float]:
        end = self._sample()
        if self._start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        capacity = wall * (os.cpu_count() or 1)
        return min(max((busy - own) / capacity, 0.0), 1.0) if capacity > 0 else None
