"""Regression tests, one per bug of the official DEN code that this project fixes (reference §3.1).

B2-B5 and the multi-layer core (B10) are pinned in ``tests/core``; these need the training loop.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_den import DENMLP, DENCallback, TaskBoundary
from lightning_den.core.den.entries import ProximalTarget
from lightning_den.core.den.prox import group_lasso_prox_, l1_prox_
from tests.helpers import IN_FEATURES, make_trainer, short_phases, tiny_model, tiny_stream


class PhaseLog(Callback):
    """Training batches run per (task, phase), and every boundary."""

    def __init__(self, den: DENCallback) -> None:
        self.den = den
        self.batches: dict[tuple[int, str], int] = {}
        self.boundaries: list[TaskBoundary] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        key = (self.den.progress.task, self.den.progress.phase)
        self.batches[key] = self.batches.get(key, 0) + 1

    def on_task_boundary(self, trainer, pl_module, boundary) -> None:
        self.boundaries.append(boundary)

    def phases(self, task: int) -> list[str]:
        return [b.phase for b in self.boundaries if b.task == task and b.phase is not None]


def test_b1_head_fit_runs_all_its_epochs_not_one_step(tmp_path):
    den = DENCallback(**short_phases(head_fit_epochs=4))
    log = PhaseLog(den)
    datamodule = tiny_stream(num_tasks=2)  # 48 examples, batches of 16: 3 batches per epoch
    make_trainer(tmp_path, [den, log]).fit(tiny_model(), datamodule=datamodule)
    assert log.batches[(1, "head_fit")] == 4 * 3


class OffsetFirstBatches(DENMLP):
    """Adds a constant to the loss of every batch but the last one of an epoch (no effect on gradients)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        last = batch_idx == self.trainer.num_training_batches - 1
        return loss if last else loss + 5.0


def test_b8_expansion_compares_tau_with_the_mean_epoch_loss_not_the_last_batch(tmp_path):
    den = DENCallback(**short_phases(loss_threshold=3.0))
    log = PhaseLog(den)
    model = OffsetFirstBatches(IN_FEATURES, [5, 4], num_classes=2, optimizer=torch.optim.Adam)
    make_trainer(tmp_path, [den, log]).fit(model, datamodule=tiny_stream(num_tasks=2))
    # the last batch's loss (< 1) is under tau = 3, the epoch mean (> 3) is over it: DEN must expand
    assert log.phases(1) == ["head_fit", "selective", "expansion", "split"]


def test_b9_split_runs_without_expansion(tmp_path):
    den = DENCallback(**short_phases(loss_threshold=1e6, split_threshold=0.0))
    log = PhaseLog(den)
    model = tiny_model()
    make_trainer(tmp_path, [den, log]).fit(model, datamodule=tiny_stream(num_tasks=2))
    assert log.phases(1) == ["head_fit", "selective", "split"]
    split = next(b for b in log.boundaries if b.phase == "split").changes["split"]
    assert sum(map(len, split)) > 0  # selective retraining moved old units, and they were split
    assert [layer.out_features for layer in model.mlp.hidden] == [5 + len(split[0]), 4 + len(split[1])]


def test_b10_any_number_of_hidden_layers_trains_end_to_end(tmp_path):
    model = DENMLP(IN_FEATURES, [6, 5, 4, 3], num_classes=2, optimizer=torch.optim.Adam)
    den = DENCallback(**short_phases(loss_threshold=0.0))
    make_trainer(tmp_path, [den]).fit(model, datamodule=tiny_stream(num_tasks=3))
    assert len(model.mlp.widths(2)) == 4
    assert all(layer.out_features > size for layer, size in zip(model.mlp.hidden, [6, 5, 4, 3], strict=True))
    model.mlp.check_prefix_invariant()


def test_b6_group_lasso_acts_on_the_l1_result():
    torch.manual_seed(0)
    weight = torch.randn(6, 5) * 0.3
    expected = weight.clone()
    l1_prox_([expected], 0.1)
    group_lasso_prox_([expected[3:]], 0.4)
    stepped = weight.clone()
    ProximalTarget(stepped, new_rows=stepped[3:]).step_(l1=0.1, group=0.4)
    assert torch.equal(stepped, expected)
    # the other order gives a different result, so the order is part of the contract
    other = weight.clone()
    group_lasso_prox_([other[3:]], 0.4)
    l1_prox_([other], 0.1)
    assert not torch.equal(other, expected)


def test_tau_sees_the_same_mean_loss_with_gradient_accumulation(tmp_path):
    losses = []
    for accumulate in (1, 3):
        recorder = PhaseLog(den := DENCallback(**short_phases(first_task_epochs=1)))
        torch.manual_seed(0)
        model = tiny_model(lr=0.0)  # nothing learns: every batch's loss is the same in both runs
        make_trainer(tmp_path, [den, recorder], accumulate_grad_batches=accumulate).fit(
            model, datamodule=tiny_stream(num_tasks=2)
        )
        losses.append(recorder.boundaries[0].loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
