"""Per-task evaluation at task boundaries: the accuracy matrix ``R[i][j]`` and the widths per task."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_den.boundary import TaskBoundary
from lightning_den.module import find_expandable_block


@torch.no_grad()
def task_accuracy(pl_module: pl.LightningModule, loader: DataLoader, task: int) -> float:
    """Accuracy of ``pl_module(x, task=task)`` over ``loader`` (timestamped inference for old tasks)."""
    was_training = pl_module.training
    pl_module.eval()
    correct = total = 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(pl_module.device), labels.to(pl_module.device)
        correct += int((pl_module(inputs, task=task).argmax(dim=-1) == labels).sum())
        total += labels.numel()
    pl_module.train(was_training)
    return correct / max(total, 1)


class TaskEvaluation(Callback):
    """After each task ``i``, the accuracy on every task ``j <= i`` and the network's size.

    A listener of :class:`~lightning_den.TaskBoundary`: it evaluates when a boundary ends a task,
    on the datamodule's ``task_dataloader(j, split)``.

    Args:
        split: which split of each task to evaluate (``"test"`` or ``"val"``).
        block: name of the ExpandableMLP whose widths to record (found automatically if there is one).

    Attributes:
        accuracy: ``accuracy[i][j]``, accuracy on task ``j`` after training task ``i``.
        widths: ``widths[i]``, units per hidden layer used by task ``i``.
        parameters: ``parameters[i]``, parameters in the whole network after task ``i``.

    Example::

        evaluation = TaskEvaluation()
        trainer = Trainer(..., callbacks=[DENCallback(), evaluation])
        trainer.fit(model, datamodule=datamodule)
        evaluation.accuracy[-1]   # final accuracy on every task
    """

    def __init__(self, split: str = "test", block: str | None = None) -> None:
        self.split = split
        self.block = block
        self.accuracy: list[list[float]] = []
        self.widths: list[tuple[int, ...]] = []
        self.parameters: list[int] = []

    def on_task_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, boundary: TaskBoundary) -> None:
        """Evaluate every task seen so far when ``boundary`` ends a task."""
        if boundary.ended_task is None:
            return
        ended = boundary.ended_task
        datamodule = trainer.datamodule
        self.accuracy.append(
            [task_accuracy(pl_module, datamodule.task_dataloader(j, self.split), j) for j in range(ended + 1)]
        )
        _, mlp = find_expandable_block(pl_module, self.block)
        self.widths.append(mlp.widths(ended))
        self.parameters.append(mlp.num_parameters())
