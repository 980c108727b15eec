"""Performance of the DEN callback, its boundaries and timestamped inference, measured in one run.

    .venv/bin/python benchmarks/perf.py                 # CPU, 784-312-128, batch 256: a table and perf.json
    .venv/bin/python benchmarks/perf.py --width 4096 --batch 1024 --accelerator cuda   # a wide MLP on a GPU

Every figure is a ratio of timings taken in the same process, so it does not depend on how fast the
machine is:

1. training step: median time of one step under ``DENCallback`` (per DEN phase, with its masks,
   proximal steps and drift pull) against the same module under plain Lightning, and a plain PyTorch
   loop (the floor);
2. boundary cost: time spent crossing boundaries (surgery, optimizer and DDP rebuild) as a share of
   the sequence's training time;
3. timestamped inference: task 0 of a network grown over 10 tasks against a dense MLP of task 0's
   width, and the newest task against a dense MLP of the full width;
4. scaling: whole-sequence wall time and time per task for 2, 5, 10 and 20 tasks, each in its own
   process, with its peak resident memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from lightning_den import DENMLP, DENCallback, TaskSequenceDataModule
from lightning_den.core.layers import ExpandableMLP
from lightning_den.core.surgery import add_units_, duplicate_units_
from lightning_den.sequence import sequence_trainer


def synthetic_stream(tasks: int, width: int, examples: int, batch: int, seed: int = 0) -> TaskSequenceDataModule:
    """Random linear 10-class tasks of ``width`` inputs (the data is not the point; the shapes are)."""
    generator = torch.Generator().manual_seed(seed)
    splits = []
    for _ in range(tasks):
        projection = torch.randn(width, 10, generator=generator)
        x = torch.randn(examples, width, generator=generator)
        splits.append((x, (x @ projection).argmax(dim=1)))
    return TaskSequenceDataModule.from_tensors(
        train=splits, test=[(x[:batch], y[:batch]) for x, y in splits], batch_size=batch, seed=seed
    )


class StepTimer(Callback):
    """Wall time of every training step (batch start to batch end, optimizer and hooks included)."""

    def __init__(self, synchronize: bool) -> None:
        self.synchronize = synchronize
        self.times: dict[str, list[float]] = {}
        self.phase = lambda: "plain"

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.setdefault(self.phase(), []).append(self._now() - self._start)


class BoundaryTimer(Callback):
    """Time of each epoch start: placed before and after DENCallback, the difference is its boundary work."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.marks.append(time.perf_counter())


def den_settings(epochs: int, split_threshold: float) -> dict:
    """Every phase runs its epochs; expansion always happens (k = 10 units per layer), at most 10 splits."""
    return dict(
        first_task_epochs=epochs,
        head_fit_epochs=epochs,
        selective_epochs=epochs,
        expansion_epochs=epochs,
        split_epochs=epochs,
        convergence_tol=0.0,
        loss_threshold=0.0,
        split_threshold=split_threshold,
        max_splits_per_layer=10,
    )


def model(width: int, hidden: list[int]) -> DENMLP:
    return DENMLP(width, hidden, 10, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))


