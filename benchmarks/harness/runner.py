"""Runs the benchmark: for every size and loss method the guard once, then each mode's
interleaved timing, then (on the CPU, after all timing) the memory probes."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

import ge2e_ext
from . import guard, memory, timing
from .common import (FAILING_STATUSES, FWD_BWD, MIB, MODES, PAPER_SIZE, STATUS_NO_KERNEL,
                     STATUS_OK, STATUS_TOO_SLOW, STATUS_WRONG, Size, error_status,
                     format_number, log)
from .providers import (BASELINE, FLOOR_NOTE, Inputs, Provider, make_inputs, matrix_products,
                        prepare_call, select_providers)


@dataclass
class BenchConfig:
    """Everything a run needs; the CLI fills it, tests build it directly."""

    device: str = "auto"
    sizes: Sequence[Size] = (PAPER_SIZE,)
    methods: Sequence[str] = tuple(ge2e_ext.LOSS_METHODS)
    modes: Sequence[str] = MODES
    providers: Optional[Sequence[str]] = None  # built-ins to run; None: all
    repeats: int = 30
    warmup: int = 3
    budget_s: float = 2.0  # seconds of repeats per provider per cell
    memory_modes: Sequence[str] = MODES  # () disables the memory measurements
    reference_limit_s: float = 3.0  # skip the reference above this estimated fwd+bwd time
    rtol: float = 1e-4
    output_dir: Path = Path("bench_results")


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

    def add_note(self, note: str) -> None:
        self.note = "; ".join(filter(None, [self.note, note]))


@dataclass
class Environment:
    device: str
    device_name: str
    torch_version: str
    ge2e_ext_version: str
    threads: int
    # Share of all CPUs' time that other processes (or the hypervisor) took while the
    # timings ran: a busy machine disturbs timings, so the report says so.
    others_cpu_share: Optional[float] = None


@dataclass
class BenchResult:
    environment: Environment
    rows: list[Row] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(row.status in FAILING_STATUSES for row in self.rows)


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch sees no CUDA device")
    return device


class Benchmark:
    """Runs every (size, loss method): guard, then timing per mode, then memory."""

    def __init__(self, config: BenchConfig, extra_providers=None):
        self.config = config
        self.device = resolve_device(config.device)
        self.providers = select_providers(config.providers, extra_providers)
        self.modes_of = {provider.name: provider.modes for provider in self.providers}
        self.reference_cost = guard.ReferenceCostEstimator(self.device)
        self.environment = describe_environment(self.device)
        self.probes: dict[memory.ProbeJob, Row] = {}

    def run(self) -> BenchResult:
        result = BenchResult(self.environment)
        env = self.environment
        log(f"GE2E benchmark on {env.device} ({env.device_name}), {env.threads} threads; "
            f"providers: {', '.join(p.name for p in self.providers)}")
        competition = timing.CompetingCpuMeter()
        for size in self.config.sizes:
            inputs = make_inputs(size, self.device)
            for method in self.config.methods:
                result.rows += self.run_size_and_method(size, method, inputs)
        env.others_cpu_share = competition.others_share()
        if self.probes:
            log(f"memory: {len(self.probes)} probes, each in a fresh process")
            for job, (peak, note) in memory.run_probes(list(self.probes)).items():
                self.probes[job].peak_mem_mb = None if peak is None else peak / MIB
                self.probes[job].add_note(note)
        fill_speedups(result.rows)
        return result

    def run_size_and_method(self, size: Size, method: str, inputs: Inputs) -> list[Row]:
        """All modes of one (size, method): the guard once, then each mode's timing."""
        estimate = self.reference_cost.seconds(size)
        expected = guard.yardstick(inputs, method, estimate, self.config.reference_limit_s)
        log(f"{size.label} {method}: expected loss {expected.expected:.6g} (from "
            f"{expected.source}); reference fwd+bwd estimated {format_number(estimate)} s")
        verdicts: dict[str, tuple[str, str]] = {}  # provider -> (status, note), not timed
        ready: dict[str, tuple[timing.Prepare, Optional[guard.Checked]]] = {}
        for provider in self.providers:
            if provider.is_floor:
                if FWD_BWD in self.config.modes:
                    ready[provider.name] = (_constant(matrix_products(size, self.device)), None)
                continue
            verdict, checked = self.check(provider, method, inputs, expected)
            if checked is None:
                verdicts[provider.name] = verdict
            else:
                prepare = functools.partial(prepare_call, checked.loss_fn, inputs)
                ready[provider.name] = (prepare, checked)
        rows = []
        for mode in self.config.modes:
            rows += self.run_mode(size, method, mode, ready, verdicts)
        return rows

    def check(self, provider: Provider, method: str, inputs: Inputs,
              expected: guard.Yardstick) -> tuple[tuple[str, str], Optional[guard.Checked]]:
        """((status, note), None) for a provider that is not timed, else (ok, Checked)."""
        if provider.needs_extension and self.device.type not in ge2e_ext.extension_devices():
            return (STATUS_NO_KERNEL, f"ge2e_ext has no {self.device.type} kernel in this "
                                      "build"), None
        if provider.name == "reference" and not expected.reference_affordable:
            return (STATUS_TOO_SLOW, f"estimated {format_number(expected.reference_estimate_s)}"
                                     " s per fwd+bwd call"), None
        with_backward = any(mode != "forward" for mode in self.config.modes)
        try:
            checked, verdict = guard.check(provider, method, inputs, expected, self.config.rtol,
                                           with_backward, self.device)
        except Exception as error:  # noqa: BLE001 (reported in the row)
            return error_status(error), None
        return ((STATUS_OK, ""), checked) if checked else ((STATUS_WRONG, verdict), None)

    def run_mode(self, size: Size, method: str, mode: str, ready, verdicts) -> list[Row]:
        config = self.config
        timed = {name: entry for name, entry in ready.items() if mode in self.modes_of[name]}
        log(f"  time {size.label} {method} {mode}: {', '.join(timed) or 'nothing to time'}")
        first_call_s = {name: checked.first_call_s for name, (_, checked) in timed.items()
                        if checked is not None}
        samples, errors = timing.interleaved_samples(
            {name: prepare for name, (prepare, _) in timed.items()}, mode, self.device,
            config.repeats, config.budget_s, config.warmup, first_call_s)
        rows = []
        for provider in self.providers:
            if mode not in provider.modes:
                continue
            row = Row(self.device.type, size.n, size.m, size.d, method, mode, provider.name)
            rows.append(row)
            if provider.name in verdicts:
                row.status, row.note = verdicts[provider.name]
            elif provider.name in errors:
                row.status, row.note = error_status(errors[provider.name])
            else:
                self.fill_row(row, samples[provider.name], *timed[provider.name])
            log(f"    {row.provider}: {row.status}, median {format_number(row.median_ms)} ms "
                f"over {row.repeats} runs; {row.note}".rstrip("; "))
        return rows

    def fill_row(self, row: Row, samples, prepare: timing.Prepare,
                 checked: Optional[guard.Checked]) -> None:
        stats = timing.stats(samples)
        if stats is not None:
            row.median_ms, row.p20_ms, row.p80_ms = stats.median_ms, stats.p20_ms, stats.p80_ms
            row.repeats = stats.repeats
        if checked is None:  # the floor: nothing to check, compile or measure memory of
            row.note = FLOOR_NOTE
            return
        row.compile_s = checked.compile_s(row.mode)
        if row.mode not in self.config.memory_modes:
            return
        if self.device.type == "cuda":
            try:
                row.peak_mem_mb = memory.cuda_peak_bytes(prepare(row.mode), self.device) / MIB
            except Exception as error:  # noqa: BLE001 (reported in the row)
                row.add_note(f"memory n/a ({error_status(error)[1]})")
        elif checked.provider.rebuildable:
            job = memory.ProbeJob(row.provider, row.N, row.M, row.D, row.loss_method, row.mode,
                                  torch.get_num_threads())
            self.probes[job] = row
        else:
            row.add_note("memory n/a (injected provider)")


def _constant(call: Callable[[], object]) -> timing.Prepare:
    """A Prepare that gives the same call in every mode (the floor)."""
    return lambda mode: call


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

