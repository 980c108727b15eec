"""DENCallback inside Lightning's lifecycle: freezing, growth, optimizers, boundaries, errors."""

from __future__ import annotations

import csv
import functools
import logging
import math
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_den import (
    DENCallback,
    DENLightningModule,
    ExpandableMLP,
    TaskBoundary,
    TaskEvaluation,
    TaskSequenceDataModule,
)
from lightning_den.core.den.selection import dead_new_units
from tests.helpers import (
    HIDDEN,
    IN_FEATURES,
    CheckFrozenEntries,
    make_trainer,
    short_phases,
    tiny_model,
    tiny_stream,
)


class RecordBoundaries(Callback):
    """Keeps every TaskBoundary it is told about."""

    def __init__(self) -> None:
        self.boundaries: list[TaskBoundary] = []

    def on_task_boundary(self, trainer, pl_module, boundary: TaskBoundary) -> None:
        self.boundaries.append(boundary)


@pytest.mark.parametrize(
    "optimizer",
    [
        functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.5),
        functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.5, fused=True),
        functools.partial(torch.optim.SGD, lr=1e-2, momentum=0.9, weight_decay=0.1, fused=True),
    ],
    ids=["adamw", "adamw-fused", "sgd-fused"],
)
def test_frozen_entries_stay_bit_identical_under_any_optimizer(tmp_path, optimizer):
    checker = CheckFrozenEntries()
    model = tiny_model(optimizer=optimizer)
    den = DENCallback(**short_phases(loss_threshold=0.0))  # always expand: every phase runs
    make_trainer(tmp_path, [den, checker]).fit(model, datamodule=tiny_stream(num_tasks=3))
    assert checker.checked_steps > 0
    assert {"head_fit", "selective", "expansion", "split"} <= checker.phases_seen


class RecordNewUnitTraining(Callback):
    """During each expansion phase, notes whether the new units' incoming weights and outgoing columns move."""

    def __init__(self) -> None:
        self.start: list[torch.Tensor] | None = None
        self.moved: list[list[bool]] = []
        self.optimizer_covers_trainable: list[bool] = []

    def on_task_boundary(self, trainer, pl_module, boundary: TaskBoundary) -> None:
        optimized = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        self.optimizer_covers_trainable.append(all(id(p) in optimized for p in trainable))
        if boundary.phase == "expansion":
            task = boundary.task
            self.start = [layer.weight.detach()[layer.birth == task].clone() for layer in pl_module.mlp.hidden]
            self.moved.append([False] * len(self.start))
        else:
            self.start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is None:
            return
        task = pl_module.current_task
        for index, layer in enumerate(pl_module.mlp.hidden):
            rows = layer.weight.detach()[layer.birth == task]
            if not torch.equal(rows, self.start[index]):
                self.moved[-1][index] = True


def test_new_units_are_trained_and_every_trainable_parameter_is_optimized(tmp_path):
    recorder = RecordNewUnitTraining()
    den = DENCallback(**short_phases(loss_threshold=0.0, group_sparsity=0.0))
    model = tiny_model()
    make_trainer(tmp_path, [den, recorder]).fit(model, datamodule=tiny_stream(num_tasks=3))
    assert recorder.moved == [[True] * len(HIDDEN)] * 2  # tasks 1 and 2 expanded, every layer's new units moved
    assert recorder.optimizer_covers_trainable and all(recorder.optimizer_covers_trainable)
    assert all(layer.out_features > size for layer, size in zip(model.mlp.hidden, HIDDEN, strict=True))


def test_group_lasso_reaches_exactly_the_new_units(tmp_path):
    """Strong enough, expansion's group step zeroes every new unit and pruning removes them all; old units stay."""
    recorder = RecordBoundaries()
    den = DENCallback(**short_phases(loss_threshold=0.0, group_sparsity=1e4, split_threshold=1e9))
    make_trainer(tmp_path, [den, recorder]).fit(tiny_model(), datamodule=tiny_stream(num_tasks=2))
    expansion, split = (next(b for b in recorder.boundaries if b.phase == phase) for phase in ("expansion", "split"))
    added = short_phases()["units_per_expansion"]
    assert expansion.widths == tuple(h + added for h in HIDDEN)
    assert split.changes["pruned"] == [list(range(h, h + added)) for h in HIDDEN]
    assert split.widths == tuple(HIDDEN)


