"""The speaker-encoder example (examples/train_speaker_encoder.py) in its tiny configuration.

Runs the whole pipeline (eSpeak NG synthesis, log-mel features, the drop-in check,
training, held-out EER, the step-time split, plot, metrics.json) in a subprocess,
then resumes the run from its checkpoint and compares with an uninterrupted run.
About 15 s on 2 cores; needs espeakng-loader and tqdm (scripts/setup_env.sh).
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import LOSS_METHODS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_speaker_encoder.py"
KEYS = ("eer_untrained", "eer_final", "steps", "speakers_train", "speakers_heldout", "step_split",
        "dropin", "evals", "loss_per_step", "data_generation_s", "training_s", "config")


def run_example(*args):
    command = [sys.executable, str(SCRIPT), "--smoke", "--threads", "2", *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    proc = run_example("--output", out)
    return out, json.loads((out / "metrics.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def example_module():
    spec = importlib.util.spec_from_file_location("train_speaker_encoder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metrics(smoke):
    _, m, stdout = smoke
    for key in KEYS:
        assert key in m, key
    assert m["steps"] == 6 and len(m["loss_per_step"]) == 6
    assert (m["speakers_train"], m["speakers_heldout"]) == (8, 4)
    assert all(math.isfinite(x) and x > 0 for x in m["loss_per_step"])
    assert [e["step"] for e in m["evals"]] == [0, 3, 6]
    assert 0.0 <= m["eer_untrained"] <= 1.0 and 0.0 <= m["eer_final"] <= 1.0
    assert m["eer_untrained"] == m["evals"][0]["eer"] and m["eer_final"] == m["evals"][-1]["eer"]
    assert m["data_generation_s"] > 0 and m["training_s"] > 0


def test_dropin_same_losses(smoke):
    _, m, stdout = smoke
    for method in LOSS_METHODS:
        d = m["dropin"][method]
        assert len(d["loss_reference"]) == len(d["loss_ge2e_ext"]) == d["steps"] > 0
        assert 0.0 <= d["max_rel_diff"] <= 1e-4, (method, d)
        assert all(x > 0 for x in d["loss_reference"])
    # The ge2e_ext run of the drop-in check is the start of the real training run.
    first = m["dropin"]["softmax"]
    assert first["loss_ge2e_ext"] == m["loss_per_step"][:first["steps"]]


def test_step_split(smoke):
    _, m, stdout = smoke
    assert set(m["step_split"]) == {"reference", "torch", "extension"}
    for name, s in m["step_split"].items():
        assert s["encoder_ms"] > 0 and s["loss_ms"] > 0, name
        assert 0 < s["loss_share"] < 1, name
        assert s["step_ms"] == pytest.approx(s["encoder_ms"] + s["loss_ms"] + s["other_ms"])
    assert "| ge2e_ext" in stdout and "loss share" in stdout


def test_outputs(smoke):
    out, _, _ = smoke
    png = (out / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    cache = list((out / "data_cache").glob("espeak-*"))
    assert len(cache) == 1 and (cache[0] / "data.pt").exists()
    data = torch.load(cache[0] / "data.pt")
    assert len(data["speakers"]) == 12 and all(len(f) == 6 for f in data["features"])
    assert len(set(data["texts"])) == len(data["texts"])  # every utterance its own sentence
    assert len({s["voice"] for s in data["speakers"]}) == 12  # every speaker its own voice
    train_variants = {s["voice"].split("+")[1] for s in data["speakers"] if s["split"] == "train"}
    held_variants = {s["voice"].split("+")[1] for s in data["speakers"] if s["split"] == "heldout"}
    assert not train_variants & held_variants
    for feats in data["features"]:
        for f in feats:
            assert f.shape[1] == 40 and f.shape[0] > 50 and torch.isfinite(f.float()).all()
    with open(cache[0] / "speaker0.wav", "rb") as f:
        assert f.read(4) == b"RIFF"


def test_resume_continues_the_run(smoke, tmp_path):
    out, m, _ = smoke
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    cache = out / "data_cache"
    run_example("--output", resumed, "--cache", cache, "--resume", "--steps", 9,
                "--split-repeats", 0)
    r = json.loads((resumed / "metrics.json").read_text())
    assert r["steps"] == 9 and [e["step"] for e in r["evals"]] == [0, 3, 6, 9]
    assert r["loss_per_step"][:6] == m["loss_per_step"]
    # An uninterrupted run, on data made again (synthesis is deterministic).
    straight = tmp_path / "straight"
    run_example("--output", straight, "--steps", 9, "--dropin-steps", 0, "--split-repeats", 0)
    s = json.loads((straight / "metrics.json").read_text())
    first = torch.load(next(cache.glob("espeak-*/data.pt")))
    again = torch.load(next((straight / "data_cache").glob("espeak-*/data.pt")))
    assert first["texts"] == again["texts"] and first["speakers"] == again["speakers"]
    for a, b in zip(first["features"], again["features"]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    np.testing.assert_allclose(r["loss_per_step"], s["loss_per_step"], rtol=1e-5)
    assert r["eer_final"] == pytest.approx(s["eer_final"], abs=0.05)


def test_mel_filterbank_matches_librosa(example_module):
    # torchaudio's filterbank (computed in float32), against librosa's float64 values
    fb = example_module.mel_filterbank(22050, 1024, 40).double()
    assert fb.shape == (40, 513) and (fb >= 0).all()
    # librosa.filters.mel(sr=22050, n_fft=1024, n_mels=40) (htk=False, norm="slaney"),
    # librosa 0.11.0: (row, argmax, max)
    for row, argmax, peak in ((0, 4, 0.01156630553305149), (1, 8, 0.010810579173266888),
                              (10, 41, 0.010826711542904377), (25, 146, 0.0037687881849706173),
                              (39, 471, 0.0011739175533875823)):
        assert fb[row].argmax().item() == argmax
        assert fb[row].max().item() == pytest.approx(peak, rel=1e-5)
    # Slaney normalisation: every triangle has unit area in Hz.
    np.testing.assert_allclose(fb.sum(1).numpy() * 22050 / 1024, 1.0, rtol=0.01)


def test_example_uses_the_library_eer(example_module):
    # ge2e_ext.metrics.equal_error_rate (tests/test_metrics.py checks it) scores the held-out set
    from ge2e_ext.metrics import equal_error_rate
    assert example_module.equal_error_rate is equal_error_rate
