"""``ge2e_loss``: argument checks, backend choice, reduction. The math is in the kernels.

A call runs in steps over one frozen ``_Plan``: ``_prepare`` (the checks C++
cannot make, labels grouped, the backend chosen), ``_exchange`` (distributed:
every rank's speaker sums), ``_compute`` (the compiled op or the PyTorch path,
reduced) and ``_in_input_order`` (the labels form's rows back in their order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _ops, _torch_impl
from .labels import Grouping, check_labels, group_by_label
from .methods import LOSS_METHODS

REDUCTIONS = ("sum", "mean", "none")
BACKENDS = ("auto", "extension", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def extension_devices() -> frozenset[str]:
    r"""The device types for which this install has a compiled kernel.

    ``backend="auto"`` uses the compiled kernel on these device types and the
    pure-PyTorch path elsewhere. Empty when the compiled module is not built, or
    cannot be loaded (importing ge2e_ext then warns, with the reason).

    Returns:
        frozenset of str: ``{"cpu"}``, ``{"cpu", "cuda"}``, or empty.

    Example::

        >>> import ge2e_ext
        >>> ge2e_ext.extension_devices() <= {"cpu", "cuda"}
        True
    """
    return _ops.EXTENSION_DEVICES


def cpu_capability() -> str | None:
    r"""The instruction set of the CPU kernels that float32 and float64 run here.

    The best set this build has and this CPU supports, chosen when the kernels
    are first used; the environment variable ``GE2E_EXT_CPU_CAPABILITY``
    (``portable``, ``avx2`` or ``avx512``, read once per process) asks for another,
    falling back with a warning when the CPU lacks it. float16 and bfloat16 run
    the portable kernels.

    Returns:
        str or None: ``"avx512"``, ``"avx2"`` or ``"portable"``; None without the
        compiled CPU op.

    Example::

        >>> import ge2e_ext
        >>> ge2e_ext.cpu_capability() in ("avx512", "avx2", "portable", None)
        True
    """
    if "cpu" not in _ops.EXTENSION_DEVICES:
        return None
    return torch.ops.ge2e_ext.cpu_capability()


def check_options(loss_method: object, reduction: object, min_cosine: object, backend: object,
                  distributed: object = False, group: object = None) -> None:
    """Validates the non-tensor arguments; shared by ge2e_loss and GE2ELoss."""
    if loss_method not in LOSS_METHODS:
        raise ValueError(f"loss_method must be one of {LOSS_METHODS}, got {loss_method!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if min_cosine is not None:
        if isinstance(min_cosine, bool) or not isinstance(min_cosine, numbers.Real):
            raise TypeError(
                f"min_cosine must be a float below 1 or None, got {type(min_cosine).__name__}"
            )
        # Comparisons rather than math.isfinite: under torch.compile(dynamic=True)
        # a float attribute can arrive as a symbolic float.
        if not -math.inf < min_cosine < math.inf:
            raise ValueError(f"min_cosine must be finite or None, got {min_cosine}")
        if not min_cosine < 1:
            raise ValueError(
                f"min_cosine must be below 1 (a cosine is at most 1, so a clamp at or above "
                f"it makes the loss constant), got {min_cosine}"
            )
    if group is not None and not distributed:
        raise ValueError("group is only used with distributed=True; pass distributed=True too")


def _conversion_hint(value: object) -> str:
    """How to make a torch.Tensor of a value that is not one, for error messages."""
    if type(value).__module__ == "numpy":
        return " (convert it with torch.from_numpy)"
    if isinstance(value, (list, tuple)):
        return " (convert it with torch.tensor)"
    return ""


def _check_tensor(embeddings: object, shape_words: str) -> None:
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(
            f"embeddings must be a torch.Tensor of shape {shape_words}, "
            f"got {type(embeddings).__name__}{_conversion_hint(embeddings)}"
        )
    if embeddings.layout != torch.strided:
        raise TypeError(
            f"embeddings must be a dense (strided) tensor, got layout {embeddings.layout}; "
            "convert it with .to_dense()"
        )
    if embeddings.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "embeddings must be float32, float64, float16 or bfloat16, got "
            f"{embeddings.dtype}"
        )


def _check_rows(embeddings: Any) -> None:
    """The labels form: (B, D) rows."""
    _check_tensor(embeddings, "(B rows, D) with labels")
    if embeddings.dim() != 2:
        raise ValueError(
            "with labels, embeddings must have shape (B rows, D features), got "
            f"{embeddings.dim()} dimensions {tuple(embeddings.shape)}"
        )
    if embeddings.shape[1] < 1:
        raise ValueError(f"embeddings need D >= 1 features, got D = {embeddings.shape[1]}")


def _check_embeddings(embeddings: Any, min_speakers: int = 2) -> None:
    _check_tensor(embeddings, "(N speakers, M utterances, D)")
    if embeddings.dim() != 3:
        raise ValueError(
            "embeddings must have shape (N speakers, M utterances, D features), got "
            f"{embeddings.dim()} dimensions {tuple(embeddings.shape)}"
            + ("; for (B, D) rows with speaker labels, pass labels=" if embeddings.dim() == 2
               else "")
        )
    n, m, d = embeddings.shape
    if n < min_speakers:
        raise ValueError(
            f"GE2E needs N >= {min_speakers} speakers"
            + (" per rank (and 2 across ranks)" if min_speakers == 1 else "")
            + f", got N = {n} (shape {tuple(embeddings.shape)})"
        )
    if m < 2:
        raise ValueError(
            "GE2E needs M >= 2 utterances per speaker (the exclusive centroid of one "
            f"utterance is empty), got M = {m} (shape {tuple(embeddings.shape)})"
        )
    if d < 1:
        raise ValueError(f"embeddings need D >= 1 features, got D = {d}")


def _as_scalar(value: object, name: str, embeddings: torch.Tensor, dtype: torch.dtype
               ) -> torch.Tensor:
    """w or b as a 0-dim tensor of ``dtype`` on the embeddings' device (autograd-aware)."""
    if isinstance(value, torch.Tensor):
        # The usual case (GE2ELoss's parameters, moved with the model) costs nothing.
        if value.dim() == 0 and value.dtype == dtype and value.device == embeddings.device:
            return value
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar (a number or a one-element tensor), got a tensor of "
                f"shape {tuple(value.shape)}"
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")
        if value.device != embeddings.device:
            # A CPU scalar is moved, as torch treats 0-dim CPU tensors as scalars;
            # a tensor on another accelerator is a mistake.
            if value.device.type != "cpu":
                raise RuntimeError(
                    f"{name} is on {value.device} but the embeddings are on "
                    f"{embeddings.device}; move the GE2ELoss module with .to(device)"
                )
            value = value.to(embeddings.device)
        if value.dim() != 0:  # a (1,)-shaped parameter, say
            value = value.reshape(())
        return value.to(dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number or a one-element tensor, got {type(value).__name__}")
    # A fill on the device, not torch.tensor's copy from the host: no blocking
    # host-to-device copy per call, and capturable in a CUDA graph (the value is
    # a kernel argument).
    return torch.full((), float(value), dtype=dtype, device=embeddings.device)


def _transformed() -> bool:
    """Whether torch.func transforms (grad, vmap, jvp, ...) or forward-mode AD are
    active: the compiled op has neither batching rules nor forward derivatives."""
    if _forward_ad._current_level >= 0:
        return True
    return torch._C._are_functorch_transforms_active()


def _use_extension(backend: str, embeddings: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    device = embeddings.device
    available = device.type in _ops.EXTENSION_DEVICES
    if backend == "auto":
        return available and not _transformed()
    if _transformed():
        raise RuntimeError(
            "backend='extension' does not support torch.func transforms (grad, vmap, jvp, "
            "jacrev, ...) or forward-mode AD: the compiled op has neither batching rules nor "
            "forward derivatives. Use backend='torch' (or 'auto', which picks it there)."
        )
    if available:
        return True
    if device.type == "meta":
        raise RuntimeError(
            "backend='extension' computes on cpu or cuda tensors; meta (shape-only) tensors go "
            "through backend='torch' or 'auto'"
        )
    why = _ops.import_error()
    reason = (
        f"the compiled extension failed to import ({why})" if why is not None
        else f"it was built without {device.type} kernels "
             f"(built: {sorted(_ops.EXTENSION_DEVICES)})"
    )
    raise RuntimeError(
        f"backend='extension' needs ge2e_ext's compiled kernel for {device.type}, but "
        f"{reason}. Build it with `pip install --no-build-isolation -e .` in the ge2e_ext "
        "checkout (CUDA kernels need nvcc and a CUDA build of torch), or use "
        "backend='torch'/'auto'."
    )


def ge2e_loss(embeddings: torch.Tensor, w: torch.Tensor | float, b: torch.Tensor | float,
              loss_method: str = "softmax", *, labels: torch.Tensor | None = None,
              num_speakers: int | None = None, reduction: str = "sum",
              min_cosine: float | None = 1e-6, backend: str = "auto", distributed: bool = False,
              group: torch.distributed.ProcessGroup | None = None, normalize: bool = False,
              return_top1: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""The generalized end-to-end (GE2E) loss of Wan et al., 2018 (arXiv 1710.10467).

    Each utterance embedding :math:`e_{ji}` is scored against every speaker's
    centroid (its own speaker's without itself) with
    :math:`S_{ji,k} = \max(w, 10^{-6}) \cos(e_{ji}, c_k) + b`, and the loss of the row
    is the softmax (eq. 6) or contrast (eq. 7) loss of those scores. See
    :class:`~ge2e_ext.GE2ELoss` for the module with learnable ``w`` and ``b``.

    Args:
        embeddings (Tensor): the utterance embeddings, ``(N, M, D)`` (N speakers, N >= 2,
            or >= 1 per rank when distributed; M >= 2 utterances each; D >= 1), or, with
            ``labels``, ``(B, D)`` rows in any order. float32 or float64; float16 and
            bfloat16 are read as they are and computed in float32.
        w (Tensor or float): the similarity scale; a 0-dim (or one-element) tensor or a
            number. The forward uses ``max(w, 1e-6)``, which passes no gradient to
            ``w`` at or below 1e-6.
        b (Tensor or float): the similarity bias, as ``w``.
        loss_method (str, optional): one of ``ge2e_ext.LOSS_METHODS``: ``"softmax"``
            (eq. 6: ``logsumexp_k S_jik - S_jij``) or ``"contrast"`` (eq. 7:
            ``1 - sig(S_jij) + max_{k != j} sig(S_jik)``). Default: ``"softmax"``.
        labels (Tensor, optional): ``(B,)`` integer speaker labels of the rows (any
            values, any order); each speaker needs at least 2 utterances, and a speaker
            with one is an error naming its label. Default: None (the dense form).
        num_speakers (int, optional): with ``labels``, the number of distinct labels if
            known: on an accelerator it spares the one wait for the device that reading
            it costs; a wrong count then gives a NaN loss instead of an error (on the
            CPU it is an error either way). Default: None.
        reduction (str, optional): ``"sum"`` (the original code's and the paper's total),
            ``"mean"`` (over the utterances) or ``"none"``. Default: ``"sum"``.
        min_cosine (float or None, optional): lower clamp on every cosine, below 1;
            ``1e-6`` reproduces the original code, None gives the paper's unclamped
            formula. Default: ``1e-6``.
        backend (str, optional): ``"auto"`` (the compiled kernel for the embeddings'
            device if built, else PyTorch), ``"extension"`` (the compiled kernel, or a
            RuntimeError saying why not) or ``"torch"``. Default: ``"auto"``.
        distributed (bool, optional): score against the speakers of every rank of
            ``group`` (docs/distributed.md); ``"mean"`` then divides by all ranks'
            utterances, so the ranks' losses add up to the loss of the whole batch.
            Default: False.
        group (ProcessGroup, optional): the process group, with ``distributed=True``
            only. Default: None (the default group).
        normalize (bool, optional): score the embeddings scaled to unit length,
            ``e / max(|e|, 1e-12)`` (``torch.nn.functional.normalize``'s rows), as the
            paper (its e_ji is the network's L2-normalised output) and
            pytorch-metric-learning's ``GE2ELoss`` do: the centroids are then means
            of unit vectors. The compiled op normalises in its own pass and
            differentiates through it; the default, False, takes the embeddings as
            given, as the original code. Default: False.
        return_top1 (bool, optional): also return ``top1``, whether each row's own
            speaker is its most similar: the arg-max of its cosines (as the loss
            clamps them; ties go to the lower speaker index, as ``torch.argmax``) is
            its own exclusive centroid, False for a row with a NaN cosine.
            ``top1.float().mean()`` is the batch's top-1 accuracy (voxceleb_trainer's
            ``prec1``, as a fraction). It comes from the loss's own pass: no extra
            matrix product. Default: False.

    Shape:
        - embeddings: :math:`(N, M, D)`, or :math:`(B, D)` with labels :math:`(B)`.
        - Output: a scalar; with ``reduction="none"``, :math:`(N, M)`, or :math:`(B)` in
          the rows' order with labels.
        - top1 (with ``return_top1``): :math:`(N, M)`, or :math:`(B)` in the rows'
          order, whatever the reduction.

    Returns:
        Tensor: the loss, float32 (float64 for float64 embeddings). With ``"sum"`` or
        ``"mean"`` and a gradient to compute, the compiled op computes the gradient
        in the same pass (the backward only scales it): evaluate without gradients
        under ``torch.no_grad()``. With ``return_top1``, ``(loss, top1)``, top1 a
        bool tensor of this call's rows (with ``distributed``, this rank's).

    Example::

        >>> import torch
        >>> from ge2e_ext import ge2e_loss
        >>> embeddings = torch.randn(4, 5, 64, requires_grad=True)  # 4 speakers x 5
        >>> loss = ge2e_loss(embeddings, 10.0, -5.0)
        >>> loss.backward()
        >>> ge2e_loss(embeddings, 10.0, -5.0, reduction="none").shape
        torch.Size([4, 5])
        >>> rows = torch.randn(7, 64)  # speakers 0, 1, 2 with 2, 3 and 2 utterances
        >>> ge2e_loss(rows, 10.0, -5.0, labels=torch.tensor([2, 0, 1, 1, 0, 2, 1])).dim()
        0
        >>> loss, top1 = ge2e_loss(embeddings, 10.0, -5.0, return_top1=True)
        >>> top1.shape, top1.dtype
        (torch.Size([4, 5]), torch.bool)
    """
    # In distributed mode a rank whose inputs are bad must not leave the others
    # waiting in a collective: its error travels with the metadata exchange and
    # every rank raises there.
    try:
        plan = _prepare(embeddings, w, b, loss_method, labels, num_speakers, reduction,
                        min_cosine, backend, distributed, group, normalize, return_top1)
    except (TypeError, ValueError, RuntimeError) as error:
        if not distributed:
            raise
        _exchange(None, embeddings, group, local_error=error)  # raises on every rank
        raise  # not reached
    if distributed:
        plan = _exchange(plan, embeddings, group)
    loss, top1 = _compute(plan)
    return _in_input_order(plan, loss, top1, return_top1)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One call of ge2e_loss, checked, as the steps below see it."""
    embeddings: torch.Tensor  # in speaker order (labels form); unit rows where Python normalises
    w: torch.Tensor           # 0-dim, the accumulation dtype, the embeddings' device
    b: torch.Tensor
    loss_method: str
    min_cosine: float | None
    reduction: str
    normalize: bool           # as asked
    use_extension: bool
    op_normalizes: bool       # the compiled op normalises (else done, or not asked)
    return_top1: bool         # the PyTorch path makes top1 only then (the op always does)
    grouping: Grouping | None
    sums: torch.Tensor | None = None  # every rank's speaker sums (distributed)
    speaker_offset: int = 0           # this rank's first speaker in sums
    total_utterances: int = 0         # what "mean" divides by (all ranks')


def _prepare(embeddings: torch.Tensor, w: torch.Tensor | float, b: torch.Tensor | float,
             loss_method: str, labels: torch.Tensor | None, num_speakers: int | None,
             reduction: str, min_cosine: float | None, backend: str, distributed: bool,
             group: torch.distributed.ProcessGroup | None, normalize: bool,
             return_top1: bool) -> _Plan:
    """The checks C++ cannot make (or that the PyTorch path needs), the labels
    grouped, w and b as tensors, the backend chosen."""
    check_options(loss_method, reduction, min_cosine, backend, distributed, group)
    for name, flag in (("normalize", normalize), ("return_top1", return_top1)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    grouping = None
    if labels is None:
        if num_speakers is not None:
            raise ValueError("num_speakers goes with labels=; the dense form's N is its shape")
        _check_embeddings(embeddings, min_speakers=1 if distributed else 2)
    else:
        _check_rows(embeddings)
        check_labels(labels, embeddings)
        grouping = group_by_label(labels, num_speakers)
        if grouping.speakers < (1 if distributed else 2):
            raise ValueError(
                "GE2E needs at least "
                + ("1 speaker per rank (and 2 across ranks)" if distributed else "2 speakers")
                + f", got {grouping.speakers} distinct label(s) in {embeddings.shape[0]} "
                "row(s)")
    acc = _ops.accumulation_dtype(embeddings.dtype)
    w = _as_scalar(w, "w", embeddings, acc)
    b = _as_scalar(b, "b", embeddings, acc)
    use_extension = _use_extension(backend, embeddings)
    # The PyTorch path, and the distributed form (whose speaker sums, gathered in
    # _exchange, must be sums of unit rows), normalise with PyTorch ops first.
    op_normalizes = normalize and use_extension and not distributed
    if normalize and not op_normalizes:
        embeddings = _torch_impl.normalized_rows(embeddings)
    if grouping is not None:
        embeddings = embeddings.index_select(0, grouping.order)  # rows in speaker order
    rows = embeddings.shape[0] * (1 if grouping is not None else embeddings.shape[1])
    return _Plan(embeddings, w, b, loss_method, None if min_cosine is None else float(min_cosine),
                 reduction, normalize, use_extension, op_normalizes, return_top1, grouping,
                 total_utterances=rows)


def _exchange(plan: _Plan | None, embeddings: Any, group: torch.distributed.ProcessGroup | None,
              local_error: Exception | None = None) -> _Plan:
    """distributed=True: every rank's speaker sums, this rank's offset among them
    and all ranks' utterances, after checking that the ranks agree (a rank with
    a local_error, plan None, makes every rank raise)."""
    from . import distributed as dist_impl

    options = None
    if plan is not None:
        embeddings = plan.embeddings
        # What must agree across ranks besides the shapes: a rank whose loss
        # has a backward would wait in its collective for one without.
        needs_grad = torch.is_grad_enabled() and embeddings.requires_grad
        with torch.no_grad():
            options = dict(loss_method=plan.loss_method, reduction=plan.reduction,
                           min_cosine=plan.min_cosine, normalize=plan.normalize, grad=needs_grad,
                           w=plan.w.detach().double().cpu().item(),
                           b=plan.b.detach().double().cpu().item())
    sums, offset, total = dist_impl.gather_speaker_sums(
        embeddings, group, local_error=local_error,
        grouping=plan.grouping if plan is not None else None, options=options)
    return dataclasses.replace(plan, sums=sums, speaker_offset=offset, total_utterances=total)


def _compute(plan: _Plan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss, reduced as asked (the compiled op reduces inside its fused
    sweep; the PyTorch path's rows are reduced here), and the rows' top1, in
    speaker order (None from the PyTorch path unless asked for)."""
    reduce = plan.reduction != "none"
    scale = 1.0 / plan.total_utterances if plan.reduction == "mean" else 1.0
    offsets = plan.grouping.offsets if plan.grouping is not None else None
    if plan.use_extension:
        problem = dict(embeddings=plan.embeddings, w=plan.w, b=plan.b,
                       loss_method=plan.loss_method, min_cosine=plan.min_cosine,
                       speaker_offsets=offsets, normalize=plan.op_normalizes)
        if plan.sums is None:  # this call's speakers: the public op
            return torch.ops.ge2e_ext.ge2e_loss(**problem, reduction=plan.reduction)
        return torch.ops.ge2e_ext._ge2e_loss(**problem, sums=plan.sums,
                                             speaker_offset=plan.speaker_offset,
                                             scale=scale if reduce else None)
    rows, top1 = _torch_loss(plan.embeddings, plan.sums, plan.w, plan.b, plan.speaker_offset,
                             plan.loss_method, plan.min_cosine, plan.grouping, plan.return_top1)
    if not reduce:
        return rows, top1
    return (rows.sum() if scale == 1.0 else rows.sum() * scale), top1


def _in_input_order(plan: _Plan, loss: torch.Tensor, top1: torch.Tensor | None,
                    return_top1: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The labels form's per-row results back in the input's order, NaN (and no
    top-1) where the grouping found the labels inconsistent with num_speakers."""
    grouping = plan.grouping
    if grouping is not None:
        if plan.reduction == "none":
            loss = grouping.restore(loss)
        if grouping.valid is not None:
            loss = torch.where(grouping.valid, loss, torch.full_like(loss, float("nan")))
        if return_top1:
            top1 = grouping.restore(top1)
            if grouping.valid is not None:
                top1 = top1 & grouping.valid
    return (loss, top1) if return_top1 else loss


def _torch_loss(embeddings: torch.Tensor, sums: torch.Tensor | None, w: torch.Tensor,
                b: torch.Tensor, offset: int, loss_method: str, min_cosine: float | None,
                grouping: Grouping | None, with_top1: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-row losses by the pure-PyTorch path, in the accumulation dtype, and
    the rows' top1 (None unless with_top1)."""
    acc = _ops.accumulation_dtype(embeddings.dtype)
    # Under autocast the matrix product would run in float16/bfloat16; the
    # loss is computed in the accumulation dtype, as the kernels do.
    device_type = embeddings.device.type
    autocast_on = (torch.amp.is_autocast_available(device_type)
                   and torch.is_autocast_enabled(device_type))
    precision = (torch.autocast(device_type=device_type, enabled=False)
                 if autocast_on else contextlib.nullcontext())
    with precision:
        if grouping is None:
            rows = _torch_impl.ge2e_rows(embeddings.to(acc), sums, w, b, offset, loss_method,
                                         min_cosine, with_top1=with_top1)
        else:
            rows = _torch_impl.ge2e_rows_grouped(embeddings.to(acc), grouping, sums, w, b,
                                                 offset, loss_method, min_cosine,
                                                 with_top1=with_top1)
    return rows if with_top1 else (rows, None)