def test_units_per_expansion_per_layer_grows_each_layer_by_its_own_count(tmp_path):
    recorder = RecordBoundaries()
    counts = [4] + [0] * (len(HIDDEN) - 1)  # only the first hidden layer grows
    den = DENCallback(**short_phases(loss_threshold=0.0, group_sparsity=0.0, units_per_expansion=counts))
    make_trainer(tmp_path, [den, recorder]).fit(tiny_model(), datamodule=tiny_stream(num_tasks=2))
    before, expansion = (next(b for b in recorder.boundaries if b.phase == p) for p in ("selective", "expansion"))
    assert expansion.changes["added"] == counts
    assert expansion.widths == tuple(w + c for w, c in zip(before.widths, counts, strict=True))


def test_units_per_expansion_of_another_depth_than_the_block_is_refused_before_training(tmp_path):
    den = DENCallback(**short_phases(units_per_expansion=[3] * (len(HIDDEN) + 1)))
    model = tiny_model()
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(MisconfigurationException, match=rf"gives {len(HIDDEN) + 1} counts .* has {len(HIDDEN)} hidden"):
        make_trainer(tmp_path, [den]).fit(model, datamodule=tiny_stream(num_tasks=2))
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights, model.parameters(), strict=True))


def test_whole_sequence_in_one_fit_with_timestamped_inference(tmp_path):
    recorder = RecordBoundaries()
    datamodule = tiny_stream(num_tasks=3)
    model = tiny_model()
    trainer = make_trainer(tmp_path, [DENCallback(**short_phases()), recorder])
    trainer.fit(model, datamodule=datamodule)
    ended = [b.ended_task for b in recorder.boundaries if b.ended_task is not None]
    assert ended == [0, 1, 2]
    assert recorder.boundaries[-1].finished
    assert model.mlp.num_tasks == 3 and model.current_task == 2
    x = torch.randn(7, IN_FEATURES)
    for task in range(3):
        assert model(x, task=task).shape == (7, 2)
        assert len(model.mlp.widths(task)) == len(HIDDEN)
    # old tasks read a prefix: their widths never exceed those of later tasks
    assert all(a <= b for a, b in zip(model.mlp.widths(0), model.mlp.widths(2), strict=True))


class RecordOldOutputs(Callback):
    """Outputs of all finished tasks when a task ends, and again once the next task's head is fitted."""

    def __init__(self, probe: torch.Tensor) -> None:
        self.probe = probe
        self.at_end: dict[int, torch.Tensor] = {}
        self.mismatches: list[str] = []
        self.checked = 0

    @torch.no_grad()
    def on_task_boundary(self, trainer, pl_module, boundary: TaskBoundary) -> None:
        if boundary.ended_task is not None:
            self.at_end = {t: pl_module(self.probe, task=t).clone() for t in range(boundary.ended_task + 1)}
        if boundary.phase == "selective":  # the head-fit phase that just ended froze the whole trunk
            for task, expected in self.at_end.items():
                self.checked += 1
                if not torch.equal(pl_module(self.probe, task=task), expected):
                    self.mismatches.append(f"task {task} changed during head fit of task {boundary.task}")


def test_head_fit_and_task_switch_leave_earlier_tasks_bit_identical(tmp_path):
    recorder = RecordOldOutputs(torch.randn(9, IN_FEATURES))
    make_trainer(tmp_path, [DENCallback(**short_phases()), recorder]).fit(
        tiny_model(), datamodule=tiny_stream(num_tasks=3)
    )
    assert recorder.checked == 3  # task 0 at task 1; tasks 0 and 1 at task 2
    assert recorder.mismatches == []


