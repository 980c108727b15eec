"""The task-sequence DataModule and the embedded split-digits stream."""

from __future__ import annotations

import pytest
import torch

from lightning_den import TaskSequenceDataModule, split_digits


def test_split_digits_shapes_labels_and_determinism():
    first, second = split_digits(num_tasks=5, seed=3), split_digits(num_tasks=5, seed=3)
    assert first.num_tasks == 5 and first.in_features == 64
    for task in range(5):
        x, y = first.train_tasks[task]
        assert x.shape[1] == 64 and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert set(y.tolist()) == {0, 1} and first.num_classes(task) == 2
        assert torch.equal(x, second.train_tasks[task][0]) and torch.equal(y, second.train_tasks[task][1])
    total = sum(len(t[1]) for t in first.train_tasks) + sum(len(t[1]) for t in first.test_tasks)
    assert total == 1797  # every digit image used once


def test_loaders_follow_the_current_task():
    dm = split_digits(num_tasks=3)
    dm.set_task(2)
    assert len(dm.val_dataloader()) == 3 and len(dm.test_dataloader()) == 3
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1] == 64
    assert dm.state_dict() == {"current_task": 2}
    fresh = split_digits(num_tasks=3)
    fresh.load_state_dict(dm.state_dict())
    assert fresh.current_task == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"train": [(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))]}, ValueError, "3 inputs but 2 labels"),
        ({"train": [(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))]}, ValueError, "empty"),
        ({"train": [(torch.zeros(3, 2), torch.zeros(3))]}, TypeError, "int64"),
        ({"train": []}, ValueError, "at least one task"),
    ],
)
def test_bad_task_tensors_are_refused(kwargs, error, match):
    test = kwargs["train"] or [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))]
    with pytest.raises(error, match=match):
        TaskSequenceDataModule.from_tensors(test=test if kwargs["train"] else [], **kwargs)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match=r"tasks 0\.\.1"):
        split_digits(num_tasks=2).set_task(5)
