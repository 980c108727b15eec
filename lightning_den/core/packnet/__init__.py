"""PackNet in pure torch: the owner-masked block and the method."""

from lightning_den.core.packnet.block import PackNetCNN, PackNetMLP
from lightning_den.core.packnet.method import PackNetMethod, PackNetPhase

__all__ = ["PackNetCNN", "PackNetMLP", "PackNetMethod", "PackNetPhase"]
