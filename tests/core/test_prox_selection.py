"""Tests of :mod:`lightning_den.core.den.prox` and :mod:`lightning_den.core.den.selection`.

Proximal steps must give exact zeros (selection and pruning test ``== 0``); selection must follow every
output of the head (bug B2) and nonzero (not positive) weights; drift must count only what existed in
the snapshot, and splitting must take the most drifted units first (bug B4).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_den.core.den.layers import ExpandableMLP
from lightning_den.core.den.prox import add_drift_penalty_grad_, group_lasso_prox_, l1_prox_
from lightning_den.core.den.selection import (
    dead_new_units,
    select_subnetwork,
    selection_report,
    unit_drift,
    units_to_split,
)
from lightning_den.core.den.surgery import add_units_, prune_units_, snapshot
from tests.core.helpers import FAST, mlp_configs, outputs_by_task, random_inputs, random_mlp

float32s = st.floats(-4.0, 4.0, width=32, allow_subnormal=False)
thresholds = st.floats(2.0**-10, 2.0, width=32, allow_subnormal=False)


# --- proximal steps ---


def soft_threshold(value: float, threshold: float) -> float:
    """``sign(v) * max(|v| - t, 0)`` in float64; rounding it to float32 is float32's correctly rounded result."""
    return math.copysign(max(abs(value) - threshold, 0.0), value)


@FAST
@given(values=st.lists(float32s, min_size=1, max_size=24), threshold=thresholds)
def test_l1_prox_soft_thresholds_every_entry_exactly(values, threshold):
    values = [*values, threshold, -threshold]  # entries exactly at the threshold must become zero
    flat = torch.tensor(values, dtype=torch.float32)
    matrix = flat.flip(0)[: (len(values) // 2) * 2].reshape(2, -1).clone()  # a second, 2-D tensor
    originals = [flat.clone(), matrix.clone()]
    l1_prox_([flat, matrix], threshold)
    for tensor, original in zip((flat, matrix), originals, strict=True):
        expected = torch.tensor([soft_threshold(v, threshold) for v in original.flatten().tolist()])
        assert torch.equal(tensor.flatten(), expected)
        assert not tensor[original.abs() <= threshold].any()
        shrunk = original.abs() > threshold
        assert torch.equal(tensor[shrunk].abs(), original[shrunk].abs() - threshold)
        assert torch.equal(tensor[shrunk].sign(), original[shrunk].sign())


def test_l1_prox_writes_through_a_strided_view_and_nowhere_else():
    weight = torch.linspace(-1.0, 1.0, 24).reshape(4, 6)
    original = weight.clone()
    l1_prox_([weight[:, 2:]], 0.5)  # a column block: not contiguous
    assert torch.equal(weight[:, :2], original[:, :2])
    expected = torch.tensor([[soft_threshold(v, 0.5) for v in row] for row in original[:, 2:].tolist()])
    assert torch.equal(weight[:, 2:], expected)


def test_l1_prox_with_a_non_positive_threshold_does_nothing():
    w = torch.tensor([0.5, -0.25, 0.0])
    l1_prox_([w], 0.0)
    l1_prox_([w], -1.0)
    assert torch.equal(w, torch.tensor([0.5, -0.25, 0.0]))


@FAST
@given(
    rows=st.lists(st.lists(float32s, min_size=3, max_size=3), min_size=1, max_size=6),
    threshold=st.floats(0.125, 4.0, width=32),
)
def test_group_lasso_prox_zeroes_small_rows_and_shrinks_the_others(rows, threshold):
    original = torch.tensor(rows, dtype=torch.float32)
    weight = original.clone()
    group_lasso_prox_([weight], threshold)
    for actual, row in zip(weight, original, strict=True):
        norm = math.sqrt(sum(v * v for v in row.tolist()))
        if norm <= threshold * (1 - 1e-4):
            assert not actual.any(), f"row of norm {norm} <= {threshold} must be zeroed"
        elif norm >= threshold * (1 + 1e-4):
            expected = torch.tensor([v * (1 - threshold / norm) for v in row.tolist()])
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * norm)
            assert actual.any()


def test_group_lasso_prox_on_views_and_at_the_boundary():
    # Rows 0-1 are old units, outside the view: untouched. Row 2 has norm exactly 5 == threshold: zero.
    # Row 3 has norm 10: scaled by 1 - 5/10. Row 4 is already zero: stays zero (no NaN).
    weight = torch.tensor([[0.1, 0.0], [9.0, 9.0], [3.0, 4.0], [6.0, 8.0], [0.0, 0.0]])
    old = weight[:2].clone()
    group_lasso_prox_([weight[2:]], 5.0)
    assert torch.equal(weight[:2], old)
    assert torch.equal(weight[2:], torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]))


