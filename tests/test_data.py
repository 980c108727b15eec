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
    assert dm.state_dict()["current_task"] == 2 and len(dm.state_dict()["fingerprints"]) == 3
    fresh = SplitDigits(num_tasks=3)
    fresh.load_state_dict(dm.state_dict())
    assert fresh.current_task == 2


def test_loaders_serve_the_batches_of_a_plain_tensor_dataset_bit_for_bit():
    from torch.utils.data import DataLoader, TensorDataset

    dm = SplitDigits(num_tasks=2, batch_size=24)
    dm.set_task(1)
    for loader, (inputs, labels) in (
        (dm.train_dataloader(), dm.train_tasks[1]),
        (dm.test_dataloader()[0], dm.test_tasks[0]),
    ):
        plain = DataLoader(TensorDataset(inputs, labels), batch_size=24, sampler=loader.sampler)
        served, expected = list(loader), list(plain)  # the same order: the loader's own sampler
        assert len(served) == len(expected) > 1
        for (x, y), (x_plain, y_plain) in zip(served, expected, strict=True):
            assert x.dtype == x_plain.dtype and y.dtype == y_plain.dtype
            assert torch.equal(x, x_plain) and torch.equal(y, y_plain)
    shuffled = [y for _, y in dm.train_dataloader()]
    assert not torch.equal(torch.cat(shuffled), dm.train_tasks[1][1])  # the training order really is shuffled


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


@pytest.mark.parametrize(
    ("stream", "num_tasks", "message"),
    [("permuted", 0, "must be at least 1, got 0"), ("split", 6, "must be 1..5, got 6")],
)
def test_a_task_count_a_stream_cannot_have_is_refused_with_its_range(stream, num_tasks, message):
    with pytest.raises(ValueError, match=f"`num_tasks` for the '{stream}' stream {message}"):
        MNISTStream("unused", stream=stream, num_tasks=num_tasks)  # refused before any file is read


@needs_mnist
def test_a_checkpoint_resumes_only_on_a_stream_whose_seen_tasks_are_its_own():
    for stream in ("permuted", "split"):  # their first tasks do not depend on how many follow
        saved = MNISTStream(str(MNIST), stream=stream, num_tasks=2, seed=1)
        saved.set_task(1)
        longer = MNISTStream(str(MNIST), stream=stream, num_tasks=3, seed=1)
        longer.load_state_dict(saved.state_dict())
        assert longer.current_task == 1
    rotated = MNISTStream(str(MNIST), stream="rotated", num_tasks=2)
    rotated.set_task(1)  # task 1 turned by 90 degrees; with three tasks by 60
    others = {1: MNISTStream(str(MNIST), stream="rotated", num_tasks=3), 0: MNISTStream(str(MNIST), seed=5)}
    for differs, other in others.items():  # task 1 rotated otherwise; every task split otherwise
        with pytest.raises(ValueError, match=f"task {differs} of this stream is not the task {differs} the checkpoint"):
            other.load_state_dict(rotated.state_dict())
        assert other.current_task == 0
    same = MNISTStream(str(MNIST), stream="rotated", num_tasks=3, angles=[0.0, 90.0, 45.0])
    same.load_state_dict(rotated.state_dict())  # the first run's angles, and one more
    assert same.current_task == 1


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


