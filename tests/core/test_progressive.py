"""Tests of the Progressive Networks block: zero forgetting, laterals, parameter counts, checkpoints, errors.

The central property: once a later column exists, a task's outputs are, bit for bit, what they were when
its own column was the newest, however the later columns are trained (Rusu et al., 2016).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_den.core.den.layers import mlp_parameters
from lightning_den.core.progressive.block import ProgressiveMLP
from tests.core.helpers import state_copy


def inputs(pnn: ProgressiveMLP, seed: int = 0, batch: int = 6) -> Tensor:
    return torch.randn(batch, pnn.in_features, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb_trainable_(pnn: ProgressiveMLP, generator: torch.Generator, scale: float = 0.5) -> None:
    """Add noise to every parameter that still requires grad (stands in for training the newest column)."""
    for parameter in pnn.parameters():
        if parameter.requires_grad:
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def train_newest_(pnn: ProgressiveMLP, x: Tensor, steps: int = 3) -> None:
    """A few Adam steps (with weight decay) on the newest task, the optimizer holding *all* parameters."""
    optimizer = torch.optim.Adam(pnn.parameters(), lr=0.1, weight_decay=0.1)
    task = pnn.newest_task
    for _ in range(steps):
        optimizer.zero_grad()
        pnn(x, task).square().sum().backward()
        optimizer.step()


@torch.no_grad()
def outputs(pnn: ProgressiveMLP, x: Tensor, task: int) -> Tensor:
    return pnn(x, task).detach().clone()


def grow_and_train(pnn: ProgressiveMLP, x: Tensor, columns: int, seed: int) -> dict[int, Tensor]:
    """Perturb and train each column while it is the newest, recording the outputs of its task then."""
    generator = torch.Generator().manual_seed(seed)
    recorded = {}
    for task in range(columns):
        if task > 0:
            assert pnn.add_task_(generator) == task
        perturb_trainable_(pnn, generator)
        train_newest_(pnn, x)
        recorded[task] = outputs(pnn, x, task)
    return recorded


# --- zero forgetting ---


@pytest.mark.parametrize("lateral", [True, False])
def test_outputs_of_every_task_stay_bit_identical_while_later_columns_are_trained(lateral):
    torch.manual_seed(0)
    pnn = ProgressiveMLP(5, [7, 6, 4], head_classes=[3, 2, 4, 1], lateral=lateral)
    x = inputs(pnn)
    recorded = grow_and_train(pnn, x, columns=4, seed=1)
    for task, before in recorded.items():
        assert torch.equal(outputs(pnn, x, task), before), f"task {task} changed after later columns were trained"


def test_add_task_freezes_every_earlier_column_and_an_optimizer_over_all_parameters_leaves_them_alone():
    torch.manual_seed(0)
    pnn = ProgressiveMLP(4, [6, 5], head_classes=2)
    x = inputs(pnn)
    # a persistent momentum optimizer that saw column 0 train, with gradients left over (no zero_grad)
    optimizer = torch.optim.SGD(pnn.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    pnn(x, 0).square().sum().backward()
    optimizer.step()
    pnn.add_task_(torch.Generator().manual_seed(3))
    pnn.add_task_(torch.Generator().manual_seed(4))
    for task in (0, 1):
        assert all(not p.requires_grad for p in pnn.column_parameters(task)), f"column {task} is not frozen"
        assert all(p.grad is None for p in pnn.column_parameters(task)), f"column {task} kept its gradients"
    assert all(p.requires_grad for p in pnn.column_parameters(2))
    frozen = {id(p) for task in (0, 1) for p in pnn.column_parameters(task)}
    before = state_copy(pnn)
    optimizer.add_param_group({"params": pnn.column_parameters(1) + pnn.column_parameters(2)})
    adam = torch.optim.Adam(pnn.parameters(), lr=0.1, weight_decay=0.1)
    for step in range(3):
        optimizer.zero_grad(set_to_none=step % 2 == 0)
        adam.zero_grad(set_to_none=step % 2 == 0)
        pnn(x, 2).square().sum().backward()
        assert all(p.grad is None for p in pnn.parameters() if id(p) in frozen)
        optimizer.step()
        adam.step()
    after = pnn.state_dict()
    changed = [
        name for name, value in before.items() if isinstance(value, Tensor) and not torch.equal(after[name], value)
    ]
    assert changed and all(name.startswith("columns.2.") for name in changed), changed


def test_columns_after_the_task_are_never_run():
    pnn = ProgressiveMLP(3, [4, 4], head_classes=2)
    for _ in range(3):
        pnn.add_task_()
    calls: list[str] = []
    for task in (2, 3):
        for name, module in pnn.columns[task].named_modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(lambda *_, name=f"{task}.{name}": calls.append(name))
    pnn(inputs(pnn), 1)
    pnn.hidden_states(inputs(pnn), 1)
    assert calls == []
    pnn(inputs(pnn), 2)
    assert calls and all(name.startswith("2.") for name in calls)


# --- lateral connections ---


@torch.no_grad()
def change_column_(pnn: ProgressiveMLP, task: int) -> None:
    """Change the first hidden layer of column ``task`` (frozen or not)."""
    pnn.columns[task].hidden[0].weight.add_(1.0)


@pytest.mark.parametrize("lateral", [True, False])
def test_the_newest_task_reads_earlier_columns_only_when_lateral(lateral):
    torch.manual_seed(0)
    pnn = ProgressiveMLP(5, [8, 8], head_classes=3, lateral=lateral)
    pnn.add_task_()
    pnn.add_task_()
    x = inputs(pnn)
    before = {task: outputs(pnn, x, task) for task in (1, 2)}
    change_column_(pnn, 0)
    for task in (1, 2):
        assert torch.equal(outputs(pnn, x, task), before[task]) is not lateral, f"task {task}, lateral={lateral}"


def test_gradients_of_the_newest_task_reach_every_lateral_adapter_and_scale():
    torch.manual_seed(0)
    pnn = ProgressiveMLP(4, [6, 5, 3], head_classes=2)
    pnn.add_task_()
    pnn.add_task_()
    pnn(inputs(pnn), 2).square().sum().backward()
    adapters = pnn.columns[2].laterals
    assert len(adapters) == 3
    for adapter in adapters:
        for name, parameter in adapter.named_parameters():
            assert parameter.grad is not None and bool(parameter.grad.ne(0).any()), name


def test_the_first_hidden_layer_has_no_lateral_adapter():
    torch.manual_seed(0)
    hidden = [7, 5, 3]
    pnn = ProgressiveMLP(6, hidden, head_classes=2)
    for _ in range(3):
        pnn.add_task_()
    assert len(pnn.columns[0].laterals) == 0
    for k in range(1, 4):
        adapters = pnn.columns[k].laterals
        # one adapter per hidden layer l >= 1 plus one into the head, reading k earlier layer-(l-1) outputs
        assert [a.V.in_features for a in adapters] == [k * h for h in hidden]
        assert [a.V.out_features for a in adapters] == hidden
        assert [a.U.out_features for a in adapters] == [*hidden[1:], 2]
    # behaviour: changing column 0 leaves column 1's first layer as it was, and changes its second layer
    x = inputs(pnn)
    with torch.no_grad():
        before = pnn.hidden_states(x, 1)[1]
        change_column_(pnn, 0)
        after = pnn.hidden_states(x, 1)[1]
    assert torch.equal(after[0], before[0])
    assert torch.equal(after[0], F.relu(pnn.columns[1].hidden[0](x)))
    assert not torch.equal(after[1], before[1])


# --- parameter counts ---


def test_num_parameters_matches_a_hand_count():
    pnn = ProgressiveMLP(3, [4, 2], head_classes=2)
    pnn.add_task_()
    pnn.add_task_()
    plain = (3 * 4 + 4) + (4 * 2 + 2) + (2 * 2 + 2)  # 16 + 10 + 6 = 32: layers and head of one column
    head = 2 * 2 + 2  # 6
    # adapter = alpha (1) + V (k·h_{l-1} -> h_{l-1}, with bias) + U (h_{l-1} -> width, no bias)
    col1_into_hidden1 = 1 + (1 * 4 * 4 + 4) + 4 * 2  # 29
    col1_into_head = 1 + (1 * 2 * 2 + 2) + 2 * 2  # 11
    col2_into_hidden1 = 1 + (2 * 4 * 4 + 4) + 4 * 2  # 45
    col2_into_head = 1 + (2 * 2 * 2 + 2) + 2 * 2  # 15
    column = [plain, plain + col1_into_hidden1 + col1_into_head, plain + col2_into_hidden1 + col2_into_head]
    assert column == [32, 72, 92]
    assert [sum(p.numel() for p in pnn.column_parameters(t)) for t in range(3)] == column
    assert pnn.num_parameters() == sum(column) == 196
    assert sum(p.numel() for p in pnn.parameters()) == 196
    # task t uses columns 0..t, but of the earlier columns not their heads (nor the adapters into those heads)
    assert pnn.num_parameters(0) == 32
    assert pnn.num_parameters(1) == (32 - head) + 72 == 98
    assert pnn.num_parameters(2) == (32 - head) + (72 - head - col1_into_head) + 92 == 173


def test_independent_columns_are_separate_networks():
    classes = [2, 5, 3]
    pnn = ProgressiveMLP(9, [6, 4], head_classes=classes, lateral=False)
    pnn.add_task_()
    pnn.add_task_()
    separate = [mlp_parameters(9, [6, 4], c) for c in classes]
    assert pnn.num_parameters() == sum(separate)
    assert [pnn.num_parameters(t) for t in range(3)] == separate
    assert all(len(column.laterals) == 0 for column in pnn.columns)


def test_column_parameters_partition_the_parameters():
    pnn = ProgressiveMLP(3, [4, 2], head_classes=2)
    pnn.add_task_()
    pnn.add_task_()
    by_column = [{id(p) for p in pnn.column_parameters(t)} for t in range(3)]
    assert set().union(*by_column) == {id(p) for p in pnn.parameters()}
    assert sum(len(ids) for ids in by_column) == len(list(pnn.parameters()))


# --- initialisation, device and dtype ---


def test_a_seeded_generator_draws_the_same_column_in_every_process():
    def grown(seed: int) -> ProgressiveMLP:
        torch.manual_seed(0)
        pnn = ProgressiveMLP(5, [4, 3], head_classes=2)
        pnn.add_task_(torch.Generator().manual_seed(seed))
        torch.rand(7)  # the global RNG moves differently between processes; the column must not care
        return pnn

    a, b, c = grown(11), grown(11), grown(12)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.columns[1].hidden[0].weight, c.columns[1].hidden[0].weight)
    bound = 1 / 5**0.5
    assert a.columns[1].hidden[0].weight.detach().abs().max().item() <= bound
    assert all(adapter.alpha.item() == pytest.approx(0.01) for adapter in a.columns[1].laterals)


def test_new_columns_take_the_dtype_of_the_network():
    pnn = ProgressiveMLP(3, [4], head_classes=2).double()
    pnn.add_task_(torch.Generator().manual_seed(0))
    assert {p.dtype for p in pnn.parameters()} == {torch.float64}
    assert pnn(inputs(pnn).double(), 1).dtype == torch.float64


# --- checkpoints ---


@pytest.mark.parametrize("lateral", [True, False])
def test_state_dict_round_trip_after_rebuild(lateral):
    torch.manual_seed(0)
    pnn = ProgressiveMLP(5, [6, 3], head_classes=[2, 4, 3], lateral=lateral)
    x = inputs(pnn)
    grow_and_train(pnn, x, columns=3, seed=2)
    buffer = io.BytesIO()
    torch.save({"architecture": pnn.architecture(), "state_dict": pnn.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    fresh = ProgressiveMLP(5, [6, 3], head_classes=[2, 4, 3], lateral=lateral)
    fresh.rebuild_(checkpoint["architecture"])
    fresh.rebuild_(checkpoint["architecture"])  # idempotent
    assert fresh.num_tasks == 3
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for task in range(3):
        assert torch.equal(outputs(fresh, x, task), outputs(pnn, x, task)), task
        assert [p.requires_grad for p in fresh.column_parameters(task)] == [
            p.requires_grad for p in pnn.column_parameters(task)
        ]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_sizes": [6, 4]}, "hidden_sizes"),
        ({"in_features": 4}, "in_features"),
        ({"lateral": False}, "lateral"),
        ({"heads": [2, 5]}, "head of task 1"),
        ({"columns": 0, "heads": []}, "columns"),
    ],
)
def test_rebuild_rejects_another_architecture(change, match):
    saved = ProgressiveMLP(5, [6, 3], head_classes=[2, 4, 3])
    saved.add_task_()
    architecture = {**saved.architecture(), **change}
    fresh = ProgressiveMLP(5, [6, 3], head_classes=[2, 4, 3])
    with pytest.raises(ValueError, match=match):
        fresh.rebuild_(architecture)
    assert fresh.num_tasks == 1


# --- errors ---


def test_inputs_of_the_wrong_shape_are_rejected():
    pnn = ProgressiveMLP(4, [3], head_classes=2)
    with pytest.raises(ValueError, match=r"expected inputs of shape \[batch, 4\], got \(2, 5\)"):
        pnn(torch.ones(2, 5), 0)
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        pnn(torch.ones(2, 2, 4), 0)


def test_tasks_never_trained_are_rejected():
    pnn = ProgressiveMLP(4, [3], head_classes=2)
    pnn.add_task_()
    pnn.add_task_()
    for task in (3, -1):
        with pytest.raises(ValueError, match=rf"task {task} was never trained: .* columns for tasks 0\.\.2"):
            pnn(torch.ones(2, 4), task)
    with pytest.raises(ValueError, match="never trained"):
        pnn.column_parameters(5)
    with pytest.raises(ValueError, match="never trained"):
        pnn.num_parameters(3)
    with pytest.raises(TypeError, match="must be an int"):
        pnn(torch.ones(2, 4), True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_features": 0}, ValueError, "in_features"),
        ({"hidden_sizes": []}, ValueError, "hidden_sizes"),
        ({"hidden_sizes": [3, 0]}, ValueError, "hidden_sizes"),
        ({"head_classes": 0}, ValueError, "head_classes"),
        ({"head_classes": []}, ValueError, "head_classes"),
        ({"lateral": "yes"}, ValueError, "lateral"),
    ],
)
def test_bad_constructor_arguments_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        ProgressiveMLP(**{"in_features": 4, "hidden_sizes": [3], "head_classes": 2, **kwargs})


def test_a_column_without_a_head_size_is_not_added_and_nothing_is_frozen():
    pnn = ProgressiveMLP(4, [3], head_classes=[2, 2])
    pnn.add_task_()
    with pytest.raises(ValueError, match="no head size for task 2"):
        pnn.add_task_()
    assert pnn.num_tasks == 2
    assert all(p.requires_grad for p in pnn.column_parameters(1))


# --- property ---


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    in_features=st.integers(1, 5),
    hidden=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    classes=st.lists(st.integers(1, 5), min_size=4, max_size=4),
    columns=st.integers(1, 4),
    lateral=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_zero_forgetting_holds_for_any_small_network(in_features, hidden, classes, columns, lateral, seed):
    torch.manual_seed(seed)
    pnn = ProgressiveMLP(in_features, hidden, head_classes=classes, lateral=lateral)
    x = inputs(pnn, seed=seed)
    recorded = grow_and_train(pnn, x, columns=columns, seed=seed)
    assert pnn.num_tasks == columns
    for task, before in recorded.items():
        assert torch.equal(outputs(pnn, x, task), before), task
