"""The end-of-run report: a terminal table and PNG plots of a task sequence's metrics.

Both read the plain summary dict that :class:`~lightning_den.TaskEvaluation` writes to
``continual_metrics.json``, so a saved run can be re-plotted without training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _matrix_lines(title: str, rows: list[list[float | None]]) -> list[str]:
    size = len(rows)
    lines = [f"{title} (row i: after training task i; column j: task j)"]
    lines.append("      " + "".join(f"{'t' + str(j):>8}" for j in range(size)))
    for i, row in enumerate(rows):
        cells = "".join(f"{v:>8.4f}" if v is not None else f"{'-':>8}" for v in row)
        lines.append(f"{i:>5} " + cells)
    return lines


def format_report(summary: dict[str, Any]) -> str:
    """The accuracy (and AUROC) matrix and the summary numbers as text.

    Example:
        >>> print(format_report({"accuracy": [[0.9], [0.8, 0.95]], "summary": {"average_accuracy": 0.875}}))
        accuracy (row i: after training task i; column j: task j)
                    t0      t1
            0   0.9000
            1   0.8000  0.9500
        average_accuracy: 0.8750
    """
    lines = _matrix_lines("accuracy", summary["accuracy"])
    if summary.get("auroc"):
        lines += _matrix_lines("AUROC", summary["auroc"])
    for key, value in summary.get("summary", {}).items():
        lines.append(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    for key, value in summary.get("capacity", {}).items():
        lines.append(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if summary.get("widths"):
        lines.append("widths per task: " + ", ".join("-".join(map(str, w)) for w in summary["widths"]))
    return "\n".join(lines)


def plot_report(summary: dict[str, Any], directory: str | Path) -> list[Path]:
    """Write ``accuracy_matrix.png``, ``widths.png`` and ``parameters.png`` into ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    rows = summary["accuracy"]
    size = len(rows)
    matrix = np.full((size, size), np.nan)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * size, 1.0 + 0.6 * size))
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
    plt.close(fig)

    by_birth = summary.get("widths_by_birth")
    if by_birth:
        layers = len(by_birth[0])
        fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.0), squeeze=False)
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
        plt.close(fig)

    parameters = summary.get("parameters_after_task")
    if parameters:
        fig, ax = plt.subplots(figsize=(4.0, 3.0))
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
        plt.close(fig)
    return written
