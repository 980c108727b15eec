"""The ``lightning-den`` command: a LightningCLI for task sequences.

``lightning-den fit --config examples/split_digits.yaml`` trains a whole task sequence; ``validate``
and ``test`` evaluate every task seen so far (``--ckpt_path`` loads a grown network);
``--print_config`` prints the full configuration. Optimizers are given as callables of the model
(``model.init_args.optimizer``), never through ``--optimizer``: LightningCLI's automatic optimizer
would keep optimising the parameters the model had before it grew.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from lightning_den.data.module import TaskSequenceDataModule

TRAINER_DEFAULTS = {
    "max_epochs": -1,  # the task-driving callback stops the fit after the last task
    "reload_dataloaders_every_n_epochs": 1,  # the training data changes with the task
}


class DENCLI(LightningCLI):
    """LightningCLI over any LightningModule (a ready model, a ``DENLightningModule`` or a user's own class, whose
    chain of Linear layers the method callback converts) and any :class:`TaskSequenceDataModule` subclass."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(
            pl.LightningModule,
            TaskSequenceDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
            **kwargs,
        )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-den``."""
    DENCLI(args=args)


if __name__ == "__main__":
    main()
