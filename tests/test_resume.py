"""Crash and resume: a run stopped mid-task and resumed from its last checkpoint ends exactly where an
uninterrupted run with the same seed ends, and loses nothing it had learned."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_den import DENMLP, DENCallback, TaskEvaluation
from tests.helpers import IN_FEATURES, CrashAt, UserModule, make_trainer, short_phases, tiny_model, tiny_stream

# short_phases: task 0 = epochs 0-2; task 1: head_fit 3-4, selective 5-6, expansion 7-8, split 9-10; task 2 ...
SETTINGS = short_phases(loss_threshold=0.0, split_threshold=0.0)
PROBE = torch.randn(13, IN_FEATURES, generator=torch.Generator().manual_seed(1))


class OutputsAtStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        with torch.no_grad():
            self.outputs = {t: pl_module(PROBE, task=t).clone() for t in range(pl_module.mlp.num_tasks)}


def run(folder, extra=(), ckpt_path=None, settings=SETTINGS):
    pl.seed_everything(0)
    model = tiny_model()
    evaluation = TaskEvaluation(print_report=False, plots=False, output_dir=str(folder))
    checkpoint = ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True)
    callbacks = [*extra, DENCallback(**settings), evaluation, checkpoint]
    trainer = make_trainer(folder, callbacks, enable_checkpointing=True)
    trainer.fit(model, datamodule=tiny_stream(num_tasks=3), ckpt_path=ckpt_path)
    return model, evaluation


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run(tmp_path_factory.mktemp("whole"))


@pytest.mark.parametrize(
    "crash_epoch",
    [
        6,  # checkpoint after the first selective epoch: in the middle of a phase
        7,  # checkpoint after the last selective epoch: the expansion is decided but not yet applied
        8,  # checkpoint after the first expansion epoch: group lasso on the new units goes on after the restart
        11,  # checkpoint at the end of task 1: the next task's head is not added yet
    ],
)
def test_crash_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, crash_epoch):
    whole_model, whole_evaluation = uninterrupted
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, extra=[CrashAt(crash_epoch)])
    last = tmp_path / "checkpoints" / "last.ckpt"
    crashed = torch.load(last, weights_only=True)  # the checkpoint is plain data
    assert crashed["epoch"] == crash_epoch - 1
    before = DENMLP.load_from_checkpoint(last, optimizer=torch.optim.Adam)
    with torch.no_grad():
        expected = {t: before(PROBE, task=t) for t in range(before.mlp.num_tasks)}

    start = OutputsAtStart()
    resumed_model, resumed_evaluation = run(tmp_path, extra=[start], ckpt_path=str(last))

    # nothing learned before the crash is lost: every task's outputs at the restart equal the crashed model's
    assert start.outputs.keys() == expected.keys()
    for task, outputs in start.outputs.items():
        assert torch.equal(outputs, expected[task])
    # same architecture, same weights, same final metrics as the uninterrupted run
    assert resumed_model.mlp.architecture() == whole_model.mlp.architecture()
    for (name, a), (_, b) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert a == b if name.endswith("_extra_state") else torch.equal(a, b), name
    # the evaluation resumed too: the whole report equals the uninterrupted run's
    assert resumed_evaluation.summary == whole_evaluation.summary


class WithDropout(UserModule):
    """A user's module with dropout in its chain: its masks come from torch's global generator."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IN_FEATURES, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)
        )

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))


def run_with_dropout(folder, extra=(), ckpt_path=None):
    pl.seed_everything(0)
    model = WithDropout()
    checkpoint = ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True)
    trainer = make_trainer(folder, [*extra, DENCallback(**SETTINGS), checkpoint], enable_checkpointing=True)
    trainer.fit(model, datamodule=tiny_stream(num_tasks=3), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("crash_epoch", [3, 6])  # the start of task 1; within its selective retraining
def test_a_model_with_dropout_resumes_drawing_the_masks_of_an_uninterrupted_run(tmp_path, crash_epoch):
    whole = run_with_dropout(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_with_dropout(tmp_path / "crashed", extra=[CrashAt(crash_epoch)])
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    resumed = run_with_dropout(tmp_path / "crashed", ckpt_path=str(last))
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert a == b if name.endswith("_extra_state") else torch.equal(a, b), name

    draws = []  # testing from the checkpoint keeps the random state the user seeded
    for seed in (1, 2):
        pl.seed_everything(seed)
        make_trainer(tmp_path, [DENCallback(**SETTINGS)]).test(WithDropout(), datamodule=tiny_stream(3), ckpt_path=last)
        draws.append(torch.rand(3))
    assert not torch.equal(*draws)


def test_early_expansion_decides_the_same_after_a_resume_within_selective_retraining(tmp_path):
    """The decision reads the previous epoch's loss, which the checkpoint keeps: a run resumed after the first
    selective epoch ends the phase after its second epoch, as the uninterrupted run does."""
    settings = {**SETTINGS, "selective_epochs": 4, "early_expansion": True}
    whole_model, whole_evaluation = run(tmp_path / "whole", settings=settings)
    assert [whole_evaluation.phase_epochs[task]["selective"] for task in (1, 2)] == [2, 2]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, extra=[CrashAt(6)], settings=settings)
    resumed_model, resumed_evaluation = run(
        tmp_path, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), settings=settings
    )
    assert [resumed_evaluation.phase_epochs[task]["selective"] for task in (1, 2)] == [2, 2]
    assert resumed_evaluation.summary == whole_evaluation.summary
    for (name, a), (_, b) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert a == b if name.endswith("_extra_state") else torch.equal(a, b), name


def test_a_checkpoint_written_before_several_blocks_were_possible_resumes_the_same(tmp_path, uninterrupted):
    """Format 1 of the driver state held the one block's method state and pending plan, not by block name."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, extra=[CrashAt(5)])  # the selection is decided, not applied: a pending plan is saved
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    (key,) = [key for key, state in checkpoint["callbacks"].items() if "methods" in state]
    state = checkpoint["callbacks"][key]
    assert state["format"] == 4 and state["pending"] is not None
    (method_state,), (plan,) = state.pop("methods").values(), state["pending"]["plan"].values()
    state.update(format=1, method=method_state, pending={**state["pending"], "plan": plan})
    torch.save(checkpoint, last)

    resumed_model, _ = run(tmp_path, ckpt_path=str(last))
    whole_model, _ = uninterrupted
    for a, b in zip(whole_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("phase", "crash_epoch", "old_format"),
    [
        ("expansion", 8, 2),  # format 2 laid expansion's parameters (so its optimizer state) out plainly
        ("selective", 6, 3),  # format 3 trained selective retraining on the whole weights under masks
    ],
)
def test_a_checkpoint_written_in_a_phase_laid_out_otherwise_before_is_refused(tmp_path, phase, crash_epoch, old_format):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, extra=[CrashAt(crash_epoch)])  # the checkpoint is written after the phase's first epoch
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    (state,) = [state for state in checkpoint["callbacks"].values() if "methods" in state]
    assert state["progress"]["phase"] == phase
    state["format"] = old_format
    torch.save(checkpoint, last)
    with pytest.raises(MisconfigurationException, match=f"written in DEN's '{phase}' phase by an earlier"):
        run(tmp_path, ckpt_path=str(last))
