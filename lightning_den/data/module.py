"""Task sequences as a LightningDataModule.

:class:`TaskSequenceDataModule` serves the current task's training data and one validation/test
dataloader per task seen so far (``dataloader_idx == task``), the test ones also for ``trainer.predict``.
``DENCallback`` moves it from task to task with :meth:`TaskSequenceDataModule.set_task`; the current
task is part of its ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_den.core.checks import check_count
from lightning_den.core.routing import newest_task_held

TaskTensors = tuple[Tensor, Tensor]


def _check_split(name: str, split: Sequence[TaskTensors], shape: torch.Size | None = None) -> None:
    """Refuse a split whose tasks the DataModule could not serve; converts nothing.

    Args:
        name: the split's name in messages: ``"train"``, ``"val"`` or ``"test"``.
        split: per task, ``(inputs [n, ...], labels [n])``.
        shape: the per-example input shape every task must have; ``None`` takes task 0's (for ``train``).

    Raises:
        TypeError: when a task does not hold tensors, or its labels are not integers.
        ValueError: when a task is not a pair, is empty, has labels not of shape ``[n]`` or negative, holds
            non-finite inputs or inputs of another shape, or (``train`` only) has a single class.
    """
    for task, pair in enumerate(split):
        where = f"`{name}[{task}]`"
        if len(pair) != 2:
            raise ValueError(f"{where} must be a pair (inputs, labels), got {len(pair)} items")
        inputs, labels = pair
        if not isinstance(inputs, Tensor) or not isinstance(labels, Tensor):
            raise TypeError(f"{where} must hold tensors, got {type(inputs).__name__}, {type(labels).__name__}")
        if labels.dim() != 1:
            raise ValueError(
                f"{where} labels must have shape [n], got {list(labels.shape)}; "
                "use `labels.squeeze(1)` or `labels.view(-1)` (one-hot labels: `labels.argmax(1)`)"
            )
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"{where} has {inputs.shape[0]} inputs but {labels.shape[0]} labels; they must match")
        if inputs.shape[0] == 0:
            raise ValueError(f"{where} is empty: every task needs at least one example")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(
                f"{where} labels must be integer class indices (they are converted to int64), got {labels.dtype}; "
                "if they hold class indices, pass `labels.long()`"
            )
        if int(labels.min()) < 0:
            raise ValueError(f"{where} has negative labels ({int(labels.min())}); use class indices 0..k-1")
        if name == "train" and bool((labels == labels[0]).all()):
            raise ValueError(
                f"{where} labels are all class {int(labels[0])}: a task needs two or more classes to be learnt; "
                "add examples of its other classes or drop the task"
            )
        shape = inputs.shape[1:] if shape is None else shape
        if inputs.shape[1:] != shape:
            raise ValueError(
                f"{where} inputs have shape {list(inputs.shape[1:])} per example but `train[0]` has {list(shape)}; "
                "every task of every split needs the same input shape: resize, crop or pad them to match"
            )
        non_finite = int(torch.isfinite(inputs).logical_not().sum())
        if non_finite:
            raise ValueError(
                f"{where} inputs hold {non_finite} non-finite values (NaN or inf) out of {inputs.numel()}; "
                "clean or impute the data first (drop those examples or replace the values, e.g. by feature means)"
            )


class BatchedTensorDataset(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` that gathers a whole batch with one indexing per tensor.

    A ``DataLoader`` asks a dataset with ``__getitems__`` for all of a batch's indices at once; a plain
    ``TensorDataset`` indexes and copies one example at a time and then stacks them. The batch is the same,
    bit for bit; use :func:`gathered_batch` as the loader's ``collate_fn``.

    Example:
        >>> data = BatchedTensorDataset(torch.arange(10.0).view(5, 2), torch.arange(5))
        >>> loader = DataLoader(data, batch_size=2, collate_fn=gathered_batch)
        >>> next(iter(loader))
        [tensor([[0., 1.],
                [2., 3.]]), tensor([0, 1])]
    """

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return [tensor[index] for tensor in self.tensors]


