#!/usr/bin/env python
"""Train a GE2E speaker encoder on speech, with ge2e_ext's GE2ELoss.

    python examples/train_speaker_encoder.py --output example_results
    python examples/train_speaker_encoder.py --output example_results --resume --steps 1200
    python examples/train_speaker_encoder.py --output /tmp/smoke --smoke
    python examples/train_speaker_encoder.py --output vox_results --data VoxCeleb1/wav

1. Data: by default eSpeak NG (PyPI ``espeakng-loader``) speaks different
   sentences in many voices (accent x voice variant x pitch x rate); held-out
   speakers use voice variants that no training speaker uses. With ``--data DIR``
   a corpus on disk: a folder per speaker, audio files at any depth below it
   (examples/corpus.py: VoxCeleb's id/video/00001.wav, LibriSpeech's
   speaker/chapter/*.flac, or flat), resampled to --sample-rate; held-out
   speakers are whole speakers (--heldout-speakers). 40-channel log-mel frames
   (25 ms windows, 10 ms step) are cached once.
2. Model and training as in Wan et al. 2018 (arXiv 1710.10467): a 3-layer LSTM with
   a linear projection to an L2-normalised d-vector, batches of N speakers x M
   utterances (fixed-length partial utterances), the GE2E loss, the gradients of
   w and b scaled by 0.01, the gradient norm clipped at 3.
3. Evaluation: equal error rate on the held-out speakers (cosine of each test
   d-vector against each speaker's enrolment centroid), before and during training.
4. Drop-in check: the first training steps with the original loop loss and with
   ge2e_ext give the same losses. Step-time split: encoder vs loss time per step
   for the original loop loss, the PyTorch path and ge2e_ext.

Writes to --output: metrics.json, training.png, checkpoint.pt (resumable; what
examples/verify.py loads).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
import wave

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402  (examples/corpus.py: folders, reading, resampling, features)
import speech_synth  # noqa: E402  (examples/speech_synth.py)
from corpus import N_MELS, log_mel, mel_filterbank, trim_silence  # noqa: E402,F401

from ge2e_ext import LOSS_METHODS, GE2ELoss, extension_devices  # noqa: E402
from ge2e_ext.metrics import equal_error_rate  # noqa: E402
from ge2e_ext.reference import ge2e_loss_reference  # noqa: E402

DEFAULTS = dict(speakers=200, heldout=40, utterances=16, enrol=4, frames=100, n=32, m=8,
                hidden=128, proj=64, layers=3, lr=1e-3, halve_lr_every=200, steps=500,
                eval_every=50, dropin_steps=20, split_repeats=10, split_ref_repeats=3,
                loss_method="softmax")
SMOKE = dict(speakers=8, heldout=4, utterances=6, enrol=2, frames=40, n=4, m=3, hidden=32,
             proj=16, halve_lr_every=4, steps=6, eval_every=3, dropin_steps=4, split_repeats=2,
             split_ref_repeats=1)
DATA_KEYS = ("speakers", "heldout", "utterances", "enrol", "seed", "data", "heldout_speakers",
             "sample_rate")
DEFAULT_SAVED = dict(data=None, heldout_speakers=None, sample_rate=22050)  # older checkpoints
MODEL_KEYS = ("frames", "n", "m", "hidden", "proj", "layers", "lr", "halve_lr_every",
              "loss_method")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True,
                   help="folder for metrics.json, training.png and checkpoint.pt")
    p.add_argument("--cache", help="data cache folder (default: OUTPUT/data_cache)")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (a test, not a result)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/checkpoint.pt up to --steps")
    p.add_argument("--data", metavar="DIR",
                   help="train on a corpus folder: a folder per speaker, audio files (WAV, FLAC, "
                        "OGG, MP3, ...) at any depth below it [synthetic speech]")
    p.add_argument("--heldout-speakers", metavar="K|NAMES",
                   help="with --data: held-out speakers, a number (picked at random with --seed) "
                        "or comma-separated speaker folder names [a fifth, at least 2]")
    p.add_argument("--sample-rate", type=int,
                   help="with --data: the features' sample rate; audio is resampled to it "
                        "[16000; the synthetic speech: eSpeak NG's 22050]")
    options = (  # name, type, help; defaults in DEFAULTS (SMOKE with --smoke)
        ("--speakers", int, "training speakers (synthetic)"),
        ("--heldout", int, "held-out speakers (synthetic)"),
        ("--utterances", int, "utterances per speaker (with --data: at most, default all)"),
        ("--enrol", int, "enrolment utterances per held-out speaker (the rest are test ones)"),
        ("--frames", int, "frames (10 ms) per partial utterance"),
        ("-N", int, "speakers per batch"), ("-M", int, "utterances per speaker in a batch"),
        ("--hidden", int, "LSTM units"), ("--proj", int, "d-vector size"),
        ("--layers", int, "LSTM layers"), ("--lr", float, "Adam learning rate"),
        ("--halve-lr-every", int, "steps between halvings of the learning rate"),
        ("--loss-method", str, "softmax or contrast"), ("--steps", int, "total training steps"),
        ("--eval-every", int, "steps between held-out evaluations"),
        ("--dropin-steps", int, "steps of the drop-in check (0: skip)"),
        ("--split-repeats", int, "timed steps per loss in the step-time split (0: skip)"),
        ("--split-ref-repeats", int, "timed steps of the slow loop loss"))
    for flag, kind, text in options:
        key = flag.lstrip("-").replace("-", "_").lower()
        smoke = f", --smoke: {SMOKE[key]}" if key in SMOKE else ""
        p.add_argument(flag, type=kind, dest=key, help=f"{text} [{DEFAULTS[key]}{smoke}]")
    p.add_argument("--seed", type=int, default=0, help="data, initial weights and batches [0]")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto [cpu]")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads [%(default)s]")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="synthesis (or, with --data, audio-reading) processes [%(default)s]")
    args = p.parse_args(argv)
    utterances_given = args.utterances is not None
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, SMOKE.get(key, value) if args.smoke else value)
    if args.loss_method not in LOSS_METHODS:
        p.error(f"--loss-method: one of {', '.join(LOSS_METHODS)}")
    if args.data is None:
        if args.heldout_speakers is not None or args.sample_rate is not None:
            p.error("--heldout-speakers and --sample-rate go with --data")
        args.sample_rate = SAMPLE_RATE
        if args.n > args.speakers or args.m > args.utterances or args.enrol >= args.utterances:
            p.error("need N <= --speakers, M <= --utterances and --enrol < --utterances")
    else:
        args.data = os.path.abspath(args.data)
        args.sample_rate = args.sample_rate or 16000
        if not utterances_given:
            args.utterances = None  # all of them
        if args.utterances is not None and (args.m > args.utterances
                                            or args.enrol >= args.utterances):
            p.error("need M <= --utterances and --enrol < --utterances")
    if min(args.n, args.m, args.workers, args.threads, args.halve_lr_every, args.enrol,
           args.sample_rate) < 1:
        p.error("N, M, --enrol, --workers, --threads, --halve-lr-every and --sample-rate must "
                "be at least 1")
    return args


# ------------------------------------------------------------------- features
SAMPLE_RATE = 22050  # eSpeak NG's rate; the synthetic speech's features are computed at it
# The features (examples/corpus.py): 40 log-mel channels of 25 ms windows every 10 ms,
# the mel filterbank from torchaudio (librosa's Slaney filters; tests/test_example.py
# compares them with librosa's values).


def prepare_audio(samples, index, seed):
    """int16 -> float: trim leading/trailing silence, add mild noise (30 to 50 dB SNR)."""
    x = trim_silence(samples.astype(np.float32) / 32768.0, SAMPLE_RATE)
    rng = np.random.default_rng([seed, index])
    noise_rms = np.sqrt(np.mean(x ** 2)) * 10 ** (-rng.uniform(30, 50) / 20)
    return torch.from_numpy(x + rng.standard_normal(len(x)).astype(np.float32) * noise_rms)


# ----------------------------------------------------------------------- data
def load_or_make_data(args):
    """Speakers and log-mel features: a corpus folder's (--data), or synthetic speech."""
    if args.data is not None:
        return load_corpus(args)
    return load_or_make_synthetic(args)


