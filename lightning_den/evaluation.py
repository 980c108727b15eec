"""Evaluation of a task sequence at task boundaries: the matrix ``R[i][j]``, summaries, capacity, report."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from lightning_den.boundary import TaskBoundary
from lightning_den.core.den.layers import ExpandableMLP
from lightning_den.core.den.selection import SELECTION_KEYS, SPLIT_KEYS
from lightning_den.core.routing import task as route_to
from lightning_den.core.routing import task_blocks
from lightning_den.metrics import functional as M
from lightning_den.report import format_report, plot_report


@torch.no_grad()
def task_scores(
    pl_module: pl.LightningModule, loader: DataLoader, task: int, *, precision: Precision | None = None
) -> tuple[float, float | None]:
    """Accuracy of ``task``'s outputs over ``loader`` and, when the task's head has two outputs, AUROC.

    The classes are the head's outputs (the width of the logits), whatever labels the data hold:
    accuracy is the share of samples whose largest logit is their label. AUROC ranks the softmax
    probability of class 1; it is NaN, with a warning, when the data hold a single class (it is
    undefined then). Old tasks run through timestamped inference.

    Args:
        pl_module: the model, called as ``pl_module(inputs)`` with its blocks routed to ``task``
            (:func:`lightning_den.task`), so a plain module's ``forward(x)`` works as well.
        loader: ``(inputs, labels)`` batches of the task.
        task: the task whose head to evaluate.
        precision: the Trainer's precision plugin (``trainer.precision_plugin``): inputs are converted
            and the forward pass runs in its context, so a ``"bf16-true"`` model gets bf16 inputs.
            ``None``: the inputs as they are (float32).

    Raises:
        ValueError: ``loader`` is empty, or a label is not an output of the head.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_den import DENMLP
        >>> model = DENMLP(in_features=4, hidden_sizes=[3], num_classes=2)
        >>> data = TensorDataset(torch.randn(8, 4), torch.tensor([0, 1] * 4))
        >>> accuracy, auroc = task_scores(model, DataLoader(data, batch_size=4), task=0)
        >>> 0.0 <= accuracy <= 1.0 and 0.0 <= auroc <= 1.0
        True
    """
    plugin = precision if precision is not None else Precision()
    was_training = pl_module.training
    pl_module.eval()
    logits, labels = [], []
    try:
        with route_to(pl_module, task):
            for inputs, targets in loader:
                inputs = plugin.convert_input(inputs.to(pl_module.device))
                with plugin.forward_context():
                    logits.append(pl_module(inputs).float().cpu())
                labels.append(targets.cpu())
    finally:
        pl_module.train(was_training)
    if not logits:
        raise ValueError(f"the evaluation data of task {task} are empty: give every task some samples to evaluate")
    scores, target = torch.cat(logits), torch.cat(labels)
    outputs = scores.shape[-1]
    if int(target.min()) < 0 or int(target.max()) >= outputs:
        bad = int(target.max()) if int(target.max()) >= outputs else int(target.min())
        raise ValueError(
            f"task {task} has the label {bad} but its head has {outputs} outputs (labels 0..{outputs - 1}): "
            "build the model with enough classes for every task"
        )
    accuracy = float((scores.argmax(dim=-1) == target).double().mean())
    if outputs != 2:
        return accuracy, None
    if target.unique().numel() < 2:
        rank_zero_warn(
            f"the AUROC of task {task} is undefined: its evaluation data hold only the label {int(target[0])} "
            f"({target.numel()} samples). It is reported as NaN (null in continual_metrics.json) and left out "
            "of the AUROC averages."
        )
        return accuracy, float("nan")
    auroc = float(binary_auroc(scores.double().softmax(dim=-1)[:, 1], target))  # float64: no 1.0000001
    return accuracy, auroc


class TaskEvaluation(Callback):
    """After each task ``i``: accuracy (and AUROC for binary tasks) on every task ``j <= i``; at the end,
    the continual-learning summary, capacity, ``continual_metrics.json``, a printed table and PNG plots.

    A listener of :class:`~lightning_den.TaskBoundary`. It evaluates each task on the datamodule's
    ``task_dataloader(j, split)``, logs ``continual/acc/task_{j}`` (and ``continual/auroc/task_{j}``)
    with the task index as step to every logger of the Trainer, and writes its files into the
    Trainer's log directory (or ``output_dir``). Formulas: :mod:`lightning_den.metrics.functional`.

    A fit that ends before the last task (``EarlyStopping``, ``max_steps``, ``max_time``, an exception
    or Ctrl+C) still gets its summary, of the tasks that ended, marked ``"complete": false``. A fit that
    continues a sequence whose earlier tasks were trained in another run starts at a later row: the rows
    before it are ``None`` (not measured here) and the summaries skip them.

    Args:
        split: which split of each task to evaluate (``"test"`` or ``"val"``).
        block: name of the block whose widths and parameters to record (found automatically if there is one).
        reference_scores: score of a same-width network trained on each task alone, for forward transfer.
        output_dir: where to write the JSON and the plots; the Trainer's log directory if ``None``.
        plots: write the PNG plots at the end.
        print_report: print the table at the end (rank zero).

    Attributes:
        accuracy: ``accuracy[i][j]``, accuracy on task ``j`` after training task ``i`` (``None``: not
            measured in this run).
        auroc: the same for AUROC (``None`` for tasks that are not binary, NaN where it is undefined).
        widths: ``widths[i]``, units per hidden layer used by task ``i`` (``None``: not measured).
        parameters: ``parameters[i]``, parameters the network held when task ``i`` ended (``None``: not measured).
        selection: per task, what its selective retraining selected (DEN): ``selected_fraction`` of each
            hidden layer's units, ``selected_inputs``, ``zero_fraction`` of each hidden layer's weights and
            ``head_zero_fraction`` of the new head's, when the selection was made.
        splits: per task, what its split did (DEN): ``split_units`` duplicated in each hidden layer and the
            ``largest_drift`` of a unit in each (the split duplicates units whose drift exceeds the threshold).
        phase_epochs: per task, the epochs each of its phases trained (in this run), in phase order.
        summary: the dict written to ``continual_metrics.json`` (after the last task, or when the fit
            ends early); undefined numbers are ``None`` in it, as in the file.

    Example::

        evaluation = TaskEvaluation()
        trainer = Trainer(..., callbacks=[DENCallback(), evaluation])
        trainer.fit(model, datamodule=datamodule)
        evaluation.summary["summary"]["average_accuracy"]
        evaluation.summary["summary"]["average_auroc_tasks"]  # how many tasks that average covers
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
        self.accuracy: list[list[float | None]] = []
        self.auroc: list[list[float | None]] = []
        self.widths: list[tuple[int, ...] | None] = []
        self.parameters: list[int | None] = []
        self.summary: dict[str, Any] = {}
        self.selection: dict[int, dict[str, Any]] = {}
        self.splits: dict[int, dict[str, list]] = {}
        self.phase_epochs: dict[int, dict[str, int]] = {}
        self._directory: Path | None = None
        self._fitting = False
        self._trained = False  # whether this fit reached its training (a fit refused before it reports nothing)
        self._stream_ended = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the output directory on every rank (``trainer.log_dir`` broadcasts from rank 0)."""
        if stage != "fit":
            return
        self._directory = None
        self._output_directory(trainer)
        self._fitting, self._trained = True, False
        self._stream_ended = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the block to report on before training (the callbacks converted the model at ``setup``)."""
        self._block_name(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """From here on, a fit that stops early or raises is reported."""
        self._trained = True

    def on_task_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, boundary: TaskBoundary) -> None:
        """Evaluate every task seen so far when ``boundary`` ends a task; report after the last one.

        A boundary whose surgery selected a subnetwork (DEN's selective retraining) is recorded too.
        """
        if boundary.epochs:
            self.phase_epochs.setdefault(boundary.previous_task, {})[str(boundary.previous_phase)] = boundary.epochs
        if boundary.changes_by_block:
            changes = boundary.changes_by_block.get(self._block_name(pl_module), {})
        else:  # a boundary announced by hand, without blocks
            changes = boundary.changes
        if SELECTION_KEYS[0] in changes:
            self.selection[boundary.task] = {key: changes[key] for key in SELECTION_KEYS}
        if SPLIT_KEYS[0] in changes:
            self.splits[boundary.task] = {key: changes[key] for key in SPLIT_KEYS}
        if boundary.ended_task is None:
            return
        ended = boundary.ended_task
        datamodule = trainer.datamodule
        row = [
            task_scores(pl_module, datamodule.task_dataloader(j, self.split), j, precision=trainer.precision_plugin)
            for j in range(ended + 1)
        ]
        self._make_room(ended)
        self.accuracy.append([accuracy for accuracy, _ in row])
        self.auroc.append([auroc for _, auroc in row])
        mlp = self._block(pl_module)
        self.widths.append(tuple(mlp.widths(ended)))
        self.parameters.append(mlp.num_parameters_through(ended))
        metrics = {f"continual/acc/task_{j}": accuracy for j, (accuracy, _) in enumerate(row)}
        metrics.update({f"continual/auroc/task_{j}": auroc for j, (_, auroc) in enumerate(row) if _defined(auroc)})
        metrics["continual/parameters"] = float(self.parameters[-1])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=ended)
        if boundary.finished:
            self._stream_ended = True
            self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report a sequence that stopped before its end (``EarlyStopping``, ``max_steps``, ``max_time``)."""
        if self._fitting and not self._stream_ended:
            self._report_unfinished(trainer, pl_module)
        self._fitting = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Report the tasks that ended before the exception (or Ctrl+C); never hide the exception itself. A fit
        refused before its training started (a configuration error) reports nothing."""
        if not self._fitting or self._stream_ended or not self._trained:
            self._fitting = False
            return
        self._fitting = False
        try:
            self._report_unfinished(trainer, pl_module)
        except Exception as error:
            rank_zero_warn(f"TaskEvaluation could not write the summary of the interrupted fit: {error!r}")

    def state_dict(self) -> dict[str, Any]:
        """The rows measured so far, so that a resumed run reports the whole sequence (plain data)."""
        return {
            "accuracy": [list(row) for row in self.accuracy],
            "auroc": [list(row) for row in self.auroc],
            "widths": [None if w is None else list(w) for w in self.widths],
            "parameters": list(self.parameters),
            "selection": {str(task): report for task, report in self.selection.items()},
            "splits": {str(task): report for task, report in self.splits.items()},
            "phase_epochs": {str(task): dict(epochs) for task, epochs in self.phase_epochs.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accuracy = [list(row) for row in state_dict["accuracy"]]
        self.auroc = [list(row) for row in state_dict["auroc"]]
        self.widths = [None if w is None else tuple(w) for w in state_dict["widths"]]
        self.parameters = list(state_dict["parameters"])
        self.selection = {int(task): report for task, report in state_dict.get("selection", {}).items()}
        self.splits = {int(task): report for task, report in state_dict.get("splits", {}).items()}
        self.phase_epochs = {int(task): dict(epochs) for task, epochs in state_dict.get("phase_epochs", {}).items()}

    def _make_room(self, task: int) -> None:
        """Make ``task``'s row the next one: rows this run did not measure before it become ``None`` rows,
        a row measured again (and any after it) is replaced."""
        if len(self.accuracy) > task + 1:
            rank_zero_warn(
                f"TaskEvaluation measures task {task} again although it holds rows up to task "
                f"{len(self.accuracy) - 1}: the rows from task {task} on are replaced"
            )
        for rows in (self.accuracy, self.auroc):
            del rows[task:]
            rows.extend([None] * (i + 1) for i in range(len(rows), task))
        for per_task in (self.widths, self.parameters):
            del per_task[task:]
            per_task.extend([None] * (task - len(per_task)))

    def _block(self, pl_module: pl.LightningModule) -> Any:
        return task_blocks(pl_module)[self._block_name(pl_module)]

    def _block_name(self, pl_module: pl.LightningModule) -> str:
        """The name of the block reported on: ``block``, or the module's only block."""
        blocks = task_blocks(pl_module)
        if self.block is not None:
            if self.block not in blocks:
                raise MisconfigurationException(
                    f"`block={self.block!r}` is not a block of the module; its blocks are {sorted(blocks)}"
                )
            return self.block
        if len(blocks) != 1:
            raise MisconfigurationException(
                f"TaskEvaluation found {len(blocks)} blocks {sorted(blocks)}; name the one to report with `block=...`"
            )
        return next(iter(blocks))

    def _output_directory(self, trainer: pl.Trainer) -> Path:
        """Where the files go. ``trainer.log_dir`` is a collective: the first call must happen on every rank."""
        if self._directory is None:
            self._directory = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        return self._directory

    def _report_unfinished(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.accuracy:
            rank_zero_info("TaskEvaluation: no task ended in this fit, so there is no continual_metrics.json to write")
            return
        self._finish(trainer, pl_module)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = self._output_directory(trainer)  # before the rank check: a collective on first use
        self.summary = self.summarise(self._block(pl_module), trainer.datamodule)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"continual/{k}": v for k, v in self.summary["summary"].items() if v is not None},
                step=len(self.accuracy) - 1,
            )
        if not trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "continual_metrics.json").write_text(json.dumps(self.summary, indent=2, allow_nan=False))
        if self.plots:
            lists = ("accuracy", "auroc", "parameters_after_task")
            missing_as_nan = {k: _nan_for_none(self.summary[k]) for k in lists if self.summary[k]}
            plot_report({**self.summary, **missing_as_nan}, directory)
        if self.print_report:
            rank_zero_info(format_report(self.summary))

    def summarise(self, mlp: Any, datamodule: Any) -> dict[str, Any]:
        """The plain-data summary of the run so far (what ``continual_metrics.json`` holds).

        Undefined numbers (a mean over no task, the AUROC of a single-class test set) are ``None``.
        Besides the matrices and the summary numbers (each with ``<name>_tasks``, the number of tasks it
        covers) it says whether the stream ended (``complete``, ``tasks_evaluated`` of ``tasks_in_stream``)
        and from which row this run measured the matrix (``first_measured_task``).
        """
        tasks = len(self.accuracy)
        if tasks == 0:
            raise ValueError("no task has ended yet, so there is nothing to summarise")
        reference = self.reference_scores[:tasks] if self.reference_scores is not None else None
        summary = _named(M.matrix_summary(self.accuracy, reference), "accuracy")
        binary = all(
            auroc is not None or accuracy is None
            for accuracy_row, auroc_row in zip(self.accuracy, self.auroc, strict=True)
            for accuracy, auroc in zip(accuracy_row, auroc_row, strict=True)
        )
        auroc = self.auroc if binary else None
        if auroc is not None:
            summary.update(_named(M.matrix_summary(auroc), "auroc"))
        first_widths = self.widths[0] if self.widths[0] is not None else mlp.widths(0)
        births = mlp.births()
        return _json_ready(
            {
                "complete": tasks == datamodule.num_tasks,
                "tasks": tasks,
                "tasks_evaluated": tasks,
                "tasks_in_stream": datamodule.num_tasks,
                "first_measured_task": next(i for i, row in enumerate(self.accuracy) if row[-1] is not None),
                "accuracy": self.accuracy,
                "auroc": auroc,
                "summary": summary,
                "capacity": M.capacity(
                    _trunk_parameters(mlp, list(first_widths)),
                    first_widths[-1],
                    [mlp.classes_of(t) for t in range(tasks)],
                    self.parameters[-1],
                ),
                "widths": self.widths,
                "widths_by_birth": [[[b.count(born) for born in range(i + 1)] for b in births] for i in range(tasks)],
                "parameters_after_task": self.parameters,
                "parameters_per_task": [mlp.num_parameters(t) for t in range(tasks)],
                "selection": [self.selection.get(t) for t in range(tasks)] if self.selection else None,
                "splits": [self.splits.get(t) for t in range(tasks)] if self.splits else None,
                "phase_epochs": [self.phase_epochs.get(t) for t in range(tasks)],
            }
        )


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _named(summary: dict[str, float | int], score: str) -> dict[str, float | int]:
    """:func:`~lightning_den.metrics.functional.matrix_summary`'s keys under the names of the report:
    ``average_accuracy``, ``forgetting``, ``forgetting_auroc``, ``average_auroc_tasks``..."""
    named = {}
    for key, value in summary.items():
        metric, count = (key.removesuffix("_tasks"), "_tasks") if key.endswith("_tasks") else (key, "")
        if metric == "average":
            metric = f"average_{score}"
        elif score != "accuracy":
            metric = f"{metric}_{score}"
        named[metric + count] = value
    return named


def _trunk_parameters(block: Any, widths: list[int]) -> int:
    """Parameters of ``block``'s layers at its first task's ``widths`` without a head: a DEN network counts them
    at those widths (it has grown since); the other blocks' first task uses its hidden layers as they are."""
    if isinstance(block, ExpandableMLP):
        return block.parameters_of(widths, 0)
    hidden, _ = block.first_task_layers()
    return sum(p.numel() for layer in hidden for p in layer.parameters())


def _json_ready(value: Any) -> Any:
    """``value`` with NaN and infinite floats as ``None`` and tuples as lists: what JSON can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _nan_for_none(values: list[Any]) -> list[Any]:
    """``values`` (a list, possibly of lists) with ``None`` entries as NaN, for the plots."""
    return [float("nan") if v is None else _nan_for_none(v) if isinstance(v, list) else v for v in values]
