"""The embedded default stream: scikit-learn's 8x8 digits as tasks of class pairs (no download)."""

from __future__ import annotations

import torch

from lightning_den.data import streams
from lightning_den.data.module import TaskSequenceDataModule


class SplitDigits(TaskSequenceDataModule):
    """scikit-learn's digits (1,797 images, shipped with the library) as tasks of digit pairs.

    Task ``t`` tells digit ``2t`` (label 0) from digit ``2t + 1`` (label 1); pixels are scaled to
    ``[0, 1]``. Each digit's images are split into train and test with a fixed seed.

    Args:
        num_tasks: 1 to 5.
        test_fraction: share of each digit held out for testing.
        batch_size: mini-batch size.
        seed: seed of the split and the shuffling.

    Example:
        >>> dm = SplitDigits(num_tasks=2)
        >>> dm.num_tasks, dm.in_features, dm.num_classes(0)
        (2, 64, 2)
    """

    def __init__(self, num_tasks: int = 5, test_fraction: float = 0.3, batch_size: int = 32, seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        if not 1 <= num_tasks <= 5:
            raise ValueError(f"`num_tasks` must be between 1 and 5 (pairs of the 10 digits), got {num_tasks}")
        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.long)
        train, test = streams.train_test_split(x, y, test_fraction=test_fraction, seed=seed)
        pairs = [[2 * t, 2 * t + 1] for t in range(num_tasks)]
        super().__init__(
            train=streams.split_by_classes(*train, pairs),
            test=streams.split_by_classes(*test, pairs),
            batch_size=batch_size,
            seed=seed,
        )
