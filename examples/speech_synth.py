"""A small speech corpus made offline with eSpeak NG: speakers, sentences, audio.

eSpeak NG comes from PyPI's ``espeakng-loader`` (the shared library and its
voice data, no system package needed); this module talks to it through ctypes
(``speak_lib.h``: ``espeak_Initialize`` in synchronous retrieval mode, a synth
callback that collects the 16-bit samples, ``espeak_SetVoiceByName`` with
``language+variant``, ``espeak_SetParameter`` for rate, pitch and pitch range,
``espeak_Synth``).

A *speaker* is one English accent (or a foreign voice reading English) combined
with one voice variant (``+m3``, ``+f2``, ``+croak``, ``+whisper``, ...) and its
own base pitch, pitch range and speaking rate; every utterance is a different
sentence, spoken with a little random variation of rate and pitch. Everything is
deterministic given the seed. This module imports no torch (the synthesis
workers are plain processes).
"""

from __future__ import annotations

import ctypes
import os
import random

import numpy as np

# speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
espeakCHARS_UTF8 = 1
espeakRATE, espeakPITCH, espeakRANGE = 1, 3, 4
_ERRORS = {-1: "EE_INTERNAL_ERROR", 1: "EE_BUFFER_FULL", 2: "EE_NOT_FOUND"}

# Accents: eSpeak's English voices, plus a few other languages' voices reading
# the same English sentences (a foreign accent).
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc", "de", "nl", "sv", "es", "it", "pt", "pl")


def _espeakng_paths():
    import espeakng_loader  # PyPI: espeakng-loader (libespeak-ng.so and espeak-ng-data)
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def espeak_version():
    from importlib.metadata import version
    return version("espeakng-loader")


def voice_variants():
    """The voice variants shipped with the data (``espeak-ng-data/voices/!v``), sorted."""
    _, data = _espeakng_paths()
    names = os.listdir(os.path.join(data, "voices", "!v"))
    return sorted(n for n in names if n.replace("_", "").isalnum())


class ESpeak:
    """eSpeak NG through ctypes. The library has global state: one per process."""

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                 ctypes.c_void_p)

    def __init__(self):
        lib_path, data_path = _espeakng_paths()
        lib = ctypes.CDLL(lib_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}), data: {data_path}")
        self._chunks = []

        def collect(samples, n, _events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(samples, shape=(n,)).copy())
            return 0  # 0: continue synthesis

        self._callback = self._CALLBACK(collect)  # keep a reference: the library calls it
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib
        self._libc = ctypes.CDLL(None)  # eSpeak NG also draws noise from libc's rand()

    def _check(self, what, err):
        if err != 0:
            raise RuntimeError(f"eSpeak NG {what}: {_ERRORS.get(err, err)}")

    def synth(self, text, voice, rate=175, pitch=50, pitch_range=50, seed=0):
        """int16 samples of ``text`` spoken by ``voice`` ('language+variant')."""
        lib = self._lib
        lib.espeak_ng_SetRandSeed(seed)
        self._libc.srand(seed)
        self._check(f"voice {voice!r}", lib.espeak_SetVoiceByName(voice.encode()))
        for param, value in ((espeakRATE, rate), (espeakPITCH, pitch), (espeakRANGE, pitch_range)):
            self._check("parameter", lib.espeak_SetParameter(param, int(value), 0))
        self._chunks = []
        data = text.encode("utf-8")
        self._check("synth", lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0,
                                               espeakCHARS_UTF8, None, None))
        if not self._chunks:
            return np.zeros(0, np.int16)
        return np.concatenate(self._chunks).astype(np.int16, copy=False)


_ENGINE = None


def _engine():
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = ESpeak()
    return _ENGINE


def synth_block(jobs):
    """Worker function: [(index, samples)] of jobs (index, text, voice, rate, pitch, range).

    eSpeak NG carries state from one utterance to the next (its pitch flutter, for
    one), so the samples depend on what the process spoke before: run each block in
    a fresh process (multiprocessing's ``maxtasksperchild=1``), and its random noise
    is seeded per utterance, to make the corpus independent of scheduling.
    """
    engine = _engine()
    return [(index, engine.synth(text, voice, rate, pitch, pitch_range, seed=index))
            for index, text, voice, rate, pitch, pitch_range in jobs]


