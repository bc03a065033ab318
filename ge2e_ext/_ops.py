"""The compiled op: loading it, and its fake (meta) kernels and autograd.

The C++ library registers two ops (csrc/ge2e_op.cpp): ``ge2e_ext::ge2e_forward``
and ``ge2e_ext::ge2e_backward``. Here they get what PyTorch needs to trace and
differentiate them: ``register_fake`` (shapes for torch.compile and meta
tensors) and ``register_autograd`` (the handwritten backward). When the
extension is missing or fails to load, nothing is registered and the pure
PyTorch path is used; ``import_error()`` says why.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing it registers the ops)

    _IMPORT_ERROR: BaseException | None = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = error

# Speakers per block of the similarity matrix; 0 lets the kernel choose (the
# whole batch when it is small). Tests set it to exercise the block loop.
BLOCK_SPEAKERS = 0

EXTENSION_DEVICES: frozenset[str] = (
    frozenset(torch.ops.ge2e_ext.built_devices()) if _C is not None else frozenset()
)


def import_error() -> BaseException | None:
    """Why the compiled extension could not be imported (None when it was)."""
    return _IMPORT_ERROR


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 embeddings, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine):
    """Per-utterance losses (N, M) from the compiled op, differentiable."""
    loss, _, _ = torch.ops.ge2e_ext.ge2e_forward(
        embeddings, sums, w, b, speaker_offset, loss_method, min_cosine, BLOCK_SPEAKERS
    )
    return loss


if _C is not None:

    @torch.library.register_fake("ge2e_ext::ge2e_forward")
    def _forward_fake(embeddings, sums, w, b, speaker_offset, loss_method, min_cosine,
                      block_speakers=0):
        n, m, _ = embeddings.shape
        loss = embeddings.new_empty((n, m), dtype=accumulation_dtype(embeddings.dtype))
        return loss, torch.empty_like(loss), embeddings.new_empty((n, m), dtype=torch.long)

    @torch.library.register_fake("ge2e_ext::ge2e_backward")
    def _backward_fake(grad_loss, embeddings, sums, w, b, row_stat, hardest, speaker_offset,
                       loss_method, min_cosine, block_speakers=0):
        n, _, d = embeddings.shape
        k = sums.shape[0] if sums is not None else n
        return (
            torch.empty_like(embeddings, memory_format=torch.contiguous_format),
            embeddings.new_empty((k, d), dtype=accumulation_dtype(embeddings.dtype)),
            torch.empty_like(w, memory_format=torch.contiguous_format),
            torch.empty_like(b, memory_format=torch.contiguous_format),
        )

    def _setup_context(ctx, inputs, output):
        embeddings, sums, w, b, speaker_offset, loss_method, min_cosine, block_speakers = inputs
        _, row_stat, hardest = output
        ctx.save_for_backward(embeddings, sums, w, b, row_stat, hardest)
        ctx.config = (speaker_offset, loss_method, min_cosine, block_speakers)
        ctx.sums_given = sums is not None
        ctx.mark_non_differentiable(row_stat, hardest)

    def _backward(ctx, grad_loss, _grad_row_stat, _grad_hardest):
        embeddings, sums, w, b, row_stat, hardest = ctx.saved_tensors
        speaker_offset, loss_method, min_cosine, block_speakers = ctx.config
        grad_embeddings, grad_sums, grad_w, grad_b = torch.ops.ge2e_ext.ge2e_backward(
            grad_loss, embeddings, sums, w, b, row_stat, hardest, speaker_offset, loss_method,
            min_cosine, block_speakers,
        )
        return (grad_embeddings, grad_sums if ctx.sums_given else None, grad_w, grad_b,
                None, None, None, None)

    torch.library.register_autograd(
        "ge2e_ext::ge2e_forward", _backward, setup_context=_setup_context
    )

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "ge2e_ext: the compiled GE2E op does not support double backward (a gradient of "
            "its gradient, e.g. backward(create_graph=True) then backward again); use "
            "backend='torch' for higher-order gradients"
        )

    torch.library.register_autograd(
        "ge2e_ext::ge2e_backward", _no_double_backward,
        setup_context=lambda ctx, inputs, output: None,
    )