def test_group_lasso_prox_with_a_non_positive_threshold_or_empty_rows_does_nothing():
    weight = torch.tensor([[0.01, 0.02]])
    group_lasso_prox_([weight], 0.0)
    group_lasso_prox_([weight[1:]], 1.0)
    assert torch.equal(weight, torch.tensor([[0.01, 0.02]]))


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.5])
def test_drift_penalty_adds_twice_strength_times_the_difference(strength):
    # Multiples of 1/8 below 2**10: every step below is exact in float32, so equality is exact.
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randint(-64, 64, shape, generator=generator) / 8.0 for shape in [(3, 4), (5,)]]
    params = [torch.randint(-64, 64, g.shape, generator=generator) / 8.0 for g in grads]
    references = [torch.randint(-64, 64, g.shape, generator=generator) / 8.0 for g in grads]
    kept = [[t.clone() for t in ts] for ts in (grads, params, references)]
    with_scratch = [g.clone() for g in grads]
    add_drift_penalty_grad_(grads, params, references, strength)
    add_drift_penalty_grad_(with_scratch, params, references, strength, scratch=[torch.empty_like(w) for w in params])
    assert all(torch.equal(a, b) for a, b in zip(grads, with_scratch, strict=True))
    for grad, g0, w, ref in zip(grads, kept[0], kept[1], kept[2], strict=True):
        expected = torch.tensor(
            [gv + 2 * strength * (wv - rv) for gv, wv, rv in zip(g0.flatten(), w.flatten(), ref.flatten(), strict=True)]
        ).reshape(grad.shape)
        assert torch.equal(grad, expected)
    for now, before in zip([*params, *references], [*kept[1], *kept[2]], strict=True):
        assert torch.equal(now, before)


def test_drift_penalty_with_zero_strength_does_nothing():
    grad = torch.tensor([1.0, 2.0])
    add_drift_penalty_grad_([grad], [torch.tensor([5.0, 5.0])], [torch.tensor([0.0, 0.0])], 0.0)
    assert torch.equal(grad, torch.tensor([1.0, 2.0]))


# --- dead new units ---


def test_dead_new_units_are_exactly_the_silent_newest_units_and_pruning_them_changes_no_output():
    mlp = random_mlp(3, [4, 3], head_classes=2, seed=0)
    mlp.add_task_()
    add_units_(mlp, [3, 2], torch.Generator().manual_seed(0))  # layer 0: new 4, 5, 6; layer 1: new 3, 4
    with torch.no_grad():
        mlp.hidden[0].weight[1] = 0.0  # old unit with a zero row: not "dead new"
        mlp.hidden[0].weight[4] = 0.0  # dead: zero weights, negative bias -> outputs relu(-0.5) = 0
        mlp.hidden[0].bias[4] = -0.5
        mlp.hidden[0].weight[5] = torch.tensor([0.0, -1e-30, 0.0])  # alive (tiny but nonzero)
        mlp.hidden[0].weight[6] = 0.0  # dead: zero weights and zero bias
        mlp.hidden[0].bias[6] = 0.0
        mlp.hidden[1].weight[3] = 0.0  # alive: zero weights but a positive bias, a constant unit
        mlp.hidden[1].bias[3] = 1.0
        mlp.hidden[1].weight[4] = 0.0  # dead
        mlp.hidden[1].bias[4] = 0.0
    assert dead_new_units(mlp, 0) == [4, 6]
    assert dead_new_units(mlp, 1) == [4]

    x = random_inputs(mlp)
    before = outputs_by_task(mlp, x, [0, 1])
    weight0, bias0 = mlp.hidden[0].weight.detach().clone(), mlp.hidden[0].bias.detach().clone()
    weight1 = mlp.hidden[1].weight.detach().clone()
    prune_units_(mlp, 0, dead_new_units(mlp, 0))
    keep = [0, 1, 2, 3, 5]
    assert mlp.hidden[0].birth.tolist() == [0, 0, 0, 0, 1]
    assert torch.equal(mlp.hidden[0].weight, weight0[keep])
    assert torch.equal(mlp.hidden[0].bias, bias0[keep])
    assert torch.equal(mlp.hidden[1].weight, weight1[:, keep])
    assert dead_new_units(mlp, 0) == []
    with torch.no_grad():
        assert torch.equal(mlp(x, task=0), before[0])
        # the newest task too: the removed units contributed exactly zero (up to the last bit of a
        # narrower matmul, see test_add_units_preserves_every_task_including_the_newest)
        torch.testing.assert_close(mlp(x, task=1), before[1], rtol=0, atol=1e-6)


