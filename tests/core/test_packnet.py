"""Tests of :mod:`lightning_den.core.packnet.block`: owner masks, pruning, zero forgetting, checkpoints, errors.

The central property: once a task is pruned, its outputs never change again (``torch.equal``), whatever
later tasks train with a real optimizer, provided owned weights are written back after each step
(:class:`FrozenEntries`) and biases and old heads are frozen from task 1 on.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_den.core.den.layers import mlp_parameters
from lightning_den.core.freezing import FrozenEntries
from lightning_den.core.packnet.block import PackNetMLP, free_fraction
from tests.core.helpers import assert_same_state, state_copy

HEAD_CLASSES = [3, 2, 4, 3, 2]


# --- helpers ---


@torch.no_grad()
def random_net(in_features: int, hidden_sizes: list[int], head_classes, seed: int) -> PackNetMLP:
    """A :class:`PackNetMLP` whose parameters are all drawn from ``N(0, 1)`` with the given seed."""
    net = PackNetMLP(in_features, hidden_sizes, head_classes)
    generator = torch.Generator().manual_seed(seed)
    for parameter in net.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return net


def task_data(net: PackNetMLP, task: int, batch: int = 32) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + task)
    x = torch.randn(batch, net.in_features, generator=generator)
    y = torch.randint(0, net.classes_of(task), (batch,), generator=generator)
    return x, y


def probe(net: PackNetMLP, seed: int = 7, batch: int = 16) -> Tensor:
    return torch.randn(batch, net.in_features, generator=torch.Generator().manual_seed(seed))


def freeze_shared_(net: PackNetMLP, task: int) -> None:
    """PackNet's rule: biases train in task 0 only; heads of earlier tasks never train again."""
    if task == 0:
        return
    for layer in net.hidden:
        layer.bias.requires_grad_(False)
    for old in range(task):
        net.heads[str(old)].requires_grad_(False)


def train_task(
    net: PackNetMLP,
    task: int,
    optimizer: str = "adamw",
    steps: int = 15,
    lr: float = 0.05,
    restore: bool = True,
) -> None:
    """Train the newest task on random data with a real optimizer, keeping owned weights frozen."""
    assert task == net.newest_task
    freeze_shared_(net, task)
    named = dict(net.named_parameters())
    frozen = FrozenEntries({named[name]: mask for name, mask in net.trainable_masks().items()})
    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.5)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.1)
    x, y = task_data(net, task)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x, task), y).backward()
        frozen.mask_gradients_()
        opt.step()
        if restore:
            frozen.restore_()


@torch.no_grad()
def outputs_of(net: PackNetMLP, x: Tensor, task: int) -> Tensor:
    return net(x, task).detach().clone()


def owned_masks(net: PackNetMLP, task: int) -> list[Tensor]:
    return [(owner == task + 1).clone() for owner in net.owners()]


@torch.no_grad()
def reference_network(net: PackNetMLP, task: int, used: list[Tensor]) -> nn.Sequential:
    """A plain ``nn.Linear``/``nn.ReLU`` stack whose hidden weights are zero outside ``used`` (no masks)."""
    modules: list[nn.Module] = []
    for layer, keep in zip(net.hidden, used, strict=True):
        linear = nn.Linear(layer.in_features, layer.out_features)
        linear.weight.copy_(torch.where(keep, layer.weight, torch.zeros_like(layer.weight)))
        linear.bias.copy_(layer.bias)
        modules += [linear, nn.ReLU()]
    head = net.heads[str(task)]
    linear = nn.Linear(head.in_features, head.out_features)
    linear.load_state_dict(head.state_dict())
    modules.append(linear)
    return nn.Sequential(*modules)


def expected_use(net: PackNetMLP, task: int) -> list[Tensor]:
    """The weights ``task`` may use: owned by it or earlier, plus the free ones while it is training."""
    low = 0 if task == net.newest_task and net.training_newest else 1
    return [(owner >= low) & (owner <= task + 1) for owner in net.owners()]


def run_tasks(net: PackNetMLP, fractions: list[float | None], optimizer: str = "adamw", steps: int = 15):
    """Train, prune (``None``: claim_free_) and record every task; return recorded outputs and owned masks."""
    x = probe(net)
    recorded: dict[int, Tensor] = {}
    owned: dict[int, list[Tensor]] = {}
    for task, fraction in enumerate(fractions):
        if task > 0:
            assert net.add_task_() == task
        train_task(net, task, optimizer, steps=steps)
        if fraction is None:
            net.claim_free_()
        else:
            net.prune_(fraction)
        recorded[task] = outputs_of(net, x, task)
        owned[task] = owned_masks(net, task)
    return x, recorded, owned


