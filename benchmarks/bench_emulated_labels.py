#!/usr/bin/env python
"""Per-speaker work of the CUDA kernels, on the CPU under their emulation.

The CUDA kernels' speaker passes (statistics, row gradients, fold) should do
O(M_j D) work for a speaker of M_j rows, so that a batch's cost depends on its
rows, not on how they are spread over speakers. This times a training step
(ge2e_forward_backward, float64) of the emulated kernels (tests/cuda_emulation,
compiled here) on two batches of the same B rows and K sums:

  one speaker      the labels form, one local speaker of B rows, scored against
                   K - 1 other speakers' sums (the distributed form, sums given)
  many speakers    the labels form, K speakers of B / K rows each (their own sums)

Both run the same row kernel (B rows against K sums); only the speaker passes
differ. The ratio one/many should be near 1 (the judged bound is 2x); kernels
that re-read the speaker for each of its rows make it about B/K times the
per-row part. Timed in interleaved repeats in one process (median).

    python benchmarks/bench_emulated_labels.py                   # B=1024, K=128, D=256
    python benchmarks/bench_emulated_labels.py --baseline-rev 36a0d49   # also an older revision
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build(source_root: pathlib.Path, name: str, threads: int):
    """Compiles source_root's emulation and returns its op namespace's forward_backward."""
    from torch.utils.cpp_extension import load

    build_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"{name}_"))
    load(name=name, sources=[str(source_root / "tests" / "cuda_emulation" / "emulated_ops.cpp")],
         extra_cflags=["-O2", "-std=c++20", f"-DGE2E_CUDA_THREADS={threads}"],
         build_directory=str(build_dir), is_python_module=False, verbose=False)
    return torch.ops.ge2e_emu.ge2e_forward_backward


def batches(rows, speakers, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    others = torch.randn(speakers - 1, dim, generator=g, dtype=torch.float64)
    one = dict(embeddings=x, sums=torch.cat([x.sum(0, keepdim=True), others]),
               speaker_offsets=torch.tensor([0, rows]))
    per = rows // speakers
    many = dict(embeddings=x, sums=None,
                speaker_offsets=torch.arange(0, rows + 1, per, dtype=torch.long))
    return {"one speaker": one, "many speakers": many}


def step(op, case, method):
    w = torch.tensor(10.0, dtype=torch.float64)
    b = torch.tensor(-5.0, dtype=torch.float64)
    return op(**case, speaker_offset=0, w=w, b=b, loss_method=method, min_cosine=1e-6,
              normalize=False, scale=1.0)


def time_cases(op, cases, method, repeats):
    samples = {name: [] for name in cases}
    for name, case in cases.items():
        step(op, case, method)  # warm-up
    for _ in range(repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            step(op, case, method)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--speakers", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=64,
                        help="threads per emulated block (the GPU build uses 256)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", default="softmax")
    parser.add_argument("--baseline-rev", default=None,
                        help="also time the kernels of this git revision")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = batches(args.rows, args.speakers, args.dim)
    revisions = [("this tree", ROOT)]
    if args.baseline_rev:
        tree = pathlib.Path(tempfile.mkdtemp(prefix="ge2e_baseline_"))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline_rev, "csrc",
                                  "tests/cuda_emulation"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        revisions.append((args.baseline_rev, tree))
    print(f"B={args.rows} rows, K={args.speakers} sums, D={args.dim}, {args.method}, "
          f"{args.threads} threads per emulated block, median of {args.repeats}")
    print(f"{'kernels':<12}{'one speaker (s)':>18}{'many speakers (s)':>20}{'ratio':>8}")
    for label, tree in revisions:
        # Each revision in its own process: the op namespace is registered once.
        if tree is not ROOT:
            out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows),
                                  "--speakers", str(args.speakers), "--dim", str(args.dim),
                                  "--threads", str(args.threads), "--repeats", str(args.repeats),
                                  "--method", args.method, "--_tree", str(tree)],
                                 check=True, capture_output=True, text=True).stdout
            one, many = map(float, out.split())
        else:
            times = time_cases(build(tree, "ge2e_emulation_bench", args.threads), cases,
                               args.method, args.repeats)
            one, many = times["one speaker"], times["many speakers"]
        print(f"{label:<12}{one:>18.3f}{many:>20.3f}{one / many:>8.2f}")


def _child(argv):
    parser = argparse.ArgumentParser()
    for flag in ("--rows", "--speakers", "--dim", "--threads", "--repeats"):
        parser.add_argument(flag, type=int)
    parser.add_argument("--method")
    parser.add_argument("--_tree")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    op = build(pathlib.Path(args._tree), "ge2e_emulation_baseline", args.threads)
    times = time_cases(op, batches(args.rows, args.speakers, args.dim), args.method, args.repeats)
    print(times["one speaker"], times["many speakers"])


if __name__ == "__main__":
    if "--_tree" in sys.argv:
        _child(sys.argv[1:])
    else:
        main()
