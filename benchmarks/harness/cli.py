"""The command line the benchmark scripts share; METHOD is the --help text on how it measures."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

import ge2e_ext
from .common import FWD_BWD, MODE_ALIASES, MODES, SIZE_HELP, log, parse_sizes, unique
from .providers import BUILTIN_NAMES
from .report import format_report, write_outputs
from .runner import BenchConfig, resolve_device, run_benchmark

METHOD = """\
How it measures (benchmarks/harness/):

Providers, all fed the same float32 inputs: embeddings (N, M, D) from randn,
requiring grad, and w=10, b=-5 as 0-dim tensors requiring grad:
  reference  the original per-utterance Python loops (ge2e_ext.reference); skipped,
             as "skipped (too slow)", where one forward+backward call is estimated
             (a measured N=16 call scaled by N*N*M) to exceed --reference-limit-s
  eager      ge2e_loss(..., backend="torch"), the vectorized pure-PyTorch path
  compiled   torch.compile of the eager path; its first calls' time is reported as
             compile_s (forward and backward compile lazily, so the fwd+bwd row adds
             both); every size and loss method compiles from scratch (the first
             compile in a process also pays torch.compile's start-up, and later
             runs reuse its on-disk caches, so compile_s varies from run to run)
  ge2e_ext   ge2e_loss(..., backend="extension"), the compiled C++/CUDA op;
             "skipped (no kernel)" where this install has none for the device
  floor      not a loss: the three float32 matrix products of one training step at
             that size. With E the embeddings as (N*M, D), S the (N, D) speaker sums
             and H an (N*M, N) matrix: E @ S.T, H @ S and H.T @ E, by torch.mm into
             preallocated outputs, on random data, timed in the same rotation as the
             losses. Shown in forward+backward blocks only (it is the work of a whole
             step); the summary gives ge2e_ext's time as a multiple of it ("1.4x the
             time of its 3 matrix products"), for the contrast loss too, whose step
             may need fewer products.

Modes: "forward" (the loss with its autograd graph, as in training), "backward"
(graph built outside the measured region, only loss.backward() measured) and
"forward+backward". Gradients are set to None before every call, so each call
allocates and writes them afresh.

Correctness guard: before anything is timed, each provider's loss is compared with
the reference's (or, where the reference is skipped, with the pure-PyTorch path's
in float64, a block of speakers at a time) at rtol 1e-4; a provider that
disagrees is reported "wrong", is not timed, and makes the exit code 1.

Timing: warm-up calls, then repeats in which the providers take turns (round
robin, each repeat starting one provider further on), all in this one process, so
load that drifts during the run hits every provider in the same repeats instead of
skewing a ratio (contention that slows some kinds of work more than others still
can: prefer an idle machine; the header says how much CPU time other processes
took while timing and flags a busy machine). A provider stops repeating once it
has spent --budget-s seconds (after at least 3 repeats). Reported: median and
20th/80th percentiles in ms; the speed-up of ge2e_ext over a provider is the ratio
of the two medians. CPU times: time.perf_counter; CUDA: torch.cuda.Event pairs
after a synchronize.

Memory: the peak one call adds over what was live just before it (the inputs, and
in "backward" mode the graph). CUDA: torch.cuda.max_memory_allocated after
reset_peak_memory_stats, minus memory_allocated before. CPU: each (provider, size,
method, mode) in a fresh subprocess, after all timing: VmRSS from
/proc/self/status, then "5" written to /proc/self/clear_refs (resets the peak
VmHWM), the call, VmHWM; glibc is told to return freed memory
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_). MB means 2**20 bytes.

