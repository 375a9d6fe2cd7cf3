"""Several chat worker processes on one Redis: both serve, both swap; kill -9 mid-reply is answered once."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from personabot.core import events
from personabot.core.schemas import ChatRequest, ChatResult, Message, SamplingParams
from personabot.core.store import Store
from personabot.core.streams import read_reply, stream_key
from personabot.workers.app import make_celery
from personabot.workers.client import submit_chat

pytestmark = pytest.mark.slow


@pytest.fixture()
def stack(redis_server, tmp_path: Path, tiny_model: Path, tiny_adapter: Path, tiny_adapter_2: Path):  # type: ignore[no-untyped-def]
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(db_url)
    shutil.copytree(tiny_adapter, tmp_path / "data" / "adapters" / "v1")
    shutil.copytree(tiny_adapter_2, tmp_path / "data" / "adapters" / "v2")
    v1 = store.add_adapter(name="v1", path="v1", base_model=str(tiny_model), data_hash="",
                           eval_scores={}, eval_passed=True)
    v2 = store.add_adapter(name="v2", path="v2", base_model=str(tiny_model), data_hash="",
                           eval_scores={}, eval_passed=True)
    store.set_active(v1.id)
    client = redis.Redis.from_url(redis_server.url)
    yield {"url": redis_server.url, "db": db_url, "store": store, "client": client, "v2": v2,
           "app": make_celery(redis_server.url), "model": tiny_model, "data": tmp_path / "data",
           "v2_path": tiny_adapter_2}
    client.close()
    store.close()


def ask(stack: dict[str, Any], text: str, **sampling: Any) -> ChatResult:
    request = ChatRequest(messages=[Message(role="user", content=text)], adapter="base",
                          sampling=SamplingParams(temperature=0, **sampling))
    submit_chat(request, app=stack["app"])
    return next(e for e in read_reply(stack["client"], request.request_id, timeout_s=60) if e.kind == "final").result


def test_two_workers_both_serve_and_both_swap(stack: dict[str, Any], chat_worker) -> None:  # type: ignore[no-untyped-def]
    workers = [chat_worker(stack["url"], stack["db"], stack["model"], stack["data"], name=f"w{i}", concurrency=2)
               for i in (1, 2)]
    results: list[ChatResult] = []
    threads = [threading.Thread(
        target=lambda: results.append(ask(stack, "Hello!", max_new_tokens=120, min_new_tokens=120)))
        for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {r.worker for r in results} == {w.hostname for w in workers}
    assert all(r.finish_reason == "length" for r in results)
    since = time.time()
    stack["store"].set_active(stack["v2"].id)
    events.publish(stack["client"], "adapter.promoted", version="v2", id=stack["v2"].id,
                   path=str(stack["v2_path"]), base_model=str(stack["model"]))
    deadline = time.monotonic() + 30
    swapped: set[str] = set()
    while swapped != {w.hostname for w in workers} and time.monotonic() < deadline:
        swapped = {e.data["worker"] for e in events.recent(stack["client"], 100)
                   if e.type == "adapter.swapped" and e.at >= since and e.data.get("version") == "v2"}
        time.sleep(0.1)
    assert swapped == {w.hostname for w in workers}
    after: list[ChatResult] = []

    def active_request() -> None:
        request = ChatRequest(messages=[Message(role="user", content="What is your name?")],
                              sampling=SamplingParams(temperature=0, max_new_tokens=20))
        submit_chat(request, app=stack["app"])
        after.append(next(e for e in read_reply(stack["client"], request.request_id, timeout_s=60)
                      if e.kind == "final").result)

    threads = [threading.Thread(target=active_request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {r.adapter_version for r in after} == {"v2"}
    assert len({r.text for r in after}) == 1


def test_kill_9_mid_reply_is_delivered_exactly_once(stack: dict[str, Any], chat_worker) -> None:  # type: ignore[no-untyped-def]
    env = {"PERSONABOT_CHAT_VISIBILITY_TIMEOUT": "3", "PERSONABOT_CONTEXT_TOKENS": "4096"}
    first = chat_worker(stack["url"], stack["db"], stack["model"], stack["data"], name="doomed", env=env)
    request = ChatRequest(messages=[Message(role="user", content="Hello!")], adapter="base",
                          sampling=SamplingParams(temperature=0, max_new_tokens=3000, min_new_tokens=3000))
    submit_chat(request, app=stack["app"])
    entries = []
    for entry in read_reply(stack["client"], request.request_id, timeout_s=60):
        entries.append(entry)
        if sum(1 for e in entries if e.kind == "token") >= 3:
            break
    first.kill()
    assert not any(e.kind == "final" for e in entries)
    time.sleep(4)  # past the visibility timeout: the unacked task is handed to the next worker
    second = chat_worker(stack["url"], stack["db"], stack["model"], stack["data"], name="rescuer", env=env)
    rest = list(read_reply(stack["client"], request.request_id, last_id=entries[-1].id, timeout_s=90))
    kinds = [e.kind for e in rest]
    assert kinds.count("reset") == 1 and kinds[-1] == "final"
    after_reset = rest[kinds.index("reset") + 1:]
    result = after_reset[-1].result
    assert "".join(e.text for e in after_reset if e.kind == "token") == result.text
    assert result.worker == second.hostname and result.finish_reason == "length"
    assert result.completion_tokens == 3000
    time.sleep(2)
    raw = stack["client"].xrange(stream_key(request.request_id))
    assert [fields[b"k"] for _, fields in raw].count(b"final") == 1
