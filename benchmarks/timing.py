"""What the performance benchmark measures with: a synthetic task stream, models, optimizers and timers.

Every timer here takes wall time with ``time.perf_counter``; on CUDA it synchronises first, so a
time covers the kernels it launched and not only their launch.
"""

from __future__ import annotations

import functools
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_den import DENCNN, DENMLP, ExpandableCNN, ExpandableMLP, TaskSequenceDataModule

#: the optimizers the step benchmark compares, by name (the learning rate of the official DEN code)
OPTIMIZERS: dict[str, Callable] = {
    "adam": functools.partial(torch.optim.Adam, lr=1e-3),
    "adam-fused": functools.partial(torch.optim.Adam, lr=1e-3, fused=True),
}


def synthetic_stream(
    tasks: int, width: int, examples: int, batch: int, seed: int = 0, shared: float = 0.0
) -> TaskSequenceDataModule:
    """Random linear 10-class tasks of ``width`` inputs (the data is not the point; the shapes are). With
    ``shared`` > 0 each task's projection mixes in that share of the previous task's, so that what a network
    learnt serves the next task in part (unrelated tasks by default)."""
    generator = torch.Generator().manual_seed(seed)
    splits = []
    projection = torch.zeros(width, 10)
    for _ in range(tasks):
        projection = shared * projection + (1 - shared) * torch.randn(width, 10, generator=generator)
        x = torch.randn(examples, width, generator=generator)
        splits.append((x, (x @ projection).argmax(dim=1)))
    return TaskSequenceDataModule.from_tensors(
        train=splits, test=[(x[:batch], y[:batch]) for x, y in splits], batch_size=batch, seed=seed
    )


def device_of(accelerator: str) -> torch.device:
    """The torch device the benchmark's ``--accelerator`` names."""
    return torch.device("cuda" if accelerator == "cuda" else "cpu")


@dataclass(frozen=True)
class Network:
    """The benchmarked network: an MLP of ``hidden`` widths on ``width_in`` inputs or, with ``channels``, a CNN
    (LeNet-style: 5x5 convolutions of ``channels`` filters, each with ReLU and 2x2 max pooling, then the
    fully connected ``hidden`` layers) on images of ``image`` = (channels, height, width), fed as flattened
    rows of ``width_in`` inputs. Its widths are the filters, then the units, of every hidden layer."""

    width_in: int
    hidden: tuple[int, ...]
    channels: tuple[int, ...] = ()
    image: tuple[int, int, int] | None = None

    @property
    def widths(self) -> tuple[int, ...]:
        return (*self.channels, *self.hidden)

    def block(self) -> ExpandableMLP:
        """The expandable block of these widths, 10 classes per task."""
        if self.channels:
            return ExpandableCNN.lenet(self.image, self.channels, self.hidden, head_classes=10)
        return ExpandableMLP(self.width_in, self.hidden, head_classes=10)

    def model(self, widths: Sequence[int] | None = None, optimizer: str = "adam") -> DENMLP | DENCNN:
        """The ready DEN model at ``widths`` (default: the network's) with one of :data:`OPTIMIZERS`."""
        widths = list(widths or self.widths)
        if self.channels:
            conv = len(self.channels)
            return DENCNN(list(self.image), widths[:conv], widths[conv:], 10, optimizer=OPTIMIZERS[optimizer])
        return DENMLP(self.width_in, widths, 10, optimizer=OPTIMIZERS[optimizer])

    def dense(self, widths: Sequence[int], classes: int = 10) -> nn.Sequential:
        """A plain torch network of these widths (``nn.Conv2d``/``nn.MaxPool2d``, ``nn.Linear``, ReLU) on the
        flattened rows."""
        layers: list[nn.Module] = []
        if self.channels:
            conv, channels = len(self.channels), self.image[0]
            layers.append(nn.Unflatten(1, self.image))
            for width in widths[:conv]:
                layers += [nn.Conv2d(channels, width, 5), nn.ReLU(), nn.MaxPool2d(2)]
                channels = width
            layers.append(nn.Flatten())
            widths = widths[conv:]
        for width in widths:  # LazyLinear: the first reads whatever the convolutions leave
            layers += [nn.LazyLinear(width), nn.ReLU()]
        dense = nn.Sequential(*layers, nn.LazyLinear(classes))
        dense(torch.zeros(1, self.width_in))  # sizes the lazy layers
        return dense


