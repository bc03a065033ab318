"""ge2e_loss(distributed=True) over gloo processes equals the single-process loss.

One spawn per world size (2 and 3 CPU processes) runs every case in a loop: each
rank takes its slice of a seeded global batch, computes its share of the loss
with ``distributed=True`` and backpropagates; the parent checks that the shares
add up to the single-process loss of the whole batch, that each rank's embedding
gradient is its rows of the single-process gradient, and that the ranks' w/b
gradients add up to the single-process ones. A DDP-wrapped model checks that DDP's
averaged gradients are the global gradient divided by the world size; the labels
form runs over ranks with different label sets. Spawns are bounded (process
group timeout, join deadline, kill), and a child's traceback is shown on failure.
"""

import datetime
import multiprocessing
import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from ge2e_ext import GE2ELoss, ge2e_loss
from ge2e_ext import distributed as ge2e_dist

from helpers import CPU_BACKENDS, LOSS_METHODS, RTOL, assert_close_rel, make_embeddings

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

M, D = 4, 6
W0, B0 = 3.0, -1.0
GROUP_TIMEOUT = datetime.timedelta(seconds=60)  # every collective, init included
JOIN_TIMEOUT_S = 120.0  # then the children are killed
FAILURE_GRACE_S = 10.0  # once one rank has failed, the others get this long to finish
SUBGROUP = [1, 2]  # the world-size-3 run also uses this group (group ranks 0, 1)
# Unequal, equal, and (world 2) a rank with a single speaker: K >= 2 is what counts.
COUNTS = {2: ([3, 5], [4, 4], [1, 3]), 3: ([2, 3, 4], [3, 3, 3])}


def _cases(world):
    """The cases one spawn of ``world`` processes runs, as plain dicts."""
    cases = []
    for ci, counts in enumerate(COUNTS[world]):
        for mi, method in enumerate(LOSS_METHODS):
            for bi, backend in enumerate(CPU_BACKENDS):
                cases.append(dict(
                    name=f"{method}-{backend}-N{'+'.join(map(str, counts))}",
                    counts=counts, method=method, backend=backend,
                    reduction=("sum", "mean")[(ci + mi) % 2],
                    min_cosine=(1e-6, None)[(ci + bi) % 2],
                    module=(ci == 1 and mi == 0),  # through GE2ELoss(distributed=True)
                    dtype=torch.float64, group_ranks=None,
                ))
    # normalize=True: the sums that cross the network are of unit rows.
    for backend in CPU_BACKENDS:
        cases.append(dict(name=f"softmax-normalize-{backend}", counts=COUNTS[world][0],
                          method="softmax", backend=backend, reduction="mean", min_cosine=1e-6,
                          module=False, dtype=torch.float64, group_ranks=None, normalize=True))
    # float32 embeddings: float32 sums cross the network.
    cases.append(dict(name="softmax-float32", counts=COUNTS[world][0], method="softmax",
                      backend=CPU_BACKENDS[-1], reduction="sum", min_cosine=1e-6,
                      module=False, dtype=torch.float32, group_ranks=None))
    if world == 3:
        # A subgroup whose group ranks differ from the global ranks.
        cases.append(dict(name="contrast-subgroup", counts=[3, 4], method="contrast",
                          backend=CPU_BACKENDS[-1], reduction="mean", min_cosine=1e-6,
                          module=False, dtype=torch.float64, group_ranks=SUBGROUP))
    return cases


def _global_embeddings(case):
    # offset 0.3: some cosines are clamped by min_cosine, most are not.
    return make_embeddings(sum(case["counts"]), M, D, dtype=case["dtype"],
                           seed=7 * sum(case["counts"]) + len(case["name"]), offset=0.3,
                           requires_grad=False)


def _loss_and_grads(case, x, group=None, distributed=False):
    """The loss of x and the gradients of x, w and b (all detached)."""
    x = x.detach().clone().requires_grad_(True)
    if case["module"]:
        criterion = GE2ELoss(W0, B0, case["method"], reduction=case["reduction"],
                             min_cosine=case["min_cosine"], backend=case["backend"],
                             distributed=distributed, group=group).to(case["dtype"])
        loss = criterion(x)
        w, b = criterion.w, criterion.b
    else:
        w = torch.tensor(W0, dtype=case["dtype"], requires_grad=True)
        b = torch.tensor(B0, dtype=case["dtype"], requires_grad=True)
        loss = ge2e_loss(x, w, b, case["method"], reduction=case["reduction"],
                         min_cosine=case["min_cosine"], backend=case["backend"],
                         distributed=distributed, group=group,
                         normalize=case.get("normalize", False))
    loss.sum().backward()  # sum: reduction="none" too
    return dict(loss=loss.detach(), grad_x=x.grad, grad_w=w.grad.detach(),
                grad_b=b.grad.detach())


