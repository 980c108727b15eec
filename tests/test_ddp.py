"""DEN under real 2-process DDP on CPU (gloo): every rank holds the same network after every boundary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def run_two_processes(tmp_path: Path, strategy: str) -> dict:
    out = tmp_path / "ranks.json"
    script = Path(__file__).with_name("ddp_den_run.py")
    result = subprocess.run(
        [sys.executable, str(script), str(out), strategy], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(out.read_text())


def metrics_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.rglob("continual_metrics.json"))


@pytest.mark.slow
def test_two_process_ddp_takes_the_same_surgery_on_every_rank(tmp_path):
    saved = run_two_processes(tmp_path, "ddp")
    records = saved["boundaries"]
    assert saved["wrong_plans_on_rank_1"] >= 4  # rank 1 really computed different selections and splits
    assert [r["phase"] for r in records] == ["head_fit", "selective", "expansion", "split"] * 2 + [None]
    # rank 1 computed wrong plans on purpose; the broadcast plan from rank 0 won everywhere
    assert all(r["same_plan"] for r in records)
    assert all(r["same_weights"] for r in records)
    assert any(sum(map(len, r["changes"].get("split", []))) for r in records)  # splits really happened
    assert records[-1]["widths"][0] > 5  # and the network grew
    # with validation, the default logger, TaskEvaluation and checkpoints on: one report, by rank 0, complete
    (report,) = metrics_files(tmp_path)
    summary = json.loads(report.read_text())
    assert summary["complete"] is True and summary["tasks"] == 3
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


@pytest.mark.slow
def test_ddp_spawn_hands_the_grown_network_back_to_the_main_process(tmp_path):
    saved = run_two_processes(tmp_path, "ddp_spawn")
    assert saved["tasks_learned"] == 3 and saved["widths"][-1][0] > 5  # the main process holds the grown network
    assert saved["same_weights_as_rank_0"]  # with the weights the workers trained
    assert len(metrics_files(tmp_path)) == 1


@pytest.mark.slow
def test_two_process_ddp_converts_a_users_plain_module_alike_on_every_rank(tmp_path):
    saved = run_two_processes(tmp_path, "ddp-plain")
    records = saved["boundaries"]
    assert saved["wrong_plans_on_rank_1"] >= 4  # the broadcast plan won, as for the ready model
    assert all(r["same_plan"] and r["same_weights"] for r in records)
    assert records[-1]["widths"][0] > 8  # the user's 8-unit layer grew


@pytest.mark.slow
def test_two_process_ddp_grows_several_named_blocks_alike_on_every_rank(tmp_path):
    saved = run_two_processes(tmp_path, "ddp-two-blocks")
    records = saved["boundaries"]
    assert saved["wrong_plans_on_rank_1"] >= 4
    assert all(r["same_plan"] and r["same_weights"] for r in records)  # every block's plan, from rank 0
    assert records[-1]["widths_by_block"]["encoder"][0] > 8 and records[-1]["widths_by_block"]["classifier"][0] > 7


@pytest.mark.slow
def test_two_process_ddp_grows_a_convolutional_block_alike_on_every_rank(tmp_path):
    saved = run_two_processes(tmp_path, "ddp-cnn")
    records = saved["boundaries"]
    assert saved["wrong_plans_on_rank_1"] >= 4  # rank 1's selections and splits of filters differed
    assert all(r["same_plan"] and r["same_weights"] for r in records)  # rank 0's plan won on every rank
    assert any(sum(map(len, r["changes"].get("split", []))) for r in records)
    first, last = records[0]["widths"], records[-1]["widths"]
    assert last[0] > 3 and last[1] > 4 and first[:2] == [3, 4]  # both convolutions gained filters


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp-pnn-cnn", "ddp-packnet-cnn"])
def test_two_process_ddp_trains_the_convolutional_baselines_alike_on_every_rank(tmp_path, mode):
    saved = run_two_processes(tmp_path, mode)
    records = saved["boundaries"]
    if mode == "ddp-packnet-cnn":  # rank 1 planned to keep every free weight at tasks 0 and 1; rank 0's pruning won
        assert saved["wrong_plans_on_rank_1"] == 2
    assert len(records) >= 3 and all(r["same_plan"] and r["same_weights"] for r in records)
    (report,) = metrics_files(tmp_path)
    assert json.loads(report.read_text())["complete"] is True
