"""The ``lightning-den`` console command.

The LightningCLI with ``fit``/``validate``/``test`` lands in a later release; until then the command
prints how to run the embedded demo.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-den``; prints help."""
    parser = argparse.ArgumentParser(
        prog="lightning-den",
        description=(
            "Dynamically Expandable Networks for PyTorch Lightning. The LightningCLI subcommands "
            "(fit, validate, test) are not released yet; run the embedded demo with "
            "`python -m lightning_den.demo` or use DENCallback from Python."
        ),
    )
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
