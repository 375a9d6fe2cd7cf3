"""The traffic benchmark's script runs on the tiny model and reports what the chat worker really saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_traffic_bench_tiny_run_matches_prompts_on_every_path(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "traffic_bench.py"), "--tiny", "--out", str(out),
                             "--chats", "3", "--turns", "2", "--max-batch", "4", "--rates-per-chat", "2",
                             "--reuse", "on,off"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "traffic_bench.json").read_text())
    runs = {key: value for key, value in data.items() if isinstance(value, dict) and "tok_s" in value}
    paths = ("bare", "celery", "api", "bare-no-reuse", "celery-no-reuse", "api-no-reuse")
    assert set(runs) == {f"{path}/3/{label}" for path in paths
                         for label in ("closed/fresh", "closed/warm", "poisson_6_per_s/warm")}
    for key, run in runs.items():
        assert run["failed"] == 0 and run["turns"] == 6 and run["tok_s"] > 0, (key, run)
    # The worker re-tokenizes the text the bench sends: the prompt lengths must agree with the ids.
    for label in ("closed/fresh", "closed/warm"):
        for path in ("celery", "api"):
            assert runs[f"{path}/3/{label}"]["prompt_tokens_mean"] == pytest.approx(
                runs[f"bare/3/{label}"]["prompt_tokens_mean"], rel=0.05), (path, label)
    # Engine counters per reply: follow-ups take the chat's earlier turns from the KV reuse pool.
    for path in ("bare", "celery", "api"):
        for label in ("closed/fresh", "closed/warm", "poisson_6_per_s/warm"):
            reuse, cold = runs[f"{path}/3/{label}"], runs[f"{path}-no-reuse/3/{label}"]
            assert reuse["prefix_hit_tokens_per_reply"] > 0 and cold["prefix_hit_tokens_per_reply"] == 0
            assert reuse["prefill_tokens_per_reply"] < cold["prefill_tokens_per_reply"]


def test_a_crashed_chat_counts_its_lost_turns_as_failed() -> None:
    """A user thread that dies (a bench bug, a backend error) must not shrink the sample silently."""
    sys.path.insert(0, str(REPO))
    from bench.traffic_bench import TrafficSpec, run_traffic
    from bench.word_tokenizer import WordVocab

    vocab = WordVocab(2000)

    def backend(messages, reply_len, request_id):  # type: ignore[no-untyped-def]
        if request_id.endswith("-1-1"):
            raise IndexError("boom")
        return vocab.word_ids(__import__("random").Random(0), reply_len), 0.01, [0.001], True, 10

    summary = run_traffic(TrafficSpec(chats=3, turns=3, think_s=0, reply_min=2, reply_max=4), backend, vocab)
    assert summary["turns"] == 7 and summary["lost_turns"] == 2 and summary["failed"] == 2
    assert summary["errors"] == ["chat 1: IndexError: boom"]
