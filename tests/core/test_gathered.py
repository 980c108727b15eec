"""Selective retraining on the gathered subnetwork (:meth:`ExpandableMLP.gather_`).

The subnetwork's rows and columns train as compact Parameters: the network's function and checkpoint do not
change when they are gathered, a step writes back exactly the entries DEN's rule says selective retraining
trains, and the outputs and gradients are those of the whole network with the entries outside the subnetwork
frozen (Eq. 4), whether the subnetwork runs alone (BFS stopped by itself) or with the rest frozen.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from lightning_den.core.den.conv import ExpandableCNN
from lightning_den.core.den.entries import trainable_entries
from lightning_den.core.den.layers import GATHERED_ENTRIES, ExpandableLinear, ExpandableMLP
from lightning_den.core.den.phases import DENPhase
from lightning_den.core.den.selection import select_subnetwork
from tests.core.helpers import (
    FAST,
    as_mask,
    assert_same_state,
    build,
    mlp_configs,
    random_history,
    random_inputs,
    state_copy,
)


def draw_selection(data: st.DataObject, mlp: ExpandableMLP) -> list[list[int]]:
    """Any subnetwork of the newest task: a sorted subset of the inputs and of each hidden layer's units."""
    sizes = [mlp.hidden[0].in_units, *mlp.widths(mlp.newest_task)]
    return [sorted(data.draw(st.sets(st.integers(0, size - 1)), label="selected units")) for size in sizes]


def without_unselected(mlp: ExpandableMLP, selection: list[list[int]]) -> ExpandableMLP:
    """A copy of ``mlp`` in which no layer (the newest head included) reads an unselected unit below."""
    pruned = copy.deepcopy(mlp)
    layers = [*pruned.hidden, pruned.heads[str(pruned.newest_task)]]
    with torch.no_grad():
        for layer, below in zip(layers, selection, strict=True):
            dropped = torch.ones(layer.in_units, dtype=torch.bool)
            dropped[below] = False
            layer.by_input_unit(layer.weight)[:, dropped] = 0.0
    return pruned


@FAST
@given(config=mlp_configs(), data=st.data())
def test_gathering_keeps_the_function_and_a_step_writes_back_exactly_the_selected_entries(config, data):
    mlp, generator = build(config)
    random_history(data, mlp, generator)
    selection = draw_selection(data, mlp)
    x = random_inputs(mlp)
    with torch.no_grad():
        before = {task: mlp(x, task=task) for task in range(mlp.num_tasks)}
    saved = state_copy(mlp)
    counts = [mlp.num_parameters(), *(mlp.num_parameters_through(task) for task in range(mlp.num_tasks))]
    mlp.gather_(selection)
    assert counts == [mlp.num_parameters(), *(mlp.num_parameters_through(task) for task in range(mlp.num_tasks))]
    with torch.no_grad():  # without gradients every task runs the whole network, bit for bit
        assert all(torch.equal(mlp(x, task=task), before[task]) for task in before)
    assert_same_state(mlp, saved)  # the checkpoint keeps the plain layout and the same values

    trained = [name for name, _ in mlp.named_parameters() if name.rpartition(".")[2] in GATHERED_ENTRIES]
    assert not any(p.requires_grad for layer in mlp.hidden for p in (layer.weight, layer.bias))
    with torch.no_grad():  # a stand-in for an optimizer step: every trained entry moves
        for name in trained:
            mlp.get_parameter(name).add_(1.0)
    mlp.sync_()
    rule = trainable_entries(mlp, DENPhase.SELECTIVE, selection)
    for name, entries in rule.items():
        moved = mlp.get_parameter(name).detach() != saved[name]
        assert torch.equal(moved, as_mask(entries, moved.shape)), f"{name}: moved entries differ from the rule"

    mlp.join_()
    assert {name.rpartition(".")[2] for name, _ in mlp.named_parameters()} == {"weight", "bias"}
    assert all(p.requires_grad for p in mlp.parameters())


def small_cnn() -> ExpandableCNN:
    torch.manual_seed(0)
    cnn = ExpandableCNN.lenet((1, 12, 12), channels=[3, 4], hidden_sizes=[5], head_classes=2, kernel_size=3, padding=1)
    cnn.add_task_()
    return cnn