def test_parameters_outside_the_block_learn_only_in_the_first_task(tmp_path):
    class WithEncoder(DENLightningModule):
        def __init__(self):
            super().__init__(optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
            self.encoder = nn.Linear(IN_FEATURES, IN_FEATURES)
            self.mlp = ExpandableMLP(IN_FEATURES, HIDDEN, head_classes=2)

        def forward(self, x, task=None):
            return self.mlp(torch.tanh(self.encoder(x)), self.current_task if task is None else task)

    class SnapshotEncoder(Callback):
        def on_task_boundary(self, trainer, pl_module, boundary):
            if boundary.ended_task == 0:
                self.after_first = pl_module.encoder.weight.detach().clone()

    model = WithEncoder()
    initial = model.encoder.weight.detach().clone()
    snap = SnapshotEncoder()
    make_trainer(tmp_path, [DENCallback(**short_phases()), snap]).fit(model, datamodule=tiny_stream(num_tasks=2))
    assert not torch.equal(snap.after_first, initial)
    assert torch.equal(model.encoder.weight.detach(), snap.after_first)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity_l1": -1.0}, "sparsity_l1"),
        ({"drift_penalty": float("nan")}, "drift_penalty"),
        ({"units_per_expansion": 0}, "units_per_expansion"),
        ({"units_per_expansion": [0, 0]}, "one integer >= 0 per layer .at least one positive."),
        ({"units_per_expansion": [3, -1]}, "units_per_expansion"),
        ({"units_per_expansion": [2.5]}, "units_per_expansion"),
        ({"selective_epochs": 0}, "selective_epochs"),
        ({"max_splits_per_layer": -2}, "max_splits_per_layer"),
        ({"selection_budget": 0.0}, r"`selection_budget` must be a fraction in \(0, 1\], got 0.0 \(or None: select"),
        ({"selection_budget": 1.5}, "selection_budget"),
        ({"selection_budget": True}, "selection_budget"),
        ({"split": 1}, "`split` must be True or False, got 1"),
        ({"expansion": "no"}, "`expansion` must be True or False"),
        ({"subnetwork_only": 0}, "`subnetwork_only` must be True or False, got 0"),
        ({"early_expansion": "yes"}, "`early_expansion` must be True or False, got 'yes'"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        DENCallback(**kwargs)


class NormalisedChain(DENLightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    def forward(self, x, task=None):
        return self.net(x)


class NoLinearModule(DENLightningModule):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(IN_FEATURES))

    def forward(self, x, task=None):
        return (x * self.scale)[:, :2]


class TwoBlocks(DENLightningModule):
    def __init__(self):
        super().__init__()
        self.a = ExpandableMLP(IN_FEATURES, [3], head_classes=2)
        self.b = ExpandableMLP(IN_FEATURES, [3], head_classes=2)

    def forward(self, x, task=None):
        return self.a(x, 0) + self.b(x, self.current_task)


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (NormalisedChain, r"Linear layers at \['net\.0', 'net\.2'\]; `net\.1` is a BatchNorm1d: only nn\.Linear"),
        (
            NoLinearModule,
            "no ExpandableMLP and no nn.Sequential chain of Linear layers to convert .Linear layers at none",
        ),
        (TwoBlocks, r"several ExpandableMLP blocks \['a', 'b'\]"),
    ],
)
def test_modules_without_a_single_expandable_block_are_refused(tmp_path, module, match):
    with pytest.raises(MisconfigurationException, match=match):
        make_trainer(tmp_path, [DENCallback(**short_phases())]).fit(module(), datamodule=tiny_stream(2))


def test_block_can_be_named(tmp_path):
    model = TwoBlocks()
    den = DENCallback(block="b", **short_phases())
    make_trainer(tmp_path, [den]).fit(model, datamodule=tiny_stream(2))
    assert model.b.num_tasks == 2 and model.a.num_tasks == 1