class Clock:
    """``perf_counter``, after a CUDA synchronisation when timing a GPU."""

    def __init__(self, accelerator: str) -> None:
        self.synchronize = accelerator == "cuda"

    def __call__(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()


class StepTimer(Callback):
    """Wall time of every training step (batch start to batch end: forward, backward, optimizer step and
    every callback's batch hooks), grouped by ``label()`` (e.g. the DEN phase), with the widths then.

    On CUDA each step is timed between two synchronisations: its latency with an empty queue, which
    leaves out the overlap of one step's host work with the previous step's kernels (both sides of a
    comparison alike).
    """

    def __init__(
        self,
        clock: Clock,
        label: Callable[[], Any] = lambda: "plain",
        widths: Callable[[], tuple[int, ...]] = lambda: (),
    ) -> None:
        self.clock, self.label, self.widths = clock, label, widths
        self.times: dict[Any, list[float]] = {}
        self.widths_of: dict[Any, tuple[int, ...]] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = self.clock()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        label = self.label()
        self.times.setdefault(label, []).append(self.clock() - self._start)
        self.widths_of.setdefault(label, tuple(self.widths()))


class EpochMarks(Callback):
    """Times of every epoch start and end, with a label each (e.g. the task). Placed before and after a
    callback in the Trainer's list, the differences of two instances' marks are that callback's epoch-hook
    time: its decisions, surgery and rebuilds."""

    def __init__(self, clock: Clock, label: Callable[[], int] = lambda: 0) -> None:
        self.clock, self.label = clock, label
        self.starts: list[tuple[int, float]] = []
        self.ends: list[tuple[int, float]] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.starts.append((self.label(), self.clock()))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.ends.append((self.label(), self.clock()))


class EpochLosses(Callback):
    """Per epoch: a label (e.g. the task and phase, read when the epoch starts, after the boundary a callback
    earlier in the Trainer's list applied), the epoch's training time and its mean training loss, read when
    the epoch ends from ``loss`` (e.g. a :class:`~lightning_den.driver.TaskSequenceCallback`'s
    ``progress.last_loss``, which that callback, earlier in the list, has just computed)."""

    def __init__(self, clock: Clock, label: Callable[[], Any], loss: Callable[[], float]) -> None:
        self.clock, self.label, self.loss = clock, label, loss
        self.epochs: list[tuple[Any, float, float]] = []  # (label, seconds, mean loss)
        self._start, self._label = 0.0, None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._label = self.clock(), self.label()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epochs.append((self._label, self.clock() - self._start, self.loss()))

    def curve(self, label: Any) -> list[tuple[float, float]]:
        """``(seconds since the first epoch of `label` started, mean loss)`` at the end of each such epoch."""
        elapsed, points = 0.0, []
        for epoch_label, seconds, loss in self.epochs:
            if epoch_label == label:
                elapsed += seconds
                points.append((elapsed, loss))
        return points


class SelectionLog(Callback):
    """The share of each hidden layer's units DEN's selective retraining trains, per task (from the plan its
    task boundary carries)."""

    def __init__(self) -> None:
        self.selected_fraction: dict[int, list[float]] = {}

    def on_task_boundary(self, trainer: Trainer, pl_module: LightningModule, boundary: Any) -> None:
        if boundary.phase == "selective":
            self.selected_fraction[boundary.task] = list(boundary.changes["selected_fraction"])


def time_to_loss(curve: list[tuple[float, float]], target: float) -> tuple[float, int] | None:
    """The time and the epochs a loss ``curve`` (from :meth:`EpochLosses.curve`) took until an epoch's mean
    loss was at most ``target``; ``None`` if it never was.

    Example:
        >>> time_to_loss([(1.0, 0.9), (2.0, 0.5), (3.0, 0.4)], 0.5)
        (2.0, 2)
    """
    for epochs, (seconds, loss) in enumerate(curve, start=1):
        if loss <= target:
            return seconds, epochs
    return None


class PeakMemory:
    """Peak memory while a block runs: resident memory of the process (MiB) and, on CUDA, the GPU's
    allocations. On Linux the kernel's peak (``VmHWM``) is reset when the block starts, so the peak is the
    block's own; elsewhere it is the process's lifetime peak (``ru_maxrss``).

    Example::

        with PeakMemory("cpu") as peak:
            trainer.fit(model, datamodule=stream)
        peak.result()   # {"peak_rss_mib": ..., "rss_at_start_mib": ...}
    """

    _STATUS = Path("/proc/self/status")

    def __init__(self, accelerator: str) -> None:
        self.cuda = accelerator == "cuda"

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.own_peak = True
        except OSError:
            self.own_peak = False
        self.at_start = self._status_mib("VmRSS") if self._STATUS.exists() else None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.own_peak:
            self.peak = self._status_mib("VmHWM")
        else:
            unit = 2**20 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
        self.cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def result(self) -> dict[str, Any]:
        """The peaks in MiB; ``peak_is_the_blocks`` says whether the RSS peak is the block's own."""
        measured = {"peak_rss_mib": self.peak, "rss_at_start_mib": self.at_start, "peak_is_the_blocks": self.own_peak}
        if self.cuda_peak is not None:
            measured["peak_cuda_mib"] = self.cuda_peak
        return measured

    def _status_mib(self, key: str) -> float:
        for line in self._STATUS.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        return float("nan")


#: steps after an optimizer is built that carry one-off work (its state, a phase's step plans)
WARM_UP_STEPS = 2


def steady_median(values: list[float]) -> float:
    """Median without the warm-up steps, when there are enough values."""
    return statistics.median(values[WARM_UP_STEPS:] if len(values) > 2 * WARM_UP_STEPS else values)


def median_time(clock: Clock, run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, after :data:`WARM_UP_STEPS` untimed ones."""
    for _ in range(WARM_UP_STEPS):
        run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return statistics.median(times)


def warm_up_excess(values: list[float]) -> float:
    """Time the warm-up steps took beyond as many steady steps (one-off work after a boundary)."""
    if len(values) <= 2 * WARM_UP_STEPS:
        return 0.0
    return max(0.0, sum(values[:WARM_UP_STEPS]) - WARM_UP_STEPS * steady_median(values))


class Rounds:
    """Every value of ``rounds`` calls of ``measure`` (a dict of times), kept round by round.

    A ratio is taken within each round, between times measured seconds apart, and the median over
    rounds is reported: a change of the machine's speed between rounds (shared hosts drift by 10% and
    more) then moves both sides of each ratio alike, and one disturbed round does not decide it.

    Example::

        rounds = Rounds(5, lambda: {"ours": time_ours(), "plain": time_plain()})
        rounds.ratio("ours", "plain"), rounds.median("plain")
    """

    def __init__(self, rounds: int, measure: Callable[[], dict[str, float]]) -> None:
        self.samples: dict[str, list[float]] = {}
        for _ in range(rounds):
            for key, value in measure().items():
                self.samples.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.samples[key])

    def ratio(self, numerator: str, denominator: str) -> float:
        pairs = zip(self.samples[numerator], self.samples[denominator], strict=True)
        return statistics.median(a / b for a, b in pairs)


def machine(accelerator: str) -> str:
    """The processor (or GPU), threads and library versions, for the report."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    device = torch.cuda.get_device_name() if accelerator == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return f"{cpu}, {device}; torch {torch.__version__}, lightning {lightning.__version__}"