def network(kind: str) -> tuple[ExpandableMLP, Tensor, list[list[int]]]:
    """A two-task network, inputs, and a subnetwork of task 1 that leaves units out of every layer."""
    if kind == "mlp":
        mlp = ExpandableMLP(6, [5, 4], head_classes=3)
        mlp.add_task_()
        return mlp, torch.randn(7, 6), [[0, 2, 3, 5], [1, 2, 4], [0, 3]]
    return small_cnn(), torch.randn(7, 1, 12, 12), [[0], [0, 2], [1, 3], [2, 4]]


def dense_gradients(mlp: ExpandableMLP, x: Tensor, selection: list[list[int]]) -> tuple[Tensor, list[Tensor]]:
    """Task 1's outputs of a copy of ``mlp`` and the gradients of its weights and biases at the entries of
    ``selection`` (every layer, the newest head included), from a dense backward: the masked dense step."""
    dense = copy.deepcopy(mlp)
    outputs = dense(x, task=1)
    outputs.square().sum().backward()
    dense.gather_(selection)  # only to read the selected entries of the dense gradients
    layers = [*dense.hidden, dense.heads["1"]]
    return outputs.detach(), [g for layer in layers for g in layer.gathered(layer.weight.grad, layer.bias.grad)]


def gathered_gradients(mlp: ExpandableMLP, x: Tensor, selection: list[list[int]]) -> tuple[Tensor, list[Tensor]]:
    mlp.gather_(selection)
    outputs = mlp(x, task=1)
    outputs.square().sum().backward()
    return outputs.detach(), [p.grad for layer in [*mlp.hidden, mlp.heads["1"]] for p in layer.gathered_parameters()]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_budget_cut_subnetwork_trains_on_the_whole_network_with_the_rest_frozen(kind):
    """Units outside the subnetwork still feed it (the budget cut BFS short): Eq. 4's loss keeps them, frozen,
    so outputs and bias gradients are the masked dense step's bit for bit; weight gradients to float rounding: one
    formed on the gathered block is a matrix product of another shape, which some CPUs sum in another order."""
    torch.manual_seed(0)
    mlp, x, selection = network(kind)
    expected_outputs, expected = dense_gradients(mlp, x, selection)
    outputs, gradients = gathered_gradients(mlp, x, selection)
    assert not mlp._gathered_alone
    assert torch.equal(outputs, expected_outputs)
    for gradient, reference in zip(gradients, expected, strict=True):
        if gradient.dim() == 1:  # a bias: summed over the batch as the dense backward sums it
            assert torch.equal(gradient, reference)
        else:
            torch.testing.assert_close(gradient, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_where_bfs_stops_by_itself_the_subnetwork_runs_alone_and_steps_as_the_masked_dense_step(kind):
    """Units BFS does not reach have no path to the new head, so leaving them out of the forward changes
    neither the outputs nor the gradient of any selected entry; then only the subnetwork computes."""
    torch.manual_seed(0)
    mlp, x, selection = network(kind)
    mlp = without_unselected(mlp, selection)  # zeros cut the unselected units off; BFS then stops by itself
    selection = select_subnetwork(mlp, 1)
    assert any(len(units) < width for units, width in zip(selection[1:], mlp.widths(1), strict=True))
    expected_outputs, expected = dense_gradients(mlp, x, selection)
    outputs, gradients = gathered_gradients(mlp, x, selection)
    assert mlp._gathered_alone
    torch.testing.assert_close(outputs, expected_outputs)
    for gradient, reference in zip(gradients, expected, strict=True):
        torch.testing.assert_close(gradient, reference)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_asked_to_run_alone_the_subnetwork_leaves_the_units_outside_it_out(kind):
    """``subnetwork_only`` (the official code's training): the units a budget left out take no part in the loss
    while the subnetwork trains, and take part again in evaluation."""
    torch.manual_seed(0)
    mlp, x, selection = network(kind)
    expected = without_unselected(mlp, selection)(x, task=1)
    mlp.gather_(selection, alone=True)
    torch.testing.assert_close(mlp(x, task=1), expected)
    with torch.no_grad():
        whole = mlp(x, task=1)
    mlp.join_()
    with torch.no_grad():
        assert torch.equal(whole, mlp(x, task=1)) and not torch.allclose(whole, expected)


def held_tensors(module: torch.nn.Module) -> list[Tensor]:
    """Every tensor ``module`` holds: Parameters, buffers and plain attributes of its modules (alone or in a tuple)."""
    tensors = [*module.parameters(), *module.buffers()]
    for each in module.modules():
        for value in vars(each).values():
            tensors += [t for t in (value if isinstance(value, tuple | list) else [value]) if isinstance(t, Tensor)]
    return tensors


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_gathered_network_moves_between_devices_whole_and_joins_there(kind):
    # Lightning moves the module to the CPU at teardown, before the callback joins the layout: the subnetwork's
    # indices must travel with its weights ("meta" stands in for the other device on a machine with no GPU)
    mlp, _, selection = network(kind)
    mlp.gather_(selection)
    mlp.to("meta")
    assert {t.device.type for t in held_tensors(mlp)} == {"meta"}
    mlp.join_()
    assert not any(layer.separated for layer in [*mlp.hidden, *mlp.heads.values()])
    assert not [name for name, _ in mlp.named_parameters() if name.endswith(GATHERED_ENTRIES)]


def test_a_subnetwork_that_names_the_wrong_number_of_layers_is_refused():
    mlp = ExpandableMLP(4, [3, 2], head_classes=2)
    with pytest.raises(ValueError, match="the 2 hidden layers, got 2 lists"):
        mlp.gather_([[0], [1]])


# --- the partial-gradient layers (selective retraining with the rest frozen, expansion) under other set-ups ---


def partially_trained(layout: str) -> ExpandableLinear:
    """A layer training part of its entries through Parameters of their own: gathered rows and columns, or the
    entries outside a leading block (expansion)."""
    torch.manual_seed(0)
    layer = ExpandableLinear(12, 6)
    if layout == "gathered":
        layer.gather_(torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4, 7]))
    else:
        layer.train_outside_(4, 8)
    return layer


