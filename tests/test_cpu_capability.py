"""The CPU kernels' instruction sets: a portable build that runs anywhere, AVX2 and
AVX-512 kernels picked at run time, each of them forcible and right."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import ge2e_ext

from helpers import needs_cpu_extension

pytestmark = needs_cpu_extension

BUILT = torch.ops.ge2e_ext.cpu_capabilities_built() if "cpu" in ge2e_ext.extension_devices() \
    else []


def cpu_flags():
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def supported(capability, flags):
    need = {"portable": set(), "avx2": {"avx2", "fma"},
            "avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma"}}[capability]
    return need <= flags


def test_the_best_built_capability_the_cpu_supports_is_picked():
    flags = cpu_flags()
    expected = next(name for name in BUILT if supported(name, flags))
    assert ge2e_ext.cpu_capability() == expected
    assert BUILT[-1] == "portable"


CHECK = """
import torch, ge2e_ext
print(ge2e_ext.cpu_capability())
g = torch.Generator().manual_seed(0)
for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
    for method in ge2e_ext.LOSS_METHODS:
        for reduction in ("sum", "none"):
            x = torch.randn(37, 5, 70, generator=g, dtype=torch.float64).to(dtype)
            out = []
            for backend in ("extension", "torch"):
                xb = x.clone().requires_grad_()
                loss = ge2e_ext.ge2e_loss(xb, 10.0, -5.0, method, reduction=reduction,
                                          backend=backend)
                (grad,) = torch.autograd.grad(loss.sum(), xb)
                out.append((loss.double(), grad.double()))
            for a, b in zip(*out):
                err = ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
                assert err <= rtol, (dtype, method, reduction, err)
print("ok")
"""


@pytest.mark.parametrize("capability", [c for c in BUILT if supported(c, cpu_flags())])
def test_every_built_capability_the_cpu_supports_can_be_forced_and_is_right(capability):
    env = dict(os.environ, GE2E_EXT_CPU_CAPABILITY=capability)
    run = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [capability, "ok"]


def test_an_unknown_capability_falls_back_with_a_warning():
    env = dict(os.environ, GE2E_EXT_CPU_CAPABILITY="avx9000")
    run = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "ok"
    assert "GE2E_EXT_CPU_CAPABILITY=avx9000" in run.stderr


def _functions_of(namespace):
    """Disassembly of the extension's functions in namespace ge2e::...::isa_<namespace>."""
    library = next(pathlib.Path(ge2e_ext.__file__).parent.glob("_C*.so"))
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(library)],
                             capture_output=True, text=True, check=True).stdout
    functions = re.split(r"\n(?=[0-9a-f]+ <)", listing)
    return [f for f in functions if f"::isa_{namespace}::" in f.split("\n", 1)[0]]


@pytest.mark.skipif(shutil.which("objdump") is None or not sys.platform.startswith("linux")
                    or os.uname().machine != "x86_64", reason="needs objdump on x86-64 Linux")
def test_the_portable_kernels_hold_no_avx2_or_avx512_instruction():
    portable = _functions_of("portable")
    assert len(portable) > 20, "the portable kernels were not found in the disassembly"
    wide = [f.split("\n", 1)[0] for f in portable if re.search(r"%[yz]mm\d", f)]
    assert not wide, f"portable functions with 256/512-bit registers: {wide[:5]}"
    # The check can fail: the AVX-512 kernels do use 512-bit registers.
    if "avx512" in BUILT:
        assert any(re.search(r"%zmm\d", f) for f in _functions_of("avx512"))
