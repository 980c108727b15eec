r"""Continual-learning metrics over a task matrix (pure torch, no Lightning).

``R[i][j]`` is the score (accuracy or AUROC) on task ``j`` after training task ``i``, for ``j <= i``;
entries above the diagonal are never used. With ``T`` tasks:

* average: :math:`\frac1T \sum_j R_{T-1,j}`;
* backward transfer (Lopez-Paz & Ranzato, 2017): :math:`\frac1{T-1}\sum_{j<T-1} R_{T-1,j} - R_{j,j}`;
* forgetting (Chaudhry et al., 2018): :math:`\frac1{T-1}\sum_{j<T-1} \max_{j \le l < T-1} R_{l,j} - R_{T-1,j}`
  (the maximum only over rows after task ``j`` was learned);
* forward transfer (the architecture papers' form): :math:`\frac1{T}\sum_j R_{j,j} - b_j`, where ``b_j``
  is the score of a network of the same width trained on task ``j`` alone from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_den.core.layers import mlp_parameters

Matrix = Tensor | Sequence[Sequence[float]]


def task_matrix(rows: Matrix) -> Tensor:
    """``[T, T]`` float64 tensor from a lower-triangular list of rows (``rows[i]`` has ``i + 1`` entries).

    Entries above the diagonal are NaN.

    Example:
        >>> task_matrix([[0.9], [0.8, 0.95]])
        tensor([[0.9000,    nan],
                [0.8000, 0.9500]], dtype=torch.float64)
    """
    if isinstance(rows, Tensor):
        matrix = rows.to(torch.float64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a task matrix must be square [T, T], got shape {tuple(matrix.shape)}")
        return matrix
    size = len(rows)
    matrix = torch.full((size, size), float("nan"), dtype=torch.float64)
    for i, row in enumerate(rows):
        if len(row) < i + 1:
            raise ValueError(f"row {i} of the task matrix needs {i + 1} entries (tasks 0..{i}), got {len(row)}")
        matrix[i, : i + 1] = torch.as_tensor(list(row[: i + 1]), dtype=torch.float64)
    return matrix


def average_score(rows: Matrix) -> float:
    """Mean score over all tasks after the last task.

    Example:
        >>> average_score([[0.9], [0.8, 0.95]])
        0.875
    """
    matrix = task_matrix(rows)
    return float(matrix[-1].mean())


def backward_transfer(rows: Matrix) -> float:
    """Mean change on each earlier task from right after it was learned to the end (negative: forgetting).

    Example:
        >>> round(backward_transfer([[0.9], [0.8, 0.95]]), 6)
        -0.1
    """
    matrix = task_matrix(rows)
    size = matrix.shape[0]
    if size < 2:
        return 0.0
    return float((matrix[-1, :-1] - matrix.diagonal()[:-1]).mean())


def forgetting(rows: Matrix) -> float:
    """Mean drop of each earlier task from its best score (after it was learned) to its final score.

    Example:
        >>> round(forgetting([[0.9], [0.95, 0.9], [0.7, 0.9, 0.8]]), 6)
        0.125
    """
    matrix = task_matrix(rows)
    size = matrix.shape[0]
    if size < 2:
        return 0.0
    drops = [float(matrix[j : size - 1, j].max() - matrix[-1, j]) for j in range(size - 1)]
    return sum(drops) / len(drops)


def forward_transfer(rows: Matrix, reference: Sequence[float]) -> float:
    """Mean gain on each task, right after learning it, over a same-width network trained on it alone.

    Example:
        >>> round(forward_transfer([[0.9], [0.8, 0.95]], reference=[0.9, 0.9]), 6)
        0.025
    """
    matrix = task_matrix(rows)
    if len(reference) != matrix.shape[0]:
        raise ValueError(f"`reference` needs one score per task ({matrix.shape[0]}), got {len(reference)}")
    return float((matrix.diagonal() - torch.as_tensor(list(reference), dtype=torch.float64)).mean())


def capacity(
    in_features: int, hidden_sizes: Sequence[int], classes: Sequence[int], total_parameters: int
) -> dict[str, float]:
    """Total parameters against one network per task (STL) and one shared trunk with a head per task.

    Args:
        in_features: input width.
        hidden_sizes: the widths every baseline network has (the starting widths).
        classes: outputs of each task's head.
        total_parameters: parameters of the continual model after the last task.

    Example:
        >>> capacity(4, [3], [2, 2], total_parameters=23)["ratio_to_single_task"]   # STL: 2 x 23
        0.5
    """
    single_task = sum(mlp_parameters(in_features, hidden_sizes, c) for c in classes)
    trunk = mlp_parameters(in_features, hidden_sizes, 0)
    shared = trunk + sum(hidden_sizes[-1] * c + c for c in classes)
    return {
        "total_parameters": total_parameters,
        "single_task_parameters": single_task,
        "shared_network_parameters": shared,
        "ratio_to_single_task": total_parameters / single_task,
        "ratio_to_shared_network": total_parameters / shared,
    }
