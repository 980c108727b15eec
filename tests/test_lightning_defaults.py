"""The task sequence with Lightning's defaults on, as users run it: validation, loggers, checkpoints,
early stopping, predict, continuing a finished sequence later, and honest early endings."""

from __future__ import annotations

import functools
import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_den import DENMLP, DENCallback, TaskEvaluation
from lightning_den.baselines import PackNetCallback, PackNetModel, ProgressiveCallback, ProgressiveNet
from tests.helpers import HIDDEN, IN_FEATURES, short_phases, tiny_model, tiny_stream


def default_trainer(tmp_path, callbacks: list[Callback], **overrides) -> pl.Trainer:
    """A Trainer as a user writes one: validation, logger, checkpointing and progress bar left on."""
    settings = dict(
        max_epochs=-1,
        reload_dataloaders_every_n_epochs=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    return pl.Trainer(callbacks=callbacks, **{**settings, **overrides})


def quick_den(**overrides) -> DENCallback:
    return DENCallback(**short_phases(**overrides))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-task DEN sequence with validation, a monitored checkpoint, a logger and TaskEvaluation."""
    pl.seed_everything(0, verbose=False)
    folder = tmp_path_factory.mktemp("defaults")
    monitored = ModelCheckpoint(dirpath=folder / "best", monitor="val/acc/task_0", mode="max")
    latest = ModelCheckpoint(dirpath=folder / "ckpt", save_last=True)
    evaluation = TaskEvaluation(print_report=False)
    model = tiny_model()
    trainer = default_trainer(folder, [quick_den(loss_threshold=0.0), evaluation, monitored, latest])
    trainer.fit(model, datamodule=tiny_stream(3))
    return folder, trainer, model, evaluation


def test_validation_runs_every_epoch_on_all_seen_tasks_under_stable_names(finished_run):
    _, trainer, model, _ = finished_run
    metrics = trainer.callback_metrics
    for task in range(3):
        assert {f"val/loss/task_{task}", f"val/acc/task_{task}"} <= set(metrics)
    accuracies = torch.stack([metrics[f"val/acc/task_{task}"] for task in range(3)])
    assert torch.allclose(metrics["val/acc/avg"], accuracies.mean())
    assert model.tasks_learned == 3 and model.current_task == 2
    assert trainer.checkpoint_callbacks[0].best_model_score is not None  # the monitored metric existed


def test_a_second_test_on_the_same_trainer_tests_every_task_again(finished_run):
    _, trainer, model, _ = finished_run
    datamodule = tiny_stream(3)
    first = trainer.test(model, datamodule=datamodule, verbose=False)
    second = trainer.test(model, datamodule=datamodule, verbose=False)
    assert first == second and {f"test/acc/task_{t}" for t in range(3)} <= set(first[0])


def test_a_checkpoint_from_the_end_of_a_task_evaluates_the_tasks_its_model_learnt(tmp_path):
    every = ModelCheckpoint(dirpath=tmp_path / "every", save_top_k=-1)  # one file per epoch
    default_trainer(tmp_path, [quick_den(), every]).fit(tiny_model(), datamodule=tiny_stream(2))
    (end_of_task_0,) = (tmp_path / "every").glob("epoch=2-*.ckpt")  # task 0's last epoch: data stand at task 1
    saved = torch.load(end_of_task_0, weights_only=True)
    assert saved["TaskSequenceDataModule"]["current_task"] == 1 and saved["state_dict"].keys() >= {"mlp.heads.0.weight"}
    assert "mlp.heads.1.weight" not in saved["state_dict"]  # task 1's head comes when its first epoch starts
    results = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(
        tiny_model(), datamodule=tiny_stream(2), ckpt_path=end_of_task_0, verbose=False
    )
    assert {name for scores in results for name in scores if "/task_" in name} == {
        "test/loss/task_0",
        "test/acc/task_0",
    }


def test_a_named_predict_task_is_used_for_every_loader_even_of_a_task_to_come(finished_run):
    _, trainer, model, _ = finished_run
    longer = tiny_stream(4)
    longer.set_task(3)  # a loader of task 3, which the model has not learnt
    model.predict_task = 1
    try:
        predicted = trainer.predict(model, datamodule=longer)
    finally:
        model.predict_task = None
    x, _ = next(iter(longer.task_dataloader(3, "test")))
    with torch.no_grad():
        assert torch.equal(predicted[3][0], model(x, task=1))


def test_a_loaded_model_is_tested_on_every_task_it_holds_with_a_fresh_datamodule(finished_run):
    folder = finished_run[0]
    restored = DENMLP.load_from_checkpoint(folder / "ckpt" / "last.ckpt", weights_only=True)
    assert restored.tasks_learned == 3
    results = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(
        restored, datamodule=tiny_stream(3), verbose=False
    )
    assert {f"test/acc/task_{t}" for t in range(3)} <= set(results[0])


def test_predict_is_per_task_with_the_datamodule_and_explicit_with_your_own_loader(finished_run):
    _, _, model, _ = finished_run
    datamodule = tiny_stream(3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    per_task = trainer.predict(model, datamodule=datamodule)
    assert len(per_task) == 3  # one list of batches per task the model holds
    model.eval()
    for task, batches in enumerate(per_task):
        inputs = datamodule.test_tasks[task][0]
        with torch.no_grad():
            assert torch.allclose(torch.cat(batches), model(inputs, task=task), atol=1e-6)  # other batch sizes
    inputs, labels = datamodule.test_tasks[1]
    model.predict_task = 1
    try:
        for dataset in (TensorDataset(inputs, labels), TensorDataset(inputs)):  # (x, y) batches, then x alone
            logits = torch.cat(trainer.predict(model, dataloaders=DataLoader(dataset, batch_size=7)))
            with torch.no_grad():
                assert torch.allclose(logits, model(inputs, task=1), atol=1e-6)
        model.predict_task = 5
        with pytest.raises(ValueError, match="task 5 was never trained"):
            trainer.predict(model, dataloaders=DataLoader(TensorDataset(inputs), batch_size=7))
    finally:
        model.predict_task = None


def test_early_stopping_and_checkpoints_monitor_validation_metrics(tmp_path):
    stopper = EarlyStopping(monitor="val/loss/task_0", patience=1000)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc/avg", mode="max")
    model = tiny_model()
    default_trainer(tmp_path, [quick_den(), stopper, checkpoint]).fit(model, datamodule=tiny_stream(2))
    assert model.tasks_learned == 2 and checkpoint.best_model_score is not None
    assert torch.isfinite(stopper.best_score)  # it read the metric every epoch


def test_a_fit_stopped_early_warns_with_the_task_and_phase_and_writes_an_incomplete_report(tmp_path):
    evaluation = TaskEvaluation(output_dir=str(tmp_path / "report"), print_report=False, plots=False)
    model = tiny_model()
    trainer = default_trainer(tmp_path, [quick_den(), evaluation], max_steps=20)
    with pytest.warns(UserWarning, match=r"stopped at task 1 \(tasks 0\.\.2\), phase .*`max_steps=20` was reached"):
        trainer.fit(model, datamodule=tiny_stream(3))
    assert model.tasks_learned == 1
    summary = json.loads((tmp_path / "report" / "continual_metrics.json").read_text())
    assert summary["complete"] is False and summary["tasks_evaluated"] == 1


def test_early_stopping_on_the_training_loss_is_named_in_the_warning(tmp_path):
    stopper = EarlyStopping(monitor="train/loss", patience=0, min_delta=10.0)
    with pytest.warns(UserWarning, match=r"EarlyStopping\(monitor='train/loss'\) stopped it"):
        default_trainer(tmp_path, [quick_den(), stopper]).fit(tiny_model(), datamodule=tiny_stream(3))


def test_fast_dev_run_runs_one_batch_without_a_wrong_max_epochs_error(tmp_path):
    model = tiny_model()
    default_trainer(tmp_path, [quick_den()], fast_dev_run=True).fit(model, datamodule=tiny_stream(2))
    assert model.tasks_learned == 0


def test_lightnings_default_max_epochs_is_named_as_such(tmp_path):
    trainer = pl.Trainer(
        reload_dataloaders_every_n_epochs=1, callbacks=[DENCallback()], default_root_dir=tmp_path, logger=False
    )
    stream = tiny_stream(40)
    with pytest.raises(MisconfigurationException, match="1000 \\(Lightning's default when `max_epochs` is not set\\)"):
        trainer.fit(tiny_model(), datamodule=stream)


def test_a_checkpoint_from_the_middle_of_an_epoch_is_refused_at_load(tmp_path):
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=5, save_top_k=-1)
    default_trainer(tmp_path, [quick_den(), steps], max_steps=12).fit(tiny_model(), datamodule=tiny_stream(2))
    path = tmp_path / "steps" / "epoch=1-step=5.ckpt"
    assert path.exists()
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.mlp.named_parameters()}
    with pytest.raises(MisconfigurationException, match="end of a training epoch"):
        default_trainer(tmp_path, [quick_den()]).fit(model, datamodule=tiny_stream(2), ckpt_path=path)
    after = dict(model.mlp.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)  # refused before anything loaded
    assert DENMLP.load_from_checkpoint(path).mlp.num_tasks >= 1  # its weights still load for inference


def test_a_checkpoint_that_will_save_within_epochs_is_named_at_setup(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="saves after validation.*save_on_train_epoch_end=True"):
        default_trainer(tmp_path, [quick_den(), checkpoint], check_val_every_n_epoch=2).fit(
            tiny_model(), datamodule=tiny_stream(2)
        )
    # Lightning's own checkpoint (none given): the fix is one of the user's, which takes its place
    with pytest.warns(UserWarning, match="by adding `ModelCheckpoint\\(save_on_train_epoch_end=True\\)`"):
        default_trainer(tmp_path, [quick_den()], check_val_every_n_epoch=2).fit(tiny_model(), datamodule=tiny_stream(2))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*saves after validation")
        at_epoch_end = ModelCheckpoint(dirpath=tmp_path / "end", save_on_train_epoch_end=True)
        default_trainer(tmp_path, [quick_den(), at_epoch_end], check_val_every_n_epoch=2).fit(
            tiny_model(), datamodule=tiny_stream(2)
        )


def test_reduce_lr_on_plateau_follows_the_configured_metric(tmp_path):
    # no epoch counts as an improvement (threshold 1): the rate falls after every epoch but a phase's first
    scheduler = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, threshold=1.0)
    model = DENMLP(IN_FEATURES, HIDDEN, 2, lr_scheduler=scheduler, lr_scheduler_monitor="val/loss/avg")

    class LowestRate(Callback):
        lowest = float("inf")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lowest = min(self.lowest, trainer.optimizers[0].param_groups[0]["lr"])

    rates = LowestRate()
    trainer = default_trainer(tmp_path, [quick_den(), rates])
    trainer.fit(model, datamodule=tiny_stream(2))
    assert model.tasks_learned == 2 and trainer.lr_scheduler_configs[0].monitor == "val/loss/avg"
    assert rates.lowest < 1e-3  # Adam's 1e-3 was reduced by the scheduler following the validation loss


def test_any_progress_bar_shows_the_task_and_the_phase(tmp_path):
    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    bar = RichProgressBar()
    model = tiny_model()
    trainer = default_trainer(tmp_path, [quick_den(), bar], logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=tiny_stream(2))
    shown = bar.get_metrics(trainer, model)
    assert shown["task"] == "1" and shown["phase"] == "split"


# ---------------------------------------------------------------------------- continuing a finished sequence


def _outputs(model, tasks, x):
    model.eval()
    with torch.no_grad():
        return [model(x, task=t) for t in tasks]


def test_den_continues_a_loaded_model_with_new_tasks_keeping_old_heads(finished_run):
    folder = finished_run[0]
    restored = DENMLP.load_from_checkpoint(folder / "ckpt" / "last.ckpt", weights_only=True)
    heads_before = {t: [p.detach().clone() for p in restored.mlp.heads[str(t)].parameters()] for t in range(3)}
    widths_before = [restored.mlp.widths(t) for t in range(3)]
    stream = tiny_stream(3)
    loaded_accuracy = []
    for task, (inputs, labels) in enumerate(stream.test_tasks):
        (logits,) = _outputs(restored, [task], inputs)
        loaded_accuracy.append(float((logits.argmax(-1) == labels).float().mean()))
    evaluation = TaskEvaluation(print_report=False, plots=False)
    default_trainer(folder / "later", [quick_den(loss_threshold=0.0), evaluation]).fit(
        restored, datamodule=tiny_stream(5)
    )
    assert restored.tasks_learned == 5 and restored.mlp.num_tasks == 5
    for task in range(3):  # old heads never train; old tasks keep their widths (timestamped inference)
        assert all(
            torch.equal(a, b)
            for a, b in zip(heads_before[task], restored.mlp.heads[str(task)].parameters(), strict=True)
        )
        assert restored.mlp.widths(task) == widths_before[task]
    assert len(evaluation.accuracy) == 5 and len(evaluation.accuracy[2]) == 3  # row 2: the loaded model
    assert evaluation.accuracy[2] == pytest.approx(loaded_accuracy)


def test_resuming_a_finished_checkpoint_with_a_longer_stream_goes_on_with_the_next_task(finished_run):
    folder, _, _, _ = finished_run
    evaluation = TaskEvaluation(print_report=False, plots=False)
    model = tiny_model()
    trainer = default_trainer(folder / "resumed", [quick_den(loss_threshold=0.0), evaluation])
    trainer.fit(model, datamodule=tiny_stream(4), ckpt_path=folder / "ckpt" / "last.ckpt")
    assert model.tasks_learned == 4
    assert [len(row) for row in evaluation.accuracy] == [1, 2, 3, 4]  # the whole history, restored and extended


def test_a_loaded_model_resumes_from_its_own_final_checkpoint_with_a_longer_stream(finished_run):
    folder = finished_run[0]
    restored = DENMLP.load_from_checkpoint(folder / "ckpt" / "last.ckpt", weights_only=True)
    default_trainer(folder / "loaded", [quick_den(loss_threshold=0.0)]).fit(
        restored, datamodule=tiny_stream(4), ckpt_path=folder / "ckpt" / "last.ckpt"
    )
    assert restored.tasks_learned == 4


def test_an_earlier_checkpoint_loads_into_a_model_that_has_grown_since(finished_run):
    folder = finished_run[0]
    early = sorted((folder / "best").glob("*.ckpt"))[0]
    grown = DENMLP.load_from_checkpoint(folder / "ckpt" / "last.ckpt")
    results = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(
        grown, datamodule=tiny_stream(3), ckpt_path=early, verbose=False
    )
    assert grown.mlp.num_tasks == len(
        torch.load(early, weights_only=True)["state_dict"]["mlp._extra_state"]["architecture"]["heads"]
    )
    assert "test/acc/task_0" in results[0]


def test_a_fit_stopped_by_max_steps_resumes_with_the_same_objects(tmp_path):
    den, model = quick_den(), tiny_model()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.warns(UserWarning, match="max_steps"):
        default_trainer(tmp_path, [den, checkpoint], max_steps=20).fit(model, datamodule=tiny_stream(3))
    default_trainer(tmp_path, [den, checkpoint]).fit(model, datamodule=tiny_stream(3), ckpt_path="last")
    assert model.tasks_learned == 3


def test_an_epoch_cut_short_by_max_steps_decides_nothing_and_is_trained_again_on_resuming(tmp_path):
    den, model = quick_den(first_task_epochs=3), tiny_model()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    # three batches an epoch: step 4 is the first batch of task 0's second epoch
    with pytest.warns(UserWarning, match="after 1 epoch\\(s\\) of it and 1 of the 3 batches of the next, which is not"):
        default_trainer(tmp_path, [den, checkpoint], max_steps=4).fit(model, datamodule=tiny_stream(2))
    assert (den.progress.task, den.progress.phase, den.progress.epochs) == (0, "sparse", 1)
    epochs = []
    resumed = default_trainer(tmp_path, [quick_den(first_task_epochs=3), EpochsOfPhases(epochs)])
    resumed.fit(model, datamodule=tiny_stream(2), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert epochs.count((0, "sparse")) == 2 and model.tasks_learned == 2  # the cut epoch again, then the third


class EpochsOfPhases(Callback):
    """The task and phase of every training epoch a fit runs."""

    def __init__(self, epochs: list) -> None:
        self.epochs = epochs

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        den = next(cb for cb in trainer.callbacks if isinstance(cb, DENCallback))
        self.epochs.append((den.progress.task, str(den.progress.phase)))


def test_a_monitored_checkpoint_whose_last_file_would_stay_behind_is_named_at_setup(tmp_path):
    monitored = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val/loss/avg", save_last=True)
    named = "save_last=True\\) writes its last.ckpt only when it saves one of its best checkpoints by 'val/loss/avg'"
    with pytest.warns(UserWarning, match=named):
        default_trainer(tmp_path, [quick_den(), monitored]).fit(tiny_model(), datamodule=tiny_stream(2))
    # Lightning refreshed last.ckpt only at the best epoch: the monitored file did not follow the sequence's end
    last = torch.load(tmp_path / "best" / "last.ckpt", weights_only=True)
    assert last["global_step"] == torch.load(monitored.best_model_path, weights_only=True)["global_step"]
    every = ModelCheckpoint(dirpath=tmp_path / "every", monitor="val/loss/avg", save_last=True, save_top_k=-1)
    with warnings.catch_warnings():  # keeping every checkpoint, it writes last.ckpt every epoch: nothing to name
        warnings.filterwarnings("error", message=".*writes its last.ckpt only when")
        default_trainer(tmp_path, [quick_den(), every]).fit(tiny_model(), datamodule=tiny_stream(2))


def test_a_model_that_learnt_the_whole_stream_has_nothing_to_continue(finished_run):
    folder, _, _, _ = finished_run
    restored = DENMLP.load_from_checkpoint(folder / "ckpt" / "last.ckpt", weights_only=True)
    with pytest.raises(MisconfigurationException, match="already learnt 3 tasks and the stream has 3"):
        default_trainer(folder / "again", [quick_den()]).fit(restored, datamodule=tiny_stream(3))


@pytest.mark.parametrize("method", ["progressive", "packnet"])
def test_progressive_networks_and_packnet_continue_without_changing_old_outputs(tmp_path, method):
    if method == "progressive":
        model = ProgressiveNet(IN_FEATURES, [6], 2, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))

        def callback():
            return ProgressiveCallback(epochs_per_task=2)
    else:
        model = PackNetModel(IN_FEATURES, [12], 2, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))

        def callback():
            return PackNetCallback(0.5, train_epochs=2, retrain_epochs=1, last_task_claims_free=False)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    default_trainer(tmp_path, [callback(), checkpoint]).fit(model, datamodule=tiny_stream(2))
    restored = type(model).load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    x = torch.randn(9, IN_FEATURES)
    before = _outputs(restored, range(2), x)
    default_trainer(tmp_path / "later", [callback()]).fit(restored, datamodule=tiny_stream(4))
    assert restored.tasks_learned == 4
    after = _outputs(restored, range(2), x)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # bit for bit


def test_packnet_refuses_to_continue_when_the_last_task_claimed_every_free_weight(tmp_path):
    model = PackNetModel(IN_FEATURES, [12], 2)
    default_trainer(tmp_path, [PackNetCallback(0.5, train_epochs=1, retrain_epochs=1)], logger=False).fit(
        model, datamodule=tiny_stream(2)
    )
    with pytest.raises(MisconfigurationException, match="last_task_claims_free=False"):
        default_trainer(tmp_path, [PackNetCallback(0.5, train_epochs=1, retrain_epochs=1)], logger=False).fit(
            model, datamodule=tiny_stream(3)
        )


def test_a_resumed_fit_refused_before_training_writes_no_report(tmp_path):
    latest = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    packnet = functools.partial(PackNetCallback, 0.5, train_epochs=1, retrain_epochs=1)
    evaluation = functools.partial(TaskEvaluation, print_report=False, plots=False)
    first = evaluation(output_dir=str(tmp_path / "first"))
    default_trainer(tmp_path, [packnet(), first, latest]).fit(
        PackNetModel(IN_FEATURES, [12], 2), datamodule=tiny_stream(2)
    )
    assert (tmp_path / "first" / "continual_metrics.json").exists()
    again = evaluation(output_dir=str(tmp_path / "again"))  # the checkpoint gives it the first run's rows
    with pytest.raises(MisconfigurationException, match="last_task_claims_free=False"):
        default_trainer(tmp_path, [packnet(), again]).fit(
            PackNetModel(IN_FEATURES, [12], 2), datamodule=tiny_stream(3), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert len(again.accuracy) == 2 and not (tmp_path / "again").exists()  # a configuration error, not a run
