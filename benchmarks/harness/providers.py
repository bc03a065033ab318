"""The providers: ways of computing the summed GE2E loss, plus the floor, all fed the same inputs.

  reference  the original per-utterance Python loops (ge2e_ext.reference)
  eager      ge2e_loss(..., backend="torch"), the vectorized pure-PyTorch path
  compiled   torch.compile of the eager path (compiles on its first call)
  ge2e_ext   ge2e_loss(..., backend="extension"), the compiled C++/CUDA op
  floor      not a loss: the three float32 matrix products a GE2E training step needs
             at this size (see matrix_products); only in forward+backward
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from .common import BACKWARD, FORWARD, FWD_BWD, MODES, Size
from ge2e_ext import ge2e_loss
from ge2e_ext.reference import ge2e_loss_reference

INIT_W, INIT_B = 10.0, -5.0  # the original code's and GE2ELoss's initial w and b
BASELINE = "ge2e_ext"  # speed-ups are this provider's against each other one
FLOOR = "floor"
FLOOR_NOTE = "3 float32 matrix products, not a loss"

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Call = Callable[[], object]


@dataclass(frozen=True)
class Provider:
    """One way of computing the summed GE2E loss; ``build(method)`` gives loss_fn(x, w, b)."""

    name: str
    build: Optional[Callable[[str], LossFn]]  # None for the floor
    compiles: bool = False  # its first call compiles: reported as compile_s, not timed
    needs_extension: bool = False  # only where ge2e_ext has a kernel for the device
    rebuildable: bool = True  # built-ins can be rebuilt by name in the CPU memory subprocess
    modes: Sequence[str] = MODES  # the modes it takes part in

    @property
    def is_floor(self) -> bool:
        return self.build is None


def _build_reference(method: str) -> LossFn:
    return lambda x, w, b: ge2e_loss_reference(x, w, b, method).sum()


def _build_eager(method: str) -> LossFn:
    return lambda x, w, b: ge2e_loss(x, w, b, method, backend="torch")


def _build_compiled(method: str) -> LossFn:
    # A reset makes each (size, method) compile from scratch, so compile_s is what a
    # new shape costs, and many sizes never hit dynamo's recompile limit (which would
    # silently fall back to eager).
    torch._dynamo.reset()
    return torch.compile(_build_eager(method))


def _build_extension(method: str) -> LossFn:
    return lambda x, w, b: ge2e_loss(x, w, b, method, backend="extension")


BUILTINS = {
    "reference": Provider("reference", _build_reference),
    "eager": Provider("eager", _build_eager),
    "compiled": Provider("compiled", _build_compiled, compiles=True),
    "ge2e_ext": Provider(BASELINE, _build_extension, needs_extension=True),
    FLOOR: Provider(FLOOR, None, modes=(FWD_BWD,)),
}
BUILTIN_NAMES = tuple(BUILTINS)


def injected_provider(name: str, fn: Callable) -> Provider:
    """Wraps fn(embeddings, w, b, loss_method) -> scalar loss (tests inject broken ones)."""
    return Provider(name, lambda method: (lambda x, w, b: fn(x, w, b, method)),
                    rebuildable=False)


def select_providers(names: Optional[Sequence[str]],
                     extra: Optional[Mapping[str, Callable]] = None) -> list[Provider]:
    """The built-ins named (all when None), in their canonical order, then the injected ones."""
    names = BUILTIN_NAMES if names is None else names
    unknown = [n for n in names if n not in BUILTINS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(BUILTIN_NAMES)}")
    providers = [BUILTINS[n] for n in BUILTIN_NAMES if n in names]
    for name, fn in (extra or {}).items():
        if name in BUILTINS:
            raise ValueError(f"injected provider {name!r} shadows a built-in one")
        providers.append(injected_provider(name, fn))
    if not providers:
        raise ValueError("no providers to benchmark")
    return providers


# ------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """The tensors every provider is fed; identical values on every device (seeded on CPU)."""

    embeddings: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor

    @property
    def tensors(self):
        return self.embeddings, self.w, self.b

    def clear_grads(self) -> None:
        for tensor in self.tensors:
            tensor.grad = None


def make_inputs(size: Size, device: torch.device, dtype=torch.float32, seed: int = 0) -> Inputs:
    """float32 embeddings (N, M, D) from randn, w and b 0-dim; all leaves requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(size.n, size.m, size.d, generator=generator, dtype=dtype)

    def leaf(tensor):
        return tensor.to(device).requires_grad_(True)

    return Inputs(leaf(embeddings), leaf(torch.tensor(INIT_W, dtype=dtype)),
                  leaf(torch.tensor(INIT_B, dtype=dtype)))


def prepare_call(loss_fn: LossFn, inputs: Inputs, mode: str) -> Call:
    """Does the unmeasured part of one call (grads cleared so each call allocates and
    writes them afresh; the graph for "backward") and returns the part to measure.
    The caller keeps its result alive until the measurement ends, so freeing the
    forward graph is never timed."""
    inputs.clear_grads()
    if mode == FORWARD:
        return lambda: loss_fn(*inputs.tensors)
    if mode == BACKWARD:
        loss = loss_fn(*inputs.tensors)
        return loss.backward
    if mode == FWD_BWD:
        return lambda: loss_fn(*inputs.tensors).backward()
    raise ValueError(f"unknown mode {mode!r}")


FLOOR_PRODUCTS = ("E S^T", "H S", "H^T E")


@dataclass
class MatrixProducts:
    """A call that computes out = a @ b by torch.mm for each (name, a, b, out)."""

    operands: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]

    def __call__(self) -> None:
        for _, a, b, out in self.operands:
            torch.mm(a, b, out=out)


def matrix_products(size: Size, device: torch.device, names: Sequence[str] = FLOOR_PRODUCTS
                    ) -> MatrixProducts:
    """The floor: the float32 matrix products of one GE2E training step at this size.

    With E the embeddings as (N*M, D), S the (N, D) speaker sums and H an (N*M, N)
    matrix (the similarities' gradient): E @ S.T (the forward's dot products),
    H @ S and H.T @ E (the backward's), by torch.mm into preallocated outputs, on
    random (randn) data; ``names`` picks some of them. No GE2E step can do less of
    this work; how far a provider's time is above it is what the rest costs.
    """
    generator = torch.Generator().manual_seed(1)
    rows = size.n * size.m

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    e, s, h = random(rows, size.d), random(size.n, size.d), random(rows, size.n)
    operands = {"E S^T": (e, s.t()), "H S": (h, s), "H^T E": (h.t(), e)}
    return MatrixProducts([
        (name, a, b, torch.empty(a.shape[0], b.shape[1], device=device))
        for name, (a, b) in ((name, operands[name]) for name in names)])
