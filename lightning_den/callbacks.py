r"""
DEN callback
^^^^^^^^^^^^

Trains a whole task sequence in one ``trainer.fit`` with Dynamically Expandable Networks
(Yoon et al., ICLR 2018): sparse training of the first task, then per task selective retraining,
dynamic expansion and split/duplication, with timestamped inference for old tasks.

The phases are those of :mod:`lightning_den.core.den`, driven by the machinery shared with the
other methods (:class:`~lightning_den.sequence.TaskSequenceCallback`). DEN adds its regularisers
around each optimizer step: the pull toward the previous task's weights as a gradient term before
the step, the L1 and group-lasso proximal steps after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_den.boundary import TaskBoundary
from lightning_den.core.den import (
    DENPhase,
    PhaseEpochs,
    PhaseProgress,
    next_phase,
    trainable_entries,
)
from lightning_den.core.layers import ExpandableLinear, ExpandableMLP
from lightning_den.core.prox import add_drift_penalty_grad_, proximal_step_
from lightning_den.core.selection import (
    SELECTION_KEYS,
    dead_new_units,
    select_subnetwork,
    selection_report,
    unit_drift,
    units_to_split,
)
from lightning_den.core.surgery import Snapshot, add_units_, duplicate_units_, prune_units_, restore_units_, snapshot
from lightning_den.sequence import TaskSequenceCallback


class DENCallback(TaskSequenceCallback):
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
        selection_budget: most units of each hidden layer that selective retraining may select, as a
            fraction of the layer (the strongest-connected of those BFS reaches); ``None``: all BFS reaches,
            as in the paper. A deviation from the paper that keeps the selection a proper subset when
            L1 has not made the network sparse enough for the search to stop by itself.
        expansion: add units when the loss stays above ``loss_threshold`` (Alg. 3); ``False`` never does.
        split: split drifted units and retrain (Alg. 4); ``False`` ends each task after selective
            retraining or expansion. Both ``False``: the paper's DNN-Selective ablation.
        first_task_epochs: most epochs of the first task (sparse training, Eq. 2).
        head_fit_epochs: most epochs fitting a new task's head alone (Eq. 3).
        selective_epochs: most epochs of selective retraining (Eq. 4).
        expansion_epochs: most epochs training new units (Eq. 5).
        split_epochs: most epochs of retraining after the split (Eq. 6).
        convergence_tol: a phase ends early once its mean training loss changes by less than this
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
        selection_budget: float | None = None,
        expansion: bool = True,
        split: bool = True,
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
        if selection_budget is not None and (
            not isinstance(selection_budget, int | float)
            or isinstance(selection_budget, bool)
            or not 0 < selection_budget <= 1
        ):
            raise MisconfigurationException(
                f"`selection_budget` must be None (select all that BFS reaches) or a fraction in (0, 1], "
                f"got {selection_budget!r}"
            )
        self.selection_budget = None if selection_budget is None else float(selection_budget)
        for name, value in (("expansion", expansion), ("split", split)):
            if not isinstance(value, bool):
                raise MisconfigurationException(f"`{name}` must be True or False, got {value!r}")
        self.expansion = expansion
        self.split = split
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
        self._snapshot: Snapshot = {}
        self._selection: list[list[int]] | None = None
        self._selected_fraction: list[float] | None = None
        self._first_new_units: list[int] = []
        self._prox_plans: dict[torch.optim.Optimizer, tuple[list[dict[str, Any]], list[_ProxGroup]]] = {}
        self._drift_terms: list[_DriftTerm] | None = None
        super().__init__(block=block, convergence_tol=convergence_tol, seed=seed)

    block_type = ExpandableMLP
    method = "DEN"

    @property
    def phase(self) -> DENPhase:
        """The DEN phase being trained."""
        return DENPhase(self.progress.phase)

    @property
    def mlp(self) -> ExpandableMLP:
        return self.model_block

    def status(self) -> dict[str, Any]:
        """The phase, and in selective retraining the share of each hidden layer's units it trains."""
        shown = super().status()
        if self.phase is DENPhase.SELECTIVE and self._selected_fraction:
            shown["selected"] = "/".join(f"{fraction:.2f}" for fraction in self._selected_fraction)
        return shown

    def on_task_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, boundary: TaskBoundary) -> None:
        """Log what selective retraining selected (step: the task) to every logger of the Trainer."""
        if SELECTION_KEYS[0] not in boundary.changes:
            return
        changes = boundary.changes
        metrics = {f"selection/fraction/layer_{i}": f for i, f in enumerate(changes["selected_fraction"])}
        metrics["selection/inputs"] = changes["selected_inputs"]
        metrics.update({f"sparsity/zero_fraction/layer_{i}": z for i, z in enumerate(changes["zero_fraction"])})
        metrics["sparsity/zero_fraction/head"] = changes["head_zero_fraction"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=boundary.task)

    # ------------------------------------------------------------------ phases

    def first_phase(self) -> str:
        return DENPhase.SPARSE.value

    def phase_epochs(self, phase: str) -> int:
        return self.epochs.of(DENPhase(phase))

    def max_epochs(self, num_tasks: int) -> int:
        return self.epochs.total(num_tasks)

    def following_phase(self, progress: PhaseProgress, mean_loss: float, num_tasks: int) -> PhaseProgress | None:
        return next_phase(progress, mean_loss, self.loss_threshold, num_tasks, self.expansion, self.split)

    # ------------------------------------------------------------------ surgery

    def plan(self, target: PhaseProgress) -> dict[str, Any]:
        """BFS selection (with its report), expansion sizes, or dead and drifted units, as plain data."""
        mlp = self.mlp
        phase = DENPhase(target.phase)
        if phase is DENPhase.SELECTIVE:
            selection = select_subnetwork(mlp, target.task, self.selection_budget)
            return {"selection": selection, **selection_report(mlp, target.task, selection)}
        if phase is DENPhase.EXPANSION:
            return {"added": [self.units_per_expansion] * len(mlp.hidden)}
        plan = self.end_plan()  # leaving expansion, for the split or the next task: prune its dead units
        if phase is DENPhase.SPLIT:
            plan["split"] = [
                units_to_split(unit_drift(mlp, i, self._snapshot), self.split_threshold, self.max_splits_per_layer)
                for i in range(len(mlp.hidden))
            ]
        return plan

    def end_plan(self) -> dict[str, Any]:
        """The new units expansion left dead, when the phase ending is an expansion (no split follows)."""
        if self.phase is not DENPhase.EXPANSION:
            return {}
        return {"pruned": [dead_new_units(self.mlp, i) for i in range(len(self.mlp.hidden))]}

    def apply(self, pl_module: pl.LightningModule, target: PhaseProgress, plan: dict[str, Any]) -> None:
        """Pruning and split as planned; for a new task, snapshot W^{t-1} and add its head; expansion."""
        mlp = self.mlp
        self.apply_end(pl_module, plan)
        for layer, units in enumerate(plan.get("split", [])):
            duplicate_units_(mlp, layer, units)
            restore_units_(mlp, layer, units, self._snapshot)
        if target.task != self.progress.task:  # after pruning: the snapshot is of the pruned network
            self._snapshot = snapshot(mlp)
            mlp.add_head_(self.generator(target.task, stream=0))
        if DENPhase(target.phase) is DENPhase.EXPANSION:
            add_units_(mlp, plan["added"], self.generator(target.task, stream=1))
        self._selection = plan.get("selection")
        self._selected_fraction = plan.get("selected_fraction")

    def apply_end(self, pl_module: pl.LightningModule, plan: dict[str, Any]) -> None:
        """Prune the units the plan names (new units with all-zero inputs: the function is unchanged)."""
        for layer, units in enumerate(plan.get("pruned", [])):
            prune_units_(self.mlp, layer, units)

    def trainable(self, pl_module: pl.LightningModule) -> dict[nn.Parameter, bool | Tensor]:
        """The phase's entries of the block; parameters outside it learn in the first task only."""
        entries = trainable_entries(self.mlp, self.phase, self._selection)
        result = self.first_task_only(pl_module)
        result.update({p: entries[name] for name, p in self.mlp.named_parameters()})
        return result

    def on_phase_entered(self, pl_module: pl.LightningModule) -> None:
        """Move W^{t-1} to the model's device; forget the previous phase's step plans.

        What each step touches (L1 on every trained weight, group lasso on new units in expansion, the
        pull toward W^{t-1} in selective retraining and after the split) is resolved once per phase, at
        its first step, when the model is on its device; a step then only takes views of the fresh
        gradients.
        """
        mlp = self.mlp
        device = mlp.hidden[0].weight.device
        self._snapshot = {name: t.to(device) for name, t in self._snapshot.items()}
        # units past the previous task's prefix were born in this one (group lasso acts on them)
        self._first_new_units = list(mlp.widths(self.progress.task - 1)) if self.phase is DENPhase.EXPANSION else []
        self._prox_plans = {}
        self._drift_terms = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Drop the step plans: they hold the finished fit's optimizer and its state."""
        self._prox_plans = {}
        self._drift_terms = None
        super().teardown(trainer, pl_module, stage)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the gradient of the pull toward W^{t-1}, then zero the gradients of frozen entries."""
        if self.drift_penalty > 0:
            terms = [term for term in self._drift() if term.param.grad is not None]
            if terms:
                add_drift_penalty_grad_(
                    [term.param.grad if term.leading is None else term.param.grad[term.leading] for term in terms],
                    [term.values for term in terms],
                    [term.reference for term in terms],
                    self.drift_penalty,
                    scratch=[term.scratch for term in terms],
                )
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Proximal steps one after the other (L1, then group lasso), thresholds scaled by the group's lr."""
        for prox in self._prox_plan(optimizer):
            # read at every step (schedulers change it); a tensor lr (capturable Adam) would be read back here
            lr = float(prox.group["lr"])
            proximal_step_(
                prox.weights,
                prox.new_unit_rows,
                l1=lr * self.sparsity_l1,
                group=lr * self.group_sparsity,
                new_unit_biases=prox.new_unit_biases,
            )

    def _prox_plan(self, optimizer: torch.optim.Optimizer) -> list[_ProxGroup]:
        """Per param group of ``optimizer``: the trained weights, and in expansion the new units' rows.

        Built at the phase's first step and kept while the optimizer's groups are the same objects
        (``load_state_dict`` replaces them, ``add_param_group`` adds one).
        """
        cached = self._prox_plans.get(optimizer)
        if cached is not None and cached[0] is optimizer.param_groups and len(cached[1]) == len(cached[0]):
            return cached[1]
        mlp = self.mlp
        sparse = {id(p) for name, p in mlp.named_parameters() if name.endswith("weight") and p.requires_grad}
        new_units: dict[int, tuple[int, ExpandableLinear]] = {}
        trained_blocks: dict[int, list[Tensor]] = {}  # in expansion, L1 only where entries train
        below: int | None = None  # first new unit of the layer below (the input never grows)
        for layer, first in zip(mlp.hidden, self._first_new_units, strict=False):  # empty outside expansion
            weight = layer.weight.detach()
            # the new units' rows, and the old units' inputs from the new units below (the rest is frozen)
            blocks = [weight[first:]] + ([weight[:first, below:]] if below is not None else [])
            trained_blocks[id(layer.weight)] = [block for block in blocks if block.numel()]
            if first < layer.out_features:
                new_units[id(layer.weight)] = (first, layer)
            below = first
        plan = []
        for group in optimizer.param_groups:
            new = [new_units[id(p)] for p in group["params"] if id(p) in new_units]
            plan.append(
                _ProxGroup(
                    group=group,
                    weights=[
                        tensor
                        for p in group["params"]
                        if id(p) in sparse
                        for tensor in trained_blocks.get(id(p), [p.detach()])
                    ],
                    new_unit_rows=[layer.weight.detach()[first:] for first, layer in new],
                    new_unit_biases=[layer.bias.detach()[first:] for first, layer in new],
                )
            )
        self._prox_plans[optimizer] = (optimizer.param_groups, plan)
        return plan

    def _drift(self) -> list[_DriftTerm]:
        """The hidden parameters pulled toward W^{t-1} in this phase, each with its leading block."""
        if self._drift_terms is None:
            self._drift_terms = []
            if self.phase in (DENPhase.SELECTIVE, DENPhase.SPLIT):
                for index, layer in enumerate(self.mlp.hidden):
                    for name in ("weight", "bias"):
                        param, reference = getattr(layer, name), self._snapshot[f"hidden.{index}.{name}"]
                        # the entries that existed then; None when that is the whole parameter
                        leading = None if param.shape == reference.shape else tuple(map(slice, reference.shape))
                        values = param.detach() if leading is None else param.detach()[leading]
                        scratch = torch.empty_like(values)
                        self._drift_terms.append(_DriftTerm(param, leading, values, reference, scratch))
        return self._drift_terms

    # ------------------------------------------------------------------ state

    def extra_state(self) -> dict[str, Any]:
        """W^{t-1} and the BFS selection of the current task."""
        return {
            "snapshot": {name: tensor.detach().cpu() for name, tensor in self._snapshot.items()},
            "selection": self._selection,
            "selected_fraction": self._selected_fraction,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._snapshot = dict(state.get("snapshot", {}))
        self._selection = state.get("selection")
        self._selected_fraction = state.get("selected_fraction")


@dataclass(frozen=True)
class _ProxGroup:
    """What the proximal steps touch in one param group (its ``lr`` is read from ``group`` at each step)."""

    group: dict[str, Any]
    weights: list[Tensor]
    new_unit_rows: list[Tensor]
    new_unit_biases: list[Tensor]


@dataclass(frozen=True)
class _DriftTerm:
    """A parameter pulled toward W^{t-1}: its leading block (the entries W^{t-1} had; ``None`` when that
    is all of it), the block's values, its reference, and room for their difference."""

    param: nn.Parameter
    leading: tuple[slice, ...] | None
    values: Tensor
    reference: Tensor
    scratch: Tensor
