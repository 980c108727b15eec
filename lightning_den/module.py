"""LightningModules for task sequences: :class:`DENLightningModule` and the ready :class:`DENMLP`.

A :class:`DENLightningModule` knows the task it is trained on (``current_task``, set by the
callbacks at task boundaries), computes the classification loss of that task's head, evaluates each
seen task on its own dataloader (``dataloader_idx == task``) and builds its optimizer from the
parameters it has *now*, so grown layers are always optimised.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_den.core.layers import ExpandableMLP


def find_block(module: nn.Module, block_type: type[nn.Module], name: str | None = None) -> tuple[str, Any]:
    """The ``block_type`` submodule of ``module``: the one named ``name``, or the only one there is.

    Raises:
        MisconfigurationException: no such block, several and no ``name``, or ``name`` is not one.

    Example:
        >>> find_block(nn.Sequential(ExpandableMLP(4, [3], head_classes=2)), ExpandableMLP)[0]
        '0'
    """
    kind = block_type.__name__
    blocks = {n: m for n, m in module.named_modules() if isinstance(m, block_type)}
    if name is not None:
        if name not in blocks:
            raise MisconfigurationException(
                f"`block={name!r}` is not a {kind} of {type(module).__name__}; its {kind} blocks are: "
                f"{sorted(blocks) or 'none'}"
            )
        return name, blocks[name]
    if len(blocks) == 1:
        return next(iter(blocks.items()))
    if blocks:
        raise MisconfigurationException(
            f"{type(module).__name__} has several {kind} blocks {sorted(blocks)}; name the one to train with "
            "the callback's `block=...` argument"
        )
    linear = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    found = f"it has nn.Linear layers at {linear}, " if linear else "it has no Linear layers at all, "
    raise MisconfigurationException(
        f"{type(module).__name__} has no {kind} block to train: {found}so there is nothing the method can "
        f"grow or mask. Build that part of the model as a `lightning_den.{kind}`."
    )


def continual_blocks(module: nn.Module) -> dict[str, Any]:
    """Every submodule that can describe and rebuild its architecture (``architecture()``/``rebuild_()``)."""
    return {n: m for n, m in module.named_modules() if hasattr(m, "architecture") and hasattr(m, "rebuild_")}


class DENLightningModule(pl.LightningModule):
    """Base class of modules trained on a task sequence with one output head per task.

    Subclasses define ``forward(x, task)`` returning the logits of ``task``'s head; usually the MLP
    part is an :class:`ExpandableMLP` attribute that ``DENCallback`` finds and grows. Batches are
    ``(inputs, labels)`` with labels in ``0..classes-1`` of the task.

    Args:
        optimizer: builds the optimizer from parameters (e.g. ``torch.optim.Adam`` or
            ``functools.partial(torch.optim.SGD, lr=0.1)``); called again after every change of shape.
        lr_scheduler: optional, builds an LR scheduler from the optimizer.

    Example::

        class ConvDEN(DENLightningModule):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten())
                self.mlp = ExpandableMLP(8 * 26 * 26, [64, 32], head_classes=10)

            def forward(self, x, task=None):
                task = self.current_task if task is None else task
                return self.mlp(self.features(x), task)
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.current_task = 0

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define `forward(x, task)`")

    def _loss_and_accuracy(self, batch: Any, task: int) -> tuple[Tensor, Tensor]:
        inputs, labels = batch
        logits = self(inputs, task=task)
        return F.cross_entropy(logits, labels), (logits.argmax(dim=-1) == labels).float().mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy of the current task's head (the data loss; DEN's regularisers act on the step)."""
        loss, _ = self._loss_and_accuracy(batch, self.current_task)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loss and accuracy of task ``dataloader_idx`` (one validation dataloader per seen task)."""
        loss, accuracy = self._loss_and_accuracy(batch, dataloader_idx)
        self.log(f"val/loss/task_{dataloader_idx}", loss, add_dataloader_idx=False)
        self.log(f"val/acc/task_{dataloader_idx}", accuracy, add_dataloader_idx=False)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loss and accuracy of task ``dataloader_idx`` (one test dataloader per seen task)."""
        loss, accuracy = self._loss_and_accuracy(batch, dataloader_idx)
        self.log(f"test/loss/task_{dataloader_idx}", loss, add_dataloader_idx=False)
        self.log(f"test/acc/task_{dataloader_idx}", accuracy, add_dataloader_idx=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the current task and every block's architecture as plain data under ``"den"``."""
        checkpoint["den"] = {
            "format": 1,
            "current_task": self.current_task,
            "blocks": {name: block.architecture() for name, block in continual_blocks(self).items()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Grow every block to the saved architecture before Lightning loads the weights."""
        saved = checkpoint.get("den")
        if saved is None:
            return
        blocks = continual_blocks(self)
        if set(saved["blocks"]) != set(blocks):
            raise MisconfigurationException(
                f"the checkpoint holds blocks {sorted(saved['blocks'])} but "
                f"{type(self).__name__} has {sorted(blocks)}: load it into the model class it was saved from"
            )
        for name, architecture in saved["blocks"].items():
            blocks[name].rebuild_(architecture)
        self.current_task = int(saved["current_task"])

    def configure_optimizers(self) -> Any:
        """The optimizer over the parameters the module has now (and the scheduler, if any)."""
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}


class DENMLP(DENLightningModule):
    """The ready-made DEN model: an :class:`ExpandableMLP` on flattened inputs.

    Args:
        in_features: input width after flattening.
        hidden_sizes: initial units per hidden layer, e.g. ``[312, 128]`` as in the paper.
        num_classes: outputs of each task's head (one number for all tasks, or one per task).
        optimizer: see :class:`DENLightningModule`.
        lr_scheduler: see :class:`DENLightningModule`.

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
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.mlp = ExpandableMLP(in_features, hidden_sizes, num_classes)

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        return self.mlp(x.flatten(1), self.current_task if task is None else task)
