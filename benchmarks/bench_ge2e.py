#!/usr/bin/env python
"""Benchmark the GE2E loss: ge2e_ext against the code it replaces, in time and memory.

    python benchmarks/bench_ge2e.py              # paper size N=64 M=10 D=256, all modes
    python benchmarks/bench_ge2e.py --quick      # fewer repeats: about a minute on 2 CPU cores
    python benchmarks/bench_ge2e.py --sizes sweep --device cuda

Providers (ways to compute the loss), all fed the same float32 inputs: embeddings
(N speakers, M utterances, D) requiring grad, w=10 and b=-5 as 0-dim tensors
requiring grad:
  reference  the original per-utterance Python loops (ge2e_ext.reference); skipped,
             as "skipped (too slow)", where one forward+backward call is estimated
             (a measured N=16 call scaled by N*N*M) to exceed --reference-limit-s
  eager      ge2e_loss(..., backend="torch"), the vectorized pure-PyTorch path
  compiled   torch.compile of the eager path; the first call's time is reported
             separately as compile_s (forward and backward compile lazily, so the
             fwd+bwd row adds both); every size/method compiles from scratch, but
             the first compile in a process also pays torch.compile's start-up and
             later runs reuse its on-disk caches, so compile_s varies run to run
  ge2e_ext   ge2e_loss(..., backend="extension"), the compiled C++/CUDA op; skipped
             where this install has no kernel for the device

Modes: "forward" (the loss with its autograd graph, as in training), "backward"
(graph built outside the measured region, only loss.backward() measured) and
"forward+backward". Gradients are set to None before every call so each call
allocates and writes them afresh (no accumulation cost that varies by repeat).

Correctness guard: before anything is timed, each provider's loss value is compared
with the reference (or, where the reference is skipped, with the eager path in
float64) at rtol 1e-4; a provider that disagrees is reported "wrong", is not
timed, and makes the exit code 1.

Timing: warm-up calls, then repeats in which the providers take turns
(round-robin, each repeat starting one provider further on), so every provider is
measured in the same process over the same stretch of time: load that drifts
during the run hits all of them in the same repeats instead of skewing a ratio
(contention that slows some kinds of work more than others still can, so prefer
an idle machine; the report says how much CPU time other processes took while
timing and flags a busy machine). A provider stops repeating once it has spent
--budget-s seconds (after at least 3 repeats).
Reported: median and 20th/80th percentiles in ms; the speed-up of ge2e_ext over a
provider is the ratio of the two medians. CPU times come from time.perf_counter,
CUDA times from torch.cuda.Event pairs (after a synchronize).

Memory: the peak memory one call adds over what was live just before it (inputs,
and in "backward" mode the graph).
  CUDA  torch.cuda.reset_peak_memory_stats(), then max_memory_allocated() minus
        memory_allocated() before the call.
  CPU   every (provider, size, method, mode) runs in a fresh subprocess that builds
        the inputs, warms up once, collects garbage, reads VmRSS from
        /proc/self/status, writes "5" to /proc/self/clear_refs (which resets the
        peak VmHWM to the current RSS), makes the call and reads VmHWM; the peak is
        VmHWM - VmRSS. The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 and
        MALLOC_TRIM_THRESHOLD_=131072, so glibc gives freed tensors back to the
        OS and the warm-up's freed memory cannot hide the call's own peak. Where
        clear_refs is not writable the peak comes from ru_maxrss (only when the
        call set a new lifetime maximum; otherwise n/a). MB means 2**20 bytes.

Output: progress on stderr, a table on stdout, and under --output DIR a CSV of
every row and a PNG (time and peak memory of forward+backward against N on
log-log axes when several N are run, else a bar chart per provider). Exit code:
0, or 1 when a provider is "wrong" or fails with an error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

# A checkout that was built in place but not pip-installed still imports.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.append(str(_REPO_ROOT))

import ge2e_ext  # noqa: E402
from ge2e_ext import _torch_impl, extension_devices, ge2e_loss  # noqa: E402
from ge2e_ext.reference import ge2e_loss_reference  # noqa: E402

LOSS_METHODS = ("softmax", "contrast")
MODES = ("forward", "backward", "forward+backward")
MODE_ALIASES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}
BUILTIN_PROVIDERS = ("reference", "eager", "compiled", "ge2e_ext")
BASELINE = "ge2e_ext"  # speed-ups are this provider's against each other one
PLOT_MODE = "forward+backward"  # what a training step costs; the one mode plotted
INIT_W, INIT_B = 10.0, -5.0
MIN_COSINE = 1e-6  # the cosine clamp of ge2e_loss's and the reference's defaults
YARDSTICK_BLOCK = 256  # speakers per block of the float64 yardstick
MIN_REPEATS = 3  # fewer samples make the percentiles meaningless
MIB = 2 ** 20

STATUS_OK = "ok"
STATUS_WRONG = "wrong"
STATUS_ERROR = "error"
STATUS_TOO_SLOW = "skipped (too slow)"
STATUS_NO_KERNEL = "skipped (no kernel)"
STATUS_OOM = "skipped (out of memory)"
FAILING_STATUSES = (STATUS_WRONG, STATUS_ERROR)

# Reference cost is calibrated on this size's speakers/utterances and scaled by N*N*M.
CALIBRATION_N, CALIBRATION_M = 16, 10
# glibc settings for the CPU memory probe (see the module docstring).
PROBE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
PROBE_TIMEOUT_S = 600
# Rough peak of the eager path per utterance-centroid pair (it keeps ~8 float32 N*M*N
# tensors alive), used to keep memory-hungry probes from running side by side.
EAGER_BYTES_PER_PAIR = 32
_STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress goes to stderr (stdout holds only the table), stamped with seconds since start."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


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


def sweep_sizes() -> list[Size]:
    """N from 8 to 4096 at the paper's M and D, then M and then D around the paper size."""
    sizes = [Size(n, 10, 256) for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)]
    sizes += [Size(64, m, 256) for m in (2, 5, 10, 20)]
    sizes += [Size(64, 10, d) for d in (64, 128, 256, 512, 1024)]
    return _unique(sizes)


