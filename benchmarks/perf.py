"""Performance of DEN in Lightning, measured in one run: a Markdown table on stdout, JSON and Markdown files.

    make bench                                     # CPU defaults: 784-312-128 MLP, batch 256
    .venv/bin/python benchmarks/perf.py --accelerator cuda --width-in 4096 --hidden 4096 4096 --batch 1024

1. Training step: median time of one step under ``DENCallback`` in each DEN phase (masks, proximal steps
   and drift pull included; expansion steps only the new units' own Parameters) against plain Lightning
   training the same module *at the same widths* (expansion adds units; the extra compute is DEN's
   network, not the callback's overhead), and a plain PyTorch loop over the same module (the floor).
   For each optimizer of ``--optimizers``.
2. Boundary cost: time spent in the callback's epoch hooks (phase decisions, BFS selection, drift,
   expansion, pruning, split, optimizer and DDP rebuild) as a share of each task's training time.
3. Timestamped inference: task 0 of a network grown over 10 tasks against a dense network of task 0's
   widths, and the newest task against a dense network of the full widths.
4. Scaling: whole-sequence wall time and peak memory during the fit for 2, 5, 10 and 20 tasks (each in
   its own process), and how the time per task grows against the active parameters.
5. Alternatives on the same stream and epochs per task: DEN's whole-sequence time against one network
   per task (STL), Progressive Networks and PackNet.
6. The paper's claim: selective retraining against retraining every unit, time to the same training loss.

Each comparison is a ratio of times taken in the same run: the step, optimizer, inference and
alternatives figures measure both sides in each of ``--rounds`` rounds and report the median of the
per-round ratios; the boundary and scaling figures come from one run each. Absolute times (medians)
are for orientation only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import (
    OPTIMIZERS,
    Clock,
    EpochLosses,
    EpochMarks,
    Network,
    PeakMemory,
    Rounds,
    SelectionLog,
    StepTimer,
    device_of,
    machine,
    median_time,
    steady_median,
    synthetic_stream,
    time_to_loss,
    warm_up_excess,
)
from lightning_den import DENCallback
from lightning_den.baselines import PackNetCallback, PackNetModel, ProgressiveCallback, ProgressiveNet
from lightning_den.core.den import DENMethod
from lightning_den.core.den.phases import DENPhase
from lightning_den.core.den.surgery import add_units_, duplicate_units_
from lightning_den.core.method import PhaseProgress
from lightning_den.driver import sequence_trainer

#: the issues' targets: step time vs plain Lightning (every phase, expansion, selective retraining at most
#: the selected share of the units + 0.15), boundary share of a task, task-0 inference vs dense
TARGETS = {
    "step": 1.15,
    "expansion_step": 1.10,
    "selective_over_selection": 0.15,
    "boundary_share": 0.02,
    "task0_inference": 1.10,
}
#: the share of each layer's units selective retraining may train, as in the shipped configurations
SELECTION_BUDGET = 0.5
#: the step row of selective retraining with ``subnetwork_only=True``
SUBNETWORK_ONLY = "selective (subnetwork only)"


def network_of(args: argparse.Namespace) -> Network:
    """The benchmarked network the arguments describe: an MLP, or a CNN with ``--conv-channels``."""
    image = tuple(args.image) if args.conv_channels else None
    return Network(args.width_in, tuple(args.hidden), tuple(args.conv_channels), image)


def den_settings(epochs: int, split_threshold: float, first_task_epochs: int | None = None) -> dict[str, Any]:
    """Every phase runs all its epochs; selective retraining trains half of each layer's units, as in the
    shipped configurations; every task expands (k = 10 units per layer), at most 10 splits."""
    return dict(
        selection_budget=SELECTION_BUDGET,
        first_task_epochs=first_task_epochs or epochs,
        head_fit_epochs=epochs,
        selective_epochs=epochs,
        expansion_epochs=epochs,
        split_epochs=epochs,
        convergence_tol=0.0,
        loss_threshold=0.0,
        split_threshold=split_threshold,
        max_splits_per_layer=10,
    )


# ---------------------------------------------------------------------------------------------- 1. steps


def training_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Per optimizer: each DEN phase's step against plain Lightning at that phase's widths; the floor."""
    clock = Clock(args.accelerator)
    stream = synthetic_stream(2, args.width_in, args.examples, args.batch)
    device = device_of(args.accelerator)
    network = network_of(args)

    def den_round(optimizer: str, **options: Any) -> StepTimer:
        torch.manual_seed(0)
        # no split, so each phase's widths are known from the expansion alone
        den = DENCallback(**den_settings(args.epochs, split_threshold=1e9), **options)
        timer = StepTimer(clock, label=lambda: den.progress.phase, widths=den.widths)
        stream.set_task(0)
        model = network.model(optimizer=optimizer)
        sequence_trainer([den, timer], accelerator=args.accelerator).fit(model, datamodule=stream)
        return timer

    def lightning_round(optimizer: str, widths: tuple[int, ...]) -> float:
        torch.manual_seed(0)
        model = network.model(widths, optimizer)
        timer = StepTimer(clock, widths=lambda: model.get_submodule(model.block_name).widths(0))
        stream.set_task(0)
        trainer = sequence_trainer([timer], accelerator=args.accelerator, max_epochs=args.epochs)
        trainer.fit(model, train_dataloaders=stream.train_dataloader())
        lightning_widths[widths] = timer.widths_of["plain"]
        return steady_median(timer.times["plain"])

    def pytorch_round(optimizer: str) -> float:
        torch.manual_seed(0)
        model = network.model(optimizer=optimizer).to(device)
        step = OPTIMIZERS[optimizer](model.parameters())
        times = []
        for _ in range(args.epochs):
            for x, y in stream.train_dataloader():
                x, y = x.to(device), y.to(device)  # outside the time, as Lightning moves the batch before its hooks
                start = clock()
                loss = torch.nn.functional.cross_entropy(model(x, task=0), y)
                step.zero_grad()
                loss.backward()
                step.step()
                times.append(clock() - start)
        return steady_median(times)

    results: dict[str, Any] = {}
    lightning_widths: dict[tuple[int, ...], tuple[int, ...]] = {}  # asked for -> what the timed model had
    for optimizer in args.optimizers:
        phase_widths: dict[str, tuple[int, ...]] = {}

        def one_round(optimizer: str = optimizer, phase_widths: dict = phase_widths) -> dict[str, float]:
            timer = den_round(optimizer)
            phase_widths.update(timer.widths_of)
            row = {f"den {phase}": steady_median(times) for phase, times in timer.times.items()}
            # the official code's selective retraining: the subnetwork alone, the units outside it left out
            alone = den_round(optimizer, subnetwork_only=True).times[DENPhase.SELECTIVE.value]
            row[f"den {SUBNETWORK_ONLY}"] = steady_median(alone)
            phase_widths[SUBNETWORK_ONLY] = phase_widths[DENPhase.SELECTIVE.value]
            for widths in sorted(set(phase_widths.values())):
                row[f"lightning {widths}"] = lightning_round(optimizer, widths)
            row["pytorch"] = pytorch_round(optimizer)
            return row

        rounds = Rounds(args.rounds, one_round)
        phases = {}
        for phase, widths in phase_widths.items():
            den_s, lightning_s = rounds.median(f"den {phase}"), rounds.median(f"lightning {widths}")
            phases[phase] = {
                "widths": list(widths),
                "lightning_widths": list(lightning_widths[widths]),
                "den_s": den_s,
                "lightning_s": lightning_s,
                "den_vs_lightning": rounds.ratio(f"den {phase}", f"lightning {widths}"),
                "den_samples_per_s": args.batch / den_s,
                "lightning_samples_per_s": args.batch / lightning_s,
            }
        first = phase_widths[next(iter(phase_widths))]
        results[optimizer] = {
            "phases": phases,
            "optimizer_in_expansion": optimizer_in_expansion(args, optimizer),
            "plain_pytorch_s": rounds.median("pytorch"),
            "lightning_vs_pytorch": rounds.ratio(f"lightning {first}", "pytorch"),
        }
    return results


