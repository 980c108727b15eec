"""Choose one of DEN's settings on a validation split, over several seeds, as the shipped configurations were.

Each task's training data are cut into training and validation data (``compare.validation_stream``; the test
data are never seen); DEN runs with each candidate value under each seed, and the final average score
(AUROC when every task is binary, accuracy otherwise) and the parameters are written to
``<out>/den_<setting>.json`` and ``.md`` (the runs' own files under ``<out>/tuning/``):

    .venv/bin/python benchmarks/tune.py examples/mnist_variation.yaml --root ../shared/data/mnist \\
        --setting drift_penalty --values 3 12 30 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from compare import (
    READY_FAMILIES,
    add_threads_argument,
    den_setting,
    den_variant,
    held_out_score,
    ready_models,
    validation_stream,
)

from lightning_den import DENCallback
from lightning_den.cli import DENCLI


def markdown(
    setting: str, seeds: list[int], threads: int, scores: dict[str, list[float]], costs: dict[str, list[dict]]
) -> str:
    """One row per candidate value: the score per seed, their mean, and the mean parameters, epochs and seconds."""
    lines = [
        f"DEN's `{setting}` on a validation split of each task's training data, seeds {seeds}, {threads} torch "
        f"thread{'s' if threads > 1 else ''}",
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
    parser.add_argument("--values", nargs="+", type=float, required=True, help="the candidate values")
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
    current = den_setting(den, args.setting)
    if not isinstance(current, int | float) or isinstance(current, bool):
        parser.error(f"DENCallback has no numeric setting {args.setting!r}")
    out = Path(args.out or f"benchmarks/results/{Path(args.config).stem}")
    build_model = ready_models(cli.model, cli.model.optimizer_factory)["den"]
    held_out = validation_stream(cli.datamodule, args.seeds[0])
    scores: dict[str, list[float]] = {}
    costs: dict[str, list[dict[str, Any]]] = {}
    integer = isinstance(current, int)  # e.g. units_per_expansion
    if integer and any(not value.is_integer() for value in args.values):
        parser.error(f"{args.setting} takes whole numbers, got {args.values}")
    for value in args.values:
        changes: dict[str, Any] = {args.setting: int(value) if integer else value}
        for seed in args.seeds:
            folder = out / "tuning" / f"den_{args.setting}_{value:g}" / f"seed_{seed}"
            build = (build_model, functools.partial(den_variant, den, seed, **changes))
            score, cost = held_out_score(build, held_out, folder, seed)
            scores.setdefault(f"{value:g}", []).append(score)
            costs.setdefault(f"{value:g}", []).append(cost)
            print(f"{args.setting}={value:g} seed {seed}: {score:.4f}, {cost}", flush=True)
    table = markdown(args.setting, args.seeds, args.threads, scores, costs)
    (out / f"den_{args.setting}.md").write_text(table + "\n")
    record = {"config": args.config, "setting": args.setting, "seeds": args.seeds, "threads": args.threads}
    record["scores"] = scores
    (out / f"den_{args.setting}.json").write_text(json.dumps({**record, "costs": costs}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