def parse_sizes(text: str) -> list[Size]:
    """'64x10x256,256x10x256' or 'sweep' (or a mix) to a list of sizes, duplicates dropped."""
    sizes: list[Size] = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        if item == "sweep":
            sizes += sweep_sizes()
            continue
        if item == "paper":
            sizes.append(PAPER_SIZE)
            continue
        parts = item.split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"size {item!r} is not NxMxD (e.g. 64x10x256) or 'sweep'")
        n, m, d = (int(p) for p in parts)
        if n < 2 or m < 2 or d < 1:
            raise ValueError(f"size {item!r}: GE2E needs N >= 2, M >= 2 and D >= 1")
        sizes.append(Size(n, m, d))
    if not sizes:
        raise ValueError("no sizes given")
    return _unique(sizes)


def _unique(items):
    return list(dict.fromkeys(items))


# ----------------------------------------------------------------------- providers

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    """One way of computing the summed GE2E loss; ``build(method)`` gives loss_fn(x, w, b)."""

    name: str
    build: Callable[[str], LossFn]
    compiles: bool = False  # its first call compiles: reported as compile_s, not timed
    needs_extension: bool = False  # only where ge2e_ext has a kernel for the device
    # Built-ins can be rebuilt by name in the CPU memory subprocess; injected ones cannot.
    rebuildable: bool = True


def _build_reference(method: str) -> LossFn:
    return lambda x, w, b: ge2e_loss_reference(x, w, b, method).sum()


def _build_eager(method: str) -> LossFn:
    return lambda x, w, b: ge2e_loss(x, w, b, method, backend="torch")


def _build_compiled(method: str) -> LossFn:
    # A reset makes each (size, method) compile from scratch, so compile_s is what
    # a new shape costs, and many sizes never hit dynamo's recompile limit (which
    # would silently fall back to eager).
    torch._dynamo.reset()
    return torch.compile(_build_eager(method))


def _build_extension(method: str) -> LossFn:
    return lambda x, w, b: ge2e_loss(x, w, b, method, backend="extension")


BUILTINS = {
    "reference": Provider("reference", _build_reference),
    "eager": Provider("eager", _build_eager),
    "compiled": Provider("compiled", _build_compiled, compiles=True),
    "ge2e_ext": Provider("ge2e_ext", _build_extension, needs_extension=True),
}


def injected_provider(name: str, fn: Callable) -> Provider:
    """Wraps fn(embeddings, w, b, loss_method) -> scalar loss (tests inject broken ones)."""
    return Provider(name, lambda method: (lambda x, w, b: fn(x, w, b, method)),
                    rebuildable=False)


def select_providers(names: Optional[Sequence[str]],
                     extra: Optional[Mapping[str, Callable]]) -> list[Provider]:
    """The built-ins named (all when None), in their canonical order, then the injected ones."""
    names = BUILTIN_PROVIDERS if names is None else names
    unknown = [n for n in names if n not in BUILTINS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(BUILTIN_PROVIDERS)}")
    providers = [BUILTINS[n] for n in BUILTIN_PROVIDERS if n in names]
    for name, fn in (extra or {}).items():
        if name in BUILTINS:
            raise ValueError(f"injected provider {name!r} shadows a built-in one")
        providers.append(injected_provider(name, fn))
    if not providers:
        raise ValueError("no providers to benchmark")
    return providers


# ------------------------------------------------------------------ inputs, calls


@dataclass
class Inputs:
    """The tensors every provider is fed; identical values on every device (seeded on CPU)."""

    embeddings: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor

    @property
    def tensors(self):
        return self.embeddings, self.w, self.b

    def clear_grads(self) -> None:
        for tensor in self.tensors:
            tensor.grad = None


def make_inputs(size: Size, device: torch.device, dtype=torch.float32, seed: int = 0) -> Inputs:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(size.n, size.m, size.d, generator=generator, dtype=dtype)

    def leaf(tensor):
        return tensor.to(device).requires_grad_(True)

    return Inputs(leaf(embeddings), leaf(torch.tensor(INIT_W, dtype=dtype)),
                  leaf(torch.tensor(INIT_B, dtype=dtype)))


def prepare_call(loss_fn: LossFn, inputs: Inputs, mode: str) -> Callable[[], object]:
    """Does the unmeasured part of one call (grads cleared, graph for "backward") and
    returns the part to measure. Its result is kept alive by the caller until the
    measurement ends, so freeing the forward graph is never timed."""
    inputs.clear_grads()
    if mode == "forward":
        return lambda: loss_fn(*inputs.tensors)
    if mode == "backward":
        loss = loss_fn(*inputs.tensors)
        return loss.backward
    if mode == "forward+backward":
        return lambda: loss_fn(*inputs.tensors).backward()
    raise ValueError(f"unknown mode {mode!r}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Milliseconds of one call: perf_counter on CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def time_ms(self, call: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            return self._cuda_ms(call)
        start = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - start
        del result
        return elapsed * 1e3

    def _cuda_ms(self, call):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        result = call()
        end.record()
        end.synchronize()
        del result
        return start.elapsed_time(end)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error)


