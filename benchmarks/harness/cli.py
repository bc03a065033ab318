"""What the scripts share: the command line (METHOD, its --help epilog, says how it all
measures), and what a run prints and writes: the table, the summary, the CSV and the PNG."""

import argparse
import csv
import dataclasses
import platform
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

import ge2e_ext
from .common import (BASELINE, FLOOR, FWD_BWD, INIT_B, INIT_W, MODE_ALIASES, MODES, PROVIDERS,
                     SIZE_HELP, STATUS_OK, format_number, log, parse_sizes)
from .runner import BenchConfig, Row, failed, resolve_device, run_benchmark

METHOD = """\
How it measures (README.md, "Benchmarks", has more): float32 inputs, w=10, b=-5. Providers:
the loops of ge2e_ext.reference (skipped where a fwd+bwd call, a measured N=16 call scaled
by N*N*M, would take over --reference-limit-s), eager (backend="torch"), compiled (torch.
compile of it; first calls' time: compile_s), ge2e_ext (backend="extension"), floor (no loss:
E @ S.T, H @ S and H.T @ E by torch.mm, the float32 products of a training step). Each loss
is first checked against the reference's (the float64 torch path's where that is skipped):
one that differs is "wrong", untimed, exit code 1. Repeats in which providers take turns
(round robin, each starting one further on); a provider stops after --budget-s once it has
3 samples. A sample: CPU, torch.utils.benchmark.Timer.timeit(1) (2 warm-up calls, the timed
one); CUDA, the same warm-up, then a torch.cuda.Event pair. Memory, after all timing: the
peak one call adds, CUDA max_memory_allocated; CPU VmHWM (reset by /proc/self/clear_refs)
minus VmRSS, glibc told by mallopt to return freed memory. Exit code 2: bad arguments.
"""
CSV_COLUMNS = [f.name for f in dataclasses.fields(Row)]
BUSY_SHARE = 0.10  # other processes' CPU share above which timings are suspect
HEADER = ("provider", "median ms", "p20-p80 ms", "runs", "peak MB", "speed-up", "status")
COLORS = {"reference": "tab:red", "eager": "tab:blue", "compiled": "tab:purple",
          BASELINE: "tab:green", FLOOR: "tab:gray"}

def relation(ratio: float, above: str, below: str) -> str:
    """'2.64x <above>' for a ratio of 2.64, '1.10x <below>' for 1/1.10."""
    return f"{format_number(max(ratio, 1 / ratio))}x {above if ratio >= 1 else below}"

def machine_note(share: Optional[float]) -> str:
    """How much of the machine other processes used while timing, flagged when too much."""
    if share is None:
        return "machine: n/a (no /proc/stat to tell whether other processes competed)"
    return f"machine: other processes used {share:.0%} of the CPUs while timing" + (
        " (BUSY MACHINE: timings and ratios may be distorted; rerun when idle)" * (share > BUSY_SHARE))

