#!/usr/bin/env python
"""Benchmark the GE2E loss: ge2e_ext against the code it replaces, in time and memory.

    python benchmarks/bench_ge2e.py              # paper size N=64 M=10 D=256, all modes
    python benchmarks/bench_ge2e.py --quick      # the same, fewer repeats (about a minute on 2 CPU cores)
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
             fwd+bwd row adds both); every size/method compiles from scratch
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
(round-robin), so every provider is measured in the same process over the same
stretch of time and a machine that gets busier cannot bias a ratio. A provider
stops repeating once it has spent --budget-s seconds (after at least 3 repeats).
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
import resource
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
from ge2e_ext import extension_devices, ge2e_loss  # noqa: E402
from ge2e_ext.reference import ge2e_loss_reference  # noqa: E402

LOSS_METHODS = ("softmax", "contrast")
MODES = ("forward", "backward", "forward+backward")
MODE_ALIASES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}
BUILTIN_PROVIDERS = ("reference", "eager", "compiled", "ge2e_ext")
BASELINE = "ge2e_ext"  # speed-ups are this provider's against each other one
PLOT_MODE = "forward+backward"  # what a training step costs; the one mode plotted
INIT_W, INIT_B = 10.0, -5.0
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


def log(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)


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
    return STATUS_ERROR, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


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


CSV_COLUMNS = [f.name for f in dataclasses.fields(Row)] + ["device_name", "torch_version", "threads"]


@dataclass(frozen=True)
class Environment:
    device: str
    device_name: str
    torch_version: str
    ge2e_ext_version: str
    threads: int


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
    Overestimates a little (fixed per-call costs are scaled too), which errs on
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


def expected_loss(inputs: Inputs, method: str, use_reference: bool) -> tuple[float, str]:
    """The value every provider must reproduce, and what it came from."""
    with torch.no_grad():
        if use_reference:
            return float(ge2e_loss_reference(*inputs.tensors, method).sum()), "reference"
        doubles = [t.detach().double() for t in inputs.tensors]
        return float(ge2e_loss(*doubles, method, backend="torch")), "eager float64"


def agrees(value: float, expected: float, rtol: float, utterances: int) -> bool:
    """|value - expected| <= rtol*|expected| + a tiny per-utterance atol; NaN never agrees."""
    atol = 1e-6 * utterances
    return math.isfinite(value) and abs(value - expected) <= rtol * abs(expected) + atol


@dataclass
class ReadyProvider:
    """A provider that passed the guard, with its compile times (compiling providers only)."""

    provider: Provider
    loss_fn: LossFn
    compile_forward_s: Optional[float] = None
    compile_backward_s: Optional[float] = None

    def compile_s(self, mode: str) -> Optional[float]:
        if not self.provider.compiles:
            return None
        parts = {"forward": [self.compile_forward_s], "backward": [self.compile_backward_s],
                 "forward+backward": [self.compile_forward_s, self.compile_backward_s]}[mode]
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
    return ReadyProvider(provider, loss_fn, compile_forward_s=time.perf_counter() - start), loss


def first_backward(entry: ReadyProvider, loss: torch.Tensor, device: torch.device) -> None:
    """The first backward call, timed: a compiling provider compiles its backward lazily."""
    start = time.perf_counter()
    loss.backward()
    synchronize(device)
    entry.compile_backward_s = time.perf_counter() - start


# -------------------------------------------------------------------------- timing


def warm_up(ready: Mapping[str, ReadyProvider], inputs: Inputs, mode: str, timer: Timer,
            calls: int, budget_s: float) -> None:
    """Up to ``calls`` unmeasured calls each; a slow provider stops after a quarter budget."""
    for entry in ready.values():
        start = time.perf_counter()
        for _ in range(max(calls, 1)):
            timer.time_ms(prepare_call(entry.loss_fn, inputs, mode))
            if time.perf_counter() - start > budget_s / 4:
                break


def time_round_robin(ready: Mapping[str, ReadyProvider], inputs: Inputs, mode: str,
                     timer: Timer, repeats: int, budget_s: float
                     ) -> tuple[dict[str, list[float]], dict[str, BaseException]]:
    """Samples (ms) per provider, taking turns within every repeat.

    A provider leaves the rotation once it has at least MIN_REPEATS samples and has
    spent budget_s seconds (set-up included), or when it raises.
    """
    samples = {name: [] for name in ready}
    spent = dict.fromkeys(ready, 0.0)
    errors: dict[str, BaseException] = {}
    min_repeats = min(MIN_REPEATS, repeats)
    for _ in range(repeats):
        active = [name for name in ready if name not in errors
                  and (len(samples[name]) < min_repeats or spent[name] < budget_s)]
        if not active:
            break
        for name in active:
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
    """Runs the probes after all timing (so they cannot disturb it), two at a time."""
    workers = max(1, min(2, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(spawn_memory_probe, job): job for job in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            job = futures[future]
            peak, note = future.result()
            row = rows[job]
            row.peak_mem_mb = None if peak is None else peak / MIB
            if note:
                row.note = "; ".join(filter(None, [row.note, note]))
            shown = "n/a" if peak is None else f"{peak / MIB:.2f} MB"
            log(f"  memory {done}/{len(jobs)}: {job.size.label} {job.loss_method} "
                f"{job.mode} {job.provider}: {shown}")


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
        for size in self.config.sizes:
            inputs = make_inputs(size, self.device)
            for method in self.config.methods:
                result.rows += self.run_cell_group(size, method, inputs)
        if self.probe_rows:
            log(f"memory: {len(self.probe_rows)} probes, each in a fresh process")
            run_cpu_memory_probes(list(self.probe_rows), self.probe_rows)
        fill_speedups(result.rows)
        return result

    def reference_is_affordable(self, size: Size) -> tuple[bool, float]:
        estimate = self.reference_cost.seconds(size)
        return estimate <= self.config.reference_limit_s, estimate

    def run_cell_group(self, size: Size, method: str, inputs: Inputs) -> list[Row]:
        """All modes of one (size, method): the guard once, then each mode's timing."""
        affordable, estimate = self.reference_is_affordable(size)
        expected, source = expected_loss(inputs, method, affordable)
        log(f"{size.label} {method}: expected loss {expected:.6g} (from {source}); "
            f"reference fwd+bwd estimated {estimate:.2g} s")
        verdicts = {}  # provider name -> (status, note) for those not timed
        ready: dict[str, ReadyProvider] = {}
        for provider in self.providers:
            verdict, entry = self.guard(provider, size, method, inputs, affordable,
                                        estimate, expected, source)
            if entry is not None:
                ready[provider.name] = entry
            else:
                verdicts[provider.name] = verdict
        rows = []
        for mode in self.config.modes:
            rows += self.run_mode(size, method, mode, inputs, ready, verdicts)
        return rows

    def guard(self, provider, size, method, inputs, affordable, estimate, expected, source):
        """((status, note), None) for a provider that is not timed, else (None, ready)."""
        if provider.needs_extension and self.device.type not in extension_devices():
            return (STATUS_NO_KERNEL, f"ge2e_ext has no {self.device.type} kernel in this build"), None
        if provider.name == "reference" and not affordable:
            return (STATUS_TOO_SLOW, f"estimated {estimate:.0f} s per fwd+bwd call"), None
        log(f"  check {provider.name}" + (" (compiling)" if provider.compiles else ""))
        try:
            entry, loss = first_forward(provider, method, inputs, self.device)
            value = float(loss.detach())
            if not agrees(value, expected, self.config.rtol, size.n * size.m):
                log(f"  {provider.name} is WRONG: loss {value:.6g}, {source} {expected:.6g}")
                return (STATUS_WRONG, f"loss {value:.6g} vs {source} {expected:.6g}"), None
            if any(mode != "forward" for mode in self.config.modes):
                first_backward(entry, loss, self.device)
        except Exception as error:  # noqa: BLE001 (reported in the row)
            return failure_status(error), None
        return None, entry

    def run_mode(self, size, method, mode, inputs, ready, verdicts) -> list[Row]:
        config = self.config
        log(f"  time {size.label} {method} {mode}: {', '.join(ready) or 'nothing to time'}")
        warm_up(ready, inputs, mode, self.timer, config.warmup, config.budget_s)
        samples, errors = time_round_robin(ready, inputs, mode, self.timer, config.repeats,
                                           config.budget_s)
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
            peak = cuda_peak_bytes(entry.loss_fn, inputs, row.mode, self.device)
            row.peak_mem_mb = peak / MIB
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


