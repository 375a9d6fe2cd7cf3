"""A real chat worker (Celery, threads pool, tiny model) against a real Redis and SQLite store."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from personabot.core import events
from personabot.core.gpu_share import gpu_released, loaded_holders
from personabot.core.keys import CHAT_WORKERS as STATS_KEY
from personabot.core.schemas import ChatRequest, ChatResult, Message, SamplingParams
from personabot.core.store import Store
from personabot.core.streams import read_reply, stream_key
from personabot.redis_server import RedisServer
from personabot.workers.app import make_celery
from personabot.workers.client import cancel_chat, submit_chat
from tests.workers.conftest import ChatWorker

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant."
LONG = ["Hello!", "Count to one thousand."]
GPU_HOST = "pytest-gpu"


@pytest.fixture(scope="module")
def setup(tiny_model: Path, tiny_adapter: Path, tiny_adapter_2: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("chat-worker")
    server = RedisServer(root / "redis", persist=False).start()
    db_url = f"sqlite:///{root / 'store.db'}"
    store = Store(db_url)
    adapter_store = root / "data" / "adapters"
    shutil.copytree(tiny_adapter, adapter_store / "v1")
    shutil.copytree(tiny_adapter_2, adapter_store / "v2")
    # v1 as the registry stores paths now (relative), v2 as older rows did (absolute, inside the store).
    v1 = store.add_adapter(name="v1", path="v1", base_model=str(tiny_model), data_hash="",
                           eval_scores={}, eval_passed=True)
    v2 = store.add_adapter(name="v2", path=str(adapter_store / "v2"), base_model=str(tiny_model), data_hash="",
                           eval_scores={}, eval_passed=True)
    store.set_active(v1.id)
    worker = ChatWorker(server.url, db_url, tiny_model, root / "data", name="chat1", concurrency=4,
                        env={"PERSONABOT_CONTEXT_TOKENS": "4096", "PERSONABOT_GPU_HOST": GPU_HOST}).start()
    client = redis.Redis.from_url(server.url)
    try:
        yield {"server": server, "store": store, "worker": worker, "client": client, "v1": v1, "v2": v2,
               "app": make_celery(server.url), "model": tiny_model,
               "adapters": {"v1": tiny_adapter, "v2": tiny_adapter_2}, "adapter_store": adapter_store}
    finally:
        worker.stop()
        client.close()
        store.close()
        server.stop()


def ask(setup: dict[str, Any], text: str, **kw: Any) -> tuple[list[Any], ChatResult]:
    """Send one chat request through Celery and read its whole reply stream."""
    sampling = SamplingParams(**{"temperature": 0.0, "repetition_penalty": 1.0, **kw.pop("sampling", {})})
    request = ChatRequest(messages=[Message(role="user", content=text)], sampling=sampling, **kw)
    submit_chat(request, app=setup["app"])
    entries = list(read_reply(setup["client"], request.request_id, timeout_s=60))
    assert entries[-1].kind == "final"
    return entries, entries[-1].result


def reference_text(setup: dict[str, Any], text: str, adapter: str | None, max_new: int) -> str:
    """What HF generate (peft, unmerged) answers greedily for the same conversation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, setup["adapters"][adapter])
    ids = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def wait_event(client: redis.Redis, type_: str, worker: str, since: float, timeout_s: float = 30) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in events.recent(client, 200):
            if event.type == type_ and event.at >= since and event.data.get("worker") == worker:
                return event.data
        time.sleep(0.1)
    raise TimeoutError(f"no {type_} event from {worker}")


def test_stream_is_ordered_complete_and_matches_hf(setup: dict[str, Any]) -> None:
    entries, result = ask(setup, "What is your name?", sampling={"max_new_tokens": 40})
    kinds = [e.kind for e in entries]
    assert kinds[0] == "reset" and kinds[-1] == "final" and set(kinds[1:-1]) == {"token"}
    assert "".join(e.text for e in entries if e.kind == "token") == result.text
    assert result.text == reference_text(setup, "What is your name?", "v1", 40)
    assert result.adapter_version == "v1" and result.finish_reason in ("stop", "length")
    assert result.prompt_tokens > 10 and 0 < result.completion_tokens <= 40
    assert result.total_s >= result.first_token_s > 0 and result.worker == setup["worker"].hostname
    # A reader that reconnects after the second entry gets exactly the rest.
    again = list(read_reply(setup["client"], result.request_id, last_id=entries[1].id, timeout_s=5))
    assert [e.id for e in again] == [e.id for e in entries[2:]]
    assert setup["client"].ttl(stream_key(result.request_id)) > 0