def gathered_batch(batch: list[Tensor]) -> list[Tensor]:
    """The ``collate_fn`` of a :class:`BatchedTensorDataset`'s loader: its batch is already stacked."""
    return batch


class SeededPermutation(Sampler[int]):
    """The same random order of ``size`` indices every time it is iterated (it keeps no generator state)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist())

    def __len__(self) -> int:
        return self.size


#: what makes a datamodule a task stream for the callbacks (TaskSequenceDataModule has all of it)
TASK_STREAM_API = ("num_tasks", "current_task", "set_task", "num_classes", "task_dataloader")


def is_task_stream(datamodule: Any) -> bool:
    """Whether ``datamodule`` serves a task sequence: :data:`TASK_STREAM_API`, and one validation, test and
    predict dataloader per task seen so far (``dataloader_idx == task``).

    Example:
        >>> x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
        >>> is_task_stream(TaskSequenceDataModule.from_tensors(train=[(x, y)], test=[(x, y)])), is_task_stream(None)
        (True, False)
    """
    return datamodule is not None and all(hasattr(datamodule, name) for name in TASK_STREAM_API)


class TaskSequenceDataModule(pl.LightningDataModule):
    """A fixed sequence of tasks held as tensors.

    Every split is checked when the module is built, before anything is converted: inputs must be
    finite and share task 0's per-example shape; labels must be integer class indices of shape ``[n]``
    (any integer dtype, converted to int64); each training task needs two or more classes.

    Args:
        train: per task, ``(inputs [n, ...], labels [n])`` with labels in ``0..classes-1``.
        test: per task, held-out pairs; also used for validation when ``val`` is not given.
        val: per task, validation pairs.
        batch_size: mini-batch size of every loader.
        seed: seed of the training shuffle.

    Raises:
        TypeError: when a task does not hold tensors, or holds float or bool labels.
        ValueError: when a task breaks one of the rules above, is empty or has unequal numbers of inputs and
            labels; when the splits' task counts differ; when ``batch_size`` is not positive.

    Example:
        >>> x, y = torch.randn(10, 4), torch.arange(10, dtype=torch.int32) % 2
        >>> dm = TaskSequenceDataModule.from_tensors(train=[(x, y), (x, y)], test=[(x, y), (x, y)])
        >>> dm.num_tasks, dm.current_task, dm.train_tasks[0][1].dtype
        (2, 0, torch.int64)
        >>> len(dm.predict_dataloader())
        1
    """

    def __init__(
        self,
        train: Sequence[TaskTensors],
        test: Sequence[TaskTensors],
        val: Sequence[TaskTensors] | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        check_count("batch_size", batch_size)
        if len(train) == 0:
            raise ValueError("`train` must hold at least one task")
        splits = {"train": train, "test": test, **({"val": val} if val is not None else {})}
        for name, split in splits.items():
            if len(split) != len(train):
                raise ValueError(f"`{name}` has {len(split)} tasks but `train` has {len(train)}")
        for name, split in splits.items():  # train first: its task 0 sets the input shape of all
            _check_split(name, split, shape=None if name == "train" else train[0][0].shape[1:])
        # every split passed: only now convert (inputs to float32, labels to int64)
        tasks = {name: [(inputs.float(), labels.long()) for inputs, labels in split] for name, split in splits.items()}
        super().__init__()
        self.train_tasks = tasks["train"]
        self.test_tasks = tasks["test"]
        self.val_tasks = tasks.get("val", self.test_tasks)
        self.batch_size = batch_size
        self.seed = seed
        self.current_task = 0
        self._fingerprint_of: dict[int, tuple[Tensor, Tensor, list[float]]] = {}  # per task, with its tensors

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
        dataset, order = BatchedTensorDataset(*pair), None  # in order unless shuffled
        if shuffle:  # a new order every epoch, the same one when a run is repeated or resumed from a checkpoint
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
            order = SeededPermutation(len(dataset), self.seed + 100_003 * self.current_task + epoch)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=order, collate_fn=gathered_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_tasks[self.current_task], shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(pair, shuffle=False) for pair in self.val_tasks[: self.current_task + 1]]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(pair, shuffle=False) for pair in self.test_tasks[: self.current_task + 1]]

    def predict_dataloader(self) -> list[DataLoader]:
        """One unshuffled loader per task seen so far (index == task) over its test split, as for testing.

        Batches are ``(inputs, labels)``; the module's ``predict_step`` uses the inputs.
        """
        return self.test_dataloader()

    def task_dataloader(self, task: int, split: str = "test") -> DataLoader:
        """The loader of one task's ``"train"``, ``"val"`` or ``"test"`` split."""
        self._check_task(task)
        splits = {"train": self.train_tasks, "val": self.val_tasks, "test": self.test_tasks}
        if split not in splits:
            raise ValueError(f"`split` must be one of {sorted(splits)}, got {split!r}")
        return self._loader(splits[split][task], shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """The current task, and a fingerprint of the test data of every task up to it (plain floats)."""
        return {"current_task": self.current_task, "fingerprints": self.fingerprints(self.current_task + 1)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Stand at the task a checkpoint was written in (while an evaluation runs, at most at the newest task the
        model holds), once its tasks are checked to be this stream's.

        Raises:
            ValueError: this stream is shorter than the one the checkpoint was written with, or one of the tasks
                the checkpoint saw has other test data here (another seed, another rotation, ...).
        """
        task = int(state_dict["current_task"])
        if task >= self.num_tasks:
            raise ValueError(
                f"the checkpoint was written at task {task} of its stream, but this stream has tasks "
                f"0..{self.num_tasks - 1}: give it at least {task + 1} tasks (e.g. `num_tasks={task + 1}`)"
            )
        saved = state_dict.get("fingerprints", [])  # none in checkpoints written before they were kept
        for seen, (then, now) in enumerate(zip(saved, self.fingerprints(len(saved)), strict=True)):
            if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(then, now, strict=True)):
                raise ValueError(
                    f"task {seen} of this stream is not the task {seen} the checkpoint learnt: their test data "
                    "differ. Build the stream with the settings of the run that wrote the checkpoint (its seed; "
                    "for a rotated stream its `angles`, which by default depend on `num_tasks`)"
                )
        self.set_task(min(task, self._newest_task_evaluated()))

    def _newest_task_evaluated(self) -> int:
        """While ``validate``, ``test`` or ``predict`` runs, the newest task the model being evaluated holds; a
        fit may stand at any task.

        A checkpoint written at the end of a task's last epoch already stands at the next task (its training data
        come first when the fit goes on), whose head is added when it starts: an evaluation from that checkpoint
        evaluates the tasks the model learnt.
        """
        trainer = self.trainer
        evaluating = trainer is not None and trainer.state.fn != TrainerFn.FITTING
        if not evaluating or trainer.state.status != TrainerStatus.RUNNING:
            return self.num_tasks - 1
        newest = newest_task_held(trainer.lightning_module)
        return self.num_tasks - 1 if newest is None else newest

    def fingerprints(self, tasks: int) -> list[list[float]]:
        """For each of the first ``tasks`` tasks, a few sums over its test split that change when its examples or
        the order of their features change (e.g. another permutation of the pixels); each is computed once per
        task's tensors, as checkpoints are written every epoch.

        Example:
            >>> x, y = torch.ones(2, 3), torch.tensor([0, 1])
            >>> TaskSequenceDataModule.from_tensors(train=[(x, y)], test=[(x, y)]).fingerprints(1)
            [[2.0, 12.0, 1.0]]
        """
        return [self._fingerprint(task) for task in range(min(tasks, self.num_tasks))]

    def _fingerprint(self, task: int) -> list[float]:
        inputs, labels = self.test_tasks[task]
        cached = self._fingerprint_of.get(task)
        if cached is None or cached[0] is not inputs or cached[1] is not labels:
            rows = inputs.reshape(len(inputs), -1).double()
            place = torch.arange(1, rows.shape[1] + 1, dtype=torch.float64)
            sums = [float(len(labels)), float((rows @ place).sum()), float(labels.double().sum())]
            cached = self._fingerprint_of[task] = (inputs, labels, sums)
        return cached[2]