@pytest.mark.parametrize("content", [b"hello", bytes(range(256)) * 2], ids=["text", "bytes"])
def test_a_file_that_is_not_a_saved_stream_is_refused_with_what_it_must_hold(tmp_path, content):
    path = tmp_path / "stream.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"is not a file of `torch.save\(\{'train'"):
        TensorFileStream(str(path))


def test_a_checkpoint_of_a_longer_stream_is_refused_naming_the_tasks_it_needs():
    shorter = SplitDigits(num_tasks=2)
    with pytest.raises(ValueError, match=r"written at task 2 of its stream, but this stream has tasks 0\.\.1: give it"):
        shorter.load_state_dict({"current_task": 2})  # what a 3-task stream saves at its last task
    assert shorter.current_task == 0


def _task(width: int = 2, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid task: ``n`` random inputs of ``width`` features, labels alternating 0/1."""
    return torch.randn(n, width), torch.arange(n) % 2


def _splits(tasks: int = 2) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    return {split: [_task() for _ in range(tasks)] for split in ("train", "val", "test")}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_non_finite_inputs_are_refused_naming_the_split_the_task_and_the_count(split):
    splits = _splits()
    x, _ = splits[split][1]
    x[0, 0], x[3, 1] = float("nan"), float("-inf")
    with pytest.raises(ValueError, match=rf"`{split}\[1\]` inputs hold 2 non-finite values .*clean or impute"):
        TaskSequenceDataModule(**splits)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8], ids=str)
def test_integer_labels_of_any_dtype_are_converted_to_int64(dtype):
    splits = {name: [(x, y.to(dtype)) for x, y in tasks] for name, tasks in _splits().items()}
    dm = TaskSequenceDataModule(**splits)
    for name, tasks in (("train", dm.train_tasks), ("val", dm.val_tasks), ("test", dm.test_tasks)):
        for (_, labels), (_, original) in zip(tasks, splits[name], strict=True):
            assert labels.dtype == torch.int64 and torch.equal(labels, original.long())
    assert next(iter(dm.train_dataloader()))[1].dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool], ids=str)
def test_float_or_bool_labels_are_refused_with_the_fix(dtype):
    splits = _splits()
    x, y = splits["test"][1]
    splits["test"][1] = (x, y.to(dtype))
    message = rf"`test\[1\]` labels must be integer class indices .*got {dtype}.*labels\.long\(\)"
    with pytest.raises(TypeError, match=message):
        TaskSequenceDataModule(**splits)


@pytest.mark.parametrize(("split", "shape"), [("train", [6, 1]), ("val", [6, 1]), ("test", [6, 2])])
def test_labels_not_of_shape_n_are_refused_with_the_fix(split, shape):
    splits = _splits()
    x, _ = splits[split][0]
    splits[split][0] = (x, torch.zeros(shape, dtype=torch.long))
    message = rf"`{split}\[0\]` labels must have shape \[n\], got \[{shape[0]}, {shape[1]}\]"
    with pytest.raises(ValueError, match=message + r".*labels\.squeeze\(1\)` or `labels\.view\(-1\)`"):
        TaskSequenceDataModule(**splits)


def test_a_training_task_of_a_single_class_is_refused_but_evaluation_splits_may_have_one():
    splits = _splits()
    splits["train"][1] = (torch.randn(6, 2), torch.full((6,), 3))
    with pytest.raises(ValueError, match=r"`train\[1\]` labels are all class 3: a task needs two or more classes"):
        TaskSequenceDataModule(**splits)
    one_class = (torch.randn(4, 2), torch.ones(4, dtype=torch.long))
    dm = TaskSequenceDataModule(train=[_task()], val=[one_class], test=[one_class])
    assert dm.num_classes(0) == 2


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_task_of_another_input_shape_is_refused_naming_both_shapes(split):
    splits = _splits()
    splits[split][1] = (torch.randn(6, 1, 3), torch.arange(6) % 2)
    expected = rf"`{split}\[1\]` inputs have shape \[1, 3\] per example but `train\[0\]` has \[2\].*resize"
    with pytest.raises(ValueError, match=expected):
        TaskSequenceDataModule(**splits)


def test_predict_dataloader_serves_the_test_split_of_every_task_seen_in_order():
    dm = SplitDigits(num_tasks=3)
    dm.set_task(1)
    loaders = dm.predict_dataloader()
    assert len(loaders) == dm.current_task + 1
    for task, loader in enumerate(loaders):
        inputs, labels = (torch.cat(parts) for parts in zip(*loader, strict=True))
        assert torch.equal(inputs, dm.test_tasks[task][0]) and torch.equal(labels, dm.test_tasks[task][1])


def test_trainer_predict_runs_on_the_datamodule():
    import lightning.pytorch as pl

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            inputs, _ = batch
            return self.layer(inputs).argmax(dim=1)

    dm = TaskSequenceDataModule(**_splits(), batch_size=4)
    dm.set_task(1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    predictions = trainer.predict(Linear(), datamodule=dm)
    assert [sum(len(p) for p in task) for task in predictions] == [6, 6]


@pytest.mark.parametrize(("dtype", "error"), [(np.int32, None), (np.uint8, None), (np.float32, TypeError)])
def test_tensor_file_labels_go_through_the_base_checks(tmp_path, dtype, error):
    arrays = {}
    for split in ("train", "test"):
        x, y = _task()
        arrays[f"{split}_x_0"], arrays[f"{split}_y_0"] = x.numpy(), y.numpy().astype(dtype)
    path = tmp_path / "stream.npz"
    np.savez(path, **arrays)
    if error is None:
        assert TensorFileStream(str(path)).train_tasks[0][1].dtype == torch.int64
    else:
        with pytest.raises(error, match=r"`train\[0\]` labels must be integer class indices .*labels\.long\(\)"):
            TensorFileStream(str(path))