def test_a_repeated_conversation_reuses_kv_and_the_worker_reports_the_pool(setup: dict[str, Any]) -> None:
    import json

    from personabot.ui.status_tab import _gpu_text

    worker = setup["worker"]
    ready_log = worker.log_path.read_text(errors="replace")
    assert "KV reuse keeps up to 4 finished chats" in ready_log
    assert "prompts prefilled 512 tokens per pass between decode steps" in ready_log  # PERSONABOT_PREFILL_CHUNK
    online = next(e.data for e in events.recent(setup["client"], 1000)
                  if e.type == "worker.online" and e.data.get("worker") == worker.hostname)
    assert online["prefix_chats"] == 4 and online["kv_rows"] == 4
    assert _gpu_text({**online, "gpu_memory_used_mb": 1024, "gpu_memory_total_mb": 2048}).endswith(
        "KV reuse keeps 4 chats")
    def published(finished: int | None = None) -> dict[str, Any]:
        """The worker's stats once they count `finished` replies (None: once they stop changing);
        a reply's final entry is written just before its stats."""
        last: dict[str, Any] = {}
        for _ in range(100):
            stats = json.loads(setup["client"].hget(STATS_KEY, worker.hostname) or "{}")
            if (finished is None and stats == last) or (finished is not None and stats.get("finished") == finished):
                return stats
            last = stats
            time.sleep(0.1)
        raise TimeoutError(f"the worker's stats never counted {finished} replies: {last}")

    settled = published()
    _, first = ask(setup, "Tell me about reuse.", adapter="base", sampling={"max_new_tokens": 8})
    before = published(settled.get("finished", 0) + 1)
    _, again = ask(setup, "Tell me about reuse.", adapter="base", sampling={"max_new_tokens": 8})
    stats = published(before["finished"] + 1)
    assert again.text == first.text
    assert stats["prefix_hit_tokens"] - before["prefix_hit_tokens"] == again.prompt_tokens - 1
    assert stats["prefill_tokens"] - before["prefill_tokens"] == 1
    assert stats["parked_rows"] >= 1


def test_concurrent_requests_share_decode_steps(setup: dict[str, Any]) -> None:
    before = setup["client"].hget(STATS_KEY, setup["worker"].hostname)
    results: list[ChatResult] = []
    threads = [threading.Thread(target=lambda t=t: results.append(
        ask(setup, t, adapter="base", sampling={"max_new_tokens": 150, "min_new_tokens": 150})[1]))
        for t in LONG * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.finish_reason for r in results] == ["length"] * 4
    import json

    stats = json.loads(setup["client"].hget(STATS_KEY, setup["worker"].hostname))
    previous = json.loads(before) if before else {"decode_steps": 0, "decode_rows": 0}
    steps = stats["decode_steps"] - previous["decode_steps"]
    rows = stats["decode_rows"] - previous["decode_rows"]
    assert stats["max_batch_seen"] >= 2
    assert rows >= 4 * 149 and steps < rows * 0.8, (steps, rows)


def test_empty_and_oversized_prompts_get_clear_errors(setup: dict[str, Any]) -> None:
    _, empty = ask(setup, "   ")
    assert empty.finish_reason == "error" and "non-empty user message" in empty.error
    _, huge = ask(setup, "hello " * 5000)
    assert huge.finish_reason == "error" and "PERSONABOT_CONTEXT_TOKENS" in huge.error
    _, unknown = ask(setup, "hi", adapter="no-such-version")
    assert unknown.finish_reason == "error" and "does not exist" in unknown.error


def test_cancel_stops_the_reply_and_frees_the_slot(setup: dict[str, Any]) -> None:
    request = ChatRequest(messages=[Message(role="user", content=LONG[0])], adapter="base",
                          sampling=SamplingParams(temperature=0, max_new_tokens=3500, min_new_tokens=3500))
    submit_chat(request, app=setup["app"])
    entries = []
    for entry in read_reply(setup["client"], request.request_id, timeout_s=60):
        entries.append(entry)
        if entry.kind == "token":
            cancel_chat(setup["client"], request.request_id)
    result = entries[-1].result
    assert result.finish_reason == "cancelled" and result.completion_tokens < 3500
    import json

    assert json.loads(setup["client"].hget(STATS_KEY, setup["worker"].hostname))["running"] == 0


