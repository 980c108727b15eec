"""Tests of :mod:`lightning_den.core.den.phases`: the phase state machine and what each phase trains."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_den.core.den.entries import trainable_entries
from lightning_den.core.den.layers import ExpandableMLP
from lightning_den.core.den.method import DENMethod
from lightning_den.core.den.phases import DENPhase, PhaseEpochs, next_phase, threshold_out_of_reach
from lightning_den.core.den.surgery import add_units_, duplicate_units_
from lightning_den.core.method import PhaseProgress, phase_is_done
from tests.core.helpers import as_mask, random_mlp

BUDGET = PhaseEpochs(sparse=7, head_fit=3, selective=4, expansion=5, split=6)


# --- phase order ---


@pytest.mark.parametrize(
    ("task", "phase", "mean_loss", "expected"),
    [
        (0, "sparse", 1.0, (1, "head_fit")),
        (1, "head_fit", 1.0, (1, "selective")),
        (1, "selective", 0.5, (1, "expansion")),  # loss above tau: expand
        (1, "selective", 0.1, (1, "split")),  # loss equal to tau: not above, no expansion
        (1, "selective", 0.05, (1, "split")),
        (1, "expansion", 0.5, (1, "split")),
        (1, "split", 0.5, (2, "head_fit")),
        (2, "split", 0.5, None),  # last of three tasks
    ],
)
def test_next_phase(task, phase, mean_loss, expected):
    following = next_phase(PhaseProgress(task=task, phase=phase, epochs=3, last_loss=0.7), mean_loss, 0.1, 3)
    if expected is None:
        assert following is None
    else:
        assert (following.task, following.phase) == expected
        assert following.epochs == 0 and math.isinf(following.last_loss)


def test_a_single_task_ends_after_the_sparse_phase():
    assert next_phase(PhaseProgress(task=0, phase="sparse"), 1.0, 0.1, num_tasks=1) is None


def test_walking_the_phases_visits_every_task_in_order():
    progress, visited = PhaseProgress(phase=DENPhase.SPARSE), []
    while progress is not None:
        visited.append((progress.task, progress.phase))
        loss = 1.0 if progress.task == 1 else 0.0  # task 1 expands, task 2 does not
        progress = next_phase(progress, loss, 0.5, num_tasks=3)
    assert visited == [
        (0, "sparse"),
        (1, "head_fit"), (1, "selective"), (1, "expansion"), (1, "split"),
        (2, "head_fit"), (2, "selective"), (2, "split"),
    ]  # fmt: skip


# --- when a phase ends ---


@pytest.mark.parametrize("phase", [p.value for p in DENPhase])
def test_phase_is_done_when_its_epoch_budget_is_used(phase):
    budget = BUDGET.of(DENPhase(phase))
    # loss still moving a lot, so only the budget can end the phase
    assert not phase_is_done(PhaseProgress(phase=phase, epochs=budget - 1, last_loss=10.0), budget, 1.0, 1e-3)
    assert phase_is_done(PhaseProgress(phase=phase, epochs=budget, last_loss=10.0), budget, 1.0, 1e-3)
    assert phase_is_done(PhaseProgress(phase=phase, epochs=budget + 1), budget, 1.0, 0.0)


@pytest.mark.parametrize(
    ("last_loss", "mean_loss", "tolerance", "done"),
    [
        (1.0, 0.9995, 1e-3, True),  # relative change 5e-4 < 1e-3
        (1.0, 1.0005, 1e-3, True),  # in either direction
        (1.0, 0.99, 1e-3, False),  # still improving
        (1.0, 1.01, 1e-3, False),  # getting worse
        (2.0, 1.9, 0.1, True),  # 0.1 < 0.1 * 2.0: relative to the previous loss
        (1.0, 1.0, 0.0, False),  # tolerance 0: only the budget ends the phase
        (math.inf, 1.0, 1e-3, False),  # first epoch: nothing to compare with
    ],
)
def test_phase_is_done_when_the_loss_levels_off(last_loss, mean_loss, tolerance, done):
    progress = PhaseProgress(task=1, phase="selective", epochs=1, last_loss=last_loss)
    assert phase_is_done(progress, BUDGET.of(DENPhase(progress.phase)), mean_loss, tolerance) is done


@pytest.mark.parametrize(
    ("last_loss", "mean_loss", "epochs_left", "out_of_reach"),
    [
        (1.0, 0.9, 10, True),  # 0.9 * 0.9**10 = 0.314 > 0.3
        (1.0, 0.9, 12, False),  # 0.9 * 0.9**12 = 0.254: reachable within the phase
        (1.0, 1.2, 100, True),  # rising: projected to stay at 1.2
        (0.2, 0.2, 100, False),  # level below the threshold
        (0.5, 0.25, 0, False),  # no epochs left: the phase ends by its budget, not early
        (math.inf, 0.9, 10, False),  # first epoch: no rate yet
        (math.nan, 0.9, 10, False),  # after a resume from weights only: no rate yet
        (1.0, 0.3, 10, False),  # at the threshold: nothing to expand for
        (1.0, -0.1, 3, False),  # a negative loss (a subclass's own) is below any threshold
        (0.0, 0.5, 10, False),  # from a zero loss: no rate
    ],
)
def test_threshold_out_of_reach_projects_the_latest_rate_over_the_epochs_left(
    last_loss, mean_loss, epochs_left, out_of_reach
):
    assert threshold_out_of_reach(last_loss, mean_loss, epochs_left, loss_threshold=0.3) is out_of_reach


@pytest.mark.parametrize(
    ("settings", "phase", "ends"),
    [
        ({"early_expansion": True}, "selective", True),
        ({"early_expansion": True}, "expansion", False),  # only selective retraining decides on the threshold
        ({"early_expansion": True}, "split", False),
        ({}, "selective", False),  # off by default: the paper's schedule
        ({"early_expansion": True, "expansion": False}, "selective", False),  # DNN-Selective: nothing to decide
    ],
)
def test_only_selective_retraining_that_would_expand_ends_early(settings, phase, ends):
    method = DENMethod(loss_threshold=0.1, selective_epochs=20, expansion_epochs=20, split_epochs=20, **settings)
    progress = PhaseProgress(task=1, phase=DENPhase(phase), epochs=2, last_loss=1.60)
    assert method.phase_done(progress, 1.56, 0.0) is ends  # 1.56 * 0.975**18 = 0.99, far above 0.1
    assert not method.phase_done(progress, 0.8, 0.0)  # halving per epoch: 0.8 * 0.5**18 is below 0.1


@pytest.mark.parametrize("phase", list(DENPhase))
def test_every_phase_but_expansion_ends_once_its_loss_levels_off(phase):
    """The group lasso prunes on while expansion's loss stays level: only its epoch budget ends it."""
    method = DENMethod(**dict.fromkeys(PhaseEpochs.ARGUMENTS, 10))
    level = PhaseProgress(task=1, phase=phase, epochs=3, last_loss=0.5)
    assert method.phase_done(level, 0.5004, 1e-3) is (phase is not DENPhase.EXPANSION)
    assert not method.phase_done(level, 0.4, 1e-3)  # still falling: no phase ends
    assert method.phase_done(PhaseProgress(task=1, phase=phase, epochs=10, last_loss=0.5), 0.4, 1e-3)


