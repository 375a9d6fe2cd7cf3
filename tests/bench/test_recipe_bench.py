"""The recipe bench's script trains and gates one recipe on the tiny model through the product's run path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_recipe_bench_tiny_run_reports_the_gate_and_the_cost(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    out = tmp_path / "recipe.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "recipe_bench.py"), "--tiny", "--out", str(out)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    tiny = data["recipes"]["tiny"]
    # The run went through request_training + run_training: built-in identity pairs, the FAQ, general rows.
    assert tiny["status"] in ("rejected", "succeeded"), tiny
    assert tiny["data"]["identity_default"] == 62 and tiny["data"]["faq"] == 8 and tiny["data"]["general"] == 20
    assert tiny["train"]["steps"] > 0 and tiny["train_s"] > 0 and tiny["gate_s"] > 0
    assert set(tiny["margins"]) == {"identity", "faq", "retention"}
    assert tiny["min_margin"] == min(tiny["margins"].values())
    assert 0 <= tiny["sets"]["held-out"] <= 1 and {"adversarial", "held-out-no-system"} <= set(tiny["sets"])
    # Tokens: persona rows plus 20 general rows, one epoch.
    assert tiny["tokens"]["total"] == tiny["tokens"]["per_epoch"] > tiny["tokens"]["persona_per_epoch"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| tiny | 1 | 0.001 | 8 | 1 | 1 | 20 |" in table and "held-out, no system" in table


def test_recipe_bench_refuses_an_unknown_recipe(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "recipe_bench.py"), "--model", str(tmp_path),
                             "--recipes", "seeds,nope"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "unknown recipes ['nope']" in result.stderr
