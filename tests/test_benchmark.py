"""Tests of the benchmark harness (benchmarks/harness/ and its scripts) on tiny sizes.

They check that it runs, what it prints and writes, that its correctness check
catches a wrong provider, the order in which providers take turns, what the floor
row holds, the CUDA-event path (with stand-in events) and the busy-machine flag;
never how fast anything is. Only one test uses the slow-to-compile "compiled" provider.
"""

import ast
import csv
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ge2e_ext
from ge2e_ext import extension_devices, ge2e_loss
from ge2e_ext.reference import ge2e_loss_reference

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_paper  # noqa: E402
import bench_sweep  # noqa: E402
import gpu_floors  # noqa: E402
import gpu_sanitize  # noqa: E402
import harness  # noqa: E402
from harness import cli, common, runner, timing  # noqa: E402
from harness.common import FWD_BWD, MODES, STATUS_OK, Size  # noqa: E402

TINY = Size(4, 3, 8)
FAST_PROVIDERS = ("reference", "eager", "ge2e_ext", "floor")  # no torch.compile: too slow
CSV_COLUMNS = ["device", "N", "M", "D", "loss_method", "mode", "provider", "status",
               "median_ms", "p20_ms", "p80_ms", "repeats", "peak_mem_mb", "speedup_vs",
               "compile_s", "note", "device_name", "torch_version", "threads",
               "others_cpu_share"]  # what `make bench` has always written
EXTENSION_ON_CPU = "cpu" in extension_devices()
METHODS = ge2e_ext.LOSS_METHODS
CPU = torch.device("cpu")


def tiny_config(**overrides):
    settings = dict(device="cpu", sizes=[TINY], providers=FAST_PROVIDERS, repeats=3,
                    budget_s=0.2, memory_modes=())
    return runner.BenchConfig(**{**settings, **overrides})


def scaled_loss(x, w, b, loss_method):
    """A deliberately wrong provider: the right loss times 1.5."""
    return ge2e_loss(x, w, b, loss_method, backend="torch") * 1.5


@pytest.fixture(scope="module")
def tiny_rows():
    """One run of every fast provider, both methods, all modes (shared: it is the slow part)."""
    return runner.run_benchmark(tiny_config())


def failed(rows):
    return any(row.status in (common.STATUS_WRONG, common.STATUS_ERROR) for row in rows)


def rows_of(rows, **match):
    return [r for r in rows if all(getattr(r, k) == v for k, v in match.items())]


def test_every_provider_method_and_mode_gets_a_row(tiny_rows):
    cells = {(r.loss_method, r.mode, r.provider) for r in tiny_rows}
    losses = {(method, mode, provider) for method in METHODS for mode in MODES
              for provider in FAST_PROVIDERS if provider != "floor"}
    floors = {(method, FWD_BWD, "floor") for method in METHODS}
    assert cells == losses | floors  # the floor only where a whole step is timed
    assert len(tiny_rows) == len(cells)
    assert not failed(tiny_rows)


def test_timed_rows_have_ordered_statistics(tiny_rows):
    for row in rows_of(tiny_rows, status=STATUS_OK):
        assert row.repeats == 3  # --repeats caps the samples
        assert 0 < row.p20_ms <= row.median_ms <= row.p80_ms
        assert row.compile_s is None  # none of these providers compiles


def test_extension_row_is_timed_or_skipped_with_a_note(tiny_rows):
    for row in rows_of(tiny_rows, provider="ge2e_ext"):
        if EXTENSION_ON_CPU:
            assert row.status == STATUS_OK and row.speedup_vs == pytest.approx(1.0)
        else:
            assert row.status == common.STATUS_NO_KERNEL and "kernel" in row.note


@pytest.mark.skipif(not EXTENSION_ON_CPU, reason="no ge2e_ext CPU kernel in this build")
def test_speedup_is_the_ratio_of_medians(tiny_rows):
    for row in rows_of(tiny_rows, provider="eager") + rows_of(tiny_rows, provider="floor"):
        (base,) = rows_of(tiny_rows, provider="ge2e_ext", loss_method=row.loss_method,
                          mode=row.mode)
        assert row.speedup_vs == pytest.approx(row.median_ms / base.median_ms)


