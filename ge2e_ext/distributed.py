"""GE2E across processes: every rank's utterances are scored against all ranks' speakers.

``ge2e_loss(embeddings, w, b, distributed=True, group=None)`` on rank r takes that
rank's own batch ``(N_r, M, D)`` and returns its share of the loss of the whole
global batch (the ``K = sum_r N_r`` speakers of all ranks of ``group``): the
per-utterance losses of its local utterances, each scored against the
centroids of all K speakers (its own speaker's centroid is exclusive, as in the
single-process loss). The sum over ranks of the returned losses is the
single-process loss of the concatenated batch; with ``reduction="mean"`` each
rank divides by the global number of utterances ``M * K``, so the shares still
add up to the global mean.

What crosses the network
------------------------
Only the per-speaker sums. :func:`gather_speaker_sums` computes the local
``(N_r, D)`` sums in the accumulation dtype (float64 for float64 embeddings,
float32 otherwise), pads them to ``max_r N_r`` rows and gathers them with an
autograd-aware all_gather (``_AllGatherSums``: the contract of
``torch.distributed.nn.functional.all_gather``, whose backward is a
reduce-scatter: the gradients are summed over ranks and each rank gets the
slice of its own sums). Before that, one all_gather of four int64 per rank ``(N_r, M, D, dtype)`` lets
every rank check the same table, so a shape or dtype mismatch is the same
ValueError on every rank instead of a hang.

Per training step, per rank (``W`` ranks, ``N_max = max_r N_r``, ``s`` bytes per
element of the accumulation dtype):

- forward: an all_gather of 5 int64 per rank (metadata), then an all_gather of
  the ``W * N_max x D`` padded sums (``K x D`` when the ranks have equal
  batches): each rank sends ``N_max * D * s`` bytes and receives
  ``(W - 1) * N_max * D * s``;
- backward: the all_gather's backward, a reduce-scatter of the same
  ``W * N_max x D`` gradient: again about ``(W - 1) * N_max * D * s`` bytes in
  and out per rank (a ring reduce-scatter; the volume of an all-to-all).

For 8 GPUs with N = 64 speakers each, D = 256, float32: the gathered sums are
512 x 256 x 4 B = 512 KiB; each rank receives 448 KiB in the forward and about
as much in the backward, independent of M. The embeddings themselves
(N x M x D) never leave their rank.

Gradients, and how they compose with DDP
----------------------------------------
The backward of ``all_gather`` sums the incoming gradients over ranks and
hands each rank the slice of its own sums. So after ``loss_r.backward()`` on
every rank:

- the local embeddings' gradient on rank r is exactly the single-process
  gradient of the *global* loss (the sum over ranks of ``loss_r``) with respect
  to those rows: each row affects the other ranks' losses only through its
  speaker's sum, and that path is accounted for by the collective's backward;
- ``w.grad`` and ``b.grad`` on rank r are only rank r's share,
  ``d loss_r / dw``: the global gradient is their sum over ranks.

DistributedDataParallel averages parameter gradients over ranks. The model's
parameters on rank r receive the gradient of the global loss through rank r's
rows only; DDP's average over ranks therefore gives *the gradient of the
global loss divided by the world size W* (the same as a single process
minimising ``global_loss / W``). Multiply the loss by W before ``backward()``
if you want the single-process gradient itself, or fold the factor into the
learning rate. If the ``GE2ELoss`` module (its ``w`` and ``b``) is part of the
DDP-wrapped model, its gradients are averaged too and come out on the same
``1/W`` scale; if it is kept outside DDP, all-reduce ``w.grad`` and ``b.grad``
yourself (``ReduceOp.SUM`` gives the global gradient, ``ReduceOp.AVG``
matches DDP's scaling) before the optimizer step, or the ranks' copies drift
apart.

Every rank must call the loss (and then ``backward``) in the same order, as
with any collective; a rank that skips a step leaves the others waiting until
the process group's timeout.

Devices: NCCL collectives run on the current CUDA device
(``torch.cuda.current_device()``), gloo ones on CPU tensors; the sums are
moved there and back (autograd-aware), so CPU embeddings work with NCCL and
CUDA embeddings with gloo. The code path is the same for every backend.
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
    """Same check, same message, on every rank (the table is the same everywhere)."""
    _, m0, d0, code0 = table[0]
    if all(row[1:] == [m0, d0, code0] for row in table):
        return
    what = [name for i, name in ((1, "M (utterances per speaker)"), (2, "D (features)"),
                                 (3, "dtype")) if len({row[i] for row in table}) > 1]
    per_rank = "; ".join(
        f"rank {q}: N={n} M={m} D={d} {_CODE_NAMES.get(code, f'dtype code {code}')}"
        for q, (n, m, d, code) in enumerate(table)
    )
    raise ValueError(
        "ge2e_loss(distributed=True): every rank of the process group must pass embeddings "
        f"with the same M, D and dtype (only N may differ); they differ in {', '.join(what)}: "
        f"{per_rank}"
    )


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


def gather_speaker_sums(embeddings: torch.Tensor, group=None, local_error=None):
    """All ranks' per-speaker sums, differentiable, for ``ge2e_loss(distributed=True)``.

    Args:
        embeddings: this rank's (N_r, M, D) embeddings; N_r may differ between
            ranks, M, D and the dtype may not.
        group: the process group (None: the default group).
        local_error: the exception this rank's own input checks raised, if any.
            It is announced to the other ranks in the metadata exchange, so that
            every rank raises instead of waiting for this one in a collective.

    Returns:
        ``(sums, offset, total_utterances)``: ``sums`` (K, D) in the accumulation
        dtype on the embeddings' device, the speakers of rank 0, then rank 1, ...
        (ranks of ``group``); ``offset``, the row of this rank's first speaker in
        ``sums``; ``total_utterances = M * K``. The backward of ``sums`` sums the
        gradients of all ranks (see the module docstring).

    Raises:
        RuntimeError: no initialised process group, or this process is not in
            ``group``.
        ValueError: the ranks' M, D or dtype differ, or there are fewer than 2
            speakers in all (raised on every rank).
        local_error (this rank) or RuntimeError (the others): a rank's inputs
            failed their checks.
    """
    dist = _dist()
    if local_error is None:
        n, m, d = embeddings.shape
    else:
        n = m = d = -1

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
        return embeddings.sum(dim=1, dtype=_ops.accumulation_dtype(embeddings.dtype)), 0, n * m

    device = _communication_device(dist, group, embeddings.device)

    # 1. Metadata: (ok, N_r, M, D, dtype) of every rank, checked identically everywhere.
    dtype_code = _DTYPE_CODES.get(getattr(embeddings, "dtype", None), -1)
    meta = torch.tensor([int(local_error is None), n, m, d, dtype_code], dtype=torch.int64,
                        device=device)
    gathered_meta = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered_meta, meta, group=group)
    rows = torch.stack(gathered_meta).cpu().tolist()
    failed = [q for q, row in enumerate(rows) if not row[0]]
    if local_error is not None:
        raise local_error
    if failed:
        raise RuntimeError(
            f"ge2e_loss(distributed=True): the inputs of rank(s) {failed} of the process group "
            "failed their checks (see the error raised there); no rank computes the loss"
        )
    table = [row[1:] for row in rows]
    _check_table(table)
    counts = [row[0] for row in table]
    _check_total_speakers(counts)
    local_sums = embeddings.sum(dim=1, dtype=_ops.accumulation_dtype(embeddings.dtype))

    # 2. The sums, padded to the largest batch (all_gather needs equal shapes).
    padded = torch.nn.functional.pad(local_sums.to(device), (0, 0, 0, max(counts) - n))
    gathered = _AllGatherSums.apply(padded, group)  # (W, N_max, D)
    sums = torch.cat([gathered[q, :count] for q, count in enumerate(counts)])
    return sums.to(embeddings.device), sum(counts[:rank]), m * sum(counts)