@pytest.mark.parametrize(
    ("trainer_kwargs", "match"),
    [
        ({"reload_dataloaders_every_n_epochs": 0}, "reload_dataloaders_every_n_epochs=1"),
        ({"max_epochs": 3}, r"`max_epochs` is 3 \(as set\).*max_epochs=-1"),
    ],
)
def test_trainer_settings_that_would_break_the_sequence_are_refused(tmp_path, trainer_kwargs, match):
    trainer = make_trainer(tmp_path, [DENCallback(**short_phases())], **trainer_kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(tiny_model(), datamodule=tiny_stream(2))


def test_model_copying_callbacks_are_refused(tmp_path):
    trainer = make_trainer(tmp_path, [DENCallback(**short_phases()), StochasticWeightAveraging(swa_lrs=1e-2)])
    with pytest.raises(MisconfigurationException, match="StochasticWeightAveraging"):
        trainer.fit(tiny_model(), datamodule=tiny_stream(2))


def test_a_plain_module_without_a_chain_of_linear_layers_is_refused_naming_its_layers(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel  # one nn.Linear, no chain to grow

    with pytest.raises(MisconfigurationException, match=r"Linear layers at \['layer'\]"):
        make_trainer(tmp_path, [DENCallback(**short_phases())]).fit(BoringModel(), datamodule=tiny_stream(2))


def test_a_plain_dataloader_instead_of_a_task_stream_is_refused(tmp_path):
    loader = tiny_stream(2).train_dataloader()
    with pytest.raises(MisconfigurationException, match="task-sequence datamodule"):
        make_trainer(tmp_path, [DENCallback(**short_phases())]).fit(tiny_model(), train_dataloaders=loader)


def test_stale_optimizer_is_detected_after_growth(tmp_path):
    model = tiny_model()
    cached = torch.optim.Adam(model.parameters(), lr=1e-2)  # the CLI trap: one optimizer over the first parameters
    model.configure_optimizers = lambda: cached
    trainer = make_trainer(tmp_path, [DENCallback(**short_phases())])
    with pytest.raises(MisconfigurationException, match=r"in no optimizer.*auto_configure_optimizers=False"):
        trainer.fit(model, datamodule=tiny_stream(2))


def test_nan_loss_stops_with_task_and_phase_named(tmp_path):
    datamodule = tiny_stream(2)
    inputs = datamodule.train_tasks[0][0]
    inputs[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"task 0 .* phase 'sparse'"):
        make_trainer(tmp_path, [DENCallback(**short_phases())]).fit(tiny_model(), datamodule=datamodule)


def test_wrong_input_width_and_untrained_task_give_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=f"shape \\[batch, {IN_FEATURES}\\]"):
        model(torch.zeros(2, IN_FEATURES + 1), task=0)
    with pytest.raises(ValueError, match=r"task 3 was never trained.*0\.\.0"):
        model(torch.zeros(2, IN_FEATURES), task=3)


def test_task_evaluation_logs_task_indexed_metrics_and_writes_the_report(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from lightning_den import TaskEvaluation

    evaluation = TaskEvaluation(print_report=False)
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(tmp_path, [DENCallback(**short_phases()), evaluation], logger=logger).fit(
        tiny_model(), datamodule=tiny_stream(num_tasks=3)
    )
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if row.get("continual/acc/task_0")]
    assert [int(row["step"]) for row in logged[:3]] == [0, 1, 2]
    assert float(logged[2]["continual/acc/task_0"]) == pytest.approx(evaluation.accuracy[2][0])
    assert any(row.get("continual/forgetting") for row in rows)
    epoch_tasks = [float(row["sequence/task"]) for row in rows if row.get("sequence/task")]
    assert epoch_tasks == sorted(epoch_tasks) and set(epoch_tasks) == {0.0, 1.0, 2.0}  # the task of every epoch
    directory = tmp_path / "run" / "version_0"
    assert (directory / "continual_metrics.json").exists() and (directory / "accuracy_matrix.png").exists()
    assert evaluation.summary["widths"][0] == HIDDEN and len(evaluation.summary["auroc"]) == 3


@pytest.mark.parametrize("method", ["den", "progressive"])
def test_the_default_progress_bar_names_the_task_and_the_phase(tmp_path, method):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_den.baselines import ProgressiveCallback, ProgressiveNet

    bar = TQDMProgressBar()
    if method == "den":
        model, callback, phase = tiny_model(), DENCallback(**short_phases()), "split"
    else:
        model, callback, phase = ProgressiveNet(IN_FEATURES, HIDDEN, 2), ProgressiveCallback(epochs_per_task=2), "train"
    trainer = make_trainer(tmp_path, [callback, bar], enable_progress_bar=True)
    trainer.fit(model, datamodule=tiny_stream(num_tasks=2))
    shown = bar.get_metrics(trainer, model)
    assert shown["task"] == "1" and shown["phase"] == phase


def test_labels_beyond_a_tasks_head_are_refused_before_any_task_trains(tmp_path):
    datamodule = tiny_stream(num_tasks=2)
    x, y = datamodule.train_tasks[1]
    datamodule.train_tasks[1] = (x, y + 2)  # task 1 now has labels 2 and 3, the heads have 2 outputs
    model = tiny_model()
    trainer = make_trainer(tmp_path, [DENCallback(**short_phases())])
    with pytest.raises(ValueError, match=r"task 1 has labels up to 3 but its head will have 2 outputs"):
        trainer.fit(model, datamodule=datamodule)
    assert model.mlp.num_tasks == 1 and trainer.global_step == 0  # refused before task 0 trained


class OverstatedLength(IterableDataset):
    """A task's training data in batches of 16, though ``len()`` says twice as many (as a sharded iterable may)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter([(self.x[start : start + 16], self.y[start : start + 16]) for start in range(0, len(self.y), 16)])

    def __len__(self) -> int:
        return 2 * math.ceil(len(self.y) / 16)


class OverstatedStream(TaskSequenceDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(OverstatedLength(*self.train_tasks[self.current_task]), batch_size=None)


def test_an_epoch_whose_loader_runs_out_before_its_length_counts_whole(tmp_path):
    data = tiny_stream(2)
    stream = OverstatedStream.from_tensors(train=data.train_tasks, test=data.test_tasks, batch_size=16)
    den = DENCallback(**short_phases())
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*__len__.*")  # Lightning's note on an iterable's length
        make_trainer(tmp_path, [den], max_epochs=den.method.max_epochs(2)).fit(model, datamodule=stream)
    assert model.tasks_learned == 2  # every epoch decided, though each ran half the batches len() promised


def test_labels_beyond_a_later_tasks_head_are_refused_when_a_fit_resumes(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [DENCallback(**short_phases()), checkpoint], enable_checkpointing=True).fit(
        tiny_model(), datamodule=tiny_stream(2)
    )
    longer = tiny_stream(4)
    x, y = longer.train_tasks[3]
    longer.train_tasks[3] = (x, y + 2)
    model = tiny_model()
    with pytest.raises(ValueError, match=r"task 3 has labels up to 3 but its head will have 2 outputs"):
        make_trainer(tmp_path, [DENCallback(**short_phases())]).fit(
            model, datamodule=longer, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert model.mlp.num_tasks == 2  # refused as the fit started, before task 2 got its head


def test_weight_averaging_and_sharded_strategies_are_refused(tmp_path):
    from lightning.pytorch.callbacks import WeightAveraging
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = make_trainer(tmp_path, [DENCallback(**short_phases()), WeightAveraging()])
    with pytest.raises(MisconfigurationException, match="WeightAveraging"):
        trainer.fit(tiny_model(), datamodule=tiny_stream(2))
    den = DENCallback(**short_phases())
    trainer = make_trainer(tmp_path, [den], strategy=ModelParallelStrategy())
    with pytest.raises(MisconfigurationException, match="not ModelParallelStrategy"):
        den.setup(trainer, tiny_model(), "fit")


def test_an_empty_training_limit_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [DENCallback(**short_phases())], limit_train_batches=0)
    with pytest.raises(MisconfigurationException, match="limit_train_batches=0"):
        trainer.fit(tiny_model(), datamodule=tiny_stream(2))


class RecordSelectiveRetraining(Callback):
    """The block's weights when selective retraining starts and when it ends, with the selection."""

    def __init__(self) -> None:
        self.runs: list[tuple[list[list[int]], dict, dict, dict]] = []
        self._start: tuple[list[list[int]], dict, dict] | None = None
        self.optimized_entries: list[int] = []  # the entries the optimizer steps in each selective retraining

    def on_task_boundary(self, trainer, pl_module, boundary: TaskBoundary) -> None:
        weights = {
            name: t.clone() for name, t in pl_module.mlp.state_dict().items() if name.endswith(("weight", "bias"))
        }
        if boundary.phase == "selective":
            groups = trainer.optimizers[0].param_groups
            trained = [p for group in groups for p in group["params"] if p.requires_grad]  # the others get no grad
            self.optimized_entries.append(sum(p.numel() for p in trained))
            self._start = (boundary.changes["selection"], dict(boundary.changes), weights)
        elif self._start is not None:
            self.runs.append((*self._start, weights))
            self._start = None


@pytest.mark.parametrize("subnetwork_only", [False, True])
def test_selective_retraining_trains_a_proper_subset_and_leaves_the_rest_bit_identical(tmp_path, subnetwork_only):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_den import TaskEvaluation

    record, evaluation = RecordSelectiveRetraining(), TaskEvaluation(print_report=False)
    den = DENCallback(**short_phases(selection_budget=0.5, loss_threshold=0.0, subnetwork_only=subnetwork_only))
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(tmp_path, [den, record, evaluation], logger=logger).fit(tiny_model(), datamodule=tiny_stream(3))
    assert len(record.runs) == 2  # tasks 1 and 2
    for task, (selection, changes, before, after) in enumerate(record.runs, start=1):
        widths = [before[f"hidden.{i}.bias"].numel() for i in range(len(HIDDEN))]
        counted = [len(units) / width for units, width in zip(selection[1:], widths, strict=True)]
        caps = [max(1, math.floor(0.5 * width)) for width in widths]
        assert all(0 < len(units) <= cap < width for units, cap, width in zip(selection[1:], caps, widths, strict=True))
        assert changes["selected_fraction"] == counted == evaluation.selection[task]["selected_fraction"]
        zeros = [
            int((before[f"hidden.{i}.weight"] == 0).sum()) / before[f"hidden.{i}.weight"].numel() for i in range(2)
        ]
        assert changes["zero_fraction"] == zeros
        for index in range(len(HIDDEN)):  # every entry outside the selected rows x columns kept its value
            rows = torch.zeros(widths[index], dtype=torch.bool)
            rows[selection[index + 1]] = True
            cols = torch.zeros(before[f"hidden.{index}.weight"].shape[1], dtype=torch.bool)
            cols[selection[index]] = True
            frozen = ~(rows[:, None] & cols[None, :])
            weight, bias = f"hidden.{index}.weight", f"hidden.{index}.bias"
            trained = after[weight][: frozen.shape[0], : frozen.shape[1]]  # the units expansion added come after
            assert torch.equal(trained[frozen], before[weight][frozen])
            assert torch.equal(after[bias][: widths[index]][~rows], before[bias][~rows])
            assert not torch.equal(trained, before[weight])  # and the selected entries did train
        # the optimizer steps the subnetwork's entries only: its weights, biases and the new head's columns
        sizes = [len(units) for units in selection]
        head_outputs = before[f"heads.{task}.bias"].numel()
        expected = sum(a * b + b for a, b in zip(sizes, [*sizes[1:], head_outputs], strict=False))
        assert record.optimized_entries[task - 1] == expected
    assert evaluation.summary["selection"][0] is None and len(evaluation.summary["selection"]) == 3
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("selection/fraction/layer_0")]
    assert [float(row["selection/fraction/layer_0"]) for row in logged] == [
        changes["selected_fraction"][0] for _, changes, _, _ in record.runs
    ]


