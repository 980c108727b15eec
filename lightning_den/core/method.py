"""The two protocols every continual-learning method of the package follows, in pure torch.

A **task block** (:class:`TaskBlock`) is the part of a model that grows with the task sequence:
:class:`~lightning_den.core.den.layers.ExpandableMLP` (DEN, fine-tuning, EWC),
:class:`~lightning_den.core.progressive.block.ProgressiveMLP` and
:class:`~lightning_den.core.packnet.block.PackNetMLP`. It adds a task, says its widths, and describes
and rebuilds its architecture as plain data (checkpoints).

A **task method** (:class:`TaskMethod`) is the algorithm over a block: its phases (one ``Enum``), which
phase follows which, the surgery plan at a boundary (plain data, so rank 0 can decide it for every rank)
and applying it, which entries each phase trains, and the regulariser steps around each optimizer step.
Methods know nothing of Lightning; :class:`lightning_den.driver.TaskSequenceCallback` runs them in a fit.

Example:
    >>> from lightning_den.core.den import DENMethod, ExpandableMLP
    >>> method, block = DENMethod(), ExpandableMLP(4, [3], head_classes=2)
    >>> isinstance(block, TaskBlock), method.first_phase()
    (True, <DENPhase.SPARSE: 'sparse'>)
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_den.core.checks import check_count

#: what a phase does with one parameter: train all of it (True), none (False), or the entries of a mask
Trainable = bool | Tensor


def stepped_by(optimizer: torch.optim.Optimizer) -> set[Tensor]:
    """The parameters ``optimizer`` steps (a penalty gradient goes to those of the optimizer about to step).

    Example:
        >>> weight, bias = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
        >>> stepped_by(torch.optim.SGD([weight], lr=0.1)) == {weight}
        True
    """
    return {p for group in optimizer.param_groups for p in group["params"]}


@runtime_checkable
class TaskBlock(Protocol):
    """What grows with the task sequence: one output head (or column) per task, widths per task, and its
    architecture as plain data."""

    #: what a task owns in this block, for messages ("heads", "columns")
    task_parts: str
    #: the task ``forward(x)`` without a task routes to
    active_task: int
    #: how many tasks the block has finished learning
    tasks_learned: int

    @property
    def num_tasks(self) -> int:
        """Tasks that have a head (the newest may still be in training)."""

    @property
    def newest_task(self) -> int:
        """The task being trained (``num_tasks - 1``)."""

    def add_task_(self, generator: torch.Generator | None = None) -> int:
        """Add what the next task needs (head, column), drawn from ``generator``; return the task id."""

    def classes_of(self, task: int) -> int:
        """Outputs of ``task``'s head."""

    def check_task(self, task: int) -> None:
        """Raise ``ValueError`` if ``task`` has no head."""

    def widths(self, task: int) -> tuple[int, ...]:
        """Units per hidden layer that ``task`` uses."""

    def num_parameters(self, task: int | None = None) -> int:
        """Parameters ``task`` uses, or all of them (``None``)."""

    def num_parameters_through(self, task: int) -> int:
        """Parameters the block held when ``task`` ended."""

    def architecture(self) -> dict[str, Any]:
        """Everything needed to rebuild the block's shapes, as ints and lists."""

    def rebuild_(self, architecture: dict[str, Any]) -> None:
        """Resize to ``architecture`` (weights are loaded afterwards)."""

    def first_task_layers(self) -> tuple[list[nn.Module], nn.Module]:
        """Task 0's hidden layers and head (what a converted chain of ``nn.Linear`` layers is copied into)."""


@dataclass
class PhaseProgress:
    """Where a task sequence stands: the task, its phase, epochs run in the phase, the last epoch's loss."""

    task: int = 0
    phase: StrEnum | None = None
    epochs: int = 0
    last_loss: float = math.inf

    def state_dict(self) -> dict[str, Any]:
        """Plain data (the phase as its string value), for ``weights_only`` checkpoints."""
        return {"task": self.task, "phase": str(self.phase), "epochs": self.epochs, "last_loss": self.last_loss}


