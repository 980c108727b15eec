"""Which entries of the network each DEN phase trains, and which each regulariser touches.

This is DEN's rule in one place (Yoon et al., 2018, Eq. 2-6), as pure functions of the network, the
phase and the BFS selection:

=============  =====================================================  ==========================  ==============
phase          trains (:func:`trainable_entries`)                     L1 proximal step             pull to W^{t-1}
=============  =====================================================  ==========================  ==============
``sparse``     everything (task 0)                                    every trained weight         -
``head_fit``   the new head only                                      the new head's weight        -
``selective``  the selected units' incoming weights from selected     the trained entries          hidden layers
               inputs, their biases, the head's selected columns
``expansion``  new units' incoming weights and biases, old units'     the trained entries, then    -
               inputs from new units, the new head                    group lasso per new unit
``split``      everything but earlier heads                           every trained weight         hidden layers
=============  =====================================================  ==========================  ==============

A regulariser never changes an entry the phase does not train: the L1 and group-lasso targets
(:func:`proximal_targets`) are the trained entries only, and the pull's gradient is masked with the rest.

In ``expansion`` the frozen entries of each hidden layer are a leading block (old units, old inputs), so
:func:`separate_trained_entries_` gives the trained ones Parameters of their own
(:meth:`~lightning_den.core.den.layers.ExpandableLinear.train_outside_`) and
:func:`parameter_entries` says what each Parameter trains: the optimizer then steps no frozen entry, and
needs no mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_den.core.den.layers import SEPARATE_PARAMETERS, ExpandableMLP
from lightning_den.core.den.phases import DENPhase
from lightning_den.core.den.prox import group_lasso_prox_, l1_prox_
from lightning_den.core.freezing import frozen_leading_block
from lightning_den.core.method import Trainable


def _normalise(mask: Tensor) -> Trainable:
    if bool(mask.all()):
        return True
    if not bool(mask.any()):
        return False
    return mask


def trainable_entries(
    mlp: ExpandableMLP, phase: DENPhase, selection: list[list[int]] | None = None
) -> dict[str, Trainable]:
    """Which entries of each parameter ``phase`` trains in the newest task.

    Returns a map from parameter name to ``True`` (every entry), ``False`` (none: the parameter is
    frozen whole) or a boolean mask of the parameter's shape. Heads of earlier tasks are always
    frozen. ``selection`` is the BFS result (:func:`~lightning_den.core.den.selection.select_subnetwork`),
    needed by ``SELECTIVE``.

    Example:
        >>> mlp = ExpandableMLP(4, [3], head_classes=2)
        >>> trainable_entries(mlp, DENPhase.SPARSE)["hidden.0.weight"]
        True
    """
    task = mlp.newest_task
    result: dict[str, Trainable] = {}
    for key in mlp.heads:  # weight and bias by name, however the layers are laid out
        result[f"heads.{key}.weight"] = result[f"heads.{key}.bias"] = key == str(task)
    for index, layer in enumerate(mlp.hidden):
        weight_key, bias_key = f"hidden.{index}.weight", f"hidden.{index}.bias"
        if phase in (DENPhase.SPARSE, DENPhase.SPLIT):
            result[weight_key] = result[bias_key] = True
        elif phase is DENPhase.HEAD_FIT:
            result[weight_key] = result[bias_key] = False
        elif phase is DENPhase.SELECTIVE:
            if selection is None:
                raise ValueError("the selective phase needs the BFS selection of the task's subnetwork")
            rows = _index_mask(selection[index + 1], layer.out_features, layer.birth.device)
            cols = _index_mask(selection[index], layer.in_units, layer.birth.device)
            result[weight_key] = _normalise(layer.input_entries(rows[:, None] & cols[None, :]))
            result[bias_key] = _normalise(rows)
        else:  # EXPANSION: new units' incoming weights, and the old units' inputs from new units
            rows = layer.birth == task
            cols = torch.zeros(layer.in_units, dtype=torch.bool, device=layer.birth.device)
            if index > 0:
                cols = mlp.hidden[index - 1].birth == task
            result[weight_key] = _normalise(layer.input_entries(rows[:, None] | cols[None, :]))
            result[bias_key] = _normalise(rows)
    if phase is DENPhase.SELECTIVE:
        head = mlp.heads[str(task)]
        columns = _index_mask(selection[-1], head.in_units, head.birth.device)
        result[f"heads.{task}.weight"] = _normalise(head.input_entries(columns[None, :].expand(head.out_features, -1)))
    return result


def separate_trained_entries_(mlp: ExpandableMLP, entries: dict[str, Trainable]) -> None:
    """Give the trained entries of every hidden layer whose frozen entries (``entries``, from
    :func:`trainable_entries`) are a leading block of its weight and bias (possibly empty) Parameters of
    their own; the other layers get their plain layout back. Rebuild the optimizers afterwards.

    Example:
        >>> from lightning_den.core.den.surgery import add_units_
        >>> mlp = ExpandableMLP(4, [3], head_classes=2)
        >>> _ = mlp.add_task_(), add_units_(mlp, [2], torch.Generator().manual_seed(0))
        >>> separate_trained_entries_(mlp, trainable_entries(mlp, DENPhase.EXPANSION))
        >>> tuple(mlp.hidden[0].new_unit_weight.shape)
        (2, 4)
    """
    for index, layer in enumerate(mlp.hidden):
        weight, bias = (
            _frozen_block(entries[f"hidden.{index}.{name}"], getattr(layer, name).shape) for name in ("weight", "bias")
        )
        if weight is not None and bias == weight[:1]:
            layer.train_outside_(weight[0].stop, weight[1].stop)
        else:
            layer.join_()


def _frozen_block(trained: Trainable, shape: torch.Size) -> tuple[slice, ...] | None:
    """The frozen leading block of a parameter of ``shape`` (empty when every entry trains, all of it when
    none does); ``None`` if its frozen entries are not a leading block."""
    if isinstance(trained, bool):
        return tuple(slice(0 if trained else size) for size in shape)
    return frozen_leading_block(trained)


def parameter_entries(mlp: ExpandableMLP, entries: dict[str, Trainable]) -> dict[nn.Parameter, Trainable]:
    """``entries`` (by name, from :func:`trainable_entries`) per Parameter of ``mlp`` as it is laid out now: a
    layer separated by :func:`separate_trained_entries_` or gathered by :meth:`ExpandableMLP.gather_` trains its
    own Parameters, not its weight and bias."""
    result: dict[nn.Parameter, Trainable] = {}
    for name, param in mlp.named_parameters():
        layer_name, _, attribute = name.rpartition(".")
        result[param] = attribute in SEPARATE_PARAMETERS if mlp.get_submodule(layer_name).separated else entries[name]
    return result


def _index_mask(indices: list[int], size: int, device: torch.device) -> Tensor:
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    mask[indices] = True
    return mask


@dataclass(frozen=True)
class ProximalTarget:
    """What DEN's proximal steps touch in one trained weight: L1 on all of ``weight``; then, in expansion,
    group lasso on ``new_rows`` (the new units' incoming weights) with their ``new_biases``."""

    weight: Tensor
    new_rows: Tensor | None = None
    new_biases: Tensor | None = None

    def step_(self, l1: float, group: float) -> None:
        """L1 with threshold ``l1`` (``lr * mu``), *then* group lasso with ``group`` (``lr * gamma``).

        The official code ran both on the same variables at once, so the last one won (bug B6).
        """
        l1_prox_([self.weight], l1)
        if self.new_rows is not None:
            group_lasso_prox_([self.new_rows], group, None if self.new_biases is None else [self.new_biases])


def proximal_targets(
    mlp: ExpandableMLP, trainable: dict[str, Trainable], phase: DENPhase
) -> dict[nn.Parameter, ProximalTarget]:
    """For every weight the phase trains (``trainable``, from :func:`trainable_entries`): its proximal target.

    ``trainable`` maps the names of ``mlp``'s Parameters as laid out for the phase (every trained entry in a
    Parameter that trains whole: :func:`separate_trained_entries_`, :meth:`ExpandableMLP.gather_`) to what
    they train. L1 acts on each trained weight. Group lasso acts in ``EXPANSION`` on the units born in the
    newest task: the ``new_unit_weight`` of each separated hidden layer, with its ``new_unit_bias``.

    Raises:
        ValueError: if a Parameter trains only some of its entries (the block is not laid out for the phase).

    Example:
        >>> mlp = ExpandableMLP(4, [3], head_classes=2)
        >>> targets = proximal_targets(mlp, trainable_entries(mlp, DENPhase.SPARSE), DENPhase.SPARSE)
        >>> sorted(tuple(t.weight.shape) for t in targets.values())
        [(2, 3), (3, 4)]
    """
    params = dict(mlp.named_parameters())
    if phase is DENPhase.EXPANSION:
        joined = [
            i
            for i, layer in enumerate(mlp.hidden)
            if not layer.separated and trainable[f"hidden.{i}.weight"] is not False
        ]
        if joined:
            raise ValueError(
                f"hidden layers {joined} train in expansion without their new units' own Parameters, so group "
                "lasso has nothing to act on: lay them out with `separate_trained_entries_` first"
            )
    targets: dict[nn.Parameter, ProximalTarget] = {}
    for name, entries in trainable.items():
        if not name.endswith(("weight", "new_inputs")) or entries is False:
            continue
        weight = params[name].detach()
        new_rows = new_biases = None
        if phase is DENPhase.EXPANSION and name.endswith("new_unit_weight"):
            new_rows, new_biases = weight, params[name.replace("weight", "bias")].detach()
        if entries is not True:
            raise ValueError(
                f"{name} trains only some of its entries in {phase.value}: lay the block out for the phase first "
                "(`DENMethod.arrange`), so that every trained entry is in a Parameter of its own"
            )
        targets[params[name]] = ProximalTarget(weight, new_rows=new_rows, new_biases=new_biases)
    return targets


@dataclass(frozen=True)
class DriftTarget:
    """A hidden parameter pulled toward W^{t-1}: the block of it that existed then (``leading``, ``None``
    when that is all of it), that block's ``values``, its ``reference`` and room for their difference."""

    param: nn.Parameter
    leading: tuple[slice, ...] | None
    values: Tensor
    reference: Tensor
    scratch: Tensor

    def grad(self) -> Tensor | None:
        """The gradient of the entries the pull acts on (``None`` before the first backward)."""
        if self.param.grad is None:
            return None
        return self.param.grad if self.leading is None else self.param.grad[self.leading]


def drift_targets(mlp: ExpandableMLP, phase: DENPhase, reference: dict[str, Tensor]) -> list[DriftTarget]:
    """The hidden parameters pulled toward W^{t-1} (``reference``, from
    :func:`~lightning_den.core.den.surgery.snapshot`): in ``SELECTIVE`` and ``SPLIT`` only (Eq. 4, 6); a
    gathered layer's compact Parameters toward the same rows and columns of W^{t-1}
    (:meth:`ExpandableMLP.gather_`).

    Example:
        >>> from lightning_den.core.den.surgery import snapshot
        >>> mlp = ExpandableMLP(4, [3], head_classes=2)
        >>> len(drift_targets(mlp, DENPhase.SELECTIVE, snapshot(mlp))), drift_targets(mlp, DENPhase.SPARSE, {})
        (2, [])
    """
    if phase not in (DENPhase.SELECTIVE, DENPhase.SPLIT):
        return []
    targets = []
    for index, layer in enumerate(mlp.hidden):
        saved = [reference[f"hidden.{index}.{name}"] for name in ("weight", "bias")]
        if layer.gathering:
            for param, compact in zip(layer.gathered_parameters(), layer.gathered(*saved), strict=True):
                if isinstance(param, nn.Parameter):
                    targets.append(DriftTarget(param, None, param.detach(), compact, torch.empty_like(compact)))
            continue
        for param, old in zip((layer.weight, layer.bias), saved, strict=True):
            leading = None if param.shape == old.shape else tuple(map(slice, old.shape))
            values = param.detach() if leading is None else param.detach()[leading]
            targets.append(DriftTarget(param, leading, values, old, torch.empty_like(values)))
    return targets