@pytest.mark.parametrize(
    ("variant", "phases"),
    [
        ({"expansion": False, "split": False}, ["head_fit", "selective"]),  # the paper's DNN-Selective
        ({"split": False}, ["head_fit", "selective", "expansion"]),  # DEN without split
    ],
)
def test_ablation_variants_run_only_their_phases_and_prune_what_expansion_left(tmp_path, variant, phases):
    record = RecordBoundaries()
    den = DENCallback(**short_phases(loss_threshold=0.0, group_sparsity=100.0), **variant)
    model = tiny_model()
    make_trainer(tmp_path, [den, record]).fit(model, datamodule=tiny_stream(3))
    assert [b.phase for b in record.boundaries] == phases * 2 + [None]
    if "expansion" in phases:  # leaving expansion, dead new units are pruned, at the end of the stream too
        leaving = [b for b in record.boundaries if b.previous_phase == "expansion"]
        assert [b.phase for b in leaving] == ["head_fit", None]
        assert all(any(layer for layer in b.changes["pruned"]) for b in leaving)  # units really were pruned
        assert all(not dead_new_units(model.mlp, layer) for layer in range(len(HIDDEN)))


class CrashInPhase(Callback):
    def __init__(self, den: DENCallback, phase: str) -> None:
        self.den, self.phase = den, phase

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if str(self.den.phase) == self.phase:
            assert pl_module.mlp.hidden[0].separated  # the phase trains Parameters of its own
            raise RuntimeError(f"crash in {self.phase}")


