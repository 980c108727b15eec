"""Copy the measured tables from ``benchmarks/results`` into the README: a configuration's comparison
(``<name>/comparison.md``) or a benchmark's table (``<name>.md``, e.g. ``perf`` from ``make bench``).

The README holds each table between ``<!-- measured: <name> -->`` and ``<!-- end measured -->``, so its
figures are always the ones in the committed results files. After ``benchmarks/compare.py`` has
re-measured a configuration, or ``benchmarks/perf.py`` the performance:

    .venv/bin/python benchmarks/readme_tables.py          # rewrite the README's tables
    .venv/bin/python benchmarks/readme_tables.py --check  # exit 1 if the README is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- measured: (?P<name>[\w-]+) -->\n)(?P<table>.*?)(<!-- end measured -->)", re.DOTALL)


def render(readme: str, results: Path) -> str:
    """``readme`` with every measured block replaced by ``results/<name>/comparison.md`` or ``results/<name>.md``."""

    def table(match: re.Match[str]) -> str:
        comparison = results / match["name"] / "comparison.md"
        measured = (comparison if comparison.exists() else results / f"{match['name']}.md").read_text()
        return f"{match.group(1)}{measured.strip()}\n{match.group(4)}"

    return BLOCK.sub(table, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the README is up to date")
    args = parser.parse_args(argv)
    path = ROOT / "README.md"
    current = path.read_text()
    rendered = render(current, ROOT / "benchmarks" / "results")
    if args.check:
        if rendered != current:
            print("README.md's measured tables differ from benchmarks/results: run benchmarks/readme_tables.py")
            return 1
        return 0
    path.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
