"""DEN, Progressive Networks and PackNet on a user's own LightningModule, unchanged: its ``nn.Sequential`` of
Linear layers is converted in place, its ``forward(x)``, ``training_step`` and ``configure_optimizers`` stay
as written, with Lightning's defaults on (logger, checkpointing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_den
from lightning_den import DENCallback, PackNetCallback, ProgressiveCallback, TaskEvaluation
from lightning_den.baselines import EWCCallback
from tests.helpers import IN_FEATURES, TwoChains, UserModule, short_phases, tiny_stream


def trainer(tmp_path, callbacks) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=-1,
        reload_dataloaders_every_n_epochs=1,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        callbacks=callbacks,
    )


class OutputsAtTaskEnds(Callback):
    """Task 0's outputs on fixed inputs, whenever a task ends (through the model's own ``forward(x)``)."""

    def __init__(self) -> None:
        self.x, self.outputs = torch.randn(9, IN_FEATURES), []

    def on_task_boundary(self, trainer, pl_module, boundary) -> None:
        if boundary.ended_task is not None:
            with torch.no_grad(), lightning_den.task(pl_module, 0):
                self.outputs.append(pl_module(self.x).clone())


METHODS = {
    "den": lambda **kw: DENCallback(**short_phases(loss_threshold=0.0), **kw),
    "pnn": lambda **kw: ProgressiveCallback(epochs_per_task=2, **kw),
    "packnet": lambda **kw: PackNetCallback(train_epochs=2, retrain_epochs=1, prune_fraction=0.75, **kw),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_users_module_trains_the_whole_sequence_as_written(tmp_path, method):
    torch.manual_seed(0)
    model, watch = UserModule(), OutputsAtTaskEnds()
    x = torch.randn(5, IN_FEATURES)
    before = model(x)
    callback = METHODS[method]()
    trainer(tmp_path, [callback, watch, TaskEvaluation()]).fit(model, datamodule=tiny_stream(5))
    assert isinstance(model.net, callback.method.block_type) and model.net.num_tasks == 5
    assert model.net.tasks_learned == 5 and model.net.active_task == 4
    assert not torch.equal(model(x), before)  # it trained (and forward(x) reaches the last task's head)
    summary = json.loads(next(tmp_path.rglob("continual_metrics.json")).read_text())
    assert summary["complete"] and len(summary["accuracy"]) == 5 and len(watch.outputs) == 5
    if method in ("pnn", "packnet"):  # zero forgetting, bit for bit, through the user's forward(x)
        assert all(torch.equal(outputs, watch.outputs[0]) for outputs in watch.outputs)


class EvaluatedUserModule(UserModule):
    """Validation, test and predict written as for any Lightning module: ``self(x)``, no task argument."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_users_evaluation_scores_each_task_of_the_stream_through_its_own_network(tmp_path, method):
    torch.manual_seed(0)
    model, stream = EvaluatedUserModule(), tiny_stream(3)
    run = trainer(tmp_path, [METHODS[method]()])  # validation and its sanity check on, as Lightning's defaults
    run.fit(model, datamodule=stream)
    assert {f"val_acc/dataloader_idx_{task}" for task in range(3)} <= set(run.callback_metrics)
    predicted = run.predict(model, datamodule=stream)
    scores = run.test(model, datamodule=stream, verbose=False)
    model.eval()
    for task in range(3):
        with torch.no_grad(), lightning_den.task(model, task):
            batches = [(model(x), y) for x, y in stream.task_dataloader(task, "test")]
        assert all(torch.equal(got, want) for got, (want, _) in zip(predicted[task], batches, strict=True))
        correct = sum(int((logits.argmax(-1) == y).sum()) for logits, y in batches)
        accuracy = correct / sum(len(y) for _, y in batches)
        assert scores[task][f"test_acc/dataloader_idx_{task}"] == pytest.approx(accuracy)
    assert model.net.active_task == 2  # forward(x) is routed to the newest task again
    fresh = tiny_stream(3)  # standing at task 0: evaluation asks it for every task the model holds
    logged = {name for scores in run.test(model, datamodule=fresh, verbose=False) for name in scores}
    assert logged == {f"test_acc/dataloader_idx_{task}" for task in range(3)}
    model.net.active_task = 1
    run.validate(model, datamodule=fresh)  # loaders of tasks 0..2, the last one task 2's
    assert model.net.active_task == 1  # given back the task of before, not left on the last loader's
    model.net.active_task = 2

    x = torch.randn(7, IN_FEATURES)  # loaders of the user's own are not a task stream: left alone
    stream.set_task(0)  # the Trainer still holds the fit's datamodule; it must not be moved either
    (own,) = run.predict(model, dataloaders=DataLoader(TensorDataset(x), batch_size=7))
    assert torch.equal(own, model(x)) and stream.current_task == 0

    ahead = tiny_stream(3)
    ahead.set_task(2)
    shorter = EvaluatedUserModule()
    trainer(tmp_path, [METHODS[method]()]).fit(shorter, datamodule=tiny_stream(2))
    shorter.net.active_task = 0
    with pytest.raises(
        ValueError, match=r"serves tasks 0\.\.2, but the model holds tasks 0\.\.1: the datamodule stands ahead"
    ):
        trainer(tmp_path, [METHODS[method]()]).validate(shorter, datamodule=ahead)
    assert shorter.net.active_task == 0  # the evaluation that raised gave back the task of before


