"""Compare the architecture methods and the baselines on one task stream, measured.

Runs each chosen method on the stream of a ``lightning-den`` configuration with the same starting
widths, optimizer, seed and epochs per task (DEN's phases come from the configuration; the other
methods get DEN's first-task epochs per task), then writes ``comparison.md``, ``comparison.json`` and
``accuracy_vs_parameters.png``:

    .venv/bin/python benchmarks/compare.py examples/permuted_mnist.yaml --root ../shared/data/mnist
    .venv/bin/python benchmarks/compare.py examples/split_digits.yaml --methods den pnn stl --out /tmp/cmp

Columns: parameters after the first and the last task (growth), backward transfer and the largest
drop of any old task (forgetting), forward transfer (the score on a new task right after learning it
minus the score of a same-width network trained on it alone, i.e. the ``stl`` run), final average
accuracy (and AUROC when every task is binary), the epochs each method actually trained, wall time.
The score of the transfer columns is AUROC when every task is binary, accuracy otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_den import DENMLP, DENCallback, TaskEvaluation
from lightning_den.baselines import (
    EWCCallback,
    FineTuningCallback,
    PackNetCallback,
    PackNetModel,
    ProgressiveCallback,
    ProgressiveNet,
)
from lightning_den.cli import DENCLI
from lightning_den.metrics import average_score, backward_transfer, forward_transfer, task_matrix
from lightning_den.sequence import sequence_trainer

METHODS = {
    "den": "DEN",
    "pnn": "Progressive Networks",
    "packnet": "PackNet",
    "stl": "one network per task",
    "finetune": "fine-tuning",
    "ewc": "EWC",
}


def builders(hparams: dict, optimizer: Callable, den: DENCallback, epochs: int) -> dict[str, tuple[Callable, Callable]]:
    """For each method: (build the model, build the callback)."""
    return {
        "den": (lambda: DENMLP(**hparams, optimizer=optimizer), lambda: den),
        "pnn": (
            lambda: ProgressiveNet(**hparams, optimizer=optimizer),
            lambda: ProgressiveCallback(epochs_per_task=epochs),
        ),
        "packnet": (
            lambda: PackNetModel(**hparams, optimizer=optimizer),
            lambda: PackNetCallback(train_epochs=epochs, retrain_epochs=max(1, epochs // 4)),
        ),
        "stl": (
            lambda: ProgressiveNet(**hparams, lateral=False, optimizer=optimizer),
            lambda: ProgressiveCallback(epochs_per_task=epochs),
        ),
        "finetune": (
            lambda: DENMLP(**hparams, optimizer=optimizer),
            lambda: FineTuningCallback(epochs_per_task=epochs),
        ),
        "ewc": (lambda: DENMLP(**hparams, optimizer=optimizer), lambda: EWCCallback(epochs_per_task=epochs)),
    }


def run_method(model_fn: Callable, callback_fn: Callable, datamodule, folder: Path, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    evaluation = TaskEvaluation(output_dir=str(folder), plots=False, print_report=False)
    trainer = sequence_trainer([callback_fn(), evaluation], default_root_dir=folder)
    start = time.perf_counter()
    trainer.fit(model_fn(), datamodule=datamodule)
    seconds = time.perf_counter() - start
    return {**evaluation.summary, "seconds": seconds, "epochs": trainer.current_epoch}


def largest_drop(rows: list[list[float | None]]) -> float:
    """The largest drop of any old task from its best score after it was learned to its final score
    (tasks with an undefined score, e.g. a single-class AUROC, are left out)."""
    matrix = task_matrix(rows)
    last = matrix.shape[0] - 1
    drops = [float(matrix[j:last, j].max() - matrix[last, j]) for j in range(last)]
    return max((drop for drop in drops if not math.isnan(drop)), default=0.0)


def summarise(name: str, result: dict[str, Any], reference: list[float] | None) -> dict[str, Any]:
    scores = result["auroc"] or result["accuracy"]
    diagonal = [row[i] for i, row in enumerate(scores)]
    return {
        "method": METHODS[name],
        "parameters_after_task": result["parameters_after_task"],
        "backward_transfer": backward_transfer(scores),
        "largest_drop": largest_drop(scores),
        "forward_transfer": forward_transfer(scores, reference) if reference is not None else None,
        "average_accuracy": average_score(result["accuracy"]),
        "average_auroc": average_score(result["auroc"]) if result["auroc"] else None,
        "diagonal": diagonal,
        "seconds": result["seconds"],
        "epochs": result["epochs"],
        "accuracy": result["accuracy"],
        "auroc": result["auroc"],
    }


def markdown(rows: list[dict[str, Any]], title: str, binary: bool) -> str:
    score = "AUROC" if binary else "accuracy"
    lines = [
        title,
        "",
        f"| method | parameters after first → last task | BWT ({score}) | largest drop ({score}) | "
        f"forward transfer ({score}) | final avg accuracy | final avg AUROC | epochs | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        params = row["parameters_after_task"]
        fwt = f"{row['forward_transfer']:+.4f}" if row["forward_transfer"] is not None else "-"
        auroc = f"{row['average_auroc']:.4f}" if row["average_auroc"] is not None else "-"
        lines.append(
            f"| {row['method']} | {params[0]:,} → {params[-1]:,} | {row['backward_transfer']:+.4f} | "
            f"{row['largest_drop']:.4f} | {fwt} | {row['average_accuracy']:.4f} | {auroc} | {row['epochs']} | "
            f"{row['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, binary: bool) -> None:
    import matplotlib.ticker
    from matplotlib.figure import Figure

    key = "average_auroc" if binary else "average_accuracy"
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for row in rows:
        ax.scatter(row["parameters_after_task"][-1], row[key])
        ax.annotate(row["method"], (row["parameters_after_task"][-1], row[key]), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters after the last task")
    ax.set_ylabel("final average " + ("AUROC" if binary else "accuracy"))
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a lightning-den fit configuration (stream, model widths, DEN settings)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--root", default=None, help="MNIST folder, overriding the config's data.init_args.root")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per task of the other methods")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<config name>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    name = Path(args.config).stem
    out = Path(args.out or f"benchmarks/results/{name}")
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["--data.init_args.root", args.root] if args.root else []
    cli = DENCLI(args=["--config", args.config, *overrides], run=False, save_config_callback=None)
    den = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DENCallback))
    hparams = {k: cli.model.hparams[k] for k in ("in_features", "hidden_sizes", "num_classes")}
    epochs = args.epochs or den.epochs.sparse
    datamodule = cli.datamodule
    seed = int(cli.config.get("seed_everything") or 0)
    build = builders(hparams, cli.model.optimizer_factory, den, epochs)
    binary = all(datamodule.num_classes(t) == 2 for t in range(datamodule.num_tasks))
    ordered = sorted(args.methods, key=lambda m: m != "stl")  # the reference for forward transfer first
    results, reference = {}, None
    for method in ordered:
        result = run_method(*build[method], datamodule, out / method, seed)
        results[method] = summarise(method, result, reference)
        if method == "stl":
            reference = results[method]["diagonal"]
            for done in results.values():
                done["forward_transfer"] = forward_transfer(
                    done["accuracy"] if not binary else done["auroc"], reference
                )
    rows = [results[m] for m in args.methods]
    title = (
        f"{name}: {datamodule.num_tasks} tasks, widths {hparams['hidden_sizes']}; DEN's phases as configured, "
        f"the other methods {epochs} epochs per task (PackNet plus {max(1, epochs // 4)} of retraining)"
    )
    table = markdown(rows, title, binary)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps({"config": args.config, "epochs": epochs, "rows": rows}, indent=2))
    plot(rows, out / "accuracy_vs_parameters.png", binary)
    print(table)


if __name__ == "__main__":
    main()
