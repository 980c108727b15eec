r"""
DEN callback
^^^^^^^^^^^^

Trains a whole task sequence in one ``trainer.fit`` with Dynamically Expandable Networks
(Yoon et al., ICLR 2018): sparse training of the first task, then per task selective retraining,
dynamic expansion and split/duplication, with timestamped inference for old tasks.

The callback drives the phases epoch by epoch (see :mod:`lightning_den.core.den`), adds the
regularisers around each optimizer step (the pull toward the previous task's weights as a gradient
term before the step; L1 and group-lasso proximal steps and the restoring of frozen entries after it)
and changes shapes only at boundaries, at the start of an epoch, through
:func:`~lightning_den.boundary.cross_boundary`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_den.boundary import TaskBoundary, check_optimizers_cover, cross_boundary, rebuild_training_objects
from lightning_den.core.den import (
    DENPhase,
    PhaseEpochs,
    PhaseProgress,
    next_phase,
    phase_is_done,
    trainable_entries,
)
from lightning_den.core.freezing import FrozenEntries
from lightning_den.core.layers import ExpandableLinear, ExpandableMLP
from lightning_den.core.prox import add_drift_penalty_grad_, proximal_step_
from lightning_den.core.selection import dead_new_units, select_subnetwork, unit_drift, units_to_split
from lightning_den.core.surgery import Snapshot, add_units_, duplicate_units_, prune_units_, restore_units_, snapshot
from lightning_den.module import DENLightningModule, find_expandable_block

_TASK_STREAM_API = ("num_tasks", "set_task", "current_task")


class DENCallback(Callback):
    r"""Dynamically Expandable Networks for a :class:`~lightning_den.DENLightningModule`.

    Args:
        block: name of the :class:`~lightning_den.ExpandableMLP` to grow; found automatically when the
            module has exactly one.
        sparsity_l1: L1 strength :math:`\mu` (Eq. 2-5); the proximal threshold is ``lr * sparsity_l1``.
        group_sparsity: group-lasso strength :math:`\gamma` on new units' incoming weights (Eq. 5);
            threshold ``lr * group_sparsity``.
        drift_penalty: :math:`\lambda` of :math:`\lambda\|W - W^{t-1}\|_2^2` in selective retraining and
            after the split (Eq. 4, 6).
        loss_threshold: :math:`\tau`; the network expands when the mean training loss of the last
            selective-retraining epoch is above it.
        units_per_expansion: :math:`k`, units added to every hidden layer by an expansion.
        split_threshold: :math:`\sigma`; old units whose incoming weights moved farther (L2) are split.
        max_splits_per_layer: most units split per layer and task (most drifted first); ``None``: all.
        first_task_epochs: most epochs of the first task (sparse training, Eq. 2).
        head_fit_epochs: most epochs fitting a new task's head alone (Eq. 3).
        selective_epochs: most epochs of selective retraining (Eq. 4).
        expansion_epochs: most epochs training new units (Eq. 5).
        split_epochs: most epochs of retraining after the split (Eq. 6).
        convergence_tol: a phase ends early once its mean training loss improves by less than this
            fraction from one epoch to the next; ``0`` runs every phase for its full epochs.
        seed: seed of new units' initial weights (the same on every rank).

    The default strengths are the official code's at its Adam learning rate of 1e-3 (its thresholds
    were raw, ours are scaled by the learning rate); the paper gives none. Short task streams with few
    steps per phase need stronger ones (see ``lightning_den.demo``).

    Raises:
        MisconfigurationException: if an argument is out of range, or (at ``setup``) if the module,
            the datamodule, the strategy or the Trainer cannot run DEN; the message names the fix.

    Example::

        from lightning.pytorch import Trainer
        from lightning_den import DENCallback, DENMLP, SplitDigits

        datamodule = SplitDigits()
        model = DENMLP(in_features=64, hidden_sizes=[32, 32], num_classes=2)
        trainer = Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, callbacks=[DENCallback()])
        trainer.fit(model, datamodule=datamodule)   # trains all five tasks
        model(x, task=0)                            # task 0 as it stood after task 0
    """

    def __init__(
        self,
        block: str | None = None,
        sparsity_l1: float = 1e-2,
        group_sparsity: float = 1.0,
        drift_penalty: float = 0.25,
        loss_threshold: float = 0.01,
        units_per_expansion: int = 10,
        split_threshold: float = 0.05,
        max_splits_per_layer: int | None = None,
        first_task_epochs: int = 30,
        head_fit_epochs: int = 10,
        selective_epochs: int = 20,
        expansion_epochs: int = 20,
        split_epochs: int = 10,
        convergence_tol: float = 1e-3,
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("sparsity_l1", sparsity_l1),
            ("group_sparsity", group_sparsity),
            ("drift_penalty", drift_penalty),
            ("loss_threshold", loss_threshold),
            ("split_threshold", split_threshold),
            ("convergence_tol", convergence_tol),
        ):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise MisconfigurationException(f"`{name}` must be a finite number >= 0, got {value!r}")
        for name, value in (
            ("units_per_expansion", units_per_expansion),
            ("first_task_epochs", first_task_epochs),
            ("head_fit_epochs", head_fit_epochs),
            ("selective_epochs", selective_epochs),
            ("expansion_epochs", expansion_epochs),
            ("split_epochs", split_epochs),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MisconfigurationException(f"`{name}` must be a positive integer, got {value!r}")
        if max_splits_per_layer is not None and (not isinstance(max_splits_per_layer, int) or max_splits_per_layer < 0):
            raise MisconfigurationException(
                f"`max_splits_per_layer` must be None (no cap) or an integer >= 0, got {max_splits_per_layer!r}"
            )
        self.block = block
        self.sparsity_l1 = float(sparsity_l1)
        self.group_sparsity = float(group_sparsity)
        self.drift_penalty = float(drift_penalty)
        self.loss_threshold = float(loss_threshold)
        self.units_per_expansion = units_per_expansion
        self.split_threshold = float(split_threshold)
        self.max_splits_per_layer = max_splits_per_layer
        self.epochs = PhaseEpochs(
            sparse=first_task_epochs,
            head_fit=head_fit_epochs,
            selective=selective_epochs,
            expansion=expansion_epochs,
            split=split_epochs,
        )
        self.convergence_tol = float(convergence_tol)
        self.seed = seed

        self.progress = PhaseProgress()
        self._pending: tuple[PhaseProgress, dict[str, Any]] | None = None
        self._mlp: ExpandableMLP | None = None
        self._snapshot: Snapshot = {}
        self._frozen = FrozenEntries({})
        self._sparse_params: list[nn.Parameter] = []
        self._group_layers: list[ExpandableLinear] = []
        self._drift_pairs: list[tuple[nn.Parameter, Tensor]] = []
        self._step_hooks: list[Any] = []
        self._selection: list[list[int]] | None = None
        self._resumed = False
        self._loss_sum: Tensor | None = None
        self._loss_count = 0

    @property
    def phase(self) -> DENPhase:
        return DENPhase(self.progress.phase)

    @property
    def mlp(self) -> ExpandableMLP:
        if self._mlp is None:
            raise RuntimeError("DENCallback is not attached: call `trainer.fit` first")
        return self._mlp

    # ------------------------------------------------------------------ set-up and checks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that DEN can run here, find the block, enter the first phase (before optimizers exist)."""
        if stage != "fit":
            return
        if not isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy):
            raise MisconfigurationException(
                f"DENCallback supports single-device and DDP training, not {type(trainer.strategy).__name__}: "
                "DEN changes parameter shapes, which sharded strategies (FSDP, DeepSpeed) cannot follow."
            )
        averaging = [type(cb).__name__ for cb in trainer.callbacks if _copies_model(cb)]
        if averaging:
            raise MisconfigurationException(
                f"DENCallback cannot run beside {averaging}: they keep a copy of the model's parameters, "
                "which goes stale when DEN grows the network. Remove them from the Trainer's callbacks."
            )
        if not isinstance(pl_module, DENLightningModule):
            raise MisconfigurationException(
                f"DENCallback needs a DENLightningModule (it sets `current_task` at task boundaries), got "
                f"{type(pl_module).__name__}. Subclass `lightning_den.DENLightningModule` or use `DENMLP`."
            )
        self.block, self._mlp = find_expandable_block(pl_module, self.block)
        datamodule = trainer.datamodule
        missing = [name for name in _TASK_STREAM_API if not hasattr(datamodule, name)]
        if datamodule is None or missing:
            raise MisconfigurationException(
                "DENCallback needs a task-sequence datamodule with `num_tasks`, `current_task` and "
                f"`set_task(task)`; {'no datamodule was given' if datamodule is None else f'it lacks {missing}'}. "
                "Pass `trainer.fit(model, datamodule=TaskSequenceDataModule(...))`."
            )
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise MisconfigurationException(
                "DENCallback switches tasks between epochs, so the training dataloader must be rebuilt every "
                f"epoch: set `Trainer(reload_dataloaders_every_n_epochs=1)` (got "
                f"{trainer.reload_dataloaders_every_n_epochs})."
            )
        needed = self.epochs.total(datamodule.num_tasks)
        if trainer.max_epochs not in (-1, None) and trainer.max_epochs < needed:
            raise MisconfigurationException(
                f"`max_epochs={trainer.max_epochs}` may stop before the last task: {datamodule.num_tasks} tasks "
                f"can take up to {needed} epochs with these phase lengths. Set `Trainer(max_epochs=-1)`; "
                "DENCallback stops the fit when the last task is done."
            )
        if trainer.limit_train_batches == 0:
            raise MisconfigurationException(
                "`limit_train_batches=0` gives every task an empty training set, so DEN cannot move from task "
                "to task; remove it or give it a positive value."
            )
        if self.mlp.num_tasks != self.progress.task + 1:
            raise MisconfigurationException(
                f"the block {self.block!r} has heads for {self.mlp.num_tasks} tasks but DENCallback is at task "
                f"{self.progress.task}; start from a freshly built model"
            )
        self._check_labels(datamodule, self.progress.task)
        datamodule.set_task(self.progress.task)
        pl_module.current_task = self.progress.task
        self._enter_phase(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook the proximal steps onto the optimizers Lightning just built, and check them.

        When resuming, the saved phase is entered again on the rebuilt model and the training objects
        are rebuilt; Lightning restores the optimizer state into them right after this hook.
        """
        if self._resumed:
            self._resumed = False
            self._snapshot = {name: t.to(pl_module.device) for name, t in self._snapshot.items()}
            self._enter_phase(pl_module, self._selection)
            rebuild_training_objects(trainer)
        check_optimizers_cover(trainer, pl_module)
        self._hook_optimizers(trainer)
        rank_zero_info(f"DEN: task {self.progress.task}, phase {self.progress.phase}, widths {self.mlp.widths(0)}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    # ------------------------------------------------------------------ per step

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Cross the boundary decided at the end of the previous epoch (surgery + rebuild)."""
        if self._pending is not None:
            target, plan = self._pending
            self._pending = None
            cross_boundary(trainer, pl_module, lambda: self._apply(pl_module, target, plan))
            self._hook_optimizers(trainer)
        self._loss_sum = torch.zeros((), device=pl_module.device)
        self._loss_count = 0

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the gradient of the pull toward W^{t-1}, then zero the gradients of frozen entries."""
        if self._drift_pairs and self.drift_penalty > 0:
            pairs = [(p, ref) for p, ref in self._drift_pairs if p.grad is not None]
            if pairs:
                grads = [_leading(p.grad, ref) for p, ref in pairs]
                params = [_leading(p.detach(), ref) for p, ref in pairs]
                add_drift_penalty_grad_(grads, params, [ref for _, ref in pairs], self.drift_penalty)
        self._frozen.mask_gradients_()

    def _after_optimizer_step(
        self, targets: list[tuple[list[Tensor], list[Tensor], list[Tensor]]], optimizer: torch.optim.Optimizer, *_: Any
    ) -> None:
        """Proximal steps one after the other (L1, then group lasso), then restore frozen entries."""
        for group, (weights, rows, biases) in zip(optimizer.param_groups, targets, strict=True):
            lr = float(group["lr"])  # read at every step: schedulers and checkpoint restores change it
            proximal_step_(
                weights, rows, l1=lr * self.sparsity_l1, group=lr * self.group_sparsity, new_unit_biases=biases
            )
        self._frozen.restore_()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and self._loss_sum is not None:
            # Lightning hands over the loss divided by `accumulate_grad_batches`; undo that for tau
            self._loss_sum += loss.detach() * trainer.accumulate_grad_batches
            self._loss_count += 1

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Decide, on the epoch's mean loss (reduced over ranks), whether the phase ends and what follows."""
        mean_loss = self._epoch_mean_loss(trainer, pl_module)
        progress = replace(self.progress, epochs=self.progress.epochs + 1)
        pl_module.log("den/task", float(progress.task))
        pl_module.log("den/phase", float(self.phase.index))
        if not phase_is_done(progress, self.epochs, mean_loss, self.convergence_tol):
            self.progress = replace(progress, last_loss=mean_loss)
            return
        target = next_phase(progress, mean_loss, self.loss_threshold, trainer.datamodule.num_tasks)
        self.progress = replace(progress, last_loss=mean_loss)
        if target is None:
            trainer.should_stop = True
            cross_boundary(trainer, pl_module, lambda: self._boundary(self.progress, None, {}), rebuild=False)
            return
        if target.task != progress.task:
            self._check_labels(trainer.datamodule, target.task)  # before anything changes
        plan = trainer.strategy.broadcast(self._plan(target), src=0)
        if target.task != progress.task:
            trainer.datamodule.set_task(target.task)
        self._pending = (target, plan)

    def _check_labels(self, datamodule: Any, task: int) -> None:
        """Raise if ``task``'s labels do not fit the head the block will give it."""
        if not hasattr(datamodule, "num_classes"):
            return
        labels, outputs = datamodule.num_classes(task), self.mlp.classes_of(task)
        if labels > outputs:
            raise ValueError(
                f"task {task} has labels up to {labels - 1} but its head will have {outputs} outputs: build the "
                f"model with at least {labels} classes for task {task} (e.g. `num_classes={labels}`)"
            )

    def _epoch_mean_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        count = torch.tensor(float(self._loss_count), device=pl_module.device)
        total = torch.zeros((), device=pl_module.device) if self._loss_sum is None else self._loss_sum.clone()
        total = trainer.strategy.reduce(total, reduce_op="sum")
        count = trainer.strategy.reduce(count, reduce_op="sum")
        if float(count) == 0:
            raise ValueError(
                f"task {self.progress.task} produced no training batches in phase {self.progress.phase!r}: "
                "its training set is empty or `limit_train_batches` is 0. Give every task training data."
            )
        mean_loss = float(total) / float(count)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"the training loss of task {self.progress.task} became {mean_loss} in DEN phase "
                f"{self.progress.phase!r} (epoch {self.progress.epochs + 1} of the phase). Lower the learning "
                "rate or the regularisation strengths; the last checkpoint holds the last good state."
            )
        return mean_loss

    # ------------------------------------------------------------------ boundaries

    def _plan(self, target: PhaseProgress) -> dict[str, Any]:
        """The surgery for entering ``target``, as plain ints (broadcast from rank 0 before it is applied)."""
        mlp = self.mlp
        phase = DENPhase(target.phase)
        if phase is DENPhase.SELECTIVE:
            return {"selection": select_subnetwork(mlp, target.task)}
        if phase is DENPhase.EXPANSION:
            return {"added": [self.units_per_expansion] * len(mlp.hidden)}
        if phase is DENPhase.SPLIT:
            expanded = self.phase is DENPhase.EXPANSION
            pruned = [dead_new_units(mlp, i) for i in range(len(mlp.hidden))] if expanded else []
            split = [
                units_to_split(unit_drift(mlp, i, self._snapshot), self.split_threshold, self.max_splits_per_layer)
                for i in range(len(mlp.hidden))
            ]
            return {"pruned": pruned, "split": split}
        return {}

    def _apply(self, pl_module: pl.LightningModule, target: PhaseProgress, plan: dict[str, Any]) -> TaskBoundary:
        """Carry out ``plan`` and enter ``target``; returns the boundary for the listeners."""
        mlp = self.mlp
        previous = self.progress
        phase = DENPhase(target.phase)
        if target.task != previous.task:
            self._snapshot = snapshot(mlp)
            mlp.add_head_(self._generator(target.task, stream=0))
            pl_module.current_task = target.task
        if phase is DENPhase.EXPANSION:
            add_units_(mlp, plan["added"], self._generator(target.task, stream=1))
        for layer, units in enumerate(plan.get("pruned", [])):
            prune_units_(mlp, layer, units)
        for layer, units in enumerate(plan.get("split", [])):
            duplicate_units_(mlp, layer, units)
            restore_units_(mlp, layer, units, self._snapshot)
        self.progress = target
        self._enter_phase(pl_module, plan.get("selection"))
        return self._boundary(previous, target, plan)

    def _generator(self, task: int, stream: int) -> torch.Generator:
        """The same random numbers on every rank: seeded by ``seed``, the task and what they are for."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + task) * 7 + stream)

    def _boundary(self, previous: PhaseProgress, target: PhaseProgress | None, plan: dict[str, Any]) -> TaskBoundary:
        ended = previous.task if target is None or target.task != previous.task else None
        boundary = TaskBoundary(
            task=previous.task if target is None else target.task,
            phase=None if target is None else target.phase,
            previous_task=previous.task,
            previous_phase=previous.phase,
            ended_task=ended,
            widths=tuple(layer.out_features for layer in self.mlp.hidden),
            loss=previous.last_loss,
            changes=dict(plan),
        )
        step = "end of stream" if target is None else f"task {target.task}, phase {target.phase}"
        rank_zero_info(
            f"DEN: task {previous.task} {previous.phase} (loss {previous.last_loss:.4f}) -> {step}; "
            f"widths {list(boundary.widths)}"
        )
        return boundary

    def _enter_phase(self, pl_module: pl.LightningModule, selection: list[list[int]] | None = None) -> None:
        """Set which entries train in the current phase and which regularisers act on them."""
        mlp = self.mlp
        phase = self.phase
        entries = trainable_entries(mlp, phase, selection)
        self._selection = selection
        block_params = {id(p) for p in mlp.parameters()}
        for p in pl_module.parameters():  # parameters outside the block learn in the first task only
            if id(p) not in block_params:
                p.requires_grad_(self.progress.task == 0)
        masks: dict[nn.Parameter, Tensor] = {}
        for name, p in mlp.named_parameters():
            trainable = entries[name]
            p.requires_grad_(trainable is not False)
            if isinstance(trainable, Tensor):
                masks[p] = trainable
        self._frozen = FrozenEntries(masks)
        self._sparse_params = [p for name, p in mlp.named_parameters() if name.endswith("weight") and p.requires_grad]
        self._group_layers = []
        if phase is DENPhase.EXPANSION:  # group lasso on each new unit's weights and bias
            self._group_layers = [layer for layer in mlp.hidden if bool((layer.birth == self.progress.task).any())]
        self._drift_pairs = []
        if phase in (DENPhase.SELECTIVE, DENPhase.SPLIT):
            for index, layer in enumerate(mlp.hidden):
                for name in ("weight", "bias"):
                    self._drift_pairs.append((getattr(layer, name), self._snapshot[f"hidden.{index}.{name}"]))

    def _hook_optimizers(self, trainer: pl.Trainer) -> None:
        """Register the post-step work on each optimizer, with its tensors resolved once per phase."""
        for handle in self._step_hooks:
            handle.remove()
        sparse = {id(p) for p in self._sparse_params}
        new_units = {id(layer.weight): layer for layer in self._group_layers}
        self._step_hooks = []
        for optimizer in trainer.optimizers:
            targets = []
            for group in optimizer.param_groups:
                layers = [new_units[id(p)] for p in group["params"] if id(p) in new_units]
                first = [int(torch.nonzero(layer.birth == self.progress.task)[0]) for layer in layers]
                targets.append(
                    (
                        [p.data for p in group["params"] if id(p) in sparse],
                        [layer.weight.data[start:] for layer, start in zip(layers, first, strict=True)],
                        [layer.bias.data[start:] for layer, start in zip(layers, first, strict=True)],
                    )
                )
            hook = functools.partial(self._after_optimizer_step, targets)
            self._step_hooks.append(optimizer.register_step_post_hook(hook))

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        """Where the sequence stands, the surgery decided but not yet applied, W^{t-1} and the BFS selection.

        Plain ints, floats, lists and tensors, so ``torch.load(..., weights_only=True)`` reads it.
        """
        pending = None
        if self._pending is not None:
            target, plan = self._pending
            pending = {"target": target.state_dict(), "plan": plan}
        return {
            "format": 1,
            "progress": self.progress.state_dict(),
            "pending": pending,
            "snapshot": {name: tensor.detach().cpu() for name, tensor in self._snapshot.items()},
            "selection": self._selection,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the saved state; the phase is entered again in ``on_fit_start``, once the model is rebuilt."""
        self.progress = PhaseProgress(**state_dict["progress"])
        pending = state_dict.get("pending")
        self._pending = None if pending is None else (PhaseProgress(**pending["target"]), pending["plan"])
        self._snapshot = dict(state_dict.get("snapshot", {}))
        self._selection = state_dict.get("selection")
        self._resumed = True


def _leading(tensor: Tensor, reference: Tensor) -> Tensor:
    """The leading block of ``tensor`` with ``reference``'s shape (the entries that existed then)."""
    return tensor[tuple(slice(0, n) for n in reference.shape)]


def _copies_model(callback: Callback) -> bool:
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # Lightning < 2.6
        return isinstance(callback, StochasticWeightAveraging)
    return isinstance(callback, StochasticWeightAveraging | WeightAveraging)
