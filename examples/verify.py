#!/usr/bin/env python
"""Enrol and verify with a speaker encoder trained by train_speaker_encoder.py.

    python examples/verify.py --checkpoint vox_results/checkpoint.pt --data VoxCeleb1/wav \\
        --trials VoxCeleb1/veri_test2.txt
    python examples/verify.py --checkpoint vox_results/checkpoint.pt --data my_corpus --heldout-only

Loads the checkpoint (the encoder, its feature normalisation, sample rate and
partial-utterance length), embeds the audio files of a folder (the layouts of
--data: a folder per speaker, files at any depth below it) and scores either

- a trial list (``--trials``): ``LABEL PATH_A PATH_B`` lines, VoxCeleb's format
  (LABEL 1: same speaker, 0: not; paths relative to --data), each trial the
  cosine of the two utterances' d-vectors; or
- without one, every speaker of the folder enrolled as the normalised mean of
  the d-vectors of its first --enrol utterances (in path order), and every
  other utterance scored against every enrolled speaker.

A d-vector is the normalised mean of the encoder's outputs on windows of the
utterance (50% overlap), as in training's evaluation. Prints the equal error
rate (ge2e_ext.metrics.equal_error_rate) and writes it, with the trial counts,
to --output (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402
import train_speaker_encoder as trainer  # noqa: E402

from ge2e_ext.metrics import equal_error_rate  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="train_speaker_encoder.py's checkpoint.pt")
    p.add_argument("--data", required=True, metavar="DIR", help="the folder to embed")
    p.add_argument("--trials", metavar="FILE",
                   help="trial list, 'LABEL PATH_A PATH_B' per line [all speakers x utterances]")
    p.add_argument("--heldout-only", action="store_true",
                   help="only the speakers the checkpoint's run held out of training (a run "
                        "with --data on this folder)")
    p.add_argument("--enrol", type=int, help="enrolment utterances per speaker [the run's --enrol]")
    p.add_argument("--output", help="JSON file for the result [beside the checkpoint: "
                                    "verification.json]")
    p.add_argument("--cache", help="feature cache folder [none]")
    p.add_argument("--device", default="cpu", help="cpu or cuda [cpu]")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes reading audio [%(default)s]")
    return p.parse_args(argv)


def load_encoder(path, device):
    """The trained SpeakerEncoder and its run's arguments."""
    if not os.path.exists(path):
        raise corpus.CorpusError(f"--checkpoint {path}: no such file")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    run = ckpt["args"]
    state = ckpt["model"]
    model = trainer.SpeakerEncoder(run["hidden"], run["proj"], run["layers"], state["mean"],
                                   state["std"])
    model.load_state_dict(state)
    return model.to(device).eval(), run, ckpt


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        result = verify(args, device)
    except corpus.CorpusError as err:
        sys.exit(f"error: {err}")
    print(f"EER {100 * result['eer']:.2f}% ({result['targets']} target and "
          f"{result['impostors']} impostor trials, {result['speakers']} speakers, "
          f"{result['mode']}) -> {result['output']}")
    return result


def verify(args, device):
    model, run, ckpt = load_encoder(args.checkpoint, device)
    sample_rate, frames = run.get("sample_rate", trainer.SAMPLE_RATE), run["frames"]
    enrol = args.enrol or run["enrol"]
    found = corpus.load_features(args.data, sample_rate, args.cache, args.workers, trainer.tqdm)
    speakers = list(zip(found["speakers"], found["files"], found["features"]))
    if args.heldout_only:
        held = {s["name"] for s in ckpt.get("speakers", []) if s["split"] == "heldout"}
        if not held or None in held:
            raise corpus.CorpusError(f"--heldout-only: {args.checkpoint} was not trained with "
                                     f"--data (it names no held-out speaker folders)")
        speakers = [s for s in speakers if s[0] in held]
        if len(speakers) < len(held):
            missing = sorted(held - {s[0] for s in speakers})
            raise corpus.CorpusError(f"--heldout-only: {args.data} lacks the held-out speakers "
                                     f"{', '.join(missing)}")
    if args.trials:
        scores, same, info = score_trials(model, speakers, args, frames, device)
    else:
        scores, same, info = score_all_pairs(model, speakers, enrol, frames, device, args.data)
    result = {"eer": equal_error_rate(scores, same), "targets": int(same.sum()),
              "impostors": int((~same).sum()), **info, "checkpoint": os.path.abspath(
                  args.checkpoint), "data": os.path.abspath(args.data),
              "trained_steps": len(ckpt["state"]["losses"]), "sample_rate": sample_rate}
    result["output"] = args.output or os.path.join(os.path.dirname(
        os.path.abspath(args.checkpoint)), "verification.json")
    with open(result["output"], "w") as f:
        json.dump(result, f, indent=1)
    return result


def score_all_pairs(model, speakers, enrol, frames, device, root):
    """Every speaker enrolled from its first `enrol` usable utterances, every other
    utterance scored against every speaker."""
    min_frames = max(frames // 2, 1)
    kept, skipped = [], 0
    for name, files, feats in speakers:
        usable = [x for x in feats if len(x) >= min_frames]
        if len(usable) > enrol:
            kept.append(usable)
        else:
            skipped += 1
    if skipped:
        print(f"verify: skipped {skipped} speakers with at most {enrol} usable utterances")
    if len(kept) < 2:
        raise corpus.CorpusError(f"{root}: {len(kept)} speakers with more than --enrol {enrol} "
                                 f"usable utterances; scoring needs at least 2")
    emb = trainer.embed_utterances(model, [u for utts in kept for u in utts], frames, device)
    scores, same, _ = trainer.enrol_and_score(torch.split(emb, [len(u) for u in kept]), enrol)
    return scores, same, {"mode": f"all pairs, {enrol} enrolment utterances per speaker",
                          "speakers": len(kept), "speakers_skipped": skipped}


def score_trials(model, speakers, args, frames, device):
    """VoxCeleb-style trials: the cosine of the two utterances' d-vectors."""
    trials = corpus.parse_trials(args.trials)
    by_path = {os.path.normpath(f): x for _, files, feats in speakers
               for f, x in zip(files, feats)}
    needed = sorted({os.path.normpath(p) for _, a, b in trials for p in (a, b)})
    missing = [p for p in needed if p not in by_path]
    if missing:
        raise corpus.CorpusError(
            f"{args.trials}: {len(missing)} trial files not found in {args.data} (of its "
            f"speakers' audio files{', held-out only' if args.heldout_only else ''}), e.g. "
            f"{missing[0]}")
    empty = [p for p in needed if len(by_path[p]) == 0]
    if empty:
        raise corpus.CorpusError(f"{os.path.join(args.data, empty[0])}: no speech in it "
                                 f"(silent or empty), used by {args.trials}")
    emb = trainer.embed_utterances(model, [by_path[p] for p in needed], frames, device)
    index = {p: i for i, p in enumerate(needed)}
    a = emb[[index[os.path.normpath(x)] for _, x, _ in trials]]
    b = emb[[index[os.path.normpath(y)] for _, _, y in trials]]
    same = torch.tensor([t[0] for t in trials])
    speakers_named = {p.split(os.sep)[0] for p in needed}
    return (a * b).sum(1), same, {"mode": f"trial list {os.path.abspath(args.trials)}",
                                  "speakers": len(speakers_named), "trials": len(trials)}


if __name__ == "__main__":
    main()
