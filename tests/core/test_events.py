"""Typed events: JSON round trips, validation, the bus; Redis keys: one module, no literal elsewhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from personabot.core import events, keys

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "training", "workers", "bot", "ui", "api", "personabot", "bench")
SAMPLES: list[events.AnyEvent] = [
    events.RunProgress(run_id=3, step=5, max_steps=10, epoch=0.5, loss=1.25, eta_s=12.0, gpu_mem_gb=3.5),
    events.RunFinished(run_id=3, status="rejected", error="identity 0.2 < 0.8", adapter_id=None),
    events.AdapterPromoted(version="v2", id=2, path="/adapters/v2", base_model="Qwen/Qwen2.5-7B-Instruct",
                           action="rollback"),
    events.AdapterSwapped(worker="chat@a", version=None),
    events.AdapterRefused(worker="chat@a", version="v9", reason="base model differs", serving="v2"),
    events.WorkerOnline(worker="chat@a", kind="chat", model="m", adapter="v2", host="a", gpu_memory_used_mb=1024),
    events.GpuRelease(host="a", eta_s=90.0, run_id=3),
    events.GpuReclaim(host="a", run_id=3),
]


def test_every_event_type_has_one_class_and_survives_json() -> None:
    assert sorted(events.TYPES) == sorted(events.EventType.__args__)  # type: ignore[attr-defined]
    assert sorted(type(e).TYPE for e in SAMPLES) == sorted(events.TYPES)
    for event in SAMPLES:
        assert events.from_json(event.to_json()) == event


def test_data_that_does_not_fit_is_refused_with_its_type_and_field() -> None:
    with pytest.raises(events.EventDataError, match=r"gpu.release event: eta_s: Input should be a valid number"):
        events.decode(events.Event(type="gpu.release", data={"host": "a", "eta_s": "soon"}))
    with pytest.raises(events.EventDataError, match="adapter.promoted event: version: Field required"):
        events.decode(events.Event(type="adapter.promoted", data={"id": 1, "path": "p"}))
    older = events.Event(type="gpu.reclaim", data={"host": "a", "run_id": 1, "added_later": True})
    assert events.decode(older) == events.GpuReclaim(host="a", run_id=1), "unknown keys are ignored"


def test_published_events_come_back_typed(redis_client) -> None:  # type: ignore[no-untyped-def]
    subscription = events.subscribe(redis_client, timeout=0.2)
    assert next(subscription) is None  # subscribed
    for event in SAMPLES:
        events.publish(redis_client, event)
    heard = []
    while len(heard) < len(SAMPLES):
        envelope = next(subscription)
        if envelope is not None:
            heard.append(events.decode(envelope))
    subscription.close()
    assert heard == SAMPLES
    assert [events.decode(e) for e in reversed(events.recent(redis_client))] == SAMPLES


def test_redis_keys_are_distinct_prefixes_in_one_namespace() -> None:
    assert all(key.startswith(keys.NAMESPACE) for key in keys.ALL)
    for key in keys.ALL:
        assert not [other for other in keys.ALL if other != key and other.startswith(key)], key


@pytest.mark.parametrize("folder", PACKAGES)
def test_no_key_or_event_name_is_spelt_outside_its_module(folder: str) -> None:
    key_literal = re.compile(r"^personabot:[a-z]")
    names = set(events.TYPES)
    problems = []
    for path in sorted((REPO / folder).rglob("*.py")):
        if path in (REPO / "core" / "keys.py", REPO / "core" / "events.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if key_literal.match(node.value) or node.value in names:
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not problems, "use personabot.core.keys / personabot.core.events:\n" + "\n".join(problems)
