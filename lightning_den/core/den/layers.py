"""Expandable layers: the parameter store of a Dynamically Expandable Network.

Every output unit of an :class:`ExpandableLinear` carries the index of the task in which it was born
(``birth`` buffer). Units are only ever appended, and only units born in the newest task are ever
removed, so the units alive for task ``s`` are always a prefix of each layer. Timestamped inference
for task ``s`` (Yoon et al., 2018, §3 "Timestamped inference") is then a slice ``W[:out(s), :in(s)]``:
a view, no masks, at a cost proportional to the active width.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lightning_den.core.init import draw_layer_, uniform_init
from lightning_den.core.tasks import PerTaskHeads, activation_modules


def mlp_parameters(
    in_features: int, hidden_sizes: Sequence[int], classes: int, entries: Sequence[int] | None = None
) -> int:
    """Parameters of a plain MLP (weights and biases) with one head of ``classes`` outputs; ``entries``: the
    weight entries per pair of units of each hidden layer (a kernel for a convolution; 1 by default).

    Example:
        >>> mlp_parameters(784, [312, 128], 1)   # the paper's MNIST-Variation network, one binary output
        285113
    """
    sizes = [in_features, *hidden_sizes, classes]
    per_pair = [*(entries or [1] * len(hidden_sizes)), 1]
    return sum(a * b * e + b for (a, b), e in zip(itertools.pairwise(sizes), per_pair, strict=True))


class ExpandableLinear(nn.Module):
    """A linear layer whose units can be appended and whose newest units can be removed.

    Args:
        in_features: width of the input.
        out_features: number of units at construction.
        birth_task: task index recorded for the initial units.
        input_group: inputs per unit of the layer below (``in_features`` is a multiple): 1, or the positions of
            each channel of a flattened feature map (the first fully connected layer of an
            :class:`~lightning_den.core.den.conv.ExpandableCNN`).

    Shapes:
        ``weight``: ``[out_features, in_features]`` (``nn.Linear`` layout), ``bias``: ``[out_features]``,
        ``birth``: ``[out_features]`` (int64 buffer, non-decreasing).

    While only the entries outside a leading block train (DEN's expansion: the old units' weights from old
    inputs stay), :meth:`train_outside_` gives those entries Parameters of their own (``weight`` and
    ``bias`` stop requiring gradients), so that an optimizer steps only them; the forward computes bit for bit
    what it computed, and the backward forms the gradients of those entries alone (:meth:`forward_outside`).
    While only a subnetwork trains (DEN's selective retraining), :meth:`gather_` copies its rows and columns
    into compact Parameters that :meth:`forward_gathered` trains, with the gradients of the subnetwork's
    weights alone.

    Example:
        >>> layer = ExpandableLinear(4, 3)
        >>> layer(torch.ones(2, 4)).shape
        torch.Size([2, 3])
        >>> layer(torch.ones(2, 4), out_width=2).shape
        torch.Size([2, 2])
    """

    weight: nn.Parameter
    bias: nn.Parameter
    birth: Tensor
    _gathered_rows: Tensor | None
    _gathered_units: Tensor | None
    _gathered_columns: Tensor | None

    def __init__(self, in_features: int, out_features: int, birth_task: int = 0, input_group: int = 1) -> None:
        super().__init__()
        if input_group < 1 or in_features % input_group:
            raise ValueError(f"`input_group` must divide in_features ({in_features}) into units, got {input_group}")
        #: entries of a row per unit of the layer below: 1, or the positions of a flattened feature map
        self.input_group = input_group
        self._hold(nn.Linear(in_features, out_features), birth_task)

    def _hold(self, reference: nn.Module, birth_task: int) -> None:
        """Take ``reference``'s freshly drawn ``weight`` and ``bias``; every unit is born in ``birth_task``."""
        self.weight = reference.weight
        self.bias = reference.bias
        self.register_buffer("birth", torch.full((self.weight.shape[0],), birth_task, dtype=torch.long))
        self._frozen_block: tuple[int, int] | None = None  # (rows, columns) while train_outside_ holds
        # while gather_ holds: its rows, input units and those units' columns of a Linear weight (None: all).
        # Buffers, so that they follow the module to a device (Lightning moves it to the CPU at teardown)
        for name in GATHER_INDICES:
            self.register_buffer(name, None, persistent=False)
        self._synced_versions: tuple[int, ...] = ()  # the separate Parameters' versions ``weight`` holds

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_units(self) -> int:
        """Units of the layer below this layer reads (input features, or channels of a flattened feature map)."""
        return self.by_input_unit(self.weight).shape[1]

    @property
    def entries_per_unit(self) -> int:
        """Weight entries of one unit for one unit below: 1, the positions of a flattened channel, or a kernel.

        Example:
            >>> ExpandableLinear(12, 2, input_group=4).entries_per_unit, ExpandableLinear(12, 2).entries_per_unit
            (4, 1)
        """
        return self.by_input_unit(self.weight).shape[2]

    def by_input_unit(self, weight: Tensor) -> Tensor:
        """A view of ``weight`` (rows of this layer's layout, a prefix of its columns) as
        ``[rows, input units, entries per unit]``, the layout every unit-level operation works on.

        Example:
            >>> layer = ExpandableLinear(6, 2, input_group=3)  # reads 2 channels of a 3-position feature map
            >>> tuple(layer.by_input_unit(layer.weight).shape)
            (2, 2, 3)
        """
        return weight.unflatten(1, (-1, self.input_group))

    def from_input_units(self, weight: Tensor) -> Tensor:
        """The inverse of :meth:`by_input_unit`: ``[rows, units, entries]`` back to this layer's layout."""
        return weight.flatten(1)

    def input_entries(self, by_unit: Tensor) -> Tensor:
        """``by_unit`` ``[rows, input units]`` (e.g. a mask of trained connections) spread over every entry of
        each connection, in this layer's layout."""
        return self.from_input_units(by_unit[:, :, None].expand(-1, -1, self.entries_per_unit)).contiguous()

    def input_width(self, x: Tensor) -> int:
        """The number of input columns ``x`` carries (a prefix of this layer's)."""
        return x.shape[-1]

    def forward(self, x: Tensor, out_width: int | None = None) -> Tensor:
        """``x @ W[:out_width, :x.shape[-1]].T + b[:out_width]``: the prefix slice, as a view.

        The full layer (the newest task in training) is used as it is, not through a slice covering
        all of it: autograd would give such a slice a backward that writes the whole gradient twice
        (zeros, then a copy), which a dense ``nn.Linear`` never pays. While :meth:`train_outside_` holds,
        the full layer trains through :meth:`forward_outside`.
        """
        whole = out_width in (None, self.out_features) and self.input_width(x) == self.weight.shape[1]
        if self._frozen_block is not None and whole and torch.is_grad_enabled():
            return self.forward_outside(x)
        return self.compute(x, *self._prefix(x, out_width))

    def compute(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """The layer's operation with ``weight`` and ``bias`` (rows and columns of this layer's layout)."""
        return F.linear(x, weight, bias)

    def _prefix(self, x: Tensor, out_width: int | None) -> tuple[Tensor, Tensor]:
        """The weight and bias of the first ``out_width`` units reading the columns ``x`` carries."""
        weight, bias = self.weight, self.bias
        in_width = self.input_width(x)
        if self._frozen_block is not None and not self._inside_frozen_block(in_width, out_width):
            weight, bias = self._assembled()
        if out_width is not None and out_width != weight.shape[0]:
            weight, bias = weight[:out_width], bias[:out_width]
        if in_width != weight.shape[1]:
            weight = weight[:, :in_width]
        return weight, bias

    def _inside_frozen_block(self, in_width: int, out_width: int | None) -> bool:
        """Whether a prefix of these widths reads only frozen entries (an earlier task while new units train)."""
        rows, columns = self._frozen_block
        return out_width is not None and out_width <= rows and in_width <= columns

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    # --- training part of the layer through Parameters of its own ---

    @property
    def gathering(self) -> bool:
        """Whether :meth:`gather_` holds (a subnetwork trains through compact Parameters)."""
        return self._gathered_rows is not None

    @property
    def _gathered(self) -> tuple[Tensor, Tensor] | None:
        """The rows and input units :meth:`gather_` holds (``None`` when it does not)."""
        return None if self._gathered_rows is None else (self._gathered_rows, self._gathered_units)

    @property
    def separated(self) -> bool:
        """Whether :meth:`train_outside_` or :meth:`gather_` holds (the trained entries are Parameters of their
        own)."""
        return self._frozen_block is not None or self.gathering

    @torch.no_grad()
    def train_outside_(self, rows: int, columns: int) -> None:
        """Train only the entries outside ``weight[:rows, :columns]`` (``columns`` in the weight's own layout) and
        ``bias[:rows]``, through Parameters of their own (contiguous copies, so that any optimizer kernel, fused
        ones included, steps exactly them): ``new_unit_weight`` (rows ``rows:``), ``new_unit_bias`` and
        ``old_unit_new_inputs`` (``weight[:rows, columns:]``), each registered only when it is not empty.
        ``weight`` and ``bias`` stop requiring gradients and are brought up to date by :meth:`sync_` (after every
        optimizer step); :meth:`join_` undoes it all (so does any shape change). Rebuild the optimizers afterwards.

        Example:
            >>> layer = ExpandableLinear(3, 4)
            >>> layer.train_outside_(2, 3)
            >>> [name for name, p in layer.named_parameters() if p.requires_grad]
            ['new_unit_weight', 'new_unit_bias']
            >>> sorted(layer.state_dict())  # checkpoints keep the plain layout
            ['bias', 'birth', 'weight']
        """
        if not (0 <= rows <= self.out_features and 0 <= columns <= self.in_features):
            raise ValueError(
                f"the frozen block must fit the layer [{self.out_features}, {self.in_features}], "
                f"got [{rows}, {columns}]"
            )
        self.join_()
        self._frozen_block = (rows, columns)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        for name, entries in self._trained_entries().items():
            if entries.numel():
                self.register_parameter(name, nn.Parameter(entries.clone()))

    @torch.no_grad()
    def sync_(self) -> None:
        """Write the trained Parameters of :meth:`train_outside_` or :meth:`gather_` into ``weight`` and
        ``bias`` (no-op otherwise)."""
        if self.gathering:
            rows, units = self._gathered
            weight, bias = (tensor.detach() for tensor in self.gathered_parameters())
            by_unit, gathered = self.by_input_unit(self.weight.detach()), self.by_input_unit(weight)
            if units.numel() < by_unit.shape[1]:  # whole rows copy fast: write the gathered columns into them first
                gathered = by_unit.index_select(0, rows).index_copy_(1, units, gathered)
            by_unit.index_copy_(0, rows, gathered)
            self.bias.detach().index_copy_(0, rows, bias)
        elif self._frozen_block is not None:
            for name, entries in self._trained_entries().items():
                if name in self._parameters:
                    entries.copy_(self._parameters[name])
        self._synced_versions = self._separate_versions()

    def join_(self) -> None:
        """Back to one ``weight`` and ``bias`` Parameter, up to date and trainable (no-op if neither
        :meth:`train_outside_` nor :meth:`gather_` holds)."""
        if not self.separated:
            return
        self.sync_()
        for name in SEPARATE_PARAMETERS:
            self._parameters.pop(name, None)
        self._frozen_block = None
        for name in GATHER_INDICES:
            setattr(self, name, None)
        self.weight.requires_grad_(True)
        self.bias.requires_grad_(True)

    @torch.no_grad()
    def gather_(self, rows: Tensor, units: Tensor) -> None:
        """Train only the weights of the units ``rows`` from the units below ``units`` (sorted index tensors on
        the layer's device) and those units' biases, through compact copies: ``gathered_weight`` (this layer's
        layout, ``len(rows)`` rows reading ``len(units)`` units below) and ``gathered_bias``, each registered
        only when it is not empty. :meth:`forward_gathered` trains them; ``weight`` and ``bias`` stop
        requiring gradients and are brought up to date by :meth:`sync_` (after every optimizer step), so
        nothing outside the subnetwork changes. :meth:`join_` undoes it (so does any shape change). Rebuild the
        optimizers afterwards.

        Example:
            >>> layer = ExpandableLinear(3, 4)
            >>> layer.gather_(torch.tensor([0, 2]), torch.tensor([1, 2]))
            >>> tuple(layer.gathered_weight.shape), layer(torch.ones(5, 3)).shape  # the full layer still computes
            ((2, 2), torch.Size([5, 4]))
            >>> layer.forward_gathered(torch.ones(5, 2), alone=True).shape  # the subnetwork's inputs and units
            torch.Size([5, 2])
        """
        self.join_()
        self._gathered_rows, self._gathered_units = rows, units
        group = torch.arange(self.entries_per_unit, device=units.device)
        columns = (units[:, None] * self.entries_per_unit + group).flatten()
        self._gathered_columns = None if columns.numel() == self.in_features else columns
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        for name, entries in zip(GATHERED_ENTRIES, self.gathered(self.weight, self.bias), strict=True):
            if entries.numel():
                self.register_parameter(name, nn.Parameter(entries))

    def gathered(self, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """Compact copies of the rows and input units :meth:`gather_` holds, of ``weight`` and ``bias`` (this
        layer's layout: its own, or a snapshot's)."""
        rows, units = self._gathered
        compact = self.by_input_unit(weight.detach()).index_select(0, rows).index_select(1, units)
        return self.from_input_units(compact), bias.detach().index_select(0, rows)

    def gathered_parameters(self) -> tuple[Tensor, Tensor]:
        """The compact weight and bias of :meth:`gather_` (an empty copy where the subnetwork has no entries)."""
        weight, bias = (self._parameters.get(name) for name in GATHERED_ENTRIES)
        if weight is None or bias is None:
            empty_weight, empty_bias = self.gathered(self.weight, self.bias)
            weight = empty_weight if weight is None else weight
            bias = empty_bias if bias is None else bias
        return weight, bias

    def forward_gathered(self, x: Tensor, alone: bool) -> Tensor:
        """This layer in the subnetwork of :meth:`gather_`, with gradients for its compact Parameters (and
        ``x``). ``alone``: ``x`` carries the gathered units below and the output holds the gathered units only.
        Otherwise every unit computes with its current weights, as in :meth:`forward`, and only the gradients
        of the gathered entries are formed: the units outside the subnetwork take part, frozen."""
        if alone:
            return self.compute(x, *self.gathered_parameters())
        self._sync_if_changed_()
        return _PartialGradients.apply(self, self.gathered_gradients, x, *self.gathered_parameters())

    def gathered_gradients(self, x: Tensor, grad: Tensor, input_needed: bool) -> tuple[Tensor | None, Tensor, Tensor]:
        """For the whole layer's output (a newest-task forward), from its input ``x`` and the gradient ``grad`` of
        its output: the gradient of ``x`` (``None`` unless ``input_needed``) and of the gathered weight and bias."""
        rows, _ = self._gathered
        grad_bias = grad.sum(0).index_select(0, rows)  # summed as autograd sums a dense layer's, bit for bit
        columns = self._gathered_columns
        inputs = x if columns is None else x.index_select(1, columns)
        return self._input_gradient(grad, input_needed), grad.index_select(1, rows).T @ inputs, grad_bias

    def forward_outside(self, x: Tensor) -> Tensor:
        """The whole layer while :meth:`train_outside_` holds: its output from its current weights, with gradients
        for ``x`` and the Parameters of the trained entries only (:meth:`outside_gradients`); the frozen block's
        weight gradient is never formed."""
        self._sync_if_changed_()
        trained = (self._parameters.get(name) for name in TRAINED_ENTRIES)
        return _PartialGradients.apply(self, self.outside_gradients, x, *trained)

    def _separate_versions(self) -> tuple[int, ...]:
        """The in-place versions of the Parameters of :meth:`train_outside_` or :meth:`gather_`."""
        return tuple(p._version for name in SEPARATE_PARAMETERS if (p := self._parameters.get(name)) is not None)

    def _sync_if_changed_(self) -> None:
        """Bring ``weight`` and ``bias`` up to date if the separate Parameters changed since :meth:`sync_` (an
        optimizer that evaluates its closure again inside ``step``, e.g. L-BFGS, changes them before any
        post-step write-back); a version check per forward otherwise."""
        if self._separate_versions() != self._synced_versions:
            self.sync_()

    def outside_gradients(self, x: Tensor, grad: Tensor, input_needed: bool) -> tuple[Tensor | None, ...]:
        """For the whole layer's output while :meth:`train_outside_` holds, from its input ``x`` and the gradient
        ``grad`` of its output: the gradient of ``x`` (``None`` unless ``input_needed``) and of each Parameter of
        ``TRAINED_ENTRIES`` (``None`` where there is none), each formed on its own block of the weight."""
        rows, columns = self._frozen_block
        trained = self._parameters
        return (
            self._input_gradient(grad, input_needed),
            grad[:, rows:].T @ x if "new_unit_weight" in trained else None,
            grad.sum(0)[rows:] if "new_unit_bias" in trained else None,  # as autograd sums a dense layer's
            grad[:, :rows].T @ x[:, columns:] if "old_unit_new_inputs" in trained else None,
        )

    def _input_gradient(self, grad: Tensor, needed: bool) -> Tensor | None:
        """The gradient of the whole layer's input from that of its output (``None`` unless ``needed``), in the
        gradient's precision (bf16 under autocast, as a dense layer's)."""
        return grad @ self.weight.detach().to(grad.dtype) if needed else None

    def _trained_entries(self) -> dict[str, Tensor]:
        """Views of ``weight`` and ``bias`` where the Parameters of :meth:`train_outside_` belong."""
        rows, columns = self._frozen_block
        weight, bias = self.weight.detach(), self.bias.detach()
        return {
            "new_unit_weight": weight[rows:],
            "new_unit_bias": bias[rows:],
            "old_unit_new_inputs": weight[:rows, columns:],
        }

    def _assembled(self) -> tuple[Tensor, Tensor]:
        """``weight`` and ``bias`` built from the frozen block and the trained Parameters (so gradients reach
        those, through the gradient of the whole weight): bit for bit the values :meth:`sync_` writes."""
        rows, columns = self._frozen_block
        trained = self._parameters
        top = self.weight[:rows]
        if "old_unit_new_inputs" in trained:
            top = torch.cat([self.weight[:rows, :columns], trained["old_unit_new_inputs"]], dim=1)
        if "new_unit_weight" not in trained:
            return top, self.bias
        weight = torch.cat([top, trained["new_unit_weight"]])
        return weight, torch.cat([self.bias[:rows], trained["new_unit_bias"]])

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self.sync_()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in SEPARATE_PARAMETERS:  # their values are in weight and bias, which are saved whole
            destination.pop(prefix + name, None)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.join_()
        super()._load_from_state_dict(state_dict, prefix, *args)

    # --- shape changes (each replaces the Parameters; optimizers must be rebuilt afterwards) ---

    def _replace_(self, weight: Tensor, bias: Tensor, birth: Tensor) -> None:
        self.join_()
        requires_grad = self.weight.requires_grad
        self.weight = nn.Parameter(weight, requires_grad=requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=requires_grad)
        self.birth = birth

    @torch.no_grad()
    def append_units_(self, weight: Tensor, bias: Tensor, birth_task: int) -> None:
        """Append units with the given incoming ``weight`` (rows of this layer's layout, ``[n, in_features]``
        for a linear layer) and ``bias`` ``[n]``."""
        if weight.shape[1:] != self.weight.shape[1:] or bias.shape != weight.shape[:1]:
            row = ", ".join(map(str, self.weight.shape[1:]))
            raise ValueError(
                f"new units need weight [n, {row}] and bias [n], got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        if self.birth.numel() and birth_task < int(self.birth[-1]):
            raise ValueError(
                f"cannot append units born in task {birth_task} after units born in task "
                f"{int(self.birth[-1])}: units alive for a task must stay a prefix"
            )
        births = torch.full((weight.shape[0],), birth_task, dtype=torch.long, device=self.birth.device)
        self._replace_(
            torch.cat([self.weight, weight.to(self.weight)]),
            torch.cat([self.bias, bias.to(self.bias)]),
            torch.cat([self.birth, births]),
        )

    @torch.no_grad()
    def append_inputs_(self, weights: Tensor) -> None:
        """Append the weights from new units of the layer below, ``[out_features, n, entries per unit]`` (the
        layout of :meth:`by_input_unit`)."""
        shape = (self.out_features, self.entries_per_unit)
        if weights.ndim != 3 or (weights.shape[0], weights.shape[2]) != shape:
            raise ValueError(f"new inputs need shape [{shape[0]}, n, {shape[1]}], got {tuple(weights.shape)}")
        columns = self.from_input_units(weights.to(self.weight))
        self._replace_(torch.cat([self.weight, columns], dim=1), self.bias.clone(), self.birth)

    def new_inputs(self, count: int) -> Tensor:
        """Zero weights from ``count`` new units below, in the layout :meth:`append_inputs_` takes."""
        return self.weight.new_zeros(self.out_features, count, self.entries_per_unit)

    @torch.no_grad()
    def keep_units_(self, keep: Tensor) -> None:
        """Keep the units where the boolean ``keep`` ``[out_features]`` is True; remove the others."""
        self._replace_(self.weight[keep].clone(), self.bias[keep].clone(), self.birth[keep].clone())

    @torch.no_grad()
    def keep_inputs_(self, keep: Tensor) -> None:
        """Keep the weights from the units below where the boolean ``keep`` ``[in_units]`` is True."""
        kept = self.by_input_unit(self.weight)[:, keep]  # a copy (boolean indexing)
        self._replace_(self.from_input_units(kept), self.bias.clone(), self.birth)

    def draw_units(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Incoming weights (rows of this layer's layout) and biases of ``count`` new units, drawn as
        ``nn.Linear`` and ``nn.Conv2d`` draw them: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` over a unit's inputs."""
        weight, bias = uniform_init(count, self.weight[0].numel(), generator, self.weight)
        return weight.view(count, *self.weight.shape[1:]), bias

    @torch.no_grad()
    def resize_(self, out_units: int, in_units: int, births: list[int]) -> None:
        """Give the layer ``out_units`` units reading ``in_units`` units below, with these births, keeping the
        overlapping values (zeros where new).

        Used to rebuild a grown network before its weights are loaded from a checkpoint.
        """
        if len(births) != out_units:
            raise ValueError(f"need one birth per unit ({out_units}), got {len(births)}")
        current = self.by_input_unit(self.weight)
        weight = current.new_zeros(out_units, in_units, *current.shape[2:])
        rows, units = min(out_units, current.shape[0]), min(in_units, current.shape[1])
        weight[:rows, :units] = current[:rows, :units]
        bias = self.bias.new_zeros(out_units)
        bias[:rows] = self.bias[:rows]
        births_tensor = torch.as_tensor(births, dtype=torch.long, device=self.birth.device)
        self._replace_(self.from_input_units(weight), bias, births_tensor)


class _PartialGradients(torch.autograd.Function):
    """A layer's whole output from its current weights, with gradients only for its input and the Parameters
    that train part of it (:meth:`ExpandableLinear.gather_`, :meth:`ExpandableLinear.train_outside_`; their values
    are in the weights: :meth:`~ExpandableLinear.sync_` runs after every step), which ``gradients(x, grad)``
    forms for their entries alone."""

    @staticmethod
    def forward(
        ctx: Any, layer: ExpandableLinear, gradients: Callable[..., tuple], x: Tensor, *trained: Tensor | None
    ) -> Tensor:
        """``trained``: the Parameters, passed so that their gradients reach them (``None`` where absent)."""
        ctx.gradients = gradients
        ctx.save_for_backward(x)
        return layer.compute(x, layer.weight.detach(), layer.bias.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        """The gradients in ``grad``'s precision (under autocast, the forward computed in bf16 or fp16: the input is
        cast as autocast cast it; autograd casts each gradient to its Parameter's dtype)."""
        (x,) = ctx.saved_tensors
        return None, None, *ctx.gradients(x.to(grad.dtype), grad, ctx.needs_input_grad[2])


#: the Parameters :meth:`ExpandableLinear.train_outside_` registers
TRAINED_ENTRIES = ("new_unit_weight", "new_unit_bias", "old_unit_new_inputs")
#: the Parameters :meth:`ExpandableLinear.gather_` registers
GATHERED_ENTRIES = ("gathered_weight", "gathered_bias")
#: every Parameter a layer may hold beside ``weight`` and ``bias``
SEPARATE_PARAMETERS = (*TRAINED_ENTRIES, *GATHERED_ENTRIES)
#: the index buffers (not saved) of :meth:`ExpandableLinear.gather_`
GATHER_INDICES = ("_gathered_rows", "_gathered_units", "_gathered_columns")


class ExpandableMLP(PerTaskHeads, nn.Module):
    """A stack of :class:`ExpandableLinear` layers with ReLU and one output head per task.

    ``forward(x, task=s)`` runs the network as it stood at the end of task ``s``: every hidden layer
    is sliced to the units born at or before ``s`` and the head of task ``s`` reads that prefix.

    Args:
        in_features: width of the (flattened) input.
        hidden_sizes: initial number of units per hidden layer (any number of layers).
        head_classes: number of outputs of every task's head, or one number per task.
        activations: the module after each hidden layer (parameter-free and elementwise, e.g. ``nn.Tanh()`` or
            ``nn.Sequential(nn.ReLU(), nn.Dropout(0.1))``); ReLU by default.

    Example:
        >>> mlp = ExpandableMLP(8, [6, 4], head_classes=2)
        >>> mlp(torch.ones(5, 8), task=0).shape
        torch.Size([5, 2])
        >>> mlp.widths(0)
        (6, 4)
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        head_classes: int | Sequence[int],
        activations: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        hidden_sizes = self._checked_shape(in_features, hidden_sizes, head_classes)
        sizes = [in_features, *hidden_sizes]
        layers = [ExpandableLinear(a, b) for a, b in itertools.pairwise(sizes)]
        self._hold_layers(layers, activation_modules(activations, len(hidden_sizes)))

    def _hold_layers(self, layers: list[ExpandableLinear], activations: nn.ModuleList) -> None:
        """Take the hidden ``layers`` (each reading the units of the one before) and the module after each, and
        add task 0's head on the last."""
        self.activations = activations
        self.hidden = nn.ModuleList(layers)
        self.heads = nn.ModuleDict({"0": ExpandableLinear(layers[-1].out_features, self.classes_of(0))})
        self._width_cache: dict[int, tuple[int, ...]] = {}
        # input units of the subnetwork gather_ holds (None: all); a buffer, to follow the module to a device
        self.register_buffer("_gathered_inputs", None, persistent=False)
        self._gathered_alone = False  # whether nothing outside that subnetwork reaches it
        self.register_load_state_dict_post_hook(_forget_widths)

    # --- tasks and widths ---

    def widths(self, task: int) -> tuple[int, ...]:
        """Number of units of each hidden layer alive for ``task`` (born at or before it)."""
        self.check_task(task)
        if task not in self._width_cache:
            self._width_cache[task] = tuple(int((layer.birth <= task).sum()) for layer in self.hidden)
        return self._width_cache[task]

    def births(self) -> list[list[int]]:
        """The birth task of every unit, per hidden layer."""
        return [layer.birth.tolist() for layer in self.hidden]

    def structure_changed(self) -> None:
        """Forget cached widths; called by every operation that changes shapes or births."""
        self._width_cache.clear()

    def num_parameters(self, task: int | None = None) -> int:
        """Parameters used by ``task``'s prefix network and head, or by the whole network if ``None``."""
        if task is None:
            return sum(map(_weights_and_biases, self._layers()))
        return self.parameters_of(self.widths(task), self.heads[str(task)].out_features)

    def num_parameters_through(self, task: int) -> int:
        """Parameters the network held when ``task`` ended: the prefix of ``task`` and heads ``0..task``."""
        heads = sum(_weights_and_biases(self.heads[str(t)]) for t in range(task + 1))
        return self.parameters_of(self.widths(task), 0) + heads

    def parameters_of(self, widths: Sequence[int], classes: int) -> int:
        """Parameters (weights and biases) of this network's layers at ``widths`` with one head of ``classes``
        outputs (``0``: none); for Linear layers :func:`mlp_parameters`.

        Example:
            >>> ExpandableMLP(784, [312, 128], head_classes=1).parameters_of([312, 128], 1)
            285113
        """
        entries = [layer.entries_per_unit for layer in self.hidden]
        return mlp_parameters(self.in_features, widths, classes, entries)

    def check_prefix_invariant(self) -> None:
        """Raise ``AssertionError`` unless births are non-decreasing in every layer (internal invariant)."""
        for index, layer in enumerate(self.hidden):
            births = layer.birth
            assert bool((births[1:] >= births[:-1]).all()), f"hidden layer {index}: births not sorted"
            assert int(births.max()) <= self.newest_task, f"hidden layer {index}: unit born after newest task"

    # --- architecture as plain data (checkpoints) ---

    def architecture(self) -> dict[str, Any]:
        """Everything needed to rebuild this network's shapes, as ints and lists (``weights_only``-safe).

        Example:
            >>> ExpandableMLP(4, [3], head_classes=2).architecture()
            {'in_features': 4, 'births': [[0, 0, 0]], 'heads': [[2, 3]]}
        """
        return {
            "in_features": self.in_features,
            "births": [layer.birth.tolist() for layer in self.hidden],
            "heads": [[self.heads[str(t)].out_features, self.heads[str(t)].in_features] for t in range(self.num_tasks)],
        }

    def rebuild_(self, architecture: dict[str, Any]) -> None:
        """Resize layers and heads to ``architecture`` (from :meth:`architecture`), dropping heads it does not
        have; idempotent.

        Raises:
            ValueError: if the architecture belongs to a network of another input width or depth.
        """
        births, heads = architecture["births"], architecture["heads"]
        if architecture["in_features"] != self.in_features or len(births) != len(self.hidden):
            raise ValueError(
                f"the saved network has input width {architecture['in_features']} and {len(births)} hidden layers, "
                f"this one {self.in_features} and {len(self.hidden)}: build the model with the configuration "
                "the checkpoint was trained with"
            )
        width_below = self.in_features
        for layer, layer_births in zip(self.hidden, births, strict=True):
            layer.resize_(len(layer_births), width_below, layer_births)
            width_below = len(layer_births)
        for task in range(len(heads), self.num_tasks):  # an earlier state of a network that has grown since
            del self.heads[str(task)]
        for task, (outputs, inputs) in enumerate(heads):
            if str(task) not in self.heads:
                with torch.random.fork_rng(devices=[]):  # placeholder weights, overwritten when the checkpoint loads
                    self.add_task_()
            head = self.heads[str(task)]
            head.resize_(outputs, inputs, [task] * outputs)
        self.structure_changed()

    # --- forward ---

    def features(self, x: Tensor, task: int) -> Tensor:
        """Output of the last hidden layer for ``task``, ``[batch, widths(task)[-1]]``."""
        h = self.checked_inputs(x)
        for layer, activation, width in zip(self.hidden, self.activations, self.widths(task), strict=True):
            h = activation(layer(h, width))
        return h

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        """Logits of ``task``'s head (:attr:`active_task`'s if ``None``), ``[batch, classes_of(task)]``, from
        ``x`` ``[batch, in_features]``.

        While :meth:`gather_` holds, the newest task trains through :meth:`subnetwork` where gradients are
        computed (a training step, in train or eval mode); without gradients (validation, test, predict) and
        for every other task, the whole network runs as it is.
        """
        task = self.routed(task)
        if torch.is_grad_enabled() and task == self.newest_task and self.heads[str(task)].gathering:
            return self.subnetwork(x)
        features = self.features(x, task)
        return self.heads[str(task)](features)

    # --- training a subnetwork (DEN's selective retraining) ---

    def gather_(self, selection: Sequence[Sequence[int]], alone: bool = False) -> None:
        """Train only the newest task's subnetwork ``selection`` (the input units, then the units of each
        hidden layer, as :func:`~lightning_den.core.den.selection.select_subnetwork` returns it) and its head's
        weights from the selected top units, through compact Parameters in every layer
        (:meth:`ExpandableLinear.gather_`); :meth:`subnetwork` computes with them. :meth:`sync_` writes them
        back; :meth:`join_` ends it. Rebuild the optimizers afterwards. ``alone``: the subnetwork computes alone
        even where units outside it reach it (the official DEN code's training; see :meth:`subnetwork`).

        Example:
            >>> mlp = ExpandableMLP(4, [3], head_classes=2)
            >>> mlp.gather_([[0, 1, 2, 3], [0, 2]])
            >>> [name for name, p in mlp.named_parameters() if p.requires_grad]
            ['hidden.0.gathered_weight', 'hidden.0.gathered_bias', 'heads.0.gathered_weight', 'heads.0.gathered_bias']
            >>> mlp.subnetwork(torch.ones(5, 4)).shape
            torch.Size([5, 2])
        """
        self.join_()
        device = self.hidden[0].birth.device
        units = [torch.as_tensor(list(selected), dtype=torch.long, device=device) for selected in selection]
        if len(units) != len(self.hidden) + 1:
            raise ValueError(
                f"a subnetwork names the input units and the units of each of the {len(self.hidden)} hidden layers, "
                f"got {len(units)} lists"
            )
        head = self.heads[str(self.newest_task)]
        layers, rows = [*self.hidden, head], [*units[1:], torch.arange(head.out_features, device=device)]
        self._gathered_alone = alone or not any(
            _reached_from_outside(*each) for each in zip(layers, rows, units, strict=True)
        )
        for layer, kept, below in zip(layers, rows, units, strict=True):
            layer.gather_(kept, below)
        self._gathered_inputs = None if units[0].numel() == self.hidden[0].in_units else units[0]

    def subnetwork(self, x: Tensor) -> Tensor:
        """Logits of the newest task while :meth:`gather_` holds, with gradients for the subnetwork's compact
        Parameters only (inputs ``x`` ``[batch, in_features]``, all of them): Eq. 4's loss, with the units
        outside the subnetwork frozen.

        When no unit outside the subnetwork has a nonzero weight into it (BFS stopped by itself, as it does
        without ``selection_budget``), they cannot change its outputs, so the subnetwork runs alone, as the
        official DEN code built it, at a cost that follows its size. Otherwise (a budget cut the search
        short) every unit runs forward with its current weights and only the gathered weights' gradients are
        formed, unless :meth:`gather_` was asked to run the subnetwork alone all the same (then the units
        outside it are left out of the loss).
        """
        h = self.checked_inputs(x)
        if self._gathered_alone and self._gathered_inputs is not None:
            h = h.index_select(1, self._gathered_inputs)
        for layer, activation in zip(self.hidden, self.activations, strict=True):
            h = activation(layer.forward_gathered(h, self._gathered_alone))
        return self.heads[str(self.newest_task)].forward_gathered(h, self._gathered_alone)

    def sync_(self) -> None:
        """Write the Parameters of every separated layer and head into its ``weight`` and ``bias``."""
        for layer in self._layers():
            layer.sync_()

    def join_(self) -> None:
        """The plain layout for every layer and head: one ``weight`` and ``bias`` each, up to date."""
        for layer in self._layers():
            layer.join_()
        self._gathered_inputs, self._gathered_alone = None, False

    def _layers(self) -> list[ExpandableLinear]:
        return [*self.hidden, *self.heads.values()]

    # --- heads ---

    def add_task_(self, generator: torch.Generator | None = None) -> int:
        """Add the head of the next task, reading all current top-layer units; return its task id.

        ``generator`` draws its initial weights (``nn.Linear``'s distribution); the global RNG if ``None``.
        """
        task = self.num_tasks
        top = self.hidden[-1]
        head = ExpandableLinear(top.out_features, self.classes_of(task), birth_task=task)
        head = head.to(device=top.weight.device, dtype=top.weight.dtype)
        if generator is not None:
            draw_layer_(head, generator)
        self.heads[str(task)] = head
        self.structure_changed()
        return task

    def consumer(self, layer: int) -> ExpandableLinear:
        """The layer that reads hidden layer ``layer``: the next hidden layer, or the newest head."""
        if layer + 1 < len(self.hidden):
            return self.hidden[layer + 1]
        return self.heads[str(self.newest_task)]


def _weights_and_biases(layer: ExpandableLinear) -> int:
    """The entries of ``layer``'s weight and bias: what it holds, whatever Parameters of its own it trains
    through (copies of parts of them)."""
    return layer.weight.numel() + layer.bias.numel()


def _reached_from_outside(layer: ExpandableLinear, rows: Tensor, units: Tensor) -> bool:
    """Whether any unit below outside ``units`` has a nonzero weight into the ``rows`` of ``layer``."""
    outside = torch.ones(layer.in_units, dtype=torch.bool, device=units.device)
    outside[units] = False
    return bool(layer.by_input_unit(layer.weight.detach())[rows][:, outside].any())


def _forget_widths(module: ExpandableMLP, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: births may have changed, so cached widths are stale."""
    module.structure_changed()