def _rank_share(case, group_rank, group):
    counts = case["counts"]
    start = sum(counts[:group_rank])
    local = _global_embeddings(case)[start:start + counts[group_rank]]
    return _loss_and_grads(case, local, group=group, distributed=True)


def _mismatches(rank, world):
    """Calls whose M, D or dtype differ between ranks: the ValueError message per kind."""
    shapes = {
        "M": lambda r: ((3, M if r == 0 else M + 1, D), torch.float64),
        "D": lambda r: ((3, M, D + 1 if r == world - 1 else D), torch.float64),
        "dtype": lambda r: ((3, M, D), torch.float32 if r == 0 else torch.float64),
    }
    messages = {}
    for kind, shape in shapes.items():
        size, dtype = shape(rank)
        x = torch.randn(*size, dtype=dtype, requires_grad=True)
        try:
            ge2e_loss(x, W0, B0, distributed=True)
        except ValueError as error:
            messages[kind] = str(error)
        else:
            messages[kind] = None
    # Rank 0's own input is bad (2-D): it raises its ValueError, the others a
    # RuntimeError naming it, and nobody waits in a collective.
    x = torch.randn(3, D) if rank == 0 else torch.randn(3, M, D, dtype=torch.float64)
    try:
        ge2e_loss(x, W0, B0, distributed=True)
    except (ValueError, RuntimeError) as error:
        messages["local"] = (type(error).__name__, str(error))
    else:
        messages["local"] = None
    return messages


# The option mismatches run on their own group with a short timeout: a rank
# left waiting in a collective fails within seconds (and the test with it)
# instead of hanging until GROUP_TIMEOUT.
MISMATCH_TIMEOUT = datetime.timedelta(seconds=15)


def _option_mismatches(rank, world, group):
    """Calls whose options or gradient needs differ between ranks, or whose own
    input is bad on one rank: (exception type, message) per kind and rank, and
    whether the backward ran (it must not: every rank raises in the forward)."""
    last = world - 1
    kinds = {
        # (requires_grad, kwargs) of this rank
        "grad": (rank == 0, {}),
        "grad_labels": (rank != last, {"labels": True}),
        "min_cosine": (True, {"min_cosine": 1e-6 if rank == 0 else None}),
        "min_cosine_value": (True, {"min_cosine": 1e-6 if rank == 0 else 1e-3}),
        "method": (True, {"loss_method": "contrast" if rank == last else "softmax"}),
        "reduction": (True, {"reduction": "mean" if rank == 0 else "sum"}),
        "w": (True, {"w": W0 if rank == 0 else W0 + 1}),
        "b": (True, {"b": B0 if rank == last else B0 - 1}),
        "normalize": (True, {"normalize": rank == 0}),
        # one rank's own input is bad: its error there, a RuntimeError naming it elsewhere
        "min_cosine_type": (True, {"min_cosine": "0.1" if rank == 0 else 1e-6}),
        "empty_labels": (True, {"labels": True, "rows": 0 if rank == last else None}),
    }
    results = {}
    for kind, (requires_grad, kwargs) in kinds.items():
        kwargs = dict(kwargs)
        w = kwargs.pop("w", W0)
        b = kwargs.pop("b", B0)
        labels = kwargs.pop("labels", False)
        rows = kwargs.pop("rows", None)
        if labels:
            count = 6 if rows is None else rows
            x = torch.randn(count, D, dtype=torch.float64)
            kwargs["labels"] = torch.arange(count) // 2 + 10 * rank
        else:
            x = torch.randn(3, M, D, dtype=torch.float64)
        x.requires_grad_(requires_grad)
        backward_ran = False
        try:
            loss = ge2e_loss(x, w, b, distributed=True, group=group, **kwargs)
            if loss.requires_grad:
                loss.sum().backward()
                backward_ran = True
        except (TypeError, ValueError, RuntimeError) as error:
            results[kind] = (type(error).__name__, str(error), backward_ran)
        else:
            results[kind] = (None, None, backward_ran)
    return results


def _labelled_rows(world):
    """Each rank's (rows, labels): speakers with 2 to 5 utterances, shuffled; labels
    unique to their rank."""
    g = torch.Generator().manual_seed(21)
    shares = []
    for rank in range(world):
        sizes = [2 + (rank + k) % 4 for k in range(2 + rank)]
        labels = torch.cat([torch.full((size,), 100 * rank + 3 * k, dtype=torch.int64)
                            for k, size in enumerate(sizes)])
        order = torch.randperm(len(labels), generator=g)
        rows = torch.randn(len(labels), D, generator=g, dtype=torch.float64) + 0.3
        shares.append((rows[order], labels[order]))
    return shares


