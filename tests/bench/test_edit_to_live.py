"""The edit-to-live benchmark runs end to end on the tiny model and reports every stage in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The stages every concurrent run passes, in this order (the chat worker's name is the bench's).
CHAIN = ["start", "picked up", "building", "starting", "loading model", "preparing", "training", "saving",
         "evaluating", "registering", "promoting", "adapter.promoted event", "swapped traffic@bench"]


@pytest.mark.slow
def test_tiny_run_times_every_stage_and_serves_the_new_version(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "edit_to_live.py"), "--tiny", "--chats", "2",
                             "--warmup-s", "2", "--window-s", "3", "--work", str(tmp_path / "work"), "--out", str(out)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "edit_to_live.json").read_text())
    assert data["run"]["status"] == "succeeded" and data["version"], data["run"]
    at = {row["stage"]: row["at_s"] for row in data["stages"]}
    assert [name for name in at if name in CHAIN] == CHAIN, list(at)
    first = at["first reply on the new version (traffic@bench)"]
    assert first >= at["adapter.promoted event"] and data["edit_to_live_s"] == first
    assert data["failed_replies"] == 0 and not data["load_errors"]
    assert data["windows"]["before"]["ok"] > 0 and data["windows"]["after"]["tok_s"] > 0
