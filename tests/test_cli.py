"""The ``lightning-den`` command end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_CONFIG as TINY

#: slow lane (`make test-slow`): every test runs the `lightning-den` command in a subprocess
pytestmark = pytest.mark.slow


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
    with open(run / "metrics.csv") as handle:  # validation ran on every seen task under stable names
        logged = {name for row in csv.DictReader(handle) for name, value in row.items() if value}
    assert {"val/acc/avg", "val/loss/avg", "val/acc/task_0", "val/acc/task_2"} <= logged


@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_evaluation_subcommands_load_the_grown_checkpoint(fitted, subcommand):
    folder, run = fitted
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    result = run_cli(subcommand, "--config", "tiny.yaml", "--ckpt_path", str(checkpoint), cwd=folder)
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


def test_a_finished_run_goes_on_with_more_tasks_from_its_checkpoint(fitted):
    folder, run = fitted
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    run_cli(
        "fit", "--config", "tiny.yaml", "--data.init_args.num_tasks", "5", "--ckpt_path", str(checkpoint), cwd=folder
    )
    reports = [json.loads(path.read_text()) for path in folder.glob("lightning_logs/version_*/continual_metrics.json")]
    (saved,) = [report for report in reports if report["tasks"] == 5]  # the continued run's, next to the first
    assert saved["complete"] and [len(row) for row in saved["accuracy"]] == [1, 2, 3, 4, 5]


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("config", ["split_digits.yaml", "progressive_digits.yaml", "packnet_digits.yaml"])
def test_the_digit_configs_run_as_printed_with_validation_on(tmp_path, config):
    run_cli("fit", "--config", str(EXAMPLES / config), "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    saved = json.loads((run / "continual_metrics.json").read_text())
    assert saved["tasks"] == 5 and saved["complete"] and saved["summary"]["average_accuracy"] > 0.9
    if config != "split_digits.yaml":  # Progressive Networks and PackNet never forget
        assert saved["summary"]["backward_transfer"] == 0.0 and saved["summary"]["forgetting"] == 0.0
    with open(run / "metrics.csv") as handle:
        assert any(row.get("val/acc/task_4") for row in csv.DictReader(handle))


MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.mark.skipif(not MNIST.exists(), reason="needs the shared MNIST files")
@pytest.mark.parametrize("config", ["permuted_mnist.yaml", "mnist_variation.yaml", "split_mnist_cnn.yaml"])
def test_the_mnist_configs_run_with_validation_on(tmp_path, config):
    # the configs as printed, cut to two tasks of a few batches: the full runs take minutes (see the README)
    quick = ["--data.init_args.num_tasks=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2"]
    options = ["--data.init_args.root", str(MNIST), *quick, "--trainer.enable_progress_bar=false"]
    run_cli("fit", "--config", str(EXAMPLES / config), *options, cwd=tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    assert json.loads((run / "continual_metrics.json").read_text())["tasks"] == 2
    with open(run / "metrics.csv") as handle:
        assert any(row.get("val/acc/task_1") for row in csv.DictReader(handle))


USER_MODULE = """
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class MyModel(pl.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.01):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
"""


USER_CONFIG = """
seed_everything: 0
model:
  class_path: mypkg.MyModel
  init_args:
    hidden: 12
data:
  class_path: lightning_den.data.SplitDigits
  init_args:
    num_tasks: 3
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  callbacks:
    - class_path: {callback}
      init_args: {settings}
    - class_path: lightning_den.TaskEvaluation
"""


@pytest.mark.parametrize(
    ("callback", "settings"),
    [
        (
            "lightning_den.DENCallback",
            "{first_task_epochs: 3, head_fit_epochs: 2, selective_epochs: 2, "
            "expansion_epochs: 2, split_epochs: 2, loss_threshold: 0.0}",
        ),
        ("lightning_den.ProgressiveCallback", "{epochs_per_task: 2}"),
        ("lightning_den.PackNetCallback", "{train_epochs: 2, retrain_epochs: 1}"),
    ],
)
def test_the_cli_runs_a_users_own_plain_module_from_its_class_path(tmp_path, callback, settings):
    (tmp_path / "mypkg.py").write_text(USER_MODULE)
    (tmp_path / "mine.yaml").write_text(USER_CONFIG.format(callback=callback, settings=settings))
    run_cli("fit", "--config", "mine.yaml", cwd=tmp_path)
    saved = json.loads(next(tmp_path.rglob("continual_metrics.json")).read_text())
    assert saved["tasks"] == 3 and saved["complete"]