def optimizer_in_expansion(args: argparse.Namespace, optimizer: str) -> dict[str, float]:
    """One optimizer step over what the expansion phase trains (the new units' own Parameters, the new
    head: :meth:`~lightning_den.core.den.method.DENMethod.arrange`) against one over every Parameter of the
    network at the same widths: the optimizer's share of expansion, which holds no frozen entry."""
    clock = Clock(args.accelerator)
    device = device_of(args.accelerator)
    network = network_of(args)
    mlp = network.block()
    generator = torch.Generator().manual_seed(0)
    mlp.add_task_(generator)
    add_units_(mlp, [10] * len(network.widths), generator)
    mlp = mlp.to(device)
    every = list(mlp.parameters())
    method, progress = DENMethod(), PhaseProgress(task=mlp.newest_task, phase=DENPhase.EXPANSION)
    method.arrange(mlp, progress)
    trained = [p for p, entries in method.trainable(mlp, progress).items() if entries is not False]

    def step_s(params: list[torch.nn.Parameter]) -> float:
        step = OPTIMIZERS[optimizer](params)
        for p in params:  # the optimizer reads them, never changes them
            p.grad = torch.randn_like(p)
        return median_time(clock, step.step, args.repeats)

    rounds = Rounds(args.rounds, lambda: {"expansion": step_s(trained), "dense": step_s(every)})
    return {
        "trained_entries": sum(p.numel() for p in trained),
        "every_entry": sum(p.numel() for p in every),
        "expansion_s": rounds.median("expansion"),
        "dense_s": rounds.median("dense"),
        "expansion_vs_dense": rounds.ratio("expansion", "dense"),
    }


