"""Speech on disk for the examples: folder layouts, reading, resampling, log-mel features.

A corpus is a folder with one folder per speaker; a speaker's audio files may lie
at any depth below it, so these all work:

    voxceleb/id10001/1zcIwhmdeo4/00001.wav    (speaker/video/utterance)
    librispeech/103/1240/103-1240-0000.flac   (speaker/chapter/utterance)
    own/alice/take1.wav                       (flat: speaker/utterance)

Audio is read with soundfile (PyPI; its wheel bundles libsndfile: WAV, FLAC,
OGG/Vorbis, Opus, MP3, AIFF, ...), mixed to mono, resampled to the model's rate
with torchaudio's band-limited (Kaiser-windowed sinc) resampler, trimmed of
leading and trailing silence, and turned into 40 log-mel channels (25 ms
windows, 10 ms step). The features of a folder are cached in one file, keyed
by every file's path, size and modification time, and the feature settings.

torchaudio: its releases since 2.9 are built against PyTorch's stable ABI, and
the last one on the package index, 2.11.1, declares ``torch>=2.11`` and runs
beside torch 2.14.1 (its ``functional`` module is plain torch code; its
file reading moved to torchcodec, hence soundfile for that). It provides the
mel filterbank and the resampler here, nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import time

import numpy as np
import torch

N_MELS = 40
# Formats libsndfile reads (soundfile.available_formats()); AAC (VoxCeleb2's .m4a) is not one.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au",
                  ".caf", ".w64", ".rf64")
UNREADABLE_SUFFIXES = (".m4a", ".aac", ".mp4", ".wma")
FEATURE_VERSION = 1  # bump when the features change: the caches are then made again


class CorpusError(ValueError):
    """A corpus folder or file that cannot be used; the message names the path."""


# -------------------------------------------------------------------- features
def frame_sizes(sample_rate):
    """(window, hop, FFT size) in samples: 25 ms, 10 ms, the next power of two >= window."""
    win, hop = int(0.025 * sample_rate), int(0.010 * sample_rate)
    return win, hop, 1 << (win - 1).bit_length()


@functools.lru_cache(maxsize=None)
def mel_filterbank(sample_rate, n_fft, n_mels=N_MELS):
    """(n_mels, n_fft//2+1) triangular filters on the Slaney mel scale, area-normalised:
    librosa.filters.mel's defaults (htk=False, norm="slaney"), from torchaudio."""
    import torchaudio.functional as AF
    return AF.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate,
                              norm="slaney", mel_scale="slaney").T.contiguous()


def log_mel(audio, sample_rate):
    """(frames, 40) log-mel energies of a float waveform at ``sample_rate``."""
    win, hop, n_fft = frame_sizes(sample_rate)
    spec = torch.stft(audio, n_fft, hop, win, window=torch.hann_window(win), center=True,
                      return_complex=True).abs().pow(2)
    return torch.log(mel_filterbank(sample_rate, n_fft) @ spec + 1e-6).T


def trim_silence(x, sample_rate, level=0.02, margin_s=0.05):
    """x without its leading and trailing samples below ``level`` of the peak
    (keeping a 50 ms margin); an all-zero signal becomes empty."""
    x = np.asarray(x)
    loud = np.flatnonzero(np.abs(x) > level * np.abs(x).max()) if len(x) else []
    if len(loud) == 0:
        return x[:0]
    margin = int(margin_s * sample_rate)
    return x[max(loud[0] - margin, 0):loud[-1] + margin]


def resample(audio, orig_rate, new_rate):
    """Band-limited resampling of a float tensor (torchaudio, Kaiser-windowed sinc
    with the settings of librosa's 'kaiser_best': 64 zero crossings per side,
    rolloff 0.9475937, beta 14.769656459379492)."""
    if orig_rate == new_rate or audio.numel() == 0:
        return audio
    import torchaudio.functional as AF
    return AF.resample(audio, orig_rate, new_rate, lowpass_filter_width=64,
                       rolloff=0.9475937167399596, resampling_method="sinc_interp_kaiser",
                       beta=14.769656459379492)


def read_audio(path, sample_rate):
    """A file's samples as a mono float32 tensor at ``sample_rate``; CorpusError
    naming the file if it cannot be read."""
    import soundfile
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile.LibsndfileError, or a format it does not know
        raise CorpusError(f"cannot read audio file {path}: {err}") from None
    return resample(torch.from_numpy(samples.mean(1)), rate, sample_rate)


def file_features(path, sample_rate):
    """log-mel features (float16) of an audio file, and its duration in seconds."""
    audio = trim_silence(read_audio(path, sample_rate).numpy(), sample_rate)
    if len(audio) == 0:
        return torch.zeros(0, N_MELS, dtype=torch.float16), 0.0
    return log_mel(torch.from_numpy(audio), sample_rate).half(), len(audio) / sample_rate


def _worker_features(job):
    path, sample_rate = job
    torch.set_num_threads(1)  # one process per core
    try:
        return file_features(path, sample_rate)
    except CorpusError as err:
        return str(err)


