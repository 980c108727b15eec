"""Task-sequence data: the DataModule, stream builders, and the built-in sources.

:mod:`lightning_den.data.streams` (the stream builders) needs only torch; the names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_den._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_den.data.digits import SplitDigits
    from lightning_den.data.files import TensorFileStream
    from lightning_den.data.mnist import MNISTStream, load_mnist
    from lightning_den.data.module import TaskSequenceDataModule

_LAZY = {
    "SplitDigits": "lightning_den.data.digits",
    "TensorFileStream": "lightning_den.data.files",
    "MNISTStream": "lightning_den.data.mnist",
    "load_mnist": "lightning_den.data.mnist",
    "TaskSequenceDataModule": "lightning_den.data.module",
}

__all__ = ["MNISTStream", "SplitDigits", "TaskSequenceDataModule", "TensorFileStream", "load_mnist"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
