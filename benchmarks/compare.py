"""Compare the architecture methods and the baselines on one task stream, measured.

Runs each chosen method on the stream of a ``lightning-den`` configuration with the same starting
widths, optimizer, seed and epochs per task (DEN's phases come from the configuration; the other
methods get DEN's first-task epochs per task), then writes ``comparison.md``, ``comparison.json`` and
``accuracy_vs_parameters.png``:

    .venv/bin/python benchmarks/compare.py examples/permuted_mnist.yaml --root ../shared/data/mnist
    .venv/bin/python benchmarks/compare.py examples/split_digits.yaml --methods den pnn stl --seeds 0 1 2

The configuration's model is a ready model (``DENMLP`` or ``DENCNN``: every method gets its ready model of the
same widths, convolutional for ``DENCNN``) or a user's own LightningModule class with one ``nn.Sequential`` of
Linear layers, convolutions first if any (every method gets a fresh, re-drawn copy, which its callback
converts).

Rows: DEN as configured, the paper's ablations of it (DEN without split; DNN-Selective: selective
retraining only, no expansion and no split), Progressive Networks, PackNet, one network per task,
fine-tuning and EWC. With several ``--seeds`` (initial weights, new units and shuffling; the stream stays
the same) every number is the mean over the seeds and the final averages carry their standard deviation.

Columns: parameters after the first and the last task (growth), the share of each hidden layer's units
DEN's selective retraining selected (mean over tasks), backward transfer and the largest drop of any old
task (forgetting), forward transfer (the score on a new task right after learning it minus the score of
a same-width network trained on it alone, i.e. the ``stl`` run), final average accuracy (and AUROC when
every task is binary), the epochs each method actually trained, wall time. The score of the transfer
columns is AUROC when every task is binary, accuracy otherwise.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_den import DENCNN, DENMLP, DENCallback, ReadyModel, TaskEvaluation
from lightning_den.baselines import (
    EWCCallback,
    FineTuningCallback,
    PackNetCallback,
    PackNetCNNModel,
    PackNetModel,
    ProgressiveCallback,
    ProgressiveCNNModel,
    ProgressiveNet,
)
from lightning_den.cli import DENCLI
from lightning_den.core.convert import linear_chain, linear_chains
from lightning_den.core.den import PhaseEpochs
from lightning_den.data import TaskSequenceDataModule
from lightning_den.data.streams import train_test_split
from lightning_den.driver import sequence_trainer
from lightning_den.metrics import average_score, backward_transfer, forward_transfer, task_matrix

METHODS = {
    "den": "DEN",
    "den-nosplit": "DEN without split",
    "den-selective": "DNN-Selective (selection only)",
    "den-subnetwork": "DEN, subnetwork only (the official code's selective step)",
    "den-early": "DEN, early expansion",
    "pnn": "Progressive Networks",
    "packnet": "PackNet",
    "stl": "one network per task",
    "finetune": "fine-tuning",
    "ewc": "EWC",
}


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch's CPU threads. Results depend on it (matrix products split their sums by thread), so
    a measurement is repeated bit for bit only with the same count; every run is recorded with it."""
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the results depend on it)")


def den_setting(den: DENCallback, name: str) -> Any:
    """The value of the ``DENCallback`` argument ``name`` in ``den`` (``None`` if it has no such setting): a
    phase's epochs, a setting of DEN's method, or the callback's own (``convergence_tol``)."""
    if name in PhaseEpochs.ARGUMENTS:
        return getattr(den.method.epochs, PhaseEpochs.ARGUMENTS[name])
    return getattr(den.method, name, getattr(den, name, None))


def den_variant(den: DENCallback, seed: int, **changes: Any) -> DENCallback:
    """A fresh copy of the configuration's DEN callback with ``seed`` and ``changes`` (the paper's ablations, a
    tuned setting), each a ``DENCallback`` argument (see :func:`den_setting`)."""
    variant = copy.deepcopy(den)
    variant.method.seed = seed
    for name, value in changes.items():
        if den_setting(variant, name) is None:
            raise ValueError(f"DENCallback has no setting {name!r}")
        if name in PhaseEpochs.ARGUMENTS:
            variant.method.epochs = dataclasses.replace(variant.method.epochs, **{PhaseEpochs.ARGUMENTS[name]: value})
        else:
            setattr(variant.method if hasattr(variant.method, name) else variant, name, value)
    return variant


#: for each ready DEN model a configuration may name, the ready models of the other architecture methods
READY_FAMILIES: dict[type[ReadyModel], dict[str, type[ReadyModel]]] = {
    DENMLP: {"den": DENMLP, "pnn": ProgressiveNet, "packnet": PackNetModel},
    DENCNN: {"den": DENCNN, "pnn": ProgressiveCNNModel, "packnet": PackNetCNNModel},
}