# --------------------------------------------------------------------- speakers
def make_speakers(n_train, n_heldout, seed, heldout_variant_fraction=0.25):
    """Speaker descriptions; held-out speakers use voice variants no training speaker uses.

    Every speaker has its own (accent, variant) pair, base pitch, pitch range and rate.
    """
    rng = random.Random(seed)
    variants = voice_variants()
    rng.shuffle(variants)
    n_held_var = max(1, round(len(variants) * heldout_variant_fraction))
    pools = {"heldout": variants[:n_held_var], "train": variants[n_held_var:]}
    speakers = []
    for split, count in (("train", n_train), ("heldout", n_heldout)):
        pairs = [(a, v) for v in pools[split] for a in ACCENTS]
        if count > len(pairs):
            raise ValueError(f"at most {len(pairs)} {split} speakers (accent x variant pairs)")
        for accent, variant in rng.sample(pairs, count):
            speakers.append({
                "split": split, "voice": f"{accent}+{variant}",
                "pitch": rng.randint(20, 80), "range": rng.randint(25, 90),
                "rate": rng.randint(130, 210),
            })
    return speakers


# -------------------------------------------------------------------- sentences
_NAMES = ("Anna", "Peter", "Maria", "Thomas", "Laura", "Daniel", "Sophie", "Martin", "Helen",
          "Oscar", "Julia", "Victor", "Emma", "George", "Nina", "Samuel", "Clara", "Robert")
_ADJ = ("quiet", "yellow", "heavy", "bright", "ancient", "narrow", "gentle", "frozen", "wooden",
        "crowded", "silver", "empty", "careful", "broken", "golden", "little", "enormous",
        "purple", "noisy", "patient", "famous", "hidden", "sudden", "lonely", "clever", "dusty")
_NOUNS = ("farmer", "basket", "bridge", "teacher", "window", "letter", "garden", "engine",
          "river", "doctor", "blanket", "village", "kettle", "mountain", "sailor", "pencil",
          "painting", "market", "lantern", "orchestra", "bicycle", "island", "tower", "camera",
          "journey", "castle", "bottle", "forest", "student", "machine")
_VERBS = ("carried", "painted", "noticed", "repaired", "followed", "described", "collected",
          "opened", "borrowed", "visited", "measured", "delivered", "remembered", "watched",
          "cleaned", "discovered", "answered", "ordered", "lifted", "admired")
_VERBS_BASE = ("carry", "paint", "notice", "repair", "follow", "describe", "collect", "open",
               "borrow", "visit", "measure", "deliver", "remember", "watch", "clean")
_PREPS = ("across", "behind", "near", "under", "beside", "towards", "through", "above")
_PLACES = ("old station", "city hall", "harbour", "library", "kitchen", "museum", "playground",
           "railway", "bakery", "hospital", "valley", "school yard")
_TIMES = ("yesterday morning", "last winter", "every Sunday", "after dinner", "before sunrise",
          "on Friday evening", "during the storm", "in the spring", "at midnight", "twice a week")
_NUMBERS = ("two", "three", "four", "seven", "nine", "eleven", "twelve", "twenty", "forty",
            "a hundred")


def make_sentence(rng):
    """One English sentence from word lists (6 to 16 words)."""
    c = rng.choice
    templates = (
        lambda: f"The {c(_ADJ)} {c(_NOUNS)} {c(_VERBS)} the {c(_ADJ)} {c(_NOUNS)} "
                f"{c(_PREPS)} the {c(_PLACES)}.",
        lambda: f"{c(_NAMES)} {c(_VERBS)} a {c(_ADJ)} {c(_NOUNS)} {c(_TIMES)}.",
        lambda: f"Did the {c(_NOUNS)} {c(_VERBS_BASE)} the {c(_ADJ)} {c(_NOUNS)} {c(_TIMES)}?",
        lambda: f"{c(_TIMES).capitalize()}, {c(_NAMES)} and {c(_NAMES)} {c(_VERBS)} "
                f"{c(_NUMBERS)} {c(_ADJ)} {c(_NOUNS)}s {c(_PREPS)} the {c(_PLACES)}.",
        lambda: f"Please {c(_VERBS_BASE)} the {c(_NOUNS)} near the {c(_PLACES)}, "
                f"said the {c(_ADJ)} {c(_NOUNS)}.",
        lambda: f"I think the {c(_NOUNS)} from the {c(_PLACES)} was {c(_ADJ)} and "
                f"{c(_ADJ)} {c(_TIMES)}.",
    )
    return c(templates)()


def make_jobs(speakers, utterances, seed):
    """Synthesis jobs (index, text, voice, rate, pitch, range), utterance-major per speaker."""
    jobs = []
    for s, spk in enumerate(speakers):
        for u in range(utterances):
            rng = random.Random(f"{seed}/{s}/{u}")  # stable across Python versions
            text = make_sentence(rng)
            rate = round(spk["rate"] * rng.uniform(0.9, 1.1))  # a little variation per utterance
            pitch = min(99, max(0, spk["pitch"] + rng.randint(-4, 4)))
            jobs.append((len(jobs), text, spk["voice"], rate, pitch, spk["range"]))
    return jobs