def failure_status(error: BaseException) -> tuple[str, str]:
    """(status, note) for a provider that raised."""
    if is_out_of_memory(error):
        return STATUS_OOM, "out of memory"
    first_line = (str(error).splitlines() or [""])[0]
    return STATUS_ERROR, f"{type(error).__name__}: {first_line}"


# -------------------------------------------------------------------------- results


@dataclass
class Row:
    """One CSV/table row: a provider's result for one size, loss method and mode."""

    device: str
    N: int
    M: int
    D: int
    loss_method: str
    mode: str
    provider: str
    status: str = STATUS_OK
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    repeats: int = 0
    peak_mem_mb: Optional[float] = None
    speedup_vs: Optional[float] = None  # this provider's median / ge2e_ext's median
    compile_s: Optional[float] = None
    note: str = ""

    @property
    def size(self) -> Size:
        return Size(self.N, self.M, self.D)

    @property
    def cell(self):
        """Rows of one cell are timed together and share a speed-up baseline."""
        return self.size, self.loss_method, self.mode


ENVIRONMENT_COLUMNS = ["device_name", "torch_version", "threads", "others_cpu_share"]
CSV_COLUMNS = [f.name for f in dataclasses.fields(Row)] + ENVIRONMENT_COLUMNS


@dataclass
class Environment:
    device: str
    device_name: str
    torch_version: str
    ge2e_ext_version: str
    threads: int
    # Share of all CPUs' time that other processes (or the hypervisor) took while
    # the timings ran: a busy machine disturbs timings, so the report says so.
    others_cpu_share: Optional[float] = None


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_environment(device: torch.device) -> Environment:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()
    return Environment(device.type, name, torch.__version__, ge2e_ext.__version__,
                       torch.get_num_threads())


class CompetingCpuMeter:
    """Measures how much CPU time processes other than this one used over a stretch.

    From /proc/stat (all CPUs' busy and steal time) minus this process's own CPU
    time; None where /proc/stat is missing.
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


@dataclass
class BenchConfig:
    """Everything a run needs; the CLI fills it, tests build it directly."""

    device: str = "auto"
    sizes: Sequence[Size] = (PAPER_SIZE,)
    methods: Sequence[str] = LOSS_METHODS
    modes: Sequence[str] = MODES
    providers: Optional[Sequence[str]] = None  # built-ins to run; None: all
    repeats: int = 30
    warmup: int = 3
    budget_s: float = 2.0  # seconds of repeats per provider per cell
    memory_modes: Sequence[str] = MODES  # () disables the memory probes
    reference_limit_s: float = 3.0  # skip the reference above this estimated fwd+bwd time
    rtol: float = 1e-4
    output_dir: Path = Path("bench_results")


@dataclass
class BenchResult:
    environment: Environment
    rows: list[Row] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(row.status in FAILING_STATUSES for row in self.rows)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch sees no CUDA device")
    return device


# ------------------------------------------------------------ reference cost guard


class ReferenceCostEstimator:
    """Predicts one reference forward+backward from a measured N=16 call scaled by N*N*M.

    The reference's Python loops make N*M stacks of N centroids, so its cost grows
    as N*N*M; measuring on the device itself covers CUDA's per-op launch cost.
    Overestimates by up to about 1.5x (fixed per-call costs are scaled too), which errs on
    the side of a benchmark that finishes.
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
        loss_fn = _build_reference("softmax")
        best = math.inf
        for _ in range(2):  # the first call pays one-time start-up costs
            start = time.perf_counter()
            prepare_call(loss_fn, inputs, "forward+backward")()
            synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        return best / size.utterance_pairs


# --------------------------------------------------------------- correctness guard


def float64_loss(inputs: Inputs, method: str) -> float:
    """The eager formula in float64, YARDSTICK_BLOCK speakers at a time: it holds
    block x M x N similarities, so even N=4096 needs about 100 MB, not gigabytes."""
    embeddings, w, b = (t.detach().double() for t in inputs.tensors)
    sums = embeddings.sum(1)
    total = 0.0
    for start in range(0, embeddings.shape[0], YARDSTICK_BLOCK):
        block = embeddings[start:start + YARDSTICK_BLOCK]
        total += float(_torch_impl.ge2e_rows(block, sums, w, b, start, method, MIN_COSINE).sum())
    return total


def expected_loss(inputs: Inputs, method: str, use_reference: bool) -> tuple[float, str]:
    """The value every provider must reproduce, and what it came from."""
    with torch.no_grad():
        if use_reference:
            return float(ge2e_loss_reference(*inputs.tensors, method).sum()), "reference"
        return float64_loss(inputs, method), "eager float64"


@dataclass(frozen=True)
class Yardstick:
    """What one (size, method)'s providers are checked against."""

    expected: float
    source: str  # "reference" or "eager float64"
    reference_affordable: bool
    reference_estimate_s: float


def agrees(value: float, expected: float, rtol: float, utterances: int) -> bool:
    """|value - expected| <= rtol*|expected| + a tiny per-utterance atol; NaN never agrees."""
    atol = 1e-6 * utterances
    return math.isfinite(value) and abs(value - expected) <= rtol * abs(expected) + atol


@dataclass
class ReadyProvider:
    """A provider that passed the guard, with its compile times (compiling providers only)."""

    provider: Provider
    loss_fn: LossFn
    first_forward_s: Optional[float] = None
    first_backward_s: Optional[float] = None

    @property
    def first_call_s(self) -> float:
        return (self.first_forward_s or 0.0) + (self.first_backward_s or 0.0)

    def compile_s(self, mode: str) -> Optional[float]:
        if not self.provider.compiles:
            return None
        parts = {"forward": [self.first_forward_s], "backward": [self.first_backward_s],
                 "forward+backward": [self.first_forward_s, self.first_backward_s]}[mode]
        return None if None in parts else sum(parts)


