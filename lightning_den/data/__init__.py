"""Task-sequence data: the DataModule, stream builders, and the built-in sources."""

from lightning_den.data.digits import SplitDigits
from lightning_den.data.files import TensorFileStream
from lightning_den.data.mnist import MNISTStream, load_mnist
from lightning_den.data.module import TaskSequenceDataModule

__all__ = ["MNISTStream", "SplitDigits", "TaskSequenceDataModule", "TensorFileStream", "load_mnist"]
