"""Progressive Networks (Rusu et al., 2016) beside DEN: a new column per task.

:class:`ProgressiveCallback` pairs :class:`~lightning_den.core.progressive.ProgressiveMethod` with the
Lightning driver; :class:`ProgressiveNet` is the ready model. ``lateral=False`` turns them into one
independent network per task (single-task learning).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_den.core.progressive import ProgressiveCNN, ProgressiveMethod, ProgressiveMLP
from lightning_den.driver import TaskSequenceCallback, configured
from lightning_den.module import ReadyModel


class ProgressiveCallback(TaskSequenceCallback):
    """Trains a :class:`~lightning_den.core.progressive.ProgressiveMLP` task after task, one column each.

    Args:
        epochs_per_task: most epochs of each task (fewer once the loss levels off, see ``convergence_tol``).
        lateral: lateral adapters when a user's ``nn.Sequential`` of Linear layers is converted; ``False``: one
            independent network per task (a ready ``ProgressiveNet`` keeps its own ``lateral``).
        block: name of the ProgressiveMLP, or of the chain to convert (found automatically if there is one), or
            a list of names: each block gets a column per task.
        convergence_tol: see :class:`~lightning_den.driver.TaskSequenceCallback`.
        seed: seed of the new columns' initial weights (the same on every rank).

    Example::

        trainer = Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1,
                          callbacks=[ProgressiveCallback(epochs_per_task=20)])
        trainer.fit(ProgressiveNet(in_features=784, hidden_sizes=[312, 128], num_classes=10), datamodule=dm)
    """

    def __init__(
        self,
        epochs_per_task: int = 20,
        lateral: bool = True,
        block: str | list[str] | None = None,
        convergence_tol: float = 0.0,
        seed: int = 0,
    ) -> None:
        method = configured(ProgressiveMethod, epochs_per_task=epochs_per_task, lateral=lateral, seed=seed)
        super().__init__(method, block=block, convergence_tol=convergence_tol)


class ProgressiveNet(ReadyModel):
    """The ready Progressive Network: a :class:`ProgressiveMLP` (attribute ``columns``) on flattened inputs.

    Args:
        in_features: input width after flattening.
        hidden_sizes: units per hidden layer of every column.
        num_classes: outputs of each task's head (one number, or one per task).
        lateral: lateral adapters from earlier columns; ``False`` = one independent network per task.
        optimizer: builds the optimizer from parameters.
        lr_scheduler: optional, builds an LR scheduler from the optimizer.
        lr_scheduler_monitor: the logged metric a scheduler such as ``ReduceLROnPlateau`` follows.

    Example:
        >>> ProgressiveNet(in_features=64, hidden_sizes=[16], num_classes=2)(torch.zeros(3, 64), task=0).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: list[int],
        num_classes: int | list[int],
        lateral: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_monitor: str = "train/loss",
    ) -> None:
        columns = ProgressiveMLP(in_features, hidden_sizes, num_classes, lateral=lateral)
        super().__init__("columns", columns, optimizer, lr_scheduler, lr_scheduler_monitor)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])


class ProgressiveCNNModel(ReadyModel):
    """The ready Progressive Network of convolutional columns: a
    :class:`~lightning_den.core.progressive.ProgressiveCNN` (attribute ``columns``; LeNet-shaped columns, as
    :class:`~lightning_den.DENCNN`) on images or their flattened rows.

    Args:
        in_shape: ``[channels, height, width]`` of one image.
        channels: filters per convolution of every column, e.g. ``[20, 50]`` (LeNet).
        hidden_sizes: units per fully connected hidden layer of every column, e.g. ``[800, 500]``.
        num_classes: outputs of each task's head (one number, or one per task).
        kernel_size: side of every convolution's kernel.
        padding: zero padding of every convolution.
        pool: side of the max pooling after every convolution.
        lateral: lateral adapters from earlier columns; ``False`` = one independent CNN per task.
        optimizer: builds the optimizer from parameters.
        lr_scheduler: optional, builds an LR scheduler from the optimizer.
        lr_scheduler_monitor: the logged metric a scheduler such as ``ReduceLROnPlateau`` follows.

    Example:
        >>> model = ProgressiveCNNModel([1, 8, 8], channels=[4], hidden_sizes=[16], num_classes=2, kernel_size=3)
        >>> model(torch.zeros(3, 64), task=0).shape
        torch.Size([3, 2])
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
        lateral: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_monitor: str = "train/loss",
    ) -> None:
        shape = (in_shape, channels, hidden_sizes, num_classes, kernel_size, padding, pool)
        columns = ProgressiveCNN.lenet(*shape, lateral=lateral)
        super().__init__("columns", columns, optimizer, lr_scheduler, lr_scheduler_monitor)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
