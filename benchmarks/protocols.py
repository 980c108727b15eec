"""DEN against one network per task (STL) and fine-tuning one shared network, on a config's stream.

Runs the DEN configuration as ``lightning-den fit`` would, then the two baselines on the same stream
with the same starting widths, optimizer and (per task) the epochs of DEN's first task, and writes
a Markdown table and a JSON file:

    .venv/bin/python benchmarks/protocols.py examples/permuted_mnist.yaml --root ../shared/data/mnist
    .venv/bin/python benchmarks/protocols.py examples/mnist_variation.yaml --root ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_den import DENMLP, DENCallback, TaskEvaluation
from lightning_den.cli import DENCLI
from lightning_den.evaluation import task_scores
from lightning_den.metrics import average_score, backward_transfer, capacity, forgetting


def _fit(model: DENMLP, datamodule, epochs: int, root: Path) -> None:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, train_dataloaders=datamodule.train_dataloader())


def _scores(model: DENMLP, datamodule, tasks: range) -> list[tuple[float, float | None]]:
    return [task_scores(model, datamodule.task_dataloader(j), j, datamodule.num_classes(j)) for j in tasks]


def single_task(hparams: dict, optimizer, datamodule, epochs: int, root: Path) -> dict:
    """One fresh network per task, trained on that task alone."""
    diagonal = []
    for task in range(datamodule.num_tasks):
        datamodule.set_task(task)
        model = DENMLP(**hparams, optimizer=optimizer)
        _fit(model, datamodule, epochs, root)
        model.current_task = 0
        x, y = datamodule.test_tasks[task]
        model.eval()
        with torch.no_grad():
            logits = model(x, task=0)
        diagonal.append(_binary_or_plain_scores(logits, y, datamodule.num_classes(task)))
    return {"diagonal": diagonal}


def _binary_or_plain_scores(logits, labels, classes):
    from torchmetrics.functional.classification import binary_auroc

    accuracy = float((logits.argmax(-1) == labels).float().mean())
    auroc = float(binary_auroc(logits.softmax(-1)[:, 1], labels)) if classes == 2 else None
    return accuracy, auroc


def fine_tuning(
    hparams: dict, optimizer, datamodule, epochs: int, root: Path
) -> list[list[tuple[float, float | None]]]:
    """One shared trunk trained task after task, a new head per task; all of it keeps training."""
    model = DENMLP(**hparams, optimizer=optimizer)
    rows = []
    for task in range(datamodule.num_tasks):
        datamodule.set_task(task)
        if task > 0:
            model.mlp.add_head_()
            for t in range(task):  # old heads are not trained any more
                model.mlp.heads[str(t)].requires_grad_(False)
        model.current_task = task
        _fit(model, datamodule, epochs, root)
        rows.append(_scores(model, datamodule, range(task + 1)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--root", default=None, help="MNIST folder, overriding the config's data.init_args.root")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.config).stem
    overrides = ["--data.init_args.root", args.root] if args.root else []
    start = time.perf_counter()
    cli = DENCLI(args=["fit", "--config", args.config, *overrides, "--trainer.enable_progress_bar", "false",
                       "--trainer.default_root_dir", str(out / name)])
    den_seconds = time.perf_counter() - start
    evaluation = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TaskEvaluation))
    den = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DENCallback))
    hparams = {k: cli.model.hparams[k] for k in ("in_features", "hidden_sizes", "num_classes")}
    optimizer = cli.model.optimizer_factory
    datamodule = cli.datamodule
    epochs = den.epochs.sparse
    classes = [datamodule.num_classes(t) for t in range(datamodule.num_tasks)]
    cap = capacity(hparams["in_features"], hparams["hidden_sizes"], classes, 0)

    pl.seed_everything(0)
    start = time.perf_counter()
    stl = single_task(hparams, optimizer, datamodule, epochs, out / name)
    stl_seconds = time.perf_counter() - start
    pl.seed_everything(0)
    start = time.perf_counter()
    ft_rows = fine_tuning(hparams, optimizer, datamodule, epochs, out / name)
    ft_seconds = time.perf_counter() - start

    binary = all(c == 2 for c in classes)
    ft_acc = [[a for a, _ in row] for row in ft_rows]
    ft_auroc = [[u for _, u in row] for row in ft_rows] if binary else None
    stl_acc = [a for a, _ in stl["diagonal"]]
    stl_auroc = [u for _, u in stl["diagonal"]] if binary else None
    den_summary = evaluation.summary
    results = {
        "config": args.config,
        "tasks": datamodule.num_tasks,
        "epochs_per_task_baselines": epochs,
        "methods": {
            "DEN": {
                "average_accuracy": den_summary["summary"]["average_accuracy"],
                "average_auroc": den_summary["summary"].get("average_auroc"),
                "backward_transfer": den_summary["summary"]["backward_transfer"],
                "forgetting": den_summary["summary"]["forgetting"],
                "parameters": den_summary["capacity"]["total_parameters"],
                "seconds": den_seconds,
                "widths": den_summary["widths"][-1],
            },
            "one network per task": {
                "average_accuracy": sum(stl_acc) / len(stl_acc),
                "average_auroc": sum(stl_auroc) / len(stl_auroc) if binary else None,
                "backward_transfer": 0.0,
                "forgetting": 0.0,
                "parameters": cap["single_task_parameters"],
                "seconds": stl_seconds,
            },
            "fine-tuning one network": {
                "average_accuracy": average_score(ft_acc),
                "average_auroc": average_score(ft_auroc) if binary else None,
                "backward_transfer": backward_transfer(ft_acc),
                "forgetting": forgetting(ft_acc),
                "parameters": cap["shared_network_parameters"],
                "seconds": ft_seconds,
            },
        },
        "den_accuracy_matrix": den_summary["accuracy"],
        "fine_tuning_accuracy_matrix": ft_acc,
        "single_task_accuracy": stl_acc,
    }
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    stl_params = cap["single_task_parameters"]
    lines = [
        f"{name} ({datamodule.num_tasks} tasks; baselines {epochs} epochs per task)",
        "",
        "| method | avg accuracy | avg AUROC | BWT | forgetting | parameters | % of STL | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in results["methods"].items():
        auroc = f"{row['average_auroc']:.4f}" if row["average_auroc"] is not None else "-"
        lines.append(
            f"| {method} | {row['average_accuracy']:.4f} | {auroc} | {row['backward_transfer']:+.4f} | "
            f"{row['forgetting']:.4f} | {row['parameters']:,} | {row['parameters'] / stl_params:.1%} | "
            f"{row['seconds']:.0f} s |"
        )
    table = "\n".join(lines)
    (out / f"{name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
