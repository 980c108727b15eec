"""LightningModules for task sequences: :class:`DENLightningModule` and the ready :class:`DENMLP`.

A :class:`DENLightningModule` knows the task it is trained on (``current_task``: its blocks' active task, set
by the callbacks at task boundaries) and how many tasks it has learnt (``tasks_learned``). It computes the
classification loss of the current task's head, evaluates each seen task on its own dataloader
(``dataloader_idx == task``), predicts with an explicit task's head, and builds its optimizer from the
parameters it has *now*, so grown layers are always optimised. Each block's architecture travels inside
the ``state_dict`` as plain data, so any ``load_state_dict`` (a checkpoint, ``ddp_spawn`` handing the
weights back) first grows the blocks to the saved shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_den.core.den.conv import ExpandableCNN
from lightning_den.core.den.layers import ExpandableMLP
from lightning_den.core.method import TaskBlock
from lightning_den.core.routing import set_active_task, task_blocks
from lightning_den.routed_evaluation import serve_every_task_held

#: key of a task-sequence callback's checkpoint state: False when it was saved in the middle of an epoch
EPOCH_END = "epoch_end"


def refuse_resuming_within_an_epoch(callback_states: Iterable[Any]) -> None:
    """Raise if a task-sequence callback's saved state says it was written in the middle of an epoch.

    A :class:`DENLightningModule` checks before anything loads; the callbacks check their own state for any
    other module.
    """
    if any(isinstance(state, dict) and state.get(EPOCH_END) is False for state in callback_states):
        raise MisconfigurationException(
            "a task sequence resumes from checkpoints written at the end of a training epoch, and this one was "
            "written in the middle of one (e.g. `ModelCheckpoint(every_n_train_steps=...)`, or after validation "
            "run within the epoch): the phase decisions are taken at epoch ends. Resume from an end-of-epoch "
            "checkpoint (ModelCheckpoint's default with validation once an epoch, or `save_on_train_epoch_end="
            "True`); to use these weights without resuming, load them with `load_from_checkpoint`."
        )


def batch_inputs(batch: Any) -> Tensor:
    """The inputs of a batch: ``x`` itself, or the first item of ``(x, y)``/``[x, y]``.

    Example:
        >>> batch_inputs((torch.ones(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
    """
    return batch[0] if isinstance(batch, list | tuple) else batch


class DENLightningModule(pl.LightningModule):
    """Base class of modules trained on a task sequence with one output head per task.

    Subclasses define ``forward(x, task=None)`` returning the logits of ``task``'s head (``None``: the block's
    active task, which the callbacks set); usually the MLP
    part is an :class:`ExpandableMLP` attribute that ``DENCallback`` finds and grows. Batches are
    ``(inputs, labels)`` with labels in ``0..classes-1`` of the task.

    Validation and test log, per seen task ``j``, ``{val,test}/loss/task_{j}`` and ``{val,test}/acc/task_{j}``,
    and their means over the seen tasks ``{val,test}/loss/avg`` and ``{val,test}/acc/avg``: names a
    ``ModelCheckpoint`` or ``EarlyStopping`` can monitor. ``predict`` returns the logits of the head of
    :attr:`predict_task`, or, when that is ``None``, of task ``dataloader_idx`` (the task-sequence
    datamodule serves one predict loader per seen task).

    Args:
        optimizer: builds the optimizer from parameters (e.g. ``torch.optim.Adam`` or
            ``functools.partial(torch.optim.SGD, lr=0.1)``); called again after every change of shape.
        lr_scheduler: optional, builds an LR scheduler from the optimizer (rebuilt with it).
        lr_scheduler_monitor: the logged metric a scheduler such as ``ReduceLROnPlateau`` follows.

    Attributes:
        current_task: the task being trained (after a sequence, the last one).
        tasks_learned: how many tasks the model has finished learning (0 for a new model).
        predict_task: the head ``predict`` uses; ``None``: the predict dataloader's index.

    Example::

        class ConvDEN(DENLightningModule):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten())
                self.mlp = ExpandableMLP(8 * 26 * 26, [64, 32], head_classes=10)

            def forward(self, x, task=None):
                return self.mlp(self.features(x), task)   # task None: the block's active task
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_monitor: str = "train/loss",
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.predict_task: int | None = None
        self._score_sums: dict[int, Tensor] = {}

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define `forward(x, task)`")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy of the current task's head (the data loss; DEN's regularisers act on the step)."""
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def setup(self, stage: str) -> None:
        """For ``validate``/``test``/``predict``: let a task-sequence datamodule serve every task the model holds.

        A fresh datamodule stands at task 0; a model loaded after a sequence holds tasks 0..``current_task``.
        """
        if stage != "fit" and self._trainer is not None:
            serve_every_task_held(self.trainer, self)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loss and accuracy of task ``dataloader_idx`` (one validation dataloader per seen task)."""
        self._add_scores(batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loss and accuracy of task ``dataloader_idx`` (one test dataloader per seen task)."""
        self._add_scores(batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._score_sums = {}

    def on_test_epoch_start(self) -> None:
        self._score_sums = {}

    def on_validation_epoch_end(self) -> None:
        """Log each task's loss and accuracy and their means over the tasks (summed over ranks first)."""
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        """Log each task's loss and accuracy and their means over the tasks (summed over ranks first)."""
        self._log_scores("test")

    def _add_scores(self, batch: Any, task: int) -> None:
        inputs, labels = batch
        logits = self(inputs, task=task)
        sums = torch.stack(
            [
                F.cross_entropy(logits.float(), labels, reduction="sum"),
                (logits.argmax(dim=-1) == labels).sum().float(),
                torch.tensor(float(labels.numel()), device=logits.device),
            ]
        ).detach()
        if task in self._score_sums:
            self._score_sums[task] += sums
        else:
            self._score_sums[task] = sums

    def _log_scores(self, stage: str) -> None:
        # logged once per epoch, not per dataloader: the names stay the same whether one or many tasks are seen
        if not self._score_sums:
            return
        tasks = sorted(self._score_sums)
        sums = self.trainer.strategy.reduce(torch.stack([self._score_sums[t] for t in tasks]), reduce_op="sum")
        loss, accuracy = sums[:, 0] / sums[:, 2], sums[:, 1] / sums[:, 2]
        # read once per evaluation epoch; plain numbers, identical on every rank after the reduce
        values = torch.cat([loss, accuracy, loss.mean()[None], accuracy.mean()[None]]).tolist()
        names = [f"{stage}/{kind}/task_{t}" for kind in ("loss", "acc") for t in tasks]
        scores = dict(zip([*names, f"{stage}/loss/avg", f"{stage}/acc/avg"], values, strict=True))
        # already the same on every rank: the max over ranks keeps them bit for bit (a mean over 3 ranks might
        # not) and tells Lightning they are synced, which it otherwise warns about under DDP
        self.log_dict(scores, sync_dist=True, reduce_fx="max")

    def on_predict_start(self) -> None:
        if self.predict_task is not None:
            self._check_task(self.predict_task)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits of the head of :attr:`predict_task` (or of task ``dataloader_idx``); batches ``x`` or ``(x, y)``."""
        task = dataloader_idx if self.predict_task is None else self.predict_task
        return self(batch_inputs(batch), task=task)

    def _check_task(self, task: int) -> None:
        for block in task_blocks(self).values():
            block.check_task(task)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, before anything loads, to resume a fit from a checkpoint written in the middle of an epoch.

        Raises:
            MisconfigurationException: a task-sequence callback's state says it was saved within an epoch.
        """
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            refuse_resuming_within_an_epoch(checkpoint.get("callbacks", {}).values())

    @property
    def current_task(self) -> int:
        """The task ``forward(x)`` routes to: the active task of the module's blocks (0 without blocks)."""
        return next((block.active_task for block in self._blocks()), 0)

    @current_task.setter
    def current_task(self, task: int) -> None:
        set_active_task(self, task)

    @property
    def tasks_learned(self) -> int:
        """How many tasks the module's blocks have finished learning (0 for a new model)."""
        return next((block.tasks_learned for block in self._blocks()), 0)

    def _blocks(self) -> list[TaskBlock]:
        # not task_blocks(self): whether the module itself is a TaskBlock reads these properties
        return [module for module in self.modules() if module is not self and isinstance(module, TaskBlock)]

    def configure_optimizers(self) -> Any:
        """The optimizer over the parameters the module has now (and the scheduler, if any)."""
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.lr_scheduler_factory(optimizer), "monitor": self.lr_scheduler_monitor}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class ReadyModel(DENLightningModule):
    """A ready model: one task block on flattened inputs (a convolutional block reshapes them into its images),
    ``forward(x, task)`` routed to it.

    The ready models (:class:`DENMLP`, :class:`DENCNN`, :class:`~lightning_den.baselines.ProgressiveNet`,
    :class:`~lightning_den.baselines.ProgressiveCNNModel`, :class:`~lightning_den.baselines.PackNetModel`,
    :class:`~lightning_den.baselines.PackNetCNNModel`) only build their block.

    Args:
        name: attribute name of the block (what checkpoints' keys and the callbacks' ``block=`` use).
        block: the task block, called as ``block(x, task)``.
        optimizer: see :class:`DENLightningModule`.
        lr_scheduler: see :class:`DENLightningModule`.
        lr_scheduler_monitor: see :class:`DENLightningModule`.

    Example:
        >>> model = ReadyModel("mlp", ExpandableMLP(4, [3], head_classes=2))
        >>> model(torch.zeros(5, 2, 2), task=0).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        name: str,
        block: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_monitor: str = "train/loss",
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, lr_scheduler_monitor=lr_scheduler_monitor)
        self.block_name = name
        self.add_module(name, block)

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        return self._modules[self.block_name](x.flatten(1), task)


class DENMLP(ReadyModel):
    """The ready-made DEN model: an :class:`ExpandableMLP` (attribute ``mlp``) on flattened inputs.

    Args:
        in_features: input width after flattening.
        hidden_sizes: initial units per hidden layer, e.g. ``[312, 128]`` as in the paper.
        num_classes: outputs of each task's head (one number for all tasks, or one per task).
        optimizer: see :class:`DENLightningModule`.
        lr_scheduler: see :class:`DENLightningModule`.
        lr_scheduler_monitor: see :class:`DENLightningModule`.

    Example:
        >>> model = DENMLP(in_features=64, hidden_sizes=[32, 32], num_classes=2)
        >>> model(torch.zeros(4, 8, 8), task=0).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: list[int],
        num_classes: int | list[int],
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_monitor: str = "train/loss",
    ) -> None:
        mlp = ExpandableMLP(in_features, hidden_sizes, num_classes)
        super().__init__("mlp", mlp, optimizer, lr_scheduler, lr_scheduler_monitor)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])


