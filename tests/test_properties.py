"""Properties over random shapes and scales (hypothesis)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ge2e_ext

from helpers import CPU_BACKENDS, LOSS_METHODS, assert_close_rel, needs_cpu_extension

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])

shapes = st.tuples(st.integers(2, 9), st.integers(2, 6), st.integers(1, 40))


def _embeddings(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


@needs_cpu_extension
@PROPERTY_SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), method=st.sampled_from(LOSS_METHODS),
       min_cosine=st.sampled_from([1e-6, None, -0.5, 0.3]),
       w=st.floats(0.5, 20.0), b=st.floats(-10.0, 10.0))
def test_backends_agree(shape, seed, method, min_cosine, w, b):
    x = _embeddings(shape, seed)
    results = []
    for backend in CPU_BACKENDS:
        xb = x.clone().requires_grad_()
        wb = torch.tensor(w, dtype=torch.float64, requires_grad=True)
        bb = torch.tensor(b, dtype=torch.float64, requires_grad=True)
        rows = ge2e_ext.ge2e_loss(xb, wb, bb, method, reduction="none", min_cosine=min_cosine,
                                  backend=backend)
        grads = torch.autograd.grad(rows.sum(), (xb, wb, bb))
        results.append((rows.detach(),) + grads)
    for got, expected in zip(results[1], results[0]):
        assert_close_rel(got, expected, 1e-9, "extension vs torch")


@PROPERTY_SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), method=st.sampled_from(LOSS_METHODS),
       log_scale=st.floats(-6.0, 6.0), backend=st.sampled_from(CPU_BACKENDS))
def test_loss_is_scale_invariant(shape, seed, method, log_scale, backend):
    """Cosines do not depend on the embeddings' scale, so neither does the loss."""
    x = _embeddings(shape, seed)
    base = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, reduction="none", backend=backend)
    scaled = ge2e_ext.ge2e_loss(x * 10.0**log_scale, 10.0, -5.0, method, reduction="none",
                                backend=backend)
    assert_close_rel(scaled, base, 1e-9, "scaled")


@PROPERTY_SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), method=st.sampled_from(LOSS_METHODS),
       backend=st.sampled_from(CPU_BACKENDS), data=st.data())
def test_relabelling_speakers_and_utterances_permutes_the_losses(shape, seed, method, backend,
                                                                  data):
    n, m, _ = shape
    x = _embeddings(shape, seed) + 0.3  # away from the clamp, where ties are exact
    speakers = torch.tensor(data.draw(st.permutations(range(n))))
    utterances = torch.tensor(data.draw(st.permutations(range(m))))
    rows = ge2e_ext.ge2e_loss(x, 10.0, -5.0, method, reduction="none", backend=backend)
    permuted = ge2e_ext.ge2e_loss(x[speakers][:, utterances], 10.0, -5.0, method,
                                  reduction="none", backend=backend)
    assert_close_rel(permuted, rows[speakers][:, utterances], 1e-10, "permuted")


@PROPERTY_SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), backend=st.sampled_from(CPU_BACKENDS),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_loss_ranges(shape, seed, backend, dtype):
    """Softmax: L_ji = -log p_jij >= 0. Contrast: 1 - sig + sig lies in [0, 2]."""
    x = _embeddings(shape, seed, dtype)
    softmax = ge2e_ext.ge2e_loss(x, 10.0, -5.0, "softmax", reduction="none", backend=backend)
    contrast = ge2e_ext.ge2e_loss(x, 10.0, -5.0, "contrast", reduction="none", backend=backend)
    slack = 1e-5 if dtype == torch.float32 else 1e-12
    assert (softmax >= -slack).all()
    assert ((contrast >= -slack) & (contrast <= 2 + slack)).all()


def test_ci_runs_hypothesis_derandomized_without_a_database():
    """With CI=true (as .ci/run sets it) tests/conftest.py loads the "ci" profile
    before the test modules build their settings: every hypothesis test then
    draws the same examples on every clean clone."""
    import os
    import pathlib
    import subprocess
    import sys

    tests = pathlib.Path(__file__).parent
    code = ("import conftest, test_properties, test_numerics\n"
            "from hypothesis import settings\n"
            "s = test_properties.PROPERTY_SETTINGS\n"
            "t = test_numerics.test_hard_batches_match_the_reference"
            "._hypothesis_internal_use_settings\n"
            "print(settings.default.derandomize, s.derandomize, t.derandomize, "
            "settings.default.database is None, t.database is None)")
    env = dict(os.environ, CI="true")
    env.pop("HYPOTHESIS_PROFILE", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tests, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"] * 5, out.stdout