def partial_forward(layer: ExpandableLinear, x: Tensor) -> Tensor:
    return layer.forward_gathered(x, alone=False) if layer.gathering else layer(x)


def reference_forward(layer: ExpandableLinear, x: Tensor) -> Tensor:
    """The same output with gradients through the whole weight, assembled from the layer's Parameters."""
    if not layer.gathering:
        return layer.compute(x, *layer._assembled())
    rows, units = layer._gathered
    weight, bias = layer.gathered_parameters()
    full = layer.weight.detach().index_put((rows[:, None], units), weight)
    return layer.compute(x, full, layer.bias.detach().index_put((rows,), bias))


@pytest.mark.parametrize("layout", ["gathered", "outside"])
def test_partial_gradients_under_bf16_autocast_are_the_whole_weights_gradients_in_their_dtypes(layout):
    grads = []
    for forward in (partial_forward, reference_forward):
        layer = partially_trained(layout)
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(layer, x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        trained = {name: p.grad for name, p in layer.named_parameters() if p.requires_grad}
        assert all(g.dtype == torch.float32 for g in trained.values()) and x.grad.dtype == torch.float32
        grads.append({**trained, "input": x.grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:  # bf16 products, each formed on its own block: equal to bf16 rounding
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layout", ["gathered", "outside"])
def test_a_forward_reads_parameters_changed_in_place_since_the_last_write_back(layout):
    layer = partially_trained(layout)
    x = torch.randn(5, 12)
    with torch.no_grad():  # as L-BFGS changes them between evaluations of its closure, inside one step
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.5)
    assert torch.equal(partial_forward(layer, x), reference_forward(layer, x))


def lbfgs_losses(layout: str, forward) -> list[float]:
    """The losses of three L-BFGS steps (each evaluates its closure up to five times) on a partial layer."""
    layer = partially_trained(layout)
    x, target = torch.randn(16, 12, generator=torch.Generator().manual_seed(2)), torch.zeros(16, 6)
    optimizer = torch.optim.LBFGS([p for p in layer.parameters() if p.requires_grad], max_iter=5)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = (forward(layer, x) - target).square().mean()
        loss.backward()
        return loss

    return [float(optimizer.step(closure).detach()) for _ in range(3)]


@pytest.mark.parametrize("layout", ["gathered", "outside"])
def test_lbfgs_trains_a_partial_layer_as_through_its_whole_weight(layout):
    losses = lbfgs_losses(layout, partial_forward)
    torch.testing.assert_close(losses, lbfgs_losses(layout, reference_forward))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("layout", ["gathered", "outside"])
def test_a_second_order_gradient_through_a_partial_layer_is_refused(layout):
    layer = partially_trained(layout)
    x = torch.randn(5, 12, requires_grad=True)
    (grad,) = torch.autograd.grad(partial_forward(layer, x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()
