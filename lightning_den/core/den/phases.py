"""The DEN algorithm as an explicit state machine over phases (Yoon et al., 2018, Alg. 1-4).

Per task ``t``: ``t == 0`` trains the whole network with L1 (Eq. 2). ``t >= 1`` runs

1. ``HEAD_FIT``: the new head alone with L1, to convergence (Eq. 3; the official code stopped after
   one step, bug B1), then BFS from all of the head's outputs (bug B2 fixed);
2. ``SELECTIVE``: the selected subnetwork with L1 and the pull toward W^{t-1} (Eq. 4);
3. ``EXPANSION`` if the mean training loss of the last selective epoch is above ``tau`` (the official
   code used the last mini-batch, bug B8; with ``early_expansion`` the decision is taken as soon as the
   loss, falling at its latest rate, could not reach ``tau`` in the phase's epochs left,
   :func:`threshold_out_of_reach`): ``k`` new units per hidden layer trained alone with L1 and
   group lasso, then new units with all-zero incoming weights are pruned (Eq. 5, Alg. 3);
4. ``SPLIT``: old units that drifted more than ``sigma`` are duplicated, most drifted first (bug B4),
   the copy keeping the drifted weights and the bias (bug B5), the original restored from a deep copy
   of W^{t-1} (bug B3); then the network is retrained with the pull toward W^{t-1} (Eq. 6). This runs
   whether or not the network was expanded (the official code split only after an expansion, B9),
   unless the split is switched off (``next_phase(..., split=False)``, the paper's ablations).
   Drift is measured on the weights left by selective retraining, which already trains old units
   under the pull toward W^{t-1}; the paper runs a separate Eq.-6 training before measuring it.

The group-lasso group of a new unit is its incoming weights *and its bias* (the paper: incoming
weights), so a pruned unit outputs exactly zero and pruning leaves the network's function unchanged.

Nothing here depends on the number of hidden layers (bug B10). This module holds which phase follows which;
:mod:`~lightning_den.core.den.entries` says which entries each phase trains and each regulariser touches,
and :class:`~lightning_den.core.den.method.DENMethod` puts the steps together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from lightning_den.core.method import PhaseProgress


class DENPhase(StrEnum):
    """The training phases of DEN; the value is what checkpoints and logs store."""

    SPARSE = "sparse"
    HEAD_FIT = "head_fit"
    SELECTIVE = "selective"
    EXPANSION = "expansion"
    SPLIT = "split"

    @property
    def index(self) -> int:
        """Position in the order of a task's phases (for numeric logging)."""
        return list(DENPhase).index(self)


@dataclass(frozen=True)
class PhaseEpochs:
    """Most epochs each phase may run (every phase but expansion also ends early once its loss levels off, and
    selective retraining with ``early_expansion`` once ``loss_threshold`` is out of reach).

    Example:
        >>> epochs = PhaseEpochs(sparse=20, head_fit=5, selective=20, expansion=20, split=5)
        >>> epochs.of(DENPhase.SPLIT), PhaseEpochs.ARGUMENTS["first_task_epochs"]
        (5, 'sparse')
    """

    #: the ``DENCallback`` argument that sets each field
    ARGUMENTS: ClassVar[dict[str, str]] = {
        "first_task_epochs": "sparse",
        "head_fit_epochs": "head_fit",
        "selective_epochs": "selective",
        "expansion_epochs": "expansion",
        "split_epochs": "split",
    }

    sparse: int
    head_fit: int
    selective: int
    expansion: int
    split: int

    def of(self, phase: DENPhase) -> int:
        return getattr(self, phase.value)

    def total(self, num_tasks: int) -> int:
        """Most epochs a whole sequence of ``num_tasks`` tasks can take."""
        per_task = self.head_fit + self.selective + self.expansion + self.split
        return self.sparse + (num_tasks - 1) * per_task


def next_phase(
    progress: PhaseProgress,
    mean_loss: float,
    loss_threshold: float,
    num_tasks: int,
    expansion: bool = True,
    split: bool = True,
) -> PhaseProgress | None:
    """The phase after the current one, or ``None`` when the last task is done.

    ``expansion=False`` never expands and ``split=False`` ends a task without the split (the paper's
    ablations DNN-Selective, both off, and DEN without split).

    Example:
        >>> next_phase(PhaseProgress(task=1, phase=DENPhase.SELECTIVE), 0.5, 0.1, 3).phase.value
        'expansion'
        >>> next_phase(PhaseProgress(task=1, phase=DENPhase.SELECTIVE), 0.05, 0.1, 3).phase.value
        'split'
        >>> next_phase(PhaseProgress(task=2, phase=DENPhase.SPLIT), 0.05, 0.1, 3) is None
        True
        >>> selective = PhaseProgress(task=1, phase=DENPhase.SELECTIVE)
        >>> next_phase(selective, 0.5, 0.1, 3, expansion=False, split=False).phase.value
        'head_fit'
    """
    phase = DENPhase(progress.phase)
    task = progress.task
    if phase is DENPhase.HEAD_FIT:
        return PhaseProgress(task=task, phase=DENPhase.SELECTIVE)
    if phase is DENPhase.SELECTIVE and expansion and mean_loss > loss_threshold:
        return PhaseProgress(task=task, phase=DENPhase.EXPANSION)
    if phase in (DENPhase.SELECTIVE, DENPhase.EXPANSION) and split:
        return PhaseProgress(task=task, phase=DENPhase.SPLIT)
    return PhaseProgress(task=task + 1, phase=DENPhase.HEAD_FIT) if task + 1 < num_tasks else None


def threshold_out_of_reach(last_loss: float, mean_loss: float, epochs_left: int, loss_threshold: float) -> bool:
    """True when the loss, falling by its latest epoch's factor (``mean_loss / last_loss``) for each of the
    ``epochs_left`` epochs, would still end above ``loss_threshold``.

    A loss at or below the threshold (or not a number) never is. A loss that rose or stayed level is projected
    to stay where it is. A loss curve flattens as it falls, so the projection is optimistic: when even it misses
    the threshold, training on would most likely miss it too.

    Example:
        >>> threshold_out_of_reach(1.60, 1.56, epochs_left=18, loss_threshold=0.1)   # 1.56 * 0.975**18 = 0.99
        True
        >>> threshold_out_of_reach(0.30, 0.24, epochs_left=18, loss_threshold=0.1)   # 0.24 * 0.8**18 = 0.004
        False
    """
    if epochs_left <= 0 or not math.isfinite(last_loss) or last_loss <= 0 or not mean_loss > loss_threshold:
        return False
    factor = min(mean_loss / last_loss, 1.0)
    return mean_loss * factor**epochs_left > loss_threshold