def phase_is_done(progress: PhaseProgress, epochs: int, mean_loss: float, tolerance: float) -> bool:
    """True when the phase has used its epochs, or its mean loss has levelled off.

    Levelled off: this epoch's mean training loss differs from the previous epoch's by less than
    ``tolerance`` times the previous one, in either direction.

    Example:
        >>> phase_is_done(PhaseProgress(epochs=5), 5, 1.0, 0.0)
        True
        >>> phase_is_done(PhaseProgress(epochs=2, last_loss=1.0), 5, 0.9995, 1e-3)
        True
    """
    if progress.epochs >= epochs:
        return True
    if tolerance <= 0 or not math.isfinite(progress.last_loss):
        return False
    return abs(progress.last_loss - mean_loss) < tolerance * abs(progress.last_loss)


class TaskMethod(ABC):
    """A continual-learning method over a :class:`TaskBlock`, without Lightning.

    Subclasses set :attr:`phases`, :attr:`block_type` and :attr:`name`, and define the abstract methods.
    Every decision is a function of the block and the progress, so the whole per-task pipeline can be
    stepped through in a unit test (see ``tests/core/test_den_method.py``).

    Args:
        seed: seed of every random initialisation the method makes (the same on every rank).
    """

    #: the method's phases, in the order a task meets them; the first is the first task's phase
    phases: ClassVar[type[StrEnum]]
    #: the kind of block the method trains
    block_type: ClassVar[type[nn.Module]]
    #: name used in messages and logs
    name: ClassVar[str]
    #: parameters of the model outside the block train in every task (True) or in the first only (False:
    #: later tasks keep the features earlier tasks were trained on)
    trains_outside_block: ClassVar[bool] = False
    #: phases whose parameters :meth:`arrange` lays out otherwise than plainly (their optimizer state too), with
    #: the format of the driver's checkpoint state since which they have that layout
    arranged_phases: ClassVar[dict[str, int]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A concrete method must name its phases, block type and name (checked when the class is made)."""
        super().__init_subclass__(**kwargs)
        missing = [name for name in ("phases", "block_type", "name") if not hasattr(cls, name)]
        if missing and not inspect.isabstract(cls):
            raise TypeError(f"{cls.__name__} must set the class attributes {missing} of a TaskMethod")

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_count("seed", seed, minimum=0)

    # ------------------------------------------------------------------ phases

    def first_phase(self) -> StrEnum:
        """The phase of the first task."""
        return next(iter(self.phases))

    def start(self) -> PhaseProgress:
        """Task 0 in its first phase."""
        return PhaseProgress(task=0, phase=self.first_phase())

    @abstractmethod
    def phase_epochs(self, phase: StrEnum) -> int:
        """Most epochs ``phase`` may run."""

    @abstractmethod
    def max_epochs(self, num_tasks: int) -> int:
        """Most epochs a sequence of ``num_tasks`` tasks can take."""

    @abstractmethod
    def following_phase(self, progress: PhaseProgress, mean_loss: float, num_tasks: int) -> PhaseProgress | None:
        """The phase after ``progress``'s (given its last epoch's mean loss), or ``None`` after the last task."""

    def phase_done(self, progress: PhaseProgress, mean_loss: float, tolerance: float) -> bool:
        """True when the phase ends with the epoch just ended: by default when it has used its epochs or its
        mean loss levelled off (:func:`phase_is_done`). ``progress`` counts that epoch, ``progress.last_loss``
        is the epoch before's mean loss. A method overrides it for a phase whose end its loss does not tell
        (DEN: expansion, whose group lasso prunes on after the loss levels off)."""
        return phase_is_done(progress, self.phase_epochs(progress.phase), mean_loss, tolerance)

    def progress_after(self, learned: int, num_tasks: int) -> tuple[PhaseProgress, PhaseProgress]:
        """For a model that learnt tasks ``0..learned-1``: the last phase it ran and the one that follows
        (the first phase of task ``learned``), walking the phases as if every loss were high."""
        previous, target = None, self.start()
        while target is not None and target.task < learned:
            previous, target = target, self.following_phase(target, math.inf, num_tasks)
        if previous is None or target is None:
            raise ValueError(f"no task follows task {learned - 1} in a stream of {num_tasks} tasks")
        return replace(previous, epochs=1, last_loss=math.nan), target

    def block_options(self) -> dict[str, Any]:
        """Keyword arguments of :attr:`block_type` when a user's chain of Linear layers is converted into it."""
        return {}

    # ------------------------------------------------------------------ surgery

    def check_stream(self, block: nn.Module, first_task: int, num_tasks: int) -> None:
        """Raise ``ValueError`` before anything changes if tasks ``first_task..num_tasks-1`` cannot be learnt."""
        return None

    def plan(self, block: nn.Module, progress: PhaseProgress, target: PhaseProgress, num_tasks: int) -> dict[str, Any]:
        """The surgery for going from ``progress`` to ``target``, as plain data (decided once, for every rank)."""
        return {}

    @abstractmethod
    def apply(self, block: nn.Module, progress: PhaseProgress, target: PhaseProgress, plan: dict[str, Any]) -> None:
        """Carry out ``plan`` (a new task's head or column, growth, pruning) before ``target`` is entered."""

    def end_plan(self, block: nn.Module, progress: PhaseProgress) -> dict[str, Any]:
        """The surgery after the last phase of the stream, as plain data (e.g. pruning)."""
        return {}

    def apply_end(self, block: nn.Module, plan: dict[str, Any]) -> None:
        """Carry out :meth:`end_plan`'s plan."""
        return None

    def consolidate(self, model: nn.Module, block: nn.Module, task: int, batches: Callable[[], Iterable[Any]]) -> None:
        """Learn what the finished ``task`` needs kept (e.g. EWC's Fisher) from its training data (``batches()``
        builds the loader, only for a method that reads it);
        ``model(x, task=task)`` gives its logits. Called before the next task's surgery."""
        return None

    # ------------------------------------------------------------------ what trains, and the regularisers

    def arrange(self, block: nn.Module, progress: PhaseProgress | None) -> None:
        """Give the block's parameters the layout ``progress``'s phase trains best, before :meth:`trainable` is
        asked (DEN's expansion: the new units' entries as Parameters of their own, so that the optimizer steps
        no frozen entry); ``None``: the plain layout, at the end of a fit or after an exception. The function
        the block computes must not change."""
        return None

    @abstractmethod
    def trainable(self, block: nn.Module, progress: PhaseProgress) -> dict[nn.Parameter, Trainable]:
        """What ``progress``'s phase trains: for every parameter of the block, True, False or a boolean mask."""

    def enter_phase(self, block: nn.Module, progress: PhaseProgress, trainable: dict[nn.Parameter, Trainable]) -> None:
        """Set up the phase's regularisers on the block's device; ``trainable`` is what the driver trains and
        freezes in the phase (:meth:`trainable`'s entries for the block), so regularisers follow the same masks."""
        return None

    def before_step(self, model: nn.Module, block: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Add penalty gradients to the parameters ``optimizer`` steps (after backward, before its step and the
        gradient masks; a model with several optimizers gets each parameter's penalty once)."""
        return None

    def after_step(self, block: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Proximal steps after the optimizer step (before frozen entries are written back)."""
        return None

    def release(self) -> None:
        """Drop what refers to a finished fit's optimizer (called at teardown)."""
        return None

    # ------------------------------------------------------------------ state and display

    def status(self, progress: PhaseProgress) -> dict[str, str]:
        """What a progress bar shows beside the task and phase."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The method's own state for checkpoints (plain data and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` saved."""
        return None

    def generator(self, task: int, stream: int) -> torch.Generator:
        """The same random numbers on every rank: seeded by ``seed``, the task and what they are for."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + task) * 7 + stream)


def head_of_task_only(heads: nn.ModuleDict, task: int) -> dict[nn.Parameter, Trainable]:
    """Every head's parameters: trainable for ``task``'s head, frozen for the others."""
    return {p: int(key) == task for key, head in heads.items() for p in head.parameters()}


class SinglePhase(StrEnum):
    """The one phase of the methods that train each task once (Progressive Networks, fine-tuning, EWC)."""

    TRAIN = "train"


class EpochsPerTaskMethod(TaskMethod):
    """A method with one ``train`` phase of at most ``epochs_per_task`` epochs per task.

    Args:
        epochs_per_task: most epochs of each task.
        seed: see :class:`TaskMethod`.
    """

    phases = SinglePhase

    def __init__(self, epochs_per_task: int = 20, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.epochs_per_task = check_count("epochs_per_task", epochs_per_task)

    def phase_epochs(self, phase: StrEnum) -> int:
        return self.epochs_per_task

    def max_epochs(self, num_tasks: int) -> int:
        return num_tasks * self.epochs_per_task

    def following_phase(self, progress: PhaseProgress, mean_loss: float, num_tasks: int) -> PhaseProgress | None:
        if progress.task + 1 >= num_tasks:
            return None
        return PhaseProgress(task=progress.task + 1, phase=SinglePhase.TRAIN)
