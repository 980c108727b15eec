"""What every block with one output head per task shares: task ids, head sizes, and their checks."""

from __future__ import annotations

from collections.abc import Sequence


def parse_head_classes(head_classes: int | Sequence[int]) -> int | tuple[int, ...]:
    """``head_classes`` as stored by a block: one int for every task, or a tuple with one per task.

    Example:
        >>> parse_head_classes(2), parse_head_classes([2, 3])
        (2, (2, 3))
    """
    classes = [head_classes] if isinstance(head_classes, int) else list(head_classes)
    if not classes or any(isinstance(c, bool) or int(c) < 1 for c in classes):
        raise ValueError(f"`head_classes` must be a positive integer or a list of them, got {head_classes}")
    return int(head_classes) if isinstance(head_classes, int) else tuple(int(c) for c in classes)


class PerTaskHeads:
    """Mixin of the blocks (``ExpandableMLP``, ``ProgressiveMLP``, ``PackNetMLP``): a subclass defines
    ``num_tasks`` and sets ``head_classes`` (see :func:`parse_head_classes`)."""

    head_classes: int | tuple[int, ...]
    #: what a task owns in this block, for messages
    task_parts = "heads"

    @property
    def num_tasks(self) -> int:
        raise NotImplementedError

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
