"""PackNet: a fixed-size network whose hidden weights are shared out among tasks (Mallya & Lazebnik, 2018).

Every hidden weight has an owner, kept in an int64 buffer ``owner_{l}`` of the weight's shape (as in the
official ``arunmallya/packnet`` code): ``0`` = free, ``t + 1`` = owned by task ``t``. A new task trains the
free weights only (:meth:`PackNetMLP.trainable_masks`), then :meth:`PackNetMLP.prune_` keeps the largest of
them for it and zeroes the others, which stay free for later tasks (or :meth:`PackNetMLP.claim_free_` gives
it all of them, for the last task); the task is then finished. Inference for a finished task ``s`` uses the
weights owned by ``s`` or earlier tasks and nothing else, so as long as owned weights never change (see
:class:`~lightning_den.core.freezing.FrozenEntries`), earlier tasks are remembered bit for bit.

Biases are shared by all tasks; PackNet trains them in the first task only (freeze them with
``requires_grad_(False)`` from task 1 on). Every task has its own head.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_den.core.convolutional import ConvolutionalBlock, fully_connected, with_weight
from lightning_den.core.init import draw_layer_, fresh_layer
from lightning_den.core.tasks import PerTaskHeads, activation_modules


class PackNetMLP(PerTaskHeads, nn.Module):
    """An MLP of fixed size whose hidden weights are owned by tasks, with one output head per task.

    ``forward(x, task=s)`` masks hidden layer ``l`` with ``1 <= owner_l <= s + 1`` for a finished task
    ``s`` (weights owned by ``s`` or an earlier task) and with ``owner_l <= s + 1`` (free weights too) for
    the newest task while it is still training (until :meth:`prune_` or :meth:`claim_free_`). The number of
    finished tasks is the int64 buffer ``finished_tasks``; like the owners it travels in ``state_dict``.

    Protocol per task ``t``: ``add_task_()`` (not for task 0, whose head exists), train the entries of
    :meth:`trainable_masks` (plus the new head; plus the biases in task 0 only), then :meth:`prune_` (or
    :meth:`claim_free_` for the last task). ``add_task_()`` refuses to start a task before the newest one
    is finished, as that task would own nothing.

    Args:
        in_features: width of the (flattened) input.
        hidden_sizes: number of units per hidden layer (any number of layers, fixed for the network's life).
        head_classes: number of outputs of every task's head, or one number per task.
        activations: the module after each hidden layer (parameter-free, elementwise); ReLU by default.

    Example:
        >>> net = PackNetMLP(8, [6, 4], head_classes=2)
        >>> net(torch.ones(5, 8), task=0).shape
        torch.Size([5, 2])
        >>> net.prune_(0.5)          # task 0 keeps half of each layer's weights
        [24, 12]
        >>> net.add_task_()
        1
        >>> int(net.trainable_masks()["hidden.0.weight"].sum())   # the 24 pruned weights are free for task 1
        24
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        head_classes: int | Sequence[int],
        activations: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        sizes = self._checked_shape(in_features, hidden_sizes, head_classes)
        modules = activation_modules(activations, len(sizes))
        self._hold_layers([nn.Linear(a, b) for a, b in itertools.pairwise([in_features, *sizes])], modules)

    def _hold_layers(self, layers: list[nn.Module], activations: nn.ModuleList) -> None:
        """Take the hidden ``layers`` (``nn.Linear`` or ``nn.Conv2d``, each reading the one before) and the module
        after each; every weight starts free; add task 0's head on the last layer."""
        self.activations = activations
        self.hidden = nn.ModuleList(layers)
        self.hidden_sizes = tuple(layer.weight.shape[0] for layer in layers)
        for index, layer in enumerate(self.hidden):
            self.register_buffer(f"owner_{index}", torch.zeros(layer.weight.shape, dtype=torch.long))
        self.register_buffer("finished_tasks", torch.zeros((), dtype=torch.long))
        self.heads = nn.ModuleDict({"0": nn.Linear(self.hidden_sizes[-1], self.classes_of(0))})
        self._mask_cache: dict[tuple[int, torch.device, torch.dtype], list[Tensor | None]] = {}
        self.register_load_state_dict_post_hook(_forget_masks)

    # --- tasks ---

    @property
    def training_newest(self) -> bool:
        """Whether the newest task is still training (not yet pruned by :meth:`prune_` or :meth:`claim_free_`)."""
        return int(self.finished_tasks) < self.num_tasks

    # --- owners and masks ---

    def widths(self, task: int) -> tuple[int, ...]:
        """Units per hidden layer (fixed: PackNet never grows; tasks differ in the weights they own)."""
        self.check_task(task)
        return self.hidden_sizes

    def num_parameters_through(self, task: int) -> int:
        """Parameters the network held when ``task`` ended: the fixed trunk and heads ``0..task``."""
        self.check_task(task)
        trunk = sum(p.numel() for p in self.hidden.parameters())
        return trunk + sum(p.numel() for t in range(task + 1) for p in self.heads[str(t)].parameters())

    def births(self) -> list[list[int]]:
        """Every unit exists from the first task on."""
        return [[0] * size for size in self.hidden_sizes]

    def owners(self) -> list[Tensor]:
        """The owner buffer of every hidden layer (``0`` = free, ``t + 1`` = task ``t``), in layer order."""
        return [getattr(self, f"owner_{index}") for index in range(len(self.hidden))]

    def owners_changed(self) -> None:
        """Forget cached masks; called by every operation that changes owners or the newest task.

        Call it after writing an owner buffer by hand (``load_state_dict`` calls it itself).
        """
        self._mask_cache.clear()

    def used_by(self, task: int) -> list[Tensor]:
        """Boolean masks of the hidden weights that ``task``'s forward uses, one per hidden layer.

        Example:
            >>> net = PackNetMLP(3, [2], head_classes=1)
            >>> net.used_by(0)[0].all().item()   # task 0 is still training: it uses every (free) weight
            True
            >>> _ = net.prune_(0.5); int(net.used_by(0)[0].sum())   # finished: only the 3 weights it kept
            3
        """
        self.check_task(task)
        if task == self.newest_task and self.training_newest:
            # (owner == 0) | (1 <= owner <= task + 1), with owner >= 0
            return [owner <= task + 1 for owner in self.owners()]
        return [(owner >= 1) & (owner <= task + 1) for owner in self.owners()]

    @torch.no_grad()
    def _masks(self, task: int) -> list[Tensor | None]:
        """Float masks of ``task`` for the forward pass (``None`` where a layer uses every weight)."""
        weight = self.hidden[0].weight
        key = (task, weight.device, weight.dtype)
        if key not in self._mask_cache:
            self._mask_cache[key] = [None if bool(used.all()) else used.to(weight.dtype) for used in self.used_by(task)]
        return self._mask_cache[key]

    def trainable_masks(self) -> dict[str, Tensor]:
        """For the newest task, which hidden weights it trains: True exactly where the weight is free.

        Keys are parameter names (``"hidden.{l}.weight"``); owned weights (False) must stay frozen, e.g.
        with :class:`~lightning_den.core.freezing.FrozenEntries`.

        Example:
            >>> PackNetMLP(3, [2], head_classes=1).trainable_masks()["hidden.0.weight"].shape
            torch.Size([2, 3])
        """
        return {f"hidden.{index}.weight": owner == 0 for index, owner in enumerate(self.owners())}

    def num_parameters(self, task: int | None = None) -> int:
        """Parameters used by ``task`` (its hidden weights, all biases, its head), or all of them if ``None``.

        While a task is training it uses every free weight; once finished, only those it owns and earlier tasks'.

        Example:
            >>> net = PackNetMLP(4, [3], head_classes=2)
            >>> net.num_parameters(0), net.num_parameters()   # 12 + 3 hidden, 6 + 2 head
            (23, 23)
        """
        if task is None:
            return sum(p.numel() for p in self.parameters())
        weights = sum(int(used.sum()) for used in self.used_by(task))
        biases = sum(layer.bias.numel() for layer in self.hidden)
        head = sum(p.numel() for p in self.heads[str(task)].parameters())
        return weights + biases + head

    # --- pruning ---

    def _check_training(self, operation: str) -> int:
        task = self.newest_task
        if not self.training_newest:
            raise ValueError(
                f"task {task} is already finished (prune_ or claim_free_ was called for it), so `{operation}` "
                "would give it more weights; add the next task's head with add_task_() first"
            )
        return task

    def _finish(self, task: int) -> None:
        self.finished_tasks.fill_(task + 1)
        self.owners_changed()

    @torch.no_grad()
    def prune_(self, fraction: float) -> list[int]:
        """Give the newest task the largest ``1 - fraction`` of the free weights of each layer; zero the rest.

        Per hidden layer, among the weights still free (which the newest task has trained),
        ``round((1 - fraction) * free)`` weights are kept (Python's ``round``: halves go to the even
        number), those with the largest ``|w|``; ties are broken towards the lower flat index (row-major),
        so the result is deterministic. Kept weights are marked as owned by the task; the others are set
        to exactly ``0.0`` and stay free for later tasks.

        Args:
            fraction: share of the free weights to prune, ``0 <= fraction < 1``.

        Returns:
            The number of weights kept in each hidden layer.

        Raises:
            ValueError: if ``fraction`` is out of range or the newest task is already finished.

        Example:
            >>> net = PackNetMLP(2, [2], head_classes=1)
            >>> with torch.no_grad():
            ...     _ = net.hidden[0].weight.copy_(torch.tensor([[0.125, -0.5], [0.375, 0.25]]))
            >>> net.prune_(0.5)
            [2]
            >>> net.hidden[0].weight.tolist()
            [[0.0, -0.5], [0.375, 0.0]]
            >>> net.owner_0
            tensor([[0, 1],
                    [1, 0]])
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"`fraction` must be a number, got {type(fraction).__name__}")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(
                f"`fraction` must satisfy 0 <= fraction < 1, got {fraction}; it is the share of the free weights "
                "to prune (use claim_free_() to keep all of them)"
            )
        task = self._check_training("prune_")
        kept_counts = []
        for layer, owner in zip(self.hidden, self.owners(), strict=True):
            weight = layer.weight
            free = (owner == 0).flatten().nonzero().squeeze(1)
            keep = round((1.0 - fraction) * free.numel())
            magnitudes = weight.detach().flatten()[free].abs()
            order = torch.sort(magnitudes, descending=True, stable=True).indices
            kept, pruned = free[order[:keep]], free[order[keep:]]
            owner.view(-1)[kept] = task + 1
            weight.data.view(-1)[pruned] = 0.0
            kept_counts.append(int(kept.numel()))
        self._finish(task)
        return kept_counts

    @torch.no_grad()
    def claim_free_(self) -> list[int]:
        """Give every free weight to the newest task without pruning (for the last task); return counts per layer.

        Example:
            >>> PackNetMLP(3, [2], head_classes=1).claim_free_()
            [6]
        """
        task = self._check_training("claim_free_")
        counts = []
        for owner in self.owners():
            free = owner == 0
            counts.append(int(free.sum()))
            owner.masked_fill_(free, task + 1)
        self._finish(task)
        return counts

    # --- heads ---

    def _new_head(self, outputs: int, generator: torch.Generator | None) -> nn.Linear:
        top = self.hidden[-1].weight
        head = nn.Linear(top.shape[0], outputs).to(device=top.device, dtype=top.dtype)
        if generator is not None:
            draw_layer_(head, generator)
        return head

    def add_task_(self, generator: torch.Generator | None = None) -> int:
        """Add the head of the next task and return its task id.

        ``generator`` draws its initial weights (``nn.Linear``'s distribution); the global RNG if ``None``.

        Raises:
            ValueError: if some hidden layer has no free weight left, or the newest task is still training
                (call :meth:`prune_` or :meth:`claim_free_` first); nothing changes then.
        """
        for index, owner in enumerate(self.owners()):
            if not bool((owner == 0).any()):
                raise ValueError(
                    f"no free weights left in hidden layer {index} ({owner.numel()} weights, all owned by tasks "
                    f"0..{self.newest_task}), so a new task could not learn anything there: the network is full; "
                    "use wider layers or prune a larger fraction"
                )
        if self.training_newest:
            raise ValueError(
                f"task {self.newest_task} is still training: call prune_(fraction) or claim_free_() so that it owns "
                "its weights before adding the next task's head (otherwise its weights go back to the free pool)"
            )
        task = self.num_tasks
        self.heads[str(task)] = self._new_head(self.classes_of(task), generator)
        self.owners_changed()
        return task

    # --- architecture as plain data (checkpoints) ---

    def architecture(self) -> dict[str, Any]:
        """Everything needed to rebuild this network's shapes, as ints and lists (``weights_only``-safe).

        Example:
            >>> PackNetMLP(4, [3], head_classes=2).architecture()
            {'in_features': 4, 'hidden_sizes': [3], 'heads': [[2, 3]]}
        """
        return {
            "in_features": self.in_features,
            "hidden_sizes": list(self.hidden_sizes),
            "heads": [[self.heads[str(t)].out_features, self.heads[str(t)].in_features] for t in range(self.num_tasks)],
        }

    def rebuild_(self, architecture: dict[str, Any]) -> None:
        """Add or drop heads until there are as many as in ``architecture`` (from :meth:`architecture`); idempotent.

        Weights, owner buffers and ``finished_tasks`` then come back through ``load_state_dict``.

        Raises:
            ValueError: if the architecture belongs to a network of another input width, hidden sizes or
                head sizes, or has no head.
        """
        in_features, hidden_sizes = architecture["in_features"], list(architecture["hidden_sizes"])
        heads = [list(map(int, head)) for head in architecture["heads"]]
        if in_features != self.in_features or hidden_sizes != list(self.hidden_sizes):
            raise ValueError(
                f"the saved network has input width {in_features} and hidden sizes {hidden_sizes}, this one "
                f"{self.in_features} and {list(self.hidden_sizes)}: build the model with the configuration "
                "the checkpoint was trained with"
            )
        if not heads:
            raise ValueError("the saved network has 0 heads: a PackNet network holds at least task 0's head")
        for task, (outputs, inputs) in enumerate(heads):
            if inputs != self.hidden_sizes[-1] or outputs != self.classes_of(task):
                raise ValueError(
                    f"the saved head of task {task} is [{outputs}, {inputs}], but this network builds "
                    f"[{self.classes_of(task)}, {self.hidden_sizes[-1]}]: build the model with the "
                    "configuration the checkpoint was trained with"
                )
        for task in range(len(heads), self.num_tasks):  # an earlier state of a network that has grown since
            del self.heads[str(task)]
        for task in range(self.num_tasks, len(heads)):
            with torch.random.fork_rng(devices=[]):  # placeholder weights, overwritten when the checkpoint loads
                self.heads[str(task)] = self._new_head(heads[task][0], None)
        self.owners_changed()

    # --- forward ---

    def features(self, x: Tensor, task: int) -> Tensor:
        """Output of the last hidden layer for ``task``, ``[batch, hidden_sizes[-1]]``."""
        h = self.checked_inputs(x)
        self.check_task(task)
        for layer, activation, mask in zip(self.hidden, self.activations, self._masks(task), strict=True):
            weight = layer.weight if mask is None else layer.weight * mask
            h = activation(with_weight(layer, h, weight))
        return h

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        """Logits of ``task``'s head (:attr:`active_task`'s if ``None``), ``[batch, classes_of(task)]``."""
        task = self.routed(task)
        features = self.features(x, task)
        return self.heads[str(task)](features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden_sizes={list(self.hidden_sizes)}, tasks={self.num_tasks}"


class PackNetCNN(ConvolutionalBlock, PackNetMLP):
    """PackNet on a convolutional network: convolutions, then fully connected layers, whose weights are owned by
    tasks entry by entry (a kernel's entries may belong to different tasks), with one head per task.

    Pruning, owners, masks and the protocol are :class:`PackNetMLP`'s; the hidden layers are the convolutions
    (``hidden_sizes`` lists their filters first) and then the fully connected layers.

    Args:
        in_channels: channels of the input images.
        convolutions: the convolutions (their shapes and settings are taken, the weights drawn afresh; each with
            a bias, ``groups=1`` and zero padding).
        positions: positions per channel of the last convolution's flattened output.
        hidden_sizes: units per fully connected hidden layer (one or more).
        head_classes: outputs of every task's head, or one number per task.
        activations: the module after each layer, as :class:`~lightning_den.core.den.conv.ExpandableCNN`'s.
        in_shape: ``(channels, height, width)`` of one input when known (inputs may then come as rows).

    Example:
        >>> net = PackNetCNN.lenet((1, 8, 8), [4], [6], head_classes=2, kernel_size=3, padding=1)
        >>> net(torch.ones(5, 64), task=0).shape
        torch.Size([5, 2])
        >>> net.prune_(0.5)   # task 0 keeps half of the filters' entries and of the fully connected weights
        [18, 192]
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
    ) -> None:
        nn.Module.__init__(self)
        sizes, convolutions, modules = self._checked_front(
            in_channels, convolutions, positions, hidden_sizes, head_classes, activations, in_shape
        )
        linears = fully_connected(convolutions, positions, sizes)  # drawn first, then the convolutions
        self._hold_layers([*(fresh_layer(conv) for conv in convolutions), *linears], modules)


def _forget_masks(module: PackNetMLP, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: owners may have changed, so cached masks are stale."""
    module.owners_changed()


def free_fraction(net: PackNetMLP) -> float:
    """Share of the hidden weights still free (``0`` when the network is full).

    Example:
        >>> free_fraction(PackNetMLP(3, [2], head_classes=1))
        1.0
    """
    owners = net.owners()
    return sum(int((owner == 0).sum()) for owner in owners) / sum(owner.numel() for owner in owners)
