"""The one argument validator of the package: every constructor (blocks, methods, callbacks) checks its
arguments through these functions, so a wrong value gets the same kind of message everywhere.

They raise ``ValueError`` (the core imports no Lightning); the Lightning callbacks re-raise it as
``MisconfigurationException`` (:func:`lightning_den.driver.configured`).

Example:
    >>> check_number("sparsity_l1", 0.01)
    0.01
    >>> check_count("units_per_expansion", 0)
    Traceback (most recent call last):
    ...
    ValueError: `units_per_expansion` must be a positive integer, got 0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, include_one: bool = False) -> float:
    """``value`` as a float if it lies in ``(0, 1)`` (``(0, 1]`` with ``include_one``)."""
    interval = "(0, 1]" if include_one else "(0, 1)"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not (0 < value < 1 or (include_one and value == 1))
    ):
        raise ValueError(f"`{name}` must be a fraction in {interval}, got {value!r}")
    return float(value)


def check_count(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` if it is an int ``>= minimum`` (a positive integer by default)."""
    if not _is_int(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}")
    return value


def check_counts(name: str, value: Any) -> int | tuple[int, ...]:
    """``value`` if it is a positive integer, or as a tuple if it is a sequence of integers ``>= 0`` of which
    at least one is positive (one per layer).

    Example:
        >>> check_counts("units_per_expansion", [40, 0])
        (40, 0)
    """
    if not isinstance(value, Sequence) or isinstance(value, str):
        return check_count(name, value)
    counts = list(value)
    if not counts or any(not _is_int(count) or count < 0 for count in counts) or not any(counts):
        raise ValueError(
            f"`{name}` must be a positive integer or one integer >= 0 per layer (at least one positive), got {value!r}"
        )
    return tuple(counts)


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_sizes(name: str, values: Any) -> tuple[int, ...]:
    """``values`` as a tuple if it is a sequence of one or more positive integers."""
    sizes = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else None
    if not sizes or any(not _is_int(size) or size < 1 for size in sizes):
        raise ValueError(f"`{name}` must be one or more positive integers, got {values!r}")
    return tuple(sizes)


def optional(check: Any, name: str, value: Any, meaning: str, **options: Any) -> Any:
    """``None`` (which means ``meaning``), or ``value`` passed by ``check``; the message names both.

    Example:
        >>> optional(check_fraction, "selection_budget", None, "select all that BFS reaches", include_one=True)
    """
    if value is None:
        return None
    try:
        return check(name, value, **options)
    except ValueError as error:
        raise ValueError(f"{error} (or None: {meaning})") from None
