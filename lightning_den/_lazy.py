"""Lazy exports for a package's ``__init__``: names load from their modules on first use, and
``dir()`` lists them, so ``import lightning_den`` stays cheap and the pure-torch parts import without
Lightning."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose ``exports`` map a public name to its module.

    Example:
        >>> getattr_, dir_ = lazy_exports("json", {"sqrt": "math"})
        >>> getattr_("sqrt")(4.0), "sqrt" in dir_()
        (2.0, True)
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted({*exports, *vars(importlib.import_module(package))})

    return __getattr__, __dir__
