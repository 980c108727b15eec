"""The other architecture methods and the baselines, on the same task-sequence machinery as DEN."""

from lightning_den.baselines.finetune import EWCCallback, FineTuningCallback
from lightning_den.baselines.packnet import PackNetCallback, PackNetCNNModel, PackNetModel
from lightning_den.baselines.progressive import ProgressiveCallback, ProgressiveCNNModel, ProgressiveNet

__all__ = [
    "EWCCallback",
    "FineTuningCallback",
    "PackNetCNNModel",
    "PackNetCallback",
    "PackNetModel",
    "ProgressiveCNNModel",
    "ProgressiveCallback",
    "ProgressiveNet",
]
