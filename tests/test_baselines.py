"""Progressive Networks, fine-tuning and EWC on the same task-sequence machinery as DEN."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_den import TaskBoundary
from lightning_den.baselines import EWCCallback, FineTuningCallback, ProgressiveCallback, ProgressiveNet
from tests.conftest import HIDDEN, IN_FEATURES, make_trainer, tiny_model, tiny_stream

PROBE = torch.randn(9, IN_FEATURES, generator=torch.Generator().manual_seed(3))


class OutputsAtTaskEnd(Callback):
    """Each task's outputs right after it ends, and again at the end of the stream."""

    def __init__(self) -> None:
        self.at_end: dict[int, torch.Tensor] = {}
        self.final: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def on_task_boundary(self, trainer, pl_module, boundary: TaskBoundary) -> None:
        if boundary.ended_task is not None:
            self.at_end[boundary.ended_task] = pl_module(PROBE, task=boundary.ended_task).clone()
        if boundary.finished:
            self.final = {t: pl_module(PROBE, task=t).clone() for t in self.at_end}


def progressive(lateral: bool = True) -> ProgressiveNet:
    return ProgressiveNet(
        IN_FEATURES, HIDDEN, 2, lateral=lateral, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2)
    )


@pytest.mark.parametrize("lateral", [True, False])
def test_progressive_networks_never_forget_bit_for_bit(tmp_path, lateral):
    outputs = OutputsAtTaskEnd()
    model = progressive(lateral)
    make_trainer(tmp_path, [ProgressiveCallback(epochs_per_task=3), outputs]).fit(model, datamodule=tiny_stream(3))
    assert sorted(outputs.at_end) == [0, 1, 2] and model.columns.num_tasks == 3
    for task, before in outputs.at_end.items():
        assert torch.equal(outputs.final[task], before), f"task {task} changed"
    single, total = model.columns.num_parameters(0), model.columns.num_parameters()
    if lateral:
        assert total > 3 * single  # the lateral adapters come on top of three columns
    else:
        assert total == 3 * single  # three independent networks: single-task learning


def test_fine_tuning_forgets_and_ewc_holds_the_shared_weights(tmp_path):
    def trunk_drift(callback) -> float:
        torch.manual_seed(0)
        model = tiny_model(lr=5e-2)

        class Record(Callback):
            def on_task_boundary(self, trainer, pl_module, boundary):
                if boundary.ended_task == 0:
                    self.after_first = [p.detach().clone() for p in pl_module.mlp.hidden.parameters()]

        record = Record()
        make_trainer(tmp_path, [callback, record]).fit(model, datamodule=tiny_stream(2))
        moved = [
            p.detach() - before for p, before in zip(model.mlp.hidden.parameters(), record.after_first, strict=True)
        ]
        return float(torch.sqrt(sum((m**2).sum() for m in moved)))

    fine_tuning = trunk_drift(FineTuningCallback(epochs_per_task=4))
    ewc = trunk_drift(EWCCallback(ewc_lambda=1e5, epochs_per_task=4))
    assert fine_tuning > 0 and ewc < 0.2 * fine_tuning


def test_baseline_arguments_are_checked():
    with pytest.raises(MisconfigurationException, match="epochs_per_task"):
        ProgressiveCallback(epochs_per_task=0)
    with pytest.raises(MisconfigurationException, match="ewc_lambda"):
        EWCCallback(ewc_lambda=-1.0)


def test_packnet_never_forgets_bit_for_bit_and_shares_out_disjoint_weights(tmp_path):
    from lightning_den.baselines import PackNetCallback, PackNetModel

    outputs = OutputsAtTaskEnd()
    model = PackNetModel(
        IN_FEATURES, HIDDEN, 2, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    )
    callback = PackNetCallback(prune_fraction=0.5, train_epochs=3, retrain_epochs=2)
    make_trainer(tmp_path, [callback, outputs]).fit(model, datamodule=tiny_stream(3))
    for task, before in outputs.at_end.items():
        assert torch.equal(outputs.final[task], before), f"task {task} changed"
    for owner in model.net.owners():
        assert set(owner.unique().tolist()) <= {0, 1, 2, 3}
        assert int((owner == 3).sum()) > 0  # the last task claimed what was left
        assert int((owner == 0).sum()) == 0
    # each task's output is computed from exactly the weights it and earlier tasks own
    with torch.no_grad():
        for task in reversed(range(3)):  # each step spoils only weights of tasks after `task`
            for layer, owner in zip(model.net.hidden, model.net.owners(), strict=True):
                layer.weight[owner > task + 1] = 1e3  # later tasks' weights must not matter
            assert torch.equal(model(PROBE, task=task), outputs.final[task])


def test_packnet_refuses_a_bad_fraction():
    from lightning_den.baselines import PackNetCallback

    with pytest.raises(MisconfigurationException, match="prune_fraction"):
        PackNetCallback(prune_fraction=1.0)
