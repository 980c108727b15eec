"""Evaluation of a task stream through each task's own network, for modules written without a ``task`` argument.

A task-sequence datamodule serves one validation, test and predict dataloader per task seen so far, and
``dataloader_idx == task``. A module written without lightning_den computes ``self(x)``, which the blocks route
to their active task (the one in training); :class:`RoutedEvaluation` makes that the task of the batch's
dataloader for the length of each evaluation, so that the module's own ``validation_step``, ``test_step`` and
``predict_step`` score every task through its head and timestamped widths. A module that names the task itself
(``self(x, task=dataloader_idx)``, as :class:`~lightning_den.module.DENLightningModule` does) computes the same.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_den.core.method import TaskBlock
from lightning_den.core.routing import newest_task_held, task_blocks
from lightning_den.data.module import is_task_stream


def evaluation_source(trainer: pl.Trainer) -> Any:
    """Where the running evaluation's dataloaders come from: a datamodule, the module, or the loaders a user
    passed (``trainer.validate(model, dataloaders=...)``).

    ``trainer.datamodule`` cannot tell: it keeps the datamodule of an earlier call. Lightning records the source
    of each stage's loaders on that stage's loop (read here, never changed).

    Args:
        trainer: a Trainer in a fit (its validation or sanity check), ``validate``, ``test`` or ``predict``.
    """
    loops = {
        TrainerFn.FITTING: trainer.fit_loop.epoch_loop.val_loop,
        TrainerFn.VALIDATING: trainer.validate_loop,
        TrainerFn.TESTING: trainer.test_loop,
        TrainerFn.PREDICTING: trainer.predict_loop,
    }
    return loops[trainer.state.fn]._data_source.instance


def serve_every_task_held(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """For ``validate``, ``test`` and ``predict``: move the task stream the evaluation reads to the newest task
    the model holds, so that it serves a loader for each (a fresh datamodule stands at task 0). Loaders the user
    passed, and a stream already there or further, are left alone.

    Args:
        trainer: the Trainer, set up for an evaluation (its data attached).
        pl_module: the module, its blocks converted.
    """
    datamodule, newest = evaluation_source(trainer), newest_task_held(pl_module)
    if newest is None or not is_task_stream(datamodule):
        return
    newest = min(newest, datamodule.num_tasks - 1)
    if newest > datamodule.current_task:
        rank_zero_info(f"{type(pl_module).__name__}: evaluating tasks 0..{newest}, every task it holds in this stream")
        datamodule.set_task(newest)


class RoutedEvaluation(Callback):
    """Route each validation, test and predict batch of a task stream to its dataloader's task, then give the
    blocks back the task they routed to before. Loaders that do not come from a task stream are left alone.

    The base of the task-sequence callbacks (``DENCallback``, ``ProgressiveCallback``, ...): evaluation is routed
    whenever one of them is among the Trainer's callbacks. A subclass that overrides one of these hooks calls
    ``super()``.

    Example::

        class Mine(pl.LightningModule):  # written without lightning_den
            def validation_step(self, batch, batch_idx, dataloader_idx=0):
                x, y = batch
                self.log("val_acc", (self(x).argmax(-1) == y).float().mean())  # task `dataloader_idx`'s head

        trainer = pl.Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, callbacks=[DENCallback()])
        trainer.fit(Mine(), datamodule=SplitDigits())  # validates every seen task through its own network

    Raises:
        ValueError: at the evaluation's start, for a task stream ahead of the model (serving a task it has not
            learnt).
    """

    _routed: list[tuple[TaskBlock, int]] | None = None

    def _hold(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep each block's routed task, if the loaders are a task stream's; a module whose ``predict_task`` is
        set (``DENLightningModule``'s) names the task to predict itself and is not routed while predicting."""
        self._release()  # an evaluation that ended without its end hook
        if trainer.predicting and getattr(pl_module, "predict_task", None) is not None:
            return  # the module names the task to predict (DENLightningModule.predict_task)
        datamodule, newest = evaluation_source(trainer), newest_task_held(pl_module)
        if newest is None or not is_task_stream(datamodule):
            return
        if datamodule.current_task > newest:
            raise ValueError(
                f"the task stream serves tasks 0..{datamodule.current_task}, but the model holds tasks 0..{newest}: "
                f"the datamodule stands ahead of the model; evaluate it at task {newest} "
                f"(`datamodule.set_task({newest})`)"
            )
        self._routed = [(block, block.active_task) for block in task_blocks(pl_module).values()]

    def _route(self, dataloader_idx: int) -> None:
        for block, _ in self._routed or ():
            block.active_task = dataloader_idx

    def _release(self) -> None:
        for block, active in self._routed or ():
            block.active_task = active
        self._routed = None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the task the blocks route to, if the validation loaders are a task stream's."""
        self._hold(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the task the blocks route to, if the test loaders are a task stream's."""
        self._hold(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the task the blocks route to, if the predict loaders are a task stream's."""
        self._hold(trainer, pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Route to task ``dataloader_idx``."""
        self._route(dataloader_idx)

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Route to task ``dataloader_idx``."""
        self._route(dataloader_idx)

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Route to task ``dataloader_idx``."""
        self._route(dataloader_idx)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Route to the task of before the validation."""
        self._release()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Route to the task of before the test."""
        self._release()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Route to the task of before the prediction."""
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Route to the task of before an evaluation that raised (its end hook never runs)."""
        self._release()
