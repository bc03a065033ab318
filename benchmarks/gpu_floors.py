"""The floors of the GE2E op on this GPU, and where ge2e_ext stands against them.

Measured on the card itself (datasheet numbers are only leads):
- launch floor: one tiny kernel, plain and replayed from a CUDA graph;
- copy bandwidth: a 1 GiB device-to-device copy (bytes read + written);
- cuBLAS fp32 time of the matrix products GE2E needs at a size (forward
  E S^T; backward H S and H^T E; and the recompute of E S^T the op does);
- ge2e_ext fwd+bwd (plain and in a CUDA graph, which removes the CPU's launch
  gaps) and its peak memory against input + gradient.

Times are medians of CUDA-event timings after a warm-up. Writes a Markdown
table to stdout and floors.csv into --output.

    python benchmarks/gpu_floors.py --output DIR
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch

import ge2e_ext

SIZES = [(64, 10, 256), (1024, 10, 512)]


def median_ms(fn, repeats=50, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, repeats=50):
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
    return median_ms(graph.replay, repeats)


def launch_floor():
    x = torch.zeros(1, device="cuda")
    return median_ms(lambda: x.add_(1)), graph_ms(lambda: x.add_(1))


def copy_bandwidth_tbs():
    src = torch.empty(2**28, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats=20, warmup=3)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e12


def product_times(n, m, d):
    """cuBLAS fp32 (no TF32) time of the products of one fwd+bwd."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, k = n * m, n
    e = torch.randn(rows, d, device="cuda")
    s = torch.randn(k, d, device="cuda")
    h = torch.randn(rows, k, device="cuda")
    forward = median_ms(lambda: e @ s.t())
    backward = median_ms(lambda: (h @ s, h.t() @ e))
    flops = 2 * rows * k * d
    return forward, backward, flops


def ge2e_times(n, m, d, method="softmax"):
    x = torch.randn(n, m, d, device="cuda", requires_grad=True)
    criterion = ge2e_ext.GE2ELoss(loss_method=method, backend="extension").cuda()

    def step():
        loss = criterion(x)
        torch.autograd.grad(loss, (x, criterion.w, criterion.b))

    plain = median_ms(step)
    try:
        graphed = graph_ms(step)
    except Exception as error:  # graph capture is a bonus measurement
        print(f"  (CUDA graph capture failed: {error})")
        graphed = float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    input_bytes = x.numel() * 4
    return plain, graphed, (input_bytes + peak) / (2 * input_bytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="bench_results", help="folder for floors.csv")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    launch, launch_graph = launch_floor()
    bandwidth = copy_bandwidth_tbs()
    print(f"launch floor: {launch * 1e3:.1f} us per kernel ({launch_graph * 1e3:.1f} us in a graph)")
    print(f"copy bandwidth: {bandwidth:.2f} TB/s (read + write)")
    rows = []
    print("\n| N, M, D | bytes floor us | cuBLAS fwd+bwd (3 products) us | +recompute us | "
          "GEMM TFLOP/s | ge2e_ext fwd+bwd us | in a graph us | ratio to 3 products | "
          "peak / (input + grad) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, m, d in SIZES:
        forward, backward, flops = product_times(n, m, d)
        three = forward + backward
        plain, graphed, memory_ratio = ge2e_times(n, m, d)
        bytes_floor_us = 2 * n * m * d * 4 / (bandwidth * 1e12) * 1e6  # read x, write grad
        row = dict(N=n, M=m, D=d, launch_us=launch * 1e3, launch_graph_us=launch_graph * 1e3,
                   copy_tbs=bandwidth, bytes_floor_us=bytes_floor_us,
                   cublas_3_products_us=three * 1e3, cublas_4_products_us=(three + forward) * 1e3,
                   gemm_tflops=3 * flops / (three * 1e-3) / 1e12,
                   ge2e_fwd_bwd_us=plain * 1e3, ge2e_graph_us=graphed * 1e3,
                   ratio_to_3_products=plain / three, peak_over_input_plus_grad=memory_ratio)
        rows.append(row)
        print(f"| {n}, {m}, {d} | {bytes_floor_us:.1f} | {three * 1e3:.1f} | "
              f"{(three + forward) * 1e3:.1f} | {row['gemm_tflops']:.1f} | {plain * 1e3:.1f} | "
              f"{graphed * 1e3:.1f} | {plain / three:.2f} | {memory_ratio:.3f} |")
    with open(os.path.join(args.output, "floors.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