def _labels_loss_and_grads(rows, labels, method, distributed):
    rows = rows.detach().clone().requires_grad_(True)
    w = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(B0, dtype=torch.float64, requires_grad=True)
    loss = ge2e_loss(rows, w, b, method, labels=labels, reduction="mean", distributed=distributed)
    loss.backward()
    return dict(loss=loss.detach(), grad_x=rows.grad, grad_w=w.grad, grad_b=b.grad)


def _labels_share(rank, world):
    rows, labels = _labelled_rows(world)[rank]
    results = {method: _labels_loss_and_grads(rows, labels, method, True)
               for method in LOSS_METHODS}
    # A label on two ranks: the same error everywhere.
    clash = torch.where(labels == labels.min(), 7, labels)  # every rank has a speaker 7
    try:
        ge2e_loss(rows, W0, B0, labels=clash, distributed=True)
    except ValueError as error:
        results["clash"] = str(error)
    else:
        results["clash"] = None
    return results


class _SpeakerModel(torch.nn.Module):
    """A linear encoder and the criterion in one module, as in docs/distributed.md."""

    def __init__(self, distributed):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.encoder = torch.nn.Linear(D + 2, D, dtype=torch.float64)
        with torch.no_grad():
            self.encoder.weight.copy_(torch.randn(D, D + 2, generator=g, dtype=torch.float64))
            self.encoder.bias.copy_(torch.randn(D, generator=g, dtype=torch.float64))
        self.criterion = GE2ELoss(W0, B0, "softmax", distributed=distributed).double()

    def forward(self, frames):
        return self.criterion(self.encoder(frames))


def _ddp_frames(world):
    return make_embeddings(sum(COUNTS[world][0]), M, D + 2, seed=5, offset=0.3,
                           requires_grad=False)


def _ddp_share(rank, world):
    """One DDP step on this rank's frames: the loss and the (averaged) parameter grads."""
    from torch.nn.parallel import DistributedDataParallel

    counts = COUNTS[world][0]
    start = sum(counts[:rank])
    model = DistributedDataParallel(_SpeakerModel(distributed=True))
    loss = model(_ddp_frames(world)[start:start + counts[rank]])
    loss.backward()
    return dict(loss=loss.detach(),
                grads={name: p.grad for name, p in model.module.named_parameters()})


