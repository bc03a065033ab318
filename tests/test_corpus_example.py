"""The speaker-encoder example on corpus folders (--data), and examples/verify.py.

A test makes small corpora from the synthesizer (examples/speech_synth.py): a
dozen speakers in VoxCeleb's layout (id/video/00001.wav, 22.05 kHz WAV, so the
16 kHz features resample), and LibriSpeech's (speaker/chapter/*.flac); trains a
few steps on each in the tiny configuration, then verifies on the held-out
speakers. Bad folders give errors that name the path. About a minute on 2 cores;
needs soundfile, torchaudio and espeakng-loader (scripts/setup_env.sh).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import corpus  # noqa: E402
import speech_synth  # noqa: E402

soundfile = pytest.importorskip("soundfile")

SPEAKERS, UTTERANCES = 12, 4
# the tiny configuration, trained for 4 steps, 4 of the 12 speakers held out
TRAIN = ("--smoke", "--threads", "2", "--steps", "4", "--eval-every", "2", "--dropin-steps", "0",
         "--split-repeats", "0", "--heldout-speakers", "4")


def run(script, *args, ok=True):
    command = [sys.executable, str(EXAMPLES / script), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def voices():
    """int16 samples at 22.05 kHz: [speaker][utterance], plus one speaker with 2 utterances."""
    speakers = speech_synth.make_speakers(SPEAKERS + 1, 0, seed=5)
    jobs = speech_synth.make_jobs(speakers, UTTERANCES, seed=5)
    jobs = [j for j in jobs if j[0] < SPEAKERS * UTTERANCES + 2]  # the last speaker: 2
    samples = dict(speech_synth.synth_block(jobs))
    out = [[samples[s * UTTERANCES + u] for u in range(UTTERANCES) if s * UTTERANCES + u in samples]
           for s in range(SPEAKERS + 1)]
    assert [len(u) for u in out] == [UTTERANCES] * SPEAKERS + [2]
    return out


def write(path, samples, rate=22050):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, rate)


@pytest.fixture(scope="module")
def voxceleb(voices, tmp_path_factory):
    """id1000S/VIDEO/0000U.wav: two videos per speaker, one short file, one stray file."""
    root = tmp_path_factory.mktemp("voxceleb") / "wav"
    for s, utts in enumerate(voices):
        for u, x in enumerate(utts):
            write(root / f"id{10001 + s}" / f"video{u % 2}" / f"{u + 1:05d}.wav", x)
    # too short to be usable (0.1 s): counted, not used
    write(root / "id10001" / "video9" / "00099.wav", voices[0][0][:2205])
    return root


@pytest.fixture(scope="module")
def librispeech(voices, tmp_path_factory):
    """SPEAKER/CHAPTER/SPEAKER-CHAPTER-UUUU.flac, at 16 kHz (no resampling)."""
    root = tmp_path_factory.mktemp("librispeech") / "train-clean"
    for s, utts in enumerate(voices[:SPEAKERS]):
        spk, chapter = 100 + 7 * s, 1000 + s
        for u, x in enumerate(utts):
            audio = corpus.resample(torch.from_numpy(x.astype(np.float32) / 32768), 22050, 16000)
            write(root / str(spk) / str(chapter) / f"{spk}-{chapter}-{u:04d}.flac",
                  audio.numpy(), 16000)
    return root


@pytest.fixture(scope="module")
def vox_run(voxceleb, tmp_path_factory):
    out = tmp_path_factory.mktemp("vox_run")
    proc = run("train_speaker_encoder.py", "--output", out, "--data", voxceleb, *TRAIN)
    return out, json.loads((out / "metrics.json").read_text()), proc.stdout


def check_run(out, m, heldout=4):
    assert m["steps"] == 4 and len(m["loss_per_step"]) == 4
    assert all(np.isfinite(m["loss_per_step"])) and min(m["loss_per_step"]) > 0
    assert [e["step"] for e in m["evals"]] == [0, 2, 4]
    assert 0 <= m["eer_untrained"] <= 1 and 0 <= m["eer_final"] <= 1
    assert m["speakers_heldout"] == heldout
    png = (out / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "checkpoint.pt").exists()


def test_voxceleb_layout_trains(vox_run, voxceleb):
    out, m, stdout = vox_run
    check_run(out, m)
    c = m["corpus"]
    assert m["data"] == str(voxceleb) and c["sample_rate"] == 16000
    assert c["speaker_folders"] == SPEAKERS + 1 and c["files"] == SPEAKERS * UTTERANCES + 3
    assert c["speakers_skipped"] == 1 and c["files_unused_short"] == 1
    assert m["speakers_train"] == SPEAKERS - 4
    assert c["utterances_train"] + c["utterances_heldout"] == SPEAKERS * UTTERANCES
    assert "skipped 1 speakers with fewer than 3 usable utterances" in stdout
    assert "1 files with less than 20 frames of speech unused" in stdout
    cache = list((out / "data_cache").glob("corpus-*/features.pt"))
    assert len(cache) == 1
    feats = torch.load(cache[0])
    assert feats["sample_rate"] == 16000 and len(feats["speakers"]) == SPEAKERS + 1
    assert all(f.shape[1] == 40 and torch.isfinite(f.float()).all()
               for utts in feats["features"] for f in utts if len(f))


def test_resume_on_a_corpus(vox_run, tmp_path):
    out, m, _ = vox_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    # the run's own configuration (--data, --smoke's sizes, --enrol, ...) comes from the checkpoint
    run("train_speaker_encoder.py", "--output", resumed, "--resume", "--steps", 6,
        "--cache", out / "data_cache", "--threads", 2, "--split-repeats", 0)
    r = json.loads((resumed / "metrics.json").read_text())
    assert r["steps"] == 6 and r["loss_per_step"][:4] == m["loss_per_step"]
    assert r["data"] == m["data"] and r["corpus"] == m["corpus"]


def test_librispeech_layout_trains(librispeech, tmp_path):
    out = tmp_path / "run"
    run("train_speaker_encoder.py", "--output", out, "--data", librispeech, *TRAIN)
    m = json.loads((out / "metrics.json").read_text())
    check_run(out, m)
    assert m["corpus"]["files"] == SPEAKERS * UTTERANCES and m["corpus"]["speakers_skipped"] == 0


def test_verify_heldout_all_pairs(vox_run, voxceleb, tmp_path):
    out, m, _ = vox_run
    result_path = tmp_path / "verification.json"
    proc = run("verify.py", "--checkpoint", out / "checkpoint.pt", "--data", voxceleb,
               "--heldout-only", "--output", result_path)
    r = json.loads(result_path.read_text())
    assert f"EER {100 * r['eer']:.2f}%" in proc.stdout
    # 4 held-out speakers x 2 test utterances, each against the 4 enrolments
    assert (r["speakers"], r["targets"], r["impostors"]) == (4, 8, 24)
    assert 0 <= r["eer"] <= 1 and r["trained_steps"] == 4
    # the same scoring as the training run's last held-out evaluation
    assert r["eer"] == pytest.approx(m["eer_final"], abs=1e-12)


def test_verify_trial_list(vox_run, voxceleb, tmp_path):
    out, _, _ = vox_run
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    held = sorted(s["name"] for s in ckpt["speakers"] if s["split"] == "heldout")
    files = {s: sorted(str(p.relative_to(voxceleb)) for p in (voxceleb / s).rglob("*.wav"))
             for s in held}
    lines = [f"1 {files[s][0]} {files[s][1]}" for s in held]
    lines += [f"0 {files[a][0]} {files[b][2]}" for a, b in zip(held, held[1:] + held[:1])]
    trials = tmp_path / "veri_test.txt"
    trials.write_text("\n".join(lines) + "\n")
    result_path = tmp_path / "trials.json"
    proc = run("verify.py", "--checkpoint", out / "checkpoint.pt", "--data", voxceleb,
               "--trials", trials, "--output", result_path)
    r = json.loads(result_path.read_text())
    assert (r["targets"], r["impostors"], r["trials"]) == (4, 4, 8)
    assert "EER" in proc.stdout and 0 <= r["eer"] <= 1
    trials.write_text("1 id10001/video0/00001.wav id99999/x/1.wav\n")
    proc = run("verify.py", "--checkpoint", out / "checkpoint.pt", "--data", voxceleb,
               "--trials", trials, ok=False)
    assert proc.returncode != 0 and "id99999/x/1.wav" in proc.stderr


def test_no_audio_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    (empty / "speaker1").mkdir(parents=True)
    (empty / "speaker1" / "notes.txt").write_text("no audio here")
    proc = run("train_speaker_encoder.py", "--output", tmp_path / "out", "--data", empty,
               "--smoke", ok=False)
    assert proc.returncode != 0
    assert "no audio files" in proc.stderr and str(empty) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_folders_name_the_path(tmp_path, voices):
    with pytest.raises(corpus.CorpusError, match="no such folder"):
        corpus.find_speakers(tmp_path / "missing")
    flat = tmp_path / "flat"
    write(flat / "a.wav", voices[0][0])
    with pytest.raises(corpus.CorpusError, match="lie directly in it"):
        corpus.find_speakers(flat)
    aac = tmp_path / "vox2"
    (aac / "id1" / "v").mkdir(parents=True)
    (aac / "id1" / "v" / "00001.m4a").write_bytes(b"\0" * 64)
    with pytest.raises(corpus.CorpusError, match=r"00001\.m4a.*convert"):
        corpus.find_speakers(aac)
    broken = tmp_path / "broken"
    write(broken / "spk" / "ok.wav", voices[0][0])
    (broken / "spk" / "bad.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(corpus.CorpusError, match=r"cannot read audio file .*spk/bad\.wav"):
        corpus.load_features(broken, 16000, workers=1)
    with pytest.raises(corpus.CorpusError, match=r"cannot read audio file .*spk/bad\.wav"):
        corpus.load_features(broken, 16000, workers=2)


def test_too_few_speakers_is_a_clear_error(vox_run, voxceleb, tmp_path):
    proc = run("train_speaker_encoder.py", "--output", tmp_path / "out", "--data", voxceleb,
               "--cache", vox_run[0] / "data_cache", "--smoke", "--heldout-speakers", "10",
               ok=False)
    assert proc.returncode != 0 and "too few speakers" in proc.stderr
    assert str(voxceleb) in proc.stderr and "N=4" in proc.stderr


def test_flat_layout_and_heldout_names(voices, tmp_path):
    flat = tmp_path / "own"
    for s, utts in enumerate(voices[:5]):
        for u, x in enumerate(utts):
            write(flat / f"person{s}" / f"take{u}.ogg", x)
    speakers = corpus.find_speakers(flat)
    assert list(speakers) == [f"person{s}" for s in range(5)]
    assert speakers["person0"] == [f"person0/take{u}.ogg" for u in range(UTTERANCES)]
    spec = importlib.util.spec_from_file_location("train_speaker_encoder",
                                                  EXAMPLES / "train_speaker_encoder.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    args = trainer.parse_args(["--output", str(tmp_path / "o"), "--data", str(flat), "--smoke",
                               "-N", "3", "--heldout-speakers", "person1,person4",
                               "--workers", "1"])
    data = trainer.load_corpus(args)
    assert [s["split"] for s in data["speakers"]] == ["train", "heldout", "train", "train",
                                                      "heldout"]
    assert data["mean"].shape == (40,) and (data["std"] > 0).all()
    args.heldout_speakers = "person9"
    with pytest.raises(corpus.CorpusError, match="person9 not among"):
        trainer.load_corpus(args)


def test_resampler_is_band_limited():
    # a 7 kHz tone survives 22.05 -> 16 kHz; a 9 kHz tone (above 8 kHz Nyquist) is removed
    t = torch.arange(22050, dtype=torch.float64) / 22050
    for freq, kept in ((7000, True), (9000, False)):
        y = corpus.resample(torch.sin(2 * torch.pi * freq * t), 22050, 16000)
        assert y.shape == (16000,)
        rms = y[2000:-2000].pow(2).mean().sqrt().item()
        assert (rms > 0.69) if kept else (rms < 1e-3), (freq, rms)
