"""Convolutional DEN (:mod:`lightning_den.core.den.conv`): filters are units, so the surgery of
:mod:`~lightning_den.core.den.surgery` must keep every guarantee it has on Linear layers.

Property tests on random small CNNs after random histories: expansion (new filters read through zero kernel
slices), duplication, pruning of the newest filters and split-and-restore leave every earlier task's
function bit for bit; the prefix network of a task is the network of its filters and units (timestamped
inference); the entries a phase trains cover whole kernel slices and flattened positions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lightning_den.core.den.conv import ExpandableCNN, ExpandableConv2d
from lightning_den.core.den.entries import separate_trained_entries_, trainable_entries
from lightning_den.core.den.phases import DENPhase
from lightning_den.core.den.selection import dead_new_units, select_subnetwork, unit_drift, units_to_split
from lightning_den.core.den.surgery import add_units_, duplicate_units_, prune_units_, restore_units_, snapshot
from tests.core.helpers import (
    FAST,
    MAX_TASKS,
    draw_counts,
    draw_prunable,
    draw_units,
    earlier_tasks,
    old_units,
    outputs_by_task,
    perturb_,
    random_history,
)


@st.composite
def cnn_configs(draw: st.DrawFn) -> tuple[dict, int]:
    """Keyword arguments of a small random :class:`ExpandableCNN`, and a seed."""
    side = draw(st.integers(4, 7), label="side")
    config = {
        "in_shape": (draw(st.integers(1, 2), label="in channels"), side, side),
        "channels": draw(st.lists(st.integers(1, 4), min_size=1, max_size=2), label="channels"),
        "hidden_sizes": draw(st.lists(st.integers(1, 5), min_size=1, max_size=2), label="hidden_sizes"),
        "head_classes": draw(st.integers(1, 3), label="head_classes"),
        "kernel_size": 3,
        "padding": 1,
        "pool": draw(st.sampled_from([1, 2]), label="pool"),
    }
    return config, draw(st.integers(0, 2**31 - 1), label="seed")


@torch.no_grad()
def random_cnn(config: dict, seed: int) -> tuple[ExpandableCNN, torch.Generator, torch.Tensor]:
    """A CNN whose parameters are drawn from ``N(0, 1)``, a generator for its surgery, and input images."""
    cnn = ExpandableCNN.lenet(**config)
    generator = torch.Generator().manual_seed(seed)
    for parameter in cnn.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return cnn, generator, torch.randn(5, *config["in_shape"], generator=generator)


def with_history(data, config, seed) -> tuple[ExpandableCNN, torch.Generator, torch.Tensor]:
    """A random CNN after a random history of heads, growth, duplication, pruning and weight changes, with at
    least two tasks."""
    cnn, generator, x = random_cnn(config, seed)
    random_history(data, cnn, generator)
    if cnn.num_tasks == 1:
        cnn.add_task_()
    perturb_(cnn, generator)
    return cnn, generator, x


def assert_earlier_tasks_unchanged(cnn: ExpandableCNN, x: torch.Tensor, before: dict) -> None:
    with torch.no_grad():
        for task, output in before.items():
            assert torch.equal(cnn(x, task=task), output), f"task {task} changed"


@torch.no_grad()
def reference_output(cnn: ExpandableCNN, x: torch.Tensor, task: int) -> torch.Tensor:
    """``task``'s output computed from the units born at or before it, selected by boolean masks (not by the
    prefix slices the network uses), through plain ``F.conv2d``/``F.linear``."""
    h, kept_below = x, torch.ones(cnn.in_features, dtype=torch.bool)
    for layer, activation in zip(cnn.hidden, cnn.activations, strict=True):
        rows = layer.birth <= task
        if isinstance(layer, ExpandableConv2d):
            weight = layer.weight[rows][:, kept_below]
            h = F.conv2d(h, weight, layer.bias[rows], stride=layer.stride, padding=layer.padding)
        else:
            columns = layer.input_entries(kept_below[None, :])[0]
            h = F.linear(h, layer.weight[rows][:, columns], layer.bias[rows])
        h, kept_below = activation(h), rows
    head = cnn.heads[str(task)]
    return F.linear(h, head.weight, head.bias)


@FAST
@given(configured=cnn_configs(), data=st.data())
def test_the_network_of_a_task_is_the_prefix_of_every_layer(configured, data):
    cnn, _, x = with_history(data, *configured)
    for task in range(cnn.num_tasks):
        with torch.no_grad():
            assert torch.equal(cnn(x, task=task), reference_output(cnn, x, task))
        assert cnn.widths(task) == tuple(int((layer.birth <= task).sum()) for layer in cnn.hidden)


@FAST
@given(configured=cnn_configs(), data=st.data())
def test_new_filters_and_units_leave_every_task_as_it_was(configured, data):
    cnn, generator, x = with_history(data, *configured)
    before = outputs_by_task(cnn, x, range(cnn.num_tasks))
    old_rows = [cnn.consumer(index).out_features for index in range(len(cnn.hidden))]
    counts = draw_counts(data, cnn)
    starts = add_units_(cnn, counts, generator)
    assert_earlier_tasks_unchanged(cnn, x, {t: before[t] for t in earlier_tasks(cnn)})
    for index, (start, count) in enumerate(zip(starts, counts, strict=True)):
        consumer = cnn.consumer(index)  # every kernel slice / flattened position of a new unit reads zero
        outgoing = consumer.by_input_unit(consumer.weight)[: old_rows[index], start : start + count]
        assert not outgoing.any()
    with torch.no_grad():  # the newest task reads the new units through zeros: the same function, up to rounding
        torch.testing.assert_close(cnn(x, task=cnn.newest_task), before[cnn.newest_task], rtol=1e-5, atol=1e-5)
    cnn.check_prefix_invariant()


@FAST
@given(configured=cnn_configs(), data=st.data())
def test_duplicated_filters_copy_their_kernels_and_outgoing_weights(configured, data):
    cnn, _, x = with_history(data, *configured)
    before = outputs_by_task(cnn, x, earlier_tasks(cnn))
    layer = data.draw(st.integers(0, len(cnn.hidden) - 1), label="layer")
    hidden, consumer = cnn.hidden[layer], cnn.consumer(layer)
    units = draw_units(data, list(range(hidden.out_features)))
    weight, bias = hidden.weight.detach().clone(), hidden.bias.detach().clone()
    outgoing = consumer.by_input_unit(consumer.weight.detach()).clone()
    copies = duplicate_units_(cnn, layer, units)
    assert torch.equal(hidden.weight[copies], weight[units]) and torch.equal(hidden.bias[copies], bias[units])
    assert torch.equal(consumer.by_input_unit(consumer.weight)[:, copies], outgoing[:, units])
    assert_earlier_tasks_unchanged(cnn, x, before)
    cnn.check_prefix_invariant()


@FAST
@given(configured=cnn_configs(), data=st.data())
def test_pruning_the_newest_filters_leaves_earlier_tasks_as_they_were(configured, data):
    cnn, generator, x = with_history(data, *configured)
    add_units_(cnn, [2] * len(cnn.hidden), generator)
    perturb_(cnn, generator)
    before = outputs_by_task(cnn, x, earlier_tasks(cnn))
    layer = data.draw(st.integers(0, len(cnn.hidden) - 1), label="layer")
    hidden, consumer = cnn.hidden[layer], cnn.consumer(layer)
    units = draw_prunable(data, cnn, layer)
    keep = [u for u in range(hidden.out_features) if u not in units]
    weight, outgoing = hidden.weight.detach().clone(), consumer.by_input_unit(consumer.weight.detach()).clone()
    prune_units_(cnn, layer, units)
    assert torch.equal(hidden.weight, weight[keep])
    assert torch.equal(consumer.by_input_unit(consumer.weight), outgoing[:, keep])
    assert_earlier_tasks_unchanged(cnn, x, before)
    cnn.check_prefix_invariant()


@FAST
@given(configured=cnn_configs(), data=st.data())
def test_split_then_restore_gives_earlier_tasks_back_bit_for_bit(configured, data):
    cnn, generator, x = with_history(data, *configured)
    if cnn.num_tasks < MAX_TASKS:
        cnn.add_task_()
    reference = snapshot(cnn)
    before = outputs_by_task(cnn, x, earlier_tasks(cnn))
    add_units_(cnn, draw_counts(data, cnn), generator)  # growth below: restored filters read it through zeros
    layer = data.draw(st.integers(0, len(cnn.hidden) - 1), label="layer")
    hidden = cnn.hidden[layer]
    units = draw_units(data, old_units(cnn, layer))
    with torch.no_grad():  # selective retraining moves these old units
        hidden.weight[units] += torch.randn(hidden.weight[units].shape, generator=generator)
        hidden.bias[units] += 1.0
    assert set(units) <= set(units_to_split(unit_drift(cnn, layer, reference), threshold=0.0))
    drifted = hidden.weight[units].detach().clone()
    copies = duplicate_units_(cnn, layer, units)
    restore_units_(cnn, layer, units, reference)
    assert torch.equal(hidden.weight[copies], drifted)
    old = reference[f"hidden.{layer}.weight"]
    assert torch.equal(hidden.weight[units][:, : old.shape[1]], old[units])
    assert not hidden.weight[units][:, old.shape[1] :].any()  # inputs born since: zero
    assert_earlier_tasks_unchanged(cnn, x, before)
    cnn.check_prefix_invariant()


@FAST
@given(configured=cnn_configs(), data=st.data())
def test_dead_new_filters_are_found_and_pruning_them_keeps_the_newest_task(configured, data):
    cnn, generator, x = with_history(data, *configured)
    starts = add_units_(cnn, [2] * len(cnn.hidden), generator)
    layer = data.draw(st.integers(0, len(cnn.hidden) - 1), label="layer")
    with torch.no_grad():  # group lasso zeroed the first new unit of the layer: kernels and bias
        cnn.hidden[layer].weight[starts[layer]] = 0.0
        cnn.hidden[layer].bias[starts[layer]] = 0.0
    assert dead_new_units(cnn, layer) == [starts[layer]]
    before = outputs_by_task(cnn, x, range(cnn.num_tasks))
    prune_units_(cnn, layer, [starts[layer]])
    assert_earlier_tasks_unchanged(cnn, x, {t: before[t] for t in earlier_tasks(cnn)})
    with torch.no_grad():
        torch.testing.assert_close(cnn(x, task=cnn.newest_task), before[cnn.newest_task], rtol=1e-5, atol=1e-5)


def small_cnn() -> ExpandableCNN:
    torch.manual_seed(0)
    return ExpandableCNN.lenet((1, 12, 12), channels=[3, 4], hidden_sizes=[5], head_classes=2, kernel_size=3, padding=1)


def test_expansion_trains_whole_kernels_of_new_filters_and_the_flattened_positions_of_new_channels():
    cnn = small_cnn()
    cnn.add_task_()
    add_units_(cnn, [2, 1, 1], torch.Generator().manual_seed(1))
    entries = trainable_entries(cnn, DENPhase.EXPANSION)
    conv, second, linear = cnn.hidden
    assert entries["hidden.0.weight"].shape == conv.weight.shape
    assert entries["hidden.0.weight"][3:].all() and not entries["hidden.0.weight"][:3].any()
    # the second convolution trains its new filter, and the old filters' kernel slices over the new channels
    trained = entries["hidden.1.weight"]
    assert trained[4:].all() and trained[:4, 3:].all() and not trained[:4, :3].any()
    # the first Linear layer reads the 9 positions of each channel: the new channel's 9 columns train
    positions = linear.input_group
    assert positions == 9 and linear.in_units == 5
    assert entries["hidden.2.weight"][:5, 4 * positions :].all() and not entries["hidden.2.weight"][:5, :36].any()
    separate_trained_entries_(cnn, entries)
    assert all(layer.separated for layer in cnn.hidden)
    assert tuple(second.new_unit_weight.shape) == (1, 5, 3, 3)
    assert tuple(second.old_unit_new_inputs.shape) == (4, 2, 3, 3)
    assert tuple(linear.old_unit_new_inputs.shape) == (5, 9)


def test_selection_follows_nonzero_kernels_down_to_the_input_channels():
    cnn = small_cnn()
    _, second, linear = cnn.hidden
    with torch.no_grad():
        cnn.heads["0"].weight[:, 1:] = 0.0  # the head reads unit 0 only
        linear.weight[0] = 0.0
        linear.by_input_unit(linear.weight)[0, 2, 4] = 1.0  # unit 0 reads channel 2 of the last convolution
        second.weight[2] = 0.0
        second.weight[2, 1, 0, 0] = 1.0  # filter 2 reads channel 1 of the first convolution
    assert select_subnetwork(cnn, 0) == [[0], [1], [2], [0]]


def test_inputs_of_another_image_shape_are_refused_and_flattened_rows_accepted():
    cnn = small_cnn()
    images = torch.randn(2, 1, 12, 12)
    assert torch.equal(cnn(images, task=0), cnn(images.flatten(1), task=0))
    with pytest.raises(ValueError, match=r"expected images of shape \[batch, 1, 12, 12\] or rows of \[batch, 144\]"):
        cnn(torch.randn(2, 1, 5, 5), task=0)


def test_a_checkpoint_of_another_image_shape_is_refused_naming_both():
    saved = small_cnn()
    other = ExpandableCNN.lenet((1, 8, 8), channels=[3, 4], hidden_sizes=[5], head_classes=2, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match=r"reads images of shape \[1, 12, 12\], this one \[1, 8, 8\]"):
        other.load_state_dict(saved.state_dict())


def test_too_many_convolutions_for_the_image_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"a \[1, 8, 8\] image has no positions left after the convolutions"):
        ExpandableCNN.lenet((1, 8, 8), channels=[2, 2, 2], hidden_sizes=[4], head_classes=2, kernel_size=3, pool=2)


def test_selective_retraining_trains_the_selected_filters_kernels_on_selected_channels_and_their_positions():
    cnn = small_cnn()  # 1 -> 3 -> 4 filters, 9 positions per channel into 5 units
    cnn.add_task_()
    selection = [[0], [0, 2], [1, 3], [4]]  # input channel, filters of each convolution, units
    entries = trainable_entries(cnn, DENPhase.SELECTIVE, selection)
    conv, second, linear = cnn.hidden
    expected_second = torch.zeros(second.weight.shape, dtype=torch.bool)
    for row in (1, 3):
        for column in (0, 2):
            expected_second[row, column] = True  # the whole 3x3 kernel slice
    assert torch.equal(entries["hidden.1.weight"], expected_second)
    assert torch.equal(entries["hidden.1.bias"], torch.tensor([False, True, False, True]))
    expected_linear = torch.zeros(linear.weight.shape, dtype=torch.bool)
    for channel in (1, 3):  # unit 4 reads the 9 positions of each selected channel
        expected_linear[4, channel * 9 : (channel + 1) * 9] = True
    assert torch.equal(entries["hidden.2.weight"], expected_linear)
    expected_first = torch.zeros(conv.weight.shape, dtype=torch.bool)
    expected_first[[0, 2], 0] = True
    assert torch.equal(entries["hidden.0.weight"], expected_first)


def test_unit_drift_of_a_filter_is_the_norm_of_its_whole_kernel_change():
    cnn = small_cnn()
    reference = snapshot(cnn)
    with torch.no_grad():
        cnn.hidden[1].weight[2, 1, 0, 0] += 3.0
        cnn.hidden[1].weight[2, 2, 2, 1] -= 4.0
    assert unit_drift(cnn, 1, reference).tolist() == [0.0, 0.0, 5.0, 0.0]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_lasso_shrinks_whole_filters_in_any_memory_layout(layout):
    from lightning_den.core.den.prox import group_lasso_prox_

    filters = torch.zeros(2, 2, 3, 3)
    filters[0, 0, 0, 0], filters[0, 1, 2, 2] = 3.0, 4.0  # norm 5
    filters[1, 1, 1, 1] = 0.5  # norm 0.5: below the threshold, zeroed whole
    if layout == "channels_last":
        filters = filters.to(memory_format=torch.channels_last)
    bias = torch.zeros(2)
    group_lasso_prox_([filters], 1.0, [bias])
    assert filters[0, 0, 0, 0].item() == pytest.approx(2.4) and filters[0, 1, 2, 2].item() == pytest.approx(3.2)
    assert not filters[1].any()