def environment_lines(env: Environment) -> list[str]:
    kind = "GPU" if env.device == "cuda" else "CPU"
    return [
        f"GE2E loss benchmark: device {env.device}, {kind} {env.device_name}, "
        f"{env.threads} threads",
        f"torch {env.torch_version}, ge2e_ext {env.ge2e_ext_version}, python "
        f"{platform.python_version()}; float32 inputs, w={INIT_W:g}, b={INIT_B:g}",
        "time: median and p20-p80 of interleaved repeats; peak MB: memory one call adds; "
        f"speed-up: provider median / {BASELINE} median",
    ]


TABLE_HEADER = ("provider", "median ms", "p20-p80 ms", "runs", "peak MB", "speed-up", "status")


def row_cells(row: Row) -> tuple[str, ...]:
    spread = "-" if row.p20_ms is None else f"{format_number(row.p20_ms)}-{format_number(row.p80_ms)}"
    speedup = "-" if row.speedup_vs is None else f"{format_number(row.speedup_vs)}x"
    details = [row.note] if row.note else []
    if row.compile_s is not None:
        details.insert(0, f"compile {row.compile_s:.1f} s")
    status = row.status + (f" ({'; '.join(details)})" if details else "")
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
            part = f"{format_number(row.speedup_vs)}x faster than {name}"
            if row.peak_mem_mb and base.peak_mem_mb:
                part += f" ({format_number(row.peak_mem_mb / base.peak_mem_mb)}x less memory)"
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
                             "torch_version": env.torch_version, "threads": env.threads})


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
    metrics = [("median_ms", "time per call (ms)")]
    if any(r.peak_mem_mb for r in timed):
        metrics.append(("peak_mem_mb", "peak memory added (MB)"))
    figure, axes = plt.subplots(len(metrics), len(methods), squeeze=False,
                                figsize=(6.4 * len(methods), 4.6 * len(metrics)))
    group = n_sweep_group(timed)
    for column, method in enumerate(methods):
        method_rows = [r for r in timed if r.loss_method == method]
        for line, (metric, label) in enumerate(metrics):
            ax = axes[line][column]
            if group is not None:
                _plot_against_n(ax, [r for r in method_rows if (r.M, r.D) == group], metric)
                title = f"{method} loss, {mode} (M={group[0]}, D={group[1]})"
            else:
                size = rows[0].size
                _plot_bars(ax, [r for r in method_rows if r.size == size], metric)
                title = f"{method} loss, {mode} (N={size.n}, M={size.m}, D={size.d})"
            ax.set_title(title)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
    env = result.environment
    figure.suptitle(f"GE2E loss: {env.device} ({env.device_name}, {env.threads} threads), "
                    f"torch {env.torch_version}, float32 — lower is better")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_against_n(ax, rows: Sequence[Row], metric: str) -> None:
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
    ax.set_xlabel("N speakers per batch (log scale)")
    ax.legend(title="provider (band: p20-p80)" if metric == "median_ms" else "provider")


def _plot_bars(ax, rows: Sequence[Row], metric: str) -> None:
    bars = [(r.provider, getattr(r, metric), r) for r in rows if getattr(r, metric)]
    if not bars:
        ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
        return
    names = [b[0] for b in bars]
    drawn = ax.bar(names, [b[1] for b in bars], color=[_style(n)["color"] for n in names])
    for bar, (_, value, row) in zip(drawn, bars):
        text = format_number(value)
        if metric == "median_ms" and row.speedup_vs and row.provider != BASELINE:
            text += f"\n({BASELINE} {format_number(row.speedup_vs)}x faster)"
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
    parser.add_argument("--repeats", type=int, default=None, metavar="R",
                        help="measured repeats per provider (default: 30; 10 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, metavar="W",
                        help="unmeasured calls before the repeats (default: 3; 1 with --quick)")
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
    parser.add_argument("--threads", type=int, default=None, metavar="T",
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
