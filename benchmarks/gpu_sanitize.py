#!/usr/bin/env python
"""A short run of every CUDA kernel path, for compute-sanitizer (memcheck,
racecheck, initcheck, synccheck: benchmarks/gpu_check.sh).

ge2e_loss forward and backward once per loss method (ge2e_ext.LOSS_METHODS),
embeddings dtype (float32, float64, float16, bfloat16) and reduction ("sum":
the fused forward that computes the gradient; "none": the forward, then the
backward op), plus a forward under no_grad (the loss alone), on small CUDA
inputs with backend="extension": shapes with D not a multiple of 32, K beyond
one 256-thread sweep, M=2, and the labels form's speaker segments of unequal
sizes. float64 and bfloat16 run with normalize=True (the unit-row kernels),
the others without; every no_grad forward returns the rows' top1. Exits 1 if a
loss or gradient
is not finite (or a call raises), 2 where torch sees no CUDA device or ge2e_ext
has no CUDA kernel. Under the sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 benchmarks/gpu_sanitize.py

(without the caching allocator, memcheck sees an access past a tensor's end)
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

import harness  # noqa: F401  (the checkout on sys.path)
import ge2e_ext

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REDUCTIONS = ("sum", "none")
# (N, M, D) dense; (sizes of the groups, D) for the labels form (speaker segments).
SHAPES = ((3, 2, 37), (300, 3, 70), ((2, 5, 3, 9), 37))


def one_case(shape, method: str, dtype: torch.dtype, reduction: str, device: str = "cuda"
             ) -> list[str]:
    """What is not finite after one forward+backward (empty when all is)."""
    generator = torch.Generator().manual_seed(0)
    labels = None
    if isinstance(shape[0], tuple):  # the labels form: rows of groups of several sizes
        sizes, d = shape
        labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        labels = labels[torch.randperm(len(labels), generator=generator)].to(device)
        shape = (len(labels), d)
    x = torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()
    w = torch.tensor(10.0, device=device, requires_grad=True)
    b = torch.tensor(-5.0, device=device, requires_grad=True)
    normalize = dtype in (torch.float64, torch.bfloat16)
    loss = ge2e_ext.ge2e_loss(x, w, b, method, labels=labels, reduction=reduction,
                              backend="extension", normalize=normalize)
    loss.sum().backward()
    with torch.no_grad():  # inference: the loss alone, and the rows' top1
        loss_only, _ = ge2e_ext.ge2e_loss(x, w, b, method, labels=labels, reduction=reduction,
                                          backend="extension", normalize=normalize,
                                          return_top1=True)
    tensors = {"loss": loss, "x.grad": x.grad, "w.grad": w.grad, "b.grad": b.grad,
               "no_grad loss": loss_only}
    return [name for name, tensor in tensors.items()
            if tensor is None or not bool(torch.isfinite(tensor.float()).all())]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda",
                        help="cuda (default), or cpu for a dry run of the cases on the CPU op")
    device = parser.parse_args([] if argv is None else argv).device
    if device == "cpu":
        pass
    elif not torch.cuda.is_available() or "cuda" not in ge2e_ext.extension_devices():
        print("gpu_sanitize.py: needs a CUDA device and ge2e_ext's CUDA kernels "
              f"(cuda available: {torch.cuda.is_available()}, kernels for: "
              f"{sorted(ge2e_ext.extension_devices())})", file=sys.stderr)
        return 2
    failures = 0
    for shape, method, dtype, reduction in itertools.product(SHAPES, ge2e_ext.LOSS_METHODS,
                                                             DTYPES, REDUCTIONS):
        label = f"{shape} {method} {dtype} {reduction}"
        try:
            bad = one_case(shape, method, dtype, reduction, device)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 (reported, counted)
            bad = [f"raised {type(error).__name__}: {error}"]
        failures += bool(bad)
        print(f"{label}: {'FAILED: ' + ', '.join(bad) if bad else 'ok'}", flush=True)
    cases = len(SHAPES) * len(ge2e_ext.LOSS_METHODS) * len(DTYPES) * len(REDUCTIONS)
    print(f"{cases - failures}/{cases} cases finite")  # failures: not finite, or raised
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