def _worker(rank, world, init_file, out_dir):
    """One rank: runs every case, saves the results (or its traceback) to out_dir."""
    out = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=GROUP_TIMEOUT)
        subgroup = dist.new_group(SUBGROUP, timeout=GROUP_TIMEOUT) if world == 3 else None
        results = {}
        for case in _cases(world):
            if case["group_ranks"] is None:
                results[case["name"]] = _rank_share(case, rank, None)
            elif rank in case["group_ranks"]:
                results[case["name"]] = _rank_share(case, case["group_ranks"].index(rank),
                                                    subgroup)
        results["ddp"] = _ddp_share(rank, world)
        results["labels"] = _labels_share(rank, world)
        results["mismatch"] = _mismatches(rank, world)
        quick = dist.new_group(list(range(world)), timeout=MISMATCH_TIMEOUT)
        results["options"] = _option_mismatches(rank, world, quick)
        # The errors left no collective pending: the group still works.
        first = _cases(world)[0]
        results["after_mismatch"] = _rank_share(first, rank, None)
        dist.destroy_process_group()
        torch.save({"results": results}, out)
    except BaseException:  # noqa: BLE001  (everything goes back to the parent)
        torch.save({"error": traceback.format_exc()}, out)
        sys.stderr.write(f"rank {rank}:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)  # no process-group teardown that could wait on the other ranks


def _spawn(world, tmp_dir):
    """Runs _worker on `world` processes; the per-rank results, or an error message."""
    ctx = multiprocessing.get_context("spawn")
    init_file = os.path.join(tmp_dir, "store")
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, str(tmp_dir)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    failed_at = None
    timed_out = False
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > FAILURE_GRACE_S):
            timed_out = True
            break
        time.sleep(0.1)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)

    results, problems = [], []
    for r, p in enumerate(procs):
        path = os.path.join(tmp_dir, f"rank{r}.pt")
        saved = torch.load(path) if os.path.exists(path) else None
        if saved is None:
            problems.append(f"rank {r}: exit code {p.exitcode}, no result"
                            + (" (killed: ran too long or another rank failed)"
                               if timed_out else ""))
        elif "error" in saved:
            problems.append(f"rank {r} failed:\n{saved['error']}")
        results.append(saved["results"] if saved and "results" in saved else None)
    if problems:
        return None, f"{world}-process gloo run failed:\n" + "\n".join(problems)
    return results, None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(world) -> per-rank results; one spawn per world size for the whole module."""
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = _spawn(world, tmp_path_factory.mktemp(f"world{world}"))
        results, error = cache[world]
        if error is not None:
            pytest.fail(error, pytrace=False)
        return results

    return get


CASES = [pytest.param(world, case, id=f"world{world}-{case['name']}")
         for world in (2, 3) for case in _cases(world)]


@pytest.mark.parametrize("world, case", CASES)
def test_matches_single_process(runs, world, case):
    results = runs(world)
    members = case["group_ranks"] or list(range(world))
    shares = [results[r][case["name"]] for r in members]
    expected = _loss_and_grads(case, _global_embeddings(case))
    rtol = RTOL[case["dtype"]]

    assert_close_rel(sum(s["loss"] for s in shares), expected["loss"], rtol, "sum of losses")
    rows = torch.split(expected["grad_x"], case["counts"])
    for r, share, expected_rows in zip(members, shares, rows):
        assert_close_rel(share["grad_x"], expected_rows, rtol, f"rank {r} embedding grad")
    assert_close_rel(sum(s["grad_w"] for s in shares), expected["grad_w"], rtol, "sum of w grads")
    assert_close_rel(sum(s["grad_b"] for s in shares), expected["grad_b"], rtol, "sum of b grads")
    if case["group_ranks"] is not None:
        assert all(case["name"] not in results[r] for r in range(world) if r not in members)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_gradients_are_the_global_gradient_over_world_size(runs, world):
    """As documented: DDP's average of the ranks' gradients is grad(global loss) / W,
    for the encoder and for the criterion's w and b (inside the DDP module)."""
    results = runs(world)
    reference = _SpeakerModel(distributed=False)
    expected_loss = reference(_ddp_frames(world))
    expected_loss.backward()
    assert_close_rel(sum(results[r]["ddp"]["loss"] for r in range(world)),
                     expected_loss.detach(), 1e-10, "sum of losses")
    for name, p in reference.named_parameters():
        for r in range(world):
            assert_close_rel(results[r]["ddp"]["grads"][name], p.grad / world, 1e-10,
                             f"rank {r} {name}")


@pytest.mark.parametrize("world", [2, 3])
def test_mismatch_is_the_same_error_on_every_rank(runs, world):
    results = runs(world)
    local = [results[r]["mismatch"]["local"] for r in range(world)]
    assert local[0] is not None and local[0][0] == "ValueError" and "2 dimensions" in local[0][1]
    for r in range(1, world):
        assert local[r] is not None and local[r][0] == "RuntimeError", local[r]
        assert "rank(s) [0]" in local[r][1], local[r][1]
    for kind, hint in (("M", "M (utterances per speaker)"), ("D", "D (features)"),
                       ("dtype", "dtype")):
        messages = [results[r]["mismatch"][kind] for r in range(world)]
        assert all(m is not None for m in messages), f"{kind}: some rank raised no ValueError"
        assert len(set(messages)) == 1, f"{kind}: the ranks' messages differ: {messages}"
        assert f"differ in {hint}" in messages[0], messages[0]
        assert "rank 0:" in messages[0] and f"rank {world - 1}:" in messages[0]
    # and the process group was still in step afterwards
    first = _cases(world)[0]["name"]
    for r in range(world):
        assert torch.equal(results[r]["after_mismatch"]["loss"], results[r][first]["loss"])


no_process_group_here = pytest.mark.skipif(
    dist.is_available() and dist.is_initialized(),
    reason="a process group is already initialised in this process")


@no_process_group_here
def test_without_process_group_raises():
    x = make_embeddings(3, M, D)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ge2e_loss(x, W0, B0, distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        GE2ELoss(distributed=True)(x)


@no_process_group_here
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_world_size_one_equals_local_loss(tmp_path, backend):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=GROUP_TIMEOUT)
    try:
        for method in ("softmax", "contrast"):
            for reduction in ("sum", "mean", "none"):
                case = dict(name="one", counts=[5], method=method, backend=backend,
                            reduction=reduction, min_cosine=1e-6, module=False,
                            dtype=torch.float64, group_ranks=None)
                x = _global_embeddings(case)
                got = _loss_and_grads(case, x, distributed=True)
                want = _loss_and_grads(case, x)
                for key in want:
                    assert_close_rel(got[key], want[key], 1e-12, f"{method} {reduction} {key}")
    finally:
        dist.destroy_process_group()


