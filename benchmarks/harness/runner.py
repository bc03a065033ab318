"""Runs the benchmark: each size and loss method's check, then timing; after all timing, memory."""

import functools
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

import ge2e_ext
from ge2e_ext._torch_impl import ge2e_rows
from . import timing
from .common import (BACKWARD, BASELINE, BUILDERS, FLOOR, FLOOR_NOTE, FORWARD, FWD_BWD, MIB,
                     MODES, PAPER_SIZE, PROVIDERS, STATUS_NO_KERNEL, STATUS_OK, STATUS_TOO_SLOW,
                     STATUS_WRONG, Size, error_status, format_number, log, make_inputs,
                     matrix_products, parse_sizes, prepare_call)

@dataclass
class BenchConfig:
    """Everything a run needs; the command line fills it, tests build it directly."""
    device: str = "cpu"
    sizes: Sequence[Size] = (PAPER_SIZE,)
    methods: Sequence[str] = tuple(ge2e_ext.LOSS_METHODS)
    modes: Sequence[str] = MODES
    providers: Sequence[str] = PROVIDERS
    repeats: int = 30
    budget_s: float = 2.0  # seconds of samples per provider and (size, method, mode)
    memory_modes: Sequence[str] = MODES  # () measures no memory
    reference_limit_s: float = 3.0  # skip the reference above this estimated fwd+bwd time

@dataclass
class Row:
    """One CSV/table row: a provider's result for one size, loss method and mode, and where."""
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
    device_name: str = ""
    torch_version: str = torch.__version__
    threads: int = field(default_factory=torch.get_num_threads)
    others_cpu_share: Optional[float] = None  # of the whole run's timing

    @property
    def cell(self) -> tuple[Size, str, str]:  # timed together, one speed-up baseline
        return Size(self.N, self.M, self.D), self.loss_method, self.mode

def resolve_device(name: str) -> torch.device:  # auto: cuda if torch sees one, else cpu
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch sees no CUDA device")
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next((line.split(":")[1].strip() for line in cpuinfo.splitlines()
                 if line.startswith("model name")), platform.processor() or "unknown CPU")

