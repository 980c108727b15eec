"""Baselines on one shared trunk with a head per task: plain fine-tuning, and online EWC.

Each callback pairs its method (:mod:`lightning_den.core.trunk`) with the Lightning driver. Both train an
:class:`~lightning_den.ExpandableMLP` (e.g. a :class:`~lightning_den.DENMLP`) that never grows.
"""

from __future__ import annotations

from lightning_den.core.trunk import EWCMethod, FineTuningMethod
from lightning_den.driver import TaskSequenceCallback, configured


class FineTuningCallback(TaskSequenceCallback):
    """Fine-tunes one shared network task after task, with a new head per task (the forgetting baseline).

    Args:
        epochs_per_task: most epochs of each task.
        block: name of the ExpandableMLP (found automatically if there is one).
        convergence_tol: see :class:`~lightning_den.driver.TaskSequenceCallback`.
        seed: seed of the new heads' initial weights.

    Example::

        Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, callbacks=[FineTuningCallback(20)])
    """

    def __init__(
        self, epochs_per_task: int = 20, block: str | None = None, convergence_tol: float = 0.0, seed: int = 0
    ) -> None:
        method = configured(FineTuningMethod, epochs_per_task=epochs_per_task, seed=seed)
        super().__init__(method, block=block, convergence_tol=convergence_tol)


class EWCCallback(TaskSequenceCallback):
    """Online Elastic Weight Consolidation on a shared trunk with a head per task.

    Args:
        ewc_lambda: strength of the penalty ``lambda/2 * sum F (theta - theta*)^2``.
        gamma: decay of the accumulated Fisher at each new task (online EWC; 1.0 keeps all of it).
        epochs_per_task: most epochs of each task.
        block: name of the ExpandableMLP (found automatically if there is one).
        convergence_tol: see :class:`~lightning_den.driver.TaskSequenceCallback`.
        seed: seed of the new heads' initial weights.

    Example::

        Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, callbacks=[EWCCallback(ewc_lambda=100)])
    """

    def __init__(
        self,
        ewc_lambda: float = 100.0,
        gamma: float = 1.0,
        epochs_per_task: int = 20,
        block: str | None = None,
        convergence_tol: float = 0.0,
        seed: int = 0,
    ) -> None:
        method = configured(EWCMethod, ewc_lambda=ewc_lambda, gamma=gamma, epochs_per_task=epochs_per_task, seed=seed)
        super().__init__(method, block=block, convergence_tol=convergence_tol)