def first_forward(provider: Provider, method: str, inputs: Inputs, device: torch.device
                  ) -> tuple[ReadyProvider, torch.Tensor]:
    """Builds the provider and makes its first forward call, timed (for a compiling
    provider that time is its forward compile). Returns the loss for the guard."""
    loss_fn = provider.build(method)
    inputs.clear_grads()
    start = time.perf_counter()
    loss = loss_fn(*inputs.tensors)
    synchronize(device)
    return ReadyProvider(provider, loss_fn, first_forward_s=time.perf_counter() - start), loss


def first_backward(entry: ReadyProvider, loss: torch.Tensor, device: torch.device) -> None:
    """The first backward call, timed: a compiling provider compiles its backward lazily."""
    start = time.perf_counter()
    loss.backward()
    synchronize(device)
    entry.first_backward_s = time.perf_counter() - start


# -------------------------------------------------------------------------- timing


def warm_up(entry: ReadyProvider, inputs: Inputs, mode: str, timer: Timer, calls: int,
            budget_s: float) -> None:
    """Unmeasured calls before the repeats, up to ``calls``. The guard's first call has
    warmed every provider up once already; one whose first call took over a quarter
    of the budget gets no more (its warm-up effects are lost in its own run time)."""
    if entry.first_call_s > budget_s / 4:
        return
    start = time.perf_counter()
    for _ in range(calls):
        timer.time_ms(prepare_call(entry.loss_fn, inputs, mode))
        if time.perf_counter() - start > budget_s / 4:
            return


def measure_times(ready: Mapping[str, ReadyProvider], inputs: Inputs, mode: str,
                  timer: Timer, warmup: int, repeats: int, budget_s: float
                  ) -> tuple[dict[str, list[float]], dict[str, BaseException]]:
    """Samples (ms) per provider, taking turns within every repeat, and who raised.

    Each repeat times every provider once, starting one provider further along the
    rotation each time, so no provider always runs right after the same other one.
    A provider leaves the rotation once it has MIN_REPEATS samples and has spent
    budget_s seconds (set-up included), or when it raises.
    """
    errors: dict[str, BaseException] = {}
    for name, entry in ready.items():
        try:
            warm_up(entry, inputs, mode, timer, warmup, budget_s)
        except Exception as error:  # noqa: BLE001 (reported in the row)
            errors[name] = error
    samples = {name: [] for name in ready}
    spent = dict.fromkeys(ready, 0.0)
    min_repeats = min(MIN_REPEATS, repeats)
    for repeat in range(repeats):
        active = [name for name in ready if name not in errors
                  and (len(samples[name]) < min_repeats or spent[name] < budget_s)]
        if not active:
            break
        shift = repeat % len(active)
        for name in active[shift:] + active[:shift]:
            start = time.perf_counter()
            try:
                samples[name].append(timer.time_ms(prepare_call(ready[name].loss_fn, inputs, mode)))
            except Exception as error:  # noqa: BLE001 (reported in the row)
                errors[name] = error
            spent[name] += time.perf_counter() - start
    return samples, errors


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(row: Row, samples: Sequence[float]) -> None:
    row.repeats = len(samples)
    if samples:
        row.median_ms = statistics.median(samples)
        row.p20_ms = percentile(samples, 20)
        row.p80_ms = percentile(samples, 80)


# -------------------------------------------------------------------------- memory


def cuda_peak_bytes(loss_fn: LossFn, inputs: Inputs, mode: str, device: torch.device) -> int:
    """Peak CUDA memory one call allocates beyond what was allocated before it."""
    call = prepare_call(loss_fn, inputs, mode)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def cpu_peak_bytes(loss_fn: LossFn, inputs: Inputs, mode: str) -> tuple[Optional[int], str]:
    """Peak RSS one call adds over the RSS before it (run in a fresh process, see docstring)."""
    call = prepare_call(loss_fn, inputs, mode)
    gc.collect()
    try:
        rss_before = _proc_status_bytes("VmRSS")
    except (OSError, KeyError):
        return None, "n/a (no /proc/self/status)"
    if _reset_peak_rss():
        result = call()
        peak = _proc_status_bytes("VmHWM") - rss_before
        del result
        return max(peak, 0), "VmHWM"
    import resource  # Unix only, hence here

    max_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = call()
    max_rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    if max_rss_after <= max_rss_before:
        return None, "n/a (call peak hidden by an earlier one; clear_refs not writable)"
    return max(max_rss_after * 1024 - rss_before, 0), "ru_maxrss"


@dataclass(frozen=True)
class ProbeJob:
    """One CPU memory measurement, run by a fresh interpreter of this script."""

    provider: str
    size: Size
    loss_method: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.size.label} {self.loss_method} {self.mode} {self.provider}"

    def to_json(self) -> str:
        return json.dumps({"provider": self.provider, "n": self.size.n, "m": self.size.m,
                           "d": self.size.d, "loss_method": self.loss_method, "mode": self.mode})

    @classmethod
    def from_json(cls, text: str) -> "ProbeJob":
        spec = json.loads(text)
        return cls(spec["provider"], Size(spec["n"], spec["m"], spec["d"]),
                   spec["loss_method"], spec["mode"])


def run_memory_probe(job: ProbeJob) -> dict:
    """Body of the subprocess: build, warm up once, measure one call."""
    provider = BUILTINS[job.provider]
    inputs = make_inputs(job.size, torch.device("cpu"))
    loss_fn = provider.build(job.loss_method)
    prepare_call(loss_fn, inputs, job.mode)()  # warm-up (and compile)
    peak, how = cpu_peak_bytes(loss_fn, inputs, job.mode)
    return {"peak_bytes": peak, "how": how}


