"""The scripts' command line (METHOD: how it measures) and a run's table, summary, CSV and PNG."""

import argparse
import csv
import dataclasses
import itertools
import platform
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import ge2e_ext
from .common import (BASELINE, FLOOR, FWD_BWD, INIT_B, INIT_W, MODE_ALIASES, MODES, PROVIDERS,
                     SIZE_HELP, STATUS_ERROR, STATUS_OK, STATUS_WRONG, format_number, log,
                     parse_sizes)
from .runner import BenchConfig, Row, resolve_device, run_benchmark

METHOD = """\
How it measures (more in README.md, "Benchmarks"): each loss is first checked against the
reference's (the float64 backend="torch" path's where the loops would exceed --reference-
limit-s); one that differs is "wrong", untimed, exit code 1. Then repeats in which providers
take turns (round robin) until each has 3 samples and has run --budget-s; one sample is
torch.utils.benchmark.Timer.timeit(1) on the CPU, 2 warm-up calls and a torch.cuda.Event
pair on CUDA. floor: E @ S.T, H @ S, H.T @ E. Memory, after all timing: CUDA
max_memory_allocated; CPU VmHWM (reset via /proc/self/clear_refs) - VmRSS.
"""
HEADER = ("provider", "median ms", "p20-p80 ms", "runs", "peak MB", "speed-up", "status")

def relation(ratio: float, above: str, below: str) -> str:  # 2.64x above, or 1.10x below
    return f"{format_number(max(ratio, 1 / ratio))}x {above if ratio >= 1 else below}"

def machine_note(share: Optional[float]) -> str:
    """How much of the CPUs other processes used while timing; over 10%: a busy machine."""
    if share is None:
        return "machine: n/a (no /proc/stat to tell whether other processes competed)"
    busy = " (BUSY MACHINE: timings and ratios may be distorted; rerun when idle)"
    return f"machine: other processes used {share:.0%} of the CPUs while timing" + (
        busy if share > 0.10 else "")

def cells(row: Row) -> tuple[str, ...]:
    details = [f"compile {format_number(row.compile_s)} s"] * (row.compile_s is not None)
    details += [row.note] * bool(row.note)
    return (row.provider, format_number(row.median_ms), "-" if row.p20_ms is None else
            f"{format_number(row.p20_ms)}-{format_number(row.p80_ms)}", str(row.repeats or "-"),
            format_number(row.peak_mem_mb), "-" if row.speedup_vs is None else
            f"{format_number(row.speedup_vs)}x",
            row.status + (f": {'; '.join(details)}" if details else ""))

def summary_line(rows: list[Row]) -> Optional[str]:
    """One cell's answer: ge2e_ext against every other provider, and against its floor."""
    by_name = {row.provider: row for row in rows}
    base, floor = by_name.get(BASELINE), by_name.get(FLOOR)
    if base is None or base.status != STATUS_OK:
        return None
    parts = [f"{relation(row.speedup_vs, 'faster', 'slower')} than {name}" + (
        f" ({relation(row.peak_mem_mb / base.peak_mem_mb, 'less memory', 'more memory')})"
        if row.peak_mem_mb and base.peak_mem_mb else "")
        for name, row in by_name.items() if name not in (BASELINE, FLOOR) and row.speedup_vs]
    texts = [f"{BASELINE} is " + ", ".join(parts)] * bool(parts)
    if floor and floor.speedup_vs:
        texts.append(f"{BASELINE} is {format_number(1 / floor.speedup_vs)}x the time of its 3 "
                     "matrix products")
    cell = f"{base.cell[0].label} {base.loss_method} {base.mode}"
    return f"  {cell}: {'; '.join(texts)}" if texts else None