class _FakeDist:
    def __init__(self, backend):
        self.backend = backend

    def get_backend(self, group):
        return self.backend


def test_communication_device(monkeypatch):
    cpu = torch.device("cpu")
    cuda1 = torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    device = ge2e_dist._communication_device
    assert device(_FakeDist("gloo"), None, cpu) == cpu
    assert device(_FakeDist("gloo"), None, cuda1) == cpu
    assert device(_FakeDist("nccl"), None, cpu) == cuda1
    assert device(_FakeDist("cpu:gloo,cuda:nccl"), None, cpu) == cpu
    assert device(_FakeDist("cpu:gloo,cuda:nccl"), None, cuda1) == cuda1
    assert device(_FakeDist("cuda:nccl"), None, cpu) == cuda1


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_labels_form_matches_single_process(runs, world, method):
    """Ranks with different label sets and group sizes: the shares add up to the
    single-process loss of all rows, each rank's row gradients are its rows'."""
    results = runs(world)
    shares = _labelled_rows(world)
    rows = torch.cat([r for r, _ in shares])
    labels = torch.cat([l for _, l in shares])
    expected = _labels_loss_and_grads(rows, labels, method, False)
    got = [results[r]["labels"][method] for r in range(world)]
    assert_close_rel(sum(g["loss"] for g in got), expected["loss"], 1e-10, "sum of losses")
    for r, expected_rows in enumerate(torch.split(expected["grad_x"],
                                                  [len(l) for _, l in shares])):
        assert_close_rel(got[r]["grad_x"], expected_rows, 1e-10, f"rank {r} row grads")
    for name in ("grad_w", "grad_b"):
        assert_close_rel(sum(g[name] for g in got), expected[name], 1e-10, f"sum of {name}")


@pytest.mark.parametrize("world", [2, 3])
def test_a_label_on_two_ranks_is_the_same_error_everywhere(runs, world):
    messages = [runs(world)[r]["labels"]["clash"] for r in range(world)]
    assert all(m is not None for m in messages) and len(set(messages)) == 1, messages
    assert "label 7 on ranks" in messages[0] and "one rank" in messages[0]


OPTION_HINTS = {
    "grad": "whether the loss needs a gradient",
    "grad_labels": "whether the loss needs a gradient",
    "min_cosine": "differ in min_cosine",
    "min_cosine_value": "differ in min_cosine",
    "method": "differ in loss_method",
    "reduction": "differ in reduction",
    "w": "differ in w",
    "b": "differ in b",
    "normalize": "differ in normalize",
}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", list(OPTION_HINTS))
def test_option_and_gradient_mismatches_are_the_same_error_on_every_rank(runs, world, kind):
    """requires_grad on some ranks only (the backward is a collective: it would
    hang), or different loss options: the same ValueError on every rank, in the
    forward, before any collective that could wait (the run's group for these
    calls times out after 15 s, so a wait would fail the messages below)."""
    results = [runs(world)[r]["options"][kind] for r in range(world)]
    assert all(r[0] == "ValueError" for r in results), results
    assert len({r[1] for r in results}) == 1, results
    assert OPTION_HINTS[kind] in results[0][1], results[0][1]
    assert not any(r[2] for r in results)


@pytest.mark.parametrize("world", [2, 3])
def test_a_bad_option_on_one_rank_is_its_error_there_and_named_elsewhere(runs, world):
    """A min_cosine that is not a number on rank 0: its TypeError there, and a
    RuntimeError naming rank 0 on the others (not a network error)."""
    results = [runs(world)[r]["options"]["min_cosine_type"] for r in range(world)]
    assert results[0][0] == "TypeError" and "min_cosine" in results[0][1], results[0]
    for r in range(1, world):
        assert results[r][0] == "RuntimeError" and "rank(s) [0]" in results[r][1], results[r]


@pytest.mark.parametrize("world", [2, 3])
def test_a_labels_rank_with_no_rows_is_told_one_speaker_per_rank(runs, world):
    results = [runs(world)[r]["options"]["empty_labels"] for r in range(world)]
    last = world - 1
    assert results[last][0] == "ValueError", results[last]
    assert "1 speaker per rank" in results[last][1] and "0 row(s)" in results[last][1]
    for r in range(last):
        assert results[r][0] == "RuntimeError" and f"rank(s) [{last}]" in results[r][1]