def spawn_memory_probe(job: ProbeJob) -> tuple[Optional[int], str]:
    """Runs one probe in a fresh interpreter; (peak bytes or None, note)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_memory-probe", job.to_json(),
               "--threads", str(torch.get_num_threads())]
    env = {**os.environ, **PROBE_MALLOC_ENV}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, "memory probe timed out"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last_error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"memory probe failed: {last_error}"
    answer = json.loads(lines[-1])
    return answer["peak_bytes"], ("" if answer["how"] == "VmHWM" else answer["how"])


def run_cpu_memory_probes(jobs: Sequence[ProbeJob], rows: Mapping[ProbeJob, Row]) -> None:
    """Runs the probes after all timing (so they cannot disturb it): small ones two at a
    time, ones that may need gigabytes (eager at large N) one at a time."""
    small = [job for job in jobs if job.size.utterance_pairs * EAGER_BYTES_PER_PAIR < 2 ** 30]
    large = [job for job in jobs if job not in small]
    workers = max(1, min(2, os.cpu_count() or 1))
    done = 0
    for batch, batch_workers in ((small, workers), (large, 1)):
        with concurrent.futures.ThreadPoolExecutor(batch_workers) as pool:
            futures = {pool.submit(spawn_memory_probe, job): job for job in batch}
            for future in concurrent.futures.as_completed(futures):
                job = futures[future]
                record_probe(rows[job], *future.result())
                done += 1
                log(f"  memory {done}/{len(jobs)}: {job.label}: "
                    f"{format_number(rows[job].peak_mem_mb)} MB")


def record_probe(row: Row, peak: Optional[int], note: str) -> None:
    row.peak_mem_mb = None if peak is None else peak / MIB
    if note:
        row.note = "; ".join(filter(None, [row.note, note]))


# --------------------------------------------------------------------- the driver


class Benchmark:
    """Runs every (size, loss method): guard, then timing per mode, then memory."""

    def __init__(self, config: BenchConfig, extra_providers=None):
        self.config = config
        self.device = resolve_device(config.device)
        self.providers = select_providers(config.providers, extra_providers)
        self.timer = Timer(self.device)
        self.reference_cost = ReferenceCostEstimator(self.device)
        self.environment = describe_environment(self.device)
        self.probe_rows: dict[ProbeJob, Row] = {}

    def run(self) -> BenchResult:
        result = BenchResult(self.environment)
        env = self.environment
        log(f"GE2E benchmark on {env.device} ({env.device_name}), {env.threads} threads; "
            f"providers: {', '.join(p.name for p in self.providers)}")
        competition = CompetingCpuMeter()
        for size in self.config.sizes:
            inputs = make_inputs(size, self.device)
            for method in self.config.methods:
                result.rows += self.run_cell_group(size, method, inputs)
        env.others_cpu_share = competition.others_share()
        if self.probe_rows:
            log(f"memory: {len(self.probe_rows)} probes, each in a fresh process")
            run_cpu_memory_probes(list(self.probe_rows), self.probe_rows)
        fill_speedups(result.rows)
        return result

    def yardstick(self, size: Size, method: str, inputs: Inputs) -> Yardstick:
        """The reference's loss where it is affordable, else float64 eager's."""
        estimate = self.reference_cost.seconds(size)
        affordable = estimate <= self.config.reference_limit_s
        expected, source = expected_loss(inputs, method, affordable)
        log(f"{size.label} {method}: expected loss {expected:.6g} (from {source}); "
            f"reference fwd+bwd estimated {format_number(estimate)} s")
        return Yardstick(expected, source, affordable, estimate)

    def run_cell_group(self, size: Size, method: str, inputs: Inputs) -> list[Row]:
        """All modes of one (size, method): the guard once, then each mode's timing."""
        yardstick = self.yardstick(size, method, inputs)
        verdicts = {}  # provider name -> (status, note) for those not timed
        ready: dict[str, ReadyProvider] = {}
        for provider in self.providers:
            verdict, entry = self.guard(provider, size, method, inputs, yardstick)
            if entry is not None:
                ready[provider.name] = entry
            else:
                verdicts[provider.name] = verdict
        rows = []
        for mode in self.config.modes:
            rows += self.run_mode(size, method, mode, inputs, ready, verdicts)
        return rows

    def guard(self, provider: Provider, size: Size, method: str, inputs: Inputs,
              yardstick: Yardstick):
        """((status, note), None) for a provider that is not timed, else (None, ready).

        The first call of a provider that passes also warms it up (and compiles it)."""
        if provider.needs_extension and self.device.type not in extension_devices():
            return (STATUS_NO_KERNEL,
                    f"ge2e_ext has no {self.device.type} kernel in this build"), None
        if provider.name == "reference" and not yardstick.reference_affordable:
            return (STATUS_TOO_SLOW, f"estimated {format_number(yardstick.reference_estimate_s)}"
                                     " s per fwd+bwd call"), None
        log(f"  check {provider.name}" + (" (compiling)" if provider.compiles else ""))
        try:
            entry, loss = first_forward(provider, method, inputs, self.device)
            value = float(loss.detach())
            if not agrees(value, yardstick.expected, self.config.rtol, size.n * size.m):
                verdict = f"loss {value:.6g} vs {yardstick.source} {yardstick.expected:.6g}"
                log(f"  {provider.name} is WRONG: {verdict}")
                return (STATUS_WRONG, verdict), None
            if any(mode != "forward" for mode in self.config.modes):
                first_backward(entry, loss, self.device)
        except Exception as error:  # noqa: BLE001 (reported in the row)
            return failure_status(error), None
        return None, entry

    def run_mode(self, size, method, mode, inputs, ready, verdicts) -> list[Row]:
        config = self.config
        log(f"  time {size.label} {method} {mode}: {', '.join(ready) or 'nothing to time'}")
        samples, errors = measure_times(ready, inputs, mode, self.timer, config.warmup,
                                        config.repeats, config.budget_s)
        rows = []
        for provider in self.providers:
            row = Row(self.device.type, size.n, size.m, size.d, method, mode, provider.name)
            rows.append(row)
            if provider.name in verdicts:
                row.status, row.note = verdicts[provider.name]
                continue
            if provider.name in errors:
                row.status, row.note = failure_status(errors[provider.name])
                continue
            summarize(row, samples[provider.name])
            row.compile_s = ready[provider.name].compile_s(mode)
            if mode in config.memory_modes:
                self.measure_memory(row, ready[provider.name], inputs)
        return rows

    def measure_memory(self, row: Row, entry: ReadyProvider, inputs: Inputs) -> None:
        """CUDA: now, in process. CPU: queued for a fresh subprocess after all timing."""
        if self.device.type == "cuda":
            try:
                row.peak_mem_mb = cuda_peak_bytes(entry.loss_fn, inputs, row.mode,
                                                  self.device) / MIB
            except Exception as error:  # noqa: BLE001 (reported in the row)
                row.note = f"memory n/a ({failure_status(error)[1]})"
        elif entry.provider.rebuildable:
            self.probe_rows[ProbeJob(row.provider, row.size, row.loss_method, row.mode)] = row
        else:
            row.note = "memory n/a (injected provider)"


