"""The built wheel installs on its own: `personabot --help` runs and every module it ships imports (offline)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_wheel_installs_and_every_module_imports(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1")
    # No build isolation: the build uses the setuptools already installed, so nothing is downloaded.
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                  str(tmp_path / "dist"), str(ROOT)], tmp_path, env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("personabot-*.whl")
    site = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                     tmp_path, env)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    names = zipfile.ZipFile(wheel).namelist()
    modules = sorted(name[:-3].replace("/", ".").removesuffix(".__init__") for name in names
                     if name.endswith(".py") and name.startswith("personabot/")
                     and not name.endswith("__main__.py"))  # __main__ runs the CLI: checked through --help
    if importlib.util.find_spec("triton") is None:  # the GPU kernels: imported only where Triton is installed
        assert "personabot.workers.engine.decode_kernels" in modules
        modules.remove("personabot.workers.engine.decode_kernels")
    assert {"personabot.core.settings", "personabot.workers.engine.scheduler", "personabot.bot.app"} <= set(modules)
    assert any(name.startswith("personabot/training/data/") for name in names), "package data is shipped"

    # Only the installed copy is importable: no checkout on sys.path, run from an empty directory.
    env["PYTHONPATH"] = str(site)
    help_ = _run([str(site / "bin" / "personabot"), "--help"], tmp_path, env)
    assert help_.returncode == 0 and "usage: personabot" in help_.stdout, help_.stdout + help_.stderr
    as_module = _run([sys.executable, "-m", "personabot", "--help"], tmp_path, env)
    assert as_module.returncode == 0 and "usage: personabot" in as_module.stdout, as_module.stderr
    check = ("import importlib\n"
             f"for name in {modules!r}:\n"
             "    module = importlib.import_module(name)\n"
             f"    assert module.__file__.startswith({str(site)!r}), (name, module.__file__)\n"
             f"print('imported', {len(modules)})\n")
    imported = _run([sys.executable, "-c", check], tmp_path, env)
    assert imported.returncode == 0 and f"imported {len(modules)}" in imported.stdout, \
        imported.stdout[-3000:] + imported.stderr[-3000:]