# --- breadth-first selection (Alg. 2) ---


def hand_made_network() -> ExpandableMLP:
    """in=4, hidden [3, 2], a head with 2 outputs; every zero below is exact.

    head (2 x 2):  out0 <- h1u0 (2.0)        out1 <- h1u1 (0.5)      [h1u1 is reached only via output 1]
    hidden 1 (2 x 3):  h1u0 <- h0u1 (-1.5)   h1u1 <- h0u0 (0.25)     [h0u2 is read by nobody]
    hidden 0 (3 x 4):  h0u0 <- x2 (-3.0)     h0u1 <- x1 (1.0)        h0u2 <- x0 (7.0)   [x3 is read by nobody]

    BFS from both outputs: top {h1u0, h1u1}; below them {h0u1, h0u0}; their inputs {x1, x2}.
    Expected [[1, 2], [0, 1], [0, 1]].
      - With output 0 only (bug B2): [[1], [1], [0]].
      - Counting only positive weights: top {0, 1}, then {h0u0} (h1u0's only link is negative),
        then {} (h0u0's only link is negative): [[], [0], [0, 1]].
    """
    mlp = ExpandableMLP(4, [3, 2], head_classes=2)
    with torch.no_grad():
        mlp.hidden[0].weight.copy_(torch.tensor([[0.0, 0.0, -3.0, 0.0], [0.0, 1.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0]]))
        mlp.hidden[1].weight.copy_(torch.tensor([[0.0, -1.5, 0.0], [0.25, 0.0, 0.0]]))
        mlp.heads["0"].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
        for layer in (*mlp.hidden, mlp.heads["0"]):
            layer.bias.fill_(1.0)  # biases play no part in the search
    return mlp


def test_select_subnetwork_follows_all_outputs_and_negative_weights():
    assert select_subnetwork(hand_made_network(), 0) == [[1, 2], [0, 1], [0, 1]]


def test_select_subnetwork_of_a_new_task_reads_only_its_head_and_the_whole_width():
    # Task 1's head reads only h1u1 (through output 1); a new unit h0u3 (born in task 1) feeds h1u1.
    # Task 1: top {1}; below {0, 3}; inputs {2, 3}   (h0u0 <- x2, h0u3 <- x3).
    # Task 0 is unchanged by the growth: it cannot see h0u3.
    mlp = hand_made_network()
    mlp.add_task_()
    add_units_(mlp, [1, 0], torch.Generator().manual_seed(0))
    with torch.no_grad():
        mlp.hidden[0].weight[3] = torch.tensor([0.0, 0.0, 0.0, -0.5])
        mlp.hidden[1].weight[:, 3] = torch.tensor([0.0, 4.0])
        mlp.heads["1"].weight.copy_(torch.tensor([[0.0, 0.0], [0.0, -1.0]]))
    assert select_subnetwork(mlp, 1) == [[2, 3], [0, 3], [1]]
    assert select_subnetwork(mlp, 0) == [[1, 2], [0, 1], [0, 1]]


def test_select_subnetwork_with_a_zero_head_selects_nothing():
    mlp = hand_made_network()
    with torch.no_grad():
        mlp.heads["0"].weight.zero_()
    assert select_subnetwork(mlp, 0) == [[], [], []]


@FAST
@given(config=mlp_configs(), budget=st.floats(0.01, 1.0), sparsity=st.floats(0.0, 0.9))
def test_a_selection_budget_caps_each_layer_and_keeps_the_strongest_of_what_bfs_reaches(config, budget, sparsity):
    in_features, hidden, classes, seed = config
    mlp = random_mlp(in_features, hidden, classes, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # exact zeros, as L1 leaves them
        for layer in (*mlp.hidden, mlp.heads["0"]):
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=generator) >= sparsity)
    free, capped = select_subnetwork(mlp, 0), select_subnetwork(mlp, 0, budget=budget)
    for layer, width in enumerate(hidden):
        assert set(capped[layer + 1]) <= set(free[layer + 1])  # never beyond the paper's BFS
        assert len(capped[layer + 1]) <= max(1, math.floor(budget * width + 1e-9))
    assert set(capped[0]) <= set(free[0])
    assert select_subnetwork(mlp, 0, budget=1.0) == free
    # the top layer keeps the units most strongly connected to the head: none left out is stronger
    strength = mlp.heads["0"].weight.detach().abs().sum(dim=0)
    kept, dropped = capped[-1], sorted(set(free[-1]) - set(capped[-1]))
    if kept and dropped:
        assert float(strength[dropped].max()) <= float(strength[kept].min())