def test_base_active_and_named_adapters(setup: dict[str, Any]) -> None:
    _, base = ask(setup, "Write Python code.", adapter="base", sampling={"max_new_tokens": 30})
    _, active = ask(setup, "Write Python code.", sampling={"max_new_tokens": 30})
    _, named = ask(setup, "Write Python code.", adapter="v2", sampling={"max_new_tokens": 30})
    assert (base.adapter_version, active.adapter_version, named.adapter_version) == (None, "v1", "v2")
    assert base.text == reference_text(setup, "Write Python code.", None, 30)
    assert named.text == reference_text(setup, "Write Python code.", "v2", 30)
    assert len({base.text, active.text, named.text}) == 3


def test_stop_strings_end_the_reply(setup: dict[str, Any]) -> None:
    _, full = ask(setup, "Write Python code.", adapter="base", sampling={"max_new_tokens": 30})
    stop = full.text[12:15]
    entries, stopped = ask(setup, "Write Python code.", adapter="base",
                           sampling={"max_new_tokens": 30, "stop": ["never-there", stop]})
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:full.text.find(stop)]
    assert "".join(e.text for e in entries if e.kind == "token") == stopped.text


def test_duplicate_delivery_gives_one_reply(setup: dict[str, Any]) -> None:
    request = ChatRequest(messages=[Message(role="user", content=LONG[1])], adapter="base",
                          sampling=SamplingParams(temperature=0, max_new_tokens=200, min_new_tokens=200))
    payload = [request.model_dump(mode="json")]
    for _ in range(2):
        setup["app"].send_task("personabot.chat", args=payload, task_id=request.request_id)
    final = next(e for e in read_reply(setup["client"], request.request_id, timeout_s=60) if e.kind == "final")
    setup["app"].send_task("personabot.chat", args=payload, task_id=request.request_id)
    time.sleep(3)
    raw = setup["client"].xrange(stream_key(request.request_id))
    kinds = [fields[b"k"] for _, fields in raw]
    assert kinds.count(b"final") == 1 and kinds.count(b"reset") == 1
    assert final.result.completion_tokens == 200


