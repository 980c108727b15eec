"""The performance benchmark on a tiny network: every measurement runs and reports what it says it does.

Nothing here compares a time with a number: the timings of a tiny network on a shared machine mean
nothing (the benchmark itself is run with ``make bench``). What is checked is structure and the
invariants that hold whatever the machine's speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_den.core.den.phases import DENPhase

#: the step row of selective retraining with ``subnetwork_only=True`` in perf.json
SUBNETWORK_ONLY = "selective (subnetwork only)"

#: slow lane (`make test-slow`): every test runs benchmarks/perf.py in a subprocess
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *("--width-in", "12", "--hidden", "8", "6", "--batch", "16", "--examples", "64", "--epochs", "1"),
    *("--tasks", "3", "--task-counts", "2", "3", "--repeats", "3", "--rounds", "1"),
]


def run_perf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / "perf.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_every_measurement_runs_and_reports_consistent_figures(tmp_path):
    result = run_perf(*TINY, "--out", str(tmp_path / "perf"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "perf.json").read_text())

    for optimizer in ("adam", "adam-fused"):
        step = report["training_step"][optimizer]
        assert set(step["phases"]) == {phase.value for phase in DENPhase} | {SUBNETWORK_ONLY}
        assert step["phases"][SUBNETWORK_ONLY]["widths"] == step["phases"]["selective"]["widths"]
        for row in step["phases"].values():
            assert math.isfinite(row["den_vs_lightning"]) and row["den_vs_lightning"] > 0
            assert row["lightning_widths"] == row["widths"]  # plain Lightning was timed at the phase's widths
        assert step["phases"]["expansion"]["widths"] == [w + 10 for w in step["phases"]["sparse"]["widths"]]
        expansion = step["optimizer_in_expansion"]
        assert expansion["expansion_vs_dense"] > 0 and 0 < expansion["trained_entries"] < expansion["every_entry"]

    boundaries = report["boundaries"]
    assert len(boundaries["task_s"]) == len(boundaries["boundary_s"]) == 3
    assert sum(boundaries["task_s"]) <= boundaries["sequence_s"]  # the epochs lie inside the fit
    assert all(0 < share < 1 for share in boundaries["boundary_share"])
    for total, hooks, warm_up in zip(
        boundaries["boundary_s"], boundaries["epoch_hooks_s"], boundaries["warm_up_s"], strict=True
    ):
        assert total == pytest.approx(hooks + warm_up) and hooks > 0 and warm_up >= 0
    assert boundaries["active_parameters"] == sorted(boundaries["active_parameters"])  # the network only grows

    inference = report["inference"]
    assert all(new >= old for new, old in zip(inference["widths_newest"], inference["widths_task0"], strict=True))
    assert inference["widths_newest"] != inference["widths_task0"]

    assert [row["tasks"] for row in report["scaling"]] == [2, 3]
    for row in report["scaling"]:
        assert row["peak_rss_mib"] >= row["rss_at_start_mib"] > 0
        assert len(row["widths"]) == row["tasks"]
    assert report["growth"]["baseline_tasks"] == [1]  # a 3-task run has no task 2-4 before its last

    alternatives = report["alternatives"]
    assert set(alternatives["sequence_s"]) == {"DEN", "STL", "Progressive Networks", "PackNet"}
    assert alternatives["parameters"]["Progressive Networks"] > alternatives["parameters"]["STL"]

    claim = report["selective_vs_whole"]
    assert claim["selected_fraction"]["selective"] == [0.5, 0.5]  # the shipped budget: half of each layer
    assert claim["selected_fraction"]["whole"] == [1.0, 1.0]  # BFS reaches every unit of the tiny network
    for name, losses in claim["loss_curves"].items():  # each side reached the target at the epoch it reports
        epochs = claim["epochs_to_target"][name]
        assert losses[epochs - 1] <= claim["target_loss"] and all(
            loss > claim["target_loss"] for loss in losses[: epochs - 1]
        )
    assert claim["target_loss"] == max(losses[-1] for losses in claim["loss_curves"].values())
    assert claim["selective_vs_whole"] > 0

    table = (tmp_path / "perf.md").read_text()
    assert table in result.stdout
    rows = ("training step", "boundary work", "task 0 after 10 tasks", "whole sequence", "one network per task")
    for row in (*rows, "selective retraining vs retraining the whole network"):
        assert row in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_asking_for_cuda_without_a_gpu_is_refused_with_the_reason(tmp_path):
    result = run_perf("--accelerator", "cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--task-counts", "1", "5"], "--task-counts must all be at least 2"),
        (["--rounds", "0"], "--rounds must be a positive integer, got 0"),
        (["--hidden", "8", "0"], "--hidden must be positive integers"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(tmp_path, arguments, message):
    result = run_perf(*arguments, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_a_convolutional_network_is_measured_against_plain_lightning_and_a_dense_cnn(tmp_path):
    conv = ["--conv-channels", "3", "4", "--image", "1", "16", "16", "--width-in", "256", "--skip-alternatives"]
    only = ["--skip-scaling", "--optimizers", "adam", "--out", str(tmp_path / "cnn")]
    result = run_perf(*TINY, *conv, *only, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "cnn.json").read_text())
    phases = report["training_step"]["adam"]["phases"]
    assert set(phases) == {phase.value for phase in DENPhase} | {SUBNETWORK_ONLY}
    assert phases["sparse"]["widths"] == [3, 4, 8, 6]  # filters, then units
    assert phases["expansion"]["widths"] == [13, 14, 18, 16]  # expansion added 10 filters and units per layer
    assert all(row["lightning_widths"] == row["widths"] for row in phases.values())
    inference = report["inference"]
    assert inference["widths_task0"] == [3, 4, 8, 6] and inference["task0_vs_dense_task0_width"] > 0
    assert "alternatives" not in report and "scaling" not in report


def test_a_convolutional_network_without_its_image_shape_is_refused(tmp_path):
    result = run_perf(*TINY, "--conv-channels", "3", "--skip-alternatives", cwd=tmp_path)
    assert result.returncode == 2 and "--conv-channels needs --image C H W" in result.stderr