def cells(row: Row) -> tuple[str, ...]:
    details = [f"compile {format_number(row.compile_s)} s"] * (row.compile_s is not None)
    details += [row.note] * bool(row.note)
    return (row.provider, format_number(row.median_ms), "-" if row.p20_ms is None else
            f"{format_number(row.p20_ms)}-{format_number(row.p80_ms)}", str(row.repeats or "-"),
            format_number(row.peak_mem_mb),
            "-" if row.speedup_vs is None else f"{format_number(row.speedup_vs)}x",
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
    size, method, mode = rows[0].cell
    return f"  {size.label} {method} {mode}: {'; '.join(texts)}" if texts else None

def format_report(rows: Sequence[Row]) -> str:
    first, cuda = rows[0], rows[0].device == "cuda"
    lines = [f"GE2E loss benchmark: device {first.device}, {'GPU' if cuda else 'CPU'} "
             f"{first.device_name}, {first.threads} threads",
             f"torch {first.torch_version}, ge2e_ext {ge2e_ext.__version__}, python "
             f"{platform.python_version()}; float32 inputs, w={INIT_W:g}, b={INIT_B:g}",
             "time: median and p20-p80 (ms) of repeats interleaved across providers, by "
             + ("CUDA events" if cuda else "torch.utils.benchmark.Timer"),
             "peak MB: memory one call adds (growth of "
             + ("max_memory_allocated)" if cuda else "VmHWM over VmRSS)"),
             f"speed-up: provider median / {BASELINE} median (above 1: {BASELINE} is faster)",
             f"{FLOOR}: the 3 float32 matrix products of a training step at that size "
             "(E S^T, H S, H^T E), forward+backward blocks only",
             machine_note(first.others_cpu_share)]
    table = [HEADER] + [cells(row) for row in rows]
    widths = [max(len(c[i]) for c in table) for i in range(len(HEADER) - 1)]

    def line(values):
        return "  " + "  ".join([values[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(values[1:-1], widths[1:])] + [values[-1]])

    summary_mode = FWD_BWD if any(r.mode == FWD_BWD for r in rows) else None
    summary = []
    for cell in dict.fromkeys(row.cell for row in rows):
        mine = [row for row in rows if row.cell == cell]
        lines += ["", f"N={cell[0].n} M={cell[0].m} D={cell[0].d}  {cell[1]}  {cell[2]}",
                  line(HEADER)] + [line(cells(row)) for row in mine]
        summary += [summary_line(mine)] * (cell[2] == (summary_mode or cell[2]))
    summary = [text for text in summary if text]
    return "\n".join(lines + (["", "Summary:"] + summary) * bool(summary))

def write_outputs(rows: Sequence[Row], output_dir: Path, stem: str) -> tuple[Path, Path]:
    """<stem>_<device>.csv and .png, so CPU and CUDA runs can share a folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = (output_dir / f"{stem}_{rows[0].device}.{ext}" for ext in ("csv", "png"))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(map(dataclasses.asdict, rows))
    write_plot(rows, png_path)
    return csv_path, png_path

def write_plot(all_rows: Sequence[Row], path: Path) -> None:
    """Bars of forward+backward's (else the first mode's) time, whiskers p20-p80, and peak
    memory if measured, per size and provider, one column per loss method, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = all_rows[0]
    mode = FWD_BWD if any(r.mode == FWD_BWD for r in all_rows) else first.mode
    rows = [r for r in all_rows if r.mode == mode and r.status == STATUS_OK and r.median_ms]
    methods, sizes, names = (list(dict.fromkeys(key(r) for r in rows)) for key in (
        lambda r: r.loss_method, lambda r: r.cell[0], lambda r: r.provider))
    metrics = [("median_ms", "time per call (ms)")] + [
        ("peak_mem_mb", "peak memory one call adds (MB)")] * any(r.peak_mem_mb for r in rows)
    figure, axes = plt.subplots(len(metrics), len(methods), squeeze=False, figsize=(
        len(methods) * max(6.4, 0.3 * len(sizes) * len(names)), 4.6 * len(metrics)))
    for (ax, (metric, label)), method in zip(((ax, metric) for axes_row, metric in zip(
            axes, metrics) for ax in axes_row), methods * len(metrics)):
        for k, name in enumerate(names):
            mine = [r for r in rows if (r.provider, r.loss_method) == (name, method)
                    and getattr(r, metric)]
            spread = [[r.median_ms - r.p20_ms for r in mine], [r.p80_ms - r.median_ms for r in mine]]
            ax.bar([sizes.index(r.cell[0]) + (k + 0.5) / len(names) - 0.5 for r in mine],
                   [getattr(r, metric) for r in mine], 0.9 / len(names), color=COLORS.get(name),
                   label=name if mine else None, yerr=spread * (metric == "median_ms") or None)
        ax.set_xticks(range(len(sizes)), [s.label for s in sizes], rotation=30 * (len(sizes) > 4))
        ax.set(yscale="log", title=f"{method} loss, {mode}", ylabel=label, xlabel="N x M x D")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(title="provider")
    figure.suptitle(f"GE2E loss, float32 (lower is better); {first.device}: "
                    f"{first.device_name}, {first.threads} threads, torch {first.torch_version}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

def _checked(convert: Callable) -> Callable:
    """convert's ValueError as an argparse error (exit code 2) with its message."""
    def parse(text: str):
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse

def _names(allowed: Sequence[str], aliases: Mapping[str, str] = MODE_ALIASES) -> Callable:
    def convert(text: str) -> list[str]:
        names = list(dict.fromkeys(aliases.get(t.strip(), t.strip()) for t in text.split(",")))
        if not text.strip() or set(names) - set(allowed):
            raise ValueError(f"{text!r}: choose from {', '.join(allowed)}")
        return names
    return _checked(convert)

def script(prog: str, description: str, stem: str, sizes: str, modes: Sequence[str] = MODES,
           providers: Sequence[str] = PROVIDERS, quick_note: str = "") -> Callable:
    """A script's main(argv=None, extra_providers=None) -> exit code (see run_benchmark)."""
    def main(argv: Optional[Sequence[str]] = None,
             extra_providers: Optional[Mapping[str, Callable]] = None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=description, epilog=METHOD,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add, methods = parser.add_argument, tuple(ge2e_ext.LOSS_METHODS)
        add("--device", choices=("auto", "cpu", "cuda"), default="auto",
            help="where to run; auto: cuda if available, else cpu (default: auto)")
        add("--sizes", type=_checked(parse_sizes), default=sizes, metavar="LIST",
            help=f"{SIZE_HELP} (default: {sizes})")
        add("--methods", type=_names(methods), default=methods, metavar="LIST",
            help=f"loss methods: {','.join(methods)} (default: all)")
        add("--modes", type=_names(MODES), default=modes, metavar="LIST",
            help=f"{','.join(MODES)} (or fwd,bwd,fwd+bwd) (default: {','.join(modes)})")
        add("--providers", type=_names(PROVIDERS), default=providers, metavar="LIST",
            help=f"subset of {','.join(PROVIDERS)} (default: {','.join(providers)})")
        add("--repeats", type=int, metavar="R", help="samples per provider (default: 30; 10 quick)")
        add("--budget-s", type=float, metavar="S", help="a provider stops after S seconds, "
            "once it has 3 samples (default: 2; 0.5 with --quick)")
        add("--reference-limit-s", type=float, default=3.0, metavar="S", help="skip the loop "
            "reference where one fwd+bwd call is estimated over S seconds (default: 3)")
        add("--no-memory", action="store_true", help="skip the peak-memory measurements")
        add("--quick", action="store_true", help=f"10 repeats, 0.5 s budget, memory of "
            f"forward+backward only{quick_note}")
        add("--output", type=Path, default=Path("bench_results"), metavar="DIR",
            help=f"folder for {stem}_<device>.csv and .png (default: bench_results/)")
        add("--threads", type=int, metavar="T", help="torch CPU threads (default: torch's)")
        args = parser.parse_args(argv)
        if min(1 if v is None else v for v in (args.repeats, args.threads)) < 1:
            parser.error(f"--repeats and --threads must be at least 1, got {args.repeats}, "
                         f"{args.threads}")
        try:
            resolve_device(args.device)
        except ValueError as error:
            parser.error(str(error))
        torch.set_num_threads(args.threads or torch.get_num_threads())
        quick = args.quick
        rows = run_benchmark(BenchConfig(
            args.device, args.sizes, args.methods, args.modes, args.providers,
            args.repeats or (10 if quick else 30),
            (0.5 if quick else 2.0) if args.budget_s is None else args.budget_s,
            () if args.no_memory else (FWD_BWD,) if quick else MODES, args.reference_limit_s),
            extra_providers)
        print(format_report(rows), flush=True)
        log("wrote {} and {}".format(*write_outputs(rows, args.output, stem)))
        if failed(rows):
            log("FAILED: a provider is wrong or raised; see the status column")
        return int(failed(rows))
    return main