@pytest.mark.parametrize(("budget", "width", "cap"), [(0.29, 100, 29), (0.57, 100, 57), (0.58, 50, 29), (0.5, 5, 2)])
def test_the_budget_cap_is_the_floor_of_budget_times_width_at_least_one(budget, width, cap):
    mlp = ExpandableMLP(2, [width], head_classes=1)
    with torch.no_grad():
        mlp.heads["0"].weight.fill_(1.0)  # every unit reached
    assert len(select_subnetwork(mlp, 0, budget=budget)[1]) == cap
    assert len(select_subnetwork(mlp, 0, budget=0.001)[1]) == 1


def test_the_selection_report_counts_units_inputs_and_exact_zeros():
    mlp = hand_made_network()
    selection = select_subnetwork(mlp, 0)
    report = selection_report(mlp, 0, selection)
    widths = mlp.widths(0)
    assert report["selected_fraction"] == [len(selection[i + 1]) / widths[i] for i in range(len(widths))]
    assert report["selected_inputs"] == len(selection[0]) / mlp.in_features
    for layer, zeros in zip(mlp.hidden, report["zero_fraction"], strict=True):
        assert zeros == int((layer.weight == 0).sum()) / layer.weight.numel()
    head = mlp.heads["0"].weight
    assert report["head_zero_fraction"] == int((head == 0).sum()) / head.numel()


# --- drift and splitting (Alg. 4) ---


def test_unit_drift_is_the_l2_distance_over_the_snapshot_entries():
    mlp = random_mlp(3, [4, 3], head_classes=2, seed=5)
    mlp.add_task_()
    reference = snapshot(mlp)
    add_units_(mlp, [2, 1], torch.Generator().manual_seed(5))  # layer 1 grows rows and columns
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        mlp.hidden[1].weight.add_(torch.randn(mlp.hidden[1].weight.shape, generator=generator))
    drift = unit_drift(mlp, 1, reference)
    old, now = reference["hidden.1.weight"].tolist(), mlp.hidden[1].weight.tolist()
    expected = [math.sqrt(sum((now[i][j] - old[i][j]) ** 2 for j in range(4))) for i in range(3)]
    assert drift.shape == (3,)
    torch.testing.assert_close(drift, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_unit_drift_ignores_new_rows_new_columns_and_biases():
    mlp = random_mlp(3, [4, 3], head_classes=2, seed=7)
    mlp.add_task_()
    reference = snapshot(mlp)
    add_units_(mlp, [2, 1], torch.Generator().manual_seed(7))
    with torch.no_grad():
        mlp.hidden[1].weight[3:] += 1.0  # new unit's row
        mlp.hidden[1].weight[:, 4:] += 1.0  # inputs from the new lower units
        mlp.hidden[1].bias += 1.0
    assert torch.equal(unit_drift(mlp, 1, reference), torch.zeros(3))
    with torch.no_grad():
        mlp.hidden[1].weight[1, 0] += 2.0
    assert unit_drift(mlp, 1, reference).tolist() == [0.0, 2.0, 0.0]


def test_units_to_split_takes_the_most_drifted_first():
    drift = torch.tensor([0.3, 0.9, 0.5, 0.2, 0.7])
    assert units_to_split(drift, threshold=0.25) == [1, 4, 2, 0]
    assert units_to_split(drift, threshold=0.25, limit=2) == [1, 4]
    assert units_to_split(drift, threshold=0.5) == [1, 4]  # strictly above: 0.5 itself is not split
    assert units_to_split(drift, threshold=0.25, limit=0) == []


@FAST
@given(
    data=st.data(),
    drift=st.lists(st.floats(0.0, 10.0, width=32), min_size=0, max_size=10),
    limit=st.none() | st.integers(0, 12),
)
def test_units_to_split_property(data, drift, limit):
    threshold = data.draw(st.sampled_from(drift) if drift else st.just(1.0), label="threshold")
    candidates = [i for i, d in enumerate(drift) if d > threshold]
    expected = sorted(candidates, key=lambda i: -drift[i])  # stable: ties keep index order
    if limit is not None:
        expected = expected[:limit]
    assert units_to_split(torch.tensor(drift, dtype=torch.float32), threshold, limit) == expected


def test_group_lasso_with_biases_zeroes_a_whole_unit_and_scales_weights_and_bias_together():
    weight = torch.tensor([[3.0, 0.0], [0.03, 0.0]])
    bias = torch.tensor([4.0, 0.04])  # group norms: 5.0 and 0.05
    group_lasso_prox_([weight], 1.0, [bias])
    assert torch.equal(weight[1], torch.zeros(2)) and bias[1].item() == 0.0
    assert torch.allclose(weight[0], torch.tensor([3.0 * 0.8, 0.0])) and torch.isclose(bias[0], torch.tensor(3.2))
