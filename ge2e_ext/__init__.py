"""ge2e_ext: a fused C++/CUDA GE2E loss for PyTorch.

    from ge2e_ext import GE2ELoss
    criterion = GE2ELoss(init_w=10.0, init_b=-5.0, loss_method="softmax")
    loss = criterion(embeddings)  # embeddings: (N speakers, M utterances, D)

Public names (docs/api.md): ``GE2ELoss``, ``ge2e_loss``, ``extension_devices``,
``cpu_capability``, and ``LOSS_METHODS``, the tuple of the names ``loss_method``
accepts, ``("softmax", "contrast")`` (eq. 6 and eq. 7 of the paper).
"""

from __future__ import annotations

from .functional import cpu_capability, ge2e_loss, extension_devices
from .loss import GE2ELoss
from .methods import LOSS_METHODS
from . import metrics  # noqa: F401  (ge2e_ext.metrics: EER, batch accuracy)

__all__ = ["GE2ELoss", "ge2e_loss", "extension_devices", "cpu_capability", "LOSS_METHODS"]
from ._version import __version__  # noqa: E402  (the one version: ge2e_ext/_version.py)