def test_floor_row_is_timed_with_the_others_and_summarized(tiny_rows):
    for method in METHODS:
        (floor,) = rows_of(tiny_rows, provider="floor", loss_method=method)
        assert floor.mode == FWD_BWD and floor.status == STATUS_OK
        assert floor.repeats == 3 and floor.median_ms > 0
        assert floor.peak_mem_mb is None and "matrix products" in floor.note
    text = cli.format_report(tiny_rows)
    assert "\n  floor " in text and "3 float32 matrix products, not a loss" in text
    if EXTENSION_ON_CPU:
        summary = text.split("Summary:")[1]
        for method in METHODS:
            (floor,) = rows_of(tiny_rows, provider="floor", loss_method=method)
            ratio = common.format_number(1 / floor.speedup_vs)
            assert (f"4x3x8 {method} forward+backward: ge2e_ext is " in summary
                    and f"ge2e_ext is {ratio}x the time of its 3 matrix products" in summary)


def test_floor_computes_the_three_products_into_its_outputs():
    size = Size(5, 3, 7)
    products = common.matrix_products(size, CPU)
    products()
    shapes = {name: (tuple(a.shape), tuple(b.shape), tuple(out.shape))
              for name, a, b, out in products.operands}
    assert shapes == {"E S^T": ((15, 7), (7, 5), (15, 5)), "H S": ((15, 5), (5, 7), (15, 7)),
                      "H^T E": ((5, 15), (15, 7), (5, 7))}
    for _, a, b, out in products.operands:
        assert a.dtype == b.dtype == out.dtype == torch.float32
        assert bool((a != 0).all()) and torch.allclose(out, a @ b, rtol=1e-5, atol=1e-6)
    (only,) = common.matrix_products(size, CPU, ("H S",)).operands
    assert only[0] == "H S"


def test_csv_has_the_columns_of_make_bench_and_the_png_is_written(tiny_rows, tmp_path):
    csv_path, png_path = cli.write_outputs(tiny_rows, tmp_path / "new" / "folder", "t")
    assert csv_path.name == "t_cpu.csv"
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_COLUMNS
        lines = list(reader)
    assert len(lines) == len(tiny_rows)
    assert {line["provider"] for line in lines} == set(FAST_PROVIDERS)
    assert all((line["N"], line["M"], line["D"]) == ("4", "3", "8") for line in lines)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_table_lists_every_provider(tiny_rows):
    text = cli.format_report(tiny_rows)
    assert "torch " + torch.__version__ in text and "torch.utils.benchmark.Timer" in text
    assert "N=4 M=3 D=8  softmax  forward+backward" in text
    for provider in FAST_PROVIDERS:
        assert f"\n  {provider} " in text


def test_a_wrong_provider_is_caught_and_never_timed():
    calls = []

    def counting_scaled_loss(*args):
        calls.append(1)
        return scaled_loss(*args)

    config = tiny_config(providers=("eager",), modes=("forward", FWD_BWD))
    rows = runner.run_benchmark(config, {"broken": counting_scaled_loss})
    broken = rows_of(rows, provider="broken")
    assert len(broken) == 2 * len(METHODS)
    for row in broken:
        assert row.status == common.STATUS_WRONG and "reference" in row.note
        assert row.median_ms is None and row.repeats == 0
    assert len(calls) == len(METHODS)  # one checked call per method, nothing timed
    assert all(r.status == STATUS_OK for r in rows_of(rows, provider="eager"))
    assert failed(rows)


def test_float64_is_the_yardstick_where_the_reference_is_too_slow():
    def shifted_loss(x, w, b, loss_method):
        return ge2e_loss(x, w, b, loss_method, backend="torch") + 1.0

    config = tiny_config(providers=("reference", "eager"), methods=("contrast",),
                         modes=("forward",), reference_limit_s=0.0)
    status = {r.provider: r for r in runner.run_benchmark(config, {"shifted": shifted_loss})}
    assert status["reference"].status == common.STATUS_TOO_SLOW
    assert status["eager"].status == STATUS_OK
    assert status["shifted"].status == common.STATUS_WRONG and "float64" in status["shifted"].note


