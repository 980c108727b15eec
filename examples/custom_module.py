"""DEN on the MLP part of a larger model: a small conv feature extractor feeding an ExpandableMLP.

Run: ``.venv/bin/python examples/custom_module.py``. The extractor learns during the first task and
stays fixed afterwards; DEN grows the MLP block task by task.
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_den import DENCallback, DENLightningModule, ExpandableMLP, SplitDigits, TaskEvaluation


class ConvDEN(DENLightningModule):
    """8x8 digit images -> conv features -> expandable MLP with one head per task."""

    def __init__(self, hidden_sizes: list[int], num_classes: int = 2, lr: float = 5e-3) -> None:
        super().__init__(optimizer=functools.partial(torch.optim.Adam, lr=lr))
        self.features = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten())
        self.mlp = ExpandableMLP(8 * 6 * 6, hidden_sizes, head_classes=num_classes)

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        return self.mlp(self.features(x), self.current_task if task is None else task)


def main() -> None:
    pl.seed_everything(0)
    datamodule = SplitDigits(num_tasks=3)
    model = ConvDEN(hidden_sizes=[32, 16])
    evaluation = TaskEvaluation()
    den = DENCallback(sparsity_l1=0.05, group_sparsity=0.5, drift_penalty=1.0, loss_threshold=0.05)
    trainer = pl.Trainer(
        max_epochs=-1,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[den, evaluation],
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=datamodule)
    for task, (row, widths) in enumerate(zip(evaluation.accuracy, evaluation.widths, strict=True)):
        print(f"after task {task}: accuracy {[round(a, 3) for a in row]}, MLP widths {widths}")


if __name__ == "__main__":
    main()
