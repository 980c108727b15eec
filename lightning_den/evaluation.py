"""Evaluation of a task sequence at task boundaries: the matrix ``R[i][j]``, summaries, capacity, report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc, multiclass_accuracy

from lightning_den.boundary import TaskBoundary
from lightning_den.metrics import functional as M
from lightning_den.module import continual_blocks
from lightning_den.report import format_report, plot_report


@torch.no_grad()
def task_scores(
    pl_module: pl.LightningModule, loader: DataLoader, task: int, classes: int
) -> tuple[float, float | None]:
    """Accuracy of ``pl_module(x, task=task)`` over ``loader`` and, for a binary task, its AUROC.

    Old tasks run through timestamped inference. AUROC ranks the softmax probability of class 1.
    """
    was_training = pl_module.training
    pl_module.eval()
    logits, labels = [], []
    for inputs, targets in loader:
        logits.append(pl_module(inputs.to(pl_module.device), task=task).float().cpu())
        labels.append(targets)
    pl_module.train(was_training)
    scores, target = torch.cat(logits), torch.cat(labels)
    accuracy = float(multiclass_accuracy(scores, target, num_classes=classes, average="micro"))
    if classes != 2:
        return accuracy, None
    auroc = float(binary_auroc(scores.double().softmax(dim=-1)[:, 1], target))  # float64: no 1.0000001
    return accuracy, auroc


class TaskEvaluation(Callback):
    """After each task ``i``: accuracy (and AUROC for binary tasks) on every task ``j <= i``; at the end,
    the continual-learning summary, capacity, ``continual_metrics.json``, a printed table and PNG plots.

    A listener of :class:`~lightning_den.TaskBoundary`. It evaluates each task on the datamodule's
    ``task_dataloader(j, split)``, logs ``continual/acc/task_{j}`` (and ``continual/auroc/task_{j}``)
    with the task index as step to every logger of the Trainer, and writes its files into the
    Trainer's log directory (or ``output_dir``). Formulas: :mod:`lightning_den.metrics.functional`.

    Args:
        split: which split of each task to evaluate (``"test"`` or ``"val"``).
        block: name of the block whose widths and parameters to record (found automatically if there is one).
        reference_scores: score of a same-width network trained on each task alone, for forward transfer.
        output_dir: where to write the JSON and the plots; the Trainer's log directory if ``None``.
        plots: write the PNG plots at the end.
        print_report: print the table at the end (rank zero).

    Attributes:
        accuracy: ``accuracy[i][j]``, accuracy on task ``j`` after training task ``i``.
        auroc: the same for AUROC (``None`` for tasks that are not binary).
        widths: ``widths[i]``, units per hidden layer used by task ``i``.
        parameters: ``parameters[i]``, parameters the network held when task ``i`` ended.
        summary: the dict written to ``continual_metrics.json`` (after the last task).

    Example::

        evaluation = TaskEvaluation()
        trainer = Trainer(..., callbacks=[DENCallback(), evaluation])
        trainer.fit(model, datamodule=datamodule)
        evaluation.summary["summary"]["average_accuracy"]
    """

    def __init__(
        self,
        split: str = "test",
        block: str | None = None,
        reference_scores: Sequence[float] | None = None,
        output_dir: str | None = None,
        plots: bool = True,
        print_report: bool = True,
    ) -> None:
        if split not in ("test", "val"):
            raise ValueError(f"`split` must be 'test' or 'val', got {split!r}")
        self.split = split
        self.block = block
        self.reference_scores = list(reference_scores) if reference_scores is not None else None
        self.output_dir = output_dir
        self.plots = plots
        self.print_report = print_report
        self.accuracy: list[list[float]] = []
        self.auroc: list[list[float | None]] = []
        self.widths: list[tuple[int, ...]] = []
        self.parameters: list[int] = []
        self.summary: dict[str, Any] = {}

    def on_task_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, boundary: TaskBoundary) -> None:
        """Evaluate every task seen so far when ``boundary`` ends a task; report after the last one."""
        if boundary.ended_task is None:
            return
        ended = boundary.ended_task
        datamodule = trainer.datamodule
        row = [
            task_scores(pl_module, datamodule.task_dataloader(j, self.split), j, datamodule.num_classes(j))
            for j in range(ended + 1)
        ]
        self.accuracy.append([accuracy for accuracy, _ in row])
        self.auroc.append([auroc for _, auroc in row])
        mlp = self._block(pl_module)
        self.widths.append(mlp.widths(ended))
        self.parameters.append(mlp.num_parameters_through(ended))
        metrics = {f"continual/acc/task_{j}": accuracy for j, (accuracy, _) in enumerate(row)}
        metrics.update({f"continual/auroc/task_{j}": auroc for j, (_, auroc) in enumerate(row) if auroc is not None})
        metrics["continual/parameters"] = float(self.parameters[-1])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=ended)
        if boundary.finished:
            self._finish(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The rows measured so far, so that a resumed run reports the whole sequence."""
        return {
            "accuracy": self.accuracy,
            "auroc": self.auroc,
            "widths": [list(w) for w in self.widths],
            "parameters": self.parameters,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accuracy = [list(row) for row in state_dict["accuracy"]]
        self.auroc = [list(row) for row in state_dict["auroc"]]
        self.widths = [tuple(w) for w in state_dict["widths"]]
        self.parameters = list(state_dict["parameters"])

    def _block(self, pl_module: pl.LightningModule) -> Any:
        blocks = continual_blocks(pl_module)
        if self.block is not None:
            if self.block not in blocks:
                raise MisconfigurationException(
                    f"`block={self.block!r}` is not a block of the module; its blocks are {sorted(blocks)}"
                )
            return blocks[self.block]
        if len(blocks) != 1:
            raise MisconfigurationException(
                f"TaskEvaluation found {len(blocks)} blocks {sorted(blocks)}; name the one to report with `block=...`"
            )
        return next(iter(blocks.values()))

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mlp = self._block(pl_module)
        self.summary = self.summarise(mlp, trainer.datamodule)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"continual/{k}": v for k, v in self.summary["summary"].items()}, step=len(self.accuracy) - 1
            )
        if not trainer.is_global_zero:
            return
        directory = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "continual_metrics.json").write_text(json.dumps(self.summary, indent=2))
        if self.plots:
            plot_report(self.summary, directory)
        if self.print_report:
            rank_zero_info(format_report(self.summary))

    def summarise(self, mlp: Any, datamodule: Any) -> dict[str, Any]:
        """The plain-data summary of the run so far (what ``continual_metrics.json`` holds)."""
        tasks = len(self.accuracy)
        summary: dict[str, float] = {
            "average_accuracy": M.average_score(self.accuracy),
            "backward_transfer": M.backward_transfer(self.accuracy),
            "forgetting": M.forgetting(self.accuracy),
        }
        binary = [all(v is not None for v in row) for row in self.auroc]
        auroc = self.auroc if all(binary) else None
        if auroc is not None:
            summary["average_auroc"] = M.average_score(auroc)
            summary["backward_transfer_auroc"] = M.backward_transfer(auroc)
            summary["forgetting_auroc"] = M.forgetting(auroc)
        if self.reference_scores is not None:
            summary["forward_transfer"] = M.forward_transfer(self.accuracy, self.reference_scores[:tasks])
        births = mlp.births()
        return {
            "tasks": tasks,
            "accuracy": self.accuracy,
            "auroc": auroc,
            "summary": summary,
            "capacity": M.capacity(
                mlp.in_features,
                list(self.widths[0]),
                [datamodule.num_classes(t) for t in range(tasks)],
                self.parameters[-1],
            ),
            "widths": [list(w) for w in self.widths],
            "widths_by_birth": [[[b.count(born) for born in range(i + 1)] for b in births] for i in range(tasks)],
            "parameters_after_task": self.parameters,
            "parameters_per_task": [mlp.num_parameters(t) for t in range(tasks)],
        }
