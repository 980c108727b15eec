"""Shared helpers for the tests of the pure-torch DEN core: random networks, reference networks, random surgery.

Nothing here imports Lightning; everything comes from ``lightning_den.core``.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from lightning_den.core.den.layers import ExpandableMLP
from lightning_den.core.den.surgery import add_units_, duplicate_units_, prune_units_

#: Most tasks a random history may create (a per-task ``head_classes`` list has one more, for a test to add).
MAX_TASKS = 4

#: Settings for the property tests: few, small examples, no example database written to disk.
FAST = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def mlp_configs(draw: st.DrawFn, min_depth: int = 1, max_depth: int = 4) -> tuple[int, list[int], object, int]:
    """``(in_features, hidden_sizes, head_classes, seed)`` of a small random network."""
    in_features = draw(st.integers(1, 8), label="in_features")
    hidden = draw(st.lists(st.integers(1, 6), min_size=min_depth, max_size=max_depth), label="hidden_sizes")
    classes = draw(
        st.one_of(st.integers(1, 3), st.lists(st.integers(1, 3), min_size=MAX_TASKS + 1, max_size=MAX_TASKS + 1)),
        label="head_classes",
    )
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    return in_features, hidden, classes, seed


@torch.no_grad()
def random_mlp(in_features: int, hidden_sizes: list[int], head_classes, seed: int) -> ExpandableMLP:
    """An :class:`ExpandableMLP` whose parameters are all drawn from ``N(0, 1)`` with the given seed."""
    mlp = ExpandableMLP(in_features, hidden_sizes, head_classes)
    generator = torch.Generator().manual_seed(seed)
    for parameter in mlp.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return mlp


@torch.no_grad()
def perturb_(mlp: ExpandableMLP, generator: torch.Generator, scale: float = 0.5) -> None:
    """Add noise to every parameter (stands in for training, and makes zero outgoing weights nonzero)."""
    for parameter in mlp.parameters():
        parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def random_inputs(mlp: ExpandableMLP, seed: int = 0, batch: int = 6) -> Tensor:
    return torch.randn(batch, mlp.in_features, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def outputs_by_task(mlp: ExpandableMLP, x: Tensor, tasks) -> dict[int, Tensor]:
    """``{task: mlp(x, task)}`` for the given tasks (detached copies)."""
    return {task: mlp(x, task=task).detach().clone() for task in tasks}


def earlier_tasks(mlp: ExpandableMLP) -> range:
    return range(mlp.newest_task)


def state_copy(module: nn.Module) -> dict[str, Any]:
    """Deep copy of every parameter, buffer and extra state (a block's architecture), to check later that
    nothing changed."""
    return {
        name: value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)
        for name, value in module.state_dict().items()
    }


def assert_same_state(module: nn.Module, before: dict[str, Any]) -> None:
    after = module.state_dict()
    assert sorted(after) == sorted(before)
    for name, value in before.items():
        if isinstance(value, Tensor):
            assert after[name].shape == value.shape, name
            assert torch.equal(after[name], value), name
        else:
            assert after[name] == value, name


@torch.no_grad()
def reference_network(mlp: ExpandableMLP, task: int) -> nn.Sequential:
    """A plain ``nn.Linear``/``nn.ReLU`` stack made only of the units born at or before ``task``.

    Each hidden layer keeps the rows whose birth is ``<= task`` and, of those rows, the columns of
    the units the previous layer kept; the head of ``task`` goes on top, reading all kept top units.
    Boolean masks are used (not prefix slices), so the reference does not rely on the prefix layout.
    """
    modules: list[nn.Module] = []
    kept_below = torch.ones(mlp.in_features, dtype=torch.bool)
    for layer in mlp.hidden:
        rows = layer.birth <= task
        linear = nn.Linear(int(kept_below.sum()), int(rows.sum()))
        linear.weight.copy_(layer.weight[rows][:, kept_below])
        linear.bias.copy_(layer.bias[rows])
        modules += [linear, nn.ReLU()]
        kept_below = rows
    head = mlp.heads[str(task)]
    assert head.in_features == int(kept_below.sum()), "head reads a different number of units than the prefix"
    linear = nn.Linear(head.in_features, head.out_features)
    linear.weight.copy_(head.weight)
    linear.bias.copy_(head.bias)
    modules.append(linear)
    return nn.Sequential(*modules)


def draw_units(data: st.DataObject, candidates: list[int], max_size: int = 3, label: str = "units") -> list[int]:
    """A non-empty list of distinct units drawn from ``candidates``."""
    return data.draw(
        st.lists(st.sampled_from(candidates), min_size=1, max_size=min(max_size, len(candidates)), unique=True),
        label=label,
    )


def newest_units(mlp: ExpandableMLP, layer: int) -> list[int]:
    return [u for u, birth in enumerate(mlp.hidden[layer].birth.tolist()) if birth == mlp.newest_task]


def old_units(mlp: ExpandableMLP, layer: int) -> list[int]:
    return [u for u, birth in enumerate(mlp.hidden[layer].birth.tolist()) if birth < mlp.newest_task]


def draw_counts(data: st.DataObject, mlp: ExpandableMLP) -> list[int]:
    depth = len(mlp.hidden)
    return data.draw(st.lists(st.integers(0, 3), min_size=depth, max_size=depth), label="counts")


def draw_prunable(data: st.DataObject, mlp: ExpandableMLP, layer: int) -> list[int]:
    """Newest-task units of ``layer`` to prune, never all units of the layer (empty if there are none)."""
    candidates = newest_units(mlp, layer)
    if not candidates:
        return []
    units = draw_units(data, candidates, max_size=len(candidates), label="prune units")
    if len(units) == mlp.hidden[layer].out_features:
        units = units[:-1]
    return units


OPERATIONS = ("head", "add", "duplicate", "prune", "perturb")


def apply_random_operation(
    data: st.DataObject, mlp: ExpandableMLP, generator: torch.Generator, kinds=OPERATIONS
) -> str:
    """Draw one operation of ``kinds`` with valid random arguments, apply it, and return its name."""
    kind = data.draw(st.sampled_from(kinds), label="operation")
    if kind == "head" and mlp.num_tasks < MAX_TASKS:
        mlp.add_task_()
    elif kind == "add":
        add_units_(mlp, draw_counts(data, mlp), generator)
    elif kind == "duplicate":
        layer = data.draw(st.integers(0, len(mlp.hidden) - 1), label="layer")
        duplicate_units_(mlp, layer, draw_units(data, list(range(mlp.hidden[layer].out_features))))
    elif kind == "prune":
        layer = data.draw(st.integers(0, len(mlp.hidden) - 1), label="layer")
        prune_units_(mlp, layer, draw_prunable(data, mlp, layer))
    elif kind == "perturb":
        perturb_(mlp, generator)
    return kind


def random_history(data: st.DataObject, mlp: ExpandableMLP, generator: torch.Generator, max_ops: int = 8) -> None:
    """Apply a random sequence of heads, growth, duplication, pruning and weight changes."""
    for _ in range(data.draw(st.integers(0, max_ops), label="history length")):
        apply_random_operation(data, mlp, generator)


def build(config: tuple[int, list[int], object, int]) -> tuple[ExpandableMLP, torch.Generator]:
    in_features, hidden, classes, seed = config
    return random_mlp(in_features, hidden, classes, seed), torch.Generator().manual_seed(seed + 1)


def as_mask(value, shape) -> Tensor:
    """A ``trainable_entries`` value (``True``, ``False`` or a boolean mask) as a boolean mask of ``shape``."""
    if isinstance(value, bool):
        return torch.full(tuple(shape), value, dtype=torch.bool)
    assert value.dtype == torch.bool and tuple(value.shape) == tuple(shape)
    return value


@contextmanager
def recorded_ops(into: Counter) -> Iterator[None]:
    """Count every torch operator called inside the block, nested ones included, into ``into``."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        yield
    into.update(event.name for event in profiler.events())
