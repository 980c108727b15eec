"""The ``lightning-den`` command end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TINY = """
seed_everything: 0
model:
  class_path: lightning_den.DENMLP
  init_args:
    in_features: 64
    hidden_sizes: [12, 8]
    num_classes: 2
    optimizer:
      class_path: torch.optim.Adam
      init_args:
        lr: 0.01
data:
  class_path: lightning_den.data.SplitDigits
  init_args:
    num_tasks: 3
trainer:
  accelerator: cpu
  devices: 1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_den.DENCallback
      init_args:
        first_task_epochs: 3
        head_fit_epochs: 2
        selective_epochs: 2
        expansion_epochs: 2
        split_epochs: 2
        loss_threshold: 0.0
        sparsity_l1: 0.05
    - class_path: lightning_den.TaskEvaluation
"""


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lightning_den.cli", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "tiny.yaml").write_text(TINY)
    run_cli("fit", "--config", "tiny.yaml", cwd=folder)
    return folder, folder / "lightning_logs" / "version_0"


def test_fit_writes_sane_metrics_and_plots(fitted):
    _, run = fitted
    saved = json.loads((run / "continual_metrics.json").read_text())
    assert saved["tasks"] == 3 and [len(row) for row in saved["accuracy"]] == [1, 2, 3]
    assert all(0.0 <= value <= 1.0 for row in saved["accuracy"] + saved["auroc"] for value in row)
    assert saved["summary"]["average_accuracy"] > 0.8  # digit pairs are easy even in a few epochs
    assert saved["widths"][0] == [12, 8] and all(w >= 12 for w, _ in saved["widths"])
    assert saved["parameters_after_task"] == sorted(saved["parameters_after_task"])  # DEN only grows
    for name in ("accuracy_matrix.png", "widths.png", "parameters.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_evaluation_subcommands_load_the_grown_checkpoint(fitted, subcommand):
    folder, run = fitted
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    overrides = ["--trainer.limit_val_batches", "1.0"]  # the training config skips validation
    result = run_cli(subcommand, "--config", "tiny.yaml", *overrides, "--ckpt_path", str(checkpoint), cwd=folder)
    # one dataloader per seen task, each through its own timestamped network
    prefix = "test" if subcommand == "test" else "val"
    for task in range(3):
        assert f"{prefix}/acc/task_{task}" in result.stdout


def test_print_config_round_trips(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    printed = run_cli("fit", "--config", "tiny.yaml", "--print_config", cwd=tmp_path).stdout
    (tmp_path / "printed.yaml").write_text(printed)
    again = run_cli("fit", "--config", "printed.yaml", "--print_config", cwd=tmp_path).stdout
    assert yaml.safe_load(again) == yaml.safe_load(printed)
    config = yaml.safe_load(printed)
    assert config["trainer"]["max_epochs"] == -1 and config["trainer"]["reload_dataloaders_every_n_epochs"] == 1
    assert config["trainer"]["callbacks"][0]["init_args"]["split_epochs"] == 2


def test_help_lists_the_subcommands(tmp_path):
    out = run_cli("--help", cwd=tmp_path).stdout
    assert all(word in out for word in ("fit", "validate", "test"))


@pytest.mark.parametrize("config", ["progressive_digits.yaml", "packnet_digits.yaml"])
def test_other_methods_run_from_their_configs_without_forgetting(tmp_path, config):
    path = Path(__file__).resolve().parents[1] / "examples" / config
    run_cli("fit", "--config", str(path), "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    saved = json.loads((tmp_path / "lightning_logs" / "version_0" / "continual_metrics.json").read_text())
    assert saved["tasks"] == 5 and saved["summary"]["average_accuracy"] > 0.9
    assert saved["summary"]["backward_transfer"] == 0.0 and saved["summary"]["forgetting"] == 0.0
