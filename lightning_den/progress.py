"""A progress bar that names the current task and training phase."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class TaskProgressBar(TQDMProgressBar):
    """TQDM progress bar that adds ``task`` (the module's ``current_task``) and ``phase`` (the ``phase``
    of the first callback that has one, e.g. ``DENCallback``) to the metrics it shows.

    Example::

        Trainer(callbacks=[DENCallback(), TaskProgressBar()])
        # Epoch 12: 100%|██████| 8/8 [..., task=1, phase=selective, train/loss=0.214]
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        shown: dict[str, Any] = {}
        if hasattr(pl_module, "current_task"):
            shown["task"] = pl_module.current_task
        for callback in trainer.callbacks:
            phase = getattr(callback, "phase", None)
            if phase is not None:
                shown["phase"] = str(getattr(phase, "value", phase))
                break
        return {**shown, **items}
