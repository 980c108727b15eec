"""Task sequences as a LightningDataModule.

:class:`TaskSequenceDataModule` serves the current task's training data and one validation/test
dataloader per task seen so far (``dataloader_idx == task``). ``DENCallback`` moves it from task to
task with :meth:`TaskSequenceDataModule.set_task`; the current task is part of its ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

TaskTensors = tuple[Tensor, Tensor]


def _check_split(name: str, split: Sequence[TaskTensors]) -> list[TaskTensors]:
    checked = []
    for task, pair in enumerate(split):
        if len(pair) != 2:
            raise ValueError(f"`{name}[{task}]` must be a pair (inputs, labels), got {len(pair)} items")
        inputs, labels = pair
        if not isinstance(inputs, Tensor) or not isinstance(labels, Tensor):
            raise TypeError(f"`{name}[{task}]` must hold tensors, got {type(inputs).__name__}, {type(labels).__name__}")
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"`{name}[{task}]` has {inputs.shape[0]} inputs but {labels.shape[0]} labels; they must match"
            )
        if inputs.shape[0] == 0:
            raise ValueError(f"`{name}[{task}]` is empty: every task needs at least one example")
        if labels.dtype != torch.long:
            raise TypeError(f"`{name}[{task}]` labels must be int64 class indices, got {labels.dtype}")
        if int(labels.min()) < 0:
            raise ValueError(f"`{name}[{task}]` has negative labels ({int(labels.min())}); use class indices 0..k-1")
        checked.append((inputs.float(), labels))
    return checked


class SeededPermutation(Sampler[int]):
    """The same random order of ``size`` indices every time it is iterated (it keeps no generator state)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist())

    def __len__(self) -> int:
        return self.size


class TaskSequenceDataModule(pl.LightningDataModule):
    """A fixed sequence of tasks held as tensors.

    Args:
        train: per task, ``(inputs [n, ...], labels [n])`` with labels in ``0..classes-1``.
        test: per task, held-out pairs; also used for validation when ``val`` is not given.
        val: per task, validation pairs.
        batch_size: mini-batch size of every loader.
        seed: seed of the training shuffle.

    Example:
        >>> x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
        >>> dm = TaskSequenceDataModule.from_tensors(train=[(x, y), (x, y)], test=[(x, y), (x, y)])
        >>> dm.num_tasks, dm.current_task
        (2, 0)
    """

    def __init__(
        self,
        train: Sequence[TaskTensors],
        test: Sequence[TaskTensors],
        val: Sequence[TaskTensors] | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_tasks = _check_split("train", train)
        self.test_tasks = _check_split("test", test)
        self.val_tasks = _check_split("val", val) if val is not None else self.test_tasks
        if not self.train_tasks:
            raise ValueError("`train` must hold at least one task")
        for name, split in (("test", self.test_tasks), ("val", self.val_tasks)):
            if len(split) != len(self.train_tasks):
                raise ValueError(f"`{name}` has {len(split)} tasks but `train` has {len(self.train_tasks)}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.current_task = 0

    @classmethod
    def from_tensors(
        cls,
        train: Sequence[TaskTensors],
        test: Sequence[TaskTensors],
        val: Sequence[TaskTensors] | None = None,
        **kwargs: Any,
    ) -> TaskSequenceDataModule:
        """Build from per-task ``(inputs, labels)`` pairs; ``kwargs`` go to the constructor."""
        return cls(train=train, test=test, val=val, **kwargs)

    @property
    def num_tasks(self) -> int:
        return len(self.train_tasks)

    @property
    def in_features(self) -> int:
        """Width of one flattened input."""
        return int(self.train_tasks[0][0][0].numel())

    def num_classes(self, task: int) -> int:
        """Number of classes of ``task`` (largest label + 1 over its splits)."""
        self._check_task(task)
        return 1 + max(int(split[task][1].max()) for split in (self.train_tasks, self.val_tasks, self.test_tasks))

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} does not exist: this stream has tasks 0..{self.num_tasks - 1}")

    def set_task(self, task: int) -> None:
        """Make ``task`` the one whose training data is served next."""
        self._check_task(task)
        self.current_task = task

    def _loader(self, pair: TaskTensors, shuffle: bool) -> DataLoader:
        dataset = TensorDataset(*pair)
        if not shuffle:
            return DataLoader(dataset, batch_size=self.batch_size)
        # a new order every epoch, the same one when a run is repeated or resumed from a checkpoint
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        order = SeededPermutation(len(dataset), self.seed + 100_003 * self.current_task + epoch)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=order)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_tasks[self.current_task], shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(pair, shuffle=False) for pair in self.val_tasks[: self.current_task + 1]]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(pair, shuffle=False) for pair in self.test_tasks[: self.current_task + 1]]

    def task_dataloader(self, task: int, split: str = "test") -> DataLoader:
        """The loader of one task's ``"train"``, ``"val"`` or ``"test"`` split."""
        self._check_task(task)
        splits = {"train": self.train_tasks, "val": self.val_tasks, "test": self.test_tasks}
        if split not in splits:
            raise ValueError(f"`split` must be one of {sorted(splits)}, got {split!r}")
        return self._loader(splits[split][task], shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {"current_task": self.current_task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.set_task(int(state_dict["current_task"]))
