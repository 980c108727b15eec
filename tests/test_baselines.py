"""Progressive Networks, fine-tuning and EWC on the same task-sequence machinery as DEN."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_den import TaskBoundary
from lightning_den.baselines import EWCCallback, FineTuningCallback, ProgressiveCallback, ProgressiveNet
from tests.helpers import HIDDEN, IN_FEATURES, make_trainer, tiny_model, tiny_stream

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


def test_ewc_fisher_is_the_mean_squared_per_example_gradient(tmp_path):
    callback = EWCCallback(epochs_per_task=1)
    model = tiny_model()
    datamodule = tiny_stream(2)
    make_trainer(tmp_path, [callback]).fit(model, datamodule=datamodule)
    fisher = callback.method.task_fisher(model, model.mlp, 0, datamodule.task_dataloader(0, "train"))
    x, y = datamodule.train_tasks[0]
    expected = {name: torch.zeros_like(p) for name, p in model.mlp.hidden.named_parameters()}
    for i in range(len(y)):  # one example at a time, by plain autograd
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1], task=0), y[i : i + 1]).backward()
        for name, p in model.mlp.hidden.named_parameters():
            expected[name] += p.grad**2 / len(y)
    for name, value in expected.items():
        torch.testing.assert_close(fisher[f"mlp.hidden.{name}"], value, rtol=1e-4, atol=1e-7)
    assert not any(name.startswith("mlp.heads") for name in fisher)
    # no autograd history: a graph hanging off the Fisher kept every batch's per-example gradients alive
    assert all(value.grad_fn is None and not value.requires_grad for value in fisher.values())


def test_packnet_refuses_a_network_too_small_for_the_stream_before_training(tmp_path):
    from lightning_den.baselines import PackNetCallback, PackNetModel

    model = PackNetModel(IN_FEATURES, [1], 2)  # 6 weights in the first layer
    trainer = make_trainer(tmp_path, [PackNetCallback(prune_fraction=0.1, train_epochs=1, retrain_epochs=1)])
    with pytest.raises(MisconfigurationException, match=r"hidden layer \d .* no free weight left for task"):
        trainer.fit(model, datamodule=tiny_stream(3))
    assert model.net.num_tasks == 1  # refused before anything trained


def test_a_callback_stopped_mid_sequence_is_refused_and_a_finished_checkpoint_resumes_to_nothing(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    stopped = ProgressiveCallback(epochs_per_task=2)
    with pytest.warns(UserWarning, match="stopped at task 0"):
        make_trainer(tmp_path, [stopped], max_steps=2).fit(progressive(), datamodule=tiny_stream(2))
    with pytest.raises(MisconfigurationException, match="stopped in the middle of task 0 of an earlier fit"):
        make_trainer(tmp_path, [stopped]).fit(progressive(), datamodule=tiny_stream(2))
    callback = ProgressiveCallback(epochs_per_task=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [callback, checkpoint], enable_checkpointing=True).fit(
        progressive(), datamodule=tiny_stream(2)
    )
    boundaries = []

    class Count(Callback):
        def on_task_boundary(self, trainer, pl_module, boundary):
            boundaries.append(boundary)

        def on_train_epoch_start(self, trainer, pl_module):
            boundaries.append("epoch")

    resumed = make_trainer(tmp_path, [ProgressiveCallback(epochs_per_task=2), Count()], enable_checkpointing=True)
    resumed.fit(progressive(), datamodule=tiny_stream(2), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert boundaries == []  # the sequence was over: no epoch, no second end-of-stream boundary


@pytest.mark.parametrize(
    ("callback", "method"),
    [
        ("DENCallback", "DENMethod"),
        ("ProgressiveCallback", "ProgressiveMethod"),
        ("PackNetCallback", "PackNetMethod"),
        ("FineTuningCallback", "FineTuningMethod"),
        ("EWCCallback", "EWCMethod"),
    ],
)
def test_each_callback_offers_its_methods_arguments_with_the_same_defaults(callback, method):
    import inspect

    import lightning_den
    import lightning_den.core

    offered = inspect.signature(getattr(lightning_den, callback)).parameters
    taken = inspect.signature(getattr(lightning_den.core, method)).parameters
    driver = {"block", "convergence_tol"}
    assert set(offered) - driver == set(taken)
    assert all(offered[name].default == taken[name].default for name in taken), callback
