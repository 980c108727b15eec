"""PackNet as a task method: train the free weights, prune, retrain the kept ones (Mallya & Lazebnik, 2018)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from torch import nn

from lightning_den.core.checks import check_count, check_flag, check_fraction
from lightning_den.core.method import PhaseProgress, TaskMethod, Trainable, head_of_task_only
from lightning_den.core.packnet.block import PackNetMLP


class PackNetPhase(StrEnum):
    """The phases of a PackNet task."""

    TRAIN = "train"
    RETRAIN = "retrain"


class PackNetMethod(TaskMethod):
    """Per task: ``train`` the weights still free; prune ``prune_fraction`` of them back to the pool (the
    last task of the stream claims them all instead, unless ``last_task_claims_free=False``); ``retrain``
    the kept ones. Biases learn in the first task only (as in the official code); each task has its head.

    Args:
        prune_fraction: share of a task's trained weights given back to the pool after it.
        train_epochs: most epochs training the free weights of each task.
        retrain_epochs: most epochs retraining the kept weights after pruning.
        last_task_claims_free: the last task of the stream takes every weight still free.
        seed: seed of the new heads' initial weights.

    Example:
        >>> net, packnet = PackNetMLP(4, [3], head_classes=2), PackNetMethod(prune_fraction=0.5)
        >>> packnet.plan(net, packnet.start(), PhaseProgress(task=0, phase=PackNetPhase.RETRAIN), num_tasks=2)
        {'claim_free': False}
    """

    phases = PackNetPhase
    block_type = PackNetMLP
    name = "PackNet"

    def __init__(
        self,
        prune_fraction: float = 0.5,
        train_epochs: int = 20,
        retrain_epochs: int = 5,
        last_task_claims_free: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.prune_fraction = check_fraction("prune_fraction", prune_fraction)
        self.train_epochs = check_count("train_epochs", train_epochs)
        self.retrain_epochs = check_count("retrain_epochs", retrain_epochs)
        self.last_task_claims_free = check_flag("last_task_claims_free", last_task_claims_free)

    def phase_epochs(self, phase: PackNetPhase) -> int:
        return self.train_epochs if phase == PackNetPhase.TRAIN else self.retrain_epochs

    def max_epochs(self, num_tasks: int) -> int:
        return num_tasks * (self.train_epochs + self.retrain_epochs)

    def following_phase(self, progress: PhaseProgress, mean_loss: float, num_tasks: int) -> PhaseProgress | None:
        if progress.phase == PackNetPhase.TRAIN:
            return PhaseProgress(task=progress.task, phase=PackNetPhase.RETRAIN)
        if progress.task + 1 >= num_tasks:
            return None
        return PhaseProgress(task=progress.task + 1, phase=PackNetPhase.TRAIN)

    def check_stream(self, block: PackNetMLP, first_task: int, num_tasks: int) -> None:
        """Check that every task still to learn will find free weights in every layer."""
        for index, (layer, owner) in enumerate(zip(block.hidden, block.owners(), strict=True)):
            free = int((owner == 0).sum())
            for task in range(first_task, num_tasks):
                if free == 0:
                    fix = (
                        "the last task of the earlier sequence claimed every free weight; train with "
                        "`last_task_claims_free=False` when more tasks may follow"
                        if 0 < first_task == task
                        else f"with `prune_fraction={self.prune_fraction}`: raise it or widen the layer"
                    )
                    raise ValueError(
                        f"hidden layer {index} ({layer.weight.numel()} weights) has no free weight left for task "
                        f"{task} of {num_tasks}: {fix}"
                    )
                if task < num_tasks - 1 or not self.last_task_claims_free:
                    free -= round((1 - self.prune_fraction) * free)  # what the task keeps

    def plan(self, block: PackNetMLP, progress: PhaseProgress, target: PhaseProgress, num_tasks: int) -> dict[str, Any]:
        """Before retraining: whether the task claims every free weight (the stream's last task) or prunes."""
        if target.phase != PackNetPhase.RETRAIN:
            return {}
        return {"claim_free": self.last_task_claims_free and target.task == num_tasks - 1}

    def apply(self, block: PackNetMLP, progress: PhaseProgress, target: PhaseProgress, plan: dict[str, Any]) -> None:
        """Prune (or claim what is free) before retraining; a head for a new task."""
        if target.phase == PackNetPhase.RETRAIN:
            if plan.get("claim_free", False):  # a plan saved before this key existed: prune
                block.claim_free_()
            else:
                block.prune_(self.prune_fraction)
        else:
            block.add_task_(self.generator(target.task, stream=0))

    def trainable(self, block: PackNetMLP, progress: PhaseProgress) -> dict[nn.Parameter, Trainable]:
        """Training: the free weights; retraining: the task's own; biases: task 0; the task's head."""
        task = progress.task
        result: dict[nn.Parameter, Trainable] = {p: task == 0 for p in block.parameters()}
        for layer, owner in zip(block.hidden, block.owners(), strict=True):
            result[layer.weight] = owner == 0 if progress.phase == PackNetPhase.TRAIN else owner == task + 1
        result.update(head_of_task_only(block.heads, task))
        return result
