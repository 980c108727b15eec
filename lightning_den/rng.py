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
    """The CPU generator's state, and each CUDA device's where CUDA is in use (tensors, ``weights_only``-safe).

    Example:
        >>> state = random_state()
        >>> first = torch.rand(2)
        >>> set_random_state(state)
        >>> torch.equal(torch.rand(2), first)
        True
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_random_state(state: dict[str, Any]) -> None:
    """Give the generators the state :func:`random_state` returned (the CUDA ones only on as many devices)."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])
