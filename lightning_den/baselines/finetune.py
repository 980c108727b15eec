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
from torch.func import functional_call, grad, vmap
from typing_extensions import override

from lightning_den.core.den import PhaseProgress
from lightning_den.core.layers import ExpandableMLP
from lightning_den.sequence import EpochsPerTaskCallback


class FineTuningCallback(EpochsPerTaskCallback):
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

    The diagonal Fisher of a task is the mean over its training examples of the squared gradient of each
    example's log-likelihood, for every parameter outside the heads (:meth:`task_fisher`).
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
        fisher = self.task_fisher(pl_module, finished)
        for name, value in fisher.items():
            self._fisher[name] = self.gamma * self._fisher.get(name, torch.zeros_like(value)) + value
        self._anchor = {name: p.detach().clone() for name, p in self._shared(pl_module).items()}
        super().apply(pl_module, target, plan)

    def task_fisher(self, pl_module: pl.LightningModule, task: int) -> dict[str, Tensor]:
        """Diagonal Fisher of ``task`` on its training data: the mean over examples of the squared gradient of
        each example's log-likelihood, for every parameter outside the heads (per-example gradients by
        ``torch.func.vmap``)."""
        shared = {name: p.detach() for name, p in self._shared(pl_module).items()}
        buffers = dict(pl_module.named_buffers())

        def example_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            logits = functional_call(pl_module, (params, buffers), (x.unsqueeze(0),), {"task": task})
            return F.cross_entropy(logits, y.unsqueeze(0))

        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
        totals = {name: torch.zeros_like(p) for name, p in shared.items()}
        examples = 0
        was_training = pl_module.training
        pl_module.eval()
        for inputs, labels in pl_module.trainer.datamodule.task_dataloader(task, "train"):
            # no_grad outside the transform: the heads still require grad, and without it every batch's
            # per-example gradients would stay alive in an autograd graph hanging off `totals`
            with torch.no_grad():
                grads = per_example(shared, inputs.to(pl_module.device), labels.to(pl_module.device))
                for name, value in grads.items():
                    totals[name] += value.pow(2).sum(dim=0)
            examples += len(labels)
        pl_module.train(was_training)
        return {name: total / max(examples, 1) for name, total in totals.items()}

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
