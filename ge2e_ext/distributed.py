"""GE2E across processes: every rank's utterances are scored against all ranks' speakers.

``ge2e_loss(..., distributed=True)`` calls :func:`gather_speaker_sums`, which
exchanges a little metadata (so that a mismatch is the same error on every
rank, never a hang) and then all-gathers the per-speaker sums with an
autograd-aware all-gather whose backward is a reduce-scatter. docs/distributed.md
says what the ranks' losses and gradients add up to, how that composes with
DDP, what crosses the network, and how labels are handled.
"""

from __future__ import annotations

import types
from typing import Any, Mapping, Sequence, SupportsFloat

import torch

from . import _ops
from .labels import Grouping

# dtype <-> code of the metadata exchange.
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_NAMES = {code: str(dtype).replace("torch.", "") for dtype, code in _DTYPE_CODES.items()}


def _dist() -> types.ModuleType:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        reason = ("this build of torch has no torch.distributed" if not dist.is_available()
                  else "no default process group is initialised")
        raise RuntimeError(
            f"ge2e_loss(distributed=True) needs a torch.distributed process group, but "
            f"{reason}. Call torch.distributed.init_process_group(backend='nccl' or 'gloo', "
            "...) on every rank first (torchrun sets the rank and world size), or use "
            "distributed=False for a per-process loss."
        )
    return dist


def _communication_device(dist: types.ModuleType, group: torch.distributed.ProcessGroup | None,
                          device: torch.device) -> torch.device:
    """The device of the tensors handed to the group's collectives."""
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # one backend per device type, e.g. "cpu:gloo,cuda:nccl"
        types = [part.split(":", 1)[0].strip() for part in backend.split(",")]
        if device.type in types:
            return device
        if "cuda" in types:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return device  # mpi, ucc, xccl, ...: the embeddings' own device


# The metadata every rank announces, in order, as int64 (floats as their bits).
_FIELDS = ("n", "m", "d", "dtype", "rows", "grad", "method", "reduction", "min_cosine", "w", "b",
           "normalize")
# Fields that must agree on every rank, and how a message names them.
_AGREED = {
    "form": "the form (some ranks pass labels, some (N, M, D) embeddings)",
    "m": "M (utterances per speaker)",
    "d": "D (features)",
    "dtype": "dtype",
    "grad": "whether the loss needs a gradient (embeddings.requires_grad and grad mode: the "
            "backward is a collective, so a rank without it would leave the others waiting)",
    "method": "loss_method",
    "reduction": "reduction",
    "min_cosine": "min_cosine",
    "w": "w",
    "b": "b",
    "normalize": "normalize",
}
_METHOD_CODES = {"softmax": 0, "contrast": 1}
_REDUCTION_CODES = {"sum": 0, "mean": 1, "none": 2}


def _float_bits(value: SupportsFloat | None) -> int:
    """A float (None: NaN, which no valid min_cosine is) as its int64 bits."""
    x = float("nan") if value is None else float(value)
    return int(torch.tensor(x, dtype=torch.float64).view(torch.int64))


def _bits_float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int64).view(torch.float64))


def _describe(row: Mapping[str, int]) -> str:
    names = {code: name for name, code in _METHOD_CODES.items()}
    reductions = {code: name for name, code in _REDUCTION_CODES.items()}
    min_cosine = _bits_float(row["min_cosine"])
    return (f"N={row['n']} " + ("labels" if row["m"] == -1 else f"M={row['m']}")
            + f" D={row['d']} " + _CODE_NAMES.get(row["dtype"], f"dtype code {row['dtype']}")
            + f" grad={'yes' if row['grad'] else 'no'}"
            + f" {names.get(row['method'], row['method'])}"
            + f" reduction={reductions.get(row['reduction'], row['reduction'])}"
            + f" min_cosine={'None' if min_cosine != min_cosine else min_cosine}"
            + f" w={_bits_float(row['w'])!r} b={_bits_float(row['b'])!r}"
            + f" normalize={'yes' if row['normalize'] == 1 else 'no'}")