def test_float64_yardstick_is_the_loss_in_blocks():
    inputs = common.make_inputs(Size(40, 3, 8), CPU)
    doubles = [t.detach().double() for t in inputs]
    for method in METHODS:
        whole = float(ge2e_loss(*doubles, method, backend="torch"))
        loops = float(ge2e_loss_reference(*doubles, method).sum())
        blocks = runner.float64_loss(inputs, method, block=7)  # 40 = 5 blocks of 7 + 5
        assert blocks == pytest.approx(whole, rel=1e-12)
        assert blocks == pytest.approx(loops, rel=1e-12)


def test_providers_take_turns_starting_one_further_each_repeat():
    calls = []

    def prepare_for(name):
        return lambda: (lambda: calls.append(name))

    measured, errors = timing.interleaved({n: prepare_for(n) for n in "abc"}, CPU, 3, 10.0)
    turns = [name for name, _ in itertools.groupby(calls)]  # Timer makes 3 calls a sample
    assert turns == list("abcbcacab") and not errors
    assert [len(measured[n].times) for n in "abc"] == [3, 3, 3]


def test_backward_mode_builds_the_graph_off_the_clock():
    """prepare() builds the graph; the call (what is timed) only runs backward, and only a
    second call after one prepare (a Timer warm-up) builds a graph of its own."""
    forwards = []

    def counting_loss(x, w, b):
        forwards.append(1)
        return ge2e_loss(x, w, b, backend="torch")

    inputs = common.make_inputs(TINY, CPU)
    inputs[0].grad = torch.ones_like(inputs[0])
    call = common.prepare_call(counting_loss, inputs, "backward")
    assert len(forwards) == 1 and inputs[0].grad is None  # grads cleared by prepare
    call()
    assert len(forwards) == 1 and inputs[0].grad is not None
    call()
    assert len(forwards) == 2
    with pytest.raises(ValueError, match="sideways"):
        common.prepare_call(counting_loss, inputs, "sideways")


def test_a_provider_leaves_after_its_budget_or_when_it_raises():
    def failing():
        raise RuntimeError("boom")

    prepares = {"ok": lambda: (lambda: None), "fails": failing}
    measured, errors = timing.interleaved(prepares, CPU, repeats=10, budget_s=0.0)
    assert len(measured["ok"].times) == timing.MIN_REPEATS  # budget spent: the minimum
    assert "fails" not in measured and str(errors["fails"]) == "boom"


def test_cuda_path_times_with_cuda_events(monkeypatch):
    """The CUDA branch, reached with stand-in events (no GPU here): every sample is the
    events' elapsed_time, after two warm-up calls; no Timer and no host clock."""
    made = []

    class StandInEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.recorded = False
            made.append(self)

        def record(self):
            self.recorded = True

        def synchronize(self):
            assert self.recorded

        def elapsed_time(self, end):
            assert self.recorded and end.recorded
            return 2.5  # ms

    monkeypatch.setattr(torch.cuda, "Event", StandInEvent)
    monkeypatch.setattr(timing, "Timer", None)  # the CUDA path must not use it
    calls = []
    prepares = {name: (lambda name=name: lambda: calls.append(name)) for name in "ab"}
    measured, errors = timing.interleaved(prepares, torch.device("cuda"), 4, 10.0)
    assert not errors
    assert calls == [name for name in "abbaabba" for _ in range(3)]  # 2 warm-ups, 1 timed
    assert timing.summary_ms(measured["a"]) == (2.5, 2.5, 2.5, 4)
    assert len(made) == 2 * 3 * 8  # a pair of events per call, warm-ups included
    assert gpu_floors.median_ms(lambda: None, repeats=5, warmup=1) == 2.5  # its own loop


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_sees_what_one_call_allocates():
    held = []
    peak = timing.peak_bytes(lambda: held.append(torch.ones(2 ** 23)), CPU)  # 32 MiB
    assert 2 ** 25 <= peak < 2 ** 25 * 1.5
    config = tiny_config(sizes=[Size(128, 32, 8)], providers=("eager",), methods=("softmax",),
                         modes=("forward", FWD_BWD), memory_modes=(FWD_BWD,),
                         reference_limit_s=0.0)  # the float64 yardstick: no slow reference
    forward, both = runner.run_benchmark(config)
    assert forward.peak_mem_mb is None  # not a memory mode
    assert both.peak_mem_mb >= 128 * 32 * 8 * 4 / 2 ** 20, both.note  # the gradient, at least


