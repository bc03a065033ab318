"""Tests of the benchmark harness (benchmarks/bench_ge2e.py) on tiny sizes.

They check that it runs, what it writes and that its correctness guard works;
never how fast anything is. Only one test uses the slow-to-compile "compiled"
provider.
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ge2e_ext import extension_devices, ge2e_loss

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_ge2e  # noqa: E402

TINY = bench_ge2e.Size(4, 3, 8)
FAST_PROVIDERS = ("reference", "eager", "ge2e_ext")  # no torch.compile: too slow for most tests
REQUIRED_COLUMNS = {"device", "N", "M", "D", "loss_method", "mode", "provider", "status",
                    "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "speedup_vs", "compile_s"}
EXTENSION_ON_CPU = "cpu" in extension_devices()


def tiny_config(tmp_path, **overrides):
    settings = dict(device="cpu", sizes=[TINY], providers=FAST_PROVIDERS, repeats=3, warmup=1,
                    budget_s=0.2, memory_modes=(), output_dir=tmp_path)
    settings.update(overrides)
    return bench_ge2e.BenchConfig(**settings)


def scaled_loss(x, w, b, loss_method):
    """A deliberately wrong provider: the right loss times 1.5."""
    return ge2e_loss(x, w, b, loss_method, backend="torch") * 1.5


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """One run of every fast provider, both methods, all modes (shared: it is the slow part)."""
    return bench_ge2e.run_benchmark(tiny_config(tmp_path_factory.mktemp("bench")))


def rows_of(result, **match):
    return [r for r in result.rows if all(getattr(r, k) == v for k, v in match.items())]


def test_every_provider_method_and_mode_gets_a_row(tiny_result):
    cells = {(r.loss_method, r.mode, r.provider) for r in tiny_result.rows}
    assert cells == {(method, mode, provider) for method in bench_ge2e.LOSS_METHODS
                     for mode in bench_ge2e.MODES for provider in FAST_PROVIDERS}
    assert len(tiny_result.rows) == len(cells)
    assert not tiny_result.failed


def test_timed_rows_have_ordered_statistics(tiny_result):
    for row in rows_of(tiny_result, status=bench_ge2e.STATUS_OK):
        assert row.repeats >= 3
        assert 0 < row.p20_ms <= row.median_ms <= row.p80_ms
        assert row.compile_s is None  # none of these providers compiles


def test_extension_row_is_timed_or_skipped_with_a_note(tiny_result):
    for row in rows_of(tiny_result, provider="ge2e_ext"):
        if EXTENSION_ON_CPU:
            assert row.status == bench_ge2e.STATUS_OK
            assert row.speedup_vs == pytest.approx(1.0)
        else:
            assert row.status == bench_ge2e.STATUS_NO_KERNEL and "kernel" in row.note


def test_speedup_is_the_ratio_of_medians(tiny_result):
    if not EXTENSION_ON_CPU:
        pytest.skip("no ge2e_ext CPU kernel in this build")
    for row in rows_of(tiny_result, provider="eager"):
        base = rows_of(tiny_result, provider="ge2e_ext", loss_method=row.loss_method,
                       mode=row.mode)[0]
        assert row.speedup_vs == pytest.approx(row.median_ms / base.median_ms)


def test_csv_and_png_are_written(tiny_result, tmp_path):
    csv_path, png_path = bench_ge2e.write_outputs(tiny_result, tmp_path / "new" / "folder")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert REQUIRED_COLUMNS <= set(reader.fieldnames)
        lines = list(reader)
    assert len(lines) == len(tiny_result.rows)
    assert {line["provider"] for line in lines} == set(FAST_PROVIDERS)
    assert all(line["N"] == "4" and line["M"] == "3" and line["D"] == "8" for line in lines)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_table_lists_every_provider(tiny_result):
    report = bench_ge2e.format_report(tiny_result)
    assert "torch " + torch.__version__ in report
    assert "N=4 M=3 D=8  softmax  forward+backward" in report
    for provider in FAST_PROVIDERS:
        assert f"\n  {provider} " in report


def test_a_wrong_provider_is_caught_and_never_timed(tmp_path):
    calls = []

    def counting_scaled_loss(*args):
        calls.append(1)
        return scaled_loss(*args)

    config = tiny_config(tmp_path, providers=("eager",), modes=("forward", "forward+backward"))
    result = bench_ge2e.run_benchmark(config, extra_providers={"broken": counting_scaled_loss})
    broken = rows_of(result, provider="broken")
    assert len(broken) == 4  # 2 methods x 2 modes
    for row in broken:
        assert row.status == bench_ge2e.STATUS_WRONG
        assert "reference" in row.note
        assert row.median_ms is None and row.repeats == 0
    assert len(calls) == 2  # one guard call per method, nothing timed
    assert all(r.status == bench_ge2e.STATUS_OK for r in rows_of(result, provider="eager"))
    assert result.failed


def test_float64_eager_is_the_yardstick_where_the_reference_is_too_slow(tmp_path):
    def shifted_loss(x, w, b, loss_method):
        return ge2e_loss(x, w, b, loss_method, backend="torch") + 1.0

    config = tiny_config(tmp_path, methods=("contrast",), modes=("forward",),
                         reference_limit_s=0.0)
    result = bench_ge2e.run_benchmark(config, extra_providers={"shifted": shifted_loss})
    status = {r.provider: r for r in result.rows}
    assert status["reference"].status == bench_ge2e.STATUS_TOO_SLOW
    assert status["eager"].status == bench_ge2e.STATUS_OK
    assert status["shifted"].status == bench_ge2e.STATUS_WRONG
    assert "eager float64" in status["shifted"].note


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_cpu_memory_probe_runs_in_a_subprocess(tmp_path):
    config = tiny_config(tmp_path, sizes=[bench_ge2e.Size(8, 4, 64)], providers=("eager",),
                         methods=("softmax",), modes=("forward", "forward+backward"),
                         memory_modes=("forward+backward",))
    result = bench_ge2e.run_benchmark(config)
    forward, both = result.rows
    assert forward.peak_mem_mb is None  # not a memory mode
    assert both.status == bench_ge2e.STATUS_OK
    assert both.peak_mem_mb is not None and both.peak_mem_mb >= 0, both.note


def test_compiled_provider_reports_compile_time(tmp_path):
    config = tiny_config(tmp_path, providers=("compiled",), methods=("softmax",),
                         modes=("forward",))
    (row,) = bench_ge2e.run_benchmark(config).rows
    assert row.status == bench_ge2e.STATUS_OK, row.note
    assert row.compile_s is not None and row.compile_s > 0
    assert row.repeats >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_measures_memory_in_process(tmp_path):
    config = tiny_config(tmp_path, device="cuda", providers=("eager", "ge2e_ext"),
                         methods=("softmax",), memory_modes=bench_ge2e.MODES)
    result = bench_ge2e.run_benchmark(config)
    assert not result.failed
    for row in rows_of(result, status=bench_ge2e.STATUS_OK):
        assert row.device == "cuda" and row.peak_mem_mb is not None


def test_main_writes_files_and_exits_nonzero_on_a_wrong_provider(tmp_path, capsys):
    argv = ["--device", "cpu", "--sizes", "4x3x8", "--providers", "eager", "--methods",
            "softmax", "--modes", "fwd", "--repeats", "3", "--no-memory", "--output",
            str(tmp_path)]
    assert bench_ge2e.main(argv) == 0
    assert (tmp_path / "ge2e_bench_cpu.csv").exists()
    assert (tmp_path / "ge2e_bench_cpu.png").exists()
    assert bench_ge2e.main(argv, extra_providers={"broken": scaled_loss}) == 1
    assert "wrong" in capsys.readouterr().out


def test_cli_help_explains_the_options():
    done = subprocess.run([sys.executable, str(BENCH_DIR / "bench_ge2e.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--device", "--sizes", "--quick", "--output", "--methods", "--modes",
                   "--repeats", "--no-memory", "VmHWM", "clear_refs"):
        assert option in done.stdout


def test_n_sweep_plot_is_written_from_rows(tmp_path):
    """The log-log plot against N, from hand-made rows (no benchmark run needed)."""
    rows = []
    for n in (8, 16, 32):
        for provider, ms in (("eager", 0.1 * n), ("ge2e_ext", 0.05 * n)):
            for method in bench_ge2e.LOSS_METHODS:
                rows.append(bench_ge2e.Row("cpu", n, 10, 64, method, "forward+backward", provider,
                                           median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1,
                                           repeats=3, peak_mem_mb=ms))
    environment = bench_ge2e.describe_environment(torch.device("cpu"))
    result = bench_ge2e.BenchResult(environment, rows)
    assert bench_ge2e.n_sweep_group(rows) == (10, 64)
    _, png_path = bench_ge2e.write_outputs(result, tmp_path)
    assert png_path.stat().st_size > 10_000


def test_parse_sizes():
    assert bench_ge2e.parse_sizes("64x10x256, 4x3x8,64x10x256") == [
        bench_ge2e.Size(64, 10, 256), bench_ge2e.Size(4, 3, 8)]
    sweep = bench_ge2e.parse_sizes("sweep")
    assert bench_ge2e.Size(4096, 10, 256) in sweep and bench_ge2e.Size(64, 2, 256) in sweep
    assert bench_ge2e.Size(64, 10, 1024) in sweep
    assert len(sweep) == len(set(sweep)) == 17
    for bad in ("64x10", "1x10x256", "axbxc", ""):
        with pytest.raises(ValueError):
            bench_ge2e.parse_sizes(bad)


def test_percentile_and_number_format():
    assert bench_ge2e.percentile([1, 2, 3, 4, 5], 20) == pytest.approx(1.8)
    assert bench_ge2e.percentile([7], 80) == 7
    assert [bench_ge2e.format_number(v) for v in (612.3, 61.23, 6.123, 0.6123, None)] == [
        "612", "61.2", "6.12", "0.612", "-"]


def test_float64_yardstick_blocks_add_up_to_the_whole(monkeypatch):
    inputs = bench_ge2e.make_inputs(bench_ge2e.Size(40, 3, 8), torch.device("cpu"))
    doubles = [t.detach().double() for t in inputs.tensors]
    for method in bench_ge2e.LOSS_METHODS:
        whole = float(ge2e_loss(*doubles, method, backend="torch"))
        monkeypatch.setattr(bench_ge2e, "YARDSTICK_BLOCK", 7)  # 40 = 5 blocks of 7 + 5
        assert bench_ge2e.float64_loss(inputs, method) == pytest.approx(whole, rel=1e-12)


def test_report_flags_a_busy_machine():
    environment = bench_ge2e.describe_environment(torch.device("cpu"))
    environment.others_cpu_share = 0.02
    assert "2% of the CPUs" in bench_ge2e.competition_note(environment)
    assert "BUSY" not in bench_ge2e.competition_note(environment)
    environment.others_cpu_share = 0.5
    assert "BUSY" in bench_ge2e.competition_note(environment)
