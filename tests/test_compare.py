"""The comparison command on a tiny stream: every method is a row, every measured column is filled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_cli import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_compare_writes_every_row_and_column(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "cmp"
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(config), "--epochs", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (out / "comparison.md").read_text().splitlines()
    header = table[2]
    for column in (
        "parameters after first",
        "BWT",
        "largest drop",
        "forward transfer",
        "final avg accuracy",
        "epochs",
        "wall time",
    ):
        assert column in header
    methods = ["DEN", "Progressive Networks", "PackNet", "one network per task", "fine-tuning", "EWC"]
    rows = [line for line in table[4:] if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows] == methods
    assert all(" - |" not in row.split("|", 5)[-1] for row in rows[:1])  # forward transfer is filled for DEN
    saved = json.loads((out / "comparison.json").read_text())
    by_method = {row["method"]: row for row in saved["rows"]}
    assert by_method["one network per task"]["forward_transfer"] == 0.0  # the reference against itself
    assert by_method["PackNet"]["largest_drop"] == 0.0 and by_method["Progressive Networks"]["largest_drop"] == 0.0
    params = {name: row["parameters_after_task"] for name, row in by_method.items()}
    head = 8 * 2 + 2  # the tiny config's last hidden layer has 8 units, every task 2 classes
    assert params["PackNet"][-1] - params["PackNet"][0] == 2 * head  # fixed trunk: only heads come on top
    assert params["Progressive Networks"][-1] > params["Progressive Networks"][0]  # a column per task
    assert (out / "accuracy_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"
