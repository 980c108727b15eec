"""PackNet (Mallya & Lazebnik, 2018) on the task-sequence machinery: one fixed network shared out by pruning.

Per task: ``train`` the weights still free; prune a fraction of them by magnitude (the pruned ones go
back to the pool at exactly zero); ``retrain`` the kept ones briefly; they then belong to the task and
stay frozen. The last task claims every weight still free instead of pruning. Biases learn in the
first task only (as in the official code); each task has its own head. Owned weights are written back
after every step, so every earlier task's outputs stay bit for bit what they were.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_den.core.den import PhaseProgress
from lightning_den.core.packnet import PackNetMLP
from lightning_den.module import DENLightningModule
from lightning_den.sequence import TaskSequenceCallback


class PackNetCallback(TaskSequenceCallback):
    """Trains a :class:`~lightning_den.core.packnet.PackNetMLP` task after task: train, prune, retrain.

    Args:
        prune_fraction: share of a task's trained weights given back to the pool after it (0.5 and
            0.75 are the paper's usual values).
        train_epochs: most epochs training the free weights of each task.
        retrain_epochs: most epochs retraining the kept weights after pruning.
        last_task_claims_free: the last task of the stream takes every weight still free instead of pruning
            (PackNet's rule); ``False`` prunes it like the others, leaving room for tasks added later.
        block: name of the PackNetMLP (found automatically if there is one).
        convergence_tol: see :class:`~lightning_den.sequence.TaskSequenceCallback`.
        seed: seed of the new heads' initial weights.

    Example::

        Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, callbacks=[PackNetCallback(0.5)])
    """

    block_type = PackNetMLP
    method = "PackNet"

    def __init__(
        self,
        prune_fraction: float = 0.5,
        train_epochs: int = 20,
        retrain_epochs: int = 5,
        last_task_claims_free: bool = True,
        block: str | None = None,
        convergence_tol: float = 0.0,
        seed: int = 0,
    ) -> None:
        if (
            not isinstance(prune_fraction, int | float)
            or not math.isfinite(prune_fraction)
            or not 0 < prune_fraction < 1
        ):
            raise MisconfigurationException(f"`prune_fraction` must be in (0, 1), got {prune_fraction!r}")
        for name, value in (("train_epochs", train_epochs), ("retrain_epochs", retrain_epochs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MisconfigurationException(f"`{name}` must be a positive integer, got {value!r}")
        self.prune_fraction = float(prune_fraction)
        self.train_epochs = train_epochs
        self.retrain_epochs = retrain_epochs
        self.last_task_claims_free = bool(last_task_claims_free)
        super().__init__(block=block, convergence_tol=convergence_tol, seed=seed)

    def check_stream(self, pl_module: pl.LightningModule, num_tasks: int) -> None:
        """Check, before training starts, that every task still to learn will find free weights in every layer."""
        first = pl_module.tasks_learned
        for index, (layer, owner) in enumerate(zip(self.model_block.hidden, self.model_block.owners(), strict=True)):
            free = int((owner == 0).sum())
            for task in range(first, num_tasks):
                if free == 0:
                    fix = (
                        "the last task of the earlier sequence claimed every free weight; train with "
                        "`PackNetCallback(last_task_claims_free=False)` when more tasks may follow"
                        if 0 < first == task
                        else f"with `prune_fraction={self.prune_fraction}`: raise it or widen the layer"
                    )
                    raise MisconfigurationException(
                        f"hidden layer {index} ({layer.weight.numel()} weights) has no free weight left for task "
                        f"{task} of {num_tasks}: {fix}"
                    )
                if task < num_tasks - 1 or not self.last_task_claims_free:
                    free -= round((1 - self.prune_fraction) * free)  # what the task keeps

    def phase_epochs(self, phase: str) -> int:
        return self.train_epochs if phase == "train" else self.retrain_epochs

    def max_epochs(self, num_tasks: int) -> int:
        return num_tasks * (self.train_epochs + self.retrain_epochs)

    def following_phase(self, progress: PhaseProgress, mean_loss: float, num_tasks: int) -> PhaseProgress | None:
        if progress.phase == "train":
            return PhaseProgress(task=progress.task, phase="retrain")
        return PhaseProgress(task=progress.task + 1, phase="train") if progress.task + 1 < num_tasks else None

    def apply(self, pl_module: pl.LightningModule, target: PhaseProgress, plan: dict[str, Any]) -> None:
        """Prune (or, for the last task, claim what is free) before retraining; a head for a new task."""
        block = self.model_block
        if target.phase == "retrain":
            if self.last_task_claims_free and target.task == pl_module.trainer.datamodule.num_tasks - 1:
                block.claim_free_()
            else:
                block.prune_(self.prune_fraction)
        else:
            block.add_head_(self.generator(target.task, stream=0))

    def trainable(self, pl_module: pl.LightningModule) -> dict[nn.Parameter, bool | Tensor]:
        """Training: the free weights; retraining: the task's own. Biases and outside parameters: task 0."""
        block, task = self.model_block, self.progress.task
        result = self.first_task_only(pl_module)
        for layer, owner in zip(block.hidden, block.owners(), strict=True):
            result[layer.weight] = owner == 0 if self.progress.phase == "train" else owner == task + 1
        for head_task, head in block.heads.items():
            result.update({p: int(head_task) == task for p in head.parameters()})
        return result


class PackNetModel(DENLightningModule):
    """The ready PackNet model: a :class:`PackNetMLP` on flattened inputs.

    Args:
        in_features: input width after flattening.
        hidden_sizes: units per hidden layer (fixed for the whole sequence).
        num_classes: outputs of each task's head (one number, or one per task).
        optimizer: builds the optimizer from parameters.
        lr_scheduler: optional, builds an LR scheduler from the optimizer.
        lr_scheduler_monitor: the logged metric a scheduler such as ``ReduceLROnPlateau`` follows.

    Example:
        >>> PackNetModel(in_features=64, hidden_sizes=[16], num_classes=2)(torch.zeros(3, 64), task=0).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: list[int],
        num_classes: int | list[int],
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_monitor: str = "train/loss",
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, lr_scheduler_monitor=lr_scheduler_monitor)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = PackNetMLP(in_features, hidden_sizes, num_classes)

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        return self.net(x.flatten(1), self.current_task if task is None else task)
