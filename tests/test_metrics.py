"""Continual metrics on hand-made matrices, against plain NumPy loops written from the definitions, and
with missing entries (``None``/NaN: rows not measured, undefined scores), which every summary skips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_den.metrics import (
    average_score,
    backward_transfer,
    capacity,
    forgetting,
    forward_transfer,
    matrix_summary,
    mlp_parameters,
    task_matrix,
)
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
    result = capacity(mlp_parameters(10, [4, 3], 0), 3, [2, 2, 5], total_parameters=200)
    one_net = lambda c: 10 * 4 + 4 + 4 * 3 + 3 + 3 * c + c  # noqa: E731
    assert result["single_task_parameters"] == one_net(2) * 2 + one_net(5)
    assert result["shared_network_parameters"] == 10 * 4 + 4 + 4 * 3 + 3 + (3 * 2 + 2) * 2 + 3 * 5 + 5
    assert result["ratio_to_single_task"] == pytest.approx(200 / result["single_task_parameters"])


def test_report_shows_matrix_and_summary():
    text = format_report({"accuracy": ROWS, "summary": {"forgetting": 0.1333}, "widths": [[4, 3], [6, 3]]})
    assert "0.9500" in text and "forgetting: 0.1333" in text and "4-3, 6-3" in text


def without_task(rows, task):
    """The square matrix of ``rows`` with task ``task``'s row and column removed."""
    keep = [i for i in range(len(rows)) if i != task]
    return task_matrix(rows)[keep][:, keep]


def with_missing_column(rows, task, missing=None):
    """``rows`` with every score of task ``task`` missing."""
    return [[missing if j == task else v for j, v in enumerate(row)] for row in rows]


@pytest.mark.parametrize("task", range(len(ROWS) - 1))
@pytest.mark.parametrize("missing", [None, float("nan")])
def test_a_task_whose_scores_are_missing_counts_as_a_task_that_is_not_there(task, missing):
    rows = with_missing_column(ROWS, task, missing)
    smaller = without_task(ROWS, task)
    assert average_score(rows) == pytest.approx(average_score(smaller))
    assert backward_transfer(rows) == pytest.approx(backward_transfer(smaller))
    reference = [0.9, 0.8, 0.7, 0.6]
    kept = [r for j, r in enumerate(reference) if j != task]
    assert forward_transfer(rows, reference) == pytest.approx(forward_transfer(smaller, kept))
    summary = matrix_summary(rows, reference)
    assert summary["average_tasks"] == len(ROWS) - 1 and summary["forward_transfer_tasks"] == len(ROWS) - 1
    assert summary["backward_transfer_tasks"] == summary["forgetting_tasks"] == len(ROWS) - 2


def test_forgetting_and_backward_transfer_use_only_tasks_whose_needed_entries_exist():
    # task 0 misses a middle row (its best score is unknown): forgetting skips it, BWT (first and last row) keeps it
    rows = [list(row) for row in ROWS]
    rows[1][0] = None
    drops = [max(ROWS[i][j] for i in range(j, 3)) - ROWS[3][j] for j in (1, 2)]
    assert forgetting(rows) == pytest.approx(sum(drops) / 2) and matrix_summary(rows)["forgetting_tasks"] == 2
    assert backward_transfer(rows) == pytest.approx(backward_transfer(ROWS))
    # rows that start later (a continued run): row 0 and row 1 not measured
    later = [[None], [None, None], ROWS[2], ROWS[3]]
    summary = matrix_summary(later)
    assert summary["average"] == pytest.approx(average_score(ROWS)) and summary["average_tasks"] == 4
    assert summary["backward_transfer"] == pytest.approx(ROWS[3][2] - ROWS[2][2])
    assert summary["backward_transfer_tasks"] == summary["forgetting_tasks"] == 1


def test_the_summary_agrees_with_each_function_and_a_mean_over_no_task_is_nan():
    summary = matrix_summary(ROWS, [0.9, 0.9, 0.9, 0.9])
    assert summary["average"] == average_score(ROWS) and summary["forgetting"] == forgetting(ROWS)
    assert summary["backward_transfer"] == backward_transfer(ROWS)
    assert summary["forward_transfer"] == forward_transfer(ROWS, [0.9] * 4)
    assert summary["average_tasks"] == 4 and summary["backward_transfer_tasks"] == 3
    nothing = matrix_summary([[None], [None, None]])
    assert all(math.isnan(nothing[k]) for k in ("average", "backward_transfer", "forgetting"))
    assert nothing["average_tasks"] == nothing["backward_transfer_tasks"] == nothing["forgetting_tasks"] == 0
    assert matrix_summary([[0.5]])["backward_transfer_tasks"] == 0  # one task: 0.0, over no task
    with pytest.raises(ValueError, match="at least one row"):
        task_matrix([])


def test_report_prints_a_dash_for_missing_and_undefined_numbers_and_says_what_is_incomplete():
    summary = {
        "complete": False,
        "tasks_evaluated": 2,
        "tasks_in_stream": 5,
        "first_measured_task": 1,
        "accuracy": [[None], [0.5, 0.75]],
        "auroc": [[None], [float("nan"), 0.5]],
        "summary": {"average_auroc": float("nan"), "average_auroc_tasks": 0, "forgetting": None},
        "widths": [None, [8]],
    }
    text = format_report(summary)
    assert "nan" not in text.lower() and "None" not in text
    assert "incomplete run: 2 of 5 tasks ended" in text and "row 0 was not measured" in text
    assert "average_auroc: - (0 tasks)" in text and "forgetting: -" in text and "widths per task: -, 8" in text
    auroc_rows = text.split("AUROC")[1].splitlines()
    assert auroc_rows[2].split() == ["0", "-"] and auroc_rows[3].split() == ["1", "-", "0.5000"]
