"""Which units a new task uses (BFS, Alg. 2), how far old units moved (drift, Alg. 4), which new units died.

These read weights and return plain lists of ints, so a plan computed on one rank can be broadcast
to the others as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_den.core.den.layers import ExpandableLinear, ExpandableMLP


def select_subnetwork(mlp: ExpandableMLP, task: int, budget: float | None = None) -> list[list[int]]:
    """Breadth-first search from **all** outputs of ``task``'s head down the nonzero weights (Alg. 2).

    The top layer keeps unit ``j`` if any output of the head has a nonzero weight from it; each lower
    layer keeps unit ``i`` if it has a nonzero weight into a kept unit above. The official code looked
    at output column 0 only (bug B2); here every output counts. Zeros are exact (proximal steps).

    ``budget`` (a deviation from the paper, off when ``None``) caps each hidden layer at
    ``max(1, floor(budget * width))`` units: of the units the search reaches, those with the largest total
    ``|w|`` into the units kept above (into the head's outputs for the top layer), ties to the lower
    index. The input features are not capped.

    Returns:
        ``selected[0]`` the input features, then ``selected[l + 1]`` the units of hidden layer ``l``,
        each a sorted list of indices.

    Example:
        >>> mlp = ExpandableMLP(3, [2], head_classes=1)
        >>> with torch.no_grad():
        ...     _ = mlp.hidden[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
        ...     _ = mlp.heads["0"].weight.copy_(torch.tensor([[0.0, 3.0]]))
        >>> select_subnetwork(mlp, 0)
        [[2], [1]]
        >>> _ = mlp.heads["0"].weight.data.fill_(1.0)   # both units reached; a budget of half keeps one
        >>> select_subnetwork(mlp, 0, budget=0.5)
        [[0], [0]]
    """
    mlp.check_task(task)
    widths = mlp.widths(task)
    above = _strongest(_input_strength(mlp.heads[str(task)], None, widths[-1]), budget)
    selected = [above]
    below_widths = (mlp.in_features, *widths[:-1])
    for depth, (layer, width_below) in enumerate(zip(reversed(mlp.hidden), reversed(below_widths), strict=True)):
        inputs = depth == len(mlp.hidden) - 1  # the features below the first layer are never capped
        above = _strongest(_input_strength(layer, above, width_below), None if inputs else budget)
        selected.append(above)
    return [torch.nonzero(mask).flatten().tolist() for mask in reversed(selected)]


def _input_strength(layer: ExpandableLinear, rows: Tensor | None, width_below: int) -> Tensor:
    """The total ``|w|`` from each of the first ``width_below`` units below into ``rows`` (a mask over the
    layer's first units; ``None``: all of them), over every entry of each connection (a filter's kernel slice)."""
    weights = layer.by_input_unit(layer.weight.detach())
    if rows is not None:
        weights = weights[: rows.numel()][rows]
    return weights[:, :width_below].abs().sum(dim=(0, 2))


def _strongest(strength: Tensor, budget: float | None) -> Tensor:
    """Mask of the entries with a nonzero ``strength``; with ``budget``, at most ``max(1, floor(budget * n))``
    of them, the strongest (ties to the lower index)."""
    reached = strength != 0
    if budget is None:
        return reached
    cap = max(1, math.floor(budget * strength.numel() + 1e-9))  # 0.29 * 100 is 28.999999999999996
    if int(reached.sum()) <= cap:
        return reached
    order = torch.sort(strength, descending=True, stable=True).indices[:cap]
    kept = torch.zeros_like(reached)
    kept[order] = True
    return kept & reached


#: what DEN's plan for a split reports beside the units to split: how many per hidden layer, and the largest
#: drift of a unit in each (how far the split is from splitting anything)
SPLIT_KEYS = ("split_units", "largest_drift")

#: the keys of :func:`selection_report`, which DEN's plan for selective retraining carries
SELECTION_KEYS = ("selected_fraction", "selected_inputs", "zero_fraction", "head_zero_fraction")


def selection_report(mlp: ExpandableMLP, task: int, selection: list[list[int]]) -> dict[str, list[float] | float]:
    """What a selection holds, as plain floats (keys :data:`SELECTION_KEYS`): the share of each hidden
    layer's units and of the input features it selected, and the share of exactly-zero weights in each
    hidden layer and in ``task``'s head when the selection is made (after the head fit).

    Example:
        >>> mlp = ExpandableMLP(3, [2], head_classes=1)
        >>> report = selection_report(mlp, 0, [[0, 2], [1]])
        >>> report["selected_fraction"], round(report["selected_inputs"], 3), report["zero_fraction"]
        ([0.5], 0.667, [0.0])
    """
    widths = mlp.widths(task)
    return {
        "selected_fraction": [len(units) / width for units, width in zip(selection[1:], widths, strict=True)],
        "selected_inputs": len(selection[0]) / mlp.in_features,
        "zero_fraction": [_zero_share(layer.weight) for layer in mlp.hidden],
        "head_zero_fraction": _zero_share(mlp.heads[str(task)].weight),
    }


def _zero_share(weight: Tensor) -> float:
    return int((weight.detach() == 0).sum()) / weight.numel()


def unit_drift(mlp: ExpandableMLP, layer: int, reference: Mapping[str, Tensor]) -> Tensor:
    """L2 distance of each old unit's incoming weights from the snapshot, ``rho`` in Alg. 4.

    Only units and inputs that existed in ``reference`` count. Returns ``[units in the snapshot]``.

    Example:
        >>> from lightning_den.core.den.surgery import snapshot
        >>> mlp = ExpandableMLP(2, [2], head_classes=1)
        >>> ref = snapshot(mlp)
        >>> with torch.no_grad():
        ...     mlp.hidden[0].weight[1] += torch.tensor([3.0, 4.0])
        >>> unit_drift(mlp, 0, ref).tolist()
        [0.0, 5.0]
    """
    old = reference[f"hidden.{layer}.weight"]
    current = mlp.hidden[layer].weight.detach()[tuple(map(slice, old.shape))]
    return torch.linalg.vector_norm((current - old.to(current)).flatten(1), dim=1)


def units_to_split(drift: Tensor, threshold: float, limit: int | None = None) -> list[int]:
    """Units whose drift exceeds ``threshold`` (sigma), most drifted first, at most ``limit`` of them.

    The official code sorted ascending and so split the *least* drifted candidates (bug B4).

    Example:
        >>> units_to_split(torch.tensor([0.1, 0.9, 0.0, 0.5]), threshold=0.2)
        [1, 3]
    """
    candidates = torch.nonzero(drift > threshold).flatten()
    order = torch.argsort(drift[candidates], descending=True, stable=True)
    chosen = candidates[order].tolist()
    return chosen if limit is None else chosen[:limit]


def dead_new_units(mlp: ExpandableMLP, layer: int) -> list[int]:
    """Units of hidden layer ``layer`` born in the newest task that output exactly zero for every input.

    That is: all incoming weights exactly zero and ``relu(bias) == 0``. Removing such a unit leaves
    the network's function unchanged (group lasso zeroes a new unit's weights and bias together).

    Example:
        >>> mlp = ExpandableMLP(2, [2], head_classes=1)
        >>> with torch.no_grad():
        ...     _ = mlp.hidden[0].weight[1].zero_(), mlp.hidden[0].bias[1].fill_(-0.5)
        >>> dead_new_units(mlp, 0)
        [1]
    """
    hidden = mlp.hidden[layer]
    silent = (hidden.weight.detach() == 0).flatten(1).all(dim=1) & (hidden.bias.detach() <= 0)
    dead = silent & (hidden.birth == mlp.newest_task)
    return torch.nonzero(dead).flatten().tolist()
