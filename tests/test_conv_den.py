"""DEN on a convolutional block through Lightning: ``DENCNN`` (filters are units) on the 8x8 digits, with
Lightning's defaults on (validation, logger, checkpoints), frozen entries checked after every step, and a
run resumed from the middle of an expansion ending bit for bit where an uninterrupted one ends."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_den import DENCNN, DENMLP, DENCallback, SplitDigits, TaskEvaluation
from lightning_den.core.den.conv import ExpandableConv2d
from tests.helpers import CheckFrozenEntries, CrashAt, short_phases, tiny_cnn

SETTINGS = short_phases(loss_threshold=0.0, split_threshold=0.0)  # every phase runs; every drifted filter splits
PROBE = torch.rand(7, 64, generator=torch.Generator().manual_seed(3))


def default_trainer(folder, callbacks, **overrides) -> pl.Trainer:
    """A Trainer as users write one: validation, logger, checkpointing left on."""
    settings = dict(max_epochs=-1, reload_dataloaders_every_n_epochs=1, accelerator="cpu", devices=1,
                    default_root_dir=folder, enable_model_summary=False, enable_progress_bar=False)  # fmt: skip
    return pl.Trainer(callbacks=callbacks, **{**settings, **overrides})


def test_den_grows_filters_on_the_digits_with_lightnings_defaults_and_keeps_frozen_entries_exact(tmp_path):
    pl.seed_everything(0, verbose=False)
    checker = CheckFrozenEntries()
    evaluation = TaskEvaluation(print_report=False, plots=False)
    model = tiny_cnn(functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.5, fused=True))
    trainer = default_trainer(tmp_path, [DENCallback(**SETTINGS), checker, evaluation])
    trainer.fit(model, datamodule=SplitDigits(num_tasks=3))
    assert checker.checked_steps > 0 and {"head_fit", "selective", "expansion", "split"} <= checker.phases_seen
    convolutions = [layer for layer in model.cnn.hidden if isinstance(layer, ExpandableConv2d)]
    for layer in convolutions:  # filters born in later tasks: grown by expansion and split
        assert set(layer.birth.tolist()) >= {0, 1, 2}
    summary = evaluation.summary
    assert summary["complete"] and summary["widths"][-1] == list(model.cnn.widths(2))
    assert summary["parameters_after_task"][-1] == model.cnn.num_parameters_through(2)
    one_network = model.cnn.parameters_of([3, 4, 6], 2)
    assert summary["capacity"]["single_task_parameters"] == 3 * one_network
    validated = {key for key in trainer.logged_metrics if key.startswith("val/acc/task_")}
    assert validated == {"val/acc/task_0", "val/acc/task_1", "val/acc/task_2"}
    with torch.no_grad():  # timestamped inference: each task through its own filters and head
        assert model(PROBE, task=0).shape == (7, 2)


def run(folder, extra=(), ckpt_path=None) -> DENCNN:
    pl.seed_everything(0, verbose=False)
    model = tiny_cnn()
    checkpoint = ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True)
    trainer = default_trainer(folder, [*extra, DENCallback(**SETTINGS), checkpoint], limit_val_batches=0)
    trainer.fit(model, datamodule=SplitDigits(num_tasks=3), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("crash_epoch", [8, 11])  # in expansion (new filters separated), between tasks
def test_a_cnn_resumed_from_a_checkpoint_ends_bit_for_bit_where_an_uninterrupted_run_ends(tmp_path, crash_epoch):
    whole = run(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed", extra=[CrashAt(crash_epoch)])
    resumed = run(tmp_path / "crashed", ckpt_path=str(tmp_path / "crashed" / "checkpoints" / "last.ckpt"))
    assert resumed.cnn.architecture() == whole.cnn.architecture()
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert a == b if name.endswith("_extra_state") else torch.equal(a, b), name


def test_a_cnn_checkpoint_loads_into_a_fresh_model_and_an_mlp_checkpoint_is_refused(tmp_path):
    model = run(tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    loaded = DENCNN.load_from_checkpoint(last, optimizer=torch.optim.Adam)
    with torch.no_grad():
        for task in range(3):
            assert torch.equal(loaded(PROBE, task=task), model(PROBE, task=task))
    mlp_weights = {name.removeprefix("mlp."): value for name, value in DENMLP(64, [6], 2).state_dict().items()}
    with pytest.raises(ValueError, match="block of type ExpandableMLP where this model has one of type ExpandableCNN"):
        tiny_cnn().cnn.load_state_dict(mlp_weights)


class UsersConvModule(pl.LightningModule):
    """Written without lightning_den in mind: a plain nn.Sequential of convolutions, pooling and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(6 * 2 * 2, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x.view(-1, 1, 8, 8))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_den_grows_the_filters_of_a_users_plain_convolutional_module_and_loads_it_back(tmp_path):
    import lightning_den

    pl.seed_everything(0, verbose=False)
    model = UsersConvModule()
    trainer = default_trainer(tmp_path, [DENCallback(**SETTINGS), TaskEvaluation(print_report=False, plots=False)])
    trainer.fit(model, datamodule=SplitDigits(num_tasks=3))
    block = model.net
    assert type(block).__name__ == "ExpandableCNN" and block.tasks_learned == 3
    first, second = (layer for layer in block.hidden if isinstance(layer, ExpandableConv2d))
    assert first.out_features > 4 and second.out_features > 6  # both convolutions gained filters
    checkpoint = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    loaded = lightning_den.load_grown(UsersConvModule(), checkpoint)
    with torch.no_grad():
        for task in range(3):
            with lightning_den.task(model, task), lightning_den.task(loaded, task):
                assert torch.equal(loaded(PROBE), model(PROBE))


def test_conv_split_threshold_applies_to_the_filters_and_split_threshold_to_the_units(tmp_path):
    recorder = RecordSplits()
    settings = {**SETTINGS, "conv_split_threshold": 1e9}  # no filter drifts that far; every unit above 0 splits
    trainer = default_trainer(tmp_path, [DENCallback(**settings), recorder], limit_val_batches=0)
    trainer.fit(tiny_cnn(), datamodule=SplitDigits(num_tasks=2))
    (split,) = recorder.splits
    assert split[0] == [] and split[1] == []  # the two convolutions
    assert split[2]  # the fully connected layer split its drifted units
    with pytest.raises(MisconfigurationException, match="`conv_split_threshold` must be a finite number >= 0"):
        DENCallback(conv_split_threshold=-1.0)


class RecordSplits(Callback):
    def __init__(self) -> None:
        self.splits = []

    def on_task_boundary(self, trainer, pl_module, boundary) -> None:
        if "split" in boundary.changes:
            self.splits.append(boundary.changes["split"])
