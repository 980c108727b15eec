"""lightning_den: Dynamically Expandable Networks (Yoon et al., ICLR 2018) as a PyTorch Lightning callback.

The pure-torch core (:mod:`lightning_den.core`) imports without Lightning; the Lightning-facing
names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_den.core import DENPhase, ExpandableLinear, ExpandableMLP

__version__ = "0.1.0"

_LAZY = {
    "DENCallback": "lightning_den.callbacks",
    "DENLightningModule": "lightning_den.module",
    "DENMLP": "lightning_den.module",
    "find_block": "lightning_den.module",
    "TaskSequenceCallback": "lightning_den.sequence",
    "TaskBoundary": "lightning_den.boundary",
    "cross_boundary": "lightning_den.boundary",
    "TaskSequenceDataModule": "lightning_den.data",
    "SplitDigits": "lightning_den.data",
    "MNISTStream": "lightning_den.data",
    "TensorFileStream": "lightning_den.data",
    "TaskEvaluation": "lightning_den.evaluation",
    "task_scores": "lightning_den.evaluation",
}

__all__ = ["DENPhase", "ExpandableLinear", "ExpandableMLP", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lightning_den' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