def ready_models(configured: ReadyModel, optimizer: Callable) -> dict[str, Callable[[], pl.LightningModule]]:
    """For each method, its ready model of the shape of the configuration's (a ``DENMLP`` or a ``DENCNN``)."""
    family = READY_FAMILIES[type(configured)]
    shape = inspect.signature(family["den"]).parameters.keys() - {"optimizer", "lr_scheduler"}
    hparams = {key: value for key, value in configured.hparams.items() if key in shape}
    den_model = lambda: family["den"](**hparams, optimizer=optimizer)  # noqa: E731
    return {
        "den": den_model,
        "den-nosplit": den_model,
        "den-selective": den_model,
        "den-subnetwork": den_model,
        "den-early": den_model,
        "pnn": lambda: family["pnn"](**hparams, optimizer=optimizer),
        "packnet": lambda: family["packnet"](**hparams, optimizer=optimizer),
        "stl": lambda: family["pnn"](**hparams, lateral=False, optimizer=optimizer),
        "finetune": den_model,
        "ewc": den_model,
    }


def users_model(template: pl.LightningModule) -> Callable[[], pl.LightningModule]:
    """Fresh copies of a user's own model (a configuration of its class): every layer with a
    ``reset_parameters`` is drawn again under the run's seed, and each method's callback converts the copy's
    chain of Linear layers into its block."""

    def fresh() -> pl.LightningModule:
        model = copy.deepcopy(template)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if module is not model and callable(reset):
                reset()
        return model

    return fresh