def test_compiled_provider_reports_compile_time_in_every_mode():
    config = tiny_config(providers=("compiled",), methods=("softmax",), modes=MODES)
    rows = runner.run_benchmark(config)
    assert [r.mode for r in rows] == list(MODES)
    for row in rows:
        assert row.status == STATUS_OK, row.note
        assert row.compile_s > 0 and row.repeats == 3
    forward, backward, both = (r.compile_s for r in rows)
    assert both == pytest.approx(forward + backward)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_measures_memory_in_process():
    config = tiny_config(device="cuda", providers=("eager", "ge2e_ext", "floor"),
                         methods=("softmax",), memory_modes=MODES)
    rows = runner.run_benchmark(config)
    assert not failed(rows)
    for row in rows_of(rows, status=STATUS_OK):
        assert row.device == "cuda" and (row.peak_mem_mb is None) == (row.provider == "floor")


def test_main_writes_files_and_exits_nonzero_on_a_wrong_provider(tmp_path, capsys):
    argv = ["--device", "cpu", "--sizes", "4x3x8", "--providers", "eager,floor", "--methods",
            "softmax", "--modes", "fwd+bwd", "--repeats", "3", "--no-memory", "--output",
            str(tmp_path)]
    assert bench_paper.main(argv) == 0
    assert (tmp_path / "ge2e_bench_cpu.csv").exists() and (tmp_path / "ge2e_bench_cpu.png").exists()
    assert bench_sweep.main(argv, extra_providers={"broken": scaled_loss}) == 1
    assert (tmp_path / "ge2e_sweep_cpu.csv").exists()
    assert "wrong" in capsys.readouterr().out