# --- zero forgetting ---


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_earlier_tasks_are_remembered_bit_for_bit(optimizer):
    net = random_net(6, [10, 8], HEAD_CLASSES, seed=0)
    x = probe(net)
    recorded: dict[int, Tensor] = {}
    fractions = [0.5, 0.6, 0.5, None]
    for task, fraction in enumerate(fractions):
        if task > 0:
            net.add_task_(torch.Generator().manual_seed(task))
        before = [layer.weight.detach().clone() for layer in net.hidden]
        free = [mask.clone() for mask in net.trainable_masks().values()]
        train_task(net, task, optimizer)
        for layer, old, trainable in zip(net.hidden, before, free, strict=True):
            assert torch.equal(layer.weight[~trainable], old[~trainable]), "an owned weight moved"
            assert not torch.equal(layer.weight[trainable], old[trainable]), "training changed nothing (vacuous)"
        net.prune_(fraction) if fraction is not None else net.claim_free_()
        recorded[task] = outputs_of(net, x, task)
        for earlier in range(task + 1):
            assert torch.equal(outputs_of(net, x, earlier), recorded[earlier]), f"task {earlier} forgot"
    assert free_fraction(net) == 0.0


def test_masking_gradients_alone_forgets_under_weight_decay():
    """Negative control: without writing owned weights back, AdamW's decoupled decay moves them."""
    net = random_net(6, [10, 8], HEAD_CLASSES, seed=0)
    x = probe(net)
    train_task(net, 0)
    net.prune_(0.5)
    recorded = outputs_of(net, x, 0)
    net.add_task_()
    train_task(net, 1, "adamw", restore=False)
    assert not torch.equal(outputs_of(net, x, 0), recorded)


# --- masks ---


def test_owner_sets_are_disjoint_and_each_task_uses_exactly_its_weights():
    net = random_net(5, [7, 6, 4], HEAD_CLASSES, seed=1)
    x, _, owned = run_tasks(net, [0.5, 0.5, 0.4], steps=5)
    stacked = [torch.stack([owned[t][layer] for t in owned]).to(torch.int64) for layer in range(len(net.hidden))]
    for counts in stacked:
        assert int(counts.sum(0).max()) <= 1, "a weight is owned by two tasks"
    for task in range(net.num_tasks):
        used = expected_use(net, task)
        assert [u.tolist() for u in net.used_by(task)] == [u.tolist() for u in used]
        reference = reference_network(net, task, used)
        assert torch.equal(outputs_of(net, x, task), reference(x).detach())
        # weights outside the set do not matter at all: overwrite them with large values
        with torch.no_grad():
            saved = [layer.weight.clone() for layer in net.hidden]
            for layer, keep in zip(net.hidden, used, strict=True):
                layer.weight.copy_(torch.where(keep, layer.weight, torch.full_like(layer.weight, 1e3)))
            assert torch.equal(outputs_of(net, x, task), reference(x).detach())
            for layer, weight in zip(net.hidden, saved, strict=True):
                layer.weight.copy_(weight)
        # and they get no gradient
        net.zero_grad()
        net(x, task).sum().backward()
        for layer, keep in zip(net.hidden, used, strict=True):
            if layer.weight.grad is not None:
                assert not layer.weight.grad[~keep].any()


def test_newest_task_uses_free_and_owned_weights():
    net = random_net(4, [6, 5], HEAD_CLASSES, seed=2)
    train_task(net, 0, steps=3)
    net.prune_(0.5)
    net.add_task_()
    with torch.no_grad():
        for layer, trainable in zip(net.hidden, net.trainable_masks().values(), strict=True):
            layer.weight[trainable] = torch.randn(int(trainable.sum()), generator=torch.Generator().manual_seed(3))
    x = probe(net)
    everything = [torch.ones_like(owner, dtype=torch.bool) for owner in net.owners()]
    assert all(used.all() for used in net.used_by(1))
    assert torch.equal(outputs_of(net, x, 1), reference_network(net, 1, everything)(x).detach())


