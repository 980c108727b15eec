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
from typing_extensions import override

from lightning_den.core.method import TaskBlock
from lightning_den.core.routing import task_blocks

#: what makes a datamodule a task stream (TaskSequenceDataModule has all of it)
TASK_STREAM_API = ("num_tasks", "current_task", "set_task", "num_classes", "task_dataloader")


def is_task_stream(datamodule: Any) -> bool:
    """Whether ``datamodule`` serves a task sequence (one evaluation dataloader per seen task).

    Example:
        >>> from lightning_den import SplitDigits
        >>> is_task_stream(SplitDigits()), is_task_stream(None)
        (True, False)
    """
    return datamodule is not None and all(hasattr(datamodule, name) for name in TASK_STREAM_API)


def evaluation_source(trainer: pl.Trainer) -> Any:
    """Where the running evaluation's dataloaders come from: a datamodule, the module, or the loaders a user
    passed (``trainer.validate(model, dataloaders=...)``). ``trainer.datamodule`` cannot tell: it keeps the
    datamodule of an earlier call; Lightning records the source of each stage's loaders on that stage's loop."""
    loops = {
        TrainerFn.FITTING: trainer.fit_loop.epoch_loop.val_loop,
        TrainerFn.VALIDATING: trainer.validate_loop,
        TrainerFn.TESTING: trainer.test_loop,
        TrainerFn.PREDICTING: trainer.predict_loop,
    }
    return loops[trainer.state.fn]._data_source.instance


class RoutedEvaluation(Callback):
    """Route each validation, test and predict batch of a task stream to its dataloader's task, then give the
    blocks back the task they routed to before. Loaders that do not come from a task stream are left alone.

    The task-sequence callbacks (``DENCallback``, ``ProgressiveCallback``, ...) do this; it is a callback of its
    own so that its hooks stay apart from the training ones.

    Example::

        class Mine(pl.LightningModule):  # written without lightning_den
            def validation_step(self, batch, batch_idx, dataloader_idx=0):
                x, y = batch
                self.log("val_acc", (self(x).argmax(-1) == y).float().mean())  # task `dataloader_idx`'s head

        trainer = pl.Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, callbacks=[DENCallback()])
        trainer.fit(Mine(), datamodule=SplitDigits())  # validates every seen task through its own network

    Raises:
        ValueError: a dataloader of a task the model has not learnt (a datamodule ahead of the model).
    """

    _routed: list[tuple[TaskBlock, int]] | None = None

    def _hold(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        blocks = task_blocks(pl_module).values()
        routes = blocks and is_task_stream(evaluation_source(trainer))
        self._routed = [(block, block.active_task) for block in blocks] if routes else None

    def _route(self, dataloader_idx: int) -> None:
        if self._routed is None:
            return
        for block, _ in self._routed:
            block.check_task(dataloader_idx)  # before any block changes
        for block, _ in self._routed:
            block.active_task = dataloader_idx

    def _release(self) -> None:
        for block, active in self._routed or ():
            block.active_task = active
        self._routed = None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hold(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hold(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hold(trainer, pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._route(dataloader_idx)

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._route(dataloader_idx)

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._route(dataloader_idx)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()  # an evaluation that raised never reaches its end hook