def _check_table(table: Sequence[dict[str, int]]) -> None:
    """Same check, same message, on every rank (the table is the same everywhere).

    A row per rank: a dict of _FIELDS, m = -1 for the labels form."""
    for row in table:
        row["form"] = row["m"] == -1
    differ = [key for key in _AGREED if len({row[key] for row in table}) > 1]
    if "form" in differ:
        differ = ["form"]
    if not differ:
        return
    per_rank = "; ".join(f"rank {q}: {_describe(row)}" for q, row in enumerate(table))
    raise ValueError(
        "ge2e_loss(distributed=True): every rank of the process group must pass embeddings "
        "of the same form, D and dtype (and the same M when dense; only N may differ), the "
        "same loss_method, reduction, min_cosine, w, b and normalize, and need a gradient on "
        "all ranks "
        f"or none; they differ in {', '.join(_AGREED[key] for key in differ)}: {per_rank}"
    )


def _check_disjoint_labels(speaker_labels_per_rank: Sequence[Sequence[int]]) -> None:
    """A label on two ranks would be two speakers with one name: an error, on every rank."""
    owner = {}
    shared = {}
    for rank, labels in enumerate(speaker_labels_per_rank):
        for label in labels:
            if label in owner and owner[label] != rank:
                shared.setdefault(label, {owner[label]}).add(rank)
            owner.setdefault(label, rank)
    if shared:
        where = "; ".join(f"label {label} on ranks {sorted(ranks)}"
                          for label, ranks in sorted(shared.items())[:5])
        raise ValueError(
            "ge2e_loss(distributed=True, labels=...): each speaker's utterances must all be on "
            f"one rank (a label on two ranks cannot be one centroid without exchanging "
            f"embeddings), but {where}" + (" ..." if len(shared) > 5 else ""))


def _check_total_speakers(counts: Sequence[int]) -> None:
    if sum(counts) < 2:
        raise ValueError(
            "ge2e_loss(distributed=True): GE2E needs at least 2 speakers across all ranks, "
            f"got {sum(counts)} (per rank: {counts})"
        )


class _AllGatherSums(torch.autograd.Function):
    """all_gather whose backward is a reduce-scatter (sum over ranks, own slice).

    The same contract as ``torch.distributed.nn.functional.all_gather``, whose
    gloo backward (an all-to-all emulated with ``scatter``) passes group ranks
    where global ranks are expected and fails on a subgroup whose ranks differ
    from the global ones (torch 2.14). ``all_gather`` and ``reduce_scatter`` of
    a list of equal tensors are supported by both NCCL and gloo, so this is one
    code path for every backend, and a reduce-scatter moves less data than the
    all-to-all plus local sum.
    """

    @staticmethod
    def forward(ctx: Any, padded: torch.Tensor, group: torch.distributed.ProcessGroup | None
                ) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        padded = padded.contiguous()
        pieces = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, padded, group=group)
        return torch.stack(pieces)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous()
        own = torch.empty_like(grad[0])
        dist.reduce_scatter(own, list(grad.unbind(0)), op=dist.ReduceOp.SUM, group=ctx.group)
        return own, None


def _local_sums(embeddings: torch.Tensor, grouping: Grouping | None) -> torch.Tensor:
    acc = _ops.accumulation_dtype(embeddings.dtype)
    if grouping is None:
        return embeddings.sum(dim=1, dtype=acc)
    return embeddings.new_zeros((grouping.speakers, embeddings.shape[1]), dtype=acc).index_add(
        0, grouping.speaker_of_row, embeddings.to(acc))


