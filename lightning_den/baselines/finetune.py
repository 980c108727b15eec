"""Baselines on one shared trunk with a head per task: plain fine-tuning, and online EWC.

Both train an :class:`~lightning_den.core.layers.ExpandableMLP` (e.g. a :class:`~lightning_den.DENMLP`)
that never grows: every task adds its head and trains the whole trunk; heads of earlier tasks are
frozen. EWC (Kirkpatrick et al., 2017, online form of Schwarz et al., 2018) adds the gradient of
``lambda/2 * sum F (theta - theta*)^2`` before every step, with the diagonal Fisher ``F`` decayed by
``gamma`` and accumulated at the end of each task.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_den.core.den import PhaseProgress
from lightning_den.core.layers import ExpandableMLP
from lightning_den.sequence import TaskSequenceCallback


class FineTuningCallback(TaskSequenceCallback):
    """Fine-tunes one shared network task after task, with a new head per task (the forgetting baseline).

    Args:
        epochs_per_task: most epochs of each task.
        block: name of the ExpandableMLP (found automatically if there is one).
        convergence_tol: see :class:`~lightning_den.sequence.TaskSequenceCallback`.
        seed: seed of the new heads' initial weights.

    Example::

        Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, callbacks=[FineTuningCallback(20)])
    """

    block_type = ExpandableMLP
    method = "fine-tuning"

    def __init__(
        self, epochs_per_task: int = 20, block: str | None = None, convergence_tol: float = 0.0, seed: int = 0
    ) -> None:
        if not isinstance(epochs_per_task, int) or isinstance(epochs_per_task, bool) or epochs_per_task < 1:
            raise MisconfigurationException(f"`epochs_per_task` must be a positive integer, got {epochs_per_task!r}")
        self.epochs_per_task = epochs_per_task
        super().__init__(block=block, convergence_tol=convergence_tol, seed=seed)

    def phase_epochs(self, phase: str) -> int:
        return self.epochs_per_task

    def max_epochs(self, num_tasks: int) -> int:
        return num_tasks * self.epochs_per_task

    def following_phase(self, progress: PhaseProgress, mean_loss: float, num_tasks: int) -> PhaseProgress | None:
        return PhaseProgress(task=progress.task + 1, phase="train") if progress.task + 1 < num_tasks else None

    def apply(self, pl_module: pl.LightningModule, target: PhaseProgress, plan: dict[str, Any]) -> None:
        """The new task's head."""
        self.model_block.add_head_(self.generator(target.task, stream=0))

    def trainable(self, pl_module: pl.LightningModule) -> dict[nn.Parameter, bool | Tensor]:
        """Everything but the heads of earlier tasks."""
        result: dict[nn.Parameter, bool | Tensor] = {p: True for p in pl_module.parameters()}
        for task, head in self.model_block.heads.items():
            result.update({p: int(task) == self.progress.task for p in head.parameters()})
        return result


class EWCCallback(FineTuningCallback):
    """Online Elastic Weight Consolidation on a shared trunk with a head per task.

    Args:
        ewc_lambda: strength of the penalty ``lambda/2 * sum F (theta - theta*)^2``.
        gamma: decay of the accumulated Fisher at each new task (online EWC; 1.0 keeps all of it).
        epochs_per_task: most epochs of each task.
        block: name of the ExpandableMLP (found automatically if there is one).
        convergence_tol: see :class:`~lightning_den.sequence.TaskSequenceCallback`.
        seed: seed of the new heads' initial weights.

    The diagonal Fisher of a task is the mean over its training batches of the squared gradient of the
    batch's mean log-likelihood (a batch-level estimate), for every parameter outside the heads.
    """

    method = "EWC"

    def __init__(
        self,
        ewc_lambda: float = 100.0,
        gamma: float = 1.0,
        epochs_per_task: int = 20,
        block: str | None = None,
        convergence_tol: float = 0.0,
        seed: int = 0,
    ) -> None:
        for name, value in (("ewc_lambda", ewc_lambda), ("gamma", gamma)):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise MisconfigurationException(f"`{name}` must be a finite number >= 0, got {value!r}")
        self.ewc_lambda = float(ewc_lambda)
        self.gamma = float(gamma)
        self._fisher: dict[str, Tensor] = {}
        self._anchor: dict[str, Tensor] = {}
        super().__init__(epochs_per_task=epochs_per_task, block=block, convergence_tol=convergence_tol, seed=seed)

    def _shared(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        heads = {id(p) for p in self.model_block.heads.parameters()}
        return {name: p for name, p in pl_module.named_parameters() if id(p) not in heads}

    def apply(self, pl_module: pl.LightningModule, target: PhaseProgress, plan: dict[str, Any]) -> None:
        """Accumulate the finished task's Fisher and anchor, then add the new head."""
        finished = self.progress.task
        fisher = self._task_fisher(pl_module, finished)
        for name, value in fisher.items():
            self._fisher[name] = self.gamma * self._fisher.get(name, torch.zeros_like(value)) + value
        self._anchor = {name: p.detach().clone() for name, p in self._shared(pl_module).items()}
        super().apply(pl_module, target, plan)

    def _task_fisher(self, pl_module: pl.LightningModule, task: int) -> dict[str, Tensor]:
        shared = self._shared(pl_module)
        totals = {name: torch.zeros_like(p) for name, p in shared.items()}
        loader = pl_module.trainer.datamodule.task_dataloader(task, "train")
        was_training = pl_module.training
        pl_module.eval()
        batches = 0
        for inputs, labels in loader:
            pl_module.zero_grad(set_to_none=True)
            with torch.enable_grad():
                log_likelihood = -F.cross_entropy(
                    pl_module(inputs.to(pl_module.device), task=task), labels.to(pl_module.device)
                )
                grads = torch.autograd.grad(log_likelihood, list(shared.values()), allow_unused=True)
            for (name, _), grad in zip(shared.items(), grads, strict=True):
                if grad is not None:
                    totals[name] += grad.detach() ** 2
            batches += 1
        pl_module.train(was_training)
        return {name: total / max(batches, 1) for name, total in totals.items()}

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add ``lambda * F * (theta - theta*)`` to the gradients of the shared parameters."""
        if self._fisher and self.ewc_lambda > 0:
            for name, p in self._shared(pl_module).items():
                if p.grad is not None and name in self._fisher:
                    p.grad.add_(self._fisher[name] * (p.detach() - self._anchor[name]), alpha=self.ewc_lambda)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def extra_state(self) -> dict[str, Any]:
        return {
            "fisher": {k: v.cpu() for k, v in self._fisher.items()},
            "anchor": {k: v.cpu() for k, v in self._anchor.items()},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._fisher = dict(state.get("fisher", {}))
        self._anchor = dict(state.get("anchor", {}))

    def on_phase_entered(self, pl_module: pl.LightningModule) -> None:
        """Keep the Fisher and anchors on the module's device."""
        self._fisher = {k: v.to(pl_module.device) for k, v in self._fisher.items()}
        self._anchor = {k: v.to(pl_module.device) for k, v in self._anchor.items()}
