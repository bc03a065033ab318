#!/usr/bin/env python
"""The CPU kernels' instruction sets against each other: which one runs, and how fast.

ge2e_ext compiles its CPU kernels for a portable target and, on x86-64, for AVX2
and AVX-512, and picks the best the CPU supports at run time. This times a
training step (forward+backward, float32, both loss methods) with each built
instruction set that this CPU supports, forced with GE2E_EXT_CPU_CAPABILITY in a
fresh process each, in rounds that alternate between them (the choice is made
once per process), and prints medians over the rounds and each one's time as a
multiple of the default's.

    python benchmarks/bench_isa.py                       # 64x10x256 and 1024x10x512
    python benchmarks/bench_isa.py --sizes 64x10x256 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

import ge2e_ext
from harness.common import log, parse_sizes

WORKER = """
import json, sys, statistics, timeit, torch, ge2e_ext
sizes, methods, repeats = json.loads(sys.argv[1])
out = {"capability": ge2e_ext.cpu_capability(), "ms": {}}
for n, m, d in sizes:
    x = torch.randn(n, m, d, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-5.0, requires_grad=True)
    for method in methods:
        def step():
            x.grad = w.grad = b.grad = None
            ge2e_ext.ge2e_loss(x, w, b, method, backend="extension").backward()
        for _ in range(3):
            step()
        times = [timeit.timeit(step, number=1) * 1e3 for _ in range(repeats)]
        out["ms"][f"{n}x{m}x{d} {method}"] = statistics.median(times)
print(json.dumps(out))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64x10x256,1024x10x512")
    parser.add_argument("--rounds", type=int, default=5, help="processes per instruction set")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per process and size")
    args = parser.parse_args(argv)
    if "cpu" not in ge2e_ext.extension_devices():
        print("ge2e_ext has no compiled CPU op here", file=sys.stderr)
        return 2
    built = torch.ops.ge2e_ext.cpu_capabilities_built()
    default = ge2e_ext.cpu_capability()
    candidates = built[built.index(default):]  # what this CPU runs: the default and below
    sizes = [(s.n, s.m, s.d) for s in parse_sizes(args.sizes)]
    job = json.dumps([sizes, list(ge2e_ext.LOSS_METHODS), args.repeats])
    samples = {c: {} for c in candidates}
    for round_ in range(args.rounds):
        for capability in candidates[round_ % len(candidates):] + \
                candidates[:round_ % len(candidates)]:
            env = dict(os.environ, GE2E_EXT_CPU_CAPABILITY=capability)
            run = subprocess.run([sys.executable, "-c", WORKER, job], env=env, check=True,
                                 capture_output=True, text=True)
            result = json.loads(run.stdout.strip().splitlines()[-1])
            assert result["capability"] == capability, result
            for key, ms in result["ms"].items():
                samples[capability].setdefault(key, []).append(ms)
        log(f"round {round_ + 1} of {args.rounds} done")
    print(f"CPU kernels by instruction set: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, forward+backward, float32; built: {built}, "
          f"default here: {default}")
    keys = list(samples[default])
    print(f"  {'batch':28s}" + "".join(f"{c:>18s}" for c in candidates))
    for key in keys:
        base = statistics.median(samples[default][key])
        cells = []
        for c in candidates:
            ms = statistics.median(samples[c][key])
            cells.append(f"{ms:9.3f} ms {ms / base:4.2f}x")
        print(f"  {key:28s}" + "".join(f"{cell:>18s}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
