"""Task streams stored in a file, so that command-line users can bring their own data.

Two formats:

* ``.pt`` (``torch.save``): ``{"train": [(x, y), ...], "test": [(x, y), ...], "val": [...] (optional)}``;
* ``.npz`` (``numpy.savez``): arrays named ``train_x_0``, ``train_y_0``, ``test_x_0``, ``test_y_0``,
  ... (``val_x_<t>``/``val_y_<t>`` optional), one pair per task and split.

Labels are integer class indices of shape ``[n]`` (any integer dtype); the data goes through the
checks of :class:`~lightning_den.data.module.TaskSequenceDataModule`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from lightning_den.data.module import TaskSequenceDataModule, TaskTensors


def _from_npz(path: Path) -> dict[str, list[TaskTensors]]:
    with np.load(path) as arrays:
        splits: dict[str, list[TaskTensors]] = {}
        for split in ("train", "val", "test"):
            tasks = []
            while f"{split}_x_{len(tasks)}" in arrays:
                t = len(tasks)
                if f"{split}_y_{t}" not in arrays:
                    raise ValueError(f"{path} has `{split}_x_{t}` but no `{split}_y_{t}`")
                tasks.append((torch.as_tensor(arrays[f"{split}_x_{t}"]), torch.as_tensor(arrays[f"{split}_y_{t}"])))
            if tasks:
                splits[split] = tasks
    return splits


def _from_pt(path: Path) -> dict[str, list[TaskTensors]]:
    try:
        content = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError) as error:  # what torch.load raises on other bytes
        raise ValueError(
            f"{path} is not a file of `torch.save({{'train': [(x, y), ...], 'test': [...]}}, path)` that loads with "
            f"`weights_only=True` (torch.load: {type(error).__name__}: {error})"
        ) from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a dict with 'train' and 'test' lists, got {type(content).__name__}")
    return {split: [tuple(pair) for pair in content[split]] for split in ("train", "val", "test") if split in content}


class TensorFileStream(TaskSequenceDataModule):
    """A task stream read from a ``.pt`` or ``.npz`` file (see the module docstring for the layout).

    Args:
        path: the file.
        batch_size: mini-batch size.
        seed: seed of the shuffling.
    """

    def __init__(self, path: str, batch_size: int = 64, seed: int = 0) -> None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"task stream file {file} does not exist")
        if file.suffix not in (".pt", ".npz"):
            raise ValueError(f"task stream files must end in .pt or .npz, got {file.name}")
        splits = _from_npz(file) if file.suffix == ".npz" else _from_pt(file)
        for required in ("train", "test"):
            if required not in splits:
                raise ValueError(f"{file} has no {required!r} tasks; see TensorFileStream's docs for the layout")
        # labels go to the base checks as stored: integers become int64 there, float labels are refused
        super().__init__(
            train=splits["train"], test=splits["test"], val=splits.get("val"), batch_size=batch_size, seed=seed
        )
