"""Progressive Networks (Rusu et al., 2016): one column per task, earlier columns frozen.

Column ``k`` is an MLP of its own. With lateral connections, each of its hidden layers ``l >= 1`` and
its head also read the layer-``(l - 1)`` outputs of the earlier columns ``0..k-1`` through a non-linear
adapter ``alpha * U(relu(V(a)))`` (the paper's "reduce, act, project" adapter with a learned scale).
The first hidden layer reads only the raw input: lateral connections over copies of the input would
only add parameters.

``forward(x, task=s)`` runs columns ``0..s`` and the head of column ``s``; nothing of a later column
is ever run. Adding a column freezes every earlier one, so the outputs of a task never change once
later columns exist (zero forgetting), and the parameters grow roughly quadratically with tasks.
``lateral=False`` gives independent columns: one separate network per task.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_den.core.checks import check_flag
from lightning_den.core.convolutional import ConvolutionalBlock, fully_connected
from lightning_den.core.init import conv_settings, draw_layer_, fresh_layer
from lightning_den.core.tasks import PerTaskHeads, activation_modules

#: Initial value of every adapter's learned scale ``alpha``: laterals start as a small perturbation.
ALPHA_INIT = 0.01


class LateralAdapter(nn.Module):
    """Non-linear lateral adapter ``alpha * U(relu(V(a)))`` from earlier columns into one layer.

    ``V`` reduces the earlier columns' outputs ``a`` (concatenated along dim 1) to the width of one column's,
    ``U`` maps that as the layer it feeds does, without a bias (the layer has one). Into a fully connected layer
    both are ``nn.Linear``; into a convolution ``V`` is a 1x1 convolution over the channels and ``U`` a
    convolution of the layer's kernel, stride, padding and dilation (Rusu et al., 2016, §2: convolutional
    laterals reduce channels with 1x1 convolutions). Into the fully connected layer that reads a flattened
    feature map, ``V`` reduces the channels at each of its ``positions`` alike (a 1x1 convolution over the
    earlier columns' maps) and ``U`` is a Linear over the flattened result. ``alpha`` scales the adapter's
    output; Rusu et al. scale its input, which differs by ``V``'s bias.

    Args:
        V: the reduction.
        U: the projection into the layer, without a bias.
        positions: positions per channel of the flattened feature maps ``a`` holds (``None``: ``a`` is not one).

    Example:
        >>> adapter = LateralAdapter.into(nn.Linear(3, 2), columns=2)
        >>> adapter(torch.ones(4, 6)).shape
        torch.Size([4, 2])
        >>> round(adapter.alpha.item(), 6)
        0.01
    """

    def __init__(self, V: nn.Module, U: nn.Module, positions: int | None = None) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(ALPHA_INIT))
        self.V = V
        self.U = U
        self.positions = positions

    @classmethod
    def into(cls, layer: nn.Module, columns: int, positions: int | None = None) -> LateralAdapter:
        """The adapter feeding ``layer`` (an ``nn.Linear`` or ``nn.Conv2d``) from ``columns`` earlier columns
        whose outputs have the width of ``layer``'s input (flattened feature maps of ``positions`` per channel,
        when given).

        Example:
            >>> LateralAdapter.into(nn.Conv2d(4, 6, 3, padding=1), columns=2).V
            Conv2d(8, 4, kernel_size=(1, 1), stride=(1, 1))
            >>> LateralAdapter.into(nn.Linear(12, 5), columns=2, positions=4).V   # 3 channels of 4 positions
            Conv1d(6, 3, kernel_size=(1,), stride=(1,))
        """
        if isinstance(layer, nn.Conv2d):
            reduced = layer.in_channels
            V = nn.Conv2d(columns * reduced, reduced, 1)
            return cls(V, nn.Conv2d(reduced, layer.out_channels, **conv_settings(layer), bias=False))
        U = nn.Linear(layer.in_features, layer.out_features, bias=False)
        if positions is None:
            return cls(nn.Linear(columns * layer.in_features, layer.in_features), U)
        channels = layer.in_features // positions
        return cls(nn.Conv1d(columns * channels, channels, 1), U, positions)

    def forward(self, a: Tensor) -> Tensor:
        if self.positions is None:
            return self.alpha * self.U(F.relu(self.V(a)))
        maps = a.unflatten(1, (-1, self.positions))  # [batch, columns x channels, positions]
        return self.alpha * self.U(F.relu(self.V(maps)).flatten(1))

    def draw_(self, generator: torch.Generator) -> None:
        """Redraw ``V`` and ``U`` from ``generator`` (the distribution of torch's layers, see
        :func:`~lightning_den.core.init.draw_layer_`); ``alpha`` is reset."""
        with torch.no_grad():
            self.alpha.fill_(ALPHA_INIT)
        draw_layer_(self.V, generator)
        draw_layer_(self.U, generator)


class ProgressiveColumn(nn.Module):
    """The column of task ``task``: hidden layers, head and (if lateral and ``task > 0``) adapters.

    ``laterals[l - 1]`` feeds hidden layer ``l`` (``1 <= l < depth``) and ``laterals[depth - 1]`` feeds
    the head; the first hidden layer has no adapter.

    Args:
        hidden: the column's hidden layers (``nn.Linear``, or ``nn.Conv2d`` then ``nn.Linear``), freshly built.
        classes: number of outputs of the head.
        task: index of the column; it reads the ``task`` earlier columns.
        lateral: whether to build the lateral adapters.
        activations: the module after each hidden layer, checked by the block (each column holds its own copies).

    Example:
        >>> hidden, relus = [nn.Linear(5, 4), nn.Linear(4, 3)], [nn.ReLU(), nn.ReLU()]
        >>> column = ProgressiveColumn(hidden, classes=2, task=2, lateral=True, activations=relus)
        >>> [adapter.V.in_features for adapter in column.laterals]   # 2 earlier columns × 4, then × 3
        [8, 6]
    """

    def __init__(
        self, hidden: Sequence[nn.Module], classes: int, task: int, lateral: bool, activations: Sequence[nn.Module]
    ) -> None:
        super().__init__()
        self.activations = nn.ModuleList(copy.deepcopy(a) for a in activations)
        self.hidden = nn.ModuleList(hidden)
        self.head = nn.Linear(hidden[-1].weight.shape[0], classes)
        self.laterals = nn.ModuleList()
        if lateral and task > 0:
            for below, layer in zip(self.hidden, [*self.hidden[1:], self.head], strict=True):
                flattened = isinstance(below, nn.Conv2d) and not isinstance(layer, nn.Conv2d)
                positions = layer.in_features // below.out_channels if flattened else None
                self.laterals.append(LateralAdapter.into(layer, task, positions))

    def draw_(self, generator: torch.Generator) -> None:
        """Redraw every layer from ``generator``: hidden layers bottom-up, head, then adapters."""
        for layer in [*self.hidden, self.head]:
            draw_layer_(layer, generator)
        for adapter in self.laterals:
            adapter.draw_(generator)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters used only by this column's head: the head and the adapter feeding it."""
        parameters = list(self.head.parameters())
        if len(self.laterals):
            parameters += list(self.laterals[-1].parameters())
        return parameters