def test_trainable_masks_are_exactly_the_free_weights():
    net = random_net(4, [6, 5], HEAD_CLASSES, seed=3)
    masks = net.trainable_masks()
    names = [name for name, _ in net.named_parameters()]
    assert list(masks) == [name for name in names if name.startswith("hidden.") and name.endswith(".weight")]
    assert all(mask.dtype == torch.bool and mask.all() for mask in masks.values())
    net.prune_(0.5)
    net.add_task_()
    for mask, owner, layer in zip(net.trainable_masks().values(), net.owners(), net.hidden, strict=True):
        assert mask.shape == layer.weight.shape
        assert torch.equal(mask, owner == 0)
        assert 0 < int(mask.sum()) < mask.numel()


# --- pruning ---


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9])
def test_prune_keeps_the_largest_free_weights(fraction):
    net = random_net(5, [9, 7], HEAD_CLASSES, seed=4)
    net.prune_(0.5)
    net.add_task_()
    train_task(net, 1, steps=5)
    owners_before = [owner.clone() for owner in net.owners()]
    weights_before = [layer.weight.detach().clone() for layer in net.hidden]
    kept_counts = net.prune_(fraction)
    for layer, owner, old_owner, old_weight, kept_count in zip(
        net.hidden, net.owners(), owners_before, weights_before, kept_counts, strict=True
    ):
        free = old_owner == 0
        # rounding: Python's round() of (1 - fraction) * free count (halves to even)
        assert kept_count == round((1 - fraction) * int(free.sum()))
        kept = free & (owner == 2)
        pruned = free & (owner == 0)
        assert int(kept.sum()) == kept_count and torch.equal(kept | pruned, free)
        assert torch.equal(owner[~free], old_owner[~free]), "an owned weight changed owner"
        assert torch.equal(layer.weight[~pruned], old_weight[~pruned]), "a kept or owned weight changed"
        assert (layer.weight[pruned] == 0).all() and not torch.signbit(layer.weight[pruned]).any()
        if kept.any() and pruned.any():
            assert old_weight[kept].abs().min() >= old_weight[pruned].abs().max()


