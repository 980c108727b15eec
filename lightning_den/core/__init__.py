"""Pure-torch core (no Lightning): the two protocols (:mod:`~lightning_den.core.method`), one package per
method (``den``, ``progressive``, ``packnet``; ``trunk`` for the fine-tuning and EWC baselines), and what
they share: freezing of single entries, the initialiser, the argument checks, per-task heads."""

from lightning_den.core.den import (
    DENMethod,
    DENPhase,
    ExpandableCNN,
    ExpandableConv2d,
    ExpandableLinear,
    ExpandableMLP,
)
from lightning_den.core.freezing import FrozenEntries
from lightning_den.core.method import EpochsPerTaskMethod, PhaseProgress, TaskBlock, TaskMethod
from lightning_den.core.packnet import PackNetCNN, PackNetMethod, PackNetMLP
from lightning_den.core.progressive import ProgressiveCNN, ProgressiveMethod, ProgressiveMLP
from lightning_den.core.trunk import EWCMethod, FineTuningMethod

__all__ = [
    "DENMethod",
    "DENPhase",
    "EWCMethod",
    "EpochsPerTaskMethod",
    "ExpandableCNN",
    "ExpandableConv2d",
    "ExpandableLinear",
    "ExpandableMLP",
    "FineTuningMethod",
    "FrozenEntries",
    "PackNetCNN",
    "PackNetMLP",
    "PackNetMethod",
    "PhaseProgress",
    "ProgressiveCNN",
    "ProgressiveMLP",
    "ProgressiveMethod",
    "TaskBlock",
    "TaskMethod",
]
