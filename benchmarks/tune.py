"""Choose one of DEN's settings on a validation split, over several seeds, as the shipped configurations were.

Each task's training data are cut into training and validation data (``compare.validation_stream``; the test
data are never seen); DEN runs with each candidate value under each seed, and the final average score
(AUROC when every task is binary, accuracy otherwise) and the parameters are written to
``<out>/den_<setting>.json`` and ``.md`` (the runs' own files under ``<out>/tuning/``). A value is a number,
one number per hidden layer (``[40,10]``) or, for an on/off setting, ``true``/``false``; ``--with`` holds other
settings fixed for every candidate, and ``--reference`` also scores one network per task on the same split (the
score DEN's own is judged against):

    .venv/bin/python benchmarks/tune.py examples/mnist_variation.yaml --root ../shared/data/mnist \\
        --setting drift_penalty --values 3 12 30 --seeds 0 1 2
    .venv/bin/python benchmarks/tune.py examples/permuted_mnist.yaml --root ../shared/data/mnist \\
        --setting units_per_expansion --values 30 [40,10] --with drift_penalty=0.25 --seeds 0 --reference
    .venv/bin/python benchmarks/tune.py examples/permuted_mnist.yaml --root ../shared/data/mnist \\
        --setting early_expansion --values false true --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from compare import (
    READY_FAMILIES,
    add_threads_argument,
    builders,
    den_setting,
    den_variant,
    held_out_score,
    ready_models,
    validation_stream,
)

from lightning_den import DENCallback
from lightning_den.cli import DENCLI

#: the row of ``--reference``
REFERENCE = "one network per task"


def candidate(text: str) -> float | list[float] | bool:
    """A value from the command line: a number, a JSON list of numbers (one per hidden layer), or ``true`` /
    ``false`` for an on/off setting."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, bool):
        return value
    numbers = value if isinstance(value, list) else [value]
    if not numbers or not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
        raise argparse.ArgumentTypeError(
            f"expected a number, a list of numbers such as [40,10], or true/false, got {text!r}"
        )
    if not all(math.isfinite(n) for n in numbers):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return value


def label(value: float | list[float] | bool) -> str:
    """A value as the tables and folders name it: ``0.25``, ``40-10`` for ``[40, 10]``, ``true``."""
    if isinstance(value, bool):
        return str(value).lower()
    return "-".join(f"{n:g}" for n in value) if isinstance(value, list) else f"{value:g}"