@pytest.mark.parametrize("ending", ["expansion ends the stream", "selective", "expansion"])
def test_the_network_has_its_plain_layout_after_the_fit(tmp_path, ending):
    model, den = tiny_model(), DENCallback(**short_phases(loss_threshold=0.0, split=False))
    if ending == "expansion ends the stream":
        make_trainer(tmp_path, [den]).fit(model, datamodule=tiny_stream(num_tasks=2))
    else:
        with pytest.raises(RuntimeError, match=f"crash in {ending}"):
            make_trainer(tmp_path, [den, CrashInPhase(den, ending)]).fit(model, datamodule=tiny_stream(num_tasks=2))
    assert str(den.phase) == ending.split()[0]
    assert not any(layer.separated for layer in [*model.mlp.hidden, *model.mlp.heads.values()])
    assert {name.rpartition(".")[2] for name, _ in model.named_parameters()} == {"weight", "bias"}
    assert all(p.requires_grad for p in model.mlp.hidden.parameters())


def split_run(tmp_path, split_threshold: float):
    """Two tiny tasks with every phase run; the evaluation and the CSV logger's rows of the split metrics."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_den import TaskEvaluation

    torch.manual_seed(0)
    evaluation = TaskEvaluation(print_report=False, plots=False)
    logger = CSVLogger(tmp_path, name=f"split_{split_threshold}")
    den = DENCallback(**short_phases(loss_threshold=0.0, split_threshold=split_threshold))
    make_trainer(tmp_path, [den, evaluation], logger=logger).fit(tiny_model(), datamodule=tiny_stream(2))
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("split/units/layer_0")]
    return evaluation, logged


def test_the_split_is_reported_with_the_largest_drift_that_a_threshold_above_it_leaves_unsplit(tmp_path):
    from lightning_den.report import format_report

    every, logged = split_run(tmp_path, split_threshold=0.0)
    (none, report), units, drift = (
        every.summary["splits"],
        every.splits[1]["split_units"],
        every.splits[1]["largest_drift"],
    )
    assert none is None and report == every.splits[1]
    assert all(count > 0 for count in units) and all(d > 0 for d in drift)  # every drifted unit split
    assert [float(logged[0][f"split/largest_drift/layer_{i}"]) for i in range(len(HIDDEN))] == pytest.approx(drift)
    assert [int(float(logged[0][f"split/units/layer_{i}"])) for i in range(len(HIDDEN))] == units
    assert "split, per task: units duplicated in each hidden layer" in format_report(every.summary)
    above, _ = split_run(tmp_path, split_threshold=max(drift) * 1.01)  # the same run until the split
    assert above.splits[1] == {"split_units": [0] * len(HIDDEN), "largest_drift": drift}


@pytest.mark.parametrize(
    ("loss_threshold", "early_expansion", "selective_run", "expands"),
    [
        (0.0, True, 2, True),  # no loss reaches 0: decided after the second epoch, the first with a rate
        (0.0, False, 5, True),  # the paper's schedule: every epoch, then the same decision
        (100.0, True, 5, False),  # below the threshold from the start: runs its epochs, no expansion
    ],
)
def test_early_expansion_ends_selective_retraining_once_the_threshold_is_out_of_reach(
    tmp_path, caplog, loss_threshold, early_expansion, selective_run, expands
):
    den = DENCallback(
        **short_phases(selective_epochs=5, loss_threshold=loss_threshold, early_expansion=early_expansion)
    )
    evaluation = TaskEvaluation(output_dir=str(tmp_path), plots=False, print_report=False)
    lightning_defaults = dict(logger=True, enable_checkpointing=True, limit_val_batches=None, num_sanity_val_steps=2)
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [den, evaluation], **lightning_defaults).fit(tiny_model(), datamodule=tiny_stream())
    for task in (1, 2):
        epochs = evaluation.phase_epochs[task]
        assert epochs["selective"] == selective_run
        assert ("expansion" in epochs) is expands
        # the log line of the boundary says how many of the phase's epochs ran
        (line,) = [line for line in caplog.messages if line.startswith(f"DEN: task {task} selective (loss ")]
        assert f", epoch {selective_run} of 5) -> task {task}, phase {'expansion' if expands else 'split'}" in line