def test_prune_breaks_ties_towards_the_lower_flat_index():
    net = PackNetMLP(4, [5], head_classes=2)
    signs = torch.randint(0, 2, (5, 4), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        net.hidden[0].weight.copy_(0.5 * signs)
    assert net.prune_(0.5) == [10]
    assert net.owner_0.flatten().tolist() == [1] * 10 + [0] * 10


def test_claim_free_gives_every_free_weight_to_the_newest_task():
    net = random_net(4, [6, 5], HEAD_CLASSES, seed=5)
    net.prune_(0.75)
    free = [int((owner == 0).sum()) for owner in net.owners()]
    net.add_task_()
    weights = [layer.weight.detach().clone() for layer in net.hidden]
    assert net.claim_free_() == free
    assert all(bool((owner > 0).all()) for owner in net.owners())
    assert all(torch.equal(layer.weight, w) for layer, w in zip(net.hidden, weights, strict=True))
    assert [int((owner == 2).sum()) for owner in net.owners()] == free


@pytest.mark.parametrize("second", ["prune_", "claim_free_"])
def test_a_task_cannot_claim_weights_twice(second):
    net = random_net(4, [6], HEAD_CLASSES, seed=6)
    net.prune_(0.5)
    before = state_copy(net)
    with pytest.raises(ValueError, match="task 0 is already finished"):
        net.prune_(0.5) if second == "prune_" else net.claim_free_()
    assert_same_state(net, before)


# --- full network ---


@pytest.mark.parametrize(("hidden", "fraction"), [([5, 4], 0.0), ([1, 6], 0.4)])
def test_add_task_refuses_a_full_network_and_changes_nothing(hidden, fraction):
    # [1, 6] with fraction 0.4: layer 0 has 1 weight, round(0.6) = 1 is kept, so only that layer is full
    net = random_net(1, hidden, HEAD_CLASSES, seed=7)
    net.prune_(fraction)
    assert any(not bool((owner == 0).any()) for owner in net.owners())
    before = state_copy(net)
    x = probe(net)
    output = outputs_of(net, x, 0)
    with pytest.raises(ValueError, match="the network is full; use wider layers or prune a larger fraction"):
        net.add_task_()
    assert net.num_tasks == 1 and list(net.heads) == ["0"]
    assert_same_state(net, before)
    assert torch.equal(outputs_of(net, x, 0), output)


def test_add_task_refuses_to_start_a_task_before_the_newest_is_finished():
    net = random_net(3, [4], 2, seed=8)
    before = state_copy(net)
    with pytest.raises(ValueError, match=r"task 0 is still training: call prune_\(fraction\) or claim_free_\(\)"):
        net.add_task_()
    assert net.num_tasks == 1
    assert_same_state(net, before)


def test_a_finished_task_uses_only_the_weights_it_owns():
    net = random_net(3, [4], 2, seed=8)
    assert net.training_newest and net.num_parameters(0) == net.num_parameters()
    kept = net.prune_(0.5)
    assert not net.training_newest and int(net.finished_tasks) == 1
    assert [int(used.sum()) for used in net.used_by(0)] == kept
    net.add_task_()
    assert net.training_newest
    assert [int(used.sum()) for used in net.used_by(0)] == kept


def test_add_task_draws_from_the_generator():
    a, b = (random_net(3, [4], 2, seed=8) for _ in range(2))
    a.prune_(0.5)
    b.prune_(0.5)
    assert a.add_task_(torch.Generator().manual_seed(1)) == b.add_task_(torch.Generator().manual_seed(1)) == 1
    assert torch.equal(a.heads["1"].weight, b.heads["1"].weight)
    assert torch.equal(a.heads["1"].bias, b.heads["1"].bias)
    assert a.heads["1"].weight.abs().max() <= 1 / math.sqrt(4)


# --- parameter counts ---


def test_num_parameters_counts_the_weights_each_task_uses():
    net = random_net(5, [6, 4], HEAD_CLASSES, seed=9)
    total = mlp_parameters(5, [6, 4], HEAD_CLASSES[0])
    assert net.num_parameters(0) == net.num_parameters() == total
    kept = net.prune_(0.5)
    biases = 6 + 4
    assert net.num_parameters(0) == sum(kept) + biases + 4 * HEAD_CLASSES[0] + HEAD_CLASSES[0]
    net.add_task_()
    assert net.num_parameters(1) == 5 * 6 + 6 * 4 + biases + 4 * HEAD_CLASSES[1] + HEAD_CLASSES[1]
    assert net.num_parameters(0) == sum(kept) + biases + 4 * HEAD_CLASSES[0] + HEAD_CLASSES[0]
    assert net.num_parameters() == sum(p.numel() for p in net.parameters())


# --- checkpoints ---


def test_state_dict_round_trip_through_architecture_and_rebuild():
    net = random_net(5, [7, 6], HEAD_CLASSES, seed=10)
    run_tasks(net, [0.5, 0.5], steps=3)
    net.add_task_()
    train_task(net, 2, steps=3)  # task 2 is still training: its free weights are used too
    buffer = io.BytesIO()
    torch.save({"architecture": net.architecture(), "state": net.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint["architecture"] == {"in_features": 5, "hidden_sizes": [7, 6], "heads": [[3, 6], [2, 6], [4, 6]]}

    fresh = PackNetMLP(5, [7, 6], HEAD_CLASSES)
    x = probe(net)
    fresh(x, 0)  # fills the mask cache, which loading must invalidate
    fresh.rebuild_(checkpoint["architecture"])
    fresh.rebuild_(checkpoint["architecture"])  # idempotent
    fresh.load_state_dict(checkpoint["state"], strict=True)
    grown = PackNetMLP(5, [7, 6], HEAD_CLASSES)
    grown.load_state_dict(checkpoint["state"], strict=True)  # the state holds the architecture: it grows first
    assert grown.num_tasks == 3
    assert fresh.num_tasks == 3
    for task in range(3):
        assert torch.equal(outputs_of(fresh, x, task), outputs_of(net, x, task)), task
        assert fresh.num_parameters(task) == net.num_parameters(task)
    for a, b in zip(fresh.trainable_masks().values(), net.trainable_masks().values(), strict=True):
        assert torch.equal(a, b)


def test_masks_follow_the_dtype():
    net = random_net(4, [5], HEAD_CLASSES, seed=11)
    net.prune_(0.5)
    net.add_task_()
    x = probe(net)
    single = outputs_of(net, x, 0)
    net.double()
    double = outputs_of(net, x.double(), 0)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single)


# --- errors ---


def test_inputs_of_the_wrong_width_are_refused():
    net = PackNetMLP(4, [3], head_classes=2)
    with pytest.raises(ValueError, match=r"expected inputs of shape \[batch, 4\], got \(2, 5\)"):
        net(torch.ones(2, 5), task=0)
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        net(torch.ones(4), task=0)


def test_tasks_that_were_never_trained_are_refused():
    net = PackNetMLP(4, [3], head_classes=2)
    x = torch.ones(2, 4)
    for task in (1, -1):
        with pytest.raises(ValueError, match=f"task {task} was never trained: this network has heads for tasks 0..0"):
            net(x, task=task)
    with pytest.raises(ValueError, match="task 3 was never trained"):
        net.num_parameters(3)
    with pytest.raises(TypeError, match="`task` must be an int"):
        net(x, task=True)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_fractions_out_of_range_are_refused(fraction):
    net = PackNetMLP(4, [3], head_classes=2)
    before = state_copy(net)
    with pytest.raises(ValueError, match="0 <= fraction < 1"):
        net.prune_(fraction)
    assert_same_state(net, before)


@pytest.mark.parametrize("fraction", ["0.5", True, None])
def test_fractions_that_are_not_numbers_are_refused(fraction):
    with pytest.raises(TypeError, match="`fraction` must be a number"):
        PackNetMLP(4, [3], head_classes=2).prune_(fraction)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, [3], 2), "in_features"),
        ((-1, [3], 2), "in_features"),
        ((4, [], 2), "hidden_sizes"),
        ((4, [3, 0], 2), "hidden_sizes"),
        ((4, [2.5], 2), "hidden_sizes"),
        ((4, [3], 0), "head_classes"),
        ((4, [3], []), "head_classes"),
        ((4, [3], [2, 0]), "head_classes"),
    ],
)
def test_bad_constructor_arguments_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        PackNetMLP(*args)