def test_cli_help_explains_the_options(capsys):
    done = subprocess.run([sys.executable, str(BENCH_DIR / "bench_paper.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--device", "--sizes", "--quick", "--output", "--methods", "--modes",
                   "--providers", "--repeats", "--budget-s", "--no-memory", "VmHWM",
                   "clear_refs", "round robin", "Timer.timeit", "torch.cuda.Event", "H.T @ E",
                   "max_memory_allocated", "(default: paper)"):
        assert option in done.stdout, option
    with pytest.raises(SystemExit):
        bench_sweep.main(["--help"])
    sweep_help = capsys.readouterr().out
    assert "(default: n)" in sweep_help and "default: reference,eager,ge2e_ext,floor" in sweep_help
    with pytest.raises(SystemExit):
        gpu_floors.main(["--help"])
    assert "launch floor" in capsys.readouterr().out


def test_bad_arguments_exit_with_2(capsys):
    for argv in (["--sizes", "64x10"], ["--providers", "nope"], ["--modes", "sideways"],
                 ["--repeats", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_paper.main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()


def test_harness_modules_import_only_earlier_layers():
    """No import cycles: each module imports only harness modules before it in LAYERS."""
    files = {path.stem for path in (BENCH_DIR / "harness").glob("*.py")} - {"__init__"}
    assert files == set(harness.LAYERS)
    for position, name in enumerate(harness.LAYERS):
        tree = ast.parse((BENCH_DIR / "harness" / f"{name}.py").read_text())
        imported = {node.module or alias.name for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1
                    for alias in node.names}
        assert imported <= set(harness.LAYERS[:position]), (name, imported)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_gpu_scripts_exit_with_2_without_a_gpu(tmp_path, capsys):
    assert gpu_floors.main(["--output", str(tmp_path)]) == 2
    assert gpu_sanitize.main() == 2
    assert "CUDA" in capsys.readouterr().err


@pytest.mark.skipif(not EXTENSION_ON_CPU, reason="no ge2e_ext CPU kernel in this build")
def test_sanitizer_workload_runs_every_case_on_the_cpu_kernel():
    for case in itertools.product(gpu_sanitize.SHAPES, METHODS, gpu_sanitize.DTYPES,
                                  gpu_sanitize.REDUCTIONS):
        assert gpu_sanitize.one_case(*case, device="cpu") == [], case


def test_gpu_check_budgets_fit_in_seven_minutes():
    script = (BENCH_DIR / "gpu_check.sh").read_text()
    budgets = re.search(r'BUDGETS=\$\{GPU_CHECK_BUDGETS:-"([^"]+)"\}', script).group(1)
    seconds = {name: int(value) for name, value in (e.split(":") for e in budgets.split())}
    assert sum(seconds.values()) < 420
    assert {"build", "tests", "memcheck", "racecheck", "initcheck", "synccheck", "paper",
            "sweep"} <= set(seconds)
    assert subprocess.run(["bash", "-n", str(BENCH_DIR / "gpu_check.sh")]).returncode == 0


def test_n_sweep_plot_is_written_from_rows(tmp_path):
    """The plot of several sizes, from hand-made rows (no benchmark run needed)."""
    rows = []
    for n, (provider, ms), method in itertools.product(
            (8, 16, 32), (("eager", 0.1), ("ge2e_ext", 0.05), ("floor", 0.03)), METHODS):
        rows.append(runner.Row("cpu", n, 10, 64, method, FWD_BWD, provider,
                               median_ms=ms * n, p20_ms=ms * n * 0.9, p80_ms=ms * n * 1.1,
                               repeats=3, peak_mem_mb=None if provider == "floor" else n))
    _, png_path = cli.write_outputs(rows, tmp_path, "sweep")
    assert png_path.stat().st_size > 10_000


def test_parse_sizes():
    assert common.parse_sizes("64x10x256, 4x3x8,64x10x256") == [Size(64, 10, 256),
                                                                 Size(4, 3, 8)]
    assert common.parse_sizes("paper") == [common.PAPER_SIZE]
    assert common.parse_sizes("n") == common.N_SWEEP and len(common.N_SWEEP) == 10
    sweep = common.parse_sizes("sweep")
    assert Size(4096, 10, 256) in sweep and Size(64, 2, 256) in sweep
    assert Size(64, 10, 1024) in sweep and len(sweep) == len(set(sweep)) == 17
    for bad in ("64x10", "1x10x256", "axbxc", ""):
        with pytest.raises(ValueError):
            common.parse_sizes(bad)


def test_percentiles_and_number_format():
    from torch.utils.benchmark import Measurement, TaskSpec

    measurement = Measurement(1, [0.001, 0.002, 0.003, 0.004, 0.005], TaskSpec("x", "pass"))
    assert timing.summary_ms(measurement) == pytest.approx((3, 1.8, 4.2, 5))
    assert [common.format_number(v) for v in (612.3, 61.23, 6.123, 0.6123, None)] == [
        "612", "61.2", "6.12", "0.612", "-"]


def test_busy_machine_is_flagged_from_the_others_cpu_time():
    """A fake load: two cpu_times() samples 10 s apart on 2 CPUs, this process busy for 4 s."""
    quiet = timing.others_share((100.0, 1.0, 0.0), (104.4, 5.0, 10.0), cpus=2)  # others: 0.4 s
    busy = timing.others_share((100.0, 1.0, 0.0), (114.0, 5.0, 10.0), cpus=2)  # others: 10 s
    assert quiet == pytest.approx(0.02) and busy == pytest.approx(0.5)
    assert "2% of the CPUs" in cli.machine_note(quiet) and "BUSY" not in cli.machine_note(quiet)
    assert "BUSY MACHINE" in cli.machine_note(busy)
    assert "n/a" in cli.machine_note(timing.others_share(None, (1.0, 1.0, 1.0)))
    share = timing.others_share(timing.cpu_times(), timing.cpu_times())
    assert share is None or 0.0 <= share <= 1.0