def training_steps(args) -> dict:
    """Median step time: DEN per phase, plain Lightning, plain PyTorch; each measured ``--rounds`` times in
    alternation, keeping the fastest median of each (so a burst of load on the machine hits no one side)."""
    sync = args.accelerator == "cuda"
    stream = synthetic_stream(2, args.width_in, args.examples, args.batch)
    device = torch.device("cuda" if sync else "cpu")

    def median(values: list[float]) -> float:
        return statistics.median(values[2:] if len(values) > 4 else values)  # skip warm-up steps

    def den_round() -> dict[str, float]:
        torch.manual_seed(0)
        timer = StepTimer(sync)
        # no split here, so DEN's network stays within k units of the plain one: the ratio is the callback's cost
        den = DENCallback(**den_settings(args.epochs, split_threshold=1e9))
        timer.phase = lambda: den.progress.phase
        stream.set_task(0)
        sequence_trainer([den, timer], accelerator=args.accelerator).fit(
            model(args.width_in, args.hidden), datamodule=stream
        )
        return {phase: median(values) for phase, values in timer.times.items()}

    def lightning_round() -> float:
        torch.manual_seed(0)
        timer = StepTimer(sync)
        stream.set_task(0)
        sequence_trainer([timer], accelerator=args.accelerator, max_epochs=args.epochs * 2).fit(
            model(args.width_in, args.hidden), train_dataloaders=stream.train_dataloader()
        )
        return median(timer.times["plain"])

    def pytorch_round() -> float:
        torch.manual_seed(0)
        loop_model = model(args.width_in, args.hidden).to(device)
        optimizer = torch.optim.Adam(loop_model.parameters(), lr=1e-3)
        clock = StepTimer(sync)
        times = []
        for _ in range(args.epochs * 2):
            for x, y in stream.train_dataloader():
                start = clock._now()
                x, y = x.to(device), y.to(device)
                loss = nn.functional.cross_entropy(loop_model(x, task=0), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss.item()  # Lightning reads the loss too
                times.append(clock._now() - start)
        return median(times)

    den_rows: dict[str, float] = {}
    plain = loop = float("inf")
    for _ in range(args.rounds):
        for phase, value in den_round().items():
            den_rows[phase] = min(value, den_rows.get(phase, float("inf")))
        plain = min(plain, lightning_round())
        loop = min(loop, pytorch_round())
    return {
        "plain_pytorch_s": loop,
        "plain_lightning_s": plain,
        "den_per_phase_s": den_rows,
        "den_vs_lightning": {phase: value / plain for phase, value in den_rows.items()},
        "lightning_vs_pytorch": plain / loop,
    }


def boundary_cost(args) -> dict:
    """Share of a whole DEN sequence's training time spent crossing boundaries."""
    stream = synthetic_stream(args.tasks, args.width_in, args.examples, args.batch)
    torch.manual_seed(0)
    before, after = BoundaryTimer(), BoundaryTimer()
    den = DENCallback(**den_settings(args.epochs, split_threshold=0.0))  # every kind of surgery, splits included
    start = time.perf_counter()
    sequence_trainer([before, den, after], accelerator=args.accelerator).fit(
        model(args.width_in, args.hidden), datamodule=stream
    )
    total = time.perf_counter() - start
    crossing = sum(b - a for a, b in zip(before.marks, after.marks, strict=True))
    return {"tasks": args.tasks, "sequence_s": total, "boundaries_s": crossing, "boundary_share": crossing / total}


def timestamped_inference(args) -> dict:
    """Task 0 after 10 tasks of growth against a dense MLP of task 0's width; newest task against full width."""
    device = torch.device("cuda" if args.accelerator == "cuda" else "cpu")
    mlp = ExpandableMLP(args.width_in, args.hidden, head_classes=10)
    generator = torch.Generator().manual_seed(0)
    for _ in range(9):
        mlp.add_head_(generator)
        add_units_(mlp, [max(1, h // 8) for h in args.hidden], generator)
        duplicate_units_(mlp, 0, list(range(max(1, args.hidden[0] // 16))))
    mlp = mlp.to(device).eval()

    def dense(widths) -> nn.Module:
        sizes = [args.width_in, *widths]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(sizes[-1], 10)).to(device).eval()

    x = torch.randn(args.batch, args.width_in, device=device)

    @torch.no_grad()
    def timed(fn) -> float:
        for _ in range(5):
            fn()
        samples = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    newest = mlp.newest_task
    task0 = timed(lambda: mlp(x, task=0))
    small, large = dense(mlp.widths(0)), dense(mlp.widths(newest))
    dense0 = timed(lambda: small(x))
    newest_time, dense_full = timed(lambda: mlp(x, task=newest)), timed(lambda: large(x))
    return {
        "widths_task0": list(mlp.widths(0)),
        "widths_newest": list(mlp.widths(newest)),
        "task0_vs_dense_task0_width": task0 / dense0,
        "newest_vs_dense_full_width": newest_time / dense_full,
    }


def scaling(args) -> list[dict]:
    """Each task count in its own process, for its peak resident memory."""
    rows = []
    for tasks in (2, 5, 10, 20):
        command = [
            sys.executable,
            __file__,
            "--only-sequence",
            "--tasks",
            str(tasks),
            "--width-in",
            str(args.width_in),
            "--hidden",
            *map(str, args.hidden),
            "--epochs",
            str(args.epochs),
            "--examples",
            str(args.examples),
            "--batch",
            str(args.batch),
            "--accelerator",
            args.accelerator,
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        measured["peak_rss_mib"] = max(peak, before) / 1024
        measured["seconds_per_task"] = measured["sequence_s"] / tasks
        rows.append(measured)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width-in", type=int, default=784)
    parser.add_argument("--hidden", type=int, nargs="+", default=[312, 128])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per DEN phase")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements of each training setup")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--only-sequence", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/perf.json")
    args = parser.parse_args()
    if args.accelerator == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.only_sequence:
        print(json.dumps(boundary_cost(args)))
        return
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        + (torch.cuda.get_device_name() if args.accelerator == "cuda" else "CPU"),
        "config": {k: v for k, v in vars(args).items() if k not in ("only_sequence", "out")},
        "training_step": training_steps(args),
        "boundaries": boundary_cost(args),
        "inference": timestamped_inference(args),
    }
    if not args.skip_scaling:
        results["scaling"] = scaling(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    step = results["training_step"]
    print(f"machine: {results['machine']}")
    print(
        f"training step, plain PyTorch {step['plain_pytorch_s'] * 1e3:.2f} ms, plain Lightning "
        f"{step['plain_lightning_s'] * 1e3:.2f} ms ({step['lightning_vs_pytorch']:.2f}x PyTorch)"
    )
    for phase, ratio in step["den_vs_lightning"].items():
        print(f"  DEN {phase:>10}: {step['den_per_phase_s'][phase] * 1e3:.2f} ms = {ratio:.2f}x plain Lightning")
    b = results["boundaries"]
    print(f"boundaries: {b['boundaries_s']:.3f} s of {b['sequence_s']:.1f} s = {b['boundary_share']:.2%}")
    i = results["inference"]
    print(
        f"inference: task 0 (widths {i['widths_task0']}) {i['task0_vs_dense_task0_width']:.2f}x dense; newest "
        f"(widths {i['widths_newest']}) {i['newest_vs_dense_full_width']:.2f}x dense"
    )
    for row in results.get("scaling", []):
        print(
            f"scaling: {row['tasks']:>2} tasks: {row['sequence_s']:.1f} s, {row['seconds_per_task']:.2f} s/task, "
            f"peak {row['peak_rss_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
