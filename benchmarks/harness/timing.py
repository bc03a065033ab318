"""Time and peak memory of prepared calls (a provider is a ``prepare()`` that does a call's
unmeasured part and returns the call), and how busy the machine was meanwhile."""

import gc
import os
import re
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch.utils.benchmark import Measurement, TaskSpec, Timer

Prepare = Callable[[], Callable[[], object]]
MIN_REPEATS = 3  # fewer samples make the percentiles meaningless
STMT, SETUP = "result = call()", "call = prepare()"  # the result is freed off the clock
# glibc: blocks from 64 KiB mapped (unmapped when freed), the heap trimmed: RSS follows the peak
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}

def cuda_event_s(call: Callable[[], object]) -> float:
    """Seconds of one call on the current CUDA stream, from a pair of CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = call()  # freed on return, after the clock stops
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3

def sample(name: str, prepare: Prepare, device: torch.device) -> Measurement:
    """CPU: Timer.timeit(1): prepare() off the clock, two warm-up calls, the timed one. CUDA:
    the same warm-up, then CUDA events around the call (its GPU time, no host clock)."""
    spec = dict(description=name, num_threads=torch.get_num_threads())
    if device.type != "cuda":
        return Timer(STMT, SETUP, globals={"prepare": prepare}, **spec).timeit(1)
    for _ in range(2):
        cuda_event_s(prepare())
    return Measurement(1, [cuda_event_s(prepare())], TaskSpec(STMT, SETUP, **spec))

def interleaved(prepares: Mapping[str, Prepare], device: torch.device, repeats: int,
                budget_s: float) -> tuple[dict[str, Measurement], dict[str, BaseException]]:
    """A Measurement per provider, and who raised. Each repeat samples every provider still in
    (MIN_REPEATS samples, or under budget_s seconds spent), starting one further on each time,
    so load that drifts hits them alike and none always runs right after the same other one."""
    samples, errors, spent = {name: [] for name in prepares}, {}, dict.fromkeys(prepares, 0.0)
    for repeat in range(repeats):
        active = [name for name in prepares if name not in errors and (
            len(samples[name]) < min(MIN_REPEATS, repeats) or spent[name] < budget_s)]
        for name in active[repeat % max(len(active), 1):] + active[:repeat % max(len(active), 1)]:
            started = time.perf_counter()  # the budget's clock, not a sample's
            try:
                samples[name].append(sample(name, prepares[name], device))
            except Exception as error:  # noqa: BLE001 (reported in the row)
                errors[name] = error
            spent[name] += time.perf_counter() - started
    return {name: Measurement.merge(taken)[0] for name, taken in samples.items() if taken}, errors

def summary_ms(measurement: Measurement) -> tuple[float, float, float, int]:
    """(median, 20th and 80th percentile) in ms, and the number of samples."""
    times = torch.tensor(measurement.times, dtype=torch.float64) * 1e3
    p20, p80 = times.quantile(torch.tensor([0.2, 0.8], dtype=torch.float64)).tolist()
    return measurement.median * 1e3, p20, p80, len(times)

def peak_bytes(call: Callable[[], object], device: torch.device) -> int:
    """Peak memory one prepared call adds. CUDA: growth of max_memory_allocated. CPU: VmHWM (reset
    by /proc/self/clear_refs) - VmRSS, in a new process with PROBE_ENV (runner.fresh_peak_bytes)"""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    kib = lambda key: int(re.search(rf"{key}:\s*(\d+)", Path("/proc/self/status").read_text())[1])
    before = kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    result = call()  # freed on return, after the peak is read
    return max(kib("VmHWM") - before, 0) * 1024

def cpu_times() -> Optional[tuple[float, float, float]]:
    """(busy CPU s of the whole machine, this process's CPU s, wall s); None without /proc/stat."""
    if not Path("/proc/stat").exists():
        return None
    ticks = [int(v) for v in Path("/proc/stat").read_text().split()[1:11]]  # the "cpu" line
    return ((sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"),  # but idle, iowait
            sum(os.times()[:2]), time.perf_counter())

def others_share(start, end, cpus: Optional[int] = None) -> Optional[float]:
    """The share of all CPUs' time other processes used between two cpu_times()."""
    if start is None or end is None or end[2] <= start[2]:
        return None
    busy, own, wall = (b - a for a, b in zip(start, end))
    return min(max((busy - own) / (wall * (cpus or os.cpu_count() or 1)), 0.0), 1.0)
