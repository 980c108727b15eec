"""Packaging as a user meets it: version ranges (not pins) in pyproject.toml, exact versions in constraints.txt
that fall inside those ranges, and a report that draws its plots without touching matplotlib's global backend."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tomllib
import zlib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _direct_requirements() -> list[Requirement]:
    """The runtime dependencies and every optional-dependency group (the test extras included)."""
    project = _project()
    lines = list(project["dependencies"])
    for group in project.get("optional-dependencies", {}).values():
        lines += group
    return [Requirement(line) for line in lines]


def _constraints() -> dict[str, Version]:
    """``constraints.txt`` as ``{canonical name: pinned version}``; every line must be an exact ``==`` pin."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate((ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"constraints.txt:{number}: {raw!r}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"constraints.txt:{number}: {name} pinned twice"
        pins[name] = Version(specifiers[0].version)
    return pins


def test_pyproject_dependencies_are_ranges_not_pins():
    for requirement in _direct_requirements():
        operators = {specifier.operator for specifier in requirement.specifier}
        assert not operators & {"==", "==="}, f"{requirement} is pinned; pins belong in constraints.txt"
        assert operators & {">=", ">", "~="}, f"{requirement} has no lower bound"


def test_torch_and_lightning_accept_a_range():
    requirements = {canonicalize_name(r.name): r.specifier for r in _direct_requirements()}
    assert requirements["torch"].contains("2.13.0") and requirements["torch"].contains("2.99")
    assert not requirements["torch"].contains("3.0")
    # The tests import lightning.pytorch.callbacks.WeightAveraging, which is new in lightning 2.6.
    assert requirements["lightning"].contains("2.6.0")
    assert not requirements["lightning"].contains("2.5.6")


def test_constraints_pin_every_direct_dependency_inside_its_pyproject_range():
    pins = _constraints()
    assert "lightning-den" not in pins, "constraints.txt must not pin the project itself"
    for requirement in _direct_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is a direct dependency but has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )


_PLOT_IN_A_FRESH_PROCESS = """
import json, sys
import matplotlib

matplotlib.use("svg")  # a backend that is not Agg, as a notebook's inline backend would be
before = matplotlib.get_backend()
pyplot_before = "matplotlib.pyplot" in sys.modules

from lightning_den.report import plot_report

summary = {
    "accuracy": [[0.91], [0.85, 0.93], [0.80, 0.88, 0.95]],
    "widths_by_birth": [[[10], [8]], [[10, 3], [8, 2]], [[10, 3, 4], [8, 2, 1]]],
    "parameters_after_task": [1000, 1300, 1700],
    "capacity": {"single_task_parameters": 3000},
}
paths = plot_report(summary, sys.argv[1])
print(json.dumps({
    "before": before,
    "after": matplotlib.get_backend(),
    "rc_backend": matplotlib.rcParams["backend"],
    "pyplot_imported": not pyplot_before and "matplotlib.pyplot" in sys.modules,
    "paths": [str(path) for path in paths],
}))
"""


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a well-formed PNG: signature, a CRC-checked IHDR first and IEND last."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, f"{path.name}: no IHDR chunk first"
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(kind + body) == crc, f"{path.name}: IHDR checksum wrong"
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82", f"{path.name}: truncated (no IEND chunk at the end)"
    return struct.unpack(">II", body[:8])


def test_plot_report_leaves_the_matplotlib_backend_alone(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _PLOT_IN_A_FRESH_PROCESS, str(tmp_path / "report")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])

    assert outcome["before"] == "svg"
    assert outcome["after"] == "svg", "plot_report switched the process-wide matplotlib backend"
    assert outcome["rc_backend"] == "svg"
    assert not outcome["pyplot_imported"], "plot_report imported pyplot (global figure state)"

    names = [Path(path).name for path in outcome["paths"]]
    assert names == ["accuracy_matrix.png", "widths.png", "parameters.png"]
    for name in names:
        width, height = _png_size(tmp_path / "report" / name)
        assert width > 50 and height > 50, (name, width, height)


def test_plot_report_writes_only_the_plots_its_summary_has(tmp_path):
    from lightning_den.report import plot_report

    paths = plot_report({"accuracy": [[0.5], [0.25, 0.75]]}, tmp_path)
    assert [path.name for path in paths] == ["accuracy_matrix.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["accuracy_matrix.png"]
    _png_size(paths[0])


def test_every_public_name_resolves_and_dir_lists_it():
    import lightning_den
    import lightning_den.data

    for package in (lightning_den, lightning_den.data):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="has no attribute 'cross_boundary'"):
        lightning_den.cross_boundary  # noqa: B018 - an internal, no longer exported