# ---------------------------------------------------------------------- folders
def find_speakers(root):
    """{speaker folder name: [audio file paths relative to root, sorted]} of a corpus
    folder; raises CorpusError (naming the path) when it holds none."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise CorpusError(f"--data {root}: no such folder")
    speakers, loose, unreadable = {}, [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_file():
            if entry.name.lower().endswith(AUDIO_SUFFIXES):
                loose.append(entry.name)
            continue
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        files = []
        for folder, dirs, names in os.walk(entry.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in names:
                lower = name.lower()
                if lower.endswith(AUDIO_SUFFIXES):
                    files.append(os.path.relpath(os.path.join(folder, name), root))
                elif lower.endswith(UNREADABLE_SUFFIXES):
                    unreadable.append(os.path.join(folder, name))
        if files:
            speakers[entry.name] = sorted(files)
    if unreadable:
        raise CorpusError(
            f"{len(unreadable)} files in {root} are in a format soundfile cannot read "
            f"(AAC/MP4, e.g. VoxCeleb2's .m4a), e.g. {unreadable[0]}: convert them to WAV or "
            f"FLAC first (ffmpeg -i in.m4a -ar 16000 -ac 1 out.wav)")
    if not speakers:
        where = (f" ({len(loose)} audio files lie directly in it: put each speaker's files "
                 f"in a folder of its own)") if loose else ""
        raise CorpusError(
            f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in speaker folders below {root}"
            f"{where}; expected ROOT/SPEAKER/.../FILE, e.g. id10001/1zcIwhmdeo4/00001.wav")
    if loose:
        print(f"data: {len(loose)} audio files directly in {root} belong to no speaker folder: "
              f"ignored")
    return speakers


def load_features(root, sample_rate, cache_dir=None, workers=1, progress=None):
    """Every audio file's features: {"speakers": names, "files": [[relpath]],
    "features": [[(frames, 40) float16]], "seconds": [[float]], "generation_s"},
    made once into ``cache_dir`` (None: not cached). ``progress``: a tqdm-like
    class, or None."""
    root = os.path.abspath(root)
    speakers = find_speakers(root)
    listing = [(rel, os.stat(os.path.join(root, rel))) for files in speakers.values()
               for rel in files]
    win, hop, n_fft = frame_sizes(sample_rate)
    key = json.dumps({"root": root, "files": [(rel, st.st_size, st.st_mtime_ns)
                                              for rel, st in listing],
                      "features": [sample_rate, win, hop, n_fft, N_MELS, FEATURE_VERSION]})
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, "corpus-" + hashlib.sha1(key.encode()).hexdigest()[:12],
                            "features.pt")
        if os.path.exists(path):
            return torch.load(path) | {"from_cache": True}
    t0 = time.perf_counter()
    jobs = [(os.path.join(root, rel), sample_rate) for rel, _ in listing]
    bar = progress(total=len(jobs), desc="reading audio", unit="file",
                   mininterval=0.5) if progress else None
    results = []
    threads = torch.get_num_threads()
    try:
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for result in pool.imap(_worker_features, jobs, chunksize=8):
                    if isinstance(result, str):
                        raise CorpusError(result)
                    results.append(result)
                    if bar:
                        bar.update()
        else:
            torch.set_num_threads(1)
            for job in jobs:
                results.append(file_features(*job))
                if bar:
                    bar.update()
    finally:
        torch.set_num_threads(threads)
        if bar:
            bar.close()
    data = {"root": root, "speakers": list(speakers), "files": [], "features": [],
            "seconds": [], "sample_rate": sample_rate,
            "cache": os.path.dirname(path) if path else None}
    i = 0
    for files in speakers.values():
        data["files"].append(files)
        data["features"].append([r[0] for r in results[i:i + len(files)]])
        data["seconds"].append([r[1] for r in results[i:i + len(files)]])
        i += len(files)
    data["generation_s"] = time.perf_counter() - t0
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(data, path + ".tmp")
        os.replace(path + ".tmp", path)
    return data


def feature_statistics(utterances):
    """Mean and standard deviation of every channel over all frames of ``utterances``."""
    total = torch.zeros(N_MELS, dtype=torch.float64)
    sq, count = torch.zeros_like(total), 0
    for f in utterances:
        f = f.double()
        total += f.sum(0)
        sq += (f * f).sum(0)
        count += f.shape[0]
    mean = total / count
    std = ((sq - count * mean * mean) / max(count - 1, 1)).clamp(min=0).sqrt()
    return mean.float(), std.clamp(min=1e-3).float()


def parse_trials(path):
    """[(same_speaker, path_a, path_b)] of a VoxCeleb-style trial list ('1 a.wav b.wav')."""
    trials = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3 or fields[0] not in ("0", "1"):
                raise CorpusError(f"{path}:{number}: expected 'LABEL PATH_A PATH_B' with LABEL "
                                  f"0 or 1, got {line.strip()!r}")
            trials.append((fields[0] == "1", fields[1], fields[2]))
    if not trials:
        raise CorpusError(f"{path}: no trials")
    return trials


__all__ = ["CorpusError", "N_MELS", "frame_sizes", "mel_filterbank", "log_mel", "trim_silence",
           "resample", "read_audio", "file_features", "find_speakers", "load_features",
           "feature_statistics", "parse_trials"]
