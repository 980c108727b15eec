"""PackNet (Mallya & Lazebnik, 2018) beside DEN: one fixed network shared out by pruning.

:class:`PackNetCallback` pairs :class:`~lightning_den.core.packnet.PackNetMethod` with the Lightning
driver; :class:`PackNetModel` is the ready model. Owned weights are written back after every step, so
every earlier task's outputs stay bit for bit what they were.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_den.core.packnet import PackNetCNN, PackNetMethod, PackNetMLP
from lightning_den.driver import TaskSequenceCallback, configured
from lightning_den.module import ReadyModel


class PackNetCallback(TaskSequenceCallback):
    """Trains a :class:`~lightning_den.core.packnet.PackNetMLP` task after task: train, prune, retrain.

    Args:
        prune_fraction: share of a task's trained weights given back to the pool after it (0.5 and
            0.75 are the paper's usual values).
        train_epochs: most epochs training the free weights of each task.
        retrain_epochs: most epochs retraining the kept weights after pruning.
        last_task_claims_free: the last task of the stream takes every weight still free instead of pruning
            (PackNet's rule); ``False`` prunes it like the others, leaving room for tasks added later.
        block: name of the PackNetMLP, or of the chain to convert (found automatically if there is one), or a
            list of names: each block gets its own masks, pruned and frozen in the same phases.
        convergence_tol: see :class:`~lightning_den.driver.TaskSequenceCallback`.
        seed: seed of the new heads' initial weights.

    Example::

        Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, callbacks=[PackNetCallback(0.5)])
    """

    def __init__(
        self,
        prune_fraction: float = 0.5,
        train_epochs: int = 20,
        retrain_epochs: int = 5,
        last_task_claims_free: bool = True,
        block: str | list[str] | None = None,
        convergence_tol: float = 0.0,
        seed: int = 0,
    ) -> None:
        method = configured(
            PackNetMethod,
            prune_fraction=prune_fraction,
            train_epochs=train_epochs,
            retrain_epochs=retrain_epochs,
            last_task_claims_free=last_task_claims_free,
            seed=seed,
        )
        super().__init__(method, block=block, convergence_tol=convergence_tol)


class PackNetModel(ReadyModel):
    """The ready PackNet model: a :class:`PackNetMLP` (attribute ``net``) on flattened inputs.

    Args:
        in_features: input width after flattening.
        hidden_sizes: units per hidden layer (fixed for the whole sequence).
        num_classes: outputs of each task's head (one number, or one per task).
        optimizer: builds the optimizer from parameters.
        lr_scheduler: optional, builds an LR scheduler from the optimizer.
        lr_scheduler_monitor: the logged metric a scheduler such as ``ReduceLROnPlateau`` follows.

    Example:
        >>> PackNetModel(in_features=64, hidden_sizes=[16], num_classes=2)(torch.zeros(3, 64), task=0).shape
        torch.Size([3, 2])
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
        super().__init__(
            "net", PackNetMLP(in_features, hidden_sizes, num_classes), optimizer, lr_scheduler, lr_scheduler_monitor
        )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])


class PackNetCNNModel(ReadyModel):
    """The ready PackNet model on a convolutional network: a :class:`~lightning_den.core.packnet.PackNetCNN`
    (attribute ``net``; LeNet-shaped, as :class:`~lightning_den.DENCNN`) on images or their flattened rows.

    Args:
        in_shape: ``[channels, height, width]`` of one image.
        channels: filters per convolution, e.g. ``[20, 50]`` (LeNet).
        hidden_sizes: units per fully connected hidden layer, e.g. ``[800, 500]``.
        num_classes: outputs of each task's head (one number, or one per task).
        kernel_size: side of every convolution's kernel.
        padding: zero padding of every convolution.
        pool: side of the max pooling after every convolution.
        optimizer: builds the optimizer from parameters.
        lr_scheduler: optional, builds an LR scheduler from the optimizer.
        lr_scheduler_monitor: the logged metric a scheduler such as ``ReduceLROnPlateau`` follows.

    Example:
        >>> model = PackNetCNNModel([1, 8, 8], channels=[4], hidden_sizes=[16], num_classes=2, kernel_size=3)
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
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_monitor: str = "train/loss",
    ) -> None:
        net = PackNetCNN.lenet(in_shape, channels, hidden_sizes, num_classes, kernel_size, padding, pool)
        super().__init__("net", net, optimizer, lr_scheduler, lr_scheduler_monitor)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
