"""A whole DEN sequence under real 2-process DDP on CPU (gloo); run by tests/test_ddp.py.

Usage: python tests/ddp_den_run.py OUTPUT.json [ddp|ddp_spawn|ddp-plain|ddp-two-blocks|ddp-cnn|ddp-pnn-cnn|
ddp-packnet-cnn].
Lightning's defaults are on (validation every epoch, the default logger, checkpoints) with ``TaskEvaluation`` and a
``ModelCheckpoint(save_last=True)``. Rank 1 computes deliberately wrong surgery plans: the run must
still end with identical weights on both ranks, because the plan decided on rank 0 is broadcast and
applied everywhere. Under ``ddp_spawn`` the main process must get the grown network back. ``ddp-plain``
trains a user's plain LightningModule (its ``nn.Sequential`` converted on every rank) under ``ddp``;
``ddp-two-blocks`` one with two chains, both named and grown; ``ddp-cnn`` a convolutional DEN model on the
digits (filters as units); ``ddp-pnn-cnn`` and ``ddp-packnet-cnn`` the convolutional Progressive Network and
PackNet there (rank 1 plans to keep every free weight where rank 0 prunes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_den import DENCallback, DENMethod, SplitDigits, TaskEvaluation
from lightning_den.baselines import PackNetCallback, PackNetCNNModel, ProgressiveCallback, ProgressiveCNNModel
from lightning_den.core.packnet import PackNetMethod
from lightning_den.core.routing import task_blocks
from tests.helpers import TwoChains, UserModule, short_phases, tiny_cnn, tiny_model, tiny_stream

#: the model each mode trains under DDP, and the blocks it names
MODELS = {"ddp-plain": (UserModule, None), "ddp-two-blocks": (TwoChains, TwoChains.BLOCKS), "ddp-cnn": (tiny_cnn, None)}
#: the convolutional baselines: model and callback of each mode
CNN = dict(in_shape=[1, 8, 8], channels=[3, 4], hidden_sizes=[6], num_classes=2, kernel_size=3, padding=1)
BASELINES = {
    "ddp-pnn-cnn": (lambda: ProgressiveCNNModel(**CNN), lambda: ProgressiveCallback(epochs_per_task=2)),
    "ddp-packnet-cnn": (lambda: PackNetCNNModel(**CNN), lambda: PackNetCallback(train_epochs=2, retrain_epochs=1)),
}
#: the stream of a mode, when it is not the tiny random one
STREAMS = {mode: lambda: SplitDigits(num_tasks=3) for mode in ("ddp-cnn", *BASELINES)}


class WrongPlansOnRankOne(DENMethod):
    """Rank 1 computes deliberately different surgery plans; counts how often its plan differed."""

    wrong_plans = 0

    def plan(self, block, progress, target, num_tasks):
        plan = super().plan(block, progress, target, num_tasks)
        if int(os.environ.get("LOCAL_RANK", "0")) == 1:
            wrong = dict(plan)
            if "selection" in plan:
                wrong["selection"] = [[] for _ in plan["selection"]]
            if "split" in plan:
                wrong["split"] = [list(range(len(layer.birth) // 2)) for layer in block.hidden]
            self.wrong_plans += wrong != plan
            plan = wrong
        return plan


class KeepEverythingOnRankOne(PackNetMethod):
    """PackNet whose rank 1 plans to claim every free weight at each task; counts how often it differed."""

    wrong_plans = 0

    def plan(self, block, progress, target, num_tasks):
        plan = super().plan(block, progress, target, num_tasks)
        if int(os.environ.get("LOCAL_RANK", "0")) == 1 and "claim_free" in plan:
            self.wrong_plans += not plan["claim_free"]
            plan = {**plan, "claim_free": True}
        return plan


def digest(values: bytes) -> torch.Tensor:
    return torch.tensor(list(hashlib.sha256(values).digest()), dtype=torch.int64)


class CompareRanks(Callback):
    def __init__(self) -> None:
        self.records = []

    def on_task_boundary(self, trainer, pl_module, boundary) -> None:
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.parameters())
        plan = json.dumps(boundary.changes_by_block, sort_keys=True).encode()
        gathered = pl_module.all_gather(torch.stack([digest(weights), digest(plan)]))
        self.records.append(
            {
                "phase": boundary.phase,
                "task": boundary.task,
                "widths": list(boundary.widths),
                "widths_by_block": {name: list(b.widths(b.newest_task)) for name, b in task_blocks(pl_module).items()},
                "changes": boundary.changes,
                "same_weights": bool(torch.equal(gathered[0, 0], gathered[1, 0])),
                "same_plan": bool(torch.equal(gathered[0, 1], gathered[1, 1])),
            }
        )


def weights_digest(module: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in module.parameters())).hexdigest()


class SaveFinalDigest(Callback):
    """Rank 0 writes the digest of its final weights (the main process of ddp_spawn compares its own)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path.write_text(weights_digest(pl_module))


def main() -> None:
    out, strategy = Path(sys.argv[1]).resolve(), sys.argv[2] if len(sys.argv) > 2 else "ddp"
    pl.seed_everything(int(os.environ.get("LOCAL_RANK", "0")))  # different seeds: DDP must reconcile them
    torch.set_num_threads(1)
    compare = CompareRanks()
    settings = short_phases(loss_threshold=0.0, split_threshold=0.0)
    model_type, blocks = MODELS.get(strategy, (tiny_model, None))
    if strategy in BASELINES:
        model_type, callback = BASELINES[strategy]
        den = callback()
        if isinstance(den.method, PackNetMethod):
            den.method = KeepEverythingOnRankOne(train_epochs=2, retrain_epochs=1)
    else:
        den = DENCallback(block=blocks, **settings)
        settings.pop("convergence_tol")
        den.method = WrongPlansOnRankOne(**settings)  # DENCallback's logging, with the wrong plans on rank 1
    worker_digest = out.with_suffix(".rank0")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp" if strategy in {*MODELS, *BASELINES} else strategy,
        max_epochs=-1,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[
            den,
            compare,
            TaskEvaluation(print_report=False, block=blocks[-1] if blocks else None),
            ModelCheckpoint(dirpath="ckpt", save_last=True),
            SaveFinalDigest(worker_digest),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = model_type()
    trainer.fit(model, datamodule=STREAMS.get(strategy, lambda: tiny_stream(num_tasks=3))())
    if strategy == "ddp_spawn":  # this is the main process: the workers are gone
        Path(out).write_text(
            json.dumps(
                {
                    "widths": [list(model.mlp.widths(t)) for t in range(model.mlp.num_tasks)],
                    "tasks_learned": model.tasks_learned,
                    "same_weights_as_rank_0": weights_digest(model) == worker_digest.read_text(),
                }
            )
        )
        return
    wrong = trainer.strategy.reduce(torch.tensor(float(getattr(den.method, "wrong_plans", 0))), reduce_op="sum")
    if trainer.is_global_zero:
        Path(out).write_text(json.dumps({"boundaries": compare.records, "wrong_plans_on_rank_1": float(wrong)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
