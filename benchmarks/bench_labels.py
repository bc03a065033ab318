#!/usr/bin/env python
"""The labels form against the dense form, at the same number of utterances.

A training step (forward+backward, float32, w=10, b=-5) of three batches of B
utterances of N speakers, D features, timed in interleaved repeats in one process
by the harness (benchmarks/harness/timing.py; median and 20th/80th percentiles):

  dense            embeddings (N, M, D), M = B / N
  labels, equal    the same rows as (B, D) in a random order with their (B,) labels
  labels, unequal  (B, D) rows of N speakers with M_j drawn from [M/2, 3M/2]
                   (summing to B), shuffled, with their labels

for ge2e_ext (backend="extension") and, with --eager, the pure-PyTorch path. The
summary gives each labels form's time as a multiple of the dense form's.

    python benchmarks/bench_labels.py                    # N=64, B=640, D=256 on the CPU
    python benchmarks/bench_labels.py --device cuda --eager
"""

from __future__ import annotations

import argparse
import sys

import torch

from harness.common import log
from harness.timing import cpu_times, interleaved, others_share, summary_ms
from ge2e_ext import extension_devices, ge2e_loss


def batches(n, m, d, device, seed=0):
    """(name, embeddings, labels) of the three batches."""
    g = torch.Generator().manual_seed(seed)
    b = n * m
    dense = torch.randn(n, m, d, generator=g)
    order = torch.randperm(b, generator=g)
    equal_labels = (torch.arange(b) // m)[order]
    sizes = torch.full((n,), m)
    for _ in range(4 * n):  # move utterances between speakers within [m/2, 3m/2]
        i, j = torch.randint(n, (2,), generator=g).tolist()
        if sizes[i] > (m + 1) // 2 and sizes[j] < m + m // 2:
            sizes[i] -= 1
            sizes[j] += 1
    unequal_labels = torch.repeat_interleave(torch.arange(n), sizes)[order]
    rows = torch.randn(b, d, generator=g)
    return [("dense", dense.to(device), None),
            ("labels, equal", dense.reshape(b, d)[order].to(device), equal_labels.to(device)),
            ("labels, unequal", rows.to(device), unequal_labels.to(device))], sizes


def step(embeddings, labels, backend, device):
    x = embeddings.detach().clone().requires_grad_(True)
    w = torch.tensor(10.0, device=device, requires_grad=True)
    b = torch.tensor(-5.0, device=device, requires_grad=True)

    def prepare():
        x.grad = w.grad = b.grad = None
        return lambda: ge2e_loss(x, w, b, labels=labels, backend=backend).backward()
    return prepare


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--speakers", type=int, default=64, help="N (default 64)")
    parser.add_argument("--utterances", type=int, default=10, help="M = B / N (default 10)")
    parser.add_argument("--dim", type=int, default=256, help="D (default 256)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=20.0,
                        help="time budget per provider (default 20 s)")
    parser.add_argument("--eager", action="store_true", help="also the pure-PyTorch path")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    backends = (["extension"] if device.type in extension_devices() else []) + \
        (["torch"] if args.eager else [])
    if not backends:
        print(f"ge2e_ext has no kernel for {device.type}; pass --eager", file=sys.stderr)
        return 2
    cases, sizes = batches(args.speakers, args.utterances, args.dim, device)
    log(f"N={args.speakers} B={args.speakers * args.utterances} D={args.dim}; unequal group "
        f"sizes from {int(sizes.min())} to {int(sizes.max())}")
    prepares = {f"{backend}: {name}": step(x, labels, backend, device)
                for backend in backends for name, x, labels in cases}
    start = cpu_times()
    measured, errors = interleaved(prepares, device, args.repeats, args.budget_s)
    share = others_share(start, cpu_times())
    print(f"labels form vs dense form: device {device.type}, torch {torch.__version__}, "
          f"forward+backward, float32"
          + (f"; other processes used {share:.0%} of the CPUs" if share is not None else ""))
    print(f"  {'provider':28s} {'median ms':>10s} {'p20-p80 ms':>14s} {'runs':>5s}")
    medians = {}
    for name in prepares:
        if name in errors:
            print(f"  {name:28s} error: {errors[name]}")
            continue
        median, p20, p80, repeats = summary_ms(measured[name])
        medians[name] = median
        print(f"  {name:28s} {median:10.3f} {p20:6.3f}-{p80:<7.3f} {repeats:5d}")
    for backend in backends:
        dense = medians.get(f"{backend}: dense")
        for name, _, _ in cases[1:]:
            got = medians.get(f"{backend}: {name}")
            if dense and got:
                print(f"  {backend}: {name} takes {got / dense:.2f}x the dense form's time")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
