"""Checks an installed ge2e_ext (e.g. from a wheel), run from outside the checkout.

    python scripts/wheel_smoke.py [--devices cpu,cuda] [--version 0.2.0] [--not-under DIR]

Checks: ge2e_ext imports from the environment (not from DIR, the checkout), its
__version__ is the installed distribution's, the compiled kernels are those of
--devices (extension_devices()), and for every loss method of
ge2e_ext.LOSS_METHODS the compiled op's loss and gradients (embeddings, w, b)
match the pure-PyTorch path's in float64 on a small random input, on the CPU,
and on the GPU too where one is visible and the CUDA kernels were built. Exit
status 1 on any failure; scripts/check_wheel.sh runs it in a fresh environment.
"""

import argparse
import importlib.metadata
import os
import sys

RTOL = 1e-10


def _loss_and_grads(ge2e_ext, torch, x, method, backend):
    x = x.detach().clone().requires_grad_(True)
    w = torch.tensor(4.0, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.tensor(-2.0, dtype=x.dtype, device=x.device, requires_grad=True)
    loss = ge2e_ext.ge2e_loss(x, w, b, method, backend=backend)
    loss.backward()
    return [loss.detach(), x.grad, w.grad, b.grad]


def _compare(ge2e_ext, torch, device, failures):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, dtype=torch.float64, generator=generator).to(device)
    for method in ge2e_ext.LOSS_METHODS:
        ext = _loss_and_grads(ge2e_ext, torch, x, method, "extension")
        ref = _loss_and_grads(ge2e_ext, torch, x, method, "torch")
        worst = 0.0
        for name, a, r in zip(("loss", "d embeddings", "dw", "db"), ext, ref):
            scale = max(r.abs().max().item(), 1e-30)
            error = (a - r).abs().max().item() / scale
            worst = max(worst, error)
            if not error <= RTOL:
                failures.append(f"{device} {method}: {name} differs from backend='torch' "
                                f"by {error:.3g} (relative), over {RTOL:g}")
        print(f"  {device} {method}: loss {ext[0].item():.12g}, "
              f"worst relative difference from backend='torch' {worst:.2g}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", help="expected extension_devices(), comma-separated "
                        "(default: not checked beyond containing cpu)")
    parser.add_argument("--version", help="expected ge2e_ext.__version__")
    parser.add_argument("--not-under", help="fail if ge2e_ext is imported from this folder")
    args = parser.parse_args(argv)

    import torch

    import ge2e_ext
    from ge2e_ext import _ops

    failures = []
    location = os.path.dirname(os.path.abspath(ge2e_ext.__file__))
    devices = set(ge2e_ext.extension_devices())
    print(f"ge2e_ext {ge2e_ext.__version__} from {location}\n"
          f"  python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, "
          f"compiled kernels for {sorted(devices)}")
    if _ops.import_error() is not None:
        failures.append(f"the compiled module failed to import: {_ops.import_error()}")
    if args.not_under:
        checkout = os.path.abspath(args.not_under)
        if os.path.commonpath([location, checkout]) == checkout:
            failures.append(f"ge2e_ext was imported from {location}, inside {checkout}, "
                            "not from the installed wheel")
    installed = importlib.metadata.version("ge2e_ext")
    if installed != ge2e_ext.__version__:
        failures.append(f"ge2e_ext.__version__ is {ge2e_ext.__version__} but the installed "
                        f"distribution is {installed}")
    if args.version and ge2e_ext.__version__ != args.version:
        failures.append(f"ge2e_ext.__version__ is {ge2e_ext.__version__}, expected {args.version}")
    expected = set(args.devices.split(",")) if args.devices else {"cpu"}
    if (devices != expected) if args.devices else not expected <= devices:
        failures.append(f"extension_devices() is {sorted(devices)}, expected {sorted(expected)}")

    if "cpu" in devices:
        _compare(ge2e_ext, torch, "cpu", failures)
    if "cuda" in devices and torch.cuda.is_available():
        _compare(ge2e_ext, torch, "cuda", failures)
    elif "cuda" in devices:
        print("  cuda: kernels built, no GPU visible: not run")

    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print("wheel smoke test: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
