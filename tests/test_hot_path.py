"""The per-step work of the DEN callback reads nothing back from the device.

On a GPU, reading a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``, a boolean
index, ``nonzero``) waits for every queued kernel: once per step, it serialises training. The loss
thresholds are therefore checked at the end of each phase's epochs, never per step. These tests run a
whole DEN sequence with the callback's per-step hooks under the profiler and check, on the CPU, that
none of them calls an operator that would make that read on a GPU. Copies to the host (``.cpu()``,
``.tolist()``) record no operator on a CPU; the CUDA test below, which makes any synchronisation an
error, covers them too.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
import torch

from lightning_den import DENCallback
from lightning_den.core.den.phases import DENPhase
from tests.core.helpers import recorded_ops
from tests.helpers import make_trainer, short_phases, tiny_model, tiny_stream

#: operators whose result must be known on the host (the value, or a data-dependent size)
HOST_READS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::equal",
    "aten::allclose",
}


class WatchedDEN(DENCallback):
    """A DENCallback whose per-step hooks each run inside ``watch(phase)``, a context manager."""

    def __init__(self, watch: Callable[[str], AbstractContextManager], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.watch = watch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        with self.watch(self.progress.phase):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _after_step(self, optimizer, *args) -> None:
        with self.watch(self.progress.phase):
            super()._after_step(optimizer, *args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.watch(self.progress.phase):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


#: DENCallback settings that run all five phases, with masks, the drift pull and group lasso
EVERY_PHASE = short_phases(loss_threshold=0.0, split_threshold=0.0, drift_penalty=0.5)


def test_the_recorder_sees_a_host_read():
    seen: Counter = Counter()
    with recorded_ops(seen):
        torch.ones(3).sum().item()
    assert HOST_READS & set(seen)


def test_no_per_step_hook_reads_a_value_back_in_any_den_phase(tmp_path):
    ops: dict[str, Counter] = defaultdict(Counter)
    den = WatchedDEN(lambda phase: recorded_ops(ops[phase]), **EVERY_PHASE)
    make_trainer(tmp_path, [den]).fit(tiny_model(), datamodule=tiny_stream(num_tasks=2))
    assert set(ops) == {phase.value for phase in DENPhase}
    expansion = ops[DENPhase.EXPANSION.value]
    assert expansion["aten::softshrink"] and expansion["aten::linalg_vector_norm"]  # L1 and group lasso recorded
    assert ops[DENPhase.SELECTIVE.value]["aten::sub"] and ops[DENPhase.SPLIT.value]["aten::sub"]  # the drift pull
    reads = {phase: sorted(HOST_READS & set(counted)) for phase, counted in ops.items()}
    assert not any(reads.values()), f"per-step hooks read device values back: {reads}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_per_step_hook_synchronises_with_a_cuda_device(tmp_path):
    @contextmanager
    def synchronisation_is_an_error(phase: str) -> Iterator[None]:
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    den = WatchedDEN(synchronisation_is_an_error, **EVERY_PHASE)
    make_trainer(tmp_path, [den], accelerator="cuda").fit(tiny_model(), datamodule=tiny_stream(num_tasks=2))
    assert den._finished
