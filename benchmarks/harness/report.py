"""What a run prints and writes: the header, the table, the summary lines, the CSV."""

from __future__ import annotations

import csv
import dataclasses
import platform
from pathlib import Path
from typing import Optional, Sequence

from .common import FWD_BWD, STATUS_OK, format_number, unique
from .providers import BASELINE, FLOOR, INIT_B, INIT_W
from .runner import BenchResult, Environment, Row

ENVIRONMENT_COLUMNS = ["device_name", "torch_version", "threads", "others_cpu_share"]
CSV_COLUMNS = [f.name for f in dataclasses.fields(Row)] + ENVIRONMENT_COLUMNS
BUSY_MACHINE_SHARE = 0.10  # other processes' CPU share above which timings are suspect
TABLE_HEADER = ("provider", "median ms", "p20-p80 ms", "runs", "peak MB", "speed-up", "status")


def _relation(ratio: float, above: str, below: str) -> str:
    """'2.64x <above>' for a ratio of 2.64, '1.10x <below>' for 1/1.10."""
    if ratio >= 1:
        return f"{format_number(ratio)}x {above}"
    return f"{format_number(1 / ratio)}x {below}"


def speed_relation(speedup: float) -> str:
    """ge2e_ext's speed-up (provider median / ge2e_ext median) in words."""
    return _relation(speedup, "faster", "slower")


def memory_relation(ratio: float) -> str:
    """ratio = provider peak / ge2e_ext peak, worded from ge2e_ext's side."""
    return _relation(ratio, "less memory", "more memory")


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
        f"{FLOOR}: the 3 float32 matrix products of a training step at that size "
        "(E S^T, H S, H^T E), forward+backward blocks only",
        competition_note(env),
    ]


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
    for cell in unique(row.cell for row in rows):
        size, method, mode = cell
        lines += ["", f"N={size.n} M={size.m} D={size.d}  {method}  {mode}", line(TABLE_HEADER)]
        lines += [line(row_cells(row)) for row in rows if row.cell == cell]
    return lines


def summary_line(rows: Sequence[Row]) -> Optional[str]:
    """One cell's answer: ge2e_ext against every other provider, and against its floor."""
    by_provider = {row.provider: row for row in rows}
    base = by_provider.get(BASELINE)
    if base is None or base.status != STATUS_OK:
        return None
    parts = []
    for name, row in by_provider.items():
        if name in (BASELINE, FLOOR) or row.speedup_vs is None:
            continue
        part = f"{speed_relation(row.speedup_vs)} than {name}"
        if row.peak_mem_mb and base.peak_mem_mb:
            part += f" ({memory_relation(row.peak_mem_mb / base.peak_mem_mb)})"
        parts.append(part)
    text = f"{BASELINE} is " + ", ".join(parts) if parts else ""
    floor = by_provider.get(FLOOR)
    if floor is not None and floor.speedup_vs:
        text += ("; " if text else "") + (f"{BASELINE} is {format_number(1 / floor.speedup_vs)}x"
                                          " the time of its 3 matrix products")
    size, method, mode = rows[0].cell
    return f"  {size.label} {method} {mode}: {text}" if text else None


def summary_lines(rows: Sequence[Row]) -> list[str]:
    """One line per (size, method) of forward+backward (or of the only mode run)."""
    mode = FWD_BWD if any(r.mode == FWD_BWD for r in rows) else rows[0].mode if rows else None
    cells = unique(row.cell for row in rows if row.mode == mode)
    lines = [summary_line([row for row in rows if row.cell == cell]) for cell in cells]
    lines = [line for line in lines if line]
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


def write_outputs(result: BenchResult, output_dir: Path, stem: str) -> tuple[Path, Path]:
    """<stem>_<device>.csv and .png, so CPU and CUDA runs can share a folder."""
    from .plot import write_plot  # matplotlib only when a plot is written

    output_dir.mkdir(parents=True, exist_ok=True)
    base = output_dir / f"{stem}_{result.environment.device}"
    csv_path, png_path = base.with_suffix(".csv"), base.with_suffix(".png")
    write_csv(result, csv_path)
    write_plot(result, png_path)
    return csv_path, png_path
