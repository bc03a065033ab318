"""What a run prints and writes: the header, the table, the summary, the CSV and the PNG."""

from __future__ import annotations

import csv
import dataclasses
import platform
from pathlib import Path
from typing import Optional

import ge2e_ext
from .common import BASELINE, FLOOR, FWD_BWD, INIT_B, INIT_W, STATUS_OK, format_number
from .runner import Result, Row

ENVIRONMENT_COLUMNS = ["device_name", "torch_version", "threads", "others_cpu_share"]
CSV_COLUMNS = [f.name for f in dataclasses.fields(Row)] + ENVIRONMENT_COLUMNS
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
        " (BUSY MACHINE: timings and ratios may be distorted; rerun when idle)"
        if share > BUSY_SHARE else "")


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
    texts = [f"{BASELINE} is " + ", ".join(parts)] if parts else []
    if floor is not None and floor.speedup_vs:
        texts.append(f"{BASELINE} is {format_number(1 / floor.speedup_vs)}x the time of its "
                     "3 matrix products")
    size, method, mode = rows[0].cell
    return f"  {size.label} {method} {mode}: {'; '.join(texts)}" if texts else None


def format_report(result: Result) -> str:
    cuda = result.device == "cuda"
    lines = [f"GE2E loss benchmark: device {result.device}, {'GPU' if cuda else 'CPU'} "
             f"{result.device_name}, {result.threads} threads",
             f"torch {result.torch_version}, ge2e_ext {ge2e_ext.__version__}, python "
             f"{platform.python_version()}; float32 inputs, w={INIT_W:g}, b={INIT_B:g}",
             "time: median and p20-p80 (ms) of repeats interleaved across providers, by "
             + ("CUDA events" if cuda else "torch.utils.benchmark.Timer"),
             "peak MB: memory one call adds (growth of "
             + ("max_memory_allocated)" if cuda else "VmHWM over VmRSS)"),
             f"speed-up: provider median / {BASELINE} median (above 1: {BASELINE} is faster)",
             f"{FLOOR}: the 3 float32 matrix products of a training step at that size "
             "(E S^T, H S, H^T E), forward+backward blocks only",
             machine_note(result.others_cpu_share)]
    table = [HEADER] + [cells(row) for row in result.rows]
    widths = [max(len(c[i]) for c in table) for i in range(len(HEADER) - 1)]

    def line(values):
        return "  " + "  ".join([values[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(values[1:-1], widths[1:])] + [values[-1]])

    summary_mode = FWD_BWD if any(r.mode == FWD_BWD for r in result.rows) else None
    summary = []
    for cell in dict.fromkeys(row.cell for row in result.rows):
        rows = [row for row in result.rows if row.cell == cell]
        lines += ["", f"N={cell[0].n} M={cell[0].m} D={cell[0].d}  {cell[1]}  {cell[2]}",
                  line(HEADER)] + [line(cells(row)) for row in rows]
        if cell[2] == (summary_mode or cell[2]) and summary_line(rows):
            summary.append(summary_line(rows))
    return "\n".join(lines + (["", "Summary:"] + summary if summary else []))


def write_outputs(result: Result, output_dir: Path, stem: str) -> tuple[Path, Path]:
    """<stem>_<device>.csv and .png, so CPU and CUDA runs can share a folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = (output_dir / f"{stem}_{result.device}.{ext}" for ext in ("csv", "png"))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        environment = {key: getattr(result, key) for key in ENVIRONMENT_COLUMNS}
        writer.writerows({**dataclasses.asdict(row), **environment} for row in result.rows)
    write_plot(result, png_path)
    return csv_path, png_path


def write_plot(result: Result, path: Path) -> None:
    """Time (and peak memory, if measured) of forward+backward (else the first mode) per
    provider and loss method: against N on log-log axes where several N share M and D
    (band: p20-p80), else bars of the first size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = FWD_BWD if any(r.mode == FWD_BWD for r in result.rows) else result.rows[0].mode
    rows = [r for r in result.rows if r.mode == mode and r.status == STATUS_OK and r.median_ms]
    methods = list(dict.fromkeys(r.loss_method for r in result.rows if r.mode == mode))
    metrics = [("median_ms", "time per call (ms)")] + [
        ("peak_mem_mb", "peak memory added by one call (MB)")] * any(r.peak_mem_mb for r in rows)
    ns: dict[tuple[int, int], set[int]] = {}
    for r in rows:
        ns.setdefault((r.M, r.D), set()).add(r.N)
    group = max(ns, key=lambda g: len(ns[g]), default=None)
    sweep = group is not None and len(ns[group]) > 1
    first = result.rows[0]
    figure, axes = plt.subplots(len(metrics), len(methods), squeeze=False,
                                figsize=(6.4 * len(methods), 4.6 * len(metrics)))
    for (line, (metric, label)), (column, method) in (
            (m, c) for m in enumerate(metrics) for c in enumerate(methods)):
        ax = axes[line][column]
        picked = [r for r in rows if r.loss_method == method and getattr(r, metric) and (
            (r.M, r.D) == group if sweep else r.cell[0] == first.cell[0])]
        for name in dict.fromkeys(r.provider for r in picked):
            mine = sorted((r for r in picked if r.provider == name), key=lambda r: r.N)
            x, y, color = [r.N for r in mine], [getattr(r, metric) for r in mine], COLORS.get(name)
            if not sweep:
                ax.bar(name, y[0], color=color)
                ax.annotate(format_number(y[0]), (name, y[0]), ha="center", va="bottom")
                continue
            ax.plot(x, y, marker="o", linestyle="--" if name == FLOOR else "-", color=color,
                    label=name)
            if metric == "median_ms":
                ax.fill_between(x, [r.p20_ms for r in mine], [r.p80_ms for r in mine],
                                color=ax.lines[-1].get_color(), alpha=0.2)
        if sweep:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N speakers per batch (log scale)")
            ax.legend(title="provider (band: p20-p80)" if metric == "median_ms" else "provider")
        ax.set(yscale="log", title=f"{method} loss, {mode}", ylabel=label)
        ax.grid(True, alpha=0.3)
    shape = f"M={group[0]}, D={group[1]}" if sweep else f"N={first.N}, M={first.M}, D={first.D}"
    figure.suptitle(f"GE2E loss, {shape}, float32 (lower is better)\n{result.device}: "
                    f"{result.device_name}, {result.threads} threads, torch {result.torch_version}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
