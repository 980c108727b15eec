"""The embedded demo stream end to end: accuracy, forgetting, size, and the files of the report."""

from __future__ import annotations

import json

import pytest

from lightning_den.demo import HIDDEN_SIZES, run_split_digits
from lightning_den.metrics import mlp_parameters

#: slow lane (`make test-slow`): a whole sequence on the digits with the report
pytestmark = pytest.mark.slow


def test_split_digits_accuracy_forgetting_size_and_report(tmp_path):
    result = run_split_digits(num_tasks=5, seed=0, verbose=False, output_dir=str(tmp_path))
    final = result.accuracy[-1]
    assert len(result.accuracy) == 5 and len(final) == 5
    assert sum(final) / len(final) >= 0.95
    assert result.accuracy[0][0] - final[0] <= 0.02  # task 0 within 2 points of its value right after task 0
    # the network grew, but stayed smaller than one network per task
    assert all(w >= h for w, h in zip(result.widths[-1], HIDDEN_SIZES, strict=True))
    assert result.single_task_parameters == 5 * mlp_parameters(64, HIDDEN_SIZES, 2)
    assert result.parameters < result.single_task_parameters
    saved = json.loads((tmp_path / "continual_metrics.json").read_text())
    assert saved["accuracy"] == result.accuracy and saved["capacity"]["total_parameters"] == result.parameters
    assert 0.5 <= saved["summary"]["average_auroc"] <= 1.0  # every digit-pair task is binary
    for name in ("accuracy_matrix.png", "widths.png", "parameters.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_a_bf16_mixed_run_on_cpu_trains_every_den_phase_as_float32_does(tmp_path):
    # selective retraining and expansion compute their partial gradients in the autocast precision
    full = run_split_digits(num_tasks=3, verbose=False, output_dir=str(tmp_path / "fp32"))
    mixed = run_split_digits(num_tasks=3, verbose=False, output_dir=str(tmp_path / "bf16"), precision="bf16-mixed")
    assert len(mixed.accuracy) == 3 and mixed.widths[-1] != mixed.widths[0]  # it expanded
    for full_row, mixed_row in zip(full.accuracy, mixed.accuracy, strict=True):
        assert mixed_row == pytest.approx(full_row, abs=0.03)