def builders(
    models: dict[str, Callable[[], pl.LightningModule]],
    den: DENCallback,
    epochs: int,
    seed: int,
    ewc_lambda: float | None = None,
) -> dict[str, tuple[Callable, Callable]]:
    """For each method: (build the model, build the callback)."""
    callbacks = {
        "den": lambda: den_variant(den, seed),
        "den-nosplit": lambda: den_variant(den, seed, split=False),
        "den-selective": lambda: den_variant(den, seed, expansion=False, split=False),
        "den-subnetwork": lambda: den_variant(den, seed, subnetwork_only=True),
        "den-early": lambda: den_variant(den, seed, early_expansion=True),
        "pnn": lambda: ProgressiveCallback(epochs_per_task=epochs, seed=seed),
        "packnet": lambda: PackNetCallback(train_epochs=epochs, retrain_epochs=max(1, epochs // 4), seed=seed),
        "stl": lambda: ProgressiveCallback(epochs_per_task=epochs, lateral=False, seed=seed),
        "finetune": lambda: FineTuningCallback(epochs_per_task=epochs, seed=seed),
        "ewc": lambda: EWCCallback(
            epochs_per_task=epochs, seed=seed, **({} if ewc_lambda is None else {"ewc_lambda": ewc_lambda})
        ),
    }
    return {method: (models[method], callback) for method, callback in callbacks.items()}


def run_method(model_fn: Callable, callback_fn: Callable, datamodule, folder: Path, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    datamodule.seed = seed  # the shuffling too
    evaluation = TaskEvaluation(output_dir=str(folder), plots=False, print_report=False)
    trainer = sequence_trainer([callback_fn(), evaluation], default_root_dir=folder)
    start = time.perf_counter()
    trainer.fit(model_fn(), datamodule=datamodule)
    seconds = time.perf_counter() - start
    return {**evaluation.summary, "seconds": seconds, "epochs": trainer.current_epoch}


def validation_stream(datamodule: TaskSequenceDataModule, seed: int, fraction: float = 0.2) -> TaskSequenceDataModule:
    """The stream with each task's training data cut into training and validation data (per class, with
    ``seed``); the test data are left out, so what is chosen on it never saw them."""
    train, validation = [], []
    for inputs, labels in datamodule.train_tasks:
        kept, held_out = train_test_split(inputs, labels, test_fraction=fraction, seed=seed)
        train.append(kept)
        validation.append(held_out)
    return TaskSequenceDataModule.from_tensors(train=train, test=validation, batch_size=datamodule.batch_size)


def tune_ewc(
    lambdas: list[float], build: Callable[[float], tuple[Callable, Callable]], held_out, folder: Path, seed: int
) -> tuple[float, dict[str, float]]:
    """The ``lambda`` of EWC with the best final average score (AUROC when every task is binary) on
    ``held_out``, and every candidate's score."""
    scores = {
        repr(strength): held_out_score(build(strength), held_out, folder / f"ewc_lambda_{strength!r}", seed)[0]
        for strength in lambdas
    }
    best = max(scores, key=scores.__getitem__)
    return float(best), scores


def held_out_score(
    build: tuple[Callable, Callable], held_out: TaskSequenceDataModule, folder: Path, seed: int
) -> tuple[float, dict[str, Any]]:
    """A method's final average score on ``held_out`` (AUROC when every task is binary, ``-inf`` when its
    loss diverged), and its run's parameters after the last task, epochs and seconds (empty if it diverged)."""
    try:
        result = run_method(*build, held_out, folder, seed)
    except FloatingPointError:
        return -math.inf, {}
    cost = {"parameters": result["parameters_after_task"][-1], "epochs": result["epochs"], "seconds": result["seconds"]}
    return average_score(result["auroc"] or result["accuracy"]), cost


def largest_drop(rows: list[list[float | None]]) -> float:
    """The largest drop of any old task from its best score after it was learned to its final score
    (tasks with an undefined score, e.g. a single-class AUROC, are left out)."""
    matrix = task_matrix(rows)
    last = matrix.shape[0] - 1
    drops = [float(matrix[j:last, j].max() - matrix[last, j]) for j in range(last)]
    return max((drop for drop in drops if not math.isnan(drop)), default=0.0)


def mean_selected_fraction(result: dict[str, Any]) -> list[float] | None:
    """Per hidden layer, the share of its units selective retraining selected, averaged over the tasks."""
    reports = [report for report in result.get("selection") or [] if report]
    if not reports:
        return None
    return [
        sum(r["selected_fraction"][layer] for r in reports) / len(reports)
        for layer in range(len(reports[0]["selected_fraction"]))
    ]


def summarise(name: str, result: dict[str, Any], reference: list[float] | None) -> dict[str, Any]:
    scores = result["auroc"] or result["accuracy"]
    diagonal = [row[i] for i, row in enumerate(scores)]
    return {
        "selected_fraction": mean_selected_fraction(result),
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


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a method's runs over several seeds: numbers averaged (with their standard deviation
    over the seeds for the final averages), every run kept under ``seeds``."""

    def mean(values: list[Any]) -> Any:
        present = [value for value in values if value is not None]
        if not present:
            return None
        if isinstance(present[0], list):
            return [mean([v[i] for v in present]) for i in range(len(present[0]))]
        return sum(present) / len(present)

    row = {key: runs[0][key] for key in ("method",)}
    for key in runs[0]:
        if key != "method":
            row[key] = mean([run[key] for run in runs])
    for key in ("average_accuracy", "average_auroc"):
        values = [run[key] for run in runs if run[key] is not None]
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    row["parameters_after_task"] = [round(p) for p in row["parameters_after_task"]]
    row["seeds"] = runs
    return row


def markdown(rows: list[dict[str, Any]], title: str, binary: bool) -> str:
    score = "AUROC" if binary else "accuracy"
    lines = [
        title,
        "",
        f"| method | parameters after first → last task | selected (mean per layer) | BWT ({score}) | "
        f"largest drop ({score}) | forward transfer ({score}) | final avg accuracy | final avg AUROC | epochs | "
        "wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        params = row["parameters_after_task"]
        fwt = f"{row['forward_transfer']:+.4f}" if row["forward_transfer"] is not None else "-"
        selected = " / ".join(f"{f:.2f}" for f in row["selected_fraction"]) if row["selected_fraction"] else "-"
        lines.append(
            f"| {row['method']} | {params[0]:,} → {params[-1]:,} | {selected} | {row['backward_transfer']:+.4f} | "
            f"{row['largest_drop']:.4f} | {fwt} | {_with_spread(row, 'average_accuracy')} | "
            f"{_with_spread(row, 'average_auroc')} | {row['epochs']:.0f} | {row['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def _with_spread(row: dict[str, Any], key: str) -> str:
    if row[key] is None:
        return "-"
    spread = row.get(f"{key}_std")
    return f"{row[key]:.4f}" if spread is None else f"{row[key]:.4f} ± {spread:.4f}"


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
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds (default: the config's)")
    parser.add_argument(
        "--ewc-lambdas",
        nargs="+",
        type=float,
        default=None,
        help="tune EWC's lambda: the best of these on a validation split of each task's training data",
    )
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<config name>)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="re-run only --methods and replace their rows in the comparison already in --out (its seeds, epochs, "
        "EWC lambda and the other rows kept): for a change that can move those rows alone",
    )
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = Path(args.config).stem
    out = Path(args.out or f"benchmarks/results/{name}")
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["--data.init_args.root", args.root] if args.root else []
    cli = DENCLI(args=["--config", args.config, *overrides], run=False, save_config_callback=None)
    den = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DENCallback))
    if isinstance(cli.model, ReadyModel):
        if type(cli.model) not in READY_FAMILIES:
            parser.error(f"the configuration's model must be one of {[m.__name__ for m in READY_FAMILIES]}")
        models = ready_models(cli.model, cli.model.optimizer_factory)
        widths = [*cli.model.hparams.get("channels", []), *cli.model.hparams["hidden_sizes"]]
    else:  # a user's own class: every method converts a fresh copy of its chain of Linear layers
        fresh = users_model(cli.model)
        models = dict.fromkeys(METHODS, fresh)
        (chain_name, chain), *others = linear_chains(cli.model)[0].items() or [(None, None)]
        if chain is None or others:
            parser.error(f"{type(cli.model).__name__} needs exactly one nn.Sequential chain of Linear layers")
        widths = linear_chain(chain, chain_name).hidden_sizes
    epochs = args.epochs or den.method.epochs.sparse
    datamodule = cli.datamodule
    seeds = args.seeds or [int(cli.config.get("seed_everything") or 0)]
    binary = all(datamodule.num_classes(t) == 2 for t in range(datamodule.num_tasks))
    ordered = sorted(args.methods, key=lambda m: m != "stl")  # the reference for forward transfer first
    if args.ewc_lambdas and "ewc" not in args.methods:
        parser.error("--ewc-lambdas tunes EWC: add `ewc` to --methods")
    ewc_lambda, tuning = None, None
    saved: dict[str, Any] = {"rows": [], "rerun": []}
    if args.update:
        if not (out / "comparison.json").exists() or args.seeds or args.epochs or args.ewc_lambdas:
            parser.error("--update re-runs rows of the comparison in --out with its seeds, epochs and EWC lambda")
        saved = json.loads((out / "comparison.json").read_text())
        seeds, epochs, ewc_lambda = saved["seeds"], saved["epochs"], saved["ewc_lambda"]
        tuning = saved["ewc_validation_scores"]
    if args.ewc_lambdas:
        held_out = validation_stream(datamodule, seeds[0])
        ewc_lambda, tuning = tune_ewc(
            args.ewc_lambdas,
            lambda strength: builders(models, den, epochs, seeds[0], strength)["ewc"],
            held_out,
            out / "tuning",
            seeds[0],
        )
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in args.methods}
    names = {display: method for method, display in METHODS.items()}
    kept = {names[row["method"]]: row for row in saved["rows"] if names[row["method"]] not in args.methods}
    for index, seed in enumerate(seeds):
        build = builders(models, den, epochs, seed, ewc_lambda)
        results, reference = {}, kept["stl"]["seeds"][index]["diagonal"] if "stl" in kept else None
        for method in ordered:
            result = run_method(*build[method], datamodule, out / f"seed_{seed}" / method, seed)
            results[method] = summarise(method, result, reference)
            if method == "stl":
                reference = results[method]["diagonal"]
                for done in results.values():
                    done["forward_transfer"] = forward_transfer(
                        done["accuracy"] if not binary else done["auroc"], reference
                    )
        for method, result in results.items():
            runs[method].append(result)
    measured = {**kept, **{m: aggregate(runs[m]) for m in args.methods}}
    methods = [m for m in METHODS if m in measured]
    rows = [measured[m] for m in methods]
    earlier = saved.get("rerun", [])  # rows an earlier --update re-ran (a file written before it has none)
    rerun = [*earlier, *(m for m in args.methods if m not in earlier)] if args.update else []
    spread = f"; mean over seeds {seeds} (± sample standard deviation)" if len(seeds) > 1 else f"; seed {seeds[0]}"
    spread += f"; {args.threads} torch thread{'s' if args.threads > 1 else ''}"
    if rerun:
        spread += f"; re-run later with --update: {' | '.join(METHODS[m] for m in rerun)}"
    if "ewc" in methods:
        how = "chosen on a validation split of the training data" if tuning else "not tuned"
        strength = EWCCallback().method.ewc_lambda if ewc_lambda is None else ewc_lambda
        spread += f"; EWC lambda {strength:g} ({how})"
    title = (
        f"{name}: {datamodule.num_tasks} tasks, widths {widths}; DEN's phases as configured, "
        f"the other methods {epochs} epochs per task (PackNet plus {max(1, epochs // 4)} of retraining){spread}"
    )
    table = markdown(rows, title, binary)
    (out / "comparison.md").write_text(table + "\n")
    record = {
        "config": args.config,
        "epochs": epochs,
        "seeds": seeds,
        "threads": args.threads,
        "ewc_lambda": ewc_lambda,
        "ewc_validation_scores": tuning,
        "rows": rows,
        "rerun": rerun,
    }
    (out / "comparison.json").write_text(json.dumps(record, indent=2))
    plot(rows, out / "accuracy_vs_parameters.png", binary)
    print(table)


if __name__ == "__main__":
    main()
