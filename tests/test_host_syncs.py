"""No host synchronisation on the dense form's path, whatever form w and b take.

A GPU would show a sync as a device-to-host copy (aten::item,
aten::_local_scalar_dense) or a blocking host-to-device copy of a Python
number (torch.tensor(value, device=...)); both break CUDA-graph capture. The
profiler's CPU events are the proxy here: a call of ge2e_loss with Python-number
w and b makes them with a fill (aten::full, a kernel argument on a GPU) and
reads nothing back. The forward is what is profiled: with reduction "mean" it
is the whole training step (the loss and every gradient); the backward only
scales the saved gradients (on the CPU it reads the CPU upstream scalar to skip
a multiplication by 1, which on a GPU it does not do)."""

import pytest
import torch

from ge2e_ext import ge2e_loss
from helpers import CPU_BACKENDS, LOSS_METHODS, make_embeddings

READ_BACKS = ("aten::item", "aten::_local_scalar_dense", "aten::tolist")


def _ops_of(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name for event in prof.events()]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b == "extension"])
@pytest.mark.parametrize("method", LOSS_METHODS)
@pytest.mark.parametrize("w, b", [(10.0, -5.0), (10, -5)])
def test_python_number_w_and_b_are_filled_not_copied(backend, method, w, b):
    x = make_embeddings(4, 3, 8, dtype=torch.float32, seed=1)
    names = _ops_of(lambda: ge2e_loss(x, w, b, method, backend=backend))
    assert not [n for n in names if n in READ_BACKS], "a read-back from the device"
    assert "aten::lift_fresh" not in names, "torch.tensor(value): a host-to-device copy on a GPU"
    assert names.count("aten::full") >= 2


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b == "extension"])
def test_tensor_w_and_b_on_the_device_are_used_as_they_are(backend):
    x = make_embeddings(4, 3, 8, dtype=torch.float32, seed=2)
    w = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-5.0, requires_grad=True)
    names = _ops_of(lambda: ge2e_loss(x, w, b, backend=backend))
    assert not [n for n in names if n in READ_BACKS]
    assert "aten::full" not in names and "aten::_to_copy" not in names
