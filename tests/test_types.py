"""The installed packages are mypy-clean (settings in pyproject.toml's [tool.mypy])."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed_layout(into: Path) -> Path:
    """The `personabot` namespace as the wheel lays it out (package-dir: personabot.core = core/, ...),
    built from links to the checkout, so that mypy resolves `personabot.core...` imports as installed."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-dir"]
    top = into / "personabot"
    top.mkdir(parents=True)
    for source in (ROOT / mapping["personabot"]).glob("*.py"):
        (top / source.name).symlink_to(source)
    for package, folder in mapping.items():
        if package != "personabot":
            (into / package.replace(".", "/")).symlink_to(ROOT / folder, target_is_directory=True)
    return into


def test_mypy_passes(tmp_path: Path) -> None:
    tree = installed_layout(tmp_path / "tree")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
         str(tmp_path / "cache"), "--no-error-summary", "-p", "personabot"],
        cwd=tree, capture_output=True, text=True, timeout=600)
    if "No module named mypy" in result.stderr:
        raise AssertionError("mypy is missing: pip install -e '.[dev]' (pyproject pins it)")
    assert result.returncode == 0, ("mypy errors (personabot/core/x.py is core/x.py, ...):\n"
                                    + result.stdout[-6000:] + result.stderr[-2000:])
