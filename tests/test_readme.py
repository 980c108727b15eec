"""The README's Python examples run exactly as printed (in a subprocess, as a user pastes them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# trains the model that the "tasks that arrive later" example loads: tasks 0..2 of the digit pairs
FIRST_THREE_TASKS = """
import lightning.pytorch as pl
from lightning_den import DENCallback, DENMLP, SplitDigits
from lightning_den.driver import sequence_trainer

model = DENMLP(in_features=64, hidden_sizes=[48, 24], num_classes=2)
den = DENCallback(first_task_epochs=3, head_fit_epochs=2, selective_epochs=2, expansion_epochs=2, split_epochs=2)
trainer = sequence_trainer([den])
trainer.fit(model, datamodule=SplitDigits(num_tasks=3))
trainer.save_checkpoint("final.ckpt")
"""


def python_examples(section: str) -> list[str]:
    """The ```python blocks of a README section, in order."""
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.index("\n## ", start + 1)
    blocks = text[start:end].split("```python\n")[1:]
    return [block.split("```")[0] for block in blocks]


def run_python(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_the_first_python_example_runs_as_printed_with_lightnings_defaults(tmp_path):
    first, *_ = python_examples("Use it from Python")
    check = "\nassert type(model.net).__name__ == type(grown.net).__name__ == 'ExpandableMLP'\n"  # converted
    out = run_python(first + check, tmp_path)
    assert "task 0 accuracy after all tasks:" in out
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))  # checkpointing was on


@pytest.mark.slow
def test_the_tasks_that_arrive_later_example_runs_as_printed(tmp_path):
    _, later, _ = python_examples("Use it from Python")
    run_python(FIRST_THREE_TASKS, tmp_path)
    run_python(later + "\nassert model.tasks_learned == 5, model.tasks_learned\n", tmp_path)


@pytest.mark.slow
def test_the_convolutional_example_runs_as_printed_and_grows_filters(tmp_path):
    *_, cnn = python_examples("Use it from Python")
    out = run_python(cnn, tmp_path)
    filters = ast.literal_eval(out.split("filters per task:")[1].strip())
    assert filters[0] == (4, 8) and all(a <= b for a, b in zip(filters[0], filters[-1], strict=True))
    assert filters[-1] != filters[0]  # later tasks added filters


def test_the_measured_tables_are_the_committed_results():
    sys.path.insert(0, str(README.parent / "benchmarks"))
    try:
        from readme_tables import BLOCK, render
    finally:
        sys.path.pop(0)
    text = README.read_text()
    comparisons = {"permuted_mnist", "mnist_variation", "split_mnist_cnn"}
    assert {match["name"] for match in BLOCK.finditer(text)} == comparisons | {"perf", "perf_cnn", "perf_epyc"}
    assert render(text, README.parent / "benchmarks" / "results") == text, "run benchmarks/readme_tables.py"


@pytest.mark.slow
def test_the_demo_prints_a_row_per_task_with_the_selected_share(tmp_path):
    command = [sys.executable, "-m", "lightning_den.demo", "--output-dir", str(tmp_path / "demo")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout[result.stdout.index("task i|") :].splitlines()
    assert lines[0].split("|")[-1].strip() == "selected"
    rows = [line.split("|") for line in lines[1:6]]
    assert [int(row[0]) for row in rows] == [0, 1, 2, 3, 4] and rows[0][-1].strip() == "-"
    for row in rows[1:]:  # at most half of each hidden layer's units (the demo's selection_budget)
        assert all(0 < float(share) <= 0.5 for share in row[-1].strip().split("-"))
    widths = [tuple(map(int, row[2].strip().split("-"))) for row in rows]
    assert all(w[0] >= 48 and w[1] >= 24 for w in widths)  # DEN only grows past the starting 48-24