def format_report(rows: Sequence[Row]) -> str:
    first = rows[0]
    kind, clock, memory = (("GPU", "CUDA events", "max_memory_allocated") if first.device == "cuda"
                           else ("CPU", "torch.utils.benchmark.Timer", "VmHWM over VmRSS"))
    lines = [f"GE2E loss benchmark: device {first.device}, {kind} {first.device_name}, "
             f"{first.threads} threads", f"torch {first.torch_version}, ge2e_ext "
             f"{ge2e_ext.__version__}, python {platform.python_version()}; float32 inputs, "
             f"w={INIT_W:g}, b={INIT_B:g}", "time: median and p20-p80 (ms) of repeats interleaved "
             f"across providers, by {clock}", f"peak MB: memory one call adds (growth of {memory})",
             f"speed-up: provider median / {BASELINE} median (above 1: {BASELINE} is faster)",
             machine_note(first.others_cpu_share)]
    table = [HEADER] + [cells(row) for row in rows]
    widths = [max(len(c[i]) for c in table) for i in range(len(HEADER) - 1)]
    def line(values):
        return "  " + "  ".join([values[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(values[1:-1], widths[1:])] + [values[-1]])
    summary, summary_mode = [], FWD_BWD if FWD_BWD in {r.mode for r in rows} else first.mode
    for cell in dict.fromkeys(row.cell for row in rows):
        mine = [row for row in rows if row.cell == cell]
        lines += ["", f"N={cell[0].n} M={cell[0].m} D={cell[0].d}  {cell[1]}  {cell[2]}",
                  line(HEADER)] + [line(cells(row)) for row in mine]
        summary += filter(None, [summary_line(mine)] * (cell[2] == summary_mode))
    return "\n".join(lines + (["", "Summary:"] + summary) * bool(summary))

def write_outputs(rows: Sequence[Row], output_dir: Path, stem: str) -> tuple[Path, Path]:
    """<stem>_<device>.csv and .png, so CPU and CUDA runs can share a folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = (output_dir / f"{stem}_{rows[0].device}.{e}" for e in ("csv", "png"))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(map(dataclasses.asdict, rows))
    write_plot(rows, png_path)
    return csv_path, png_path

def write_plot(all_rows: Sequence[Row], path: Path) -> None:
    """Bars (log scale) of fwd+bwd's time, whiskers p20-p80, and memory per size and provider."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close
    first = all_rows[0]
    mode = FWD_BWD if any(r.mode == FWD_BWD for r in all_rows) else first.mode
    rows = [r for r in all_rows if r.mode == mode and r.status == STATUS_OK and r.median_ms]
    methods, sizes, names = (list(dict.fromkeys(key(r) for r in rows)) for key in (
        lambda r: r.loss_method, lambda r: r.cell[0], lambda r: r.provider))
    metrics = [("median_ms", "time per call (ms)")] + [
        ("peak_mem_mb", "peak memory one call adds (MB)")] * any(r.peak_mem_mb for r in rows)
    figure = Figure(figsize=(max(6.4, len(sizes) * len(names) / 3) * len(methods), 9))
    axes = figure.subplots(len(metrics), len(methods), squeeze=False)
    for (i, (metric, label)), (j, method) in itertools.product(*map(enumerate, (metrics, methods))):
        ax = axes[i][j]
        for k, name in enumerate(names):
            mine = [r for r in rows if (r.provider, r.loss_method, bool(getattr(r, metric))) == (
                name, method, True)]
            spread = list(zip(*[(r.median_ms - r.p20_ms, r.p80_ms - r.median_ms) for r in mine]))
            ax.bar([sizes.index(r.cell[0]) + (k + 0.5) / len(names) - 0.5 for r in mine],
                   [getattr(r, metric) for r in mine], 0.9 / len(names), color=f"C{k}",
                   label=name if mine else None, yerr=spread if metric == "median_ms" else None)
        ax.set_xticks(range(len(sizes)), [s.label for s in sizes], rotation=30 * (len(sizes) > 4))
        ax.set(yscale="log", title=f"{method} loss, {mode}", ylabel=label, xlabel="N x M x D")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(title="provider")
    figure.suptitle(f"GE2E loss, float32 (lower is better); {first.device}: "
                    f"{first.device_name}, {first.threads} threads, torch {first.torch_version}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)

def _names(allowed: Sequence[str]) -> Callable:
    def convert(text: str) -> list[str]:
        names = list(dict.fromkeys(MODE_ALIASES.get(t.strip(), t.strip()) for t in text.split(",")))
        if not text.strip() or set(names) - set(allowed):
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}")
        return names
    return convert

def script(prog: str, description: str, stem: str, sizes: str, modes: Sequence[str] = MODES,
           providers: Sequence[str] = PROVIDERS, quick_note: str = "") -> Callable:
    """A script's main(argv=None, extra_providers=None) -> exit code (see run_benchmark)."""
    def main(argv: Optional[Sequence[str]] = None,
             extra_providers: Optional[Mapping[str, Callable]] = None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=description, epilog=METHOD,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add, methods = parser.add_argument, tuple(ge2e_ext.LOSS_METHODS)
        add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if any")
        add("--sizes", type=parse_sizes, default=sizes, metavar="LIST",
            help=f"{SIZE_HELP} (default: {sizes})")
        add("--methods", type=_names(methods), default=methods, metavar="LIST", help="default: all")
        add("--modes", type=_names(MODES), default=modes, metavar="LIST",
            help=f"{','.join(MODES)} (or fwd,bwd,fwd+bwd) (default: {','.join(modes)})")
        add("--providers", type=_names(PROVIDERS), default=providers, metavar="LIST",
            help=f"subset of {','.join(PROVIDERS)} (default: {','.join(providers)})")
        add("--repeats", type=int, metavar="R", help="samples per provider (default: 30)")
        add("--budget-s", type=float, metavar="S", help="seconds a provider runs (default: 2)")
        add("--reference-limit-s", type=float, default=3.0, metavar="S", help="skip the loop "
            "reference where one fwd+bwd call is estimated over S seconds (default: 3)")
        add("--no-memory", action="store_true", help="skip the peak-memory measurements")
        add("--quick", action="store_true", help="10 repeats, 0.5 s budget, memory of "
            f"forward+backward only{quick_note}")
        add("--output", type=Path, default=Path("bench_results"), metavar="DIR",
            help=f"folder for {stem}_<device>.csv and .png (default: bench_results)")
        args = parser.parse_args(argv)
        if args.repeats is not None and args.repeats < 1:
            parser.error(f"--repeats must be at least 1, got {args.repeats}")
        try:
            resolve_device(args.device)
        except ValueError as error:
            parser.error(str(error))
        quick = args.quick
        rows = run_benchmark(BenchConfig(
            args.device, args.sizes, args.methods, args.modes, args.providers,
            repeats=args.repeats or (10 if quick else 30), reference_limit_s=args.reference_limit_s,
            budget_s=(0.5 if quick else 2.0) if args.budget_s is None else args.budget_s,
            memory_modes=() if args.no_memory else (FWD_BWD,) if quick else MODES), extra_providers)
        print(format_report(rows), flush=True)
        log("wrote {} and {}".format(*write_outputs(rows, args.output, stem)))
        failed = any(row.status in (STATUS_WRONG, STATUS_ERROR) for row in rows)
        log("FAILED: a provider is wrong or raised; see the status column" if failed else "done")
        return int(failed)
    return main
