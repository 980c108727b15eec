"""MNIST from its original IDX files, and MNIST task streams as a DataModule.

Reads the files torchvision downloads (``<root>/MNIST/raw/``) or a plain folder holding them, gzipped
or not. With only the 10,000 test images present (as in ``shared/data/mnist``), the images are split
into train and test with a fixed seed; with the full set, the official split is used.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lightning_den.data import streams
from lightning_den.data.module import TaskSequenceDataModule

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` or plain)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} values but its header says {shape}")
    return array.reshape(shape)


def _find(root: Path, name: str) -> Path | None:
    for folder in (root / "MNIST" / "raw", root):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(root: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """The MNIST splits found under ``root``: ``{"test": (x, y)}`` and ``"train"`` when present.

    ``x`` is ``[n, 784]`` float in ``[0, 1]``, ``y`` ``[n]`` int64.

    Raises:
        FileNotFoundError: when not even the test files are there; the message lists where it looked.
    """
    root = Path(root)
    found: dict[str, tuple[Tensor, Tensor]] = {}
    for split, (images_name, labels_name) in _FILES.items():
        images, labels = _find(root, images_name), _find(root, labels_name)
        if images is None or labels is None:
            continue
        x = torch.from_numpy(read_idx(images).reshape(-1, 28 * 28).astype(np.float32) / 255.0)
        y = torch.from_numpy(read_idx(labels).astype(np.int64))
        if len(x) != len(y):
            raise ValueError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
        found[split] = (x, y)
    if "test" not in found:
        raise FileNotFoundError(
            f"no MNIST IDX files under {root}: looked for t10k-images-idx3-ubyte[.gz] and "
            f"t10k-labels-idx1-ubyte[.gz] in {root / 'MNIST' / 'raw'} and {root}"
        )
    return found


Stream = Literal["split", "permuted", "rotated", "one_vs_rest", "variation"]


class MNISTStream(TaskSequenceDataModule):
    """A continual-learning stream of MNIST tasks.

    Args:
        root: folder with the IDX files (torchvision layout or plain).
        stream: ``"split"`` (class pairs 0/1, 2/3, ...), ``"permuted"`` (one pixel permutation per task,
            10 classes), ``"rotated"`` (one angle per task, 10 classes), ``"one_vs_rest"`` (one binary
            task per digit), ``"variation"`` (one-vs-rest on randomly rotated digits over a noisy
            background: the paper's MNIST-Variation protocol, built from plain MNIST).
        num_tasks: number of tasks (at most 5 for ``split`` and 10 for the one-vs-rest streams).
        angles: rotation of each task for ``"rotated"``; default evenly spaced over 0-180 degrees.
        test_fraction: share held out for testing when only the MNIST test files are present.
        max_train_per_task: keep at most this many training examples per task (``None``: all).
        batch_size: mini-batch size.
        seed: seed of splits, permutations, rotations and shuffling.

    Example::

        dm = MNISTStream("../shared/data/mnist", stream="permuted", num_tasks=10)
    """

    def __init__(
        self,
        root: str,
        stream: Stream = "permuted",
        num_tasks: int = 10,
        angles: list[float] | None = None,
        test_fraction: float = 0.2,
        max_train_per_task: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        limits = {"split": 5, "one_vs_rest": 10, "variation": 10}
        if stream not in ("split", "permuted", "rotated", "one_vs_rest", "variation"):
            raise ValueError(f"`stream` must be split, permuted, rotated, one_vs_rest or variation, got {stream!r}")
        if num_tasks < 1 or num_tasks > limits.get(stream, num_tasks):
            most = f"1..{limits[stream]}" if stream in limits else "at least 1"
            raise ValueError(f"`num_tasks` for the {stream!r} stream must be {most}, got {num_tasks}")
        splits = load_mnist(root)
        if "train" in splits:
            train, test = splits["train"], splits["test"]
        else:
            train, test = streams.train_test_split(*splits["test"], test_fraction=test_fraction, seed=seed)
        if stream == "variation":
            train = (streams.rotate_with_noisy_background(train[0], seed=seed), train[1])
            test = (streams.rotate_with_noisy_background(test[0], seed=seed + 1), test[1])
        train_tasks = self._build(stream, *train, num_tasks, angles, seed)
        test_tasks = self._build(stream, *test, num_tasks, angles, seed)
        if max_train_per_task is not None:
            generator = torch.Generator().manual_seed(seed)
            train_tasks = [
                (x[keep], y[keep])
                for x, y in train_tasks
                for keep in [torch.randperm(len(y), generator=generator)[:max_train_per_task]]
            ]
        self.stream = stream
        super().__init__(train=train_tasks, test=test_tasks, batch_size=batch_size, seed=seed)

    @staticmethod
    def _build(stream: str, x: Tensor, y: Tensor, num_tasks: int, angles: list[float] | None, seed: int):
        if stream == "split":
            return streams.split_by_classes(x, y, [[2 * t, 2 * t + 1] for t in range(num_tasks)])
        if stream == "permuted":
            return streams.permuted(x, y, num_tasks, seed=seed)
        if stream == "rotated":
            chosen = angles if angles is not None else [180.0 * t / num_tasks for t in range(num_tasks)]
            if len(chosen) != num_tasks:
                raise ValueError(f"`angles` lists {len(chosen)} angles for {num_tasks} tasks")
            return streams.rotated(x, y, chosen)
        return streams.one_vs_rest(x, y, list(range(num_tasks)))