def markdown(
    setting: str,
    seeds: list[int],
    threads: int,
    scores: dict[str, list[float]],
    costs: dict[str, list[dict]],
    fixed: dict[str, Any],
) -> str:
    """One row per candidate value: the score per seed, their mean, and the mean parameters, epochs and seconds."""
    held = "".join(f", {name} {label(value)}" for name, value in fixed.items())
    lines = [
        f"DEN's `{setting}`{f' (with{held[1:]})' if held else ''} on a validation split of each task's training "
        f"data, seeds {seeds}, {threads} torch thread{'s' if threads > 1 else ''}",
        "",
        f"| {setting} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | parameters | epochs | seconds |",
        "|---" * (len(seeds) + 5) + "|",
    ]
    for value, per_seed in scores.items():
        cells = " | ".join(f"{score:.4f}" for score in per_seed)
        runs = [cost for cost in costs[value] if cost]  # a diverged run has no cost
        parameters, epochs, seconds = (
            statistics.fmean(run[key] for run in runs) if runs else math.nan
            for key in ("parameters", "epochs", "seconds")
        )
        mean = statistics.fmean(per_seed)
        lines.append(f"| {value} | {cells} | {mean:.4f} | {parameters:,.0f} | {epochs:.0f} | {seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a lightning-den fit configuration of DENMLP or DENCNN with a DENCallback")
    parser.add_argument("--setting", required=True, help="a DENCallback argument, e.g. drift_penalty")
    parser.add_argument(
        "--values",
        nargs="+",
        type=candidate,
        required=True,
        help="the candidate values (a number, [40,10], true/false)",
    )
    parser.add_argument(
        "--with",
        dest="fixed",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another DENCallback setting, the same for every candidate (repeatable)",
    )
    parser.add_argument(
        "--reference", action="store_true", help="also score one network per task on the same validation split"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--root", default=None, help="MNIST folder, overriding the config's data.init_args.root")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<config name>)")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = ["--data.init_args.root", args.root] if args.root else []
    cli = DENCLI(args=["--config", args.config, *overrides], run=False, save_config_callback=None)
    den = next((cb for cb in cli.trainer.callbacks if isinstance(cb, DENCallback)), None)
    if den is None or type(cli.model) not in READY_FAMILIES:
        parser.error(
            f"{args.config} needs a ready DEN model ({[m.__name__ for m in READY_FAMILIES]}) and a DENCallback"
        )

    def typed(name: str, value: float | list[float] | bool) -> Any:
        """``value`` as the setting ``name`` takes it (whole numbers where it holds them; true/false for an on/off
        setting)."""
        current = den_setting(den, name)
        numbers = list(current) if isinstance(current, list | tuple) else [current]
        if not numbers or not all(isinstance(n, int | float) for n in numbers):  # bool is an int; None is neither
            parser.error(f"DENCallback has no numeric or on/off setting {name!r}")
        on_off = isinstance(current, bool)
        if on_off != isinstance(value, bool):
            parser.error(f"{name} takes {'true or false' if on_off else 'numbers'}, got {label(value)}")
        if on_off:
            return value
        per_layer = "Sequence" in str(inspect.signature(DENCallback).parameters.get(name))
        if isinstance(value, list) and not per_layer:
            parser.error(f"{name} takes one number, got {label(value)}")
        if not all(isinstance(n, int) for n in numbers):
            return value
        given = value if isinstance(value, list) else [value]
        if any(not float(n).is_integer() for n in given):
            parser.error(f"{name} takes whole numbers, got {label(value)}")
        return [int(n) for n in value] if isinstance(value, list) else int(value)

    fixed = {}
    for item in args.fixed:
        name, _, text = item.partition("=")
        if name == args.setting:
            parser.error(f"--with {item}: {name} is the --setting being tuned")
        if name in fixed:
            parser.error(f"--with {item}: {name} is already given")
        try:
            fixed[name] = typed(name, candidate(text))
        except argparse.ArgumentTypeError as error:
            parser.error(f"--with {item}: {error}")
    values = {label(value): typed(args.setting, value) for value in args.values}  # all checked before any run
    if len(values) < len(args.values):
        parser.error(f"--values names a value twice: {[label(value) for value in args.values]}")
    name = f"den_{args.setting}" + "".join(f"_with_{key}_{label(value)}" for key, value in fixed.items())
    out = Path(args.out or f"benchmarks/results/{Path(args.config).stem}")
    models = ready_models(cli.model, cli.model.optimizer_factory)
    held_out = validation_stream(cli.datamodule, args.seeds[0])
    scores: dict[str, list[float]] = {}
    costs: dict[str, list[dict[str, Any]]] = {}
    for key, value in values.items():
        changes: dict[str, Any] = {**fixed, args.setting: value}
        for seed in args.seeds:
            folder = out / "tuning" / f"{name}_{key}" / f"seed_{seed}"
            build = (models["den"], functools.partial(den_variant, den, seed, **changes))
            score, cost = held_out_score(build, held_out, folder, seed)
            scores.setdefault(key, []).append(score)
            costs.setdefault(key, []).append(cost)
            print(f"{args.setting}={key} seed {seed}: {score:.4f}, {cost}", flush=True)
    reference: dict[str, Any] = {"scores": [], "costs": []}
    if args.reference:
        epochs = den.method.epochs.sparse  # as compare.py gives the other methods by default
        for seed in args.seeds:
            folder = out / "tuning" / "stl" / f"seed_{seed}"
            score, cost = held_out_score(builders(models, den, epochs, seed)["stl"], held_out, folder, seed)
            reference["scores"].append(score)
            reference["costs"].append(cost)
    rows = {**scores, REFERENCE: reference["scores"]} if args.reference else scores
    table = markdown(args.setting, args.seeds, args.threads, rows, {**costs, REFERENCE: reference["costs"]}, fixed)
    (out / f"{name}.md").write_text(table + "\n")
    record = {"config": args.config, "setting": args.setting, "fixed": fixed, "seeds": args.seeds}
    record.update(threads=args.threads, scores=scores, costs=costs)
    if args.reference:
        record["reference"] = reference
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    print(table)


if __name__ == "__main__":
    main()