class DENCNN(ReadyModel):
    """The ready-made convolutional DEN model: an :class:`~lightning_den.core.den.conv.ExpandableCNN` (attribute
    ``cnn``; filters are units) on images, which takes the streams' flattened rows as they come.

    Args:
        in_shape: ``[channels, height, width]`` of one image.
        channels: initial filters per convolution, e.g. ``[20, 50]`` (LeNet).
        hidden_sizes: initial units per fully connected hidden layer, e.g. ``[800, 500]``.
        num_classes: outputs of each task's head (one number for all tasks, or one per task).
        kernel_size: side of every convolution's kernel.
        padding: zero padding of every convolution.
        pool: side of the max pooling after every convolution.
        optimizer: see :class:`DENLightningModule`.
        lr_scheduler: see :class:`DENLightningModule`.
        lr_scheduler_monitor: see :class:`DENLightningModule`.

    Example:
        >>> model = DENCNN([1, 8, 8], channels=[4], hidden_sizes=[16], num_classes=2, kernel_size=3, padding=1)
        >>> model(torch.zeros(4, 64), task=0).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        in_shape: list[int],
        channels: list[int],
        hidden_sizes: list[int],
        num_classes: int | list[int],
        kernel_size: int = 5,
        padding: int = 0,
        pool: int = 2,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_monitor: str = "train/loss",
    ) -> None:
        cnn = ExpandableCNN.lenet(in_shape, channels, hidden_sizes, num_classes, kernel_size, padding, pool)
        super().__init__("cnn", cnn, optimizer, lr_scheduler, lr_scheduler_monitor)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
