"""The embedded demo stream end to end: accuracy, forgetting and size after five tasks."""

from __future__ import annotations

from lightning_den.demo import HIDDEN_SIZES, run_split_digits, single_task_parameters


def test_split_digits_accuracy_forgetting_and_size():
    result = run_split_digits(num_tasks=5, seed=0, verbose=False)
    final = result.accuracy[-1]
    assert len(result.accuracy) == 5 and len(final) == 5
    assert sum(final) / len(final) >= 0.95
    assert result.accuracy[0][0] - final[0] <= 0.02  # task 0 within 2 points of its value right after task 0
    # the network grew, but stayed smaller than one network per task
    assert all(w >= h for w, h in zip(result.widths[-1], HIDDEN_SIZES, strict=True))
    assert result.parameters < result.single_task_parameters
    assert result.single_task_parameters == single_task_parameters(64, HIDDEN_SIZES, 2, 5)