def first_call_s(call: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one (first, maybe compiling) call, to its end on the device."""
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start

@functools.lru_cache(maxsize=None)
def reference_s_per_pair(d: int, device: torch.device) -> float:
    """The loop reference's fwd+bwd seconds per utterance-centroid pair (N*N*M of them), the
    best of two calls at N=16, M=10; scaling it overestimates (its fixed costs too)."""
    inputs, loss_fn = make_inputs(Size(16, 10, d), device), BUILDERS["reference"]("softmax")
    return min(first_call_s(prepare_call(loss_fn, inputs, FWD_BWD), device)
               for _ in range(2)) / (16 * 16 * 10)

def float64_loss(inputs: Sequence[torch.Tensor], method: str, block: int = 256) -> float:
    """The summed loss in float64 by backend="torch", ``block`` speakers at a time (not all N)."""
    x, w, b = (t.detach().double() for t in inputs)
    return sum(float(ge2e_rows(x[i:i + block], x.sum(1), w, b, i, method, 1e-6).sum())
               for i in range(0, len(x), block))

def run_benchmark(config: BenchConfig, extra: Optional[Mapping[str, Callable]] = None) -> list[Row]:
    """Runs config, with extra providers: name -> fn(embeddings, w, b, loss_method) -> loss."""
    device = resolve_device(config.device)
    builders = {name: build for name, build in BUILDERS.items() if name in config.providers}
    builders.update({name: functools.partial(lambda fn, m: lambda x, w, b: fn(x, w, b, m), fn)
                     for name, fn in (extra or {}).items()})
    log(f"GE2E benchmark on {device}, {torch.get_num_threads()} threads")
    rows, memory, start = [], [], timing.cpu_times()  # memory: (row, prepare), after all timing
    for size, method in ((size, method) for size in config.sizes for method in config.methods):
        rows += run_cell(config, device, size, method, builders, memory)
    share, name = timing.others_share(start, timing.cpu_times()), device_name(device)
    for row in rows:
        row.others_cpu_share, row.device_name = share, name
    for row, prepare in memory:
        try:
            if device.type == "cpu":
                row.peak_mem_mb = fresh_peak_bytes(row) / MIB
                continue
            prepare()()  # a warm-up: a compiled loss recompiles after a later size's reset
            row.peak_mem_mb = timing.peak_bytes(prepare(), device) / MIB
        except Exception as error:  # noqa: BLE001 (reported in the row)
            row.note = "; ".join(filter(None, [row.note, f"memory n/a ({error_status(error)[1]})"]))
    base = {r.cell: r.median_ms for r in rows if r.provider == BASELINE and r.median_ms}
    for row in (row for row in rows if row.median_ms and row.cell in base):
        row.speedup_vs = row.median_ms / base[row.cell]
    return rows

def run_cell(config, device, size, method, builders, memory) -> list[Row]:
    """Each provider's first forward+backward, timed (a compile's time) and its loss checked
    against the reference's (float64_loss's where that is too slow), then each mode's timing."""
    inputs = make_inputs(size, device)
    estimate_s = reference_s_per_pair(size.d, device) * size.n ** 2 * size.m
    source = "reference" if estimate_s <= config.reference_limit_s else "float64"
    expected = (float(BUILDERS["reference"](method)(*inputs).detach()) if source == "reference"
                else float64_loss(inputs, method))
    log(f"{size.label} {method}: expected loss {expected:.6g} ({source}); reference fwd+bwd "
        f"estimated {format_number(estimate_s)} s")
    verdicts: dict[str, tuple[str, str]] = {}  # name -> (status, note) of the untimed
    ready: dict[str, tuple[Callable, dict]] = {}  # name -> (prepare(mode), first calls' s)
    for name, build in builders.items():
        if name == BASELINE and device.type not in ge2e_ext.extension_devices():
            verdicts[name] = STATUS_NO_KERNEL, f"ge2e_ext has no {device.type} kernel here"
        elif name == "reference" and source != "reference":
            verdicts[name] = STATUS_TOO_SLOW, f"estimated {format_number(estimate_s)} s per call"
        else:
            try:
                loss_fn, losses = build(method), []
                seconds = {FORWARD: first_call_s(lambda: losses.append(loss_fn(*inputs)), device)}
                value = float(losses[0].detach())
                if not math.isfinite(value) or abs(value - expected) > (
                        1e-4 * abs(expected) + 1e-6 * size.n * size.m):  # rtol, a tiny atol
                    verdicts[name] = STATUS_WRONG, f"loss {value:.6g} vs {source} {expected:.6g}"
                    continue
                seconds[BACKWARD] = first_call_s(losses.pop().backward, device)
                ready[name] = functools.partial(prepare_call, loss_fn, inputs), seconds
            except Exception as error:  # noqa: BLE001 (reported in the row)
                verdicts[name] = error_status(error)
    if FLOOR in config.providers and FWD_BWD in config.modes:
        ready[FLOOR] = (lambda products: lambda mode: products)(matrix_products(size, device)), {}
    rows = []
    for mode in config.modes:
        timed = {name: functools.partial(prepare, mode)
                 for name, (prepare, _) in ready.items() if name != FLOOR or mode == FWD_BWD}
        log(f"  time {size.label} {method} {mode}: {', '.join(timed) or 'nothing'}")
        got, errors = timing.interleaved(timed, device, config.repeats, config.budget_s)
        for name in (name for name in [*builders, FLOOR] if name in verdicts or name in timed):
            row = Row(device.type, *size, method, mode, name, note=FLOOR_NOTE * (name == FLOOR))
            row.status, row.note = verdicts.get(name) or (
                error_status(errors[name]) if name in errors else (STATUS_OK, row.note))
            if row.status == STATUS_OK:
                row.median_ms, row.p20_ms, row.p80_ms, row.repeats = timing.summary_ms(got[name])
                if name == "compiled":  # its first calls compiled
                    row.compile_s = sum(ready[name][1][part] for part in mode.split("+"))
                if mode in config.memory_modes and name != FLOOR:
                    memory.append((row, functools.partial(ready[name][0], mode)))
            rows.append(row)
    return rows

def fresh_peak_bytes(row: Row) -> int:
    """The CPU peak of a built-in provider's call (timing.peak_bytes) in a fresh interpreter."""
    job = [row.provider, f"{row.N}x{row.M}x{row.D}", row.loss_method, row.mode, str(row.threads)]
    done = subprocess.run([sys.executable, "-m", "harness.runner", *job], text=True,
                          capture_output=True, cwd=Path(__file__).parents[1],
                          env={**os.environ, **timing.PROBE_ENV})
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
    return int(done.stdout.split()[-1])

if __name__ == "__main__":  # a fresh_peak_bytes probe: a warm-up call, then the measured one
    name, label, method, mode, threads = sys.argv[1:]
    torch.set_num_threads(int(threads))
    inputs, loss_fn = make_inputs(parse_sizes(label)[0], torch.device("cpu")), BUILDERS[name](
        method)
    prepare_call(loss_fn, inputs, mode)()
    print(timing.peak_bytes(prepare_call(loss_fn, inputs, mode), torch.device("cpu")))
