"""The compiled op: loading it, and its fake kernels.

The C++ library (csrc/) registers the public ``ge2e_ext::ge2e_loss`` (this
call's speakers, reduced by name), ``ge2e_ext::_ge2e_loss`` (any problem, the
distributed form's too, with its autograd) and the three kernel ops it is built
from (``ge2e_forward``, ``ge2e_backward``, ``ge2e_forward_backward``);
csrc/ge2e_schema.h writes their interface once and says what each computes.
Here they get the fake (meta) kernels that torch.compile and meta tensors
need: shapes only, reading the arguments by name from the registered schemas.
When the extension is missing or fails to load, nothing is registered and the
pure-PyTorch path is used; ``import_error()`` says why.
"""

from __future__ import annotations

import glob
import os
import types
import warnings
from typing import Callable, TypeVar

import torch

_OPS = ("ge2e_loss", "_ge2e_loss", "ge2e_forward", "ge2e_backward", "ge2e_forward_backward",
        "_set_block_speakers")

try:
    from . import _C  # noqa: F401  (importing it registers the ops)

    _IMPORT_ERROR: BaseException | None = None
    missing = [op for op in _OPS if not hasattr(torch.ops.ge2e_ext, op)]
    if missing:  # a compiled module left over from another version of the sources
        raise ImportError(f"the compiled module {_C.__file__} lacks the ops {missing}; "
                          "it is stale: rebuild it")
except (ImportError, OSError) as error:  # not built, stale, or built against another torch
    _C = None
    _IMPORT_ERROR = error
    # Not built at all (a checkout used as it is) is a choice; a module that is there but
    # cannot load costs the kernels, so it is said, once (this runs once per process).
    _BUILT = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.*")))
    if _BUILT:
        warnings.warn(
            f"ge2e_ext: the compiled module {_BUILT[0]} cannot be loaded ({error}), so "
            "backend='auto' runs the slower pure-PyTorch path and backend='extension' raises. "
            f"It was probably built against another torch than this one ({torch.__version__}): "
            "rebuild it against this torch (in a checkout: pip install --no-build-isolation "
            "-e .), or install the ge2e_ext wheel built for this torch.",
            RuntimeWarning, stacklevel=2)

EXTENSION_DEVICES: frozenset[str] = (
    frozenset(torch.ops.ge2e_ext.built_devices()) if _C is not None else frozenset()
)


def import_error() -> BaseException | None:
    """Why the compiled extension could not be imported (None when it was)."""
    return _IMPORT_ERROR


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 embeddings, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def arguments(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> types.SimpleNamespace:
    """A call's arguments by their names in the op's schema (defaults filled in)."""
    values = {}
    for index, argument in enumerate(op._schema.arguments):
        if index < len(args):
            values[argument.name] = args[index]
        elif argument.name in kwargs:
            values[argument.name] = kwargs[argument.name]
        else:
            values[argument.name] = argument.default_value
    return types.SimpleNamespace(**values)


# A fake kernel: the call's arguments by name -> the outputs' shapes and dtypes.
_Shapes = TypeVar("_Shapes", bound=Callable[[types.SimpleNamespace], object])

if _C is not None:

    def _fake(name: str) -> Callable[[_Shapes], _Shapes]:
        """Registers the decorated function of the call's arguments (by name)
        as the fake kernel of ge2e_ext::<name>."""
        op = getattr(torch.ops.ge2e_ext, name).default

        def register(shapes: _Shapes) -> _Shapes:
            torch.library.register_fake(f"ge2e_ext::{name}")(
                lambda *args, **kwargs: shapes(arguments(op, args, kwargs)))
            return shapes
        return register

    def _rows_like(a: types.SimpleNamespace, dtype: torch.dtype | None = None) -> torch.Tensor:
        e = a.embeddings
        shape = e.shape[:1] if a.speaker_offsets is not None else e.shape[:2]
        return e.new_empty(shape, dtype=dtype or accumulation_dtype(e.dtype))

    def _top1_like(a: types.SimpleNamespace) -> torch.Tensor:
        return _rows_like(a, torch.bool)

    def _gradients_like(a: types.SimpleNamespace
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        e = a.embeddings
        if a.sums is not None:
            k = a.sums.shape[0]
        elif a.speaker_offsets is not None:
            k = a.speaker_offsets.shape[0] - 1
        else:
            k = e.shape[0]
        acc = accumulation_dtype(e.dtype)
        return (torch.empty_like(e, memory_format=torch.contiguous_format),
                e.new_empty((k, e.shape[-1]), dtype=acc), a.w.new_empty(a.w.shape, dtype=acc),
                a.b.new_empty(a.b.shape, dtype=acc))

    ROW_STATE_SIZE = 2  # kRowStateSize in csrc/ge2e_math.h

    @_fake("_ge2e_loss")
    def _loss_fake(a: types.SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _rows_like(a)
        return (rows.new_empty(()) if a.scale is not None else rows), _top1_like(a)

    @_fake("ge2e_forward")
    def _forward_fake(a: types.SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = _rows_like(a)
        return (rows, rows.new_empty((*rows.shape, ROW_STATE_SIZE), dtype=torch.float64),
                _top1_like(a))

    @_fake("ge2e_backward")
    def _backward_fake(a: types.SimpleNamespace
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _gradients_like(a)

    @_fake("ge2e_forward_backward")
    def _forward_backward_fake(a: types.SimpleNamespace) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (_rows_like(a).new_empty(()), _top1_like(a), *_gradients_like(a))
