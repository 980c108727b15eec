"""Routing ``forward(x)`` to a task's head without a ``task`` argument.

Every block (:class:`~lightning_den.core.method.TaskBlock`) has an ``active_task``: what ``block(x)`` computes
when no task is given. The callbacks set it at task boundaries, so a user's ``forward(x)`` and
``training_step`` stay as they were written; :func:`task` evaluates an older task for a while. The active
task is a plain attribute, the same on every rank and saved in the block's checkpoint state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightning_den.core.method import TaskBlock


def task_blocks(model: nn.Module) -> dict[str, TaskBlock]:
    """Every submodule of ``model`` (``model`` itself included) that is a task block."""
    return {name: module for name, module in model.named_modules() if isinstance(module, TaskBlock)}


def set_active_task(model: nn.Module, task_id: int, tasks_learned: int | None = None) -> None:
    """Route every block of ``model`` to ``task_id`` (and record ``tasks_learned``, if given): what the
    callbacks do at task boundaries. A block of a multi-block model that lacks the task is called with an
    explicit one by the model's own ``forward``."""
    for block in task_blocks(model).values():
        block.active_task = task_id
        if tasks_learned is not None:
            block.tasks_learned = tasks_learned


def newest_task_held(model: nn.Module) -> int | None:
    """The newest task any task block of ``model`` has a head (or column) for; ``None`` without blocks (a task
    is held when one block holds it, as :func:`task` routes).

    Example:
        >>> from lightning_den.core.den import ExpandableMLP
        >>> newest_task_held(nn.Sequential(ExpandableMLP(4, [3], head_classes=2))), newest_task_held(nn.Linear(2, 2))
        (0, None)
    """
    return max((block.newest_task for block in task_blocks(model).values()), default=None)


@contextmanager
def task(model: nn.Module, task_id: int) -> Iterator[nn.Module]:
    """Within the block, ``model(x)`` computes task ``task_id``'s output (timestamped inference for an old task).

    Raises:
        ValueError: ``model`` has no task block, or ``task_id`` was never trained.

    Example:
        >>> import torch
        >>> from lightning_den.core.den import ExpandableMLP
        >>> model = nn.Sequential(ExpandableMLP(4, [3], head_classes=[2, 5]))
        >>> _ = model[0].add_task_()
        >>> with task(model, 1):
        ...     model(torch.zeros(1, 4)).shape
        torch.Size([1, 5])
    """
    blocks = list(task_blocks(model).values())
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no task block to route: train it with a lightning_den callback first "
            "(it converts the model's chain of Linear layers)"
        )
    if not any(0 <= task_id < block.num_tasks for block in blocks if isinstance(task_id, int)):
        blocks[0].check_task(task_id)  # raises, naming the trained tasks
    before = [block.active_task for block in blocks]
    set_active_task(model, task_id)
    try:
        yield model
    finally:
        for block, active in zip(blocks, before, strict=True):
            block.active_task = active
