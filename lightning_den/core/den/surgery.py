"""Shape-changing operations on an :class:`~lightning_den.core.den.layers.ExpandableMLP`.

Every operation checks its arguments before it changes anything, returns plain data (lists of ints)
describing what it did, and preserves the function of every earlier task bit for bit: new units are
appended after the prefix that earlier tasks read, and only units born in the newest task can be
removed. Optimizers hold the replaced Parameters, so they must be rebuilt after any of these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_den.core.den.layers import ExpandableMLP

Snapshot = dict[str, Tensor]


def snapshot(mlp: ExpandableMLP) -> Snapshot:
    """Copies of every hidden layer's ``weight`` and ``bias`` (W^{t-1} in the paper), keyed by name.

    Example:
        >>> mlp = ExpandableMLP(4, [3], head_classes=2)
        >>> sorted(snapshot(mlp))
        ['hidden.0.bias', 'hidden.0.weight']
    """
    return {
        f"hidden.{index}.{name}": getattr(layer, name).detach().clone()
        for index, layer in enumerate(mlp.hidden)
        for name in ("weight", "bias")
    }


def _check_layer(mlp: ExpandableMLP, layer: int) -> None:
    if not 0 <= layer < len(mlp.hidden):
        raise ValueError(f"hidden layer {layer} does not exist: the network has layers 0..{len(mlp.hidden) - 1}")


def add_units_(mlp: ExpandableMLP, counts: Sequence[int], generator: torch.Generator) -> list[int]:
    """Append ``counts[l]`` units to each hidden layer ``l``, born in the newest task (Eq. 5).

    New units get ``nn.Linear``-style random incoming weights over the whole (grown) input and zero
    outgoing weights, so the newest task's function is unchanged until they are trained, and earlier
    tasks never see them (they lie past those tasks' prefix). Returns the indices of the first new
    unit per layer.

    Example:
        >>> mlp = ExpandableMLP(4, [3, 2], head_classes=2)
        >>> add_units_(mlp, [2, 1], torch.Generator().manual_seed(0))
        [3, 2]
        >>> [layer.out_features for layer in mlp.hidden]
        [5, 3]
    """
    if len(counts) != len(mlp.hidden) or any(int(c) < 0 for c in counts):
        raise ValueError(f"need one non-negative unit count per hidden layer ({len(mlp.hidden)}), got {list(counts)}")
    task = mlp.newest_task
    starts = []
    for index, (layer, count) in enumerate(zip(mlp.hidden, counts, strict=True)):
        starts.append(layer.out_features)
        if count == 0:
            continue
        weight, bias = layer.draw_units(int(count), generator)
        layer.append_units_(weight, bias, task)
        consumer = mlp.consumer(index)
        consumer.append_inputs_(consumer.new_inputs(int(count)))
    mlp.structure_changed()
    return starts


def duplicate_units_(mlp: ExpandableMLP, layer: int, units: Sequence[int]) -> list[int]:
    """Append a copy of each of ``units`` of hidden layer ``layer``, born in the newest task (Alg. 4).

    A copy gets the unit's current incoming weights and bias and a copy of its outgoing weights into
    the next layer (or the newest head). Returns the indices of the copies, in the order given.

    Example:
        >>> mlp = ExpandableMLP(4, [3], head_classes=2)
        >>> duplicate_units_(mlp, 0, [1])
        [3]
        >>> torch.equal(mlp.hidden[0].weight[3], mlp.hidden[0].weight[1])
        True
    """
    _check_layer(mlp, layer)
    hidden = mlp.hidden[layer]
    if any(not 0 <= u < hidden.out_features for u in units):
        raise ValueError(f"units {list(units)} out of range for hidden layer {layer} ({hidden.out_features} units)")
    if not units:
        return []
    index = torch.as_tensor(list(units), dtype=torch.long, device=hidden.weight.device)
    first = hidden.out_features
    consumer = mlp.consumer(layer)
    outgoing = consumer.by_input_unit(consumer.weight.detach())[:, index].clone()
    hidden.append_units_(hidden.weight[index].detach().clone(), hidden.bias[index].detach().clone(), mlp.newest_task)
    consumer.append_inputs_(outgoing)
    mlp.structure_changed()
    return list(range(first, first + len(units)))


@torch.no_grad()
def restore_units_(mlp: ExpandableMLP, layer: int, units: Sequence[int], reference: Mapping[str, Tensor]) -> None:
    """Reset the incoming weights and bias of ``units`` to their values in ``reference`` (a :func:`snapshot`).

    Columns that did not exist in the snapshot (inputs from units born since) are set to zero, so a
    restored unit computes exactly what it computed when the snapshot was taken.
    """
    _check_layer(mlp, layer)
    old_weight = reference[f"hidden.{layer}.weight"]
    old_bias = reference[f"hidden.{layer}.bias"]
    if any(not 0 <= u < old_weight.shape[0] for u in units):
        raise ValueError(
            f"units {list(units)} of hidden layer {layer} did not exist in the snapshot "
            f"({old_weight.shape[0]} units): only older units can be restored"
        )
    if not units:
        return
    hidden = mlp.hidden[layer]
    index = torch.as_tensor(list(units), dtype=torch.long, device=hidden.weight.device)
    hidden.weight[index] = 0
    hidden.weight[index, : old_weight.shape[1]] = old_weight[index].to(hidden.weight)
    hidden.bias[index] = old_bias[index].to(hidden.bias)


def prune_units_(mlp: ExpandableMLP, layer: int, units: Sequence[int]) -> None:
    """Remove ``units`` of hidden layer ``layer`` and their outgoing weights.

    Only units born in the newest task may be removed: that keeps every earlier task's prefix intact.

    Example:
        >>> mlp = ExpandableMLP(4, [3], head_classes=2)
        >>> mlp.add_task_()
        1
        >>> _ = add_units_(mlp, [2], torch.Generator().manual_seed(0))
        >>> prune_units_(mlp, 0, [3])
        >>> mlp.hidden[0].out_features
        4
    """
    _check_layer(mlp, layer)
    hidden = mlp.hidden[layer]
    births = hidden.birth.tolist()
    wrong = [u for u in units if not 0 <= u < len(births) or births[u] != mlp.newest_task]
    if wrong:
        raise ValueError(
            f"cannot prune units {wrong} of hidden layer {layer}: only units born in the newest task "
            f"({mlp.newest_task}) can be removed without changing earlier tasks"
        )
    if len(set(units)) >= hidden.out_features:
        raise ValueError(
            f"cannot prune all {hidden.out_features} units of hidden layer {layer}: a layer needs at least one unit"
        )
    if not units:
        return
    keep = torch.ones(hidden.out_features, dtype=torch.bool, device=hidden.weight.device)
    keep[list(units)] = False
    hidden.keep_units_(keep)
    mlp.consumer(layer).keep_inputs_(keep)
    mlp.structure_changed()