def test_phase_epochs_total():
    assert BUDGET.total(1) == 7
    assert BUDGET.total(3) == 7 + 2 * (3 + 4 + 5 + 6)


def test_phase_progress_state_dict_is_plain_data():
    state = PhaseProgress(task=2, phase="split", epochs=4, last_loss=0.5).state_dict()
    assert state == {"task": 2, "phase": "split", "epochs": 4, "last_loss": 0.5}
    assert PhaseProgress(**state) == PhaseProgress(task=2, phase="split", epochs=4, last_loss=0.5)


# --- what each phase trains ---


def two_task_network() -> ExpandableMLP:
    """Task 0: in=4, hidden [3, 2]. Task 1 (newest): +2 units in layer 0 (rows 3, 4), +1 in layer 1 (row 2)."""
    mlp = random_mlp(4, [3, 2], head_classes=[2, 3], seed=0)
    mlp.add_task_()
    add_units_(mlp, [2, 1], torch.Generator().manual_seed(0))
    return mlp


def masks_of(mlp: ExpandableMLP, phase: DENPhase, selection=None) -> dict[str, torch.Tensor]:
    entries = trainable_entries(mlp, phase, selection)
    parameters = dict(mlp.named_parameters())
    assert sorted(entries) == sorted(parameters), "one entry per parameter, named as the parameter"
    return {name: as_mask(value, parameters[name].shape) for name, value in entries.items()}


@pytest.mark.parametrize("phase", list(DENPhase))
def test_earlier_heads_are_always_frozen_and_the_newest_head_bias_trains(phase):
    mlp = two_task_network()
    masks = masks_of(mlp, phase, selection=[[0], [0], [0]])
    assert not masks["heads.0.weight"].any() and not masks["heads.0.bias"].any()
    assert masks["heads.1.bias"].all()