def gather_speaker_sums(embeddings: torch.Tensor,
                        group: torch.distributed.ProcessGroup | None = None,
                        local_error: Exception | None = None, grouping: Grouping | None = None,
                        options: Mapping[str, Any] | None = None
                        ) -> tuple[torch.Tensor, int, int]:
    """All ranks' per-speaker sums, differentiable, for ``ge2e_loss(distributed=True)``.

    Args:
        embeddings: this rank's (N_r, M, D) embeddings, or its (B_r, D) rows in
            speaker order with ``grouping`` (the labels form); N_r and B_r may
            differ between ranks, the form, M, D and the dtype may not.
        group: the process group (None: the default group).
        local_error: the exception this rank's own input checks raised, if any.
            It is announced to the other ranks in the metadata exchange, so that
            every rank raises instead of waiting for this one in a collective.
        grouping: the labels form's ``ge2e_ext.labels.Grouping`` of this rank's rows.
        options: what must agree on every rank besides the shapes: a dict with
            loss_method, reduction, min_cosine, w and b (0-dim tensors or
            numbers), normalize and grad (whether this rank's loss will have a
            backward).

    Returns:
        ``(sums, offset, total_utterances)``: ``sums`` (K, D) in the accumulation
        dtype on the embeddings' device, the speakers of rank 0, then rank 1, ...
        (ranks of ``group``); ``offset``, the row of this rank's first speaker in
        ``sums``; ``total_utterances``, all ranks' utterances. The backward of
        ``sums`` sums the gradients of all ranks.

    Raises:
        RuntimeError: no initialised process group, or this process is not in
            ``group``.
        ValueError: the ranks' form, M, D, dtype or options differ, a label is on
            two ranks, or there are fewer than 2 speakers in all (on every rank).
        local_error (this rank) or RuntimeError (the others): a rank's inputs
            failed their checks.
    """
    dist = _dist()
    options = options or {}
    if local_error is not None:
        n = m = d = rows = -1
    elif grouping is None:
        n, m, d = embeddings.shape
        rows = n * m
    else:
        n, m, d, rows = grouping.speakers, -1, embeddings.shape[1], embeddings.shape[0]

    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(
            "ge2e_loss(distributed=True): this process is not a member of the given "
            "process group; call it only on the group's ranks"
        )
    world = dist.get_world_size(group)
    if world == 1:
        if local_error is not None:
            raise local_error
        _check_total_speakers([n])
        return _local_sums(embeddings, grouping), 0, rows

    # Whatever the embeddings are (a rank's bad input may not be a tensor), the
    # metadata goes out: nothing before it may raise.
    device = _communication_device(dist, group, getattr(embeddings, "device",
                                                         torch.device("cpu")))

    # 1. Metadata of every rank, checked identically everywhere.
    fields = dict(n=n, m=m, d=d, rows=rows,
                  dtype=_DTYPE_CODES.get(getattr(embeddings, "dtype", None), -1),
                  grad=-1, method=-1, reduction=-1, min_cosine=-1, w=-1, b=-1, normalize=-1)
    if local_error is None:
        try:
            fields.update(
                grad=int(bool(options.get("grad", False))),
                method=_METHOD_CODES.get(options.get("loss_method"), -1),
                reduction=_REDUCTION_CODES.get(options.get("reduction"), -1),
                min_cosine=_float_bits(options.get("min_cosine")),
                w=_float_bits(options["w"]) if "w" in options else -1,
                b=_float_bits(options["b"]) if "b" in options else -1,
                normalize=int(bool(options.get("normalize", False))))
        except (TypeError, ValueError, RuntimeError) as error:
            local_error = error
    meta = torch.tensor([int(local_error is None)] + [fields[key] for key in _FIELDS],
                        dtype=torch.int64, device=device)
    gathered_meta = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered_meta, meta, group=group)
    table = torch.stack(gathered_meta).cpu().tolist()
    failed = [q for q, row in enumerate(table) if not row[0]]
    if local_error is not None:
        raise local_error
    if failed:
        raise RuntimeError(
            f"ge2e_loss(distributed=True): the inputs of rank(s) {failed} of the process group "
            "failed their checks (see the error raised there); no rank computes the loss"
        )
    table = [dict(zip(_FIELDS, row[1:])) for row in table]
    _check_table(table)
    counts = [row["n"] for row in table]
    _check_total_speakers(counts)
    if grouping is not None:
        # The speakers' labels of every rank (padded to the most speakers).
        padded_labels = torch.nn.functional.pad(grouping.speaker_labels.to(device, torch.int64),
                                                (0, max(counts) - n))
        pieces = [torch.empty_like(padded_labels) for _ in range(world)]
        dist.all_gather(pieces, padded_labels, group=group)
        _check_disjoint_labels([piece[:count].cpu().tolist()
                                for piece, count in zip(pieces, counts)])

    # 2. The sums, padded to the largest batch (all_gather needs equal shapes).
    local_sums = _local_sums(embeddings, grouping)
    padded = torch.nn.functional.pad(local_sums.to(device), (0, 0, 0, max(counts) - n))
    gathered = _AllGatherSums.apply(padded, group)  # (W, N_max, D)
    sums = torch.cat([gathered[q, :count] for q, count in enumerate(counts)])
    return sums.to(embeddings.device), sum(counts[:rank]), sum(row["rows"] for row in table)