def test_heads_beyond_the_listed_classes_are_refused():
    net = PackNetMLP(4, [3], head_classes=[2])
    net.prune_(0.5)
    with pytest.raises(ValueError, match="lists 1 tasks"):
        net.add_task_()
    assert net.num_tasks == 1


@pytest.mark.parametrize(
    ("architecture", "match"),
    [
        ({"in_features": 5, "hidden_sizes": [3], "heads": [[2, 3]]}, "input width 5"),
        ({"in_features": 4, "hidden_sizes": [3, 3], "heads": [[2, 3]]}, r"hidden sizes \[3, 3\]"),
        ({"in_features": 4, "hidden_sizes": [3], "heads": [[2, 3], [5, 3]]}, r"head of task 1 is \[5, 3\]"),
        ({"in_features": 4, "hidden_sizes": [3], "heads": []}, "has 0 heads"),
    ],
)
def test_rebuild_refuses_another_architecture(architecture, match):
    net = PackNetMLP(4, [3], head_classes=2)
    with pytest.raises(ValueError, match=match):
        net.rebuild_(architecture)
    assert net.num_tasks == 1


# --- property ---


@settings(max_examples=20, deadline=None, database=None)
@given(
    in_features=st.integers(1, 4),
    hidden=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    fractions=st.lists(st.floats(0.0, 0.95), min_size=2, max_size=4),
    optimizer=st.sampled_from(["adam", "adamw"]),
    seed=st.integers(0, 2**16),
)
def test_masks_stay_disjoint_and_earlier_outputs_are_preserved(in_features, hidden, fractions, optimizer, seed):
    net = random_net(in_features, hidden, 3, seed)
    x = probe(net, seed=seed)
    recorded: dict[int, Tensor] = {}
    owned: dict[int, list[Tensor]] = {}
    for task, fraction in enumerate(fractions):
        if task > 0:
            if any(not bool((owner == 0).any()) for owner in net.owners()):
                with pytest.raises(ValueError, match="network is full"):
                    net.add_task_()
                break
            net.add_task_()
        train_task(net, task, optimizer, steps=3, lr=0.1)
        kept = net.prune_(fraction)
        owned[task] = owned_masks(net, task)
        assert [int(mask.sum()) for mask in owned[task]] == kept
        recorded[task] = outputs_of(net, x, task)
    for layer in range(len(net.hidden)):
        counts = torch.stack([owned[t][layer] for t in owned]).to(torch.int64).sum(0)
        assert int(counts.max()) <= 1, "a weight is owned by two tasks"
    for task in recorded:
        assert [m.tolist() for m in owned_masks(net, task)] == [m.tolist() for m in owned[task]]
        assert torch.equal(outputs_of(net, x, task), recorded[task]), f"task {task} forgot"
