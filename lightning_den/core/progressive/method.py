"""Progressive Networks as a task method: each task adds a column and trains it alone."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_den.core.checks import check_flag
from lightning_den.core.method import EpochsPerTaskMethod, PhaseProgress, Trainable
from lightning_den.core.progressive.block import ProgressiveMLP


class ProgressiveMethod(EpochsPerTaskMethod):
    """One column per task (Rusu et al., 2016); earlier columns are frozen whole by the block.

    Args:
        epochs_per_task: most epochs of each task.
        lateral: lateral adapters from earlier columns when the callback converts a user's chain of Linear
            layers into the block (``False``: one independent network per task); a ready block keeps its own.
        seed: seed of the new columns' initial weights.

    Example:
        >>> pnn, method = ProgressiveMLP(4, [3], head_classes=2), ProgressiveMethod()
        >>> method.apply(pnn, method.start(), PhaseProgress(task=1), {})
        >>> sum(method.trainable(pnn, PhaseProgress(task=1)).values()) == len(list(pnn.columns[1].parameters()))
        True
    """

    block_type = ProgressiveMLP
    name = "PNN"

    def __init__(self, epochs_per_task: int = 20, lateral: bool = True, seed: int = 0) -> None:
        super().__init__(epochs_per_task=epochs_per_task, seed=seed)
        self.lateral = check_flag("lateral", lateral)

    def block_options(self) -> dict[str, Any]:
        return {"lateral": self.lateral}

    def apply(
        self, block: ProgressiveMLP, progress: PhaseProgress, target: PhaseProgress, plan: dict[str, Any]
    ) -> None:
        """A new column for the new task."""
        block.add_task_(self.generator(target.task, stream=0))

    def trainable(self, block: ProgressiveMLP, progress: PhaseProgress) -> dict[nn.Parameter, Trainable]:
        """The column of ``progress``'s task only."""
        result: dict[nn.Parameter, Trainable] = {p: False for p in block.parameters()}
        result.update({p: True for p in block.column_parameters(progress.task)})
        return result