Output: progress on stderr, the table and a summary on stdout, and under --output
DIR a CSV of every row and a PNG (time and peak memory of forward+backward against
N on log-log axes when several N are run, else bars per provider). Exit code: 0;
1 when a provider is "wrong" or fails with an error; 2 for bad arguments.
"""


@dataclass(frozen=True)
class Defaults:
    """What a script runs when given no options."""

    stem: str  # output files <stem>_<device>.csv/.png
    sizes: str  # as --sizes takes it
    modes: Sequence[str] = MODES
    providers: Optional[Sequence[str]] = None  # None: all
    quick_note: str = ""


def _comma_list(allowed: Sequence[str], aliases: Optional[Mapping[str, str]] = None):
    def parse(text: str) -> list[str]:
        items = [(aliases or {}).get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(allowed)}")
        return unique(items)
    return parse


def _at_least(lowest: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
        return value
    return parse


def _sizes(text: str):
    try:
        return parse_sizes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser(prog: str, description: str, defaults: Defaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=METHOD,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = tuple(ge2e_ext.LOSS_METHODS)
    default_providers = ",".join(defaults.providers or BUILTIN_NAMES)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run; auto: cuda if available, else cpu (default: auto)")
    parser.add_argument("--sizes", type=_sizes, default=_sizes(defaults.sizes), metavar="LIST",
                        help=f"{SIZE_HELP} (default: {defaults.sizes})")
    parser.add_argument("--methods", type=_comma_list(methods), default=list(methods),
                        metavar="LIST", help=f"loss methods: {','.join(methods)} (default: all)")
    parser.add_argument("--modes", type=_comma_list(MODES, MODE_ALIASES),
                        default=list(defaults.modes), metavar="LIST",
                        help="forward,backward,forward+backward (or fwd,bwd,fwd+bwd) "
                             f"(default: {','.join(defaults.modes)})")
    parser.add_argument("--providers", type=_comma_list(BUILTIN_NAMES),
                        default=list(defaults.providers or BUILTIN_NAMES), metavar="LIST",
                        help=f"subset of {','.join(BUILTIN_NAMES)} (default: "
                             f"{default_providers})")
    parser.add_argument("--repeats", type=_at_least(1), default=None, metavar="R",
                        help="measured repeats per provider (default: 30; 10 with --quick)")
    parser.add_argument("--warmup", type=_at_least(0), default=None, metavar="W",
                        help="unmeasured calls per mode before the repeats, on top of the "
                             "correctness check's first call; providers slower than a quarter "
                             "budget get none (default: 3; 1 with --quick)")
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="a provider stops repeating after S seconds, once it has 3 "
                             "repeats (default: 2; 0.5 with --quick)")
    parser.add_argument("--reference-limit-s", type=float, default=3.0, metavar="S",
                        help="skip the loop reference where one fwd+bwd call is estimated to "
                             "take more than S seconds (default: 3)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory measurements (on CPU each is a subprocess)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats (10), 1 warm-up, 0.5 s budget, memory only for "
                             f"forward+backward{defaults.quick_note}")
    parser.add_argument("--output", type=Path, default=Path("bench_results"), metavar="DIR",
                        help=f"folder for {defaults.stem}_<device>.csv and .png, created if "
                             "missing (default: bench_results/)")
    parser.add_argument("--threads", type=_at_least(1), default=None, metavar="T",
                        help="torch CPU threads (default: torch's default)")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = args.quick
    if args.no_memory:
        memory_modes: Sequence[str] = ()
    else:
        memory_modes = (FWD_BWD,) if quick else MODES
    return BenchConfig(
        device=args.device, sizes=args.sizes, methods=args.methods, modes=args.modes,
        providers=args.providers,
        repeats=args.repeats if args.repeats is not None else (10 if quick else 30),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        budget_s=args.budget_s if args.budget_s is not None else (0.5 if quick else 2.0),
        memory_modes=memory_modes, reference_limit_s=args.reference_limit_s,
        output_dir=args.output)


def main(argv: Optional[Sequence[str]], prog: str, description: str, defaults: Defaults,
         extra_providers: Optional[Mapping[str, Callable]] = None) -> int:
    """Parses argv, runs, prints the report, writes CSV and PNG; the exit code."""
    parser = build_parser(prog, description, defaults)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
        resolve_device(config.device)
    except ValueError as error:
        parser.error(str(error))
    started = time.perf_counter()
    result = run_benchmark(config, extra_providers)
    print(format_report(result), flush=True)
    csv_path, png_path = write_outputs(result, config.output_dir, defaults.stem)
    log(f"wrote {csv_path} and {png_path} ({time.perf_counter() - started:.0f} s)")
    if result.failed:
        log("FAILED: a provider is wrong or raised; see the status column")
        return 1
    return 0


def script(prog: str, description: str, defaults: Defaults):
    """A script's main(argv=None, extra_providers=None) -> exit code."""
    def script_main(argv: Optional[Sequence[str]] = None,
                    extra_providers: Optional[Mapping[str, Callable]] = None) -> int:
        return main(argv, prog, description, defaults, extra_providers)
    return script_main