class ProgressiveMLP(PerTaskHeads, nn.Module):
    """A Progressive Network of MLP columns, one per task; column 0 (task 0) exists after construction.

    Args:
        in_features: width of the (flattened) input.
        hidden_sizes: number of units per hidden layer of every column (one or more layers).
        head_classes: number of outputs of every task's head, or one number per task.
        lateral: lateral adapters from earlier columns (Progressive Networks); ``False`` gives
            independent columns, i.e. one separate network per task.
        activations: the module after each hidden layer (parameter-free, elementwise; every column gets
            copies); ReLU by default.

    Example:
        >>> pnn = ProgressiveMLP(8, [6, 4], head_classes=2)
        >>> pnn.add_task_(torch.Generator().manual_seed(0))
        1
        >>> pnn(torch.ones(5, 8), task=1).shape
        torch.Size([5, 2])
        >>> [p.requires_grad for p in pnn.column_parameters(0)][:2]
        [False, False]
    """

    task_parts = "columns"

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        head_classes: int | Sequence[int],
        lateral: bool = True,
        activations: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        sizes = self._checked_shape(in_features, hidden_sizes, head_classes)
        blueprint = [nn.Linear(a, b, device="meta") for a, b in itertools.pairwise([in_features, *sizes])]
        self._hold_columns(lateral, blueprint, activation_modules(activations, len(sizes)))

    def _hold_columns(self, lateral: bool, blueprint: list[nn.Module], activations: nn.ModuleList) -> None:
        """Keep the lateral setting, every column's hidden layers as ``blueprint`` (shapes and settings on the meta
        device) and the module after each, and build task 0's column."""
        self.lateral = check_flag("lateral", lateral)
        # plain lists: what every new column copies (each column registers its own layers and modules)
        self._blueprint = blueprint
        self.hidden_sizes = tuple(layer.weight.shape[0] for layer in blueprint)
        self._activations = list(activations)
        self.columns = nn.ModuleList([self._new_column(0)])

    def first_task_layers(self) -> tuple[list[nn.Module], nn.Module]:
        """Task 0's hidden layers and head (what a converted ``nn.Linear`` chain is copied into)."""
        return list(self.columns[0].hidden), self.columns[0].head

    # --- tasks ---

    @property
    def num_tasks(self) -> int:
        """Number of tasks that have a column (the newest one may still be in training)."""
        return len(self.columns)

    # --- columns ---

    def _new_column(self, task: int) -> ProgressiveColumn:
        hidden = [fresh_layer(layer) for layer in self._blueprint]
        return ProgressiveColumn(hidden, self.classes_of(task), task, self.lateral, self._activations)

    def add_task_(self, generator: torch.Generator | None = None) -> int:
        """Add the column of the next task, freeze every earlier column, and return the new task id.

        ``generator`` draws the new column's weights (``nn.Linear``'s distribution), so every process with
        the same seed draws the same values; the global RNG if ``None``. The new parameters take the
        device and dtype of the existing ones. The earlier columns get ``requires_grad=False`` and their
        gradients are dropped (set to ``None``), so optimizers skip them. Optimizers must be rebuilt (or be
        given the new parameters).
        """
        task = self.num_tasks
        column = self._new_column(task)
        if generator is not None:
            column.draw_(generator)
        reference = self.columns[0].head.weight
        column = column.to(device=reference.device, dtype=reference.dtype)
        for earlier in self.columns:
            earlier.requires_grad_(False)
            for parameter in earlier.parameters():
                parameter.grad = None  # so that no optimizer (momentum, weight decay) can step a frozen column
        self.columns.append(column)
        return task

    def widths(self, task: int) -> tuple[int, ...]:
        """Units per hidden layer that ``task`` computes with (its column and, with laterals, all earlier ones)."""
        self.check_task(task)
        return tuple(len(self.columns_used(task)) * size for size in self.hidden_sizes)

    def num_parameters_through(self, task: int) -> int:
        """Parameters the network held when ``task`` ended: columns ``0..task``."""
        self.check_task(task)
        return sum(p.numel() for k in range(task + 1) for p in self.columns[k].parameters())

    def births(self) -> list[list[int]]:
        """The task of every unit, per hidden layer (column ``k``'s units were born in task ``k``)."""
        return [[k for k in range(self.num_tasks) for _ in range(size)] for size in self.hidden_sizes]

    def column_parameters(self, task: int) -> list[nn.Parameter]:
        """The parameters of column ``task``: its hidden layers, head and lateral adapters."""
        self.check_task(task)
        return list(self.columns[task].parameters())

    def num_parameters(self, task: int | None = None) -> int:
        """Parameters used to compute ``task``, or all parameters if ``None``.

        For a task: every parameter of :meth:`columns_used` except the heads of the other columns (a
        column's head includes the lateral adapter feeding it, which only that head uses). With
        ``lateral=False`` this is the column of ``task`` alone: one plain MLP.

        Example:
            >>> pnn = ProgressiveMLP(3, [4], head_classes=2, lateral=False)
            >>> pnn.num_parameters(0)   # 3·4 + 4 + 4·2 + 2
            26
        """
        if task is None:
            return sum(p.numel() for p in self.parameters())
        columns = [self.columns[k] for k in self.columns_used(task)]
        used = sum(p.numel() for column in columns for p in column.parameters())
        other_heads = sum(p.numel() for column in columns[:-1] for p in column.head_parameters())
        return used - other_heads

    # --- architecture as plain data (checkpoints) ---

    def architecture(self) -> dict[str, Any]:
        """Everything needed to rebuild this network's shapes, as ints, lists and bools (``weights_only``-safe).

        Example:
            >>> ProgressiveMLP(4, [3], head_classes=2).architecture()
            {'in_features': 4, 'hidden_sizes': [3], 'lateral': True, 'columns': 1, 'heads': [2]}
        """
        return {
            "in_features": self.in_features,
            "hidden_sizes": list(self.hidden_sizes),
            "lateral": self.lateral,
            "columns": self.num_tasks,
            "heads": [column.head.out_features for column in self.columns],
        }

    @classmethod
    def options_of(cls, architecture: dict[str, Any]) -> dict[str, Any]:
        """Whether the saved network had lateral adapters.

        Example:
            >>> ProgressiveMLP.options_of(ProgressiveMLP(4, [3], head_classes=2, lateral=False).architecture())
            {'lateral': False}
        """
        return {"lateral": bool(architecture.get("lateral", True))}

    def rebuild_(self, architecture: dict[str, Any]) -> None:
        """Add columns until there are as many as in ``architecture`` (from :meth:`architecture`); idempotent.

        Used before loading a checkpoint's weights; the columns added here are drawn from the global RNG
        and meant to be overwritten by ``load_state_dict``.

        Raises:
            ValueError: if the architecture belongs to a network of another input width, hidden sizes,
                lateral setting or head sizes, or has fewer columns than this one.
        """
        mine = self.architecture()
        for key in ("in_features", "hidden_sizes", "lateral"):
            saved = architecture.get(key)
            if saved != mine[key]:
                raise ValueError(
                    f"the saved network has {key}={saved}, this one {key}={mine[key]}: build the model with "
                    "the configuration the checkpoint was trained with"
                )
        columns = architecture.get("columns")
        if not isinstance(columns, int) or columns < self.num_tasks:
            raise ValueError(
                f"the saved network has {columns} columns, this one already {self.num_tasks}: columns cannot be "
                "removed; rebuild a freshly constructed model"
            )
        heads = list(architecture.get("heads", []))
        if len(heads) != columns:
            raise ValueError(f"the saved architecture lists {len(heads)} head sizes for {columns} columns")
        for task, classes in enumerate(heads):
            if classes != self.classes_of(task):
                raise ValueError(
                    f"the saved head of task {task} has {classes} outputs, this network gives it "
                    f"{self.classes_of(task)}: build the model with the `head_classes` of the checkpoint"
                )
        with torch.random.fork_rng(devices=[]):  # placeholder weights, overwritten when the checkpoint loads
            while self.num_tasks < columns:
                self.add_task_()

    # --- forward ---

    def columns_used(self, task: int) -> range:
        """The columns that ``task``'s output is computed from: ``0..task`` if lateral, else ``task`` alone."""
        self.check_task(task)
        return range(task + 1) if self.lateral else range(task, task + 1)

    def _states(self, x: Tensor, columns: range) -> dict[int, list[Tensor]]:
        x = self.checked_inputs(x)
        states: dict[int, list[Tensor]] = {}
        for k in columns:
            column = self.columns[k]
            h = x
            own: list[Tensor] = []
            for layer, (linear, activation) in enumerate(zip(column.hidden, column.activations, strict=True)):
                z = linear(h)
                if layer >= 1 and len(column.laterals):
                    z = z + column.laterals[layer - 1](torch.cat([states[j][layer - 1] for j in range(k)], dim=1))
                h = activation(z)
                own.append(h)
            states[k] = own
        return states

    def hidden_states(self, x: Tensor, task: int) -> list[list[Tensor]]:
        """Hidden-layer outputs (after ReLU) of columns ``0..task``: ``states[column][layer]``.

        Only columns ``0..task`` are run, so no state of a column depends on a later one.

        Example:
            >>> pnn = ProgressiveMLP(3, [4, 2], head_classes=1)
            >>> _ = pnn.add_task_()
            >>> [[tuple(h.shape) for h in column] for column in pnn.hidden_states(torch.ones(5, 3), task=1)]
            [[(5, 4), (5, 2)], [(5, 4), (5, 2)]]
        """
        self.check_task(task)
        states = self._states(x, range(task + 1))
        return [states[k] for k in range(task + 1)]

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        """Logits of ``task``'s head (:attr:`active_task`'s if ``None``), ``[batch, classes_of(task)]``, from
        ``x`` ``[batch, in_features]``.

        Runs only :meth:`columns_used` (never a column after ``task``).
        """
        task = self.routed(task)
        states = self._states(x, self.columns_used(task))
        column = self.columns[task]
        logits = column.head(states[task][-1])
        if len(column.laterals):
            logits = logits + column.laterals[-1](torch.cat([states[j][-1] for j in range(task)], dim=1))
        return logits


