"""DEN on the MLP head of a model written without lightning_den: a conv feature extractor and an
``nn.Sequential`` classifier, in a plain LightningModule.

Run: ``.venv/bin/python examples/custom_module.py``. ``DENCallback`` converts ``classifier`` (the only chain of
Linear layers) into its growing block at ``setup``; the conv extractor learns during the first task and stays
fixed afterwards, and ``forward(x)`` reaches the current task's head without a ``task`` argument.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_den
from lightning_den import DENCallback, SplitDigits, TaskEvaluation


class DigitClassifier(pl.LightningModule):
    """8x8 digit images -> conv features -> an MLP classifier: plain Lightning, nothing of lightning_den."""

    def __init__(self, lr: float = 5e-3) -> None:
        super().__init__()
        self.lr = lr
        self.features = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    pl.seed_everything(0)
    datamodule = SplitDigits(num_tasks=3)
    model = DigitClassifier()
    evaluation = TaskEvaluation()
    den = DENCallback(sparsity_l1=0.05, group_sparsity=0.5, drift_penalty=1.0, loss_threshold=0.05)
    trainer = pl.Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, callbacks=[den, evaluation])
    trainer.fit(model, datamodule=datamodule)
    for task, (row, widths) in enumerate(zip(evaluation.accuracy, evaluation.widths, strict=True)):
        print(f"after task {task}: accuracy {[round(a, 3) for a in row]}, MLP widths {widths}")
    x, y = datamodule.test_tasks[0]
    model.eval()
    with torch.no_grad(), lightning_den.task(model, 0):
        print(f"task 0 through the model's own forward(x): accuracy {(model(x).argmax(-1) == y).float().mean():.3f}")


if __name__ == "__main__":
    main()
