"""Progressive Networks and PackNet on convolutional blocks through Lightning, with its defaults on (validation,
logger, checkpoints): zero forgetting bit for bit, checkpoints that load back, and a user's own plain
convolutional module converted by each callback."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_den import SplitDigits, TaskBoundary, load_grown, task
from lightning_den.baselines import PackNetCallback, PackNetCNNModel, ProgressiveCallback, ProgressiveCNNModel
from lightning_den.core.packnet import PackNetCNN
from lightning_den.core.progressive import ProgressiveCNN
from lightning_den.module import DENLightningModule

PROBE = torch.rand(7, 64, generator=torch.Generator().manual_seed(3))
SHAPE = dict(in_shape=[1, 8, 8], channels=[3, 4], hidden_sizes=[6], num_classes=2, kernel_size=3, padding=1)
OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)


class OutputsAtTaskEnd(Callback):
    """Each task's outputs on the probe right after it ends, and again at the end of the stream."""

    def __init__(self) -> None:
        self.at_end: dict[int, torch.Tensor] = {}
        self.final: dict[int, torch.Tensor] = {}

    def on_task_boundary(self, trainer, pl_module, boundary: TaskBoundary) -> None:
        if boundary.ended_task is not None:
            self.at_end[boundary.ended_task] = outputs_of(pl_module, boundary.ended_task)
        if boundary.finished:
            self.final = {t: outputs_of(pl_module, t) for t in self.at_end}


@torch.no_grad()
def outputs_of(model: pl.LightningModule, task_id: int) -> torch.Tensor:
    """The model's outputs on the probe for ``task_id``, routed as users route a model whose forward has no task."""
    with task(model, task_id):
        return model(PROBE).clone()


def fit(folder, model: pl.LightningModule, callback: Callback, *extra: Callback) -> pl.Trainer:
    """Three digit tasks under a Trainer as users write one: validation, logger and checkpoints on."""
    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True)
    trainer = pl.Trainer(
        max_epochs=-1,
        reload_dataloaders_every_n_epochs=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=folder,
        callbacks=[callback, checkpoint, *extra],
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=SplitDigits(num_tasks=3))
    return trainer


def assert_never_forgot(outputs: OutputsAtTaskEnd) -> None:
    assert sorted(outputs.at_end) == [0, 1, 2]
    for t, before in outputs.at_end.items():
        assert torch.equal(outputs.final[t], before), f"task {t} changed"


@pytest.mark.parametrize("lateral", [True, False])
def test_convolutional_progressive_networks_never_forget_and_load_back_from_their_checkpoint(tmp_path, lateral):
    outputs = OutputsAtTaskEnd()
    model = ProgressiveCNNModel(**SHAPE, lateral=lateral, optimizer=OPTIMIZER)
    trainer = fit(tmp_path, model, ProgressiveCallback(epochs_per_task=3), outputs)
    assert_never_forgot(outputs)
    assert {key for key in trainer.logged_metrics if key.startswith("val/acc/task_")} == {
        f"val/acc/task_{t}" for t in range(3)
    }
    single, total = model.columns.num_parameters(0), model.columns.num_parameters()
    assert total > 3 * single if lateral else total == 3 * single  # laterals on top of three CNNs, or none
    loaded = ProgressiveCNNModel.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    for t in range(3):
        assert torch.equal(outputs_of(loaded, t), outputs.final[t])


def test_convolutional_packnet_never_forgets_and_shares_out_kernel_entries(tmp_path):
    outputs = OutputsAtTaskEnd()
    model = PackNetCNNModel(**SHAPE, optimizer=OPTIMIZER)
    fit(tmp_path, model, PackNetCallback(prune_fraction=0.5, train_epochs=3, retrain_epochs=2), outputs)
    assert_never_forgot(outputs)
    filters = model.net.owner_0  # [3 filters, 1 channel, 3, 3]: every kernel entry has its task
    assert filters.shape == (3, 1, 3, 3) and set(filters.unique().tolist()) == {1, 2, 3}
    with torch.no_grad():  # each task computes from the entries it and earlier tasks own, nothing else
        for t in reversed(range(3)):
            for layer, owner in zip(model.net.hidden, model.net.owners(), strict=True):
                layer.weight[owner > t + 1] = 1e3
            assert torch.equal(outputs_of(model, t), outputs.final[t])
    loaded = PackNetCNNModel.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.equal(loaded.net.owner_0, model.net.owner_0)


class PlainConvModule(DENLightningModule):
    """A user's convolutional classifier, written as a plain ``nn.Sequential``."""

    def __init__(self) -> None:
        super().__init__(optimizer=OPTIMIZER)
        self.net = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(48, 6), nn.ReLU(), nn.Linear(6, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        return self.net(x.view(-1, 1, 8, 8))


@pytest.mark.parametrize(
    ("callback", "block_type"),
    [
        (lambda: ProgressiveCallback(epochs_per_task=2), ProgressiveCNN),
        (lambda: PackNetCallback(train_epochs=2, retrain_epochs=1), PackNetCNN),
    ],
)
def test_each_callback_converts_a_users_plain_convolutional_module_and_it_loads_back(tmp_path, callback, block_type):
    outputs = OutputsAtTaskEnd()
    model = PlainConvModule()
    fit(tmp_path, model, callback(), outputs)
    assert isinstance(model.net, block_type)
    assert_never_forgot(outputs)
    loaded = load_grown(PlainConvModule(), tmp_path / "checkpoints" / "last.ckpt")
    for t in range(3):
        assert torch.equal(outputs_of(loaded, t), outputs.final[t])
