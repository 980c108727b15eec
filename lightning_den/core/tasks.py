"""What every block with one output head per task shares: task ids, head sizes and their checks, the task
that ``forward(x)`` routes to, the activations between layers, and the architecture inside ``state_dict``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_den.core.checks import check_count, check_sizes

#: parameter-free modules that act on each unit alone: a chain of Linear layers with these between them can be
#: converted into a block (units are appended and removed, so the modules must not depend on the width)
ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Identity,
    nn.Dropout,
    nn.AlphaDropout,
)


def activation_modules(activations: Sequence[nn.Module] | None, depth: int) -> nn.ModuleList:
    """The module applied after each of ``depth`` hidden layers: ``activations`` (checked), or ReLU.

    Example:
        >>> activation_modules(None, 2)
        ModuleList(
          (0-1): 2 x ReLU()
        )
    """
    if activations is None:
        return nn.ModuleList(nn.ReLU() for _ in range(depth))
    modules = list(activations)
    if len(modules) != depth:
        raise ValueError(f"`activations` must hold one module per hidden layer ({depth}), got {len(modules)}")
    for module in modules:
        parts = list(module) if isinstance(module, nn.Sequential) else [module]
        wrong = [type(part).__name__ for part in parts if not isinstance(part, ELEMENTWISE)]
        if wrong:
            raise ValueError(
                f"{wrong} cannot sit between the layers of a growing block: units are added and removed, so "
                "only parameter-free elementwise modules (activations, dropout) can; see lightning_den.core."
                "tasks.ELEMENTWISE"
            )
    return nn.ModuleList(modules)


def parse_head_classes(head_classes: int | Sequence[int]) -> int | tuple[int, ...]:
    """``head_classes`` as stored by a block: one int for every task, or a tuple with one per task.

    Example:
        >>> parse_head_classes(2), parse_head_classes([2, 3])
        (2, (2, 3))
    """
    classes = [head_classes] if isinstance(head_classes, int) else list(head_classes)
    if not classes or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in classes):
        raise ValueError(f"`head_classes` must be a positive integer or a list of them, got {head_classes}")
    return int(head_classes) if isinstance(head_classes, int) else tuple(int(c) for c in classes)


def require_tensor(x: Any) -> None:
    """Raise a ``TypeError`` naming the fix unless the inputs ``x`` given to a block are a tensor.

    Example:
        >>> import torch
        >>> try:
        ...     require_tensor([torch.zeros(2, 3), torch.zeros(2)])
        ... except TypeError as error:
        ...     print(str(error).split(":")[0])
        a block takes a tensor of inputs, got list
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"a block takes a tensor of inputs, got {type(x).__name__}: for a batch of (inputs, labels), pass its "
            "inputs (`model(batch[0])`, e.g. in `predict_step`)"
        )


class PerTaskHeads:
    """Mixin of the blocks (``ExpandableMLP``, ``ProgressiveMLP``, ``PackNetMLP``): a subclass defines
    ``num_tasks`` and sets ``head_classes`` (see :func:`parse_head_classes`)."""

    head_classes: int | tuple[int, ...]
    #: what a task owns in this block, for messages
    task_parts = "heads"
    #: the task ``forward(x)`` without a task routes to (set by the callbacks at task boundaries and by
    #: :func:`lightning_den.core.routing.task`)
    active_task: int = 0
    #: how many tasks the block has finished learning
    tasks_learned: int = 0

    in_features: int

    def _checked_shape(
        self, in_features: int, hidden_sizes: Sequence[int], head_classes: int | Sequence[int]
    ) -> tuple[int, ...]:
        """Check a block's constructor arguments, keep ``in_features`` and ``head_classes``, and return the
        hidden sizes as a tuple (every block's constructor starts with this)."""
        self.in_features = check_count("in_features", in_features)
        hidden = check_sizes("hidden_sizes", hidden_sizes)
        self.head_classes = parse_head_classes(head_classes)
        return hidden

    def checked_inputs(self, x: Tensor) -> Tensor:
        """``x``, checked to be ``[batch, in_features]`` (a convolutional block takes images, see
        :class:`~lightning_den.core.convolutional.ConvolutionalBlock`).

        Raises:
            TypeError: ``x`` is not a tensor (e.g. a whole ``(inputs, labels)`` batch).
            ValueError: naming the expected shape.
        """
        require_tensor(x)
        if x.ndim != 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected inputs of shape [batch, {self.in_features}], got {tuple(x.shape)}; "
                "flatten or resize the inputs to the width the network was built with"
            )
        return x

    def routed(self, task: int | None) -> int:
        """``task``, or :attr:`active_task` when it is ``None``."""
        return self.active_task if task is None else task

    def get_extra_state(self) -> dict[str, Any]:
        """The architecture, the active task and the tasks learnt, as plain data (saved in ``state_dict`` under
        ``<block>._extra_state``, ``weights_only``-safe)."""
        return {
            "block": type(self).__name__,
            "architecture": self.architecture(),
            "active_task": self.active_task,
            "tasks_learned": self.tasks_learned,
        }

    @classmethod
    def options_of(cls, architecture: dict[str, Any]) -> dict[str, Any]:
        """The constructor options (beyond the shape a converted chain gives) of the block that saved
        ``architecture``, so that :func:`~lightning_den.core.convert.load_grown` builds it alike: none by default."""
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Grow to the saved architecture; torch calls it before the block's layers load their weights.

        Raises:
            ValueError: when the state was saved by another kind of block (e.g. a CNN into an MLP).
        """
        saved = state.get("block", type(self).__name__)
        if saved != type(self).__name__:
            raise ValueError(
                f"the checkpoint holds a block of type {saved} where this model has one of type "
                f"{type(self).__name__}: build the model the checkpoint was trained with"
            )
        self.rebuild_(state["architecture"])
        self.active_task = int(state["active_task"])
        self.tasks_learned = int(state["tasks_learned"])

    @property
    def num_tasks(self) -> int:
        """Number of tasks that have a head (the newest one may still be in training)."""
        return len(self.heads)

    def first_task_layers(self) -> tuple[list[nn.Module], nn.Module]:
        """Task 0's hidden layers and head (what a converted ``nn.Linear`` chain is copied into)."""
        return list(self.hidden), self.heads["0"]

    @property
    def newest_task(self) -> int:
        return self.num_tasks - 1

    def classes_of(self, task: int) -> int:
        """Number of outputs of the head of ``task`` (``head_classes`` as given at construction)."""
        if isinstance(self.head_classes, int):
            return self.head_classes
        if task >= len(self.head_classes):
            raise ValueError(
                f"`head_classes` lists {len(self.head_classes)} tasks, so there is no head size for task "
                f"{task}; give one number per task or a single number for all tasks"
            )
        return int(self.head_classes[task])

    def check_task(self, task: int) -> None:
        """Raise a ``ValueError`` naming the trained tasks if ``task`` was never trained."""
        if not isinstance(task, int) or isinstance(task, bool):
            raise TypeError(f"`task` must be an int, got {type(task).__name__}")
        if not 0 <= task < self.num_tasks:
            raise ValueError(
                f"task {task} was never trained: this network has {self.task_parts} for tasks "
                f"0..{self.newest_task}. Pass a task id in that range."
            )
