"""GE2E across processes: every rank's utterances are scored against all ranks' speakers.

``ge2e_loss(..., distributed=True)`` calls :func:`gather_speaker_sums`, which
exchanges a little metadata (so that a mismatch is the same error on every
rank, never a hang) and then all-gathers the per-speaker sums with an
autograd-aware all-gather whose backward is a reduce-scatter. docs/distributed.md
says what the ranks' losses and gradients add up to, how that composes with
DDP, what crosses the network, and how labels are handled.
"""

from __future__ import annotations

import torch

from . import _ops

# dtype <-> code of the metadata exchange.
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_NAMES = {code: str(dtype).replace("torch.", "") for dtype, code in _DTYPE_CODES.items()}


def _dist():
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


def _communication_device(dist, group, device: torch.device) -> torch.device:
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


def _check_table(table):
    """Same check, same message, on every rank (the table is the same everywhere).

    A row per rank: (N_r, M, D, dtype code, B_r), M = -1 for the labels form."""
    _, m0, d0, code0, _ = table[0]
    if all(row[1:4] == [m0, d0, code0] for row in table):
        return
    forms = {row[1] == -1 for row in table}
    what = (["the form (some ranks pass labels, some (N, M, D) embeddings)"] if len(forms) > 1
            else [name for i, name in ((1, "M (utterances per speaker)"), (2, "D (features)"),
                                       (3, "dtype")) if len({row[i] for row in table}) > 1])
    per_rank = "; ".join(
        f"rank {q}: N={n} " + ("labels" if m == -1 else f"M={m}") + f" D={d} "
        + _CODE_NAMES.get(code, f"dtype code {code}")
        for q, (n, m, d, code, _) in enumerate(table)
    )
    raise ValueError(
        "ge2e_loss(distributed=True): every rank of the process group must pass embeddings "
        "of the same form, D and dtype (and the same M when dense; only N may differ); "
        f"they differ in {', '.join(what)}: {per_rank}"
    )


def _check_disjoint_labels(speaker_labels_per_rank):
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


def _check_total_speakers(counts):
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
    def forward(ctx, padded, group):
        import torch.distributed as dist

        ctx.group = group
        padded = padded.contiguous()
        pieces = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, padded, group=group)
        return torch.stack(pieces)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        own = torch.empty_like(grad[0])
        dist.reduce_scatter(own, list(grad.unbind(0)), op=dist.ReduceOp.SUM, group=ctx.group)
        return own, None


def _local_sums(embeddings, grouping):
    acc = _ops.accumulation_dtype(embeddings.dtype)
    if grouping is None:
        return embeddings.sum(dim=1, dtype=acc)
    return embeddings.new_zeros((grouping.speakers, embeddings.shape[1]), dtype=acc).index_add(
        0, grouping.speaker_of_row, embeddings.to(acc))


def gather_speaker_sums(embeddings: torch.Tensor, group=None, local_error=None, grouping=None):
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

    Returns:
        ``(sums, offset, total_utterances)``: ``sums`` (K, D) in the accumulation
        dtype on the embeddings' device, the speakers of rank 0, then rank 1, ...
        (ranks of ``group``); ``offset``, the row of this rank's first speaker in
        ``sums``; ``total_utterances``, all ranks' utterances. The backward of
        ``sums`` sums the gradients of all ranks.

    Raises:
        RuntimeError: no initialised process group, or this process is not in
            ``group``.
        ValueError: the ranks' form, M, D or dtype differ, a label is on two
            ranks, or there are fewer than 2 speakers in all (on every rank).
        local_error (this rank) or RuntimeError (the others): a rank's inputs
            failed their checks.
    """
    dist = _dist()
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

    device = _communication_device(dist, group, embeddings.device)

    # 1. Metadata: (ok, N_r, M, D, dtype, B_r) of every rank, checked identically everywhere.
    dtype_code = _DTYPE_CODES.get(getattr(embeddings, "dtype", None), -1)
    meta = torch.tensor([int(local_error is None), n, m, d, dtype_code, rows], dtype=torch.int64,
                        device=device)
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
    table = [row[1:] for row in table]
    _check_table(table)
    counts = [row[0] for row in table]
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
    return sums.to(embeddings.device), sum(counts[:rank]), sum(row[4] for row in table)
