"""Task streams built from one labelled dataset: pure tensor functions, no Lightning.

Each builder takes inputs ``x`` ``[n, ...]`` and labels ``y`` ``[n]`` and returns one
``(inputs, labels)`` pair per task, labels renumbered ``0..classes-1`` within each task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_den.core.checks import check_fraction

TaskTensors = tuple[Tensor, Tensor]


def split_by_classes(x: Tensor, y: Tensor, classes_per_task: Sequence[Sequence[int]]) -> list[TaskTensors]:
    """One task per group of classes; the classes of a task are renumbered ``0..k-1`` in the given order.

    Example:
        >>> x, y = torch.arange(6.0)[:, None], torch.tensor([0, 1, 2, 3, 0, 2])
        >>> [t[1].tolist() for t in split_by_classes(x, y, [[0, 1], [2, 3]])]
        [[0, 1, 0], [0, 1, 0]]
    """
    tasks = []
    for index, classes in enumerate(classes_per_task):
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"task {index} needs two or more distinct classes, got {list(classes)}")
        chosen = torch.isin(y, torch.as_tensor(list(classes)))
        if not bool(chosen.any()):
            raise ValueError(f"task {index}: none of the classes {list(classes)} occurs in the labels")
        lookup = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
        lookup[torch.as_tensor(list(classes))] = torch.arange(len(classes))
        tasks.append((x[chosen], lookup[y[chosen]]))
    return tasks


def permuted(x: Tensor, y: Tensor, num_tasks: int, seed: int = 0, permute_first: bool = True) -> list[TaskTensors]:
    """Permuted-MNIST style: the same examples, each task with its own fixed permutation of the features.

    ``permute_first=True`` permutes the first task as well, as the official DEN code does.

    Example:
        >>> x, y = torch.arange(8.0).reshape(2, 4), torch.tensor([0, 1])
        >>> tasks = permuted(x, y, num_tasks=2, permute_first=False)
        >>> torch.equal(tasks[0][0], x), sorted(tasks[1][0][0].tolist()) == x[0].tolist()
        (True, True)
    """
    flat = x.flatten(1)
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for task in range(num_tasks):
        order = torch.randperm(flat.shape[1], generator=generator)
        tasks.append((flat if task == 0 and not permute_first else flat[:, order], y.clone()))
    return tasks


def rotate(images: Tensor, degrees: Tensor | float) -> Tensor:
    """Rotate square images ``[n, side, side]`` (or flattened ``[n, side*side]``) by ``degrees`` each.

    Bilinear, zero outside the image; returns the input's shape.
    """
    flat = images.ndim == 2
    side = math.isqrt(images.shape[-1]) if flat else images.shape[-1]
    batch = images.reshape(-1, 1, side, side).float()
    angle = torch.as_tensor(degrees, dtype=torch.float32).expand(batch.shape[0]) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    rotated = F.grid_sample(batch, grid, align_corners=False)
    return rotated.reshape(images.shape)


def rotated(x: Tensor, y: Tensor, angles: Sequence[float]) -> list[TaskTensors]:
    """One task per angle: every image rotated by that angle (degrees), labels unchanged.

    Example:
        >>> x, y = torch.rand(3, 16), torch.tensor([0, 1, 2])
        >>> [t[0].shape for t in rotated(x, y, [0.0, 90.0])]
        [torch.Size([3, 16]), torch.Size([3, 16])]
    """
    return [(rotate(x, angle), y.clone()) for angle in angles]


def one_vs_rest(
    x: Tensor, y: Tensor, classes: Sequence[int], balance: bool = False, seed: int = 0
) -> list[TaskTensors]:
    """One binary task per class: label 1 for that class, 0 for every other (the paper's protocol).

    ``balance=True`` keeps as many negatives as positives, drawn with a fixed seed.

    Example:
        >>> x, y = torch.rand(4, 2), torch.tensor([0, 1, 2, 1])
        >>> [t[1].tolist() for t in one_vs_rest(x, y, [1])]
        [[0, 1, 0, 1]]
    """
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for cls in classes:
        positive = y == cls
        if not bool(positive.any()):
            raise ValueError(f"class {cls} does not occur in the labels, so it cannot be a one-vs-rest task")
        index = torch.arange(len(y))
        if balance:
            negatives = index[~positive]
            keep = negatives[torch.randperm(len(negatives), generator=generator)[: int(positive.sum())]]
            index = torch.sort(torch.cat([index[positive], keep])).values
        tasks.append((x[index], positive[index].long()))
    return tasks


def rotate_with_noisy_background(x: Tensor, seed: int = 0, noise: float = 1.0) -> Tensor:
    """MNIST-Variation style images: each rotated by a random angle, background filled with uniform noise.

    The paper's MNIST-Variation (Larochelle et al., 2007: rotated digits on background patches) is not
    shipped with this package; this builds the same kind of variation from plain digits:
    ``max(rotated digit, noise * U(0, 1))`` per pixel, with a fixed seed.
    """
    generator = torch.Generator().manual_seed(seed)
    angles = torch.rand(x.shape[0], generator=generator) * 360.0
    turned = rotate(x, angles)
    background = torch.rand(turned.shape, generator=generator) * noise
    return torch.maximum(turned, background)


def train_test_split(x: Tensor, y: Tensor, test_fraction: float, seed: int = 0) -> tuple[TaskTensors, TaskTensors]:
    """Shuffle with a fixed seed and cut off the last ``test_fraction`` as the test split (per class)."""
    check_fraction("test_fraction", test_fraction)
    generator = torch.Generator().manual_seed(seed)
    train_index, test_index = [], []
    for cls in torch.unique(y):
        members = torch.nonzero(y == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = len(members) - max(1, round(len(members) * test_fraction))
        train_index.append(members[:cut])
        test_index.append(members[cut:])
    train_index, test_index = torch.sort(torch.cat(train_index)).values, torch.sort(torch.cat(test_index)).values
    return (x[train_index], y[train_index]), (x[test_index], y[test_index])