def fill_speedups(rows: Sequence[Row]) -> None:
    """speedup_vs = provider median / ge2e_ext median, within each timed cell."""
    baseline = {row.cell: row.median_ms for row in rows
                if row.provider == BASELINE and row.status == STATUS_OK and row.median_ms}
    for row in rows:
        if row.status == STATUS_OK and row.median_ms is not None and row.cell in baseline:
            row.speedup_vs = row.median_ms / baseline[row.cell]


def run_benchmark(config: BenchConfig, extra_providers: Optional[Mapping[str, Callable]] = None
                  ) -> BenchResult:
    """Runs the benchmark described by config; extra_providers maps a name to
    fn(embeddings, w, b, loss_method) -> summed loss, benchmarked next to the built-ins."""
    return Benchmark(config, extra_providers).run()


# --------------------------------------------------------------------------- report


def format_number(value: Optional[float]) -> str:
    """About three significant digits without exponents: 612, 61.2, 6.12, 0.612."""
    if value is None or not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    decimals = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3
    return f"{value:.{decimals}f}"


def speed_relation(speedup: float) -> str:
    """'2.64x faster' for ge2e_ext's speed-up, or '1.10x slower' when it is below 1."""
    if speedup >= 1:
        return f"{format_number(speedup)}x faster"
    return f"{format_number(1 / speedup)}x slower"


def memory_relation(ratio: float) -> str:
    """ratio = provider peak / ge2e_ext peak, worded from ge2e_ext's side."""
    if ratio >= 1:
        return f"{format_number(ratio)}x less memory"
    return f"{format_number(1 / ratio)}x more memory"


BUSY_MACHINE_SHARE = 0.10  # other processes' CPU share above which timings are suspect


def competition_note(env: Environment) -> str:
    """How much of the machine other processes used while timing, flagged when too much."""
    if env.others_cpu_share is None:
        return "machine: n/a (no /proc/stat to tell whether other processes competed)"
    note = f"machine: other processes used {env.others_cpu_share:.0%} of the CPUs while timing"
    if env.others_cpu_share > BUSY_MACHINE_SHARE:
        note += " (BUSY MACHINE: timings and ratios may be distorted; rerun when idle)"
    return note


def environment_lines(env: Environment) -> list[str]:
    kind = "GPU" if env.device == "cuda" else "CPU"
    memory = ("growth of max_memory_allocated" if env.device == "cuda"
              else "growth of VmHWM over VmRSS, fresh process")
    return [
        f"GE2E loss benchmark: device {env.device}, {kind} {env.device_name}, "
        f"{env.threads} threads",
        f"torch {env.torch_version}, ge2e_ext {env.ge2e_ext_version}, python "
        f"{platform.python_version()}; float32 inputs, w={INIT_W:g}, b={INIT_B:g}",
        "time: median and p20-p80 (ms) of repeats interleaved across providers",
        f"peak MB: memory one call adds ({memory})",
        f"speed-up: provider median / {BASELINE} median (above 1: {BASELINE} is faster)",
        competition_note(env),
    ]


TABLE_HEADER = ("provider", "median ms", "p20-p80 ms", "runs", "peak MB", "speed-up", "status")


def row_cells(row: Row) -> tuple[str, ...]:
    spread = ("-" if row.p20_ms is None
              else f"{format_number(row.p20_ms)}-{format_number(row.p80_ms)}")
    speedup = "-" if row.speedup_vs is None else f"{format_number(row.speedup_vs)}x"
    details = [row.note] if row.note else []
    if row.compile_s is not None:
        details.insert(0, f"compile {format_number(row.compile_s)} s")
    status = row.status + (f": {'; '.join(details)}" if details else "")
    return (row.provider, format_number(row.median_ms), spread, str(row.repeats or "-"),
            format_number(row.peak_mem_mb), speedup, status)


