"""lightning_den: Dynamically Expandable Networks (Yoon et al., ICLR 2018) as a PyTorch Lightning callback."""

from lightning_den.boundary import TaskBoundary, cross_boundary
from lightning_den.callbacks import DENCallback
from lightning_den.core import DENPhase, ExpandableLinear, ExpandableMLP
from lightning_den.data import TaskSequenceDataModule, split_digits
from lightning_den.evaluation import TaskEvaluation, task_accuracy
from lightning_den.module import DENMLP, DENLightningModule, find_expandable_block

__version__ = "0.1.0"

__all__ = [
    "DENMLP",
    "DENCallback",
    "DENLightningModule",
    "DENPhase",
    "ExpandableLinear",
    "ExpandableMLP",
    "TaskBoundary",
    "TaskEvaluation",
    "TaskSequenceDataModule",
    "cross_boundary",
    "find_expandable_block",
    "split_digits",
    "task_accuracy",
]
