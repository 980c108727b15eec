"""The other architecture methods and the baselines, on the same task-sequence machinery as DEN."""

from lightning_den.baselines.finetune import EWCCallback, FineTuningCallback
from lightning_den.baselines.packnet import PackNetCallback, PackNetModel
from lightning_den.baselines.progressive import ProgressiveCallback, ProgressiveNet

__all__ = [
    "EWCCallback",
    "FineTuningCallback",
    "PackNetCallback",
    "PackNetModel",
    "ProgressiveCallback",
    "ProgressiveNet",
]
