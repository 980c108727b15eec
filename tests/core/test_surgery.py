"""Tests of :mod:`lightning_den.core.den.surgery`: growth, duplication, restoration and pruning of units.

Every operation must preserve the function of every earlier task bit for bit (``torch.equal``), refuse
bad arguments before changing anything, and work for any number of hidden layers (bug B10).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_den.core.den.layers import ExpandableMLP
from lightning_den.core.den.selection import dead_new_units, unit_drift, units_to_split
from lightning_den.core.den.surgery import add_units_, duplicate_units_, prune_units_, restore_units_, snapshot
from tests.core.helpers import (
    FAST,
    assert_same_state,
    build,
    draw_counts,
    draw_prunable,
    draw_units,
    earlier_tasks,
    mlp_configs,
    old_units,
    outputs_by_task,
    perturb_,
    random_history,
    random_inputs,
    random_mlp,
    reference_network,
    state_copy,
)


def assert_outputs_equal(mlp: ExpandableMLP, x: torch.Tensor, expected: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for task, output in expected.items():
            assert torch.equal(mlp(x, task=task), output), f"task {task} changed"


def start_task_with_history(data, config) -> tuple[ExpandableMLP, torch.Generator, torch.Tensor]:
    """A random network after a random history, with at least two tasks so that earlier tasks exist."""
    mlp, generator = build(config)
    random_history(data, mlp, generator)
    if mlp.num_tasks == 1:
        mlp.add_task_()
    perturb_(mlp, generator)  # no zero outgoing weights left from earlier growth
    return mlp, generator, random_inputs(mlp, seed=config[-1])


# --- function preservation ---


@FAST
@given(config=mlp_configs(), data=st.data())
def test_add_units_preserves_every_task_including_the_newest(config, data):
    mlp, generator, x = start_task_with_history(data, config)
    before = outputs_by_task(mlp, x, range(mlp.num_tasks))
    counts = draw_counts(data, mlp)
    old_rows = [mlp.consumer(index).out_features for index in range(len(mlp.hidden))]
    starts = add_units_(mlp, counts, generator)
    assert_outputs_equal(mlp, x, {task: before[task] for task in earlier_tasks(mlp)})
    for index, (start, count) in enumerate(zip(starts, counts, strict=True)):
        # units that existed before (including the newest head) read the new units through zeros
        outgoing = mlp.consumer(index).weight[: old_rows[index], start : start + count]
        assert not outgoing.any(), "new units must not be read by existing units yet"
    # The newest task reads the new units through zero weights, so its function is unchanged; but its
    # matrix products now have more rows/columns, and CPU kernels round differently for different
    # shapes (e.g. one fused multiply-add for a single input column), so only up to rounding.
    with torch.no_grad():
        torch.testing.assert_close(mlp(x, task=mlp.newest_task), before[mlp.newest_task], rtol=1e-5, atol=1e-5)
    for layer, start, count in zip(mlp.hidden, starts, counts, strict=True):
        assert layer.out_features == start + count
        assert layer.birth[start:].tolist() == [mlp.newest_task] * count
    mlp.check_prefix_invariant()


@FAST
@given(config=mlp_configs(), data=st.data())
def test_duplicate_units_preserves_earlier_tasks(config, data):
    mlp, _, x = start_task_with_history(data, config)
    before = outputs_by_task(mlp, x, earlier_tasks(mlp))
    layer = data.draw(st.integers(0, len(mlp.hidden) - 1), label="layer")
    hidden, consumer = mlp.hidden[layer], mlp.consumer(layer)
    units = draw_units(data, list(range(hidden.out_features)))
    weight, bias, outgoing = (
        hidden.weight.detach().clone(),
        hidden.bias.detach().clone(),
        consumer.weight.detach().clone(),
    )
    copies = duplicate_units_(mlp, layer, units)
    assert copies == list(range(weight.shape[0], weight.shape[0] + len(units)))
    assert torch.equal(hidden.weight[copies], weight[units])
    assert torch.equal(hidden.bias[copies], bias[units])
    assert torch.equal(consumer.weight[:, copies], outgoing[:, units])
    assert hidden.birth[copies].tolist() == [mlp.newest_task] * len(units)
    assert_outputs_equal(mlp, x, before)
    mlp.check_prefix_invariant()


@FAST
@given(config=mlp_configs(), data=st.data())
def test_prune_units_of_the_newest_task_preserves_earlier_tasks(config, data):
    mlp, generator, x = start_task_with_history(data, config)
    add_units_(mlp, [2] * len(mlp.hidden), generator)  # make sure there are newest-task units
    perturb_(mlp, generator)
    before = outputs_by_task(mlp, x, earlier_tasks(mlp))
    layer = data.draw(st.integers(0, len(mlp.hidden) - 1), label="layer")
    hidden, consumer = mlp.hidden[layer], mlp.consumer(layer)
    units = draw_prunable(data, mlp, layer)
    keep = [u for u in range(hidden.out_features) if u not in units]
    weight, birth, outgoing = hidden.weight.detach().clone(), hidden.birth.clone(), consumer.weight.detach().clone()
    prune_units_(mlp, layer, units)
    assert torch.equal(hidden.weight, weight[keep])
    assert torch.equal(hidden.birth, birth[keep])
    assert torch.equal(consumer.weight, outgoing[:, keep])
    assert_outputs_equal(mlp, x, before)
    mlp.check_prefix_invariant()


# --- duplicate, then restore the original (split, Alg. 4) ---


@FAST
@given(config=mlp_configs(), data=st.data())
def test_duplicate_then_restore_brings_earlier_tasks_back_exactly(config, data):
    mlp, generator, x = start_task_with_history(data, config)
    mlp.add_task_()
    reference = snapshot(mlp)
    kept_reference = {name: value.clone() for name, value in reference.items()}
    before = outputs_by_task(mlp, x, earlier_tasks(mlp))
    # Growth of the lower layers during the task: restored units must zero their new input columns.
    add_units_(mlp, draw_counts(data, mlp), generator)

    layer = data.draw(st.integers(0, len(mlp.hidden) - 1), label="layer")
    hidden = mlp.hidden[layer]
    units = draw_units(data, old_units(mlp, layer))
    with torch.no_grad():  # "selective retraining" moves these old units, and only these
        hidden.weight[units] += torch.randn(len(units), hidden.in_features, generator=generator)
        hidden.bias[units] += torch.randn(len(units), generator=generator)
    drifted_weight, drifted_bias = hidden.weight[units].detach().clone(), hidden.bias[units].detach().clone()

    copies = duplicate_units_(mlp, layer, units)
    restore_units_(mlp, layer, units, reference)

    assert_outputs_equal(mlp, x, before)
    # The copies keep the drifted incoming weights and the drifted bias (not a fresh random bias, B5) ...
    assert torch.equal(hidden.weight[copies], drifted_weight)
    assert torch.equal(hidden.bias[copies], drifted_bias)
    # ... the originals get W^{t-1} back, zero on inputs born since, from a deep copy (B3).
    old_in = reference[f"hidden.{layer}.weight"].shape[1]
    assert torch.equal(hidden.weight[units, :old_in], kept_reference[f"hidden.{layer}.weight"][units])
    assert not hidden.weight[units, old_in:].any()
    assert torch.equal(hidden.bias[units], kept_reference[f"hidden.{layer}.bias"][units])
    # The snapshot was not moved by the in-place training above.
    for name, value in kept_reference.items():
        assert torch.equal(reference[name], value), name
    mlp.check_prefix_invariant()


def test_snapshot_is_a_deep_copy():
    mlp = random_mlp(3, [2, 2], head_classes=1, seed=0)
    reference = snapshot(mlp)
    assert sorted(reference) == ["hidden.0.bias", "hidden.0.weight", "hidden.1.bias", "hidden.1.weight"]
    with torch.no_grad():
        for layer in mlp.hidden:
            layer.weight.add_(1.0)
            layer.bias.add_(1.0)
    for index, layer in enumerate(mlp.hidden):
        assert torch.equal(reference[f"hidden.{index}.weight"] + 1.0, layer.weight)
        assert torch.equal(reference[f"hidden.{index}.bias"] + 1.0, layer.bias)


def test_restored_unit_does_not_alias_the_snapshot():
    mlp = random_mlp(3, [2], head_classes=1, seed=1)
    reference = snapshot(mlp)
    mlp.add_task_()
    restore_units_(mlp, 0, [1], reference)
    kept = reference["hidden.0.weight"].clone()
    with torch.no_grad():
        mlp.hidden[0].weight[1] += 1.0
    assert torch.equal(reference["hidden.0.weight"], kept)


# --- refusals ---


def grown_network() -> tuple[ExpandableMLP, torch.Generator]:
    """Task 0 with [3, 2] units, then task 1 with [2, 1] new units: old units 0..2 and 0..1."""
    mlp = random_mlp(4, [3, 2], head_classes=2, seed=3)
    generator = torch.Generator().manual_seed(3)
    mlp.add_task_()
    add_units_(mlp, [2, 1], generator)
    perturb_(mlp, generator)
    return mlp, generator


@pytest.mark.parametrize(("layer", "units"), [(0, [1]), (0, [3, 0]), (1, [1, 2]), (0, [5]), (0, [-1])])
def test_prune_refuses_units_not_born_in_the_newest_task_and_changes_nothing(layer, units):
    mlp, _ = grown_network()
    before = state_copy(mlp)
    with pytest.raises(ValueError, match="only units born in the newest task"):
        prune_units_(mlp, layer, units)
    assert_same_state(mlp, before)


@pytest.mark.parametrize("counts", [[1], [1, 1, 1], [], [1, -1]])
def test_add_units_refuses_wrong_counts_and_changes_nothing(counts):
    mlp, generator = grown_network()
    before = state_copy(mlp)
    with pytest.raises(ValueError, match="one non-negative unit count per hidden layer"):
        add_units_(mlp, counts, generator)
    assert_same_state(mlp, before)


def test_restore_refuses_units_that_were_not_in_the_snapshot():
    mlp = random_mlp(4, [3, 2], head_classes=2, seed=4)
    mlp.add_task_()
    reference = snapshot(mlp)
    add_units_(mlp, [2, 1], torch.Generator().manual_seed(4))
    before = state_copy(mlp)
    with pytest.raises(ValueError, match="did not exist in the snapshot"):
        restore_units_(mlp, 0, [0, 3], reference)
    with pytest.raises(ValueError, match="did not exist in the snapshot"):
        restore_units_(mlp, 1, [2], reference)
    assert_same_state(mlp, before)


@pytest.mark.parametrize("operation", ["duplicate", "prune", "restore"])
def test_missing_layer_is_refused(operation):
    mlp, _ = grown_network()
    before = state_copy(mlp)
    with pytest.raises(ValueError, match="hidden layer 2 does not exist"):
        if operation == "duplicate":
            duplicate_units_(mlp, 2, [0])
        elif operation == "prune":
            prune_units_(mlp, 2, [0])
        else:
            restore_units_(mlp, 2, [0], snapshot(mlp))
    assert_same_state(mlp, before)


def test_duplicate_refuses_units_out_of_range():
    mlp, _ = grown_network()
    before = state_copy(mlp)
    with pytest.raises(ValueError, match="out of range"):
        duplicate_units_(mlp, 0, [0, 5])
    assert_same_state(mlp, before)


# --- deep networks (B10) ---


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_den_task_cycle_preserves_earlier_tasks_at_any_depth(depth):
    """Three tasks of selective drift, expansion, dead-unit pruning and split at every layer."""
    mlp = random_mlp(5, [4] * depth, head_classes=[2, 3, 2], seed=depth)
    generator = torch.Generator().manual_seed(100 + depth)
    x = random_inputs(mlp, seed=depth)
    for task in (1, 2):
        assert mlp.add_task_() == task
        reference = snapshot(mlp)
        before = outputs_by_task(mlp, x, range(task))
        with torch.no_grad():  # selective retraining: old units 0 and 2 of every layer drift, plus the new head
            for layer in mlp.hidden:
                layer.weight[[0, 2]] += torch.randn(2, layer.in_features, generator=generator)
                layer.bias[[0, 2]] += 1.0
            perturb_(mlp.heads[str(task)], generator)
        starts = add_units_(mlp, [3] * depth, generator)
        with torch.no_grad():  # expansion: new units train, and the first new unit of every layer dies
            for layer, start in zip(mlp.hidden, starts, strict=True):
                layer.weight[start:] += torch.randn(3, layer.in_features, generator=generator)
                layer.weight[start] = 0.0
                layer.bias[start] = 0.0
        for index in range(depth):
            dead = dead_new_units(mlp, index)
            assert dead == [starts[index]]
            prune_units_(mlp, index, dead)
        for index in range(depth):  # split everything that drifted
            split = units_to_split(unit_drift(mlp, index, reference), threshold=0.0)
            assert sorted(split) == [0, 2]
            copies = duplicate_units_(mlp, index, split)
            restore_units_(mlp, index, split, reference)
            assert mlp.hidden[index].birth[copies].tolist() == [task, task]
        mlp.check_prefix_invariant()
        assert_outputs_equal(mlp, x, before)
        with torch.no_grad():
            for s in range(task + 1):
                assert torch.equal(mlp(x, task=s), reference_network(mlp, s)(x))
        # each layer: 4 old units (+2 copies and 2 surviving new units per task so far)
        assert [layer.out_features for layer in mlp.hidden] == [4 + 4 * task] * depth
