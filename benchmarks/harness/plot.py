"""The PNG: time (and peak memory, if measured) of forward+backward per provider, one
column per loss method; against N on log-log axes when several N were run, else bars."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .common import FWD_BWD, STATUS_OK, format_number, unique
from .providers import BASELINE, FLOOR
from .report import speed_relation
from .runner import BenchResult, Row

PROVIDER_STYLES = {  # color, marker, line style
    "reference": ("tab:red", "s", "-"), "eager": ("tab:blue", "o", "-"),
    "compiled": ("tab:purple", "^", "-"), BASELINE: ("tab:green", "D", "-"),
    FLOOR: ("tab:gray", "", "--"),
}
LEGEND_NAMES = {FLOOR: "floor (3 matrix products)"}


def _style(provider: str) -> dict:
    color, marker, linestyle = PROVIDER_STYLES.get(provider, ("tab:brown", "x", "-"))
    return {"color": color, "marker": marker, "linestyle": linestyle}


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    mode = FWD_BWD if any(r.mode == FWD_BWD for r in rows) else rows[0].mode
    timed = [r for r in rows if r.mode == mode and r.status == STATUS_OK and r.median_ms]
    methods = unique(r.loss_method for r in rows if r.mode == mode)
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

    for provider in unique(r.provider for r in rows):
        points = sorted((r.N, getattr(r, metric), r) for r in rows
                        if r.provider == provider and getattr(r, metric))
        if not points:
            continue
        ns = [p[0] for p in points]
        ax.plot(ns, [p[1] for p in points], label=LEGEND_NAMES.get(provider, provider),
                **_style(provider))
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
        if metric == "median_ms" and row.speedup_vs and row.provider == FLOOR:
            text += f"\n({BASELINE}: {format_number(1 / row.speedup_vs)}x this)"
        elif metric == "median_ms" and row.speedup_vs and row.provider != BASELINE:
            text += f"\n({BASELINE} {speed_relation(row.speedup_vs)})"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                    textcoords="offset points")
    ax.set_yscale("log")
    ax.margins(y=0.25)
    ax.set_xlabel("provider")
