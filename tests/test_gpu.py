"""DEN on CUDA, in float32 and bf16-mixed, against the same run on CPU. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

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


def test_a_sequence_ending_in_selective_retraining_tears_down_to_the_plain_layout(tmp_path):
    # Lightning moves the model to the CPU before the callback's teardown joins the gathered subnetwork
    weights = {}
    for accelerator in ("cpu", "cuda"):
        torch.manual_seed(0)
        den = DENCallback(**short_phases(expansion=False, split=False, selection_budget=0.5))
        model = tiny_model()
        make_trainer(tmp_path / accelerator, [den], accelerator=accelerator).fit(model, datamodule=tiny_stream(2))
        assert den.progress.phase is DENPhase.SELECTIVE
        assert not [name for name, _ in model.named_parameters() if name.endswith(SEPARATE_PARAMETERS)]
        weights[accelerator] = {name: p.detach().cpu() for name, p in model.named_parameters()}
    torch.testing.assert_close(weights["cuda"], weights["cpu"], rtol=1e-3, atol=1e-4)
