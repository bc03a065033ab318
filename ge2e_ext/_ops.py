"""The compiled op: loading it, and its fake kernels.

The C++ library (csrc/) registers ``ge2e_ext::ge2e_loss`` with its autograd and
the three kernel ops it is built from (``ge2e_forward``, ``ge2e_backward``,
``ge2e_forward_backward``; csrc/ge2e_schema.h says what each computes). Here they
get the fake (meta) kernels that torch.compile and meta tensors need: shapes
only. When the extension is missing or fails to load, nothing is registered and
the pure-PyTorch path is used; ``import_error()`` says why.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch

_OPS = ("ge2e_loss", "ge2e_forward", "ge2e_backward", "ge2e_forward_backward")

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


def loss(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine, reduce, scale,
         block_speakers=0, speaker_offsets=None, normalize=False):
    """The compiled, differentiable GE2E loss and the rows' top1: the per-row losses
    ((N, M), or (B,) for (B, D) rows grouped by speaker_offsets), or scale * their
    sum; and whether each row's own speaker is its most similar (bool, per row)."""
    return torch.ops.ge2e_ext.ge2e_loss(embeddings, sums, w, b, speaker_offset, loss_method,
                                        min_cosine, reduce, scale, block_speakers,
                                        speaker_offsets, normalize)


if _C is not None:

    def _rows_like(embeddings, dtype=None):
        shape = embeddings.shape[:1] if embeddings.dim() == 2 else embeddings.shape[:2]
        return embeddings.new_empty(shape, dtype=dtype or accumulation_dtype(embeddings.dtype))

    def _sums_grad_like(embeddings, sums, speaker_offsets):
        if sums is not None:
            k = sums.shape[0]
        elif speaker_offsets is not None:
            k = speaker_offsets.shape[0] - 1
        else:
            k = embeddings.shape[0]
        return embeddings.new_empty((k, embeddings.shape[-1]),
                                    dtype=accumulation_dtype(embeddings.dtype))

    def _top1_like(rows):
        return rows.new_empty(rows.shape, dtype=torch.bool)

    def _scalar_like(embeddings, like):
        return like.new_empty(like.shape, dtype=accumulation_dtype(embeddings.dtype))

    @torch.library.register_fake("ge2e_ext::ge2e_loss")
    def _loss_fake(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine, reduce,
                   scale, block_speakers=0, speaker_offsets=None, normalize=False):
        rows = _rows_like(embeddings)
        return (rows.new_empty(()) if reduce else rows), _top1_like(rows)

    ROW_STATE_SIZE = 2  # kRowStateSize in csrc/ge2e_math.h

    @torch.library.register_fake("ge2e_ext::ge2e_forward")
    def _forward_fake(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine,
                      block_speakers=0, speaker_offsets=None, normalize=False):
        rows = _rows_like(embeddings)
        return (rows, rows.new_empty((*rows.shape, ROW_STATE_SIZE), dtype=torch.float64),
                _top1_like(rows))

    @torch.library.register_fake("ge2e_ext::ge2e_backward")
    def _backward_fake(grad_loss, embeddings, sums, w, b, state, speaker_offset,
                       loss_method, min_cosine, block_speakers=0, speaker_offsets=None,
                       normalize=False):
        return (torch.empty_like(embeddings, memory_format=torch.contiguous_format),
                _sums_grad_like(embeddings, sums, speaker_offsets), _scalar_like(embeddings, w),
                _scalar_like(embeddings, b))

    @torch.library.register_fake("ge2e_ext::ge2e_forward_backward")
    def _forward_backward_fake(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine,
                               scale, block_speakers=0, speaker_offsets=None, normalize=False):
        rows = _rows_like(embeddings)
        return (rows.new_empty(()), _top1_like(rows),
                torch.empty_like(embeddings, memory_format=torch.contiguous_format),
                _sums_grad_like(embeddings, sums, speaker_offsets), _scalar_like(embeddings, w),
                _scalar_like(embeddings, b))
