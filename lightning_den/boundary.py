"""Task boundaries: the one place where shape-changing surgery meets Lightning's training objects.

A :class:`TaskBoundary` is what listeners learn when a task or a DEN phase ends and the next begins.
:func:`cross_boundary` applies a surgery, then rebuilds what Lightning built from the old Parameters
(the DDP wrapper, optimizers, LR schedulers), checks that every trainable Parameter is optimised, and
tells every callback and the LightningModule through their ``on_task_boundary`` hook.

Example::

    from lightning.pytorch.callbacks import Callback

    class PrintTaskEnds(Callback):
        def on_task_boundary(self, trainer, pl_module, boundary):
            if boundary.ended_task is not None:
                print(f"task {boundary.ended_task} done, widths {boundary.widths}")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class TaskBoundary:
    """What changed at a boundary, as plain data.

    Attributes:
        task: the task in effect after the boundary (the last task when the stream has ended).
        phase: the phase in effect after the boundary, ``None`` when the stream has ended.
        previous_task: the task before the boundary.
        previous_phase: the phase before the boundary.
        ended_task: the task that has just been completed, or ``None`` for a boundary between phases.
        widths: units per hidden layer after the boundary (all units, newest task included), of the block
            trained (the first named one when the callback trains several).
        loss: mean training loss of the last epoch of the phase that ended.
        epochs: epochs the phase that ended trained (0 for a task learnt in an earlier run).
        changes: the surgery plan that was applied, as plain data (lists of ints, floats): for DEN
            ``selection`` (BFS result, inputs then units per hidden layer) with its report
            (:data:`~lightning_den.core.den.selection.SELECTION_KEYS`: shares of units selected, of inputs,
            of zero weights), ``added`` (units per layer), ``pruned`` (dead new units per layer, when an
            expansion ends: before the split, the next task or the end of the stream) and ``split``
            (unit indices per layer). For the block of ``widths``.
        changes_by_block: every trained block's plan, by the block's name in the model (one entry, equal to
            ``changes``, unless the callback trains several blocks).
    """

    task: int
    phase: str | None
    previous_task: int
    previous_phase: str
    ended_task: int | None
    widths: tuple[int, ...]
    loss: float
    changes: dict[str, Any] = field(default_factory=dict)
    changes_by_block: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs: int = 0

    @property
    def finished(self) -> bool:
        """True at the end of the whole task sequence."""
        return self.phase is None


def rebuild_training_objects(trainer: pl.Trainer) -> None:
    """Recreate the DDP wrapper (if any), the optimizers and the LR schedulers after surgery.

    Optimizers come from the LightningModule's ``configure_optimizers`` through the strategy, so the
    module's own settings (several param groups, schedulers) are honoured; the new optimizers start
    with empty state. Call it on every rank after identical surgery.
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.lightning_module  # drop the stale wrapper and its reducer hooks
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    strategy.setup_precision_plugin()


def check_optimizers_cover(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Raise if a trainable Parameter of ``pl_module`` is in none of ``trainer.optimizers`` (by identity)."""
    optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    missing = [name for name, p in pl_module.named_parameters() if p.requires_grad and id(p) not in optimized]
    if missing:
        raise MisconfigurationException(
            f"These trainable parameters are in no optimizer after the network changed shape: {missing}. "
            "`configure_optimizers` must build the optimizer from `self.parameters()` each time it is "
            "called. With LightningCLI use `auto_configure_optimizers=False` and pass an optimizer "
            "callable to the module instead of `--optimizer`, which pins the optimizer of the initial "
            "parameters."
        )


def notify_boundary(trainer: pl.Trainer, pl_module: pl.LightningModule, boundary: TaskBoundary) -> None:
    """Call ``on_task_boundary(trainer, pl_module, boundary)`` on every callback that defines it, then
    ``on_task_boundary(boundary)`` on the LightningModule if it defines it."""
    for callback in trainer.callbacks:
        hook = getattr(callback, "on_task_boundary", None)
        if callable(hook):
            hook(trainer, pl_module, boundary)
    module_hook = getattr(pl_module, "on_task_boundary", None)
    if callable(module_hook):
        module_hook(boundary)


def cross_boundary(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    surgery: Callable[[], TaskBoundary],
    *,
    rebuild: bool = True,
) -> TaskBoundary:
    """Apply ``surgery`` (which returns the boundary it made), rebuild training objects, check, notify.

    ``rebuild=False`` is for the end of the stream, when no training follows.
    """
    boundary = surgery()
    if rebuild:
        rebuild_training_objects(trainer)
        check_optimizers_cover(trainer, pl_module)
    notify_boundary(trainer, pl_module, boundary)
    return boundary
