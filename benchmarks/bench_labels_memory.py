#!/usr/bin/env python
"""Peak memory of the labels form with one dominant speaker, against its input.

One training step (forward+backward, float32, w=10, b=-5) of B rows: one speaker
of --big rows among --small speakers of --small-rows each, shuffled, with their
labels, for each backend ("extension", "torch") at 1 and 16 threads
(torch.set_num_threads). Each measurement runs in a fresh interpreter, after one
warm-up step, by benchmarks/harness/timing.py's peak_bytes: the peak RSS the
step adds over the RSS before it (VmHWM after resetting it through
/proc/self/clear_refs), with glibc set to return freed memory to the system.
The table gives each peak in MB and as a multiple of the input (B x D x 4 bytes).

    python benchmarks/bench_labels_memory.py                  # 20,000 + 400 x 4 rows, D=32
    python benchmarks/bench_labels_memory.py --big 50000 --small 600 --dim 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from harness.common import MIB, log
from harness.timing import PROBE_ENV, peak_bytes


def batch(big, small, small_rows, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.zeros(big, dtype=torch.int64),
                        torch.arange(1, small + 1).repeat_interleave(small_rows)])
    order = torch.randperm(labels.shape[0], generator=g)
    rows = torch.randn(labels.shape[0], dim, generator=g) + 0.1
    return rows[order].contiguous(), labels[order].contiguous()


def probe(config: dict) -> dict:
    """In the subprocess: one warm-up step, then the measured one."""
    from ge2e_ext import ge2e_loss

    torch.set_num_threads(config["threads"])
    rows, labels = batch(config["big"], config["small"], config["small_rows"], config["dim"])
    x = rows.requires_grad_(True)
    w = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-5.0, requires_grad=True)

    def step():
        x.grad = w.grad = b.grad = None
        ge2e_loss(x, w, b, labels=labels, backend=config["backend"]).backward()

    step()
    return {"peak_bytes": peak_bytes(step, torch.device("cpu")), "input_bytes": rows.numel() * 4}


def spawn(config: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--probe", json.dumps(config)],
                          capture_output=True, text=True, env={**os.environ, **PROBE_ENV},
                          timeout=1200)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=int, default=20000, help="rows of the dominant speaker")
    parser.add_argument("--small", type=int, default=400, help="number of small speakers")
    parser.add_argument("--small-rows", type=int, default=4, help="rows of each small speaker")
    parser.add_argument("--dim", type=int, default=32, help="D")
    parser.add_argument("--threads", default="1,16", help="thread counts (default 1,16)")
    parser.add_argument("--backends", default="extension,torch")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    import ge2e_ext

    rows = args.big + args.small * args.small_rows
    input_mb = rows * args.dim * 4 / MIB
    print(f"labels form, one dominant speaker: {args.big} rows + {args.small} speakers x "
          f"{args.small_rows} rows (B={rows}, K={args.small + 1}), D={args.dim}, float32, "
          f"forward+backward; input {input_mb:.2f} MB; torch {torch.__version__}, "
          f"ge2e_ext from {os.path.dirname(ge2e_ext.__file__)}")
    print(f"  {'backend':10s} {'threads':>7s} {'peak MB':>9s} {'x input':>8s}")
    failed = False
    for backend in args.backends.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            config = dict(backend=backend, threads=threads, big=args.big, small=args.small,
                          small_rows=args.small_rows, dim=args.dim)
            log(f"  measuring {backend} at {threads} thread(s)")
            result = spawn(config)
            if "error" in result:
                failed = True
                print(f"  {backend:10s} {threads:7d} {result['error']}")
                continue
            peak = result["peak_bytes"]
            print(f"  {backend:10s} {threads:7d} {peak / MIB:9.2f} "
                  f"{peak / result['input_bytes']:8.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
