"""Baselines on one shared trunk with a head per task: fine-tuning and online EWC, as task methods.

Both train an :class:`~lightning_den.core.den.layers.ExpandableMLP` that never grows: every task adds its
head and trains the whole trunk (and every parameter of the model outside the block); earlier heads are
frozen. EWC (Kirkpatrick et al., 2017, online form of Schwarz et al., 2018) adds the gradient of
``lambda/2 * sum F (theta - theta*)^2`` before every step, with the diagonal Fisher ``F`` decayed by
``gamma`` and accumulated at the end of each task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_den.core.checks import check_number
from lightning_den.core.den.layers import ExpandableMLP
from lightning_den.core.method import EpochsPerTaskMethod, PhaseProgress, Trainable, head_of_task_only, stepped_by
from lightning_den.core.routing import task as route_to


class FineTuningMethod(EpochsPerTaskMethod):
    """Fine-tunes one shared network task after task, with a new head per task (the forgetting baseline).

    Example:
        >>> mlp, method = ExpandableMLP(4, [3], head_classes=2), FineTuningMethod()
        >>> method.apply(mlp, method.start(), PhaseProgress(task=1), {}); mlp.num_tasks
        2
    """

    block_type = ExpandableMLP
    name = "fine-tuning"
    trains_outside_block = True

    def apply(self, block: ExpandableMLP, progress: PhaseProgress, target: PhaseProgress, plan: dict[str, Any]) -> None:
        """The new task's head."""
        block.add_task_(self.generator(target.task, stream=0))

    def trainable(self, block: ExpandableMLP, progress: PhaseProgress) -> dict[nn.Parameter, Trainable]:
        """Everything but the heads of earlier tasks."""
        result: dict[nn.Parameter, Trainable] = {p: True for p in block.parameters()}
        result.update(head_of_task_only(block.heads, progress.task))
        return result


class EWCMethod(FineTuningMethod):
    """Online Elastic Weight Consolidation on a shared trunk with a head per task.

    Args:
        ewc_lambda: strength of the penalty ``lambda/2 * sum F (theta - theta*)^2``.
        gamma: decay of the accumulated Fisher at each new task (online EWC; 1.0 keeps all of it).
        epochs_per_task: most epochs of each task.
        seed: seed of the new heads' initial weights.

    The diagonal Fisher of a task is the mean over its training examples of the squared gradient of each
    example's log-likelihood, for every parameter of the model outside the heads (:meth:`task_fisher`).
    """

    name = "EWC"

    def __init__(self, ewc_lambda: float = 100.0, gamma: float = 1.0, epochs_per_task: int = 20, seed: int = 0) -> None:
        super().__init__(epochs_per_task=epochs_per_task, seed=seed)
        self.ewc_lambda = check_number("ewc_lambda", ewc_lambda)
        self.gamma = check_number("gamma", gamma)
        self._fisher: dict[str, Tensor] = {}
        self._anchor: dict[str, Tensor] = {}

    @staticmethod
    def shared(model: nn.Module, block: ExpandableMLP) -> dict[str, nn.Parameter]:
        """The parameters every task uses: all of the model's but the heads."""
        heads = {id(p) for p in block.heads.parameters()}
        return {name: p for name, p in model.named_parameters() if id(p) not in heads}

    def consolidate(
        self, model: nn.Module, block: ExpandableMLP, task: int, batches: Callable[[], Iterable[Any]]
    ) -> None:
        """Accumulate the finished task's Fisher and keep the weights it ended with as the anchor."""
        fisher = self.task_fisher(model, block, task, batches())
        for name, value in fisher.items():
            self._fisher[name] = self.gamma * self._fisher.get(name, torch.zeros_like(value)) + value
        self._anchor = {name: p.detach().clone() for name, p in self.shared(model, block).items()}

    def task_fisher(
        self, model: nn.Module, block: ExpandableMLP, task: int, batches: Iterable[Any]
    ) -> dict[str, Tensor]:
        """Diagonal Fisher of ``task`` on ``batches`` of ``(inputs, labels)``: the mean over examples of the
        squared gradient of each example's log-likelihood (per-example gradients by ``torch.func.vmap``)."""
        shared = {name: p.detach() for name, p in self.shared(model, block).items()}
        buffers = dict(model.named_buffers())
        device = next(iter(shared.values())).device

        def example_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            logits = functional_call(model, (params, buffers), (x.unsqueeze(0),))  # routed to `task` below
            return F.cross_entropy(logits, y.unsqueeze(0))

        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
        totals = {name: torch.zeros_like(p) for name, p in shared.items()}
        examples = 0
        was_training = model.training
        model.eval()
        # no_grad outside the transform: the heads still require grad, and without it every batch's
        # per-example gradients would stay alive in an autograd graph hanging off `totals`
        with route_to(model, task), torch.no_grad():
            for inputs, labels in batches:
                grads = per_example(shared, inputs.to(device), labels.to(device))
                for name, value in grads.items():
                    totals[name] += value.pow(2).sum(dim=0)
                examples += len(labels)
        model.train(was_training)
        return {name: total / max(examples, 1) for name, total in totals.items()}

    def enter_phase(
        self, block: ExpandableMLP, progress: PhaseProgress, trainable: dict[nn.Parameter, Trainable]
    ) -> None:
        """Keep the Fisher and anchors on the block's device."""
        device = block.hidden[0].weight.device
        self._fisher = {k: v.to(device) for k, v in self._fisher.items()}
        self._anchor = {k: v.to(device) for k, v in self._anchor.items()}

    def before_step(self, model: nn.Module, block: ExpandableMLP, optimizer: torch.optim.Optimizer) -> None:
        """Add ``lambda * F * (theta - theta*)`` to the gradients of the shared parameters ``optimizer`` steps."""
        if not self._fisher or self.ewc_lambda <= 0:
            return
        stepped = stepped_by(optimizer)
        for name, p in self.shared(model, block).items():
            if p.grad is not None and name in self._fisher and p in stepped:
                p.grad.add_(self._fisher[name] * (p.detach() - self._anchor[name]), alpha=self.ewc_lambda)

    def state_dict(self) -> dict[str, Any]:
        return {
            "fisher": {k: v.cpu() for k, v in self._fisher.items()},
            "anchor": {k: v.cpu() for k, v in self._anchor.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._fisher = dict(state.get("fisher", {}))
        self._anchor = dict(state.get("anchor", {}))
