#!/usr/bin/env python
"""The floors of the GE2E op on this GPU, and where ge2e_ext stands against them.

Measured on the card itself (datasheet numbers are only leads):
- launch floor: one tiny kernel, plain and replayed from a CUDA graph;
- copy bandwidth: a 1 GiB device-to-device copy (bytes read + written);
- cuBLAS float32 (no TF32) time of the 3 matrix products of one GE2E training
  step (the benchmark's "floor": E S^T, H S, H^T E) and with the recompute of
  E S^T that ge2e_ext's backward does (4 products);
- ge2e_ext softmax forward+backward, plain and replayed from a CUDA graph (which
  removes the CPU's launch gaps), and its peak memory (max_memory_allocated)
  against input + gradient.

Times are medians of CUDA-event timings after a warm-up (not interleaved: each is
the card's best case). Prints a Markdown table; writes floors.csv into --output.
Exits 2 where torch sees no CUDA device.

    python benchmarks/gpu_floors.py --output DIR
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

import harness  # noqa: F401  (the checkout on sys.path)
import ge2e_ext
from harness.common import Size, SIZE_HELP, matrix_products, parse_sizes
from harness.timing import cuda_event_s, peak_bytes
from torch.utils.benchmark import Measurement, TaskSpec

CUDA = torch.device("cuda")


def median_ms(call, repeats: int = 50, warmup: int = 10) -> float:
    """Median CUDA-event time of call repeated on its own, after warm-up calls."""
    for _ in range(warmup):
        call()
    times = [cuda_event_s(call) for _ in range(repeats)]
    return Measurement(1, times, TaskSpec("call()", "pass")).median * 1e3


def graph_ms(fn) -> float:
    """Median time of fn replayed from a CUDA graph (no CPU launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay)


def copy_bandwidth_tbs() -> float:
    src = torch.empty(2 ** 28, device=CUDA)  # 1 GiB of float32
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats=20, warmup=3)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e12


def ge2e_step(size: Size):
    x = torch.randn(size.n, size.m, size.d, device=CUDA, requires_grad=True)
    criterion = ge2e_ext.GE2ELoss(loss_method="softmax", backend="extension").to(CUDA)
    return x, lambda: torch.autograd.grad(criterion(x), (x, criterion.w, criterion.b))


def measure(size: Size, bandwidth_tbs: float) -> dict:
    three = median_ms(matrix_products(size, CUDA))
    recompute = median_ms(matrix_products(size, CUDA, ("E S^T",)))
    x, step = ge2e_step(size)
    plain = median_ms(step)
    peak = peak_bytes(step, CUDA)  # before the graph capture, which may fail
    try:
        graphed = graph_ms(step)
    except Exception as error:  # noqa: BLE001 (graph capture is a bonus measurement)
        print(f"  (CUDA graph capture failed: {error})", file=sys.stderr)
        graphed = float("nan")
    input_bytes = x.numel() * 4
    flops = 3 * 2 * size.n * size.m * size.n * size.d
    return dict(N=size.n, M=size.m, D=size.d,
                bytes_floor_us=2 * input_bytes / (bandwidth_tbs * 1e12) * 1e6,  # x, grad
                cublas_3_products_us=three * 1e3, cublas_4_products_us=(three + recompute) * 1e3,
                gemm_tflops=flops / (three * 1e-3) / 1e12, ge2e_fwd_bwd_us=plain * 1e3,
                ge2e_graph_us=graphed * 1e3, ratio_to_3_products=plain / three,
                peak_over_input_plus_grad=(input_bytes + peak) / (2 * input_bytes))


TABLE = (("bytes floor us", "bytes_floor_us"), ("3 products us", "cublas_3_products_us"),
         ("4 products us", "cublas_4_products_us"), ("GEMM TFLOP/s", "gemm_tflops"),
         ("ge2e_ext fwd+bwd us", "ge2e_fwd_bwd_us"), ("in a graph us", "ge2e_graph_us"),
         ("ge2e_ext / 3 products", "ratio_to_3_products"),
         ("peak / (input + grad)", "peak_over_input_plus_grad"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_floors.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("bench_results"), metavar="DIR",
                        help="folder for floors.csv (default: bench_results/)")
    parser.add_argument("--sizes", type=parse_sizes, default="paper,1024x10x512",
                        metavar="LIST", help=f"{SIZE_HELP} (default: paper,1024x10x512)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_floors.py: torch sees no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    tiny = torch.zeros(1, device=CUDA)
    launch, launch_graph = median_ms(lambda: tiny.add_(1)), graph_ms(lambda: tiny.add_(1))
    bandwidth = copy_bandwidth_tbs()
    print(f"launch floor: {launch * 1e3:.1f} us per kernel ({launch_graph * 1e3:.1f} us in a "
          f"graph); copy bandwidth: {bandwidth:.2f} TB/s (read + write)\n")
    print("| N, M, D | " + " | ".join(title for title, _ in TABLE) + " |\n|"
          + "---|" * (len(TABLE) + 1))
    rows = []
    for size in args.sizes:
        row = dict(measure(size, bandwidth), launch_us=launch * 1e3,
                   launch_graph_us=launch_graph * 1e3, copy_tbs=bandwidth)
        rows.append(row)
        print(f"| {size.n}, {size.m}, {size.d} | "
              + " | ".join(f"{row[key]:.2f}" for _, key in TABLE) + " |", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "floors.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
