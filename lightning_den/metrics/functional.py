r"""Continual-learning metrics over a task matrix (pure torch, no Lightning).

``R[i][j]`` is the score (accuracy or AUROC) on task ``j`` after training task ``i``, for ``j <= i``;
entries above the diagonal are never used. With ``T`` tasks:

* average: :math:`\frac1T \sum_j R_{T-1,j}`;
* backward transfer (Lopez-Paz & Ranzato, 2017): :math:`\frac1{T-1}\sum_{j<T-1} R_{T-1,j} - R_{j,j}`;
* forgetting (Chaudhry et al., 2018): :math:`\frac1{T-1}\sum_{j<T-1} \max_{j \le l < T-1} R_{l,j} - R_{T-1,j}`
  (the maximum only over rows after task ``j`` was learned);
* forward transfer (the architecture papers' form): :math:`\frac1{T}\sum_j R_{j,j} - b_j`, where ``b_j``
  is the score of a network of the same width trained on task ``j`` alone from scratch.

Missing entries (``None`` or NaN: a score that is undefined, such as the AUROC of a test set with one
class, or a row that was not measured) are skipped: each mean runs over the tasks whose needed entries
all exist (backward transfer needs ``R[j][j]`` and ``R[T-1][j]``, forgetting every ``R[l][j]`` for
``j <= l < T``), and :func:`matrix_summary` says how many tasks that is. A mean over no task is NaN,
except that with a single task backward transfer and forgetting are ``0.0`` (there is no earlier task).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Matrix = Tensor | Sequence[Sequence[float | None]]


def _floats(values: Sequence[float | None]) -> Tensor:
    """float64 tensor of ``values`` with ``None`` as NaN."""
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)


def task_matrix(rows: Matrix) -> Tensor:
    """``[T, T]`` float64 tensor from a lower-triangular list of rows (``rows[i]`` has ``i + 1`` entries).

    Entries above the diagonal, and missing entries (``None``), are NaN.

    Example:
        >>> task_matrix([[0.9], [None, 0.95]])
        tensor([[0.9000,    nan],
                [   nan, 0.9500]], dtype=torch.float64)
    """
    if isinstance(rows, Tensor):
        matrix = rows.to(torch.float64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a task matrix must be square [T, T], got shape {tuple(matrix.shape)}")
    else:
        size = len(rows)
        matrix = torch.full((size, size), float("nan"), dtype=torch.float64)
        for i, row in enumerate(rows):
            if len(row) < i + 1:
                raise ValueError(f"row {i} of the task matrix needs {i + 1} entries (tasks 0..{i}), got {len(row)}")
            matrix[i, : i + 1] = _floats(list(row[: i + 1]))
    if matrix.shape[0] == 0:
        raise ValueError("a task matrix needs at least one row (one task), got none")
    return matrix


def _mean_over_tasks(terms: Tensor) -> tuple[float, int]:
    """Mean of the defined (non-NaN) per-task ``terms`` and how many there are."""
    if terms.numel() == 0:  # a single task: nothing earlier to transfer to or to forget
        return 0.0, 0
    defined = terms[~terms.isnan()]
    if defined.numel() == 0:
        return float("nan"), 0
    return float(defined.mean()), int(defined.numel())


def _average_terms(matrix: Tensor) -> Tensor:
    return matrix[-1]


def _backward_transfer_terms(matrix: Tensor) -> Tensor:
    return matrix[-1, :-1] - matrix.diagonal()[:-1]


def _forgetting_terms(matrix: Tensor) -> Tensor:
    size = matrix.shape[0]
    # torch's max propagates NaN: a task with any missing row after it was learned has no term
    drops = [matrix[j : size - 1, j].max() - matrix[-1, j] for j in range(size - 1)]
    return torch.stack(drops) if drops else matrix.new_empty(0)


def _forward_transfer_terms(matrix: Tensor, reference: Sequence[float | None]) -> Tensor:
    if len(reference) != matrix.shape[0]:
        raise ValueError(f"`reference` needs one score per task ({matrix.shape[0]}), got {len(reference)}")
    return matrix.diagonal() - _floats(list(reference))


def average_score(rows: Matrix) -> float:
    """Mean score over all tasks after the last task (over the tasks with a score, NaN if none has one).

    Example:
        >>> average_score([[0.9], [0.8, 0.95]])
        0.875
        >>> average_score([[0.9], [None, 0.95]])
        0.95
    """
    return _mean_over_tasks(_average_terms(task_matrix(rows)))[0]


def backward_transfer(rows: Matrix) -> float:
    """Mean change on each earlier task from right after it was learned to the end (negative: forgetting).

    Example:
        >>> round(backward_transfer([[0.9], [0.8, 0.95]]), 6)
        -0.1
    """
    return _mean_over_tasks(_backward_transfer_terms(task_matrix(rows)))[0]


def forgetting(rows: Matrix) -> float:
    """Mean drop of each earlier task from its best score (after it was learned) to its final score.

    Example:
        >>> round(forgetting([[0.9], [0.95, 0.9], [0.7, 0.9, 0.8]]), 6)
        0.125
    """
    return _mean_over_tasks(_forgetting_terms(task_matrix(rows)))[0]


def forward_transfer(rows: Matrix, reference: Sequence[float | None]) -> float:
    """Mean gain on each task, right after learning it, over a same-width network trained on it alone.

    Example:
        >>> round(forward_transfer([[0.9], [0.8, 0.95]], reference=[0.9, 0.9]), 6)
        0.025
    """
    return _mean_over_tasks(_forward_transfer_terms(task_matrix(rows), reference))[0]


def matrix_summary(rows: Matrix, reference: Sequence[float | None] | None = None) -> dict[str, float | int]:
    """Every summary of the matrix, each with the number of tasks it covers (key ``name + "_tasks"``).

    ``forward_transfer`` only when ``reference`` is given. Values are NaN where no task covers them.

    Example:
        >>> summary = matrix_summary([[None], [None, 0.9], [0.5, 0.8, 0.7]])  # row 0 not measured
        >>> summary["average_tasks"], summary["backward_transfer_tasks"], round(summary["backward_transfer"], 6)
        (3, 1, -0.1)
    """
    matrix = task_matrix(rows)
    terms = {
        "average": _average_terms(matrix),
        "backward_transfer": _backward_transfer_terms(matrix),
        "forgetting": _forgetting_terms(matrix),
    }
    if reference is not None:
        terms["forward_transfer"] = _forward_transfer_terms(matrix, reference)
    summary: dict[str, float | int] = {}
    for name, values in terms.items():
        summary[name], summary[f"{name}_tasks"] = _mean_over_tasks(values)
    return summary


def capacity(trunk: int, top_width: int, classes: Sequence[int], total_parameters: int) -> dict[str, float]:
    """Total parameters against one network per task (STL) and one shared trunk with a head per task.

    Args:
        trunk: parameters of the network every baseline has (the starting widths), without a head
            (``mlp_parameters(in_features, widths, 0)`` for an MLP).
        top_width: units of its last hidden layer, which each task's head reads.
        classes: outputs of each task's head.
        total_parameters: parameters of the continual model after the last task.

    Example:
        >>> capacity(4 * 3 + 3, 3, [2, 2], total_parameters=23)["ratio_to_single_task"]   # STL: 2 x (15 + 8)
        0.5
    """
    heads = [top_width * c + c for c in classes]
    single_task = sum(trunk + head for head in heads)
    shared = trunk + sum(heads)
    return {
        "total_parameters": total_parameters,
        "single_task_parameters": single_task,
        "shared_network_parameters": shared,
        "ratio_to_single_task": total_parameters / single_task,
        "ratio_to_shared_network": total_parameters / shared,
    }
