"""Progressive Networks in pure torch: the column block and the method."""

from lightning_den.core.progressive.block import ProgressiveCNN, ProgressiveMLP
from lightning_den.core.progressive.method import ProgressiveMethod

__all__ = ["ProgressiveCNN", "ProgressiveMLP", "ProgressiveMethod"]
