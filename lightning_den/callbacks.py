r"""
DEN callback
^^^^^^^^^^^^

Trains a whole task sequence in one ``trainer.fit`` with Dynamically Expandable Networks
(Yoon et al., ICLR 2018): sparse training of the first task, then per task selective retraining,
dynamic expansion and split/duplication, with timestamped inference for old tasks.

:class:`DENCallback` pairs the algorithm, :class:`~lightning_den.core.den.method.DENMethod` (pure torch:
phases, surgery, trainable entries, regularisers), with the Lightning driver
(:class:`~lightning_den.driver.TaskSequenceCallback`), and logs what selective retraining selected.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl

from lightning_den.boundary import TaskBoundary
from lightning_den.core.den import DENMethod
from lightning_den.core.den.selection import SELECTION_KEYS, SPLIT_KEYS
from lightning_den.driver import TaskSequenceCallback, configured


class DENCallback(TaskSequenceCallback):
    r"""Dynamically Expandable Networks for a :class:`~lightning_den.DENLightningModule`.

    Args:
        block: name of the :class:`~lightning_den.ExpandableMLP` to grow, or of the ``nn.Sequential`` of
            Linear layers to convert into one; found automatically when the module has exactly one. A list of
            names grows each block with its own selection, expansion and split, in the same phases.
        sparsity_l1: L1 strength :math:`\mu` (Eq. 2-5); the proximal threshold is ``lr * sparsity_l1``.
        group_sparsity: group-lasso strength :math:`\gamma` on new units' incoming weights (Eq. 5);
            threshold ``lr * group_sparsity``.
        drift_penalty: :math:`\lambda` of :math:`\lambda\|W - W^{t-1}\|_2^2` in selective retraining and
            after the split (Eq. 4, 6).
        loss_threshold: :math:`\tau`; the network expands when the mean training loss of the last
            selective-retraining epoch is above it.
        units_per_expansion: :math:`k`, units added to every hidden layer by an expansion, or one count per
            hidden layer (``[40, 0]`` grows only the first).
        split_threshold: :math:`\sigma`; old units whose incoming weights moved farther (L2) are split.
        conv_split_threshold: :math:`\sigma_c` for the filters of convolutional layers (the paper: 0.02 against
            0.002 for fully connected ones); ``None``: ``split_threshold`` for every layer.
        max_splits_per_layer: most units split per layer and task (most drifted first); ``None``: all.
        selection_budget: most units of each hidden layer that selective retraining may select, as a
            fraction of the layer (the strongest-connected of those BFS reaches); ``None``: all BFS reaches,
            as in the paper. A deviation from the paper that keeps the selection a proper subset when
            L1 has not made the network sparse enough for the search to stop by itself.
        subnetwork_only: selective retraining computes the selected subnetwork alone, as the official code did,
            even where a ``selection_budget`` left units outside it that feed it: those then take no part in the
            loss (they do again afterwards), and a step costs about what the subnetwork's share of the weights
            does. ``False`` (the paper's Eq. 4): they take part, frozen, so the forward costs a full one and only
            the weight gradients and the optimizer follow the selection. Where BFS stops by itself both are
            the same, and the subnetwork computes alone.
        expansion: add units when the loss stays above ``loss_threshold`` (Alg. 3); ``False`` never does.
        split: split drifted units and retrain (Alg. 4); ``False`` ends each task after selective
            retraining or expansion. Both ``False``: the paper's DNN-Selective ablation.
        early_expansion: end selective retraining as soon as its mean training loss, falling at its latest
            epoch's rate through the phase's epochs left, would still end above ``loss_threshold``: the network
            then expands without those epochs. Loss curves flatten as they fall, so the projection is mostly
            optimistic, but one epoch whose loss did not fall ends the phase; the earliest end is after the
            second epoch (the first with a rate), so ``selective_epochs`` below 3 leave nothing to cut, and
            ``loss_threshold=0`` always ends it there. Old units then drift less before the split. A deviation
            from the paper, which trains each phase to convergence; ``False`` (default) runs selective
            retraining for its full epochs (or until ``convergence_tol``).
        first_task_epochs: most epochs of the first task (sparse training, Eq. 2).
        head_fit_epochs: most epochs fitting a new task's head alone (Eq. 3).
        selective_epochs: most epochs of selective retraining (Eq. 4).
        expansion_epochs: epochs training new units (Eq. 5); expansion always runs all of them.
        split_epochs: most epochs of retraining after the split (Eq. 6).
        convergence_tol: a phase ends early once its mean training loss changes by less than this
            fraction from one epoch to the next; ``0`` runs every phase for its full epochs. Expansion
            always runs its full epochs: its group lasso prunes on while the loss stays level.
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
        block: str | list[str] | None = None,
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
        convergence_tol: float = 1e-3,
        seed: int = 0,
    ) -> None:
        method = configured(
            DENMethod,
            sparsity_l1=sparsity_l1,
            group_sparsity=group_sparsity,
            drift_penalty=drift_penalty,
            loss_threshold=loss_threshold,
            units_per_expansion=units_per_expansion,
            split_threshold=split_threshold,
            conv_split_threshold=conv_split_threshold,
            max_splits_per_layer=max_splits_per_layer,
            selection_budget=selection_budget,
            subnetwork_only=subnetwork_only,
            expansion=expansion,
            split=split,
            early_expansion=early_expansion,
            first_task_epochs=first_task_epochs,
            head_fit_epochs=head_fit_epochs,
            selective_epochs=selective_epochs,
            expansion_epochs=expansion_epochs,
            split_epochs=split_epochs,
            seed=seed,
        )
        super().__init__(method, block=block, convergence_tol=convergence_tol)

    def on_task_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, boundary: TaskBoundary) -> None:
        """Log what selective retraining selected and what the split duplicated (step: the task) to every logger
        of the Trainer; with several blocks, each block's metrics are named after it
        (``selection/<block>/fraction/layer_0``)."""
        several = len(boundary.changes_by_block) > 1
        metrics = {}
        for name, changes in boundary.changes_by_block.items():
            block = f"{name}/" if several else ""
            if SPLIT_KEYS[0] in changes:
                for key, metric in zip(SPLIT_KEYS, ("units", "largest_drift"), strict=True):
                    metrics.update({f"split/{block}{metric}/layer_{i}": v for i, v in enumerate(changes[key])})
            if SELECTION_KEYS[0] not in changes:
                continue
            metrics.update(
                {f"selection/{block}fraction/layer_{i}": f for i, f in enumerate(changes["selected_fraction"])}
            )
            metrics[f"selection/{block}inputs"] = changes["selected_inputs"]
            metrics.update(
                {f"sparsity/{block}zero_fraction/layer_{i}": z for i, z in enumerate(changes["zero_fraction"])}
            )
            metrics[f"sparsity/{block}zero_fraction/head"] = changes["head_zero_fraction"]
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=boundary.task)