def format_table(rows: Sequence[Row]) -> list[str]:
    """One block per (size, method, mode), columns aligned across all blocks."""
    cells = [TABLE_HEADER] + [row_cells(row) for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADER) - 1)]

    def line(values):
        first = values[0].ljust(widths[0])
        middle = [v.rjust(w) for v, w in zip(values[1:-1], widths[1:])]
        return "  " + "  ".join([first, *middle, values[-1]])

    lines = []
    for cell in _unique(row.cell for row in rows):
        size, method, mode = cell
        lines += ["", f"N={size.n} M={size.m} D={size.d}  {method}  {mode}", line(TABLE_HEADER)]
        lines += [line(row_cells(row)) for row in rows if row.cell == cell]
    return lines


def summary_lines(rows: Sequence[Row]) -> list[str]:
    """The answer in one line per (size, method): speed-up and memory saving of fwd+bwd."""
    mode = PLOT_MODE if any(r.mode == PLOT_MODE for r in rows) else rows[0].mode if rows else None
    lines = []
    for cell in _unique(row.cell for row in rows if row.mode == mode):
        by_provider = {row.provider: row for row in rows if row.cell == cell}
        base = by_provider.get(BASELINE)
        if base is None or base.status != STATUS_OK:
            continue
        parts = []
        for name, row in by_provider.items():
            if name == BASELINE or row.speedup_vs is None:
                continue
            part = f"{speed_relation(row.speedup_vs)} than {name}"
            if row.peak_mem_mb and base.peak_mem_mb:
                part += f" ({memory_relation(row.peak_mem_mb / base.peak_mem_mb)})"
            parts.append(part)
        if parts:
            size, method, _ = cell
            lines.append(f"  {size.label} {method} {mode}: {BASELINE} is " + ", ".join(parts))
    return ["", "Summary:"] + lines if lines else []


def format_report(result: BenchResult) -> str:
    return "\n".join(environment_lines(result.environment) + format_table(result.rows)
                     + summary_lines(result.rows))


def write_csv(result: BenchResult, path: Path) -> None:
    env = result.environment
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow({**dataclasses.asdict(row), "device_name": env.device_name,
                             "torch_version": env.torch_version, "threads": env.threads,
                             "others_cpu_share": env.others_cpu_share})


# ----------------------------------------------------------------------------- plot

PROVIDER_COLORS = {"reference": "tab:red", "eager": "tab:blue", "compiled": "tab:purple",
                   "ge2e_ext": "tab:green"}
PROVIDER_MARKERS = {"reference": "s", "eager": "o", "compiled": "^", "ge2e_ext": "D"}


def _style(provider: str) -> dict:
    return {"color": PROVIDER_COLORS.get(provider, "tab:gray"),
            "marker": PROVIDER_MARKERS.get(provider, "x")}


def n_sweep_group(rows: Sequence[Row]) -> Optional[tuple[int, int]]:
    """The (M, D) with the most distinct N among the rows, if it has at least two."""
    ns_by_group: dict[tuple[int, int], set[int]] = {}
    for row in rows:
        ns_by_group.setdefault((row.M, row.D), set()).add(row.N)
    if not ns_by_group:
        return None
    group, ns = max(ns_by_group.items(), key=lambda item: len(item[1]))
    return group if len(ns) >= 2 else None


def write_plot(result: BenchResult, path: Path) -> None:
    """Time (and memory, if measured) per provider: against N when several N were run,
    else as bars for the first size. One column per loss method, forward+backward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    mode = PLOT_MODE if any(r.mode == PLOT_MODE for r in rows) else rows[0].mode
    timed = [r for r in rows if r.mode == mode and r.status == STATUS_OK and r.median_ms]
    methods = _unique(r.loss_method for r in rows if r.mode == mode)
    metrics = [("median_ms", "time per call (ms)", "time")]
    if any(r.peak_mem_mb for r in timed):
        metrics.append(("peak_mem_mb", "peak memory added by one call (MB)", "peak memory"))
    figure, axes = plt.subplots(len(metrics), len(methods), squeeze=False,
                                figsize=(6.4 * len(methods), 4.6 * len(metrics)))
    group = n_sweep_group(timed)
    size = rows[0].size
    for column, method in enumerate(methods):
        method_rows = [r for r in timed if r.loss_method == method]
        for line, (metric, label, what) in enumerate(metrics):
            ax = axes[line][column]
            if group is not None:
                _plot_against_n(ax, [r for r in method_rows if (r.M, r.D) == group], metric)
            else:
                _plot_bars(ax, [r for r in method_rows if r.size == size], metric)
            ax.set_title(f"{method} loss: {what} of {mode}")
            ax.set_ylabel(label)
            ax.grid(True, which="major", alpha=0.3)
    env = result.environment
    shape = (f"M={group[0]}, D={group[1]}" if group is not None
             else f"N={size.n}, M={size.m}, D={size.d}")
    figure.suptitle(f"GE2E loss, {shape}, float32 (lower is better)\n{env.device}: "
                    f"{env.device_name}, {env.threads} threads, torch {env.torch_version}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_against_n(ax, rows: Sequence[Row], metric: str) -> None:
    from matplotlib.ticker import NullLocator

    for provider in _unique(r.provider for r in rows):
        points = sorted((r.N, getattr(r, metric), r) for r in rows
                        if r.provider == provider and getattr(r, metric))
        if not points:
            continue
        ns = [p[0] for p in points]
        ax.plot(ns, [p[1] for p in points], label=provider, **_style(provider))
        if metric == "median_ms":
            ax.fill_between(ns, [p[2].p20_ms for p in points], [p[2].p80_ms for p in points],
                            color=_style(provider)["color"], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    all_ns = sorted({r.N for r in rows})
    ax.set_xticks(all_ns, [str(n) for n in all_ns])
    ax.xaxis.set_minor_locator(NullLocator())  # the N values run are the only ticks
    ax.set_xlabel("N speakers per batch (log scale)")
    ax.legend(title="provider (band: p20-p80)" if metric == "median_ms" else "provider")


def _plot_bars(ax, rows: Sequence[Row], metric: str) -> None:
    bars = [(r.provider, getattr(r, metric), r) for r in rows if getattr(r, metric)]
    if not bars:
        ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
        return
    names = [b[0] for b in bars]
    drawn = ax.bar(names, [b[1] for b in bars], color=[_style(n)["color"] for n in names])
    unit = " ms" if metric == "median_ms" else " MB"
    for bar, (_, value, row) in zip(drawn, bars):
        text = format_number(value) + unit
        if metric == "median_ms" and row.speedup_vs and row.provider != BASELINE:
            text += f"\n({BASELINE} {speed_relation(row.speedup_vs)})"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                    textcoords="offset points")
    ax.set_yscale("log")
    ax.margins(y=0.25)
    ax.set_xlabel("provider")


def write_outputs(result: BenchResult, output_dir: Path) -> tuple[Path, Path]:
    """The CSV and PNG, named after the device so CPU and CUDA runs can share a folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"ge2e_bench_{result.environment.device}"
    csv_path, png_path = output_dir / f"{stem}.csv", output_dir / f"{stem}.png"
    write_csv(result, csv_path)
    write_plot(result, png_path)
    return csv_path, png_path