# ------------------------------------------------------------------------------------ 2. and 4. sequences


def den_sequence(args: argparse.Namespace, tasks: int) -> dict[str, Any]:
    """One whole DEN sequence with every kind of surgery: per task its wall time, its boundary time, its
    active parameters and widths.

    Boundary time is what the callback's epoch hooks take (decisions, BFS, drift, surgery, optimizer
    rebuild) plus the one-off work of each phase's first steps (optimizer state, step plans): the
    time its warm-up steps take beyond as many steady steps.
    """
    clock = Clock(args.accelerator)
    stream = synthetic_stream(tasks, args.width_in, args.examples, args.batch)
    torch.manual_seed(0)
    den = DENCallback(**den_settings(args.epochs, split_threshold=0.0))
    before, after = EpochMarks(clock, lambda: den.progress.task), EpochMarks(clock, lambda: den.progress.task)
    steps = StepTimer(clock, label=lambda: (den.progress.task, den.progress.phase))
    model = network_of(args).model()
    with PeakMemory(args.accelerator) as memory:
        start = clock()
        sequence_trainer([before, den, steps, after], accelerator=args.accelerator).fit(model, datamodule=stream)
        total = clock() - start
    task_s, hooks_s, warm_up_s = [0.0] * tasks, [0.0] * tasks, [0.0] * tasks
    epoch_starts = [t for _, t in before.starts] + [after.ends[-1][1]]
    for i, (task, started) in enumerate(after.starts):  # labelled after the crossing: the task it starts
        task_s[task] += epoch_starts[i + 1] - before.starts[i][1]
        hooks_s[task] += (started - before.starts[i][1]) + (after.ends[i][1] - before.ends[i][1])
    for (task, _), times in steps.times.items():
        warm_up_s[task] += warm_up_excess(times)
    boundary_s = [h + w for h, w in zip(hooks_s, warm_up_s, strict=True)]
    mlp = model.get_submodule(model.block_name)
    return {
        "tasks": tasks,
        "sequence_s": total,
        "task_s": task_s,
        "boundary_s": boundary_s,
        "epoch_hooks_s": hooks_s,
        "warm_up_s": warm_up_s,
        "boundary_share": [b / t for b, t in zip(boundary_s, task_s, strict=True)],
        "active_parameters": [mlp.num_parameters(t) for t in range(tasks)],
        "widths": [list(mlp.widths(t)) for t in range(tasks)],
        "total_parameters": mlp.num_parameters(),
        **memory.result(),
    }


def scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """:func:`den_sequence` for each task count in its own process (so that each memory peak is its own)."""
    rows = []
    for tasks in args.task_counts:
        command = [sys.executable, __file__, "--only-sequence", str(tasks), *passthrough(args)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"the {tasks}-task sequence failed:\n{result.stderr[-4000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows


def passthrough(args: argparse.Namespace) -> list[str]:
    """The sizes and device, as command-line arguments for a child process."""
    return [
        *("--width-in", str(args.width_in), "--hidden", *map(str, args.hidden)),
        *(("--conv-channels", *map(str, args.conv_channels)) if args.conv_channels else ()),
        *(("--image", *map(str, args.image)) if args.conv_channels else ()),
        *("--epochs", str(args.epochs), "--examples", str(args.examples), "--batch", str(args.batch)),
        *("--accelerator", args.accelerator),
        *(["--flush-denormal"] if args.flush_denormal else []),
    ]


# -------------------------------------------------------------------------------------------- 3. inference


def timestamped_inference(args: argparse.Namespace) -> dict[str, Any]:
    """Task 0 after 10 tasks of growth against a dense network of task 0's widths; newest task against full."""
    clock = Clock(args.accelerator)
    device = device_of(args.accelerator)
    network = network_of(args)
    mlp = network.block()
    generator = torch.Generator().manual_seed(0)
    for _ in range(9):
        mlp.add_task_(generator)
        add_units_(mlp, [max(1, h // 8) for h in network.widths], generator)
        duplicate_units_(mlp, 0, list(range(max(1, network.widths[0] // 16))))
    mlp = mlp.to(device).eval()
    x = torch.randn(args.batch, args.width_in, device=device)
    newest = mlp.newest_task
    small = network.dense(mlp.widths(0)).to(device).eval()
    large = network.dense(mlp.widths(newest)).to(device).eval()

    @torch.no_grad()
    def forward_s(run: Callable[[], torch.Tensor]) -> float:
        return median_time(clock, run, args.repeats)

    def one_round() -> dict[str, float]:
        return {
            "task0_s": forward_s(lambda: mlp(x, task=0)),
            "dense_task0_s": forward_s(lambda: small(x)),
            "newest_s": forward_s(lambda: mlp(x, task=newest)),
            "dense_full_s": forward_s(lambda: large(x)),
        }

    rounds = Rounds(args.rounds, one_round)
    return {
        "widths_task0": list(mlp.widths(0)),
        "widths_newest": list(mlp.widths(newest)),
        **{key: rounds.median(key) for key in rounds.samples},
        "task0_vs_dense_task0_width": rounds.ratio("task0_s", "dense_task0_s"),
        "newest_vs_dense_full_width": rounds.ratio("newest_s", "dense_full_s"),
    }


# ----------------------------------------------------------------------------------------- 5. alternatives


def alternatives(args: argparse.Namespace) -> dict[str, Any]:
    """Whole-sequence time of DEN, STL, Progressive Networks and PackNet: same stream, same epochs per task."""
    clock = Clock(args.accelerator)
    per_task = 4 * args.epochs  # a DEN task after the first: head fit, selective, expansion, split
    stream = synthetic_stream(args.tasks, args.width_in, args.examples, args.batch)
    sizes = dict(in_features=args.width_in, hidden_sizes=args.hidden, num_classes=10, optimizer=OPTIMIZERS["adam"])
    methods = {
        "DEN": lambda: (
            network_of(args).model(),
            DENCallback(**den_settings(args.epochs, split_threshold=0.0, first_task_epochs=per_task)),
        ),
        "STL": lambda: (ProgressiveNet(**sizes, lateral=False), ProgressiveCallback(epochs_per_task=per_task)),
        "Progressive Networks": lambda: (ProgressiveNet(**sizes), ProgressiveCallback(epochs_per_task=per_task)),
        "PackNet": lambda: (
            PackNetModel(**sizes),
            PackNetCallback(0.75, train_epochs=per_task - args.epochs, retrain_epochs=args.epochs),
        ),
    }
    parameters: dict[str, int] = {}

    def one_round() -> dict[str, float]:
        seconds = {}
        for name, build in methods.items():
            torch.manual_seed(0)
            model, callback = build()
            stream.set_task(0)
            start = clock()
            sequence_trainer([callback], accelerator=args.accelerator).fit(model, datamodule=stream)
            seconds[name] = clock() - start
            parameters[name] = sum(p.numel() for p in model.parameters())
        return seconds

    rounds = Rounds(args.rounds, one_round)
    return {
        "tasks": args.tasks,
        "epochs_per_task": per_task,
        "sequence_s": {name: rounds.median(name) for name in methods},
        "vs_stl": {name: rounds.ratio(name, "STL") for name in methods},
        "parameters": parameters,
    }


# --------------------------------------------------------------------------------- 6. the paper's claim


def selective_vs_whole(args: argparse.Namespace) -> dict[str, Any]:
    """The paper's claim for DEN's first step: retraining the selected subnetwork reaches a new task's loss
    sooner than retraining the whole network.

    Two runs of two related tasks (task 1's class projection is half task 0's: what the network learnt serves
    it in part, as the paper's selective retraining assumes) share task 0 and task 1's head fit (same seed
    and data); task 1 then retrains for ``4 * --epochs`` epochs, under the same L1 and pull towards task 0's
    weights, either at most half of each layer's units (``selection_budget`` 0.5, as shipped) or every unit
    BFS reaches (the whole network: the report gives the share). The target is the higher of the two phases'
    last epoch losses, so both reach it; each side's time is its phase's training time until an epoch's mean
    loss was at most the target.
    """
    clock = Clock(args.accelerator)
    stream = synthetic_stream(2, args.width_in, args.examples, args.batch, shared=0.5)
    network = network_of(args)
    settings = {
        **den_settings(args.epochs, split_threshold=0.0),
        "selective_epochs": 4 * args.epochs,
        "expansion": False,
        "split": False,
    }
    selected: dict[str, list[float]] = {}

    def curve(name: str, budget: float | None) -> list[tuple[float, float]]:
        torch.manual_seed(0)
        den = DENCallback(**{**settings, "selection_budget": budget})
        losses = EpochLosses(
            clock, label=lambda: (den.progress.task, str(den.progress.phase)), loss=lambda: den.progress.last_loss
        )
        selection = SelectionLog()
        stream.set_task(0)
        sequence_trainer([den, losses, selection], accelerator=args.accelerator).fit(network.model(), datamodule=stream)
        selected[name] = selection.selected_fraction[1]
        return losses.curve((1, DENPhase.SELECTIVE.value))

    curves: dict[str, list[tuple[float, float]]] = {}

    def reached() -> tuple[float, dict[str, tuple[float, int]]]:
        """The target loss, and the time and epochs each side took to reach it."""
        target = max(points[-1][1] for points in curves.values())
        return target, {name: time_to_loss(points, target) for name, points in curves.items()}

    def one_round() -> dict[str, float]:
        curves.update(selective=curve("selective", SELECTION_BUDGET), whole=curve("whole", None))
        return {name: seconds for name, (seconds, _) in reached()[1].items()}

    rounds = Rounds(args.rounds, one_round)
    target, to_target = reached()
    return {
        "target_loss": target,
        "selected_fraction": selected,
        "epochs_to_target": {name: epochs for name, (_, epochs) in to_target.items()},
        "selective_s": rounds.median("selective"),
        "whole_s": rounds.median("whole"),
        "selective_vs_whole": rounds.ratio("selective", "whole"),
        "loss_curves": {name: [loss for _, loss in points] for name, points in curves.items()},
    }


# ---------------------------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    """The results as the Markdown table the README shows."""
    rows = []
    for optimizer, step in results.get("training_step", {}).items():
        ratios = ", ".join(f"{phase} {row['den_vs_lightning']:.2f}x" for phase, row in step["phases"].items())
        selective = SELECTION_BUDGET + TARGETS["selective_over_selection"]
        target = (
            f"≤ {TARGETS['step']:.2f}x (expansion ≤ {TARGETS['expansion_step']:.2f}x; selective ≤ {selective:.2f}x "
            f"at {SELECTION_BUDGET:.0%} of the units)"
        )
        rows.append((f"training step, DEN vs plain Lightning at the same widths ({optimizer})", ratios, target))
        expansion = step["phases"].get("expansion", next(iter(step["phases"].values())))
        den_rate, plain_rate = expansion["den_samples_per_s"], expansion["lightning_samples_per_s"]
        rows.append(
            (
                f"throughput in expansion, samples/s ({optimizer})",
                f"DEN {den_rate:,.0f}, plain Lightning {plain_rate:,.0f}",
                "-",
            )
        )
        expansion_step = step["optimizer_in_expansion"]
        rows.append(
            (
                f"optimizer step in expansion vs over the whole network ({optimizer})",
                f"{expansion_step['expansion_vs_dense']:.2f}x ({expansion_step['trained_entries']:,} of "
                f"{expansion_step['every_entry']:,} entries)",
                "-",
            )
        )
        floor = f"{step['lightning_vs_pytorch']:.2f}x"
        rows.append((f"plain Lightning vs a plain PyTorch loop ({optimizer})", floor, "-"))
    if "boundaries" in results:
        boundaries = results["boundaries"]
        shares = boundaries["boundary_share"]
        rows.append(
            (
                f"boundary work (decisions, BFS, surgery, optimizer rebuild) per task, {boundaries['tasks']} tasks",
                f"max {max(shares):.2%}, mean {statistics.mean(shares):.2%} of the task's time",
                f"< {TARGETS['boundary_share']:.0%}",
            )
        )
    if "inference" in results:
        inference = results["inference"]
        rows.append(
            (
                f"task 0 after 10 tasks (widths {inference['widths_task0']}) vs a dense network of those widths",
                f"{inference['task0_vs_dense_task0_width']:.2f}x",
                f"≤ {TARGETS['task0_inference']:.2f}x",
            )
        )
        rows.append(
            (
                f"newest task (widths {inference['widths_newest']}) vs a dense network of those widths",
                f"{inference['newest_vs_dense_full_width']:.2f}x",
                "-",
            )
        )
    if "scaling" in results:
        scaled = results["scaling"]
        counts = " / ".join(str(row["tasks"]) for row in scaled)
        rows.append(
            (
                f"whole sequence, {counts} tasks",
                " / ".join(f"{row['sequence_s']:.1f} s" for row in scaled)
                + "; peak RSS in the fit "
                + " / ".join(f"{row['peak_rss_mib']:.0f}" for row in scaled)
                + " MiB (at its start "
                + " / ".join(f"{row['rss_at_start_mib']:.0f}" for row in scaled)
                + " MiB)",
                "-",
            )
        )
    if "growth" in results:
        growth = results["growth"]
        rows.append(
            (
                f"time of task {growth['last_task']} vs tasks {growth['baseline_tasks']} ({growth['tasks']}-task run)",
                f"{growth['time_ratio']:.2f}x, active parameters {growth['parameter_ratio']:.2f}x",
                "time grows no faster than active parameters",
            )
        )
    if "alternatives" in results:
        alt = results["alternatives"]
        rows.append(
            (
                f"whole sequence vs one network per task (STL), {alt['tasks']} tasks x {alt['epochs_per_task']} epochs",
                ", ".join(f"{name} {ratio:.2f}x" for name, ratio in alt["vs_stl"].items() if name != "STL"),
                "-",
            )
        )
    if "selective_vs_whole" in results:
        claim = results["selective_vs_whole"]
        shares = {
            name: "/".join(f"{f:.2f}" for f in fractions) for name, fractions in claim["selected_fraction"].items()
        }
        epochs = claim["epochs_to_target"]
        rows.append(
            (
                "selective retraining vs retraining the whole network, time to the same training loss (the paper's "
                "claim)",
                f"{claim['selective_vs_whole']:.2f}x (units {shares['selective']} vs {shares['whole']}; "
                f"{epochs['selective']} vs {epochs['whole']} epochs to loss {claim['target_loss']:.3f})",
                "< 1x (the paper: faster)",
            )
        )
    lines = [f"Measured on {results['machine']}.", "", "| what | measured | target |", "|---|---|---|"]
    lines += [f"| {what} | {measured} | {target} |" for what, measured, target in rows]
    return "\n".join(lines) + "\n"


def growth(sequence: dict[str, Any]) -> dict[str, Any]:
    """How the last task's time compares with the early tasks' (tasks 2-4: task 0 has only the sparse
    phase and task 1 pays the first-time costs), against how its active parameters compare."""
    last = sequence["tasks"] - 1
    early = list(range(2, min(5, last))) or [1]
    return {
        "tasks": sequence["tasks"],
        "last_task": last,
        "baseline_tasks": early,
        "time_ratio": sequence["task_s"][last] / statistics.median(sequence["task_s"][t] for t in early),
        "parameter_ratio": sequence["active_parameters"][last]
        / statistics.median(sequence["active_parameters"][t] for t in early),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width-in", type=int, default=784)
    parser.add_argument("--hidden", type=int, nargs="+", default=[312, 128])
    parser.add_argument(
        "--conv-channels",
        type=int,
        nargs="+",
        default=[],
        help="a CNN: filters of each 5x5 convolution (2x2 pooling after each) before the --hidden layers",
    )
    parser.add_argument("--image", type=int, nargs=3, metavar=("C", "H", "W"), help="image shape of a CNN's inputs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--examples", type=int, default=4096, help="training examples per task")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each DEN phase")
    parser.add_argument("--tasks", type=int, default=5, help="tasks of the boundary and alternatives runs")
    parser.add_argument("--task-counts", type=int, nargs="+", default=[2, 5, 10, 20], help="tasks of the scaling runs")
    parser.add_argument("--repeats", type=int, default=50, help="forward passes timed per inference round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each comparison (median of per-round ratios)")
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), default=["adam", "adam-fused"])
    parser.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help="CPU: flush subnormal floats to zero (both sides of every comparison)",
    )
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-alternatives", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/perf", help="path of the .json and .md, no suffix")
    parser.add_argument("--only-sequence", type=int, metavar="TASKS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("width_in", "batch", "examples", "epochs", "repeats", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if min(args.hidden) < 1:
        parser.error(f"--hidden must be positive integers, got {args.hidden}")
    if args.tasks < 2 or min(args.task_counts) < 2:
        parser.error("--tasks and --task-counts must all be at least 2 (a sequence needs a second task to grow)")
    if args.conv_channels:
        if args.image is None or args.image[0] * args.image[1] * args.image[2] != args.width_in:
            parser.error("--conv-channels needs --image C H W with C * H * W equal to --width-in")
        if not (args.skip_alternatives or args.only_sequence):
            parser.error("--conv-channels needs --skip-alternatives (PNN and PackNet have no conv blocks yet)")
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        parser.error("--accelerator cuda needs a CUDA GPU; none is visible to torch")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.accelerator == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        torch.set_flush_denormal(args.flush_denormal)
    if args.only_sequence:
        print(json.dumps(den_sequence(args, args.only_sequence)))
        return
    results: dict[str, Any] = {
        "machine": machine(args.accelerator),
        "config": {k: v for k, v in vars(args).items() if k not in ("only_sequence", "out")},
    }
    sections: list[tuple[str, Callable[[argparse.Namespace], Any]]] = [
        ("training_step", training_steps),
        ("boundaries", lambda args: den_sequence(args, args.tasks)),
        ("inference", timestamped_inference),
    ]
    if not args.skip_scaling:
        sections += [("scaling", scaling), ("growth", lambda args: growth(results["scaling"][-1]))]
    if not args.skip_alternatives:
        sections.append(("alternatives", alternatives))
    sections.append(("selective_vs_whole", selective_vs_whole))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, measure in sections:
        results[name] = measure(args)
        # written after every section, so that a run stopped by a time limit keeps what it measured
        table = markdown(results)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
