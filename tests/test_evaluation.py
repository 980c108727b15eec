"""TaskEvaluation inside Lightning: head widths, undefined AUROC, precision, ranks, early ends, continued runs."""

from __future__ import annotations

import json
import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_den import DENMLP, DENCallback, SplitDigits, TaskBoundary, TaskEvaluation, TaskSequenceDataModule
from lightning_den.boundary import notify_boundary
from lightning_den.driver import sequence_trainer
from lightning_den.evaluation import task_scores
from lightning_den.metrics import mlp_parameters
from lightning_den.report import format_report
from tests.helpers import short_phases


def one_epoch_phases() -> DENCallback:
    return DENCallback(first_task_epochs=1, head_fit_epochs=1, selective_epochs=1, expansion_epochs=1, split_epochs=1)


def digits_model(num_classes: int = 2) -> DENMLP:
    return DENMLP(in_features=64, hidden_sizes=[8], num_classes=num_classes)


def quiet_evaluation(tmp_path, **overrides) -> TaskEvaluation:
    settings = dict(output_dir=str(tmp_path), plots=False, print_report=False)
    return TaskEvaluation(**{**settings, **overrides})


def strict_json(path) -> dict:
    """The file as JSON, refusing NaN/Infinity (which `json.dumps` writes but JSON does not have)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def square(rows) -> list[list[float | None]]:
    """Lower-triangular rows as they must look: row i has i + 1 entries, each a float or None."""
    return [[None if v is None else float(v) for v in row] for row in rows]


# ---------------------------------------------------------------- 1. the head decides the classes


def test_task_scores_take_the_classes_from_the_logits_not_from_the_labels():
    model = DENMLP(in_features=4, hidden_sizes=[3], num_classes=5)
    inputs, labels = torch.randn(12, 4), torch.tensor([0, 1] * 6)  # only 2 of the 5 outputs are ever labels
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=5)
    accuracy, auroc = task_scores(model, loader, task=0)
    with torch.no_grad():
        expected = (model(inputs, task=0).argmax(dim=-1) == labels).double().mean()
    assert accuracy == pytest.approx(float(expected)) and auroc is None  # AUROC needs a 2-output head
    with pytest.raises(ValueError, match=r"task 0 has the label 7 but its head has 5 outputs"):
        task_scores(model, DataLoader(TensorDataset(inputs, torch.full((12,), 7)), batch_size=5), task=0)


def test_a_head_wider_than_the_task_labels_is_evaluated_and_counted_in_the_capacity(tmp_path):
    evaluation = quiet_evaluation(tmp_path)
    sequence_trainer([one_epoch_phases(), evaluation]).fit(digits_model(num_classes=10), datamodule=SplitDigits(2))
    summary = evaluation.summary
    assert summary["complete"] and [len(row) for row in summary["accuracy"]] == [1, 2]
    assert all(0.0 <= a <= 1.0 for row in summary["accuracy"] for a in row)
    assert summary["auroc"] is None and all(a is None for row in evaluation.auroc for a in row)
    assert summary["capacity"]["single_task_parameters"] == 2 * mlp_parameters(64, [8], 10)


# ---------------------------------------------------------------- 2. undefined AUROC


def one_class_test_set_stream() -> TaskSequenceDataModule:
    """Two binary tasks; the test set of task 1 holds label 0 only."""
    generator = torch.Generator().manual_seed(0)
    train, test = [], []
    for task in range(2):
        direction = torch.randn(64, generator=generator)
        x = torch.randn(64, 64, generator=generator)
        train.append((x, (x @ direction > 0).long()))
        x = torch.randn(20, 64, generator=generator)
        test.append((x, (x @ direction > 0).long() if task == 0 else torch.zeros(20, dtype=torch.long)))
    return TaskSequenceDataModule.from_tensors(train=train, test=test, batch_size=16)


def test_auroc_of_a_single_class_test_set_is_nan_left_out_of_the_averages_and_null_in_the_json(tmp_path):
    evaluation = quiet_evaluation(tmp_path)
    with pytest.warns(UserWarning, match=r"AUROC of task 1 is undefined: its evaluation data hold only the label 0"):
        sequence_trainer([one_epoch_phases(), evaluation]).fit(digits_model(), datamodule=one_class_test_set_stream())
    assert math.isnan(evaluation.auroc[1][1]) and not math.isnan(evaluation.auroc[1][0])
    saved = strict_json(tmp_path / "continual_metrics.json")
    assert saved == evaluation.summary  # what the run holds is what the file holds
    assert saved["auroc"][1] == [evaluation.auroc[1][0], None]
    numbers = saved["summary"]
    assert numbers["average_auroc"] == pytest.approx(evaluation.auroc[1][0]) and numbers["average_auroc_tasks"] == 1
    assert numbers["backward_transfer_auroc_tasks"] == 1  # task 0 has both of its entries
    assert numbers["average_accuracy_tasks"] == 2  # accuracy is defined for both tasks
    assert numbers["average_accuracy"] == pytest.approx(sum(evaluation.accuracy[1]) / 2)
    report = format_report(saved)
    assert "average_auroc: " in report and "(1 task)" in report and "nan" not in report.lower()


# ---------------------------------------------------------------- 3. precision


def test_a_bf16_true_sequence_is_evaluated_in_bf16(tmp_path):
    evaluation = quiet_evaluation(tmp_path)
    trainer = sequence_trainer([one_epoch_phases(), evaluation], precision="bf16-true")
    model = digits_model()
    trainer.fit(model, datamodule=SplitDigits(2))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert evaluation.summary["complete"] and len(evaluation.accuracy) == 2
    assert all(0.0 <= a <= 1.0 for row in evaluation.accuracy for a in row)
    assert all(0.0 <= a <= 1.0 for row in evaluation.auroc for a in row)


def test_task_scores_use_the_precision_plugin_and_stay_usable_without_one():
    inputs, labels = torch.randn(10, 4), torch.tensor([0, 1] * 5)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=4)
    model = DENMLP(in_features=4, hidden_sizes=[3], num_classes=2)
    full = task_scores(model, loader, task=0)
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError):  # float32 inputs into a bf16 model: what the plugin is for
        task_scores(model, loader, task=0)
    accuracy, auroc = task_scores(model, loader, task=0, precision=HalfPrecision("bf16-true"))
    assert 0.0 <= accuracy <= 1.0 and 0.0 <= auroc <= 1.0 and len(full) == 2
    assert torch.get_default_dtype() == torch.float32  # the plugin's forward context was left


# ---------------------------------------------------------------- 4. ranks


class RecordCollectives(SingleDeviceStrategy):
    """One process that answers ``is_global_zero`` as the given rank would, and records its broadcasts."""

    def __init__(self, rank_zero: bool) -> None:
        super().__init__(device=torch.device("cpu"))
        self.rank_zero = rank_zero
        self.broadcasts: list[str] = []

    @property
    def is_global_zero(self) -> bool:
        return self.rank_zero

    def broadcast(self, obj, src: int = 0):
        self.broadcasts.append(type(obj).__name__)
        return obj


def test_every_rank_takes_part_in_the_same_collectives_and_only_rank_zero_writes_files(tmp_path):
    """Under DDP a broadcast that rank 0 makes and rank 1 does not (``trainer.log_dir`` inside rank-zero-only
    code) leaves rank 0 waiting: gloo's "Connection closed by peer" and no continual_metrics.json."""
    ranks = {}
    for rank_zero in (True, False):
        pl.seed_everything(0, verbose=False)
        strategy, folder = RecordCollectives(rank_zero), tmp_path / f"rank_zero_{rank_zero}"
        evaluation = TaskEvaluation(print_report=False)
        trainer = sequence_trainer([one_epoch_phases(), evaluation], strategy=strategy, default_root_dir=folder)
        trainer.fit(digits_model(), datamodule=SplitDigits(2))
        assert evaluation.summary["summary"]  # the summary exists (and is logged) on every rank
        ranks[rank_zero] = (strategy.broadcasts, sorted(p.name for p in folder.rglob("*") if p.is_file()))
    assert ranks[True][0] == ranks[False][0]
    assert "continual_metrics.json" in ranks[True][1] and "accuracy_matrix.png" in ranks[True][1]
    assert ranks[False][1] == []


