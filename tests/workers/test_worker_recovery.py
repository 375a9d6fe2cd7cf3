"""A chat worker recovers by itself: trainer crashes, lost events, failed starts, unexpected errors."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from personabot.core import events
from personabot.core.gpu_share import loaded_holders
from personabot.core.schemas import ChatRequest, Message, SamplingParams
from personabot.core.store import Store
from personabot.core.streams import read_reply
from personabot.workers import chat_tasks
from personabot.workers.chat_service import ADAPTER_SYNC_S, ChatRuntime

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HOST = "recovery-box"


@pytest.fixture()
def stack(settings_env, redis_server, tmp_path: Path, tiny_model: Path, tiny_adapter: Path,
          tiny_adapter_2: Path) -> Iterator[dict[str, Any]]:
    """Settings (also in the environment, for chat_tasks) and a store with v1 active and v2 ready."""
    data = tmp_path / "data"
    for name, source in (("v1", tiny_adapter), ("v2", tiny_adapter_2)):
        shutil.copytree(source, data / "adapters" / name)
    db_path = tmp_path / "store.db"
    env = {"PERSONABOT_MODEL": str(tiny_model), "PERSONABOT_DEVICE": "cpu", "PERSONABOT_REDIS_URL": redis_server.url,
           "PERSONABOT_DATABASE_URL": f"sqlite:///{db_path}", "PERSONABOT_GPU_HOST": HOST,
           "PERSONABOT_MAX_BATCH": "2", "PERSONABOT_CONTEXT_TOKENS": "512"}
    os.environ.update(env)
    store = Store(env["PERSONABOT_DATABASE_URL"])
    versions = {name: store.add_adapter(name=name, path=name, base_model=str(tiny_model), data_hash="",
                                        eval_scores={}, eval_passed=True) for name in ("v1", "v2")}
    store.set_active(versions["v1"].id)
    import redis

    client = redis.Redis.from_url(redis_server.url)
    runtimes: list[ChatRuntime] = []
    try:
        yield {"settings": settings_env(), "store": store, "db_path": db_path, "client": client,
               "versions": versions, "runtimes": runtimes, "redis_url": redis_server.url}
    finally:
        for runtime in runtimes:
            runtime.close()
        for key in env:
            os.environ.pop(key, None)
        client.close()
        store.close()


def start_runtime(stack: dict[str, Any], name: str = "chat@recovery") -> ChatRuntime:
    runtime = ChatRuntime(stack["settings"], worker_name=name)
    stack["runtimes"].append(runtime)
    return runtime.start(timeout_s=60)


def request(text: str = "Hello!") -> ChatRequest:
    return ChatRequest(messages=[Message(role="user", content=text)],
                       sampling=SamplingParams(temperature=0, max_new_tokens=4))


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_worker_started_during_training_stays_unloaded_until_the_dead_trainers_lease_lapses(
        stack: dict[str, Any]) -> None:
    script = textwrap.dedent(f"""
        import time, redis
        from personabot.core.gpu_share import gpu_released
        client = redis.Redis.from_url({stack["redis_url"]!r})
        with gpu_released(client, release=True, eta_s=60, wait_s=0, host={HOST!r}, lease_ttl_s=2):
            print("training", flush=True)
            time.sleep(600)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert trainer.stdout is not None and trainer.stdout.readline().strip() == b"training"
        runtime = start_runtime(stack)
        assert runtime.engine.released  # never loaded the model next to the training run
        assert runtime.serve(request()).finish_reason == "updating"
        wait_until(lambda: stack["client"].hexists(f"personabot:gpu-holders:{HOST}", runtime.worker_name),
                   10, "the worker never reported itself")
        assert loaded_holders(stack["client"], HOST) == []
        os.kill(trainer.pid, signal.SIGKILL)  # no gpu.reclaim is ever published
        trainer.wait(timeout=10)
        wait_until(lambda: not runtime.engine.released and runtime.updating_eta_s is None, 30,
                   "the worker did not reclaim the GPU after the lease lapsed")
        result = runtime.serve(request())
        assert result.error == "" and result.adapter_version == "v1"
        assert loaded_holders(stack["client"], HOST) == [runtime.worker_name]
        assert "gpu.reclaim" not in [e.type for e in events.recent(stack["client"], 100)]
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()


def test_an_activation_whose_event_was_lost_is_caught_up(stack: dict[str, Any]) -> None:
    runtime = start_runtime(stack)
    assert runtime.engine.active == "v1"
    stack["store"].set_active(stack["versions"]["v2"].id)  # Redis failed: no adapter.promoted event
    wait_until(lambda: runtime.engine.active == "v2", ADAPTER_SYNC_S + 10, "the worker never caught up")
    assert runtime.serve(request()).adapter_version == "v2"
    assert any(e.type == "adapter.swapped" and e.data.get("version") == "v2"
               for e in events.recent(stack["client"], 100))


def test_a_failed_adapter_sync_after_reclaim_does_not_leave_the_worker_updating(stack: dict[str, Any]) -> None:
    runtime = start_runtime(stack)
    runtime.release_gpu(60)
    assert runtime.serve(request()).finish_reason == "updating"
    with sqlite3.connect(stack["db_path"]) as db:  # the store fails just as training ends
        db.execute("ALTER TABLE adapter_versions RENAME TO adapter_versions_away")
    runtime.reclaim_gpu()
    result = runtime.serve(request())
    assert result.finish_reason in ("stop", "length"), result
    with sqlite3.connect(stack["db_path"]) as db:
        db.execute("ALTER TABLE adapter_versions_away RENAME TO adapter_versions")


def test_an_unexpected_error_still_ends_the_reply(stack: dict[str, Any]) -> None:
    runtime = start_runtime(stack)
    with sqlite3.connect(stack["db_path"]) as db:
        db.execute("DROP TABLE persona")
    question = request()
    result = runtime.serve(question)
    assert result.finish_reason == "error" and "OperationalError" in result.error
    entries = list(read_reply(stack["client"], question.request_id, timeout_s=10))
    assert entries[-1].kind == "final" and entries[-1].result.error == result.error


def test_a_failed_start_frees_the_model_and_backs_off(stack: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_tasks, "_runtime", None)
    monkeypatch.setattr(chat_tasks, "_failures", 0)
    monkeypatch.setattr(chat_tasks, "_retry_at", 0.0)
    with sqlite3.connect(stack["db_path"]) as db:
        db.execute("DROP TABLE adapter_versions")

    def engines() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "engine-decode")

    before = engines()
    with pytest.raises(chat_tasks.RuntimeUnavailableError) as failed:
        chat_tasks.runtime()
    message = str(failed.value)
    assert "OperationalError" in message and "adapter_versions" in message and "next attempt in 5s" in message
    assert chat_tasks._runtime is None and engines() == before  # the loaded model was closed
    with pytest.raises(chat_tasks.RuntimeUnavailableError, match="adapter_versions.*next attempt in"):
        chat_tasks.runtime()  # within the backoff: answered at once, nothing loaded
    assert engines() == before
