"""The global random generators' state, kept in a task sequence's checkpoint.

Dropout, and anything else of the user's model that draws from torch's global generators, takes its random
numbers from them; a run resumed from a checkpoint draws the same numbers as an uninterrupted one only if it
starts from the state they had when the checkpoint was written. (DEN's own draws, new units and heads, come
from generators seeded by task, and the task streams shuffle with seeded permutations.)
"""

from __future__ import annotations

from typing import Any

import torch


def random_state() -> dict[str, Any]:
    """The CPU generator's state, and the current CUDA device's where CUDA is in use (tensors, ``weights_only``-safe).

    Only this process's device: under DDP every rank draws from its own device, and with the same seed each
    rank's state is rank 0's, which the checkpoint keeps.

    Example:
        >>> state = random_state()
        >>> first = torch.rand(2)
        >>> set_random_state(state)
        >>> torch.equal(torch.rand(2), first)
        True
    """
    cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_random_state(state: dict[str, Any]) -> None:
    """Give the generators the state :func:`random_state` returned.

    Args:
        state: from :func:`random_state`; its CUDA part goes to the current device, and is left out on a
            machine without CUDA (a GPU run resumed on a CPU: dropout on the CPU draws from the CPU state).
    """
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0], device=torch.cuda.current_device())
