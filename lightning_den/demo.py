"""The embedded demo: DEN on five tasks of digit pairs from scikit-learn's digits, one call to ``fit``.

Run it with ``make demo`` or ``python -m lightning_den.demo``. It prints, after every task, the
accuracy on each task seen so far and the width of each hidden layer, then the final parameter count
against one network per task (single-task learning).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_den.boundary import TaskBoundary
from lightning_den.callbacks import DENCallback
from lightning_den.data import SplitDigits
from lightning_den.driver import sequence_trainer
from lightning_den.evaluation import TaskEvaluation
from lightning_den.module import DENMLP

HIDDEN_SIZES = (48, 24)
LEARNING_RATE = 5e-3
# Few optimizer steps per phase (about 8 per epoch), so stronger regularisers than the defaults.
DEN_SETTINGS = {
    "sparsity_l1": 0.05,
    "group_sparsity": 0.5,
    "drift_penalty": 1.0,
    "loss_threshold": 0.05,
    "selection_budget": 0.5,  # selective retraining trains at most half of each layer's units
}


@dataclass
class DemoResult:
    """What a run of the demo measured."""

    accuracy: list[list[float]]
    widths: list[tuple[int, ...]]
    parameters: int
    single_task_parameters: int
    seconds: float


class _PrintTaskEnds(Callback):
    """Prints a row of the table whenever a task ends (a TaskBoundary listener)."""

    def __init__(self, evaluation: TaskEvaluation) -> None:
        self.evaluation = evaluation

    def on_task_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, boundary: TaskBoundary) -> None:
        if boundary.ended_task is None:
            return
        row = self.evaluation.accuracy[-1]
        cells = "".join(f"{a:>7.3f}" for a in row) + " " * 7 * (trainer.datamodule.num_tasks - len(row))
        widths = "-".join(str(w) for w in self.evaluation.widths[-1])
        report = self.evaluation.selection.get(boundary.ended_task)
        selected = "-".join(f"{f:.2f}" for f in report["selected_fraction"]) if report else "-"
        print(
            f"{boundary.ended_task:>5} |{cells} | {widths:>9} | {self.evaluation.parameters[-1]:>7} | {selected:>9}",
            flush=True,
        )


def run_split_digits(
    num_tasks: int = 5,
    seed: int = 0,
    verbose: bool = True,
    output_dir: str = "den_demo",
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> DemoResult:
    """Train DEN on the split-digits stream; ``continual_metrics.json`` and the plots go to ``output_dir``."""
    pl.seed_everything(seed, verbose=False)
    datamodule = SplitDigits(num_tasks=num_tasks, seed=seed)
    model = DENMLP(
        in_features=datamodule.in_features,
        hidden_sizes=list(HIDDEN_SIZES),
        num_classes=2,
        optimizer=functools.partial(torch.optim.Adam, lr=LEARNING_RATE),
    )
    evaluation = TaskEvaluation(output_dir=output_dir, print_report=False)
    callbacks: list[Callback] = [DENCallback(seed=seed, **DEN_SETTINGS), evaluation]
    if verbose:
        callbacks.append(_PrintTaskEnds(evaluation))
        header = "".join(f"{'t' + str(j):>7}" for j in range(num_tasks))
        print(
            f"accuracy on each task after training task i, widths of hidden layers, parameters, share of each\n"
            f"hidden layer's units selective retraining selected for task i\n"
            f"task i|{header} |    widths |  params |  selected",
            flush=True,
        )
    trainer = sequence_trainer(callbacks, accelerator=accelerator, precision=precision, deterministic=True)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return DemoResult(
        accuracy=evaluation.accuracy,
        widths=evaluation.widths,
        parameters=model.mlp.num_parameters(),
        single_task_parameters=evaluation.summary["capacity"]["single_task_parameters"],
        seconds=time.perf_counter() - start,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5, help="number of digit-pair tasks (1-5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="den_demo", help="where continual_metrics.json and the plots go")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    result = run_split_digits(num_tasks=args.tasks, seed=args.seed, output_dir=args.output_dir)
    final = result.accuracy[-1]
    print(f"\nfinal average accuracy over {len(final)} tasks: {sum(final) / len(final):.4f}")
    print(f"task 0 accuracy: {result.accuracy[0][0]:.4f} after task 0, {final[0]:.4f} after the last task")
    print(
        f"parameters: DEN {result.parameters} vs one network per task {result.single_task_parameters} "
        f"({result.parameters / result.single_task_parameters:.1%})"
    )
    print(f"wall time: {result.seconds:.1f} s; metrics and plots in {args.output_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