def load_or_make_synthetic(args):
    """Speakers, texts and log-mel features, made once into the cache folder."""
    key = json.dumps({k: getattr(args, k) for k in ("speakers", "heldout", "utterances", "seed")}
                     | {"espeakng": speech_synth.espeak_version(), "version": 4,
                        "features": [SAMPLE_RATE, *corpus.frame_sizes(SAMPLE_RATE), N_MELS,
                                     corpus.FEATURE_VERSION]}, sort_keys=True)
    folder = os.path.join(args.cache or os.path.join(args.output, "data_cache"),
                          "espeak-" + hashlib.sha1(key.encode()).hexdigest()[:12])
    path = os.path.join(folder, "data.pt")
    if os.path.exists(path):
        data = torch.load(path)
        print(f"data: {len(data['speakers'])} speakers x {args.utterances} utterances "
              f"from {folder}")
        return data
    os.makedirs(folder, exist_ok=True)
    speakers = speech_synth.make_speakers(args.speakers, args.heldout, args.seed)
    jobs = speech_synth.make_jobs(speakers, args.utterances, args.seed)
    feats, seconds = [None] * len(jobs), 0.0
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this process computes features while the workers synthesise
    # Blocks of 4 speakers, each synthesised in a fresh process (see speech_synth.synth_block).
    blocks = [jobs[i:i + 4 * args.utterances] for i in range(0, len(jobs), 4 * args.utterances)]
    pool = multiprocessing.get_context("fork").Pool(args.workers, maxtasksperchild=1)
    bar = tqdm(total=len(jobs), desc="synthesising", unit="utt", mininterval=0.5)
    try:
        done = pool.imap_unordered(speech_synth.synth_block, blocks)
        for index, samples in (result for block in done for result in block):
            bar.update()
            audio = prepare_audio(samples, index, args.seed)
            seconds += len(audio) / SAMPLE_RATE
            feats[index] = log_mel(audio, SAMPLE_RATE).half()
            speaker, utterance = divmod(index, args.utterances)
            if utterance == 0 and speaker < 4:  # a few files to listen to
                with wave.open(os.path.join(folder, f"speaker{speaker}.wav"), "wb") as f:
                    f.setnchannels(1)
                    f.setsampwidth(2)
                    f.setframerate(SAMPLE_RATE)
                    f.writeframes((audio.clamp(-1, 1) * 32767).short().numpy().tobytes())
    finally:
        bar.close()
        pool.close()
        pool.join()
        torch.set_num_threads(threads)
    u = args.utterances
    train = torch.cat([f.float() for i, f in enumerate(feats)
                       if speakers[i // u]["split"] == "train"])
    data = {"speakers": speakers, "texts": [j[1] for j in jobs],
            "features": [feats[s * u:(s + 1) * u] for s in range(len(speakers))],
            "mean": train.mean(0), "std": train.std(0),  # for the encoder's input normalisation
            "audio_hours": seconds / 3600, "generation_s": time.perf_counter() - t0}
    torch.save(data, path + ".tmp")
    os.replace(path + ".tmp", path)
    n_train = sum(s["split"] == "train" for s in speakers)
    print(f"data: generated {n_train} training + {len(speakers) - n_train} held-out speakers x {u} "
          f"utterances ({len(jobs)}, {seconds / 3600:.2f} h of audio) in "
          f"{data['generation_s']:.1f} s -> {folder}")
    return data


def pick_heldout(names, spec, seed, root):
    """The held-out speakers: --heldout-speakers as a count or as names."""
    if spec is None:  # a fifth, at least 2 (if there are 2: too few otherwise, said later)
        k = min(max(2, round(len(names) / 5)), len(names))
        return sorted(random.Random(seed).sample(names, k))
    if spec.isdigit():
        k = int(spec)
        if k > len(names):
            raise corpus.CorpusError(f"--heldout-speakers {k}: {root} has only {len(names)} "
                                     f"usable speakers")
        return sorted(random.Random(seed).sample(names, k))
    chosen = [x for x in spec.split(",") if x]
    unknown = [x for x in chosen if x not in names]
    if unknown:
        raise corpus.CorpusError(f"--heldout-speakers: {', '.join(unknown)} not among the usable "
                                 f"speaker folders of {root}")
    return sorted(set(chosen))


def load_corpus(args):
    """A corpus folder's features (examples/corpus.py, cached), speakers split by speaker.

    An utterance is usable with at least half a partial (frames/2) of speech; a
    speaker needs M usable utterances (and --enrol + 1, to be held out).
    """
    root = args.data
    cache = args.cache or os.path.join(args.output, "data_cache")
    found = corpus.load_features(root, args.sample_rate, cache, args.workers, tqdm)
    need, min_frames = max(args.m, args.enrol + 1), max(args.frames // 2, 1)
    speakers, features, seconds, short, skipped = [], [], 0.0, 0, []
    for name, files, feats, secs in zip(found["speakers"], found["files"], found["features"],
                                        found["seconds"]):
        usable = [(f, x, t) for f, x, t in zip(files, feats, secs) if len(x) >= min_frames]
        short += len(files) - len(usable)
        usable = usable[:args.utterances]  # --utterances: at most that many (None: all)
        if len(usable) < need:
            skipped.append(name)
            continue
        speakers.append({"name": name, "files": [u[0] for u in usable]})
        features.append([u[1] for u in usable])
        seconds += sum(u[2] for u in usable)
    n_files = sum(len(f) for f in found["files"])
    made = (f"cached in {found['cache']}" if found.get("from_cache") else
            f"made in {found['generation_s']:.1f} s")
    print(f"data: {root}: {len(found['speakers'])} speaker folders, {n_files} audio files "
          f"(features at {args.sample_rate} Hz, {made})")
    if short:
        print(f"data: {short} files with less than {min_frames} frames of speech unused")
    if skipped:
        print(f"data: skipped {len(skipped)} speakers with fewer than {need} usable utterances "
              f"(M={args.m}, --enrol {args.enrol} + 1)" + (": " + ", ".join(skipped[:5]) +
                                                           (", ..." if len(skipped) > 5 else "")))
    names = [s["name"] for s in speakers]
    heldout = set(pick_heldout(names, args.heldout_speakers, args.seed, root))
    for s in speakers:
        s["split"] = "heldout" if s["name"] in heldout else "train"
    n_train, n_held = len(speakers) - len(heldout), len(heldout)
    if n_train < args.n or n_held < 2:
        raise corpus.CorpusError(
            f"too few speakers in {root}: {len(speakers)} with at least {need} usable "
            f"utterances ({len(skipped)} skipped), {n_held} held out: training needs at least "
            f"N={args.n} speakers and the EER at least 2 held-out ones")
    args.speakers, args.heldout = n_train, n_held  # what the run reports
    mean, std = corpus.feature_statistics(
        x for f, s in zip(features, speakers) if s["split"] == "train" for x in f)
    print(f"data: {n_train} training + {n_held} held-out speakers, "
          f"{sum(map(len, features))} utterances ({seconds / 3600:.2f} h of speech)")
    return {"speakers": speakers, "features": features, "mean": mean, "std": std,
            "audio_hours": seconds / 3600, "generation_s": found["generation_s"],
            "corpus": {"root": root, "sample_rate": args.sample_rate,
                       "speaker_folders": len(found["speakers"]), "files": n_files,
                       "files_unused_short": short, "speakers_skipped": len(skipped),
                       "min_utterances": need,
                       "utterances_train": sum(len(f) for f, s in zip(features, speakers)
                                               if s["split"] == "train"),
                       "utterances_heldout": sum(len(f) for f, s in zip(features, speakers)
                                                 if s["split"] == "heldout")}}


class BatchSampler:
    """Batches of N speakers x M utterances, a random partial of `frames` frames from each."""

    def __init__(self, features, n, m, frames, seed):
        self.features, self.n, self.m, self.frames = features, n, m, frames
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self):
        crops = []
        for s in torch.randperm(len(self.features), generator=self.gen)[:self.n].tolist():
            utts = self.features[s]
            for u in torch.randperm(len(utts), generator=self.gen)[:self.m].tolist():
                crops.append(crop(utts[u], self.frames, self.gen))
        return torch.stack(crops).float()  # (N*M, frames, 40)


def crop(x, frames, gen):
    if len(x) < frames:  # short utterance: repeat it
        x = x.repeat(math.ceil(frames / len(x)), 1)
    start = torch.randint(len(x) - frames + 1, (1,), generator=gen).item()
    return x[start:start + frames]


# ---------------------------------------------------------------------- model
class SpeakerEncoder(nn.Module):
    """Log-mel frames -> 3-layer LSTM -> linear projection of the last frame -> L2 norm."""

    def __init__(self, hidden, proj, layers, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)  # feature normalisation (training-set statistics)
        self.register_buffer("std", std)
        self.lstm = nn.LSTM(N_MELS, hidden, layers, batch_first=True)
        self.proj = nn.Linear(hidden, proj)

    def forward(self, frames):  # (batch, time, 40) -> (batch, proj)
        out, _ = self.lstm((frames - self.mean) / self.std)
        return F.normalize(self.proj(out[:, -1]), dim=1)


class OriginalLoopLoss(GE2ELoss):
    """The original code's loss (ge2e_ext.reference, summed) with GE2ELoss's parameters."""

    def forward(self, embeddings):
        return ge2e_loss_reference(embeddings, self.w, self.b, self.loss_method).sum()


LOSSES = {  # name -> (label, factory(loss_method))
    "reference": ("original loop code (`ge2e_loss_reference`)",
                  lambda method: OriginalLoopLoss(10.0, -5.0, method)),
    "torch": ('PyTorch path (`backend="torch"`)',
              lambda method: GE2ELoss(10.0, -5.0, method, backend="torch")),
    "extension": ('ge2e_ext (`backend="extension"`)',
                  lambda method: GE2ELoss(10.0, -5.0, method, backend="extension")),
}


def build(args, data, device, loss_name="extension"):
    torch.manual_seed(args.seed)
    train = [f for f, s in zip(data["features"], data["speakers"]) if s["split"] == "train"]
    model = SpeakerEncoder(args.hidden, args.proj, args.layers, data["mean"], data["std"])
    model = model.to(device)
    criterion = LOSSES[loss_name][1](args.loss_method).to(device)
    # Adam (as Real-Time-Voice-Cloning's encoder; the paper uses SGD). Adam divides by the
    # gradient's scale, so the paper's 0.01 on w and b mostly acts through the clipping.
    optimizer = make_optimizer(model, criterion, args.lr)
    sampler = BatchSampler(train, args.n, args.m, args.frames, args.seed)
    return model, criterion, optimizer, sampler


def make_optimizer(model, criterion, lr):
    return torch.optim.Adam(list(model.parameters()) + list(criterion.parameters()), lr=lr)


def learning_rate(args, step):
    """Halved every --halve-lr-every steps, as the paper does every 30M steps."""
    return args.lr * 0.5 ** (step // args.halve_lr_every)


def train_step(model, criterion, optimizer, batch, args, step):
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(args, step)
    embeddings = model(batch).view(args.n, args.m, -1)
    loss = criterion(embeddings)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    criterion.w.grad *= 0.01  # the paper's gradient scale for w and b
    criterion.b.grad *= 0.01
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 3.0)  # the paper's gradient-norm clip
    optimizer.step()
    return loss.item()


# ----------------------------------------------------------------- evaluation
@torch.no_grad()
def embed_utterances(model, utterances, frames, device):
    """d-vectors as in the paper: mean of the partials' (50% overlap) d-vectors, L2-normalised."""
    windows, owner = [], []
    for i, x in enumerate(utterances):
        x = x.float() if len(x) >= frames else x.float().repeat(math.ceil(frames / len(x)), 1)
        starts = sorted(set(range(0, len(x) - frames + 1, frames // 2)) | {len(x) - frames})
        windows += [x[s:s + frames] for s in starts]
        owner += [i] * len(starts)
    model.eval()
    partial = torch.cat([model(torch.stack(windows[i:i + 512]).to(device)).cpu()
                         for i in range(0, len(windows), 512)])
    model.train()
    sums = torch.zeros(len(utterances), partial.shape[1])
    sums.index_add_(0, torch.tensor(owner), partial)
    return F.normalize(sums, dim=1)


def enrol_and_score(per_speaker, enrol):
    """Each speaker enrolled as the normalised mean of its first `enrol` d-vectors;
    every other d-vector scored (cosine) against every speaker's enrolment.
    Returns (scores (tests, speakers), same_speaker of the same shape, tests per speaker)."""
    centroids = F.normalize(torch.stack([e[:enrol].mean(0) for e in per_speaker]), dim=1)
    tests = [e[enrol:] for e in per_speaker]
    owner = torch.cat([torch.full((len(t),), s) for s, t in enumerate(tests)])
    scores = torch.cat(tests) @ centroids.T
    return scores, owner[:, None] == torch.arange(len(per_speaker))[None, :], tests


def evaluate(model, data, args, device):
    """Held-out EER: test d-vectors scored (cosine) against every speaker's enrolment centroid
    (ge2e_ext.metrics.equal_error_rate). Returns the EER and each speaker's test d-vectors."""
    held = [f for f, s in zip(data["features"], data["speakers"]) if s["split"] == "heldout"]
    emb = embed_utterances(model, [u for utts in held for u in utts], args.frames, device)
    scores, same, tests = enrol_and_score(torch.split(emb, [len(u) for u in held]), args.enrol)
    return equal_error_rate(scores, same), tests


# --------------------------------------------------- drop-in check, step split
def dropin_check(args, data, device, steps):
    """The first `steps` steps with the loop reference and with ge2e_ext, from the same state."""
    out = {}
    for method in LOSS_METHODS:
        run_args = copy.copy(args)
        run_args.loss_method = method
        losses = {}
        for name in ("reference", "extension"):
            model, criterion, optimizer, sampler = build(run_args, data, device, name)
            losses[name] = [train_step(model, criterion, optimizer, sampler.sample().to(device),
                                       run_args, step)
                            for step in tqdm(range(steps), desc=f"drop-in {method} {name}",
                                             leave=False)]
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses["extension"], losses["reference"]))
        out[method] = {"steps": steps, "loss_reference": losses["reference"],
                       "loss_ge2e_ext": losses["extension"], "max_rel_diff": rel}
        print(f"drop-in ({method}): {steps} training steps, loop reference vs ge2e_ext: "
              f"max relative loss difference {rel:.2e}")
    return out


def step_split(args, data, device):
    """Encoder forward+backward vs loss forward+backward of one step, per loss (medians)."""
    model, _, _, sampler = build(args, data, device)
    batch = sampler.sample().to(device)

    def now():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    runs = {}
    for name in LOSSES:
        criterion = LOSSES[name][1](args.loss_method).to(device)
        optimizer = make_optimizer(model, criterion, lr=0.0)  # the same model for every loss
        runs[name] = (criterion, optimizer, {"encoder": [], "loss": [], "other": []})
    for r in range(args.split_repeats + 1):  # round 0 warms up
        names = list(LOSSES)[r % 3:] + list(LOSSES)[:r % 3]  # interleaved, rotating order
        for name in names:
            criterion, optimizer, times = runs[name]
            if name == "reference" and r > args.split_ref_repeats:
                continue
            t0 = now()
            emb = model(batch).view(args.n, args.m, -1)
            t1 = now()
            detached = emb.detach().requires_grad_()  # the loss's own forward and backward
            criterion(detached).backward()
            t2 = now()
            emb.backward(detached.grad)
            t3 = now()
            criterion.w.grad *= 0.01
            criterion.b.grad *= 0.01
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 3.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t4 = now()
            if r > 0:
                times["encoder"].append(t1 - t0 + t3 - t2)
                times["loss"].append(t2 - t1)
                times["other"].append(t4 - t3)
    split = {}
    for name, (_, _, times) in runs.items():
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        step = sum(med.values())
        split[name] = {"encoder_ms": med["encoder"], "loss_ms": med["loss"],
                       "other_ms": med["other"], "step_ms": step, "loss_share": med["loss"] / step,
                       "repeats": len(times["loss"])}
    return split


def split_table(split, args):
    lines = [f"Step-time split, N={args.n} speakers x M={args.m} utterances x {args.frames} "
             f"frames, {args.layers}x{args.hidden} LSTM -> {args.proj}, {args.loss_method}, "
             f"{args.threads} threads (medians; 'other' = clipping + Adam):", "",
             "| loss | encoder fwd+bwd | loss fwd+bwd | other | step | loss share |",
             "|---|---|---|---|---|---|"]
    for name, s in split.items():
        lines.append(f"| {LOSSES[name][0]} | {s['encoder_ms']:.1f} ms | {s['loss_ms']:.2f} ms | "
                     f"{s['other_ms']:.1f} ms | {s['step_ms']:.1f} ms | "
                     f"{100 * s['loss_share']:.1f}% |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def plot(path, state, args, emb_untrained, emb_final):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(11, 8.5))
    steps = np.arange(1, len(state["losses"]) + 1)
    per_utt = np.array(state["losses"]) / (args.n * args.m)
    ax[0, 0].plot(steps, per_utt, color="0.75", lw=0.8, label="step")
    k = min(25, len(per_utt))
    if k > 1:
        ax[0, 0].plot(steps[k - 1:], np.convolve(per_utt, np.ones(k) / k, "valid"),
                      label=f"mean of {k}")
    ax[0, 0].set(title=f"training loss ({args.loss_method}, N={args.n} x M={args.m})",
                 xlabel="step", ylabel="GE2E loss per utterance")
    ax[0, 0].legend()
    ev = state["evals"]
    ax[0, 1].plot([e["step"] for e in ev], [100 * e["eer"] for e in ev], "o-")
    voices = "unseen voices" if args.data is None else "held-out speakers"
    ax[0, 1].set(title=f"held-out EER ({len(emb_final)} {voices})", xlabel="step",
                 ylabel="EER (%)", ylim=(0, None))
    shown = min(10, len(emb_final))  # ten colours stay distinguishable
    for a, emb, title in ((ax[1, 0], emb_untrained, "untrained encoder"),
                          (ax[1, 1], emb_final, f"after {ev[-1]['step']} steps")):
        x = torch.cat(list(emb[:shown]))  # each speaker's test d-vectors, one after the other
        x = x - x.mean(0)
        xy = (x @ torch.linalg.svd(x, full_matrices=False).Vh[:2].T).numpy()
        ends = np.cumsum([0] + [len(e) for e in emb[:shown]])
        for s in range(shown):
            pts = xy[ends[s]:ends[s + 1]]
            a.scatter(pts[:, 0], pts[:, 1], s=18, color=plt.cm.tab10(s))
        a.set(title=f"PCA of held-out test d-vectors, {title}\n({shown} of {len(emb)} unseen "
                    f"speakers, one colour each)", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


# ----------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type not in extension_devices():
        sys.exit(f"ge2e_ext has no compiled kernel for {device.type} "
                 f"(built: {sorted(extension_devices())})")
    os.makedirs(args.output, exist_ok=True)
    ckpt_path = os.path.join(args.output, "checkpoint.pt")
    saved = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            sys.exit(f"error: --resume: no checkpoint {ckpt_path}")
        saved = torch.load(ckpt_path, weights_only=False)
        for k in DATA_KEYS + MODEL_KEYS:  # the run's own configuration wins
            setattr(args, k, saved["args"].get(k, DEFAULT_SAVED.get(k)))
    shown = [k for k in DATA_KEYS if k not in (  # the keys of this kind of data
        ("data", "heldout_speakers") if args.data is None else ("speakers", "heldout"))]
    print(f"torch {torch.__version__}, {args.threads} threads, device {device}; "
          f"{'smoke test' if args.smoke else 'configuration'}: " +
          ", ".join(f"{k}={getattr(args, k)}" for k in shown + list(MODEL_KEYS) + ["steps"]))

    try:
        data = load_or_make_data(args)
    except corpus.CorpusError as err:
        sys.exit(f"error: {err}")
    t_data = time.perf_counter() - t_start
    model, criterion, optimizer, sampler = build(args, data, device)
    if saved is None:
        dropin = dropin_check(args, data, device, args.dropin_steps) if args.dropin_steps else {}
        eer0, emb0 = evaluate(model, data, args, device)
        print(f"held-out EER of the untrained encoder: {100 * eer0:.2f}%")
        state = {"losses": [], "evals": [{"step": 0, "eer": eer0}], "dropin": dropin,
                 "emb_untrained": emb0, "train_s": 0.0}
    else:
        model.load_state_dict(saved["model"])
        criterion.load_state_dict(saved["criterion"])
        optimizer.load_state_dict(saved["optimizer"])
        sampler.gen.set_state(saved["sampler_rng"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        print(f"resumed at step {len(state['losses'])} from {ckpt_path}")

    def save_checkpoint():
        ckpt = {"model": model.state_dict(), "criterion": criterion.state_dict(),
                "optimizer": optimizer.state_dict(), "sampler_rng": sampler.gen.get_state(),
                "torch_rng": torch.get_rng_state(), "state": state, "args": vars(args),
                # which speaker folders trained and which were held out (examples/verify.py)
                "speakers": [{"name": sp.get("name"), "split": sp["split"]}
                             for sp in data["speakers"]]}
        torch.save(ckpt, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)

    step = len(state["losses"])
    t_train = time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc="training", unit="step")
    emb = None
    while step < args.steps:
        batch = sampler.sample().to(device)
        state["losses"].append(train_step(model, criterion, optimizer, batch, args, step))
        step += 1
        bar.set_postfix(loss=f"{state['losses'][-1] / (args.n * args.m):.3f}/utt",
                        w=f"{criterion.w.item():.1f}",
                        eer=f"{100 * state['evals'][-1]['eer']:.1f}%")
        bar.update()
        if step % args.eval_every == 0 or step == args.steps:
            eer, emb = evaluate(model, data, args, device)
            state["evals"].append({"step": step, "eer": eer, "w": criterion.w.item(),
                                   "b": criterion.b.item()})
            state["train_s"] += time.perf_counter() - t_train
            t_train = time.perf_counter()
            save_checkpoint()
    bar.close()
    state["train_s"] += time.perf_counter() - t_train
    if emb is None or state["evals"][-1]["step"] != step:
        eer, emb = evaluate(model, data, args, device)
    eer0, eer1 = state["evals"][0]["eer"], state["evals"][-1]["eer"]
    print(f"held-out EER: {100 * eer0:.2f}% untrained -> {100 * eer1:.2f}% after {step} steps "
          f"({state['train_s']:.0f} s of training)")

    split = step_split(args, data, device) if args.split_repeats else {}
    plot_path = os.path.join(args.output, "training.png")
    plot(plot_path, state, args, state["emb_untrained"], emb)
    n_train = sum(s["split"] == "train" for s in data["speakers"])
    metrics = {
        "eer_untrained": eer0, "eer_final": eer1, "steps": step, "speakers_train": n_train,
        "speakers_heldout": len(data["speakers"]) - n_train,
        "utterances_per_speaker": args.utterances, "data": args.data or "synthetic (eSpeak NG)",
        "corpus": data.get("corpus"), "audio_hours": data["audio_hours"],
        "data_generation_s": data["generation_s"], "data_s": t_data,
        "training_s": state["train_s"], "total_s": time.perf_counter() - t_start,
        "step_split": split, "dropin": state["dropin"], "evals": state["evals"],
        "loss_per_step": state["losses"], "final_w": criterion.w.item(),
        "final_b": criterion.b.item(),
        "config": {k: getattr(args, k) for k in DATA_KEYS + MODEL_KEYS + ("threads", "smoke")},
        "device": str(device), "torch": torch.__version__,
    }
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    if split:
        print("\n" + split_table(split, args) + "\n")
    for method, d in state["dropin"].items():
        print(f"drop-in ({method}): max relative difference of the first {d['steps']} losses, "
              f"loop reference vs ge2e_ext: {d['max_rel_diff']:.2e}")
    print(f"wrote {plot_path} and metrics.json; total {metrics['total_s']:.0f} s")
    return metrics


if __name__ == "__main__":
    main()
