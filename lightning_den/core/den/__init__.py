"""DEN in pure torch: the expandable network, its surgery, selection and proximal steps, its phases, the
entries each phase trains (:mod:`~lightning_den.core.den.entries`) and the method that runs them."""

from lightning_den.core.den.entries import drift_targets, proximal_targets, trainable_entries
from lightning_den.core.den.layers import ExpandableLinear, ExpandableMLP
from lightning_den.core.den.method import DENMethod
from lightning_den.core.den.phases import DENPhase, PhaseEpochs, next_phase

__all__ = [
    "DENMethod",
    "DENPhase",
    "ExpandableLinear",
    "ExpandableMLP",
    "PhaseEpochs",
    "drift_targets",
    "next_phase",
    "proximal_targets",
    "trainable_entries",
]