class ProgressiveCNN(ConvolutionalBlock, ProgressiveMLP):
    """Progressive Networks of convolutional columns: each column is convolutions, then fully connected layers,
    and a head. A column's convolution ``l >= 1`` reads the earlier columns' feature maps after convolution
    ``l - 1`` (and its module, e.g. pooling) through a 1x1 convolution and one of the layer's kernel; its first
    fully connected layer reads their flattened maps, as in :class:`ProgressiveMLP`.

    Args:
        in_channels: channels of the input images.
        convolutions: the convolutions of every column (their shapes and settings are taken, each column draws
            its own weights; each with a bias, ``groups=1`` and zero padding).
        positions: positions per channel of the last convolution's flattened output.
        hidden_sizes: units per fully connected hidden layer of every column (one or more).
        head_classes: outputs of every task's head, or one number per task.
        activations: the module after each layer, as :class:`~lightning_den.core.den.conv.ExpandableCNN`'s.
        in_shape: ``(channels, height, width)`` of one input when known (inputs may then come as rows).
        lateral: lateral adapters from earlier columns; ``False`` gives one separate CNN per task.

    Example:
        >>> pnn = ProgressiveCNN.lenet((1, 8, 8), [4, 6], [10], head_classes=2, kernel_size=3, padding=1)
        >>> pnn.add_task_(torch.Generator().manual_seed(0))
        1
        >>> pnn(torch.ones(5, 1, 8, 8), task=1).shape
        torch.Size([5, 2])
        >>> pnn.widths(1)   # filters and units task 1 computes with: two columns
        (8, 12, 20)
    """

    def __init__(
        self,
        in_channels: int,
        convolutions: Sequence[nn.Conv2d],
        positions: int,
        hidden_sizes: Sequence[int],
        head_classes: int | Sequence[int],
        activations: Sequence[nn.Module] | None = None,
        in_shape: Sequence[int] | None = None,
        lateral: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        sizes, convolutions, modules = self._checked_front(
            in_channels, convolutions, positions, hidden_sizes, head_classes, activations, in_shape
        )
        convolutions = [fresh_layer(conv, device="meta") for conv in convolutions]
        blueprint = [*convolutions, *fully_connected(convolutions, positions, sizes, device="meta")]
        self._hold_columns(lateral, blueprint, modules)
