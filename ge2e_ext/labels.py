"""The labels form: ``(B, D)`` embeddings and ``(B,)`` speaker labels, any order,
any number (>= 2) of utterances per speaker.

The rows are grouped by label (a stable sort) into segments, speaker j's rows
being ``[offsets[j], offsets[j + 1])`` of the sorted rows; the kernels work on
those segments directly (the dense ``(N, M, D)`` form is their equal-M case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Grouping:
    """Rows grouped by speaker.

    order: (B,) the rows in speaker order (a stable sort of the labels).
    offsets: (N + 1,) int64, where each speaker's rows start in that order.
    speaker_of_row: (B,) the speaker (0..N-1) of each sorted row.
    speaker_labels: (N,) each speaker's label.
    valid: a 0-dim bool tensor when the grouping could not be checked without a
        host synchronisation (num_speakers given on an accelerator): False if
        num_speakers was wrong or a speaker has fewer than 2 utterances. None
        when it was checked (errors raised).
    """

    order: torch.Tensor
    offsets: torch.Tensor
    speaker_of_row: torch.Tensor
    speaker_labels: torch.Tensor
    valid: Optional[torch.Tensor] = None

    @property
    def speakers(self) -> int:
        return self.offsets.shape[0] - 1

    def restore(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row values in speaker order back to the input's row order."""
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.order.shape[0], device=self.order.device)
        return rows.index_select(0, inverse)


def check_labels(labels: object, embeddings: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape (B,), got {type(labels).__name__}")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(
            f"labels must be a 1-D integer tensor (one speaker label per row), got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must have one entry per row of the embeddings: got {labels.shape[0]} labels "
            f"for {embeddings.shape[0]} rows")
    if labels.device != embeddings.device:
        raise RuntimeError(f"labels are on {labels.device} but the embeddings are on "
                           f"{embeddings.device}")


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


def group_by_label(labels: torch.Tensor, num_speakers: Optional[int] = None) -> Grouping:
    """Groups the rows by label.

    The number of speakers is read from the labels (on an accelerator, one wait
    for the device: it sets the shapes), and a speaker with fewer than 2
    utterances is an error that names its label. Given num_speakers, the
    grouping has static shapes (a stable sort, the speaker boundaries, their
    cumulative sum, and a search of the speakers 0..num_speakers in it) and
    reads nothing from the device: on an accelerator and under torch.compile a
    wrong count or a single-utterance speaker makes ``valid`` False (the loss
    is then NaN). On the CPU outside torch.compile, where reading back is
    free, those are errors either way.
    """
    if num_speakers is not None and (isinstance(num_speakers, bool)
                                     or not isinstance(num_speakers, int) or num_speakers < 1):
        raise ValueError(f"num_speakers must be a positive int, got {num_speakers!r}")
    compiling = _compiling()
    if compiling and num_speakers is None:
        raise ValueError(
            "ge2e_loss(labels=...) under torch.compile needs num_speakers= (the number of "
            "distinct labels): without it the number of speakers, which sets the shapes, has "
            "to be read from the labels' values, which a compiled graph cannot do. Pass "
            "num_speakers=, or call the loss outside the compiled region.")
    sorted_labels, order = torch.sort(labels, stable=True)
    b = labels.shape[0]
    starts = torch.ones(b, dtype=torch.bool, device=labels.device)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    speaker_of_row = starts.cumsum(0) - 1
    # On the CPU reading the labels back costs nothing: check them, and raise.
    if num_speakers is None or (labels.device.type == "cpu" and not compiling):
        speaker_labels, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
        if num_speakers is not None and num_speakers != counts.shape[0]:
            raise ValueError(f"num_speakers={num_speakers}, but the labels name "
                             f"{counts.shape[0]} speakers")
        host_counts = counts.tolist()
        short = [i for i, c in enumerate(host_counts) if c < 2]
        if short:
            label = speaker_labels[short[0]].item()
            raise ValueError(
                f"GE2E needs at least 2 utterances per speaker (the exclusive centroid of one "
                f"utterance is empty), but speaker label {label} has {host_counts[short[0]]}"
                + (f" ({len(short)} such speakers in all)" if len(short) > 1 else ""))
        offsets = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=labels.device)
        offsets[1:] = counts.cumsum(0)
        return Grouping(order, offsets, speaker_of_row, speaker_labels, None)
    if b == 0:
        raise ValueError(f"num_speakers={num_speakers}, but there are no rows (labels of "
                         "shape (0,))")
    # Static shapes from here: nothing is read from the device.
    index = speaker_of_row.clamp(max=num_speakers - 1)
    speakers = torch.arange(num_speakers + 1, dtype=index.dtype, device=labels.device)
    offsets = torch.searchsorted(index, speakers)  # speaker j's first row; B past the last
    counts = offsets[1:] - offsets[:-1]
    speaker_labels = sorted_labels.index_select(0, offsets[:-1].clamp(max=b - 1))
    valid = (speaker_of_row[-1] == num_speakers - 1) & (counts >= 2).all()
    return Grouping(order, offsets, index, speaker_labels, valid)