# ---------------------------------------------------------------- 5. sequences that end early


class StopAfterTask(Callback):
    """Stops the fit the way EarlyStopping or max_time do (at the end of an epoch), once ``task`` has ended."""

    def __init__(self, task: int) -> None:
        self.task = task
        self.ended = False

    def on_task_boundary(self, trainer, pl_module, boundary: TaskBoundary) -> None:
        self.ended |= boundary.ended_task == self.task

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop |= self.ended


class StopAtFirstEpochEnd(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


class CrashAfterTask(Callback):
    def __init__(self, task: int) -> None:
        self.task = task

    def on_task_boundary(self, trainer, pl_module, boundary: TaskBoundary) -> None:
        if boundary.ended_task == self.task:
            raise RuntimeError("simulated crash")


def test_a_fit_stopped_after_a_task_writes_an_incomplete_summary_and_prints_it(tmp_path, caplog):
    evaluation = quiet_evaluation(tmp_path, print_report=True, plots=True)
    trainer = sequence_trainer([one_epoch_phases(), evaluation, StopAfterTask(0)])
    with caplog.at_level(logging.INFO):
        trainer.fit(digits_model(), datamodule=SplitDigits(3))
    saved = strict_json(tmp_path / "continual_metrics.json")
    assert saved == evaluation.summary
    assert saved["complete"] is False and saved["tasks_evaluated"] == 1 and saved["tasks_in_stream"] == 3
    assert len(saved["accuracy"]) == 1 and saved["summary"]["average_accuracy_tasks"] == 1
    assert (tmp_path / "accuracy_matrix.png").exists()
    assert "incomplete run: 1 of 3 tasks ended" in caplog.text


def test_a_complete_sequence_says_so(tmp_path):
    evaluation = quiet_evaluation(tmp_path)
    sequence_trainer([one_epoch_phases(), evaluation]).fit(digits_model(), datamodule=SplitDigits(2))
    saved = strict_json(tmp_path / "continual_metrics.json")
    assert saved["complete"] is True and saved["tasks_evaluated"] == saved["tasks_in_stream"] == 2
    assert saved["first_measured_task"] == 0


class CountEpochs(Callback):
    """Counts the training epochs of each (task, phase) as the driver's progress names them."""

    def __init__(self, den: DENCallback) -> None:
        self.den, self.counts = den, {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # runs before the driver moves to the next phase
        key = (self.den.progress.task, str(self.den.progress.phase))
        self.counts[key] = self.counts.get(key, 0) + 1


def test_the_epochs_of_every_phase_are_reported_per_task(tmp_path, caplog):
    den = DENCallback(**short_phases(selective_epochs=4, expansion_epochs=6, loss_threshold=0.0, convergence_tol=0.05))
    counter, evaluation = CountEpochs(den), quiet_evaluation(tmp_path, print_report=True)
    trainer = sequence_trainer([counter, den, evaluation])
    with caplog.at_level(logging.INFO):
        trainer.fit(digits_model(), datamodule=SplitDigits(3))
    saved = strict_json(tmp_path / "continual_metrics.json")
    expected = [{phase: n for (t, phase), n in counter.counts.items() if t == task} for task in range(3)]
    assert saved["phase_epochs"] == expected == [evaluation.phase_epochs[t] for t in range(3)]
    assert list(expected[1]) == ["head_fit", "selective", "expansion", "split"]
    assert [epochs["expansion"] for epochs in expected[1:]] == [6, 6]  # a level loss never ends expansion
    assert sum(sum(epochs.values()) for epochs in expected) == trainer.current_epoch  # every epoch, once
    (line,) = [line for line in caplog.text.splitlines() if line.startswith("epochs per task: ")]
    task_1 = expected[1]
    assert f"0: {expected[0]['sparse']}; 1: {sum(task_1.values())} (head_fit {task_1['head_fit']}, " in line


def test_a_fit_stopped_before_any_task_ended_writes_nothing_and_does_not_crash(tmp_path):
    evaluation = quiet_evaluation(tmp_path)
    den = DENCallback(first_task_epochs=3, head_fit_epochs=1, selective_epochs=1, expansion_epochs=1, split_epochs=1)
    sequence_trainer([den, evaluation, StopAtFirstEpochEnd()]).fit(digits_model(), datamodule=SplitDigits(2))
    assert evaluation.summary == {} and not (tmp_path / "continual_metrics.json").exists()


def test_an_exception_after_a_task_still_writes_the_summary_and_is_not_hidden(tmp_path):
    evaluation = quiet_evaluation(tmp_path)
    trainer = sequence_trainer([one_epoch_phases(), evaluation, CrashAfterTask(0)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(digits_model(), datamodule=SplitDigits(2))
    saved = strict_json(tmp_path / "continual_metrics.json")
    assert saved["complete"] is False and saved["tasks_evaluated"] == 1 and saved["tasks_in_stream"] == 2


# ---------------------------------------------------------------- 6./7. sequences continued from an earlier run


class ContinueFromTask(Callback):
    """Announces the boundaries a continued sequence announces: the loaded model's last task ended (at
    the start), then the new task (at the end of the stream)."""

    def __init__(self, loaded_last_task: int) -> None:
        self.last = loaded_last_task

    def boundary(self, ended: int, phase: str | None) -> TaskBoundary:
        return TaskBoundary(
            task=ended + (phase is not None), phase=phase, previous_task=ended, previous_phase="train",
            ended_task=ended, widths=(8,), loss=0.0,
        )  # fmt: skip

    def on_train_start(self, trainer, pl_module) -> None:
        notify_boundary(trainer, pl_module, self.boundary(self.last, "train"))

    def on_train_end(self, trainer, pl_module) -> None:
        notify_boundary(trainer, pl_module, self.boundary(self.last + 1, None))


def test_a_continued_sequence_starts_at_a_later_row_and_summarises_what_it_measured(tmp_path):
    model = digits_model()
    model.mlp.add_task_()
    model.mlp.add_task_()  # a model with heads for tasks 0..2, as one loaded after an earlier run of 0..1
    evaluation = quiet_evaluation(tmp_path, plots=True)
    trainer = sequence_trainer([ContinueFromTask(1), evaluation], max_epochs=1, limit_train_batches=1)
    trainer.fit(model, datamodule=SplitDigits(3))

    assert evaluation.accuracy[0] == [None] and evaluation.widths[0] is None and evaluation.parameters[0] is None
    assert all(v is not None for row in evaluation.accuracy[1:] for v in row)
    saved = strict_json(tmp_path / "continual_metrics.json")
    assert saved == evaluation.summary and saved["complete"] and saved["first_measured_task"] == 1
    assert saved["accuracy"][0] == [None] and saved["parameters_after_task"][0] is None
    numbers = saved["summary"]
    assert numbers["average_accuracy_tasks"] == 3  # the last row is whole
    assert numbers["backward_transfer_tasks"] == 1 and numbers["forgetting_tasks"] == 1  # task 0: R[0][0] unknown
    assert numbers["backward_transfer"] == pytest.approx(saved["accuracy"][2][1] - saved["accuracy"][1][1])
    assert (tmp_path / "accuracy_matrix.png").exists() and (tmp_path / "parameters.png").exists()
    report = format_report(saved)
    assert "row 0 was not measured in this run" in report and "widths per task: -, 8" in report

    # 7. the checkpoint of such a run is plain data, and a new TaskEvaluation takes it back
    trainer.save_checkpoint(tmp_path / "continued.ckpt")
    checkpoint = torch.load(tmp_path / "continued.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("TaskEvaluation")]
    restored = TaskEvaluation()
    restored.load_state_dict(state)
    assert restored.state_dict() == evaluation.state_dict()
    assert restored.widths == evaluation.widths and restored.parameters == evaluation.parameters


def test_a_row_measured_again_replaces_the_old_one(tmp_path):
    evaluation = quiet_evaluation(tmp_path)
    evaluation.load_state_dict(
        {"accuracy": [[0.5], [0.4, 0.6]], "auroc": [[0.5], [0.4, 0.6]], "widths": [[8], [9]], "parameters": [1, 2]}
    )
    model = digits_model()
    model.mlp.add_task_()
    model.mlp.add_task_()
    trainer = sequence_trainer([ContinueFromTask(1), evaluation], max_epochs=1, limit_train_batches=1)
    trainer.fit(model, datamodule=SplitDigits(3))
    assert len(evaluation.accuracy) == 3 and evaluation.accuracy[0] == [0.5] and evaluation.accuracy[1] != [0.4, 0.6]
    assert evaluation.summary["first_measured_task"] == 0


def test_state_with_missing_and_undefined_entries_survives_a_weights_only_load(tmp_path):
    evaluation = TaskEvaluation()
    state = {
        "accuracy": square([[None], [0.5, 0.75]]),
        "auroc": [[None], [float("nan"), 0.5]],
        "widths": [None, [8]],
        "parameters": [None, 1234],
    }
    evaluation.load_state_dict(state)
    torch.save(evaluation.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    again = TaskEvaluation()
    again.load_state_dict(loaded)
    assert again.accuracy == state["accuracy"] and again.widths == [None, (8,)] and again.parameters == [None, 1234]
    assert again.auroc[0] == [None] and math.isnan(again.auroc[1][0]) and again.auroc[1][1] == 0.5


def test_a_task_learnt_in_an_earlier_run_reports_no_epochs(tmp_path):
    model = digits_model()
    sequence_trainer([one_epoch_phases()]).fit(model, datamodule=SplitDigits(2))
    evaluation = quiet_evaluation(tmp_path)
    sequence_trainer([one_epoch_phases(), evaluation]).fit(model, datamodule=SplitDigits(3))
    assert list(evaluation.phase_epochs) == [2] and evaluation.summary["phase_epochs"][:2] == [None, None]