# ------------------------------------------------------------------------------ CLI


def _comma_list(allowed: Sequence[str], aliases: Optional[Mapping[str, str]] = None):
    def parse(text: str) -> list[str]:
        items = [(aliases or {}).get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(allowed)}")
        return _unique(items)
    return parse


def _at_least(lowest: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
        return value
    return parse


def _sizes_argument(text: str) -> list[Size]:
    try:
        return parse_sizes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_ge2e.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run; auto: cuda if available, else cpu (default: auto)")
    parser.add_argument("--sizes", type=_sizes_argument, default=None, metavar="LIST",
                        help="comma list of NxMxD sizes (e.g. 64x10x256,256x10x256), or 'sweep': "
                             "N=8..4096 at M=10 D=256, M=2,5,10,20 and D=64..1024 at N=64 "
                             "(default: 64x10x256, the paper's batch)")
    parser.add_argument("--methods", type=_comma_list(LOSS_METHODS), default=list(LOSS_METHODS),
                        metavar="LIST", help="loss methods: softmax,contrast (default: both)")
    parser.add_argument("--modes", type=_comma_list(MODES, MODE_ALIASES), default=list(MODES),
                        metavar="LIST", help="forward,backward,forward+backward (or fwd,bwd,"
                                             "fwd+bwd) (default: all three)")
    parser.add_argument("--providers", type=_comma_list(BUILTIN_PROVIDERS), default=None,
                        metavar="LIST", help="subset of reference,eager,compiled,ge2e_ext "
                                             "(default: all)")
    parser.add_argument("--repeats", type=_at_least(1), default=None, metavar="R",
                        help="measured repeats per provider (default: 30; 10 with --quick)")
    parser.add_argument("--warmup", type=_at_least(0), default=None, metavar="W",
                        help="unmeasured calls per mode before the repeats, on top of the "
                             "correctness check's first call; providers slower than a quarter "
                             "budget get none (default: 3; 1 with --quick)")
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="a provider stops repeating after S seconds, once it has 3 "
                             "repeats (default: 2; 0.5 with --quick)")
    parser.add_argument("--reference-limit-s", type=float, default=3.0, metavar="S",
                        help="skip the loop reference where one fwd+bwd call is estimated to "
                             "take more than S seconds (default: 3)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory measurements (on CPU each is a subprocess)")
    parser.add_argument("--quick", action="store_true",
                        help="fast settings: paper size only (unless --sizes), fewer repeats, "
                             "memory only for forward+backward; about a minute on 2 CPU cores "
                             "including torch.compile")
    parser.add_argument("--output", type=Path, default=Path("bench_results"), metavar="DIR",
                        help="folder for ge2e_bench_<device>.csv and .png, created if missing "
                             "(default: bench_results/)")
    parser.add_argument("--threads", type=_at_least(1), default=None, metavar="T",
                        help="torch CPU threads (default: torch's default)")
    parser.add_argument("--_memory-probe", dest="memory_probe", default=None,
                        help=argparse.SUPPRESS)  # internal: one CPU memory measurement
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = args.quick
    sizes = args.sizes or [PAPER_SIZE]
    if args.no_memory:
        memory_modes: tuple[str, ...] = ()
    elif quick:
        memory_modes = ("forward+backward",)
    else:
        memory_modes = MODES
    return BenchConfig(
        device=args.device, sizes=sizes, methods=args.methods, modes=args.modes,
        providers=args.providers,
        repeats=args.repeats if args.repeats is not None else (10 if quick else 30),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        budget_s=args.budget_s if args.budget_s is not None else (0.5 if quick else 2.0),
        memory_modes=memory_modes, reference_limit_s=args.reference_limit_s,
        output_dir=args.output)


def main(argv: Optional[Sequence[str]] = None,
         extra_providers: Optional[Mapping[str, Callable]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        print(json.dumps(run_memory_probe(ProbeJob.from_json(args.memory_probe))))
        return 0
    try:
        config = config_from_args(args)
        resolve_device(config.device)
    except ValueError as error:
        parser.error(str(error))
    started = time.perf_counter()
    result = run_benchmark(config, extra_providers)
    print(format_report(result), flush=True)
    csv_path, png_path = write_outputs(result, config.output_dir)
    log(f"wrote {csv_path} and {png_path} ({time.perf_counter() - started:.0f} s)")
    if result.failed:
        log("FAILED: a provider is wrong or raised; see the status column")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
