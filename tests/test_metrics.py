"""Continual metrics on hand-made matrices, against plain NumPy loops written from the definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_den.metrics import average_score, backward_transfer, capacity, forgetting, forward_transfer, task_matrix
from lightning_den.report import format_report

# R[i][j]: accuracy on task j after task i. Task 0 rises then falls; task 1 falls; task 2 is new.
ROWS = [[0.90], [0.95, 0.80], [0.70, 0.60, 0.85], [0.75, 0.65, 0.80, 0.99]]


def numpy_reference(rows):
    size = len(rows)
    r = np.full((size, size), np.nan)
    for i, row in enumerate(rows):
        r[i, : i + 1] = row
    bwt = np.mean([r[size - 1, j] - r[j, j] for j in range(size - 1)])
    forget = np.mean([max(r[row, j] for row in range(j, size - 1)) - r[size - 1, j] for j in range(size - 1)])
    return r[size - 1].mean(), bwt, forget


def test_summaries_match_the_definitions():
    average, bwt, forget = numpy_reference(ROWS)
    assert average_score(ROWS) == pytest.approx(average) == pytest.approx((0.75 + 0.65 + 0.80 + 0.99) / 4)
    by_hand = ((0.75 - 0.9) + (0.65 - 0.8) + (0.8 - 0.85)) / 3
    assert backward_transfer(ROWS) == pytest.approx(bwt) == pytest.approx(by_hand)
    # forgetting takes the best row after learning: task 0 peaked at 0.95 (row 1), not 0.90
    by_hand = ((0.95 - 0.75) + (0.8 - 0.65) + (0.85 - 0.8)) / 3
    assert forgetting(ROWS) == pytest.approx(forget) == pytest.approx(by_hand)
    assert forward_transfer(ROWS, [0.9, 0.9, 0.9, 0.9]) == pytest.approx((0.0 - 0.1 - 0.05 + 0.09) / 4)


def test_rows_before_a_task_was_learned_are_never_used():
    # entries above the diagonal are garbage on purpose; a square tensor keeps them
    square = torch.tensor([[0.9, 0.0, 0.0], [0.8, 0.9, 5.0], [0.7, 0.8, 0.9]])
    assert forgetting(square) == pytest.approx(((0.9 - 0.7) + (0.9 - 0.8)) / 2)


def test_one_task_has_no_transfer_and_bad_shapes_are_refused():
    assert backward_transfer([[0.5]]) == 0.0 and forgetting([[0.5]]) == 0.0
    with pytest.raises(ValueError, match="row 1 of the task matrix needs 2 entries"):
        task_matrix([[0.5], [0.4]])
    with pytest.raises(ValueError, match="one score per task"):
        forward_transfer(ROWS, [0.9])


def test_capacity_against_single_task_and_shared_networks():
    result = capacity(10, [4, 3], [2, 2, 5], total_parameters=200)
    one_net = lambda c: 10 * 4 + 4 + 4 * 3 + 3 + 3 * c + c  # noqa: E731
    assert result["single_task_parameters"] == one_net(2) * 2 + one_net(5)
    assert result["shared_network_parameters"] == 10 * 4 + 4 + 4 * 3 + 3 + (3 * 2 + 2) * 2 + 3 * 5 + 5
    assert result["ratio_to_single_task"] == pytest.approx(200 / result["single_task_parameters"])


def test_report_shows_matrix_and_summary():
    text = format_report({"accuracy": ROWS, "summary": {"forgetting": 0.1333}, "widths": [[4, 3], [6, 3]]})
    assert "0.9500" in text and "forgetting: 0.1333" in text and "4-3, 6-3" in text