@pytest.mark.parametrize("phase", [DENPhase.SPARSE, DENPhase.SPLIT])
def test_sparse_and_split_train_every_hidden_entry(phase):
    masks = masks_of(two_task_network(), phase)
    assert all(masks[name].all() for name in masks if name.startswith("hidden.") or name.startswith("heads.1."))


def test_head_fit_freezes_the_hidden_layers():
    masks = masks_of(two_task_network(), DENPhase.HEAD_FIT)
    assert not any(masks[name].any() for name in masks if name.startswith("hidden."))
    assert masks["heads.1.weight"].all()


def test_expansion_trains_new_units_and_inputs_from_new_lower_units():
    mlp = two_task_network()
    masks = masks_of(mlp, DENPhase.EXPANSION)
    # layer 0 (5 x 4): rows 3 and 4 are new; its inputs are the data, never new
    expected0 = torch.zeros(5, 4, dtype=torch.bool)
    expected0[3:] = True
    # layer 1 (3 x 5): row 2 is new; columns 3 and 4 come from the new units of layer 0
    expected1 = torch.zeros(3, 5, dtype=torch.bool)
    expected1[2] = True
    expected1[:, 3:] = True
    assert torch.equal(masks["hidden.0.weight"], expected0)
    assert torch.equal(masks["hidden.0.bias"], torch.tensor([False, False, False, True, True]))
    assert torch.equal(masks["hidden.1.weight"], expected1)
    assert torch.equal(masks["hidden.1.bias"], torch.tensor([False, False, True]))


def test_expansion_counts_duplicated_units_as_new():
    mlp = two_task_network()
    duplicate_units_(mlp, 1, [0])  # layer 1 row 3 is a copy born in task 1
    masks = masks_of(mlp, DENPhase.EXPANSION)
    assert torch.equal(masks["hidden.1.bias"], torch.tensor([False, False, True, True]))


def test_expansion_in_four_layers():
    mlp = random_mlp(3, [2, 2, 2, 2], head_classes=1, seed=1)
    mlp.add_task_()
    add_units_(mlp, [1, 0, 1, 0], torch.Generator().manual_seed(1))
    masks = masks_of(mlp, DENPhase.EXPANSION)
    assert not masks["hidden.1.weight"][:, :2].any() and masks["hidden.1.weight"][:, 2].all()
    assert not masks["hidden.1.bias"].any()
    assert masks["hidden.2.weight"][2].all() and not masks["hidden.2.weight"][:2].any()
    assert not masks["hidden.3.weight"][:, :2].any() and masks["hidden.3.weight"][:, 2].all()


def test_selective_trains_the_selected_subnetwork_only():
    mlp = two_task_network()
    selection = [[0, 2], [1, 4], [0]]  # inputs, layer 0 units, layer 1 units
    masks = masks_of(mlp, DENPhase.SELECTIVE, selection)
    rows0 = torch.tensor([False, True, False, False, True])
    cols0 = torch.tensor([True, False, True, False])
    rows1 = torch.tensor([True, False, False])
    assert torch.equal(masks["hidden.0.weight"], torch.outer(rows0, cols0))
    assert torch.equal(masks["hidden.0.bias"], rows0)
    assert torch.equal(masks["hidden.1.weight"], torch.outer(rows1, rows0))
    assert torch.equal(masks["hidden.1.bias"], rows1)
    # the new head trains only its weights from the selected top units, for every output
    expected_head = torch.zeros(3, 3, dtype=torch.bool)
    expected_head[:, 0] = True
    assert torch.equal(masks["heads.1.weight"], expected_head)


def test_selective_needs_a_selection():
    with pytest.raises(ValueError, match="needs the BFS selection"):
        trainable_entries(two_task_network(), DENPhase.SELECTIVE)


@given(
    last_loss=st.floats(-10, 10, allow_nan=False),
    mean_loss=st.floats(-10, 10, allow_nan=False),
    epochs_left=st.integers(0, 30),
    loss_threshold=st.floats(0, 2),
)
def test_ending_selective_retraining_early_always_leads_to_expansion(last_loss, mean_loss, epochs_left, loss_threshold):
    progress = PhaseProgress(task=1, phase=DENPhase.SELECTIVE, epochs=3, last_loss=last_loss)
    if threshold_out_of_reach(last_loss, mean_loss, epochs_left, loss_threshold):
        assert next_phase(progress, mean_loss, loss_threshold, num_tasks=3).phase is DENPhase.EXPANSION