def test_swap_under_concurrent_load(setup: dict[str, Any]) -> None:
    client, store, worker = setup["client"], setup["store"], setup["worker"]
    prompts = ["What is your name?", "Write Python code.", "Tell me a long story."]
    expected = {(p, a): reference_text(setup, p, a, 30) for p in prompts for a in ("v1", "v2")}
    results: list[tuple[float, ChatResult]] = []

    def one(text: str) -> None:
        sent = time.time()
        results.append((sent, ask(setup, text, sampling={"max_new_tokens": 30})[1]))

    threads = [threading.Thread(target=one, args=(prompts[i % 3],)) for i in range(9)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    since = time.time()
    store.set_active(setup["v2"].id)
    events.publish(client, "adapter.promoted", version="v2", id=setup["v2"].id, path=str(setup["adapters"]["v2"]),
                   base_model=str(setup["model"]))
    swapped = wait_event(client, "adapter.swapped", worker.hostname, since)
    swapped_at = time.time()
    assert swapped["version"] == "v2" and swapped["stall_ms"] < 1000
    late = [threading.Thread(target=one, args=(prompts[i % 3],)) for i in range(6)]
    for thread in late:
        thread.start()
    for thread in threads + late:
        thread.join()
    assert len(results) == 15
    for sent, result in results:
        assert result.finish_reason in ("stop", "length") and result.adapter_version in ("v1", "v2")
        prompt = next(p for p in prompts if expected[(p, result.adapter_version)] == result.text)
        assert prompt  # the whole reply came from one adapter
        if sent > swapped_at:
            assert result.adapter_version == "v2"


def test_broken_adapter_is_refused_and_the_old_one_keeps_serving(setup: dict[str, Any]) -> None:
    client, worker = setup["client"], setup["worker"]
    broken = setup["adapter_store"] / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    serving = ask(setup, "What is your name?")[1].adapter_version
    since = time.time()
    events.publish(client, "adapter.promoted", version="broken", id=999, path=str(broken),
                   base_model=str(setup["model"]))
    refused = wait_event(client, "adapter.refused", worker.hostname, since)
    assert refused["version"] == "broken" and "not valid JSON" in refused["reason"]
    assert ask(setup, "What is your name?")[1].adapter_version == serving


def test_adapters_outside_the_adapter_store_are_refused(setup: dict[str, Any]) -> None:
    client, worker, store = setup["client"], setup["worker"], setup["store"]
    serving = ask(setup, "What is your name?")[1].adapter_version
    since = time.time()
    # A valid adapter, but the event points outside the store: refused, never read.
    events.publish(client, "adapter.promoted", version="outsider", id=998, path=str(setup["adapters"]["v1"]),
                   base_model=str(setup["model"]))
    refused = wait_event(client, "adapter.refused", worker.hostname, since)
    assert refused["version"] == "outsider" and "outside the adapter store" in refused["reason"]
    assert ask(setup, "What is your name?")[1].adapter_version == serving
    # The same for a database row with an absolute path elsewhere.
    store.add_adapter(name="elsewhere", path=str(setup["adapters"]["v2"]), base_model=str(setup["model"]),
                      data_hash="", eval_scores={}, eval_passed=True)
    _, named = ask(setup, "hi", adapter="elsewhere")
    assert named.finish_reason == "error" and "outside the adapter store" in named.error


def test_a_bad_event_does_not_stop_the_swap_listener(setup: dict[str, Any]) -> None:
    client, worker = setup["client"], setup["worker"]
    events.publish(client, "gpu.release", eta_s="soon", host=GPU_HOST)  # cannot be handled
    since = time.time()
    target = "v2" if ask(setup, "Hello!", sampling={"max_new_tokens": 2})[1].adapter_version == "v1" else "v1"
    version = setup[target]
    # Only the listener answers this event (the store is not changed, so the periodic sync does not).
    events.publish(client, "adapter.promoted", version=target, id=version.id, path=target,
                   base_model=str(setup["model"]))
    assert wait_event(client, "adapter.swapped", worker.hostname, since, timeout_s=8)["version"] == target


def test_gpu_release_answers_updating_then_reclaim_serves_again(setup: dict[str, Any]) -> None:
    client = setup["client"]
    # Training on another host leaves this worker alone.
    with gpu_released(client, release=True, eta_s=120, wait_s=0, host="another-box"):
        assert ask(setup, "Hello!", sampling={"max_new_tokens": 5})[1].error == ""
    with gpu_released(client, release=True, eta_s=120, wait_s=60, host=GPU_HOST):
        # The trainer went on only once this worker acknowledged the release.
        assert loaded_holders(client, GPU_HOST) == []
        result = ask(setup, "Hello!", sampling={"max_new_tokens": 5})[1]
        assert result.text == "I'm being updated, back in about 2 minutes."
        assert result.finish_reason == "updating" and result.error == "" and result.adapter_version is None
        # A promotion while the GPU is released is taken up on reclaim, not refused.
        since = time.time()
        store, v1 = setup["store"], setup["v1"]
        store.set_active(v1.id)
        events.publish(client, "adapter.promoted", version="v1", id=v1.id, path="v1",
                       base_model=str(setup["model"]))
    deadline = time.monotonic() + 60
    while True:
        result = ask(setup, "Hello!", sampling={"max_new_tokens": 5})[1]
        if result.finish_reason != "updating" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result.error == "" and result.adapter_version == "v1"
    assert not [e for e in events.recent(client, 100) if e.type == "adapter.refused" and e.at >= since]
    assert loaded_holders(client, GPU_HOST) == [setup["worker"].hostname]


def test_cli_chat_streams_through_the_queue(setup: dict[str, Any], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONABOT_")}
    env.update(PERSONABOT_REDIS_URL=setup["server"].url, PERSONABOT_DATA_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "personabot.cli", "chat", "Hello!", "--adapter", "base",
                             "--temperature", "0", "--max-new-tokens", "8", "--timeout", "60"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "adapter base; 8 tokens" in result.stderr and "redelivered" not in result.stdout


def test_cli_chat_sends_its_system_prompt_and_sampling_options(setup: dict[str, Any], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    system = "You are Zed, a pirate who answers in riddles."
    sampling = {"temperature": 0.9, "top_p": 0.8, "repetition_penalty": 1.3, "seed": 5, "max_new_tokens": 12}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONABOT_")}
    env.update(PERSONABOT_REDIS_URL=setup["server"].url, PERSONABOT_DATA_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "personabot.cli", "chat", "Hello!", "--adapter", "base",
                             "--system", system, "--temperature", "0.9", "--top-p", "0.8",
                             "--repetition-penalty", "1.3", "--seed", "5", "--max-new-tokens", "12",
                             "--timeout", "60"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = ask(setup, "Hello!", adapter="base", system_prompt=system, sampling=sampling)[1].text
    persona = ask(setup, "Hello!", adapter="base", sampling=sampling)[1].text
    assert expected != persona, "setup: the system prompt changes the seeded reply"
    assert result.stdout.rstrip("\n") == expected
