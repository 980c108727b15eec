"""Progress bars that name the current task and training phase.

Every task-sequence callback calls :func:`show_task_and_phase` on the Trainer's progress bar at
``setup``, so Lightning's default bar, a ``RichProgressBar`` or one of your own shows ``task`` and
``phase`` beside the logged metrics, at no cost per step (the values are read when the bar refreshes).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar


def task_and_phase(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """The ``status()`` of the first callback that has one: the ``task`` and ``phase``, and e.g. the share of
    units DEN's selective retraining ``selected`` per layer."""
    shown: dict[str, Any] = {}
    for callback in trainer.callbacks:
        status = getattr(callback, "status", None)
        if callable(status):
            shown.update(status())
            break
    return shown


def show_task_and_phase(bar: ProgressBar | None) -> None:
    """Make ``bar`` (any Lightning progress bar; ``None`` is ignored) show :func:`task_and_phase` first.

    Idempotent: a bar already showing them is left as it is.

    Example::

        bar = RichProgressBar()
        show_task_and_phase(bar)   # DENCallback does this at setup
    """
    if bar is None or getattr(bar, "_shows_task_and_phase", False):
        return
    metrics_of = bar.get_metrics

    def get_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {**task_and_phase(trainer, pl_module), **metrics_of(trainer, pl_module)}

    bar.get_metrics = get_metrics  # type: ignore[method-assign]
    bar._shows_task_and_phase = True  # type: ignore[attr-defined]
