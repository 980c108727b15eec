"""DEN in pure torch: the expandable networks (fully connected, and convolutional in
:mod:`~lightning_den.core.den.conv`), their surgery, selection and proximal steps, the phases, the entries each
phase trains (:mod:`~lightning_den.core.den.entries`) and the method that runs them."""

from lightning_den.core.den.conv import ExpandableCNN, ExpandableConv2d
from lightning_den.core.den.entries import drift_targets, proximal_targets, trainable_entries
from lightning_den.core.den.layers import ExpandableLinear, ExpandableMLP
from lightning_den.core.den.method import DENMethod
from lightning_den.core.den.phases import DENPhase, PhaseEpochs, next_phase

__all__ = [
    "DENMethod",
    "DENPhase",
    "ExpandableCNN",
    "ExpandableConv2d",
    "ExpandableLinear",
    "ExpandableMLP",
    "PhaseEpochs",
    "drift_targets",
    "next_phase",
    "proximal_targets",
    "trainable_entries",
]
