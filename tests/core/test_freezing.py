"""Tests of :mod:`lightning_den.core.freezing`: entries that stay bit-identical through any optimizer step,
whether the frozen entries form a leading block (kept as a block) or any other pattern (a dense mask)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_den.core.freezing import FrozenEntries, frozen_leading_block
from tests.core.helpers import FAST

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=0.05, weight_decay=0.1),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1),
}


def trained_masks(kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Trained entries of a [5, 4] weight and a [5] bias: a random pattern, or all but a leading block
    (the old units while DEN's expansion trains the new ones)."""
    if kind == "random":
        return torch.rand(5, 4, generator=generator) < 0.5, torch.tensor([1, 0, 1, 0, 0]).bool()
    weight = torch.ones(5, 4, dtype=torch.bool)
    weight[:3, :2] = False
    return weight, torch.tensor([0, 0, 0, 1, 1]).bool()


def train_with_freezing(optimizer_name: str, kind: str, use_frozen_entries: bool):
    """Three free steps (optimizer state builds up), then five steps with some entries frozen."""
    generator = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 4, generator=generator))
    bias = nn.Parameter(torch.randn(5, generator=generator))
    optimizer = OPTIMIZERS[optimizer_name]([weight, bias])
    for _ in range(3):
        weight.grad = torch.randn(weight.shape, generator=generator)
        bias.grad = torch.randn(bias.shape, generator=generator)
        optimizer.step()
    weight_mask, bias_mask = trained_masks(kind, generator)
    masks = {weight: weight_mask, bias: bias_mask}
    frozen = FrozenEntries(masks)
    start = {p: p.detach().clone() for p in masks}
    for _ in range(5):
        optimizer.zero_grad()
        x = torch.randn(3, 4, generator=generator)
        loss = ((x @ weight.T + bias) * torch.randn(3, 5, generator=generator)).sum()
        loss.backward()
        if use_frozen_entries:
            frozen.mask_gradients_()
        else:  # a gradient mask alone
            for p, mask in masks.items():
                p.grad.mul_(mask)
        optimizer.step()
        if use_frozen_entries:
            frozen.restore_()
    return frozen, masks, start


@pytest.mark.parametrize("kind", ["random", "leading block"])
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_frozen_entries_stay_bit_identical_and_the_others_train(optimizer_name, kind):
    frozen, masks, start = train_with_freezing(optimizer_name, kind, use_frozen_entries=True)
    assert (len(frozen.blocks), len(frozen.params)) == ((2, 0) if kind == "leading block" else (0, 2))
    for p, mask in masks.items():
        assert 0 < int(mask.sum()) < mask.numel()
        assert torch.equal(p[~mask], start[p][~mask])
        assert (p[mask] != start[p][mask]).all()


@pytest.mark.parametrize("kind", ["random", "leading block"])
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_torch_behaviour_a_gradient_mask_alone_does_not_freeze(optimizer_name, kind):
    # Documents torch, not this package: the reason FrozenEntries exists (decay and momentum move entries whose
    # gradient is zero).
    _, masks, start = train_with_freezing(optimizer_name, kind, use_frozen_entries=False)
    for p, mask in masks.items():
        assert (p[~mask] != start[p][~mask]).all()


@pytest.mark.parametrize("trained", [torch.tensor([True, False]), torch.tensor([[False, True], [True, True]])])
def test_frozen_entries_skip_parameters_without_gradients(trained):
    p = nn.Parameter(torch.arange(1.0, 1.0 + trained.numel()).reshape(trained.shape))
    start = p.detach().clone()
    frozen = FrozenEntries({p: trained})
    assert len(frozen) == 1
    frozen.mask_gradients_()  # no gradient yet: nothing to do, no error
    with torch.no_grad():
        p.add_(1.0)
    frozen.restore_()
    assert torch.equal(p.detach(), torch.where(trained, start + 1, start))


@FAST
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    data=st.data(),
)
def test_a_leading_block_is_found_exactly_and_nothing_else_is_taken_for_one(shape, data):
    extents = [data.draw(st.integers(0, n), label=f"extent {d}") for d, n in enumerate(shape)]
    trained = torch.ones(shape, dtype=torch.bool)
    trained[tuple(slice(e) for e in extents)] = False
    has_block = all(e > 0 for e in extents)
    assert frozen_leading_block(trained) == (tuple(slice(e) for e in extents) if has_block else None)
    # flip one entry: the frozen set is a leading block only if it still is one by construction
    index = tuple(data.draw(st.integers(0, n - 1), label=f"flip {d}") for d, n in enumerate(shape))
    trained[index] = ~trained[index]
    block = frozen_leading_block(trained)
    if block is not None:
        expected = torch.ones(shape, dtype=torch.bool)
        expected[block] = False
        assert torch.equal(trained, expected)
