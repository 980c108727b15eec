"""The comparison command on a tiny stream: every method is a row, every measured column is filled."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_CONFIG as TINY

#: slow lane (`make test-slow`): every test runs benchmarks/compare.py end to end
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_compare_writes_every_row_and_column(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "cmp"
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(config), "--epochs", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (out / "comparison.md").read_text().splitlines()
    header = table[2]
    for column in (
        "parameters after first",
        "selected (mean per layer)",
        "BWT",
        "largest drop",
        "forward transfer",
        "final avg accuracy",
        "epochs",
        "wall time",
    ):
        assert column in header
    methods = [
        "DEN",
        "DEN without split",
        "DNN-Selective (selection only)",
        "DEN, subnetwork only (the official code's selective step)",
        "DEN, early expansion",
        "Progressive Networks",
        "PackNet",
        "one network per task",
        "fine-tuning",
        "EWC",
    ]
    rows = [line for line in table[4:] if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows] == methods
    assert all(" - |" not in row.split("|", 5)[-1] for row in rows[:1])  # forward transfer is filled for DEN
    saved = json.loads((out / "comparison.json").read_text())
    by_method = {row["method"]: row for row in saved["rows"]}
    assert by_method["one network per task"]["forward_transfer"] == 0.0  # the reference against itself
    assert by_method["PackNet"]["largest_drop"] == 0.0 and by_method["Progressive Networks"]["largest_drop"] == 0.0
    params = {name: row["parameters_after_task"] for name, row in by_method.items()}
    head = 8 * 2 + 2  # the tiny config's last hidden layer has 8 units, every task 2 classes
    assert params["PackNet"][-1] - params["PackNet"][0] == 2 * head  # fixed trunk: only heads come on top
    assert params["Progressive Networks"][-1] > params["Progressive Networks"][0]  # a column per task
    assert (out / "accuracy_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"
    fractions = by_method["DEN"]["selected_fraction"]  # mean over tasks 1 and 2 of what the boundaries recorded
    assert len(fractions) == 2 and all(0 < f <= 1 for f in fractions)
    assert by_method["PackNet"]["selected_fraction"] is None


def test_compare_averages_over_seeds_with_their_spread(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "cmp"
    methods = ["--methods", "den", "den-selective", "--seeds", "0", "1"]
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(config), *methods, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["threads"] == 1  # the results depend on it: recorded, 1 by default
    assert "; 1 torch thread" in (out / "comparison.md").read_text()
    for row in saved["rows"]:
        per_seed = [run["average_accuracy"] for run in row["seeds"]]
        assert len(per_seed) == 2 and row["average_accuracy"] == pytest.approx(sum(per_seed) / 2)
        assert row["average_accuracy_std"] is not None
        first, second = (run["accuracy"] for run in row["seeds"])
        assert first != second  # the seeds really trained different networks
    selective = next(row for row in saved["rows"] if row["method"].startswith("DNN-Selective"))
    for run in selective["seeds"]:  # no expansion, no split: only the new heads (8 inputs, 2 classes) come on top
        params = run["parameters_after_task"]
        assert [after - before for before, after in itertools.pairwise(params)] == [8 * 2 + 2] * (len(params) - 1)
    assert " ± " in (out / "comparison.md").read_text()


def test_update_reruns_only_the_named_rows_and_keeps_the_others(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "cmp"
    compare = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(config), "--out", str(out)]

    def run(*arguments: str) -> dict:
        result = subprocess.run([*compare, *arguments], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return json.loads((out / "comparison.json").read_text())

    first = run("--methods", "stl", "den", "--epochs", "2", "--seeds", "0", "1")
    updated = run("--update", "--methods", "den-selective", "den")
    methods = ["DEN", "DNN-Selective (selection only)", "one network per task"]
    assert [row["method"] for row in updated["rows"]] == methods
    assert updated["seeds"] == [0, 1] and updated["epochs"] == 2 and updated["rerun"] == ["den-selective", "den"]
    kept, rerun = first["rows"][1], updated["rows"][0]  # STL kept as it was; DEN re-run gives the same scores
    assert updated["rows"][2] == kept
    assert {key: rerun[key] for key in ("accuracy", "forward_transfer")} == {
        key: first["rows"][0][key] for key in ("accuracy", "forward_transfer")
    }
    assert updated["rows"][1]["forward_transfer"] is not None  # against the kept STL row's scores
    title = (out / "comparison.md").read_text().splitlines()[0]
    assert title.endswith("; re-run later with --update: DNN-Selective (selection only) | DEN")
    result = subprocess.run([*compare, "--update", "--seeds", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "--update re-runs rows of the comparison in --out" in result.stderr


def test_ewc_lambda_is_tuned_on_a_validation_split_of_the_training_data(tmp_path, monkeypatch):
    compare = load_compare()
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    streams, scores = [], {1.0: 0.7, 1000.0: 0.9}

    def recorded_run(model_fn, callback_fn, datamodule, folder, seed):
        callback = callback_fn()
        streams.append((datamodule, callback.method.ewc_lambda))
        accuracy = scores.get(callback.method.ewc_lambda, 0.5) if len(streams) <= 2 else 0.5
        rows = [[accuracy] * (i + 1) for i in range(3)]
        return {"auroc": rows, "accuracy": rows, "parameters_after_task": [1, 2, 3], "seconds": 0.0, "epochs": 3}

    monkeypatch.setattr(compare, "run_method", recorded_run)
    out = tmp_path / "cmp"
    compare.main([str(config), "--methods", "ewc", "--ewc-lambdas", "1", "1000", "--epochs", "1", "--out", str(out)])
    (tuning_1, lambda_1), (tuning_2, lambda_2), (final, lambda_final) = streams
    assert (lambda_1, lambda_2, lambda_final) == (1.0, 1000.0, 1000.0)  # the best on validation is used
    assert tuning_1 is tuning_2 and final is not tuning_1
    for task in range(final.num_tasks):  # tuning saw training rows only: its "test" split is held-out training data
        train_rows = {tuple(row.tolist()) for row in final.train_tasks[task][0]}
        test_rows = {tuple(row.tolist()) for row in final.test_tasks[task][0]}
        held_out = {tuple(row.tolist()) for row in tuning_1.test_tasks[task][0]}
        assert held_out <= train_rows and not held_out & test_rows
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["ewc_lambda"] == 1000.0
    assert saved["ewc_validation_scores"] == {"1.0": pytest.approx(0.7), "1000.0": pytest.approx(0.9)}
    assert "EWC lambda 1000 (chosen on a validation split" in (out / "comparison.md").read_text()


def load_compare():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compare
    finally:
        sys.path.pop(0)
    return compare


def test_the_validation_stream_holds_out_part_of_each_tasks_training_data_and_no_test_data():
    validation_stream = load_compare().validation_stream
    from lightning_den import SplitDigits

    stream = SplitDigits(num_tasks=2)
    held_out = validation_stream(stream, seed=0)
    for task in range(2):
        (train, _), (validation, _) = held_out.train_tasks[task], held_out.test_tasks[task]
        assert len(train) + len(validation) == len(stream.train_tasks[task][0])
        rows = {tuple(row.tolist()) for row in stream.train_tasks[task][0]}
        assert all(tuple(row.tolist()) in rows for row in validation)  # taken from the training data


def test_compare_runs_every_method_on_a_users_own_model_class(tmp_path):
    from tests.test_cli import USER_MODULE

    (tmp_path / "mypkg.py").write_text(USER_MODULE)
    config = TINY.split("model:")[0] + "model:\n  class_path: mypkg.MyModel\n  init_args:\n    hidden: 12\ndata:"
    config += TINY.split("data:", 1)[1]
    (tmp_path / "mine.yaml").write_text(config)
    out = tmp_path / "cmp"
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "mine.yaml", "--epochs", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["method"]: row for row in json.loads((out / "comparison.json").read_text())["rows"]}
    assert len(rows) == 10 and "widths [12]" in (out / "comparison.md").read_text()
    first, last = rows["one network per task"]["parameters_after_task"][::2]  # STL: one independent copy per task
    assert last == 3 * first and rows["Progressive Networks"]["parameters_after_task"][-1] > last


def test_compare_runs_every_method_on_a_convolutional_configuration_with_each_methods_cnn(tmp_path):
    from lightning_den.baselines import PackNetCNNModel, ProgressiveCNNModel
    from tests.helpers import TINY_CNN_CONFIG

    (tmp_path / "cnn.yaml").write_text(TINY_CNN_CONFIG)
    out = tmp_path / "cmp"
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "cnn.yaml", "--epochs", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["method"]: row for row in json.loads((out / "comparison.json").read_text())["rows"]}
    assert len(rows) == 10 and "widths [3, 4, 6]" in (out / "comparison.md").read_text()
    shape = dict(in_shape=[1, 8, 8], channels=[3, 4], hidden_sizes=[6], num_classes=2, kernel_size=3, padding=1)
    one_cnn = ProgressiveCNNModel(**shape, lateral=False).columns.num_parameters()
    assert rows["one network per task"]["parameters_after_task"] == [one_cnn, 2 * one_cnn, 3 * one_cnn]
    assert rows["Progressive Networks"]["parameters_after_task"][-1] > 3 * one_cnn  # conv lateral adapters too
    packnet = PackNetCNNModel(**shape).net.num_parameters()  # a fixed CNN: only the heads come on top
    assert rows["PackNet"]["parameters_after_task"] == [packnet, packnet + 14, packnet + 28]
    assert rows["PackNet"]["largest_drop"] == 0.0 and rows["Progressive Networks"]["largest_drop"] == 0.0


def test_tune_scores_each_value_of_a_den_setting_on_the_validation_split_over_seeds(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "tuning"
    arguments = ["--setting", "units_per_expansion", "--values", "2", "6", "--seeds", "0", "1", "--out", str(out)]
    command = [sys.executable, str(ROOT / "benchmarks" / "tune.py"), str(config), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((out / "den_units_per_expansion.json").read_text())
    assert list(saved["scores"]) == ["2", "6"] and saved["seeds"] == [0, 1]
    for value, per_seed in saved["scores"].items():
        assert len(per_seed) == 2 and all(0.0 <= score <= 1.0 for score in per_seed)
        for seed, score in zip((0, 1), per_seed, strict=True):  # each score is the run's own final average
            run = out / "tuning" / f"den_units_per_expansion_{value}" / f"seed_{seed}"
            metrics = json.loads((run / "continual_metrics.json").read_text())
            assert metrics["summary"]["average_auroc"] == pytest.approx(score)
    small, large = (statistics.fmean(run["parameters"] for run in saved["costs"][v]) for v in ("2", "6"))
    assert large > small  # more units per expansion grew more parameters: the setting reached DEN
    table = (out / "den_units_per_expansion.md").read_text().splitlines()
    row = next(line for line in table if line.startswith("| 6 |"))
    assert f"{statistics.fmean(saved['scores']['6']):.4f}" in row


def test_tune_holds_other_settings_fixed_takes_one_value_per_layer_and_scores_the_reference(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "tuning"
    fixed = ["--with", "units_per_expansion=[0,2]", "--with", "split_threshold=1000", "--with", "early_expansion=true"]
    fixed += ["--with", "selective_epochs=4"]
    arguments = ["--setting", "drift_penalty", "--values", "0.5", *fixed, "--seeds", "0", "--reference"]
    command = [sys.executable, str(ROOT / "benchmarks" / "tune.py"), str(config), *arguments, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name = "den_drift_penalty_with_units_per_expansion_0-2_with_split_threshold_1000_with_early_expansion_true"
    name += "_with_selective_epochs_4"
    saved = json.loads((out / f"{name}.json").read_text())
    held = {"units_per_expansion": [0, 2], "split_threshold": 1000, "early_expansion": True, "selective_epochs": 4}
    assert saved["fixed"] == held
    run = json.loads((out / "tuning" / f"{name}_0.5" / "seed_0" / "continual_metrics.json").read_text())
    assert run["summary"]["average_auroc"] == pytest.approx(saved["scores"]["0.5"][0])
    assert {widths[0] for widths in run["widths"]} == {12}  # no unit added to the first layer: the fixed list held
    assert run["widths"][-1][1] > 8  # and the second grew
    # loss_threshold 0 is out of reach: early expansion ended each selective retraining after 2 of its 4 epochs
    assert [epochs["selective"] for epochs in run["phase_epochs"][1:]] == [2, 2]
    stl = json.loads((out / "tuning" / "stl" / "seed_0" / "continual_metrics.json").read_text())
    assert saved["reference"]["scores"] == [pytest.approx(stl["summary"]["average_auroc"])]
    assert saved["reference"]["costs"][0]["parameters"] == stl["parameters_after_task"][-1]
    table = (out / f"{name}.md").read_text()
    assert "(with units_per_expansion 0-2, split_threshold 1000, early_expansion true, selective_epochs 4)" in table
    assert f"| one network per task | {saved['reference']['scores'][0]:.4f} |" in table
    refused = subprocess.run(
        [*command[:3], "--setting", "drift_penalty", "--values", "[0.5,x]"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert refused.returncode != 0 and "a list of numbers such as [40,10]" in refused.stderr
    for wrong, message in [
        (["--values", "0.5", "[1,2]"], "drift_penalty takes one number, got 1-2"),  # checked before any run
        (["--values", "0.5", "--with", "drift_penalty=1"], "drift_penalty is the --setting being tuned"),
        (["--values", "0.5", "--with", "split_threshold=1", "--with", "split_threshold=2"], "is already given"),
        (["--values", "true"], "drift_penalty takes numbers, got true"),
        (["--values", "0.5", "--with", "early_expansion=1"], "early_expansion takes true or false, got 1"),
        (["--values", "0.5", "--with", "early_expanson=true"], "DENCallback has no numeric or on/off setting"),
    ]:
        refused = subprocess.run([*command[:3], "--setting", "drift_penalty", *wrong], capture_output=True, text=True)
        assert refused.returncode != 0 and message in refused.stderr


def test_a_den_variant_changes_a_phases_epochs_or_a_setting_on_a_copy_and_refuses_an_unknown_name():
    from lightning_den import DENCallback

    compare = load_compare()
    den = DENCallback(split_epochs=5, drift_penalty=3.0, convergence_tol=0.01)
    variant = compare.den_variant(den, 7, split_epochs=20, drift_penalty=1.0, convergence_tol=0.0)
    assert variant.method.epochs.split == 20 and variant.method.phase_epochs("split") == 20
    assert (variant.method.drift_penalty, variant.convergence_tol, variant.method.seed) == (1.0, 0.0, 7)
    assert den.method.epochs.split == 5 and den.method.drift_penalty == 3.0 and den.convergence_tol == 0.01
    assert compare.den_setting(variant, "split_epochs") == 20 and compare.den_setting(den, "expansion") is True
    with pytest.raises(ValueError, match="no setting 'split_epoch'"):
        compare.den_variant(den, 0, split_epoch=20)
