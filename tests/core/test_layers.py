"""Tests of :mod:`lightning_den.core.den.layers`: timestamped inference over the prefix of each layer, and errors.

The central property: whatever surgery happened, ``mlp(x, task=s)`` is, bit for bit, the plain network
made only of the units born at or before task ``s`` (Yoon et al., 2018, "Timestamped inference").
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lightning_den.core.den.layers import ExpandableMLP
from lightning_den.core.den.surgery import add_units_, duplicate_units_, prune_units_
from tests.core.helpers import (
    FAST,
    apply_random_operation,
    assert_same_state,
    build,
    mlp_configs,
    random_inputs,
    random_mlp,
    recorded_ops,
    reference_network,
    state_copy,
)


def assert_births_non_decreasing(mlp: ExpandableMLP) -> None:
    for index, layer in enumerate(mlp.hidden):
        births = layer.birth.tolist()
        assert births == sorted(births), f"hidden layer {index}: births {births}"
        assert max(births) <= mlp.newest_task


@FAST
@given(config=mlp_configs(), data=st.data())
def test_every_task_reads_exactly_the_units_born_up_to_it(config, data):
    mlp, generator = build(config)
    x = random_inputs(mlp, seed=config[-1])
    for _ in range(data.draw(st.integers(1, 12), label="number of operations")):
        apply_random_operation(data, mlp, generator)
        mlp.check_prefix_invariant()
        assert_births_non_decreasing(mlp)
    with torch.no_grad():
        for task in range(mlp.num_tasks):
            expected = reference_network(mlp, task)(x)
            assert torch.equal(mlp(x, task=task), expected), f"task {task}"
            assert mlp.widths(task) == tuple(int((layer.birth <= task).sum()) for layer in mlp.hidden)


def test_timestamped_inference_ignores_later_units_even_with_nonzero_weights():
    # Task 0: 3 and 2 units. Task 1 adds one unit per layer with large weights everywhere; task 0's
    # output must not move, while task 1's output (which reads the new units) must differ from the
    # plain network of task 0's units.
    mlp = random_mlp(4, [3, 2], head_classes=2, seed=0)
    x = random_inputs(mlp)
    with torch.no_grad():
        task0 = mlp(x, task=0).clone()
        mlp.add_task_()
        for layer in mlp.hidden:
            layer.append_units_(torch.full((1, layer.in_features), 5.0), torch.full((1,), 5.0), birth_task=1)
        mlp.hidden[1].append_inputs_(torch.full((3, 1, 1), 5.0))
        mlp.heads["1"].append_inputs_(torch.full((2, 1, 1), 5.0))
        mlp.structure_changed()
        assert mlp.widths(0) == (3, 2) and mlp.widths(1) == (4, 3)
        assert torch.equal(mlp(x, task=0), task0)
        assert torch.equal(mlp(x, task=1), reference_network(mlp, 1)(x))


@pytest.mark.parametrize("width", [3, 5])
def test_wrong_input_width_names_the_expected_width(width):
    mlp = ExpandableMLP(4, [3], head_classes=2)
    with pytest.raises(ValueError, match=r"expected inputs of shape \[batch, 4\]"):
        mlp(torch.ones(2, width), task=0)


def test_inputs_that_are_not_a_batch_of_vectors_are_refused():
    mlp = ExpandableMLP(4, [3], head_classes=2)
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        mlp(torch.ones(2, 2, 2), task=0)


@pytest.mark.parametrize("task", [2, 7, -1])
def test_untrained_task_names_the_trained_range(task):
    mlp = ExpandableMLP(4, [3], head_classes=2)
    mlp.add_task_()
    with pytest.raises(ValueError, match=rf"task {task} was never trained.*tasks 0\.\.1"):
        mlp(torch.ones(2, 4), task=task)
    with pytest.raises(ValueError, match=r"tasks 0\.\.1"):
        mlp.widths(task)


def test_task_must_be_an_int():
    mlp = ExpandableMLP(4, [3], head_classes=2)
    with pytest.raises(TypeError, match="must be an int"):
        mlp(torch.ones(2, 4), task=True)


@pytest.mark.parametrize(
    ("in_features", "hidden_sizes", "head_classes", "message"),
    [
        (0, [3], 2, "`in_features` must be a positive integer"),
        (-2, [3], 2, "`in_features` must be a positive integer"),
        (4, [], 2, "`hidden_sizes` must be one or more positive integers"),
        (4, [3, 0], 2, "`hidden_sizes` must be one or more positive integers"),
        (4, [-1], 2, "`hidden_sizes` must be one or more positive integers"),
        (4, [3], 0, "`head_classes` must be a positive integer"),
        (4, [3], [2, 0], "`head_classes` must be a positive integer"),
        (4, [3], [], "`head_classes` must be a positive integer"),
    ],
)
def test_non_positive_sizes_are_refused_at_construction(in_features, hidden_sizes, head_classes, message):
    with pytest.raises(ValueError, match=message):
        ExpandableMLP(in_features, hidden_sizes, head_classes)


def test_per_task_head_sizes_and_missing_head_size():
    mlp = ExpandableMLP(4, [3], head_classes=[2, 5])
    assert mlp(torch.ones(1, 4), task=0).shape == (1, 2)
    mlp.add_task_()
    assert mlp(torch.ones(1, 4), task=1).shape == (1, 5)
    with pytest.raises(ValueError, match="no head size for task 2"):
        mlp.add_task_()


def test_pruning_refuses_to_empty_a_layer_and_changes_nothing():
    # In task 0 every unit is born in the newest task, so only this check stops a layer being emptied.
    mlp = ExpandableMLP(3, [2, 2], head_classes=2)
    before = state_copy(mlp)
    with pytest.raises(ValueError, match="cannot prune all 2 units of hidden layer 0"):
        prune_units_(mlp, 0, [0, 1])
    assert_same_state(mlp, before)
    mlp.check_prefix_invariant()


def test_core_and_stream_builders_import_without_lightning():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['pytorch_lightning'] = None\n"
        "import lightning_den, lightning_den.core, lightning_den.data.streams\n"
        "assert lightning_den.DENMethod is lightning_den.core.DENMethod\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_grown_network_pickles_and_seeded_heads_are_reproducible():
    import pickle

    first, second = ExpandableMLP(3, [4], head_classes=2), ExpandableMLP(3, [4], head_classes=2)
    for mlp in (first, second):
        mlp.add_task_(torch.Generator().manual_seed(7))
    assert torch.equal(first.heads["1"].weight, second.heads["1"].weight)
    clone = pickle.loads(pickle.dumps(first))
    x = torch.randn(2, 3)
    assert torch.equal(clone(x, task=1), first(x, task=1))


def test_parameters_through_a_task_equal_what_the_network_held_when_it_ended():
    from lightning_den.core.den.surgery import add_units_, duplicate_units_

    mlp = ExpandableMLP(5, [4, 3], head_classes=2)
    held = [mlp.num_parameters()]
    for task in (1, 2):
        mlp.add_task_()
        add_units_(mlp, [2, 1], torch.Generator().manual_seed(task))
        duplicate_units_(mlp, 0, [0])
        held.append(mlp.num_parameters())
    assert [mlp.num_parameters_through(t) for t in range(3)] == held


#: ops that only make views (no memory written), left out when comparing what two networks compute
VIEW_OPS = {
    "aten::slice",
    "aten::alias",
    "aten::as_strided",
    "aten::t",
    "aten::transpose",
    "aten::expand",
    "aten::view",
}


def kernels(run: Callable[[], object]) -> Counter:
    """The torch operators ``run`` calls, nested ones included, views left out, with their counts."""
    ops: Counter = Counter()
    with recorded_ops(ops):
        run()
    return Counter({name: n for name, n in ops.items() if name.startswith("aten::") and name not in VIEW_OPS})


def test_timestamped_inference_and_newest_task_training_cost_what_a_dense_mlp_costs():
    """Old tasks run on prefix views (no copy of any weight), and training the newest task through the
    whole layers costs exactly the kernels of a dense MLP of that width (a full-width slice would add a
    backward that zero-fills and copies every weight gradient)."""
    generator = torch.Generator().manual_seed(0)
    mlp = ExpandableMLP(8, [6, 5], head_classes=2)
    for _ in range(2):
        mlp.add_task_(generator)
        add_units_(mlp, [3, 2], generator)
        duplicate_units_(mlp, 0, [1])
    x = torch.randn(4, 8)
    newest = mlp.newest_task
    assert mlp.widths(0) != mlp.widths(newest)
    for task in (0, newest):
        dense = reference_network(mlp, task)
        with torch.no_grad():
            assert torch.equal(mlp(x, task=task), dense(x))  # warms the widths cache too
            assert kernels(lambda t=task: mlp(x, task=t)) == kernels(lambda d=dense: d(x))
    dense = reference_network(mlp, newest)
    trained = kernels(lambda: mlp(x, task=newest).sum().backward())
    assert "aten::slice_backward" not in trained
    assert trained == kernels(lambda: dense(x).sum().backward())


# ---------------------------------------------------------------- the trained entries as Parameters of their own


@FAST
@given(config=mlp_configs(), data=st.data())
def test_separating_the_trained_entries_preserves_the_function_and_the_checkpoint(config, data):
    mlp, generator = build(config)
    for _ in range(data.draw(st.integers(0, 4), label="history length")):
        apply_random_operation(data, mlp, generator)
    x = random_inputs(mlp)
    tasks = range(mlp.num_tasks)
    before = {task: mlp(x, task=task) for task in tasks}
    saved = state_copy(mlp)
    for layer in mlp.hidden:
        rows = data.draw(st.integers(0, layer.out_features), label="frozen rows")
        layer.train_outside_(rows, data.draw(st.integers(0, layer.in_features), label="frozen columns"))
    assert all(torch.equal(mlp(x, task=task), before[task]) for task in tasks)  # bit for bit, every task
    assert_same_state(mlp, saved)  # the checkpoint keeps the plain layout and the same values
    for layer in mlp.hidden:
        layer.join_()
        assert not layer.separated and layer.weight.requires_grad
    assert {name.rpartition(".")[2] for name, _ in mlp.named_parameters()} == {"weight", "bias"}
    assert all(torch.equal(mlp(x, task=task), before[task]) for task in tasks)


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.5),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=0.1, fused=True),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.5, fused=True),
    "sgd-fused": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_an_optimizer_over_the_separated_entries_trains_them_and_nothing_else(optimizer):
    layer = ExpandableMLP(4, [5], head_classes=2).hidden[0]
    layer.train_outside_(3, 2)  # rows 0-2 over columns 0-1 stay
    trained = [p for p in layer.parameters() if p.requires_grad]
    assert {tuple(p.shape) for p in trained} == {(2, 4), (2,), (3, 2)}
    assert all(p.is_contiguous() for p in trained)  # fused kernels step numel() entries from data_ptr()
    step = OPTIMIZERS[optimizer](layer.parameters())  # every Parameter, as users write
    before, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    for _ in range(2):
        step.zero_grad()
        layer(torch.randn(7, 4)).square().sum().backward()
        step.step()
        layer.sync_()
    moved = layer.weight.detach() != before
    assert not moved[:3, :2].any() and layer.weight.grad is None  # the frozen block, bit for bit
    assert moved[3:].all() and moved[:3, 2:].all()  # what trains moved, and the layer's own weight shows it
    assert torch.equal(layer.bias.detach()[:3], bias[:3]) and (layer.bias.detach()[3:] != bias[3:]).all()
    assert torch.equal(layer(torch.ones(1, 4)), F.linear(torch.ones(1, 4), layer.weight, layer.bias))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_separated_layer_cast_or_loaded_keeps_one_set_of_values(dtype):
    layer = ExpandableMLP(4, [5], head_classes=2).hidden[0]
    layer.train_outside_(3, 2)
    layer.to(dtype)
    assert layer.new_unit_weight.dtype == dtype and torch.equal(layer.new_unit_weight, layer.weight[3:])
    with torch.no_grad():
        layer.old_unit_new_inputs.add_(1)
    assert torch.equal(layer.state_dict()["weight"][:3, 2:], layer.old_unit_new_inputs)  # saved up to date
    state = {name: value.clone() + 1 for name, value in layer.state_dict().items() if name != "birth"}
    layer.load_state_dict({**state, "birth": layer.birth})
    assert not layer.separated and torch.equal(layer.weight.detach(), state["weight"])


def test_a_frozen_block_larger_than_the_layer_is_refused():
    with pytest.raises(ValueError, match=r"must fit the layer \[5, 4\], got \[6, 1\]"):
        ExpandableMLP(4, [5], head_classes=2).hidden[0].train_outside_(6, 1)
