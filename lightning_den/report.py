"""The end-of-run report: a terminal table and PNG plots of a task sequence's metrics.

Both read the plain summary dict that :class:`~lightning_den.TaskEvaluation` writes to
``continual_metrics.json``, so a saved run can be re-plotted without training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _number(value: Any) -> str:
    """A summary number as text: floats to 4 decimals, ``-`` for a missing one (``None`` or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _matrix_lines(title: str, rows: list[list[float | None]]) -> list[str]:
    size = len(rows)
    lines = [f"{title} (row i: after training task i; column j: task j)"]
    lines.append("      " + "".join(f"{'t' + str(j):>8}" for j in range(size)))
    for i, row in enumerate(rows):
        lines.append(f"{i:>5} " + "".join(f"{_number(v):>8}" for v in row))
    return lines


def format_report(summary: dict[str, Any]) -> str:
    """The accuracy (and AUROC) matrix and the summary numbers as text.

    Missing numbers (``None`` or NaN: not measured in this run, or undefined) are printed as ``-``; a
    summary number is followed by the number of tasks it covers (its ``<name>_tasks`` entry); a run
    that ended before its stream did, or that continued an earlier one, says so first.

    Example:
        >>> print(format_report({
        ...     "accuracy": [[None], [0.8, 0.95]],
        ...     "first_measured_task": 1,
        ...     "summary": {"average_accuracy": 0.875, "average_accuracy_tasks": 2, "forgetting": None},
        ... }))
        row 0 was not measured in this run (it continued an earlier one)
        accuracy (row i: after training task i; column j: task j)
                    t0      t1
            0        -
            1   0.8000  0.9500
        average_accuracy: 0.8750 (2 tasks)
        forgetting: -
    """
    lines = []
    if summary.get("complete") is False:
        lines.append(
            f"incomplete run: {summary.get('tasks_evaluated')} of {summary.get('tasks_in_stream')} tasks ended; "
            "every number below covers those tasks only"
        )
    first = summary.get("first_measured_task")
    if first:
        rows = "row 0 was" if first == 1 else f"rows 0..{first - 1} were"
        lines.append(f"{rows} not measured in this run (it continued an earlier one)")
    lines += _matrix_lines("accuracy", summary["accuracy"])
    if summary.get("auroc"):
        lines += _matrix_lines("AUROC", summary["auroc"])
    numbers = summary.get("summary", {})
    for key, value in numbers.items():
        if key.endswith("_tasks") and key.removesuffix("_tasks") in numbers:
            continue  # printed beside its number
        count = numbers.get(f"{key}_tasks")
        covered = "" if count is None else f" ({count} task{'' if count == 1 else 's'})"
        lines.append(f"{key}: {_number(value)}{covered}")
    for key, value in summary.get("capacity", {}).items():
        lines.append(f"{key}: {_number(value)}")
    if summary.get("widths"):
        widths = ("-" if w is None else "-".join(map(str, w)) for w in summary["widths"])
        lines.append("widths per task: " + ", ".join(widths))
    trained = [(task, epochs) for task, epochs in enumerate(summary.get("phase_epochs") or []) if epochs]
    if trained:
        lines.append("epochs per task: " + "; ".join(f"{task}: {_epochs_text(epochs)}" for task, epochs in trained))
    selected = [(task, report) for task, report in enumerate(summary.get("selection") or []) if report]
    if selected:
        lines.append("selective retraining, per task: share of each hidden layer's units selected | zero weights")
        for task, report in selected:
            fractions = " ".join(f"{f:.2f}" for f in report["selected_fraction"])
            zeros = " ".join(f"{z:.2f}" for z in report["zero_fraction"])
            lines.append(f"  task {task}: {fractions} | {zeros} (head {report['head_zero_fraction']:.2f})")
    split = [(task, report) for task, report in enumerate(summary.get("splits") or []) if report]
    if split:
        lines.append("split, per task: units duplicated in each hidden layer | largest drift of a unit in each")
        for task, report in split:
            drifts = " ".join(f"{drift:.4f}" for drift in report["largest_drift"])
            lines.append(f"  task {task}: {' '.join(map(str, report['split_units']))} | {drifts}")
    return "\n".join(lines)


def _epochs_text(epochs: dict[str, int]) -> str:
    """``{"head_fit": 2, "selective": 5}`` as ``7 (head_fit 2, selective 5)``; one phase as its count."""
    if len(epochs) == 1:
        return str(next(iter(epochs.values())))
    return f"{sum(epochs.values())} (" + ", ".join(f"{phase} {count}" for phase, count in epochs.items()) + ")"


def plot_report(summary: dict[str, Any], directory: str | Path) -> list[Path]:
    """Write ``accuracy_matrix.png``, ``widths.png``, ``parameters.png`` and, when the run selected
    subnetworks (DEN), ``selection.png`` (share of each hidden layer's units selected per task) into ``directory``.

    The figures are plain :class:`matplotlib.figure.Figure` objects saved straight to PNG: no pyplot, no
    ``matplotlib.use``, so drawing a report leaves the process's backend (a notebook's, say) as it was.
    """
    import numpy as np
    from matplotlib.figure import Figure

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    rows = summary["accuracy"]
    size = len(rows)
    matrix = np.full((size, size), np.nan)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    fig = Figure(figsize=(1.2 + 0.6 * size, 1.0 + 0.6 * size))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(size))
    ax.set_yticks(range(size))
    for i in range(size):
        for j in range(i + 1):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title("accuracy matrix R[i][j]")
    written.append(directory / "accuracy_matrix.png")
    fig.savefig(written[-1], dpi=100, bbox_inches="tight")

    by_birth = summary.get("widths_by_birth")
    if by_birth:
        layers = len(by_birth[0])
        fig = Figure(figsize=(3.2 * layers, 3.0))
        axes = fig.subplots(1, layers, squeeze=False)
        for layer, ax in enumerate(axes[0]):
            bottom = np.zeros(size)
            for birth in range(size):
                counts = np.array([row[layer][birth] if birth < len(row[layer]) else 0 for row in by_birth])
                ax.bar(range(size), counts, bottom=bottom, label=f"born in task {birth}")
                bottom += counts
            ax.set_title(f"hidden layer {layer}")
            ax.set_xlabel("after task")
            ax.set_ylabel("units")
            ax.set_xticks(range(size))
        axes[0][-1].legend(fontsize=6, loc="upper left")
        written.append(directory / "widths.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")

    parameters = summary.get("parameters_after_task")
    if parameters:
        fig = Figure(figsize=(4.0, 3.0))
        ax = fig.add_subplot()
        ax.plot(range(size), parameters, marker="o", label="this model")
        capacity = summary.get("capacity", {})
        if "single_task_parameters" in capacity:
            per_network = capacity["single_task_parameters"] / size
            ax.plot(range(size), [per_network * (t + 1) for t in range(size)], "--", label="one network per task")
        ax.set_xlabel("after task")
        ax.set_ylabel("parameters")
        ax.set_xticks(range(size))
        ax.legend(fontsize=7)
        written.append(directory / "parameters.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")

    selected = [(task, report) for task, report in enumerate(summary.get("selection") or []) if report]
    if selected:
        fig = Figure(figsize=(4.0, 3.0))
        ax = fig.add_subplot()
        tasks = [task for task, _ in selected]
        for layer in range(len(selected[0][1]["selected_fraction"])):
            fractions = [report["selected_fraction"][layer] for _, report in selected]
            ax.plot(tasks, fractions, marker="o", label=f"hidden layer {layer}")
        ax.set_ylim(0.0, 1.05)
        ax.set_xlabel("task")
        ax.set_ylabel("share of units selected")
        ax.set_xticks(tasks)
        ax.set_title("selective retraining")
        ax.legend(fontsize=7)
        written.append(directory / "selection.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
    return written
