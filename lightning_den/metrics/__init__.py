"""Continual-learning metrics: pure functions over the task matrix ``R[i][j]``."""

from lightning_den.core.den.layers import mlp_parameters
from lightning_den.metrics.functional import (
    average_score,
    backward_transfer,
    capacity,
    forgetting,
    forward_transfer,
    matrix_summary,
    task_matrix,
)

__all__ = [
    "average_score",
    "backward_transfer",
    "capacity",
    "forgetting",
    "forward_transfer",
    "matrix_summary",
    "mlp_parameters",
    "task_matrix",
]