class ScoresPerEpoch(UserModule):
    """Adds up each loader's hits in ``validation_step`` and logs per-task names once an epoch (README)."""

    def on_validation_epoch_start(self) -> None:
        self.hits = {}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        hits = self.hits.setdefault(dataloader_idx, [0, 0])
        hits[0] += int((self(x).argmax(-1) == y).sum())
        hits[1] += len(y)

    def on_validation_epoch_end(self) -> None:
        scores = {f"val_acc/task_{task}": hit / seen for task, (hit, seen) in self.hits.items()}
        self.log_dict({**scores, "val_acc/avg": sum(scores.values()) / len(scores)})


def test_names_logged_once_an_epoch_can_be_monitored_through_the_whole_sequence(tmp_path):
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_acc/avg", mode="max")
    model, run = ScoresPerEpoch(), trainer(tmp_path, [DENCallback(**short_phases()), best])
    run.fit(model, datamodule=tiny_stream(3))
    assert model.net.tasks_learned == 3 and best.best_model_score is not None
    assert {f"val_acc/task_{task}" for task in range(3)} <= set(run.callback_metrics)


class FailsAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("stopped before training")


def test_a_run_resumed_at_a_task_boundary_skips_only_the_sanity_check_of_the_task_to_come(tmp_path):
    torch.manual_seed(0)
    latest = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [DENCallback(**short_phases()), latest]).fit(EvaluatedUserModule(), datamodule=tiny_stream(2))
    last = tmp_path / "ckpt" / "last.ckpt"
    failing = trainer(tmp_path, [FailsAtTrainStart(), DENCallback(**short_phases())])
    with pytest.raises(RuntimeError, match="stopped before training"):
        failing.fit(EvaluatedUserModule(), datamodule=tiny_stream(3), ckpt_path=last)
    assert failing.num_sanity_val_steps == 2  # given back by a fit that never started training
    resumed, run = EvaluatedUserModule(), trainer(tmp_path, [DENCallback(**short_phases())])
    run.fit(resumed, datamodule=tiny_stream(3), ckpt_path=last)  # task 2 comes next
    assert resumed.net.tasks_learned == 3 and run.num_sanity_val_steps == 2
    assert {f"val_acc/dataloader_idx_{task}" for task in range(3)} <= set(run.callback_metrics)


def test_a_converted_module_resumes_from_its_checkpoint_and_loads_into_a_fresh_instance(tmp_path):
    torch.manual_seed(0)
    first = UserModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [DENCallback(**short_phases()), checkpoint]).fit(first, datamodule=tiny_stream(2))
    last = tmp_path / "ckpt" / "last.ckpt"

    resumed = UserModule()  # a fresh, unconverted instance: the callback converts it, the checkpoint grows it
    trainer(tmp_path, [DENCallback(**short_phases())]).fit(resumed, datamodule=tiny_stream(3), ckpt_path=last)
    assert resumed.net.num_tasks == 3 and resumed.net.tasks_learned == 3

    class Tested(UserModule):
        def test_step(self, batch, batch_idx, dataloader_idx=0):  # one test dataloader per task
            with lightning_den.task(self, dataloader_idx):
                self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    # the callback converts a fresh instance at setup, so Lightning loads the grown checkpoint into it
    tested = Tested()
    scores = trainer(tmp_path, [DENCallback(**short_phases())]).test(tested, datamodule=tiny_stream(2), ckpt_path=last)
    assert tested.net.num_tasks == 2 and any(name.startswith("test_loss") for name in scores[0])

    loaded = lightning_den.load_grown(UserModule(), last)  # for inference, weights_only
    x = torch.randn(4, IN_FEATURES)
    for task in range(2):
        with lightning_den.task(first, task), lightning_den.task(loaded, task):
            assert torch.equal(loaded(x), first(x))


