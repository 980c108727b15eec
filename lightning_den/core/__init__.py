"""Pure-torch core of DEN: expandable layers, surgery, proximal steps, selection, phases (no Lightning)."""

from lightning_den.core.den import DENPhase, PhaseEpochs, PhaseProgress, next_phase, phase_is_done, trainable_entries
from lightning_den.core.freezing import FrozenEntries
from lightning_den.core.layers import ExpandableLinear, ExpandableMLP
from lightning_den.core.packnet import PackNetMLP
from lightning_den.core.progressive import ProgressiveMLP
from lightning_den.core.prox import add_drift_penalty_grad_, group_lasso_prox_, l1_prox_, proximal_step_
from lightning_den.core.selection import dead_new_units, select_subnetwork, unit_drift, units_to_split
from lightning_den.core.surgery import add_units_, duplicate_units_, prune_units_, restore_units_, snapshot

__all__ = [
    "DENPhase",
    "ExpandableLinear",
    "ExpandableMLP",
    "FrozenEntries",
    "PackNetMLP",
    "PhaseEpochs",
    "PhaseProgress",
    "ProgressiveMLP",
    "add_drift_penalty_grad_",
    "add_units_",
    "dead_new_units",
    "duplicate_units_",
    "group_lasso_prox_",
    "l1_prox_",
    "next_phase",
    "phase_is_done",
    "proximal_step_",
    "prune_units_",
    "restore_units_",
    "select_subnetwork",
    "snapshot",
    "trainable_entries",
    "unit_drift",
    "units_to_split",
]
