"""Shared helpers of the Lightning tests: a tiny task stream, a tiny DEN model and a Trainer set up for DEN."""

from __future__ import annotations

import functools
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_den import DENCNN, DENMLP, TaskBoundary, TaskSequenceDataModule
from lightning_den.core.den.entries import trainable_entries
from lightning_den.core.den.phases import DENPhase
from lightning_den.driver import sequence_trainer

IN_FEATURES = 6
HIDDEN = [5, 4]


def tiny_stream(num_tasks: int = 3, size: int = 48, seed: int = 0) -> TaskSequenceDataModule:
    """Linearly separable binary tasks on random inputs, one random direction per task."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for _ in range(num_tasks):
        direction = torch.randn(IN_FEATURES, generator=generator)
        for split, n in ((train, size), (test, size // 2)):
            x = torch.randn(n, IN_FEATURES, generator=generator)
            split.append((x, (x @ direction > 0).long()))
    return TaskSequenceDataModule.from_tensors(train=train, test=test, batch_size=16, seed=seed)


def tiny_model(lr: float = 1e-2, optimizer: Callable | None = None) -> DENMLP:
    factory = optimizer or functools.partial(torch.optim.Adam, lr=lr)
    return DENMLP(IN_FEATURES, list(HIDDEN), num_classes=2, optimizer=factory)


def tiny_cnn(optimizer: Callable | None = None) -> DENCNN:
    """A small convolutional DEN model for the 8x8 digits: two convolutions of 3 and 4 filters, 6 units."""
    factory = optimizer or functools.partial(torch.optim.Adam, lr=1e-2)
    return DENCNN([1, 8, 8], [3, 4], [6], num_classes=2, kernel_size=3, padding=1, optimizer=factory)


def short_phases(**overrides) -> dict:
    """DENCallback arguments for a fast run (a few epochs per phase)."""
    settings = dict(
        first_task_epochs=3,
        head_fit_epochs=2,
        selective_epochs=2,
        expansion_epochs=2,
        split_epochs=2,
        convergence_tol=0.0,
        sparsity_l1=0.1,
        units_per_expansion=3,
    )
    settings.update(overrides)
    return settings


def make_trainer(tmp_path, callbacks: list[Callback], **overrides) -> pl.Trainer:
    return sequence_trainer(callbacks, default_root_dir=tmp_path, **overrides)


#: a three-task DEN configuration of the CLI on the digits, a few epochs per phase
TINY_CONFIG = """
seed_everything: 0
model:
  class_path: lightning_den.DENMLP
  init_args:
    in_features: 64
    hidden_sizes: [12, 8]
    num_classes: 2
    optimizer:
      class_path: torch.optim.Adam
      init_args:
        lr: 0.01
data:
  class_path: lightning_den.data.SplitDigits
  init_args:
    num_tasks: 3
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_den.DENCallback
      init_args:
        first_task_epochs: 3
        head_fit_epochs: 2
        selective_epochs: 2
        expansion_epochs: 2
        split_epochs: 2
        loss_threshold: 0.0
        sparsity_l1: 0.05
    - class_path: lightning_den.TaskEvaluation
"""


#: the tiny configuration on a convolutional network (``DENCNN``: two convolutions of 3 and 4 filters, 6 units)
TINY_CNN_CONFIG = TINY_CONFIG.replace(
    """    in_features: 64
    hidden_sizes: [12, 8]
""",
    """    in_shape: [1, 8, 8]
    channels: [3, 4]
    hidden_sizes: [6]
    kernel_size: 3
    padding: 1
""",
).replace("lightning_den.DENMLP", "lightning_den.DENCNN")


class UserModule(pl.LightningModule):
    """Written without lightning_den in mind."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class TwoChains(UserModule):
    """An encoder chain feeding a classifier chain, both plain ``nn.Sequential`` of Linear layers."""

    BLOCKS = ("encoder", "classifier")

    def __init__(self) -> None:
        super().__init__()
        del self.net
        self.encoder = nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.Tanh(), nn.Linear(8, 5))
        self.classifier = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))

    def forward(self, x):
        return self.classifier(torch.relu(self.encoder(x)))


class CheckFrozenEntries(Callback):
    """After every optimizer step, every entry the phase does not train must equal its value at phase entry."""

    def __init__(self) -> None:
        self.reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.checked_steps = 0
        self.phases_seen: set[str] = set()

    def _record(self, pl_module, phase: DENPhase, selection) -> None:
        block = pl_module.get_submodule(pl_module.block_name)
        entries = trainable_entries(block, phase, selection)  # by weight and bias, however laid out
        self.reference = {}
        for name, trained in entries.items():
            p = block.get_parameter(name)
            frozen = (
                ~trained if isinstance(trained, torch.Tensor) else torch.full_like(p, not trained, dtype=torch.bool)
            )
            self.reference[name] = (frozen, p.detach().clone())

    def on_fit_start(self, trainer, pl_module) -> None:
        self._record(pl_module, DENPhase.SPARSE, None)

    def on_task_boundary(self, trainer, pl_module, boundary: TaskBoundary) -> None:
        if boundary.phase is not None:
            self._record(pl_module, DENPhase(boundary.phase), boundary.changes.get("selection"))
            self.phases_seen.add(boundary.phase)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        block = pl_module.get_submodule(pl_module.block_name)
        for name, (frozen, before) in self.reference.items():
            p = block.get_parameter(name)
            assert torch.equal(p.detach()[frozen], before[frozen]), f"frozen entries of {name} moved"
        self.checked_steps += 1


class CrashAt(Callback):
    """Raises ``RuntimeError("simulated crash")`` when epoch ``epoch`` starts (a crash to resume from)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")
