"""DEN on CUDA, in float32 and bf16-mixed, against the same run on CPU. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from lightning_den.demo import run_split_digits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cuda_run_matches_the_cpu_run(tmp_path, precision):
    cpu = run_split_digits(verbose=False, output_dir=str(tmp_path / "cpu"))
    gpu = run_split_digits(verbose=False, output_dir=str(tmp_path / "gpu"), accelerator="cuda", precision=precision)
    for cpu_row, gpu_row in zip(cpu.accuracy, gpu.accuracy, strict=True):
        assert gpu_row == pytest.approx(cpu_row, abs=0.03)
    assert sum(gpu.accuracy[-1]) / len(gpu.accuracy[-1]) >= 0.95
