"""Stream builders (pure tensor functions): shapes, labels and determinism."""

from __future__ import annotations

import pytest
import torch

from lightning_den.data import streams


@pytest.fixture
def dataset():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(200, 16, generator=generator)
    y = torch.arange(200) % 10
    return x, y


def test_split_by_classes_keeps_only_the_task_classes_and_renumbers_them(dataset):
    x, y = dataset
    tasks = streams.split_by_classes(x, y, [[3, 7], [0, 1, 2]])
    assert [len(t[1]) for t in tasks] == [40, 60]
    assert torch.equal(tasks[0][0], x[(y == 3) | (y == 7)])
    assert torch.equal(tasks[0][1], (y[(y == 3) | (y == 7)] == 7).long())
    assert set(tasks[1][1].tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="two or more distinct classes"):
        streams.split_by_classes(x, y, [[4]])


def test_permuted_tasks_are_fixed_permutations_of_the_same_examples(dataset):
    x, y = dataset
    first, again = streams.permuted(x, y, 3, seed=5), streams.permuted(x, y, 3, seed=5)
    for (a, la), (b, lb) in zip(first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(la, y) and torch.equal(lb, y)
    # each task is a column permutation: the sorted rows equal the sorted original rows
    for task_x, _ in first:
        assert torch.equal(task_x.sort(dim=1).values, x.sort(dim=1).values)
    assert not torch.equal(first[0][0], first[1][0])
    assert not torch.equal(first[0][0], streams.permuted(x, y, 1, seed=6)[0][0])


def test_rotation_by_zero_is_identity_and_by_360_returns_the_image():
    image = torch.zeros(1, 28, 28)
    image[0, 10:18, 12:16] = 1.0
    assert torch.allclose(streams.rotate(image, 0.0), image, atol=1e-6)
    quarter = streams.rotate(image, 90.0)
    assert torch.allclose(quarter.sum(), image.sum(), rtol=0.05)
    assert not torch.allclose(quarter, image, atol=0.1)
    assert torch.allclose(streams.rotate(quarter, 270.0), image, atol=1e-4)


def test_rotated_stream_has_one_angle_per_task(dataset):
    x, y = dataset
    tasks = streams.rotated(x, y, [0.0, 45.0, 90.0])
    assert len(tasks) == 3 and all(t[0].shape == x.shape for t in tasks)
    assert torch.allclose(tasks[0][0], x, atol=1e-6)


def test_one_vs_rest_labels_and_balance(dataset):
    x, y = dataset
    tasks = streams.one_vs_rest(x, y, [0, 9])
    assert [int(t[1].sum()) for t in tasks] == [20, 20] and all(len(t[1]) == 200 for t in tasks)
    assert torch.equal(tasks[1][1], (y == 9).long())
    balanced = streams.one_vs_rest(x, y, [4], balance=True, seed=1)[0]
    assert len(balanced[1]) == 40 and int(balanced[1].sum()) == 20
    with pytest.raises(ValueError, match="class 11 does not occur"):
        streams.one_vs_rest(x, y, [11])


def test_variation_images_are_rotated_and_noisy_but_deterministic():
    x = torch.zeros(4, 784)
    noisy = streams.rotate_with_noisy_background(x, seed=0)
    assert torch.equal(noisy, streams.rotate_with_noisy_background(x, seed=0))
    assert float(noisy.min()) >= 0.0 and float(noisy.max()) <= 1.0 and float(noisy.mean()) > 0.3


def test_train_test_split_is_stratified_disjoint_and_seeded(dataset):
    x, y = dataset
    (xa, ya), (xb, yb) = streams.train_test_split(x, y, test_fraction=0.25, seed=2)
    assert len(ya) == 150 and len(yb) == 50
    assert torch.equal(torch.bincount(yb), torch.full((10,), 5))
    rows = {tuple(r.tolist()) for r in xa}
    assert not any(tuple(r.tolist()) in rows for r in xb)
    (xc, _), _ = streams.train_test_split(x, y, test_fraction=0.25, seed=2)
    assert torch.equal(xa, xc)
