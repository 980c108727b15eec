"""Progressive Networks (Rusu et al., 2016) on the task-sequence machinery: a new column per task.

Each task trains only its own column (hidden layers, lateral adapters, head); earlier columns are
frozen with ``requires_grad_(False)`` before the DDP wrap, so every earlier task's outputs stay bit
for bit what they were. ``lateral=False`` turns the same callback and model into one independent
network per task (single-task learning).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_den.core.den import PhaseProgress
from lightning_den.core.progressive import ProgressiveMLP
from lightning_den.module import DENLightningModule
from lightning_den.sequence import EpochsPerTaskCallback


class ProgressiveCallback(EpochsPerTaskCallback):
    """Trains a :class:`~lightning_den.core.progressive.ProgressiveMLP` task after task, one column each.

    Args:
        epochs_per_task: most epochs of each task (fewer once the loss levels off, see ``convergence_tol``).
        block: name of the ProgressiveMLP (found automatically if there is one).
        convergence_tol: see :class:`~lightning_den.sequence.TaskSequenceCallback`.
        seed: seed of the new columns' initial weights (the same on every rank).

    Example::

        trainer = Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1,
                          callbacks=[ProgressiveCallback(epochs_per_task=20)])
        trainer.fit(ProgressiveNet(in_features=784, hidden_sizes=[312, 128], num_classes=10), datamodule=dm)
    """

    block_type = ProgressiveMLP
    method = "PNN"

    def apply(self, pl_module: pl.LightningModule, target: PhaseProgress, plan: dict[str, Any]) -> None:
        """A new column for the new task (earlier columns are frozen by the block)."""
        self.model_block.add_column_(self.generator(target.task, stream=0))

    def trainable(self, pl_module: pl.LightningModule) -> dict[nn.Parameter, bool | Tensor]:
        """The newest column only; parameters outside the block learn in the first task only."""
        result = self.first_task_only(pl_module)
        result.update({p: False for p in self.model_block.parameters()})
        result.update({p: True for p in self.model_block.column_parameters(self.progress.task)})
        return result


class ProgressiveNet(DENLightningModule):
    """The ready Progressive Network: a :class:`ProgressiveMLP` on flattened inputs.

    Args:
        in_features: input width after flattening.
        hidden_sizes: units per hidden layer of every column.
        num_classes: outputs of each task's head (one number, or one per task).
        lateral: lateral adapters from earlier columns; ``False`` = one independent network per task.
        optimizer: builds the optimizer from parameters.
        lr_scheduler: optional, builds an LR scheduler from the optimizer.
        lr_scheduler_monitor: the logged metric a scheduler such as ``ReduceLROnPlateau`` follows.

    Example:
        >>> ProgressiveNet(in_features=64, hidden_sizes=[16], num_classes=2)(torch.zeros(3, 64), task=0).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: list[int],
        num_classes: int | list[int],
        lateral: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_monitor: str = "train/loss",
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, lr_scheduler_monitor=lr_scheduler_monitor)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.columns = ProgressiveMLP(in_features, hidden_sizes, num_classes, lateral=lateral)

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        return self.columns(x.flatten(1), self.current_task if task is None else task)
