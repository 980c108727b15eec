"""DEN as a task method: the whole per-task pipeline of Yoon et al. (2018) over an :class:`ExpandableMLP`.

Task 0 trains sparsely; each later task fits its head, selects a subnetwork by BFS and retrains it, expands
if the loss stays high (pruning the new units left dead), then splits drifted units and retrains
(:mod:`~lightning_den.core.den.phases`). What each phase trains and what each regulariser touches is
:mod:`~lightning_den.core.den.entries`; the surgery is :mod:`~lightning_den.core.den.surgery` and
:mod:`~lightning_den.core.den.selection`. No Lightning here: ``DENCallback`` runs this in a fit, and a
unit test can step through it by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_den.core.checks import check_count, check_counts, check_flag, check_fraction, check_number, optional
from lightning_den.core.den.conv import ExpandableConv2d
from lightning_den.core.den.entries import (
    DriftTarget,
    ProximalTarget,
    drift_targets,
    parameter_entries,
    proximal_targets,
    separate_trained_entries_,
    trainable_entries,
)
from lightning_den.core.den.layers import ExpandableMLP
from lightning_den.core.den.phases import DENPhase, PhaseEpochs, next_phase, threshold_out_of_reach
from lightning_den.core.den.prox import add_drift_penalty_grad_
from lightning_den.core.den.selection import (
    dead_new_units,
    select_subnetwork,
    selection_report,
    unit_drift,
    units_to_split,
)
from lightning_den.core.den.surgery import (
    Snapshot,
    add_units_,
    duplicate_units_,
    prune_units_,
    restore_units_,
    snapshot,
)
from lightning_den.core.method import PhaseProgress, TaskMethod, Trainable, stepped_by


class DENMethod(TaskMethod):
    r"""Dynamically Expandable Networks over an :class:`ExpandableMLP` (arguments: see ``DENCallback``).

    Example:
        >>> mlp, den = ExpandableMLP(4, [3], head_classes=2), DENMethod(units_per_expansion=2)
        >>> progress = den.start()
        >>> target = den.following_phase(progress, 1.0, num_tasks=2)   # task 0 done: task 1 fits its head
        >>> den.apply(mlp, progress, target, den.plan(mlp, progress, target, 2)); mlp.num_tasks
        2
    """

    phases = DENPhase
    block_type = ExpandableMLP
    name = "DEN"
    arranged_phases: ClassVar[dict[str, int]] = {DENPhase.EXPANSION.value: 3, DENPhase.SELECTIVE.value: 4}

    def __init__(
        self,
        sparsity_l1: float = 1e-2,
        group_sparsity: float = 1.0,
        drift_penalty: float = 0.25,
        loss_threshold: float = 0.01,
        units_per_expansion: int | Sequence[int] = 10,
        split_threshold: float = 0.05,
        conv_split_threshold: float | None = None,
        max_splits_per_layer: int | None = None,
        selection_budget: float | None = None,
        subnetwork_only: bool = False,
        expansion: bool = True,
        split: bool = True,
        early_expansion: bool = False,
        first_task_epochs: int = 30,
        head_fit_epochs: int = 10,
        selective_epochs: int = 20,
        expansion_epochs: int = 20,
        split_epochs: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.sparsity_l1 = check_number("sparsity_l1", sparsity_l1)
        self.group_sparsity = check_number("group_sparsity", group_sparsity)
        self.drift_penalty = check_number("drift_penalty", drift_penalty)
        self.loss_threshold = check_number("loss_threshold", loss_threshold)
        self.split_threshold = check_number("split_threshold", split_threshold)
        self.conv_split_threshold = optional(
            check_number, "conv_split_threshold", conv_split_threshold, "split_threshold for every layer"
        )
        self.units_per_expansion = check_counts("units_per_expansion", units_per_expansion)
        self.max_splits_per_layer = optional(
            check_count, "max_splits_per_layer", max_splits_per_layer, "no cap", minimum=0
        )
        self.selection_budget = optional(
            check_fraction, "selection_budget", selection_budget, "select all that BFS reaches", include_one=True
        )
        self.subnetwork_only = check_flag("subnetwork_only", subnetwork_only)
        self.expansion = check_flag("expansion", expansion)
        self.split = check_flag("split", split)
        self.early_expansion = check_flag("early_expansion", early_expansion)
        given = dict(
            first_task_epochs=first_task_epochs,
            head_fit_epochs=head_fit_epochs,
            selective_epochs=selective_epochs,
            expansion_epochs=expansion_epochs,
            split_epochs=split_epochs,
        )
        self.epochs = PhaseEpochs(
            **{field: check_count(argument, given[argument]) for argument, field in PhaseEpochs.ARGUMENTS.items()}
        )
        self._snapshot: Snapshot = {}
        self._selection: list[list[int]] | None = None
        self._selected_fraction: list[float] | None = None
        # per phase (enter_phase): what the regularisers touch, and the proximal targets per param group
        self._proximal: dict[nn.Parameter, ProximalTarget] = {}
        self._drift: list[DriftTarget] = []
        self._step_groups: tuple[list[dict[str, Any]], list[tuple[dict[str, Any], list[ProximalTarget]]]] | None = None

    # ------------------------------------------------------------------ phases

    def phase_epochs(self, phase: DENPhase) -> int:
        return self.epochs.of(DENPhase(phase))

    def max_epochs(self, num_tasks: int) -> int:
        return self.epochs.total(num_tasks)

    def following_phase(self, progress: PhaseProgress, mean_loss: float, num_tasks: int) -> PhaseProgress | None:
        return next_phase(progress, mean_loss, self.loss_threshold, num_tasks, self.expansion, self.split)

    def phase_done(self, progress: PhaseProgress, mean_loss: float, tolerance: float) -> bool:
        """The phase's epochs are used or its loss levelled off, except that expansion always runs its epochs (the
        group lasso prunes on while the loss stays level, so an end on a level loss leaves the units a chance
        moment kept); with ``early_expansion`` selective retraining also ends once its loss cannot reach
        ``loss_threshold`` in the phase's epochs left (:func:`~lightning_den.core.den.phases.threshold_out_of_reach`).
        """
        phase = DENPhase(progress.phase)
        if phase is DENPhase.EXPANSION:
            tolerance = 0.0
        if super().phase_done(progress, mean_loss, tolerance):
            return True
        if not (self.early_expansion and self.expansion) or phase is not DENPhase.SELECTIVE:
            return False
        epochs_left = self.phase_epochs(DENPhase.SELECTIVE) - progress.epochs
        return threshold_out_of_reach(progress.last_loss, mean_loss, epochs_left, self.loss_threshold)

    # ------------------------------------------------------------------ surgery

    def plan(
        self, block: ExpandableMLP, progress: PhaseProgress, target: PhaseProgress, num_tasks: int
    ) -> dict[str, Any]:
        """BFS selection (with its report), expansion sizes, or dead and drifted units, as plain data."""
        phase = DENPhase(target.phase)
        if phase is DENPhase.SELECTIVE:
            selection = select_subnetwork(block, target.task, self.selection_budget)
            return {"selection": selection, **selection_report(block, target.task, selection)}
        if phase is DENPhase.EXPANSION:
            return {"added": self._units_added(block)}
        plan = self.end_plan(block, progress)  # leaving expansion, for the split or the next task: prune its dead
        if phase is DENPhase.SPLIT:
            drifts = [unit_drift(block, i, self._snapshot) for i in range(len(block.hidden))]
            plan["split"] = [
                units_to_split(drift, self._split_threshold(layer), self.max_splits_per_layer)
                for drift, layer in zip(drifts, block.hidden, strict=True)
            ]
            plan["split_units"] = [len(units) for units in plan["split"]]  # SPLIT_KEYS: reported beside the split
            plan["largest_drift"] = [float(drift.max()) if drift.numel() else 0.0 for drift in drifts]
        return plan

    def _split_threshold(self, layer: nn.Module) -> float:
        """Sigma of ``layer``: ``conv_split_threshold`` for a convolution when given, else ``split_threshold``."""
        if self.conv_split_threshold is not None and isinstance(layer, ExpandableConv2d):
            return self.conv_split_threshold
        return self.split_threshold

    def _units_added(self, block: ExpandableMLP) -> list[int]:
        """Units an expansion adds to each hidden layer."""
        if isinstance(self.units_per_expansion, int):
            return [self.units_per_expansion] * len(block.hidden)
        return list(self.units_per_expansion)

    def check_stream(self, block: ExpandableMLP, first_task: int, num_tasks: int) -> None:
        """A per-layer ``units_per_expansion`` needs one count per hidden layer of the block."""
        counts = self.units_per_expansion
        if not isinstance(counts, int) and len(counts) != len(block.hidden):
            raise ValueError(
                f"`units_per_expansion` gives {len(counts)} counts ({list(counts)}) but the block has "
                f"{len(block.hidden)} hidden layers: give one count per hidden layer, or one number for all"
            )

    def end_plan(self, block: ExpandableMLP, progress: PhaseProgress) -> dict[str, Any]:
        """The new units expansion left dead, when the phase ending is an expansion (no split follows)."""
        if DENPhase(progress.phase) is not DENPhase.EXPANSION:
            return {}
        return {"pruned": [dead_new_units(block, i) for i in range(len(block.hidden))]}

    def apply(self, block: ExpandableMLP, progress: PhaseProgress, target: PhaseProgress, plan: dict[str, Any]) -> None:
        """Pruning and split as planned; for a new task, snapshot W^{t-1} and add its head; expansion."""
        block.join_()  # surgery on the plain layout; arrange lays out the next phase
        self.apply_end(block, plan)
        for layer, units in enumerate(plan.get("split", [])):
            duplicate_units_(block, layer, units)
            restore_units_(block, layer, units, self._snapshot)
        if target.task != progress.task:  # after pruning: the snapshot is of the pruned network
            self._snapshot = snapshot(block)
            block.add_task_(self.generator(target.task, stream=0))
        if DENPhase(target.phase) is DENPhase.EXPANSION:
            add_units_(block, plan["added"], self.generator(target.task, stream=1))
        self._selection = plan.get("selection")
        self._selected_fraction = plan.get("selected_fraction")

    def apply_end(self, block: ExpandableMLP, plan: dict[str, Any]) -> None:
        """Prune the units the plan names (new units with all-zero inputs: the function is unchanged)."""
        for layer, units in enumerate(plan.get("pruned", [])):
            prune_units_(block, layer, units)

    # ------------------------------------------------------------------ what trains, and the regularisers

    def arrange(self, block: ExpandableMLP, progress: PhaseProgress | None) -> None:
        """In selective retraining, the selected subnetwork trains through compact copies of its weights
        (:meth:`ExpandableMLP.gather_`); in expansion, the trained entries of each hidden layer become
        Parameters of their own (:func:`~lightning_den.core.den.entries.separate_trained_entries_`); other
        phases use the plain layout."""
        block.join_()
        phase = None if progress is None else DENPhase(progress.phase)
        if phase is DENPhase.SELECTIVE:
            block.gather_(self._selection, alone=self.subnetwork_only)
        elif phase is DENPhase.EXPANSION:
            separate_trained_entries_(block, trainable_entries(block, phase))

    def trainable(self, block: ExpandableMLP, progress: PhaseProgress) -> dict[nn.Parameter, Trainable]:
        """The phase's entries of the block (:func:`~lightning_den.core.den.entries.trainable_entries`), per
        Parameter as the block is laid out (:meth:`arrange`)."""
        return parameter_entries(block, trainable_entries(block, DENPhase(progress.phase), self._selection))

    def enter_phase(
        self, block: ExpandableMLP, progress: PhaseProgress, trainable: dict[nn.Parameter, Trainable]
    ) -> None:
        """Move W^{t-1} to the block's device and resolve what the phase's regularisers touch.

        Called once the model is on its device, so a step then only takes views of fresh gradients
        (no value is read back from the device per step).
        """
        device = block.hidden[0].weight.device
        self._snapshot = {name: t.to(device) for name, t in self._snapshot.items()}
        phase = DENPhase(progress.phase)
        entries = {name: trainable[p] for name, p in block.named_parameters()}
        self._proximal = proximal_targets(block, entries, phase)
        self._drift = drift_targets(block, phase, self._snapshot) if self.drift_penalty > 0 else []
        self._step_groups = None

    def release(self) -> None:
        self._proximal, self._drift, self._step_groups = {}, [], None

    def before_step(self, model: nn.Module, block: ExpandableMLP, optimizer: torch.optim.Optimizer) -> None:
        """Add the gradient of the pull toward W^{t-1} (selective retraining and after the split) to the
        parameters ``optimizer`` steps."""
        if not self._drift:  # the phases without the pull
            return
        stepped = stepped_by(optimizer)
        terms = [term for term in self._drift if term.param.grad is not None and term.param in stepped]
        if terms:
            add_drift_penalty_grad_(
                [term.grad() for term in terms],
                [term.values for term in terms],
                [term.reference for term in terms],
                self.drift_penalty,
                scratch=[term.scratch for term in terms],
            )

    def after_step(self, block: ExpandableMLP, optimizer: torch.optim.Optimizer) -> None:
        """L1, then group lasso, on the trained entries (thresholds scaled by each param group's lr); then the
        layers' weights take the values of their separated Parameters (selective retraining, expansion)."""
        for group, targets in self._targets_by_group(block, optimizer):
            # read at every step (schedulers change it); a tensor lr (capturable Adam) would be read back here
            lr = float(group["lr"])
            for target in targets:
                target.step_(lr * self.sparsity_l1, lr * self.group_sparsity)
        block.sync_()  # the network's own weights follow what the step changed

    def _targets_by_group(
        self, block: ExpandableMLP, optimizer: torch.optim.Optimizer
    ) -> list[tuple[dict[str, Any], list[ProximalTarget]]]:
        """The proximal targets per param group of ``optimizer``, kept while its groups are the same objects
        (``load_state_dict`` replaces them, ``add_param_group`` adds one)."""
        cached = self._step_groups
        if cached is not None and cached[0] is optimizer.param_groups and len(cached[1]) == len(cached[0]):
            return cached[1]
        by_group = [
            (group, [self._proximal[p] for p in group["params"] if p in self._proximal])
            for group in optimizer.param_groups
        ]
        self._step_groups = (optimizer.param_groups, by_group)
        return by_group

    # ------------------------------------------------------------------ state and display

    def status(self, progress: PhaseProgress) -> dict[str, str]:
        """In selective retraining, the share of each hidden layer's units it trains."""
        if DENPhase(progress.phase) is DENPhase.SELECTIVE and self._selected_fraction:
            return {"selected": "/".join(f"{fraction:.2f}" for fraction in self._selected_fraction)}
        return {}

    def state_dict(self) -> dict[str, Any]:
        """W^{t-1} and the BFS selection of the current task."""
        return {
            "snapshot": {name: tensor.detach().cpu() for name, tensor in self._snapshot.items()},
            "selection": self._selection,
            "selected_fraction": self._selected_fraction,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._snapshot = dict(state.get("snapshot", {}))
        self._selection = state.get("selection")
        self._selected_fraction = state.get("selected_fraction")
