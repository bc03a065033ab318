"""voxceleb_trainer's loss plug-in: ``--trainfunc ge2e_ext`` with a one-line file.

voxceleb_trainer (clovaai) loads ``loss/<trainfunc>.py`` by module name and builds
``LossFunction(**kwargs)`` from all of its command-line options; the model calls
``forward(x, label)`` with x of shape ``(speakers, nPerSpeaker, D)`` and expects
``(loss, prec1)`` back, prec1 a percentage in a 0-dim tensor, and reads
``test_normalize`` when it scores its test list. Its own GE2E (``loss/ge2e.py``)
computes the loss as the mean cross-entropy of ``w * cos + b`` with cosines clamped
at 1e-6: this class computes the same loss with ge2e_ext, keeping the parameter
names ``w`` and ``b`` (checkpoints load either way). In voxceleb_trainer:

    # loss/ge2e_ext.py
    from ge2e_ext.voxceleb_trainer import LossFunction  # noqa: F401
"""

from __future__ import annotations

import torch

from .loss import GE2ELoss


class LossFunction(GE2ELoss):
    """GE2ELoss(init_w, init_b, loss_method, reduction="mean") with voxceleb_trainer's
    interface. Options of voxceleb_trainer that are not this loss's are ignored."""

    def __init__(self, init_w: float = 10.0, init_b: float = -5.0, loss_method: str = "softmax",
                 **kwargs: object) -> None:
        super().__init__(init_w, init_b, loss_method, reduction="mean")
        self.test_normalize = True  # score test pairs on L2-normalised embeddings, as its GE2E

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (speakers, utterances per speaker >= 2, D). label (the speakers' class
        indices) is not needed: GE2E's classes are the batch's speakers."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] < 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"GE2E takes (speakers, utterances >= 2, D) embeddings, got {shape}: "
                             f"train with --nPerSpeaker 2 or more")
        # prec1 from the loss's own pass: each row's top-1 comes with its loss.
        loss, top1 = super().forward(x, return_top1=True)
        return loss, 100.0 * top1.to(loss.dtype).mean()
