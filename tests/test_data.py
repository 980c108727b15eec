"""The task-sequence DataModule and the embedded split-digits stream."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_den import SplitDigits, TaskSequenceDataModule
from lightning_den.data import MNISTStream, TensorFileStream, load_mnist


def test_split_digits_shapes_labels_and_determinism():
    first, second = SplitDigits(num_tasks=5, seed=3), SplitDigits(num_tasks=5, seed=3)
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
    dm = SplitDigits(num_tasks=3)
    dm.set_task(2)
    assert len(dm.val_dataloader()) == 3 and len(dm.test_dataloader()) == 3
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1] == 64
    assert dm.state_dict() == {"current_task": 2}
    fresh = SplitDigits(num_tasks=3)
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
        SplitDigits(num_tasks=2).set_task(5)


MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").exists(), reason="shared MNIST files absent")


@needs_mnist
@pytest.mark.parametrize(
    ("stream", "num_tasks", "classes"),
    [("split", 5, 2), ("permuted", 3, 10), ("rotated", 2, 10), ("one_vs_rest", 10, 2), ("variation", 2, 2)],
)
def test_mnist_streams_from_the_test_files_alone(stream, num_tasks, classes):
    dm = MNISTStream(str(MNIST), stream=stream, num_tasks=num_tasks, seed=1)
    assert dm.num_tasks == num_tasks and dm.in_features == 784
    for task in range(num_tasks):
        x = dm.train_tasks[task][0]
        assert x.shape[1] == 784 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert dm.num_classes(task) == classes
    total = len(dm.train_tasks[0][1]) + len(dm.test_tasks[0][1])
    assert total == (10_000 if stream != "split" else int((load_mnist(MNIST)["test"][1] < 2).sum()))
    again = MNISTStream(str(MNIST), stream=stream, num_tasks=num_tasks, seed=1)
    assert torch.equal(again.train_tasks[-1][0], dm.train_tasks[-1][0])


@needs_mnist
def test_mnist_in_torchvision_layout_with_the_full_set_uses_the_official_split(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(MNIST / name, raw / name)
        shutil.copy(MNIST / name, raw / name.replace("t10k", "train"))  # stand-in training files
    dm = MNISTStream(str(tmp_path), stream="permuted", num_tasks=1, max_train_per_task=500)
    assert len(dm.train_tasks[0][1]) == 500 and len(dm.test_tasks[0][1]) == 10_000


def test_missing_mnist_files_name_where_they_were_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        MNISTStream(str(tmp_path))


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_tensor_file_streams_round_trip(tmp_path, suffix):
    source = SplitDigits(num_tasks=2)
    path = tmp_path / f"stream{suffix}"
    if suffix == ".pt":
        torch.save({"train": source.train_tasks, "test": source.test_tasks}, path)
    else:
        arrays = {
            f"{split}_{part}_{t}": pair[i].numpy()
            for split, tasks in (("train", source.train_tasks), ("test", source.test_tasks))
            for t, pair in enumerate(tasks)
            for i, part in enumerate("xy")
        }
        np.savez(path, **arrays)
    loaded = TensorFileStream(str(path))
    assert loaded.num_tasks == 2
    for task in range(2):
        assert torch.equal(loaded.train_tasks[task][0], source.train_tasks[task][0])
        assert torch.equal(loaded.test_tasks[task][1], source.test_tasks[task][1])


def test_tensor_file_without_test_tasks_is_refused(tmp_path):
    path = tmp_path / "stream.pt"
    torch.save({"train": SplitDigits(num_tasks=1).train_tasks}, path)
    with pytest.raises(ValueError, match="no 'test' tasks"):
        TensorFileStream(str(path))