@pytest.mark.slow
def test_the_conv_example_converts_the_classifier_of_a_plain_module(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "custom_module.py"
    result = subprocess.run([sys.executable, str(example)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after task 2: accuracy" in result.stdout and "through the model's own forward(x)" in result.stdout


# ---------------------------------------------------------------- several blocks: block=[names]


BOTH = TwoChains.BLOCKS


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_list_of_names_grows_every_named_chain_in_the_same_phases(tmp_path, method):
    torch.manual_seed(0)
    model, watch = TwoChains(), OutputsAtTaskEnds()
    x = torch.randn(5, IN_FEATURES)
    before = model(x)
    callback = METHODS[method](block=BOTH)
    evaluation = TaskEvaluation(block="classifier", plots=False, print_report=False)
    logger = CSVLogger(tmp_path)
    fit = pl.Trainer(
        max_epochs=-1, reload_dataloaders_every_n_epochs=1, accelerator="cpu", default_root_dir=tmp_path,
        enable_progress_bar=False, logger=logger, callbacks=[callback, watch, evaluation],
    )  # fmt: skip
    fit.fit(model, datamodule=tiny_stream(4))
    blocks = {name: model.get_submodule(name) for name in BOTH}
    assert all(isinstance(block, callback.method.block_type) for block in blocks.values())
    assert {name: (b.num_tasks, b.tasks_learned, b.active_task) for name, b in blocks.items()} == {
        name: (4, 4, 3) for name in BOTH
    }
    assert not torch.equal(model(x), before)
    # each block has its own method, and the boundary reports each block's plan by name
    assert callback._methods["encoder"] is callback.method and callback._methods["classifier"] is not callback.method
    assert len(evaluation.accuracy) == 4
    if method == "den":  # both chains grew (every expansion adds units) and selection is logged per block
        assert blocks["encoder"].widths(3)[0] > 8 and blocks["classifier"].widths(3)[0] > 7
        logged = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {f"selection/{name}/fraction/layer_0" for name in BOTH} <= set(logged)
        assert sorted(evaluation.selection) == [1, 2, 3]
    else:  # zero forgetting through both converted chains, bit for bit
        assert all(torch.equal(outputs, watch.outputs[0]) for outputs in watch.outputs)


def test_several_blocks_resume_by_name_and_a_different_list_is_refused(tmp_path):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    straight = TwoChains()
    first = TwoChains()
    first.load_state_dict(straight.state_dict())
    trainer(tmp_path, [DENCallback(block=BOTH, **short_phases()), checkpoint]).fit(first, datamodule=tiny_stream(2))
    trainer(tmp_path / "straight", [DENCallback(block=BOTH, **short_phases())]).fit(straight, datamodule=tiny_stream(3))
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed = TwoChains()
    trainer(tmp_path, [DENCallback(block=BOTH, **short_phases())]).fit(
        resumed, datamodule=tiny_stream(3), ckpt_path=last
    )
    assert all(resumed.get_submodule(name).tasks_learned == 3 for name in BOTH)
    # a sequence resumed between tasks ends where the uninterrupted one does, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters(), strict=True))
    with pytest.raises(MisconfigurationException, match=r"so \['classifier'\] cannot load: pass `block="):
        trainer(tmp_path, [DENCallback(block=["encoder"], **short_phases())]).fit(
            TwoChains(), datamodule=tiny_stream(3), ckpt_path=last
        )


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ([], "a module name or a list of distinct module names"),
        (["encoder", "encoder"], "a list of distinct module names"),
        (["encoder", 3], "a list of distinct module names"),
    ],
)
def test_a_wrong_list_of_blocks_is_refused_when_the_callback_is_made(block, message):
    with pytest.raises(MisconfigurationException, match=message):
        DENCallback(block=block)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_model_built_for_another_method_is_refused_naming_it(tmp_path, method):
    other = "pnn" if method == "den" else "den"
    model = EvaluatedUserModule()
    trainer(tmp_path, [METHODS[other]()]).fit(model, datamodule=tiny_stream(2))  # its chain is now that block
    kind = type(model.net).__name__
    with pytest.raises(MisconfigurationException, match=f"holds the blocks {{'net': '{kind}'}} of another method"):
        trainer(tmp_path, [METHODS[method]()]).test(model, datamodule=tiny_stream(2))
    assert type(model.net).__name__ == kind


class ManualOptimization(UserModule):
    """Steps its optimizer itself, and returns the loss only when asked to."""

    def __init__(self, returns_loss: bool) -> None:
        super().__init__()
        self.automatic_optimization, self.returns_loss = False, returns_loss

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss if self.returns_loss else None


def test_manual_optimization_trains_the_sequence_and_a_step_without_a_loss_is_named(tmp_path):
    model = ManualOptimization(returns_loss=True)
    trainer(tmp_path, [METHODS["den"]()]).fit(model, datamodule=tiny_stream(2))
    assert model.net.tasks_learned == 2
    with pytest.raises(ValueError, match="`training_step` returned no loss in the 3 batches of this epoch"):
        trainer(tmp_path, [METHODS["den"]()]).fit(ManualOptimization(returns_loss=False), datamodule=tiny_stream(2))


def test_methods_that_train_the_whole_model_take_one_block():
    with pytest.raises(MisconfigurationException, match="EWC trains the whole model and takes one block"):
        EWCCallback(block=BOTH)


def test_task_evaluation_names_its_block_before_training_when_there_are_several(tmp_path):
    model = TwoChains()
    fit = trainer(tmp_path, [DENCallback(block=BOTH, **short_phases()), TaskEvaluation()])
    with pytest.raises(MisconfigurationException, match=r"found 2 blocks \['classifier', 'encoder'\]; name the one"):
        fit.fit(model, datamodule=tiny_stream(2))
    assert fit.current_epoch == 0 and fit.global_step == 0


def test_a_wrong_name_in_the_list_leaves_the_model_as_it_was(tmp_path):
    model = TwoChains()
    before = {name: type(module) for name, module in model.named_children()}
    fit = trainer(tmp_path, [DENCallback(block=["encoder", "clasifier"], **short_phases())])
    with pytest.raises(MisconfigurationException, match=r"`block='clasifier'` is not a module of TwoChains"):
        fit.fit(model, datamodule=tiny_stream(2))
    assert {name: type(module) for name, module in model.named_children()} == before  # encoder not converted


def test_every_block_gets_its_own_random_draws(tmp_path):
    class Twins(UserModule):  # two chains of the same shape
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(IN_FEATURES, 4), nn.ReLU(), nn.Linear(4, 2))
            self.other = nn.Sequential(nn.Linear(IN_FEATURES, 4), nn.ReLU(), nn.Linear(4, 2))

        def forward(self, x):
            return self.net(x) + self.other(x)

    class NewUnitsAsDrawn(Callback):
        def on_task_boundary(self, trainer, pl_module, boundary) -> None:
            if boundary.phase == "expansion":  # right after the surgery, before any training
                self.drawn = [b.hidden[0].weight[b.hidden[0].birth == 1].clone() for b in (model.net, model.other)]

    model, watch = Twins(), NewUnitsAsDrawn()
    den = DENCallback(block=["net", "other"], **short_phases(first_task_epochs=1, loss_threshold=0.0))
    trainer(tmp_path, [den, watch]).fit(model, datamodule=tiny_stream(2))
    assert watch.drawn[0].numel() and not torch.equal(watch.drawn[0], watch.drawn[1])


def test_blocks_that_learnt_different_tasks_are_refused_together(tmp_path):
    model = TwoChains()
    trainer(tmp_path, [DENCallback(block="encoder", **short_phases())]).fit(model, datamodule=tiny_stream(2))
    fit = trainer(tmp_path, [DENCallback(block=BOTH, **short_phases())])
    with pytest.raises(MisconfigurationException, match=r"learnt different numbers of tasks \(\{'encoder': 2, 'cl"):
        fit.fit(model, datamodule=tiny_stream(3))
