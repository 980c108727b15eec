"""DEN on CUDA, in float32 and bf16-mixed, against the same run on CPU. Skipped without a GPU."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_den import DENCallback
from lightning_den.core.den.layers import SEPARATE_PARAMETERS
from lightning_den.core.den.phases import DENPhase
from lightning_den.demo import run_split_digits
from tests.helpers import make_trainer, short_phases, tiny_model, tiny_stream

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cuda_run_matches_the_cpu_run(tmp_path, precision):
    cpu = run_split_digits(verbose=False, output_dir=str(tmp_path / "cpu"))
    gpu = run_split_digits(verbose=False, output_dir=str(tmp_path / "gpu"), accelerator="cuda", precision=precision)
    for cpu_row, gpu_row in zip(cpu.accuracy, gpu.accuracy, strict=True):
        assert gpu_row == pytest.approx(cpu_row, abs=0.03)
    assert sum(gpu.accuracy[-1]) / len(gpu.accuracy[-1]) >= 0.95


class GatheredAtTrainEnd(Callback):
    """Keeps, when training ends (before Lightning moves the model off the GPU), each gathered layer's rows, input
    units and compact weight."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = [
            (layer, *(t.detach().cpu().clone() for t in (*layer._gathered, layer.gathered_parameters()[0])))
            for layer in pl_module.mlp.hidden
        ]


def test_a_sequence_ending_in_selective_retraining_tears_down_to_the_plain_layout_with_its_last_values(tmp_path):
    # Lightning moves the model to the CPU before the callback's teardown joins the gathered subnetwork
    den = DENCallback(**short_phases(expansion=False, split=False, selection_budget=0.5))
    gathered = GatheredAtTrainEnd()
    model = tiny_model()
    make_trainer(tmp_path, [den, gathered], accelerator="cuda").fit(model, datamodule=tiny_stream(2))
    assert den.progress.phase is DENPhase.SELECTIVE
    assert not [name for name, _ in model.named_parameters() if name.endswith(SEPARATE_PARAMETERS)]
    for layer, rows, units, weight in gathered.layers:
        assert torch.equal(layer.weight.detach()[rows][:, units], weight)
