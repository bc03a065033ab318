"""The command line the benchmark scripts share; METHOD is the --help text on how it measures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

import ge2e_ext
from .common import FWD_BWD, MODE_ALIASES, MODES, PROVIDERS, SIZE_HELP, log, parse_sizes
from .report import write_outputs, format_report
from .runner import BenchConfig, resolve_device, run_benchmark

METHOD = """\
How it measures (benchmarks/harness/), on float32 embeddings (N, M, D) from randn and
w=10, b=-5, all requiring grad:
  reference  the per-utterance Python loops (ge2e_ext.reference); "skipped (too slow)"
             where one fwd+bwd call, a measured N=16 call scaled by N*N*M, would exceed
             --reference-limit-s
  eager      ge2e_loss(..., backend="torch");  compiled: torch.compile of it (its first
             calls' time is compile_s; each size and method compiles afresh)
  ge2e_ext   ge2e_loss(..., backend="extension"); "skipped (no kernel)" where none
  floor      not a loss: E @ S.T, H @ S and H.T @ E by torch.mm (E the embeddings as
             (N*M, D), S the (N, D) speaker sums, H an (N*M, N) matrix), the float32
             products of one training step; forward+backward only; the summary gives
             ge2e_ext's time as a multiple of it
Modes: forward (with its graph), backward (graph built off the clock, kept by
retain_graph and freed off the clock) and forward+backward; grads are set to None
before every call. Before any timing each provider's loss is checked against the
reference's (or the pure-PyTorch path's in float64 where the reference is skipped) at
rtol 1e-4: one that disagrees is "wrong", is not timed, and makes the exit code 1.
Timing: repeats in which the providers take turns (round robin, each repeat starting
one further on), so load that drifts hits all alike; a provider stops after --budget-s
once it has 3 samples. A sample: CPU, torch.utils.benchmark.Timer.timeit(1) (2
warm-up calls, then the timed one); CUDA, the same warm-up, then torch.cuda.Event
pairs. Reported: the median of the samples' Measurement and its 20th/80th
percentiles; speed-up = provider median / ge2e_ext median. The header says how much
CPU other processes took while timing and flags a busy machine.
Memory, after all timing: the peak one call adds over what was live before it. CUDA:
max_memory_allocated after reset_peak_memory_stats minus memory_allocated; CPU:
VmHWM (reset through /proc/self/clear_refs) minus VmRSS, glibc told by mallopt to
return freed memory. MB = 2**20 bytes.
Output: progress on stderr, table and summary on stdout, <stem>_<device>.csv and .png
under --output. Exit code 0; 1 when a provider is wrong or raised; 2 for bad arguments.
"""


def _parse(convert: Callable):
    def parse(text: str):
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


def _names(allowed: Sequence[str], aliases: Mapping[str, str] = {}):  # noqa: B006 (read only)
    def convert(text: str) -> list[str]:
        items = list(dict.fromkeys(aliases.get(t.strip(), t.strip()) for t in text.split(",")))
        if not text.strip() or any(t not in allowed for t in items):
            raise ValueError(f"{text!r}: choose from {', '.join(allowed)}")
        return items
    return _parse(convert)


def script(prog: str, description: str, stem: str, sizes: str, modes: Sequence[str] = MODES,
           providers: Sequence[str] = PROVIDERS, quick_note: str = ""):
    """A script's main(argv=None, extra_providers=None) -> exit code."""
    def main(argv: Optional[Sequence[str]] = None,
             extra_providers: Optional[Mapping[str, Callable]] = None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=description, epilog=METHOD,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add = parser.add_argument
        methods = tuple(ge2e_ext.LOSS_METHODS)
        add("--device", choices=("auto", "cpu", "cuda"), default="auto",
            help="where to run; auto: cuda if available, else cpu (default: auto)")
        add("--sizes", type=_parse(parse_sizes), default=sizes, metavar="LIST",
            help=f"{SIZE_HELP} (default: {sizes})")
        add("--methods", type=_names(methods), default=methods, metavar="LIST",
            help=f"loss methods: {','.join(methods)} (default: all)")
        add("--modes", type=_names(MODES, MODE_ALIASES), default=modes, metavar="LIST",
            help=f"forward,backward,forward+backward (or fwd,bwd,fwd+bwd) (default: {','.join(modes)})")
        add("--providers", type=_names(PROVIDERS), default=providers, metavar="LIST",
            help=f"subset of {','.join(PROVIDERS)} (default: {','.join(providers)})")
        add("--repeats", type=int, default=None, metavar="R",
            help="samples per provider at most (default: 30; 10 with --quick)")
        add("--budget-s", type=float, default=None, metavar="S", help="a provider stops "
            "after S seconds, once it has 3 samples (default: 2; 0.5 with --quick)")
        add("--reference-limit-s", type=float, default=3.0, metavar="S", help="skip the "
            "loop reference where one fwd+bwd call is estimated over S seconds (default: 3)")
        add("--no-memory", action="store_true", help="skip the peak-memory measurements")
        add("--quick", action="store_true", help="10 repeats, 0.5 s budget, memory of "
            f"forward+backward only{quick_note}")
        add("--output", type=Path, default=Path("bench_results"), metavar="DIR",
            help=f"folder for {stem}_<device>.csv and .png (default: bench_results/)")
        add("--threads", type=int, default=None, metavar="T",
            help="torch CPU threads (default: torch's default)")
        args = parser.parse_args(argv)
        if min(1 if v is None else v for v in (args.repeats, args.threads)) < 1:
            parser.error("--repeats and --threads must be at least 1")
        try:
            resolve_device(args.device)
        except ValueError as error:
            parser.error(str(error))
        if args.threads:
            torch.set_num_threads(args.threads)
        quick = args.quick
        config = BenchConfig(
            args.device, args.sizes,
            args.methods, args.modes, args.providers, args.repeats or (10 if quick else 30),
            (0.5 if quick else 2.0) if args.budget_s is None else args.budget_s,
            () if args.no_memory else (FWD_BWD,) if quick else MODES, args.reference_limit_s)
        result = run_benchmark(config, extra_providers)
        print(format_report(result), flush=True)
        csv_path, png_path = write_outputs(result, args.output, stem)
        log(f"wrote {csv_path} and {png_path}")
        if result.failed:
            log("FAILED: a provider is wrong or raised; see the status column")
        return 1 if result.failed else 0
    return main
