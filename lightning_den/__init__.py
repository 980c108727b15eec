"""lightning_den: Dynamically Expandable Networks (Yoon et al., ICLR 2018) as a PyTorch Lightning callback.

The pure-torch core (:mod:`lightning_den.core`) imports without Lightning; the Lightning-facing names
below are loaded on first use (``dir(lightning_den)`` and type checkers see them all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_den._lazy import lazy_exports
from lightning_den.core import (
    DENMethod,
    DENPhase,
    ExpandableCNN,
    ExpandableConv2d,
    ExpandableLinear,
    ExpandableMLP,
    TaskBlock,
    TaskMethod,
)
from lightning_den.core.convert import load_grown
from lightning_den.core.routing import task

if TYPE_CHECKING:
    from lightning_den.baselines import (
        EWCCallback,
        FineTuningCallback,
        PackNetCallback,
        PackNetCNNModel,
        PackNetModel,
        ProgressiveCallback,
        ProgressiveCNNModel,
        ProgressiveNet,
    )
    from lightning_den.boundary import TaskBoundary
    from lightning_den.callbacks import DENCallback
    from lightning_den.data import MNISTStream, SplitDigits, TaskSequenceDataModule, TensorFileStream
    from lightning_den.driver import TaskSequenceCallback, sequence_trainer
    from lightning_den.evaluation import TaskEvaluation
    from lightning_den.module import DENCNN, DENMLP, DENLightningModule, ReadyModel

__version__ = "0.1.0"

_LAZY = {
    "DENCallback": "lightning_den.callbacks",
    "DENLightningModule": "lightning_den.module",
    "DENCNN": "lightning_den.module",
    "DENMLP": "lightning_den.module",
    "ReadyModel": "lightning_den.module",
    "TaskSequenceCallback": "lightning_den.driver",
    "sequence_trainer": "lightning_den.driver",
    "TaskBoundary": "lightning_den.boundary",
    "ProgressiveCallback": "lightning_den.baselines",
    "ProgressiveNet": "lightning_den.baselines",
    "ProgressiveCNNModel": "lightning_den.baselines",
    "PackNetCallback": "lightning_den.baselines",
    "PackNetModel": "lightning_den.baselines",
    "PackNetCNNModel": "lightning_den.baselines",
    "FineTuningCallback": "lightning_den.baselines",
    "EWCCallback": "lightning_den.baselines",
    "TaskSequenceDataModule": "lightning_den.data",
    "SplitDigits": "lightning_den.data",
    "MNISTStream": "lightning_den.data",
    "TensorFileStream": "lightning_den.data",
    "TaskEvaluation": "lightning_den.evaluation",
}

__all__ = [
    "DENCNN",
    "DENMLP",
    "DENCallback",
    "DENLightningModule",
    "DENMethod",
    "DENPhase",
    "EWCCallback",
    "ExpandableCNN",
    "ExpandableConv2d",
    "ExpandableLinear",
    "ExpandableMLP",
    "FineTuningCallback",
    "MNISTStream",
    "PackNetCNNModel",
    "PackNetCallback",
    "PackNetModel",
    "ProgressiveCNNModel",
    "ProgressiveCallback",
    "ProgressiveNet",
    "ReadyModel",
    "SplitDigits",
    "TaskBlock",
    "TaskBoundary",
    "TaskEvaluation",
    "TaskMethod",
    "TaskSequenceCallback",
    "TaskSequenceDataModule",
    "TensorFileStream",
    "load_grown",
    "sequence_trainer",
    "task",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
