r"""
The Lightning driver
^^^^^^^^^^^^^^^^^^^^

:class:`TaskSequenceCallback` runs any :class:`~lightning_den.core.method.TaskMethod` (DEN, Progressive
Networks, PackNet, fine-tuning, EWC) on a whole task stream in one ``trainer.fit``, and does only
Lightning's part: the hooks, the decisions reduced over ranks, the surgery plan broadcast from rank 0,
rebuilding the DDP wrapper, optimizers and schedulers after the surgery
(:func:`~lightning_den.boundary.cross_boundary`), the gradient masks and write-backs of frozen entries, and
the checkpoint state. At the end of an epoch it decides, on the epoch's mean training loss, whether the
phase ends; the surgery for the next phase is planned then and applied at the start of the next epoch.

The public callbacks (``DENCallback``, ``ProgressiveCallback``, ...) each pair one method with this driver.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from enum import StrEnum
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, StochasticWeightAveraging, Timer, WeightAveraging
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_den.boundary import (
    TaskBoundary,
    check_optimizers_cover,
    cross_boundary,
    notify_boundary,
    rebuild_training_objects,
)
from lightning_den.core.checks import check_number
from lightning_den.core.convert import attach_blocks, saved_blocks
from lightning_den.core.freezing import FrozenEntries
from lightning_den.core.method import PhaseProgress, TaskMethod, Trainable
from lightning_den.core.routing import set_active_task, task_blocks
from lightning_den.data.module import TASK_STREAM_API
from lightning_den.module import EPOCH_END, refuse_resuming_within_an_epoch
from lightning_den.progress import show_task_and_phase
from lightning_den.rng import random_state, set_random_state
from lightning_den.routed_evaluation import RoutedEvaluation, serve_every_task_held

#: what Lightning sets `max_epochs` to when neither it nor `max_steps`/`max_time` is given
_LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


class TaskSequenceCallback(RoutedEvaluation):
    """Runs a task method on a LightningModule over a whole task stream in one fit.

    The module is a :class:`~lightning_den.DENLightningModule`, or any LightningModule whose MLP part is an
    ``nn.Sequential`` of ``nn.Linear`` layers: that chain is converted in place at ``setup`` into the method's
    block (:func:`~lightning_den.core.convert.attach_block`), computing bit for bit what it computed, and the
    module's ``forward(x)`` then routes to the current task's head.

    Several blocks (``block=["encoder", "decoder"]``) each get their own copy of the method: the same
    phases at the same time, each block's own surgery, selection and regularisers, as peft adapts every
    module it targets. Fine-tuning and EWC train the whole model and take one block.

    Args:
        method: the algorithm (pure torch): its phases, surgery, trainable entries and regularisers.
        block: name of the module's block to train, or of the ``nn.Sequential`` of Linear layers to convert
            into it (found automatically when there is exactly one block of the method's type, or else exactly
            one such chain), or a list of such names.
        convergence_tol: a phase ends early once its mean training loss changes by less than this
            fraction from one epoch to the next (where the method lets it:
            :meth:`~lightning_den.core.method.TaskMethod.phase_done`);
            ``0`` runs every phase for its full epochs.

    Example::

        from lightning_den.core.den import DENMethod

        callback = TaskSequenceCallback(DENMethod(units_per_expansion=5))   # what DENCallback(...) builds
        sequence_trainer([callback]).fit(DENMLP(64, [32], num_classes=2), datamodule=SplitDigits())
    """

    def __init__(
        self, method: TaskMethod, block: str | Sequence[str] | None = None, convergence_tol: float = 1e-3
    ) -> None:
        if not isinstance(method, TaskMethod):
            raise MisconfigurationException(f"`method` must be a TaskMethod, got {type(method).__name__}")
        self.method = method
        self.block = _block_names(block, method)
        self.convergence_tol = configured(check_number, "convergence_tol", convergence_tol)
        self.progress = method.start()
        self._pending: tuple[PhaseProgress, dict[str, Any]] | None = None
        self._blocks: dict[str, nn.Module] = {}
        self._methods: dict[str, TaskMethod] = {}
        self._load_check: Any = None  # the model's load_state_dict pre-hook (see `_refuse_other_blocks`)
        self._frozen = FrozenEntries({})
        self._step_hooks: list[Any] = []
        self._resumed = False
        self._finished = False
        self._continued: TaskBoundary | None = None
        self._in_epoch = False
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._batches = 0  # of the epoch so far
        self._cut_short: tuple[int, int] | None = None  # batches run and due in an epoch the Trainer stopped
        self._sanity_steps: float | None = None  # the Trainer's, while a fit skips its sanity check
        self._fitting = False  # whether the Trainer's stage is a fit (set at `setup`, before checkpoints load)

    # ------------------------------------------------------------------ what the driver shows

    @property
    def phase(self) -> StrEnum:
        """The phase being trained (a member of the method's phase ``Enum``)."""
        return self.progress.phase

    def status(self) -> dict[str, Any]:
        """What the progress bar shows: the task, the phase, and what the method adds."""
        # text: bars show numbers as floats
        return {"task": str(self.progress.task), "phase": str(self.phase), **self.method.status(self.progress)}

    def widths(self) -> tuple[int, ...]:
        """Units per hidden layer of the (first named) block now (for logs and boundaries)."""
        return _widths(self.model_block)

    @property
    def model_block(self) -> Any:
        """The block the method trains, the first named one when there are several (found at ``setup``)."""
        if not self._blocks:
            raise RuntimeError(f"{type(self).__name__} is not attached: call `trainer.fit` first")
        return next(iter(self._blocks.values()))

    def _each(self) -> Iterator[tuple[str, Any, TaskMethod]]:
        """Every block the callback trains, by name, with its method."""
        for name, block in self._blocks.items():
            yield name, block, self._methods[name]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the method can run here and find (or convert) the block, before optimizers exist.

        For ``validate``/``test``/``predict`` only the block is found or converted, so that a checkpoint of a
        grown network loads into a user's freshly built module (``trainer.test(MyModel(), ckpt_path=...)``).
        """
        self._fitting = stage == "fit"  # an evaluation from a checkpoint keeps the user's random state
        if stage == "fit":
            _check_trainer(trainer, type(self).__name__)
            _check_datamodule(trainer, type(self).__name__)
        method = self.method
        names = self.block if isinstance(self.block, list) else [self.block]
        self._blocks = configured(attach_blocks, pl_module, method.block_type, names, method.block_options())
        if self.block is None:
            self.block = next(iter(self._blocks))
        self._refuse_other_blocks(pl_module)
        # the callback's method drives the first block; every other block gets a copy made before training
        self._methods = {
            name: self._methods.get(name) or (method if not index else _copy_for_block(method, index))
            for index, name in enumerate(self._blocks)
        }
        if stage != "fit":
            serve_every_task_held(trainer, pl_module)
            return
        self._check_epoch_limit(trainer, trainer.datamodule.num_tasks)
        _warn_of_checkpoints_within_epochs(trainer)
        _warn_of_last_checkpoints_that_follow_a_monitor(trainer)
        show_task_and_phase(trainer.progress_bar_callback)

    def _refuse_other_blocks(self, pl_module: pl.LightningModule) -> None:
        """Make loading a checkpoint whose grown blocks are not the ones converted here fail with the fix
        (until ``teardown``)."""
        if self._load_check is not None:
            self._load_check.remove()
        self._load_check = pl_module.register_load_state_dict_pre_hook(self._check_loaded_blocks)

    def _check_loaded_blocks(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        saved = saved_blocks(state_dict, prefix)
        missing = sorted(name for name in saved if name not in task_blocks(module))
        if missing:
            raise MisconfigurationException(
                f"the checkpoint holds the grown blocks {sorted(saved)}, but {type(self).__name__} converted "
                f"{sorted(self._blocks)} of {type(module).__name__}, so {missing} cannot load: pass "
                f"`block={sorted(saved)}` as in the run that saved it"
            )

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit without a checkpoint: task 0 of a fresh model, or the first task a loaded model has not learnt."""
        name, datamodule = type(self).__name__, trainer.datamodule
        if not self._finished and (self.progress.task > 0 or self.progress.epochs > 0 or self._cut_short):
            raise MisconfigurationException(
                f"this {name} stopped in the middle of task {self.progress.task} of an earlier fit; to finish that "
                "sequence resume it from its last checkpoint with `trainer.fit(model, datamodule=dm, "
                "ckpt_path=...)`, or create a new callback (and model) for a new sequence"
            )
        self._check_stream(pl_module, datamodule.num_tasks)
        self.progress = self.method.start()
        self._pending, self._finished, self._continued = None, False, None
        learned = self.model_block.tasks_learned
        if any(block.tasks_learned != learned for block in self._blocks.values()):
            found = {name: block.tasks_learned for name, block in self._blocks.items()}
            raise MisconfigurationException(
                f"the blocks have learnt different numbers of tasks ({found}): {name} trains blocks that "
                "learnt the same tasks together; convert the others from a fresh model"
            )
        if learned > 0:
            self._continue_after(trainer, pl_module, learned)
            return
        for block_name, block in self._blocks.items():
            if block.num_tasks != 1:
                raise MisconfigurationException(
                    f"the block {block_name!r} already has {block.task_parts} for {block.num_tasks} tasks but the "
                    f"model has learnt none: {name} starts from a freshly built model or continues one that "
                    "finished its tasks"
                )
        self._check_labels(datamodule, range(datamodule.num_tasks))  # before any task trains
        datamodule.set_task(0)
        set_active_task(pl_module, 0)

    def _continue_after(self, trainer: pl.Trainer, pl_module: pl.LightningModule, learned: int) -> None:
        """Start the first task the model has not learnt: ``learned`` tasks are done, the stream has more."""
        tasks = trainer.datamodule.num_tasks
        if learned >= tasks:
            raise MisconfigurationException(
                f"the model has already learnt {learned} tasks and the stream has {tasks}: there is nothing left to "
                f"train. To add tasks, fit it on a stream with more tasks (its first {learned} tasks are taken to be "
                "the ones the model learnt; their test data is used to evaluate them)."
            )
        for block in self._blocks.values():
            if block.num_tasks != learned:
                raise MisconfigurationException(
                    f"the model was saved in the middle of task {learned} (it has {block.task_parts} for "
                    f"{block.num_tasks} tasks, {learned} learnt): resume that run with `trainer.fit(model, "
                    "datamodule=dm, ckpt_path=...)` from its last checkpoint instead of continuing it with new "
                    "callbacks"
                )
        # the phase that ended task learned - 1 (walking the phases, expanding wherever it may)
        self.progress, target = self.method.progress_after(learned, tasks)
        self._check_labels(trainer.datamodule, range(target.task, tasks))
        plan = trainer.strategy.broadcast(self._plan(trainer, target), src=0)
        trainer.datamodule.set_task(target.task)
        self._continued = self._cross(pl_module, target, plan)
        rank_zero_info(
            f"{self.method.name}: the model has learnt tasks 0..{learned - 1}; continuing with {target.task}"
        )

    def _check_epoch_limit(self, trainer: pl.Trainer, num_tasks: int) -> None:
        """Raise if ``max_epochs`` may end the fit before the last task (``fast_dev_run`` is let through)."""
        name = type(self).__name__
        if trainer.fast_dev_run:
            rank_zero_info(f"{name}: `fast_dev_run` trains one batch of the first phase; the sequence will not advance")
            return
        needed = self.method.max_epochs(num_tasks)
        if trainer.max_epochs not in (-1, None) and trainer.max_epochs < needed:
            given = (
                "Lightning's default when `max_epochs` is not set"
                if trainer.max_epochs == _LIGHTNING_DEFAULT_MAX_EPOCHS
                else "as set"
            )
            raise MisconfigurationException(
                f"the Trainer's `max_epochs` is {trainer.max_epochs} ({given}), which may stop before the last task: "
                f"{num_tasks} tasks can take up to {needed} epochs with these phase lengths. Set "
                f"`Trainer(max_epochs=-1)`; {name} stops the fit when the last task is done."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start or resume the sequence on the model as it now is, then rebuild and check the training objects.

        Runs after Lightning restored a checkpoint's model and callback state (``setup`` runs before), so a
        resumed run enters its saved phase, and a fresh one starts task 0, or, for a model that learnt
        earlier tasks, the first new task (listeners then learn of that boundary: ``TaskEvaluation`` scores
        the loaded model on the tasks it learnt). A checkpoint taken after the last task goes on with the
        next task when the stream now has more. Lightning restores the optimizer state into the rebuilt
        optimizers right after this hook.
        """
        if self._resumed:
            self._resumed = False
            self._check_labels(trainer.datamodule, range(self.progress.task, trainer.datamodule.num_tasks))
            if self._finished:
                self._decide_after_last_task(trainer, pl_module)
        else:
            self._start(trainer, pl_module)
        self._cut_short = None
        self._enter_phase(pl_module)  # masks and references on the device the model has now
        rebuild_training_objects(trainer)
        if self._continued is not None:
            notify_boundary(trainer, pl_module, self._continued)
            self._continued = None
        check_optimizers_cover(trainer, pl_module)
        self._hook_optimizers(trainer)
        self._skip_sanity_check_of_a_task_to_come(trainer)
        rank_zero_info(
            f"{self.method.name}: task {self.progress.task}, phase {self.progress.phase}, widths {self._widths_text()}"
        )

    def _skip_sanity_check_of_a_task_to_come(self, trainer: pl.Trainer) -> None:
        """A fit resumed or continued at a task boundary validates a task whose head comes when its first epoch
        starts: Lightning's sanity check, which runs before that, is skipped for this fit (as Lightning skips it
        when resuming in the middle of an evaluation)."""
        task = trainer.datamodule.current_task
        if not trainer.num_sanity_val_steps or all(task < block.num_tasks for block in self._blocks.values()):
            return
        self._sanity_steps, trainer.num_sanity_val_steps = trainer.num_sanity_val_steps, 0
        rank_zero_info(f"{self.method.name}: no sanity check, task {task} starts with the first epoch")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the Trainer back the sanity check steps this fit skipped."""
        self._give_back_sanity_steps(trainer)

    def _give_back_sanity_steps(self, trainer: pl.Trainer) -> None:
        """The Trainer's ``num_sanity_val_steps`` as the user set it (after the sanity check, or a fit that
        ended before it)."""
        if self._sanity_steps is not None:
            trainer.num_sanity_val_steps, self._sanity_steps = self._sanity_steps, None

    def _decide_after_last_task(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resumed from the end of a sequence: go on with the next task if the stream has more, else stop."""
        target = self.method.following_phase(self.progress, self.progress.last_loss, trainer.datamodule.num_tasks)
        if target is None:  # nothing left to train
            trainer.should_stop = True
            return
        self._check_stream(pl_module, trainer.datamodule.num_tasks)
        rank_zero_info(
            f"{self.method.name}: the checkpoint ended task {self.progress.task}; continuing with {target.task}"
        )
        self._finished = False
        self._schedule(trainer, target)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn when the fit ended before the last task (early stopping, ``max_steps``, ``max_time``, ...)."""
        if not self._finished:
            self._warn_incomplete(trainer, _stop_reason(trainer))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Name where an interrupted sequence stopped and how to go on; give the blocks their plain layout
        (Lightning skips ``teardown`` after an exception) and the task they routed to before an evaluation."""
        super().on_exception(trainer, pl_module, exception)
        self._give_back_sanity_steps(trainer)
        self._plain_layout()
        if isinstance(exception, KeyboardInterrupt) and not self._finished:
            self._warn_incomplete(trainer, "it was interrupted")

    def _warn_incomplete(self, trainer: pl.Trainer, reason: str) -> None:
        cut_short = (
            f" and {self._cut_short[0]} of the {self._cut_short[1]} batches of the next, which is not counted (a "
            "resumed fit trains that epoch again, whole, so it will not match an uninterrupted run bit for bit)"
            if self._cut_short is not None
            else ""
        )
        message = (
            f"{self.method.name} stopped at task {self.progress.task} (tasks 0..{trainer.datamodule.num_tasks - 1}), "
            f"phase '{self.progress.phase}' after {self.progress.epochs} epoch(s) of it{cut_short}, because {reason}: "
            "the sequence is incomplete. To go on, remove what stopped it and resume from the last checkpoint "
            "written at an epoch end: `trainer.fit(model, datamodule=dm, ckpt_path=...)` (e.g. with "
            "`ModelCheckpoint(save_last=True)`, `ckpt_path='last'`)."
        )
        if trainer.fast_dev_run:
            rank_zero_info(message)
        else:
            rank_zero_warn(message)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the step hooks and the model's load check; the methods drop what refers to the finished fit's
        optimizer and give the blocks their plain layout."""
        for _, _, method in self._each():
            method.release()
        self._give_back_sanity_steps(trainer)
        self._plain_layout()
        for handle in [*self._step_hooks, *([self._load_check] if self._load_check is not None else [])]:
            handle.remove()
        self._step_hooks, self._load_check = [], None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Cross the boundary decided at the end of the previous epoch (surgery + rebuild)."""
        if self._pending is not None:
            target, plan = self._pending
            self._pending = None
            cross_boundary(trainer, pl_module, lambda: self._cross(pl_module, target, plan))
            self._hook_optimizers(trainer)
        self._loss_sum = torch.zeros((), device=pl_module.device)
        self._loss_count, self._batches = 0, 0
        self._in_epoch = True

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the method's penalty gradients to what ``optimizer`` steps, then zero the gradients of the entries
        the phase does not train."""
        for _, block, method in self._each():
            method.before_step(pl_module, block, optimizer)
        self._frozen.mask_gradients_()

    def _after_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for _, block, method in self._each():
            method.after_step(block, optimizer)
        self._frozen.restore_()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches = batch_idx + 1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # {} under manual optimization
        if isinstance(loss, Tensor) and self._loss_sum is not None:
            # Lightning hands over the loss divided by `accumulate_grad_batches`; undo that. The sum stays
            # on the device: the loss is read on the host once per epoch, never per step
            self._loss_sum.add_(loss.detach(), alpha=trainer.accumulate_grad_batches)
            self._loss_count += 1

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Decide, on the epoch's mean loss (reduced over ranks), whether the phase ends and what follows.

        An epoch the Trainer stopped before its last batch (``max_steps``, ``max_time``, ``should_stop``) decides
        nothing and is not counted: a fit resumed from its end trains the phase's epoch again, whole.
        """
        due = trainer.num_training_batches
        stopped = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step  # not a loader that ran out
        if stopped and math.isfinite(due) and 0 < self._batches < due:
            self._in_epoch, self._cut_short = False, (self._batches, int(due))
            return
        mean_loss = self._epoch_mean_loss(trainer, pl_module)
        self._in_epoch = False
        if mean_loss is None:
            return
        progress = replace(self.progress, epochs=self.progress.epochs + 1)
        if trainer.loggers:  # a log call costs about a millisecond; without a logger nobody reads it
            pl_module.log("sequence/task", float(progress.task), sync_dist=True, reduce_fx="max")  # equal on all ranks
        done = self.method.phase_done(progress, mean_loss, self.convergence_tol)
        self.progress = replace(progress, last_loss=mean_loss)
        if not done:
            return
        target = self.method.following_phase(progress, mean_loss, trainer.datamodule.num_tasks)
        if target is None:
            trainer.should_stop = True
            self._finished = True
            set_active_task(pl_module, progress.task, tasks_learned=progress.task + 1)
            plans = {name: method.end_plan(block, self.progress) for name, block, method in self._each()}
            plan = trainer.strategy.broadcast(plans, src=0)
            cross_boundary(trainer, pl_module, lambda: self._end(pl_module, plan), rebuild=False)
            return
        self._schedule(trainer, target)

    def _schedule(self, trainer: pl.Trainer, target: PhaseProgress) -> None:
        """Decide the surgery for entering ``target`` (rank 0's plan, broadcast); it is applied next epoch."""
        if target.task != self.progress.task:
            self._check_labels(trainer.datamodule, [target.task])  # before anything changes
        plan = trainer.strategy.broadcast(self._plan(trainer, target), src=0)
        if target.task != self.progress.task:
            trainer.datamodule.set_task(target.task)
        self._pending = (target, plan)

    def _end(self, pl_module: pl.LightningModule, plans: dict[str, dict[str, Any]]) -> TaskBoundary:
        for name, block, method in self._each():
            if plans[name]:
                method.apply_end(block, plans[name])
        return self._boundary(self.progress, None, plans)

    def _cross(
        self, pl_module: pl.LightningModule, target: PhaseProgress, plans: dict[str, dict[str, Any]]
    ) -> TaskBoundary:
        previous = self.progress
        datamodule = pl_module.trainer.datamodule
        batches = lambda: datamodule.task_dataloader(previous.task, "train")  # noqa: E731 - built if used
        for name, block, method in self._each():
            if target.task != previous.task:
                method.consolidate(pl_module, block, previous.task, batches)
            method.apply(block, previous, target, plans[name])
        if target.task != previous.task:
            set_active_task(pl_module, target.task, tasks_learned=previous.task + 1)
        self.progress = target
        self._enter_phase(pl_module)
        return self._boundary(previous, target, plans)

    def _plain_layout(self) -> None:
        for _, block, method in self._each():
            method.arrange(block, None)

    def _enter_phase(self, pl_module: pl.LightningModule) -> None:
        for _, block, method in self._each():
            method.arrange(block, self.progress)
        masks: dict[nn.Parameter, Tensor] = {}
        trainable = self._trainable(pl_module)
        for p, entries in trainable.items():
            p.requires_grad_(entries is not False)
            if isinstance(entries, Tensor):
                masks[p] = entries
        self._frozen = FrozenEntries(masks)
        for _, block, method in self._each():
            method.enter_phase(block, self.progress, trainable)

    def _trainable(self, pl_module: pl.LightningModule) -> dict[nn.Parameter, Trainable]:
        """The method's rule for each block's parameters; outside the blocks, every task or the first only."""
        outside = self.method.trains_outside_block or self.progress.task == 0
        result: dict[nn.Parameter, Trainable] = {p: outside for p in pl_module.parameters()}
        for _, block, method in self._each():
            result.update(method.trainable(block, self.progress))
        return result

    def _plan(self, trainer: pl.Trainer, target: PhaseProgress) -> dict[str, dict[str, Any]]:
        """Each block's surgery for entering ``target``, by block name."""
        num_tasks = trainer.datamodule.num_tasks
        return {name: method.plan(block, self.progress, target, num_tasks) for name, block, method in self._each()}

    def _check_stream(self, pl_module: pl.LightningModule, num_tasks: int) -> None:
        for _, block, method in self._each():
            configured(method.check_stream, block, block.tasks_learned, num_tasks)

    def _hook_optimizers(self, trainer: pl.Trainer) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]

    def _check_labels(self, datamodule: Any, tasks: Iterable[int]) -> None:
        """Raise if the labels of one of ``tasks`` do not fit the head the block will give it (with several
        blocks: the largest head, as any of them may produce the logits)."""
        for task in tasks:
            labels = datamodule.num_classes(task)
            outputs = max(block.classes_of(task) for block in self._blocks.values())
            if labels > outputs:
                raise ValueError(
                    f"task {task} has labels up to {labels - 1} but its head will have {outputs} outputs: build the "
                    f"model with at least {labels} classes for task {task} (a ready model's `num_classes={labels}`; "
                    f"a converted `nn.Sequential`: its last Linear, which every task's head copies, with {labels} "
                    "outputs)"
                )

    def _epoch_mean_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        count = torch.tensor(float(self._loss_count), device=pl_module.device)
        total = torch.zeros((), device=pl_module.device) if self._loss_sum is None else self._loss_sum.clone()
        total = trainer.strategy.reduce(total, reduce_op="sum")
        count = trainer.strategy.reduce(count, reduce_op="sum")
        if float(count) == 0:
            if trainer.should_stop:  # stopped before the epoch's first batch (e.g. by a listener): no decision
                return None
            if self._batches:
                raise ValueError(
                    f"`training_step` returned no loss in the {self._batches} batches of this epoch (task "
                    f"{self.progress.task}, phase '{self.progress.phase}'): {self.method.name} ends its phases on "
                    "the epoch's mean training loss. Return the loss (a tensor, or a dict with 'loss'), also under "
                    "manual optimization"
                )
            raise ValueError(
                f"task {self.progress.task} produced no training batches in phase '{self.progress.phase}': "
                "its training set is empty or `limit_train_batches` is 0. Give every task training data."
            )
        mean_loss = float(total) / float(count)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"the training loss of task {self.progress.task} became {mean_loss} in {self.method.name} phase "
                f"'{self.progress.phase}' (epoch {self.progress.epochs + 1} of the phase). Check that task's inputs "
                "for NaN or infinite values first (TaskSequenceDataModule refuses them); if they are finite, lower "
                "the learning rate or the regularisation strengths. The last checkpoint holds the last good state."
            )
        return mean_loss

    def _boundary(
        self, previous: PhaseProgress, target: PhaseProgress | None, plans: dict[str, dict[str, Any]]
    ) -> TaskBoundary:
        ended = previous.task if target is None or target.task != previous.task else None
        boundary = TaskBoundary(
            task=previous.task if target is None else target.task,
            phase=None if target is None else target.phase,
            previous_task=previous.task,
            previous_phase=previous.phase,
            ended_task=ended,
            widths=self.widths(),
            loss=previous.last_loss,
            changes=dict(next(iter(plans.values()))),
            changes_by_block={name: dict(plan) for name, plan in plans.items()},
            epochs=previous.epochs if math.isfinite(previous.last_loss) else 0,  # 0: learnt in an earlier run
        )
        step = "end of stream" if target is None else f"task {target.task}, phase {target.phase}"
        loss = (
            f" (loss {previous.last_loss:.4f}, epoch {previous.epochs} of {self.method.phase_epochs(previous.phase)})"
            if math.isfinite(previous.last_loss)
            else " (learnt earlier)"
        )
        rank_zero_info(
            f"{self.method.name}: task {previous.task} {previous.phase}{loss} -> {step}; widths {self._widths_text()}"
        )
        return boundary

    @override
    def state_dict(self) -> dict[str, Any]:
        """Where the sequence stands and the surgery decided but not yet applied, the method's state, and the
        global random generators' state (:mod:`lightning_den.rng`).

        Plain ints, floats, lists and tensors, so ``torch.load(..., weights_only=True)`` reads it.
        """
        pending = None
        if self._pending is not None:
            target, plan = self._pending
            pending = {"target": target.state_dict(), "plan": plan}
        return {
            "format": 4,
            EPOCH_END: not self._in_epoch,
            "progress": self.progress.state_dict(),
            "pending": pending,
            "finished": self._finished,
            "methods": {name: method.state_dict() for name, _, method in self._each()},
            "random_state": random_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the saved state; the phase is entered again in ``on_fit_start``, once the model is rebuilt. A fit
        also takes the global random generators' state (:mod:`lightning_den.rng`); an evaluation keeps its own.

        A checkpoint written in the middle of an epoch is refused (a DENLightningModule refused it before its
        weights loaded).
        """
        refuse_resuming_within_an_epoch([state_dict])
        phase = state_dict["progress"]["phase"]
        if state_dict.get("format", 1) < self.method.arranged_phases.get(phase, 0):
            raise MisconfigurationException(
                f"this checkpoint was written in {self.method.name}'s '{phase}' phase by an earlier lightning_den, "
                "which laid that phase's parameters and optimizer state out differently: resume from a checkpoint "
                "written in another phase (e.g. at the end of the previous task), or with the version that wrote it"
            )
        state_dict = _by_block(state_dict, next(iter(self._blocks)))
        if set(state_dict["methods"]) != set(self._methods):
            raise MisconfigurationException(
                f"the checkpoint trained the blocks {sorted(state_dict['methods'])} but this {type(self).__name__} "
                f"trains {sorted(self._methods)}: resume with the same `block=` argument"
            )
        self.progress = self._progress(state_dict["progress"])
        pending = state_dict.get("pending")
        self._pending = None if pending is None else (self._progress(pending["target"]), pending["plan"])
        self._finished = bool(state_dict.get("finished", False))
        for name, _, method in self._each():
            method.load_state_dict(state_dict["methods"][name])
        if self._fitting and "random_state" in state_dict:  # dropout then draws what the uninterrupted run drew
            set_random_state(state_dict["random_state"])
        self._resumed = True

    def _progress(self, saved: dict[str, Any]) -> PhaseProgress:
        """A saved progress with its phase as a member of the method's phase ``Enum``."""
        return PhaseProgress(**{**saved, "phase": self.method.phases(saved["phase"])})

    def _widths_text(self) -> str:
        if len(self._blocks) == 1:
            return str(list(self.widths()))
        return ", ".join(f"{name} {list(_widths(block))}" for name, block in self._blocks.items())


def _widths(block: Any) -> tuple[int, ...]:
    return tuple(block.widths(block.newest_task))


def _block_names(block: str | Sequence[str] | None, method: TaskMethod) -> str | list[str] | None:
    """``block`` as the callback keeps it: one name, a list of distinct names, or ``None`` (found at setup).

    Raises:
        MisconfigurationException: names that are not strings, an empty list or a repeated name, or several
            blocks for a method that trains the whole model.
    """
    if block is None or isinstance(block, str):
        return block
    names = list(block) if isinstance(block, Sequence) else None
    if not names or not all(isinstance(name, str) for name in names) or len(set(names)) < len(names):
        raise MisconfigurationException(
            f"`block` must be a module name or a list of distinct module names, got {block!r}"
        )
    if len(names) > 1 and method.trains_outside_block:
        raise MisconfigurationException(
            f"{method.name} trains the whole model and takes one block (its task heads); got `block={names}`. "
            "Name one block"
        )
    return names


def _copy_for_block(method: TaskMethod, index: int) -> TaskMethod:
    """A fresh copy of ``method`` for the ``index``-th named block, drawing its own random numbers."""
    duplicate = copy.deepcopy(method)
    duplicate.seed = method.seed + index
    return duplicate


def _by_block(state: dict[str, Any], block: str) -> dict[str, Any]:
    """A saved driver state with the method states and the pending plan by block name (format 1, written
    before several blocks were possible, held the one block's; format 2 had DEN's expansion laid out plainly, format 3
    its selective retraining)."""
    if state.get("format", 1) >= 2:
        return state
    pending = state.get("pending")
    return {
        **state,
        "methods": {block: state.get("method", {})},
        "pending": None if pending is None else {**pending, "plan": {block: pending["plan"]}},
    }


def configured(build: Any, *args: Any, **kwargs: Any) -> Any:
    """``build(*args, **kwargs)``, with the core's ``ValueError`` for a wrong argument raised as Lightning's
    ``MisconfigurationException`` (same message).

    Example:
        >>> from lightning_den.core.den import DENMethod
        >>> try:
        ...     configured(DENMethod, units_per_expansion=0)
        ... except MisconfigurationException as error:
        ...     print(error)
        `units_per_expansion` must be a positive integer, got 0
    """
    try:
        return build(*args, **kwargs)
    except ValueError as error:
        raise MisconfigurationException(str(error)) from error


def _check_trainer(trainer: pl.Trainer, name: str) -> None:
    """Refuse Trainer settings a task sequence cannot run under (before anything is built)."""
    if not isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy):
        raise MisconfigurationException(
            f"{name} supports single-device and DDP training, not {type(trainer.strategy).__name__}: "
            "the network changes shape or trainable parts between phases, which sharded strategies "
            "(FSDP, DeepSpeed, ModelParallel) cannot follow."
        )
    averaging = [type(cb).__name__ for cb in trainer.callbacks if _copies_model(cb)]
    if averaging:
        raise MisconfigurationException(
            f"{name} cannot run beside {averaging}: they keep a copy of the model's parameters, which goes "
            "stale when the network changes. Remove them from the Trainer's callbacks."
        )
    if trainer.reload_dataloaders_every_n_epochs != 1:
        raise MisconfigurationException(
            f"{name} switches tasks between epochs, so the training dataloader must be rebuilt every epoch: "
            f"set `Trainer(reload_dataloaders_every_n_epochs=1)` (got {trainer.reload_dataloaders_every_n_epochs})."
        )
    if trainer.limit_train_batches == 0:
        raise MisconfigurationException(
            "`limit_train_batches=0` gives every task an empty training set, so the sequence cannot move "
            "from task to task; remove it or give it a positive value."
        )


def _check_datamodule(trainer: pl.Trainer, name: str) -> None:
    """Refuse a datamodule that is not a task stream."""
    datamodule = trainer.datamodule
    missing = [attr for attr in TASK_STREAM_API if not hasattr(datamodule, attr)]
    if datamodule is None or missing:
        raise MisconfigurationException(
            f"{name} needs a task-sequence datamodule with `num_tasks`, `current_task`, `set_task(task)`, "
            "`num_classes(task)` and `task_dataloader(task, split)`; "
            f"{'no datamodule was given' if datamodule is None else f'it lacks {missing}'}. "
            "Pass `trainer.fit(model, datamodule=TaskSequenceDataModule(...))`."
        )


def _warn_of_checkpoints_within_epochs(trainer: pl.Trainer) -> None:
    """Warn of ``ModelCheckpoint`` callbacks that will save after validation, before the epoch's end."""
    validation_within = trainer.check_val_every_n_epoch != 1 or trainer.val_check_interval != 1.0
    for checkpoint in trainer.checkpoint_callbacks:
        at_epoch_end = getattr(checkpoint, "_save_on_train_epoch_end", None)
        if at_epoch_end is False or (at_epoch_end is None and validation_within):
            rank_zero_warn(
                f"{type(checkpoint).__name__}(dirpath={checkpoint.dirpath!r}) saves after validation, before the "
                "end of the training epoch where the task sequence decides its phases: its checkpoints keep the "
                "weights but cannot resume the sequence. Pass `save_on_train_epoch_end=True` to it (to Lightning's "
                "default checkpoint, made when the Trainer has none, by adding "
                "`ModelCheckpoint(save_on_train_epoch_end=True)` to the callbacks: it takes the default's place)."
            )


def _warn_of_last_checkpoints_that_follow_a_monitor(trainer: pl.Trainer) -> None:
    """Warn of ``ModelCheckpoint(monitor=..., save_last=True or "link", save_top_k >= 0)``: Lightning (2.6) writes
    or links its ``last.ckpt`` only when it saves one of its best checkpoints, and a score over the tasks seen so
    far seldom ranks there once harder tasks join it."""
    for checkpoint in trainer.checkpoint_callbacks:
        monitor, save_last = getattr(checkpoint, "monitor", None), getattr(checkpoint, "save_last", None)
        if monitor is not None and save_last in (True, "link") and getattr(checkpoint, "save_top_k", -1) != -1:
            rank_zero_warn(
                f"{type(checkpoint).__name__}(monitor={monitor!r}, save_last={save_last!r}) writes its last.ckpt only "
                f"when it saves one of its best checkpoints by {monitor!r}, where a score over the tasks seen so far "
                "seldom ranks once more tasks join it: that file may hold an early task, not the end of the "
                "sequence. To resume a sequence, add a `ModelCheckpoint(save_last=True)` without `monitor`."
            )


def _stop_reason(trainer: pl.Trainer) -> str:
    """Why a fit ended before the sequence did, as far as the Trainer tells."""
    if trainer.fast_dev_run:
        return "`fast_dev_run` runs a single batch"
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return f"`max_steps={trainer.max_steps}` was reached"
    stoppers = [
        cb
        for cb in trainer.callbacks
        if isinstance(cb, EarlyStopping) and cb.stopping_reason is not EarlyStoppingReason.NOT_STOPPED
    ]
    if stoppers:
        return f"EarlyStopping(monitor={stoppers[0].monitor!r}) stopped it"
    timers = [
        cb
        for cb in trainer.callbacks
        if isinstance(cb, Timer) and (left := cb.time_remaining()) is not None and left <= 0
    ]
    if timers:
        return "`max_time` ran out"
    if trainer.max_epochs not in (-1, None) and trainer.current_epoch >= trainer.max_epochs:
        return f"`max_epochs={trainer.max_epochs}` was reached"
    return "the Trainer was told to stop (`trainer.should_stop`)"


def _copies_model(callback: Callback) -> bool:
    return isinstance(callback, StochasticWeightAveraging | WeightAveraging)


def sequence_trainer(callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
    """A quiet single-device Trainer for a whole task sequence in one ``fit``: ``max_epochs=-1`` (the
    task-sequence callback stops it), training data rebuilt every epoch, no validation, no logger,
    checkpoints, progress bar or model summary. ``overrides`` go to the Trainer as they are.

    Example::

        sequence_trainer([DENCallback(), TaskEvaluation()]).fit(model, datamodule=SplitDigits())
    """
    settings: dict[str, Any] = {
        "max_epochs": -1,
        "reload_dataloaders_every_n_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(callbacks=callbacks, **{**settings, **overrides})
