"""The DEN algorithm as an explicit state machine over phases (Yoon et al., 2018, Alg. 1-4).

Per task ``t``: ``t == 0`` trains the whole network with L1 (Eq. 2). ``t >= 1`` runs

1. ``HEAD_FIT``: the new head alone with L1, to convergence (Eq. 3; the official code stopped after
   one step, bug B1), then BFS from all of the head's outputs (bug B2 fixed);
2. ``SELECTIVE``: the selected subnetwork with L1 and the pull toward W^{t-1} (Eq. 4);
3. ``EXPANSION`` if the mean training loss of the last selective epoch is above ``tau`` (the official
   code used the last mini-batch, bug B8): ``k`` new units per hidden layer trained alone with L1 and
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

Nothing here depends on the number of hidden layers (bug B10). This module holds the pure logic:
which phase follows which, and which entries each phase trains. The Lightning callback executes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import StrEnum

import torch
from torch import Tensor

from lightning_den.core.layers import ExpandableMLP


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


@dataclass
class PhaseProgress:
    """Where the task sequence stands: plain numbers, so it can go into any checkpoint as a dict."""

    task: int = 0
    phase: str = DENPhase.SPARSE.value
    epochs: int = 0
    last_loss: float = math.inf

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PhaseEpochs:
    """Most epochs each phase may run (a phase also ends early once its loss stops improving)."""

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


def phase_is_done(progress: PhaseProgress, epochs: int, mean_loss: float, tolerance: float) -> bool:
    """True when the phase has used its epochs, or its mean loss has levelled off.

    Levelled off: this epoch's mean training loss differs from the previous epoch's by less than
    ``tolerance`` times the previous one, in either direction.

    Example:
        >>> phase_is_done(PhaseProgress(epochs=5), 5, 1.0, 0.0)
        True
        >>> phase_is_done(PhaseProgress(epochs=2, last_loss=1.0), 5, 0.9995, 1e-3)
        True
    """
    if progress.epochs >= epochs:
        return True
    if tolerance <= 0 or not math.isfinite(progress.last_loss):
        return False
    return abs(progress.last_loss - mean_loss) < tolerance * abs(progress.last_loss)


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
        >>> next_phase(PhaseProgress(task=1, phase="selective"), 0.5, 0.1, 3).phase
        'expansion'
        >>> next_phase(PhaseProgress(task=1, phase="selective"), 0.05, 0.1, 3).phase
        'split'
        >>> next_phase(PhaseProgress(task=2, phase="split"), 0.05, 0.1, 3) is None
        True
        >>> next_phase(PhaseProgress(task=1, phase="selective"), 0.5, 0.1, 3, expansion=False, split=False).phase
        'head_fit'
    """
    phase = DENPhase(progress.phase)
    task = progress.task
    if phase is DENPhase.HEAD_FIT:
        return PhaseProgress(task=task, phase=DENPhase.SELECTIVE.value)
    if phase is DENPhase.SELECTIVE and expansion and mean_loss > loss_threshold:
        return PhaseProgress(task=task, phase=DENPhase.EXPANSION.value)
    if phase in (DENPhase.SELECTIVE, DENPhase.EXPANSION) and split:
        return PhaseProgress(task=task, phase=DENPhase.SPLIT.value)
    return PhaseProgress(task=task + 1, phase=DENPhase.HEAD_FIT.value) if task + 1 < num_tasks else None


Trainable = bool | Tensor


def _normalise(mask: Tensor) -> Trainable:
    if bool(mask.all()):
        return True
    if not bool(mask.any()):
        return False
    return mask


def trainable_entries(
    mlp: ExpandableMLP, phase: DENPhase, selection: list[list[int]] | None = None
) -> dict[str, Trainable]:
    """Which entries of each parameter ``phase`` trains in the newest task.

    Returns a map from parameter name to ``True`` (every entry), ``False`` (none: the parameter is
    frozen whole) or a boolean mask of the parameter's shape. Heads of earlier tasks are always
    frozen. ``selection`` is the BFS result (:func:`~lightning_den.core.selection.select_subnetwork`),
    needed by ``SELECTIVE``.

    Example:
        >>> mlp = ExpandableMLP(4, [3], head_classes=2)
        >>> trainable_entries(mlp, DENPhase.SPARSE)["hidden.0.weight"]
        True
    """
    task = mlp.newest_task
    result: dict[str, Trainable] = {}
    for name, _ in mlp.heads.named_parameters():
        result[f"heads.{name}"] = name.split(".")[0] == str(task)
    for index, layer in enumerate(mlp.hidden):
        weight_key, bias_key = f"hidden.{index}.weight", f"hidden.{index}.bias"
        if phase in (DENPhase.SPARSE, DENPhase.SPLIT):
            result[weight_key] = result[bias_key] = True
        elif phase is DENPhase.HEAD_FIT:
            result[weight_key] = result[bias_key] = False
        elif phase is DENPhase.SELECTIVE:
            if selection is None:
                raise ValueError("the selective phase needs the BFS selection of the task's subnetwork")
            rows = _index_mask(selection[index + 1], layer.out_features, layer.birth.device)
            cols = _index_mask(selection[index], layer.in_features, layer.birth.device)
            result[weight_key] = _normalise(rows[:, None] & cols[None, :])
            result[bias_key] = _normalise(rows)
        else:  # EXPANSION: new units' incoming weights, and the old units' inputs from new units
            rows = layer.birth == task
            cols = torch.zeros(layer.in_features, dtype=torch.bool, device=layer.birth.device)
            if index > 0:
                cols = mlp.hidden[index - 1].birth == task
            result[weight_key] = _normalise(rows[:, None] | cols[None, :])
            result[bias_key] = _normalise(rows)
    if phase is DENPhase.SELECTIVE:
        head = mlp.heads[str(task)]
        columns = _index_mask(selection[-1], head.in_features, head.birth.device)
        result[f"heads.{task}.weight"] = _normalise(columns[None, :].expand(head.out_features, -1).clone())
    return result


def _index_mask(indices: list[int], size: int, device: torch.device) -> Tensor:
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    mask[indices] = True
    return mask
