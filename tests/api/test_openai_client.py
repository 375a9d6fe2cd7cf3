"""The official openai client against the running API process, a real Redis and a real chat worker."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from personabot.core import events
from personabot.core.keys import CHAT_WORKERS as STATS_KEY
from personabot.core.streams import read_reply, stream_key
from personabot.training.registry import AdapterRegistry

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Who are you?"}]


def greedy(client: Any, model: str = "persona", max_tokens: int = 24, **kw: Any) -> Any:
    return client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=max_tokens, **kw)


def test_models_list_the_persona_every_version_and_the_base(openai_client: Any) -> None:
    ids = [m.id for m in openai_client.models.list().data]
    assert ids[0] == "persona" and ids[-1] == "base"
    assert {"persona:v1", "persona:v2"} <= set(ids)
    assert openai_client.models.retrieve("persona:v2").id == "persona:v2"


def test_non_streamed_completion(openai_client: Any, api: dict[str, Any]) -> None:
    reply = greedy(openai_client)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "persona"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.system_fingerprint == "adapter:v1"
    key = next(k for k in api["store"].list_api_keys() if k.id == api["key_row"].id)
    assert key.requests >= 1 and key.completion_tokens >= reply.usage.completion_tokens


def test_streamed_chunks_concatenate_to_the_final_text(openai_client: Any) -> None:
    whole = greedy(openai_client, max_tokens=30).choices[0].message.content
    stream = openai_client.chat.completions.create(model="persona", messages=ASK, temperature=0, max_tokens=30,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_ends_with_length(openai_client: Any) -> None:
    reply = greedy(openai_client, max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    reply = openai_client.chat.completions.create(model="persona", messages=ASK, temperature=0,
                                                  max_completion_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


def test_min_tokens_and_repetition_penalty_extensions(openai_client: Any) -> None:
    """vLLM's extra parameters: min_tokens holds off end-of-text, repetition_penalty overrides the persona's."""
    reply = greedy(openai_client, max_tokens=40, extra_body={"min_tokens": 40, "repetition_penalty": 1.0})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 40


def test_stop_strings_cut_the_reply(openai_client: Any) -> None:
    whole = greedy(openai_client, max_tokens=30).choices[0].message.content
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    assert stop.strip(), whole
    cut = greedy(openai_client, max_tokens=30, stop=stop).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == whole[:whole.index(stop)]
    listed = greedy(openai_client, max_tokens=30, stop=["\x00never", stop]).choices[0]
    assert listed.message.content == cut.message.content


def test_seed_repeats_a_sampled_reply(openai_client: Any) -> None:
    def sampled() -> str:
        return openai_client.chat.completions.create(model="persona", messages=ASK, temperature=1.0, top_p=0.9,
                                                     seed=7, max_tokens=12, user="u1").choices[0].message.content

    assert sampled() == sampled()


def test_model_picks_an_older_version_or_the_base(openai_client: Any) -> None:
    v1, v2, base = (greedy(openai_client, model=m) for m in ("persona:v1", "persona:v2", "base"))
    assert (v1.system_fingerprint, v2.system_fingerprint, base.system_fingerprint) == ("adapter:v1", "adapter:v2",
                                                                                        "base")
    assert v1.choices[0].message.content == greedy(openai_client).choices[0].message.content
    assert len({v1.choices[0].message.content, v2.choices[0].message.content, base.choices[0].message.content}) == 3


def test_disconnect_cancels_the_generation(api: dict[str, Any]) -> None:
    import httpx

    body = {"model": "persona", "messages": ASK, "temperature": 0, "max_tokens": 450, "stream": True}
    headers = {"Authorization": f"Bearer {api['key']}"}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{api['url']}/chat/completions", json=body,
                                                       headers=headers) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        request_id = first.split('"id": "chatcmpl-', 1)[1].split('"', 1)[0]
    final = [e for e in read_reply(api["redis"], request_id, timeout_s=30) if e.kind == "final"][0].result
    assert final.finish_reason == "cancelled" and final.completion_tokens < 450
    _wait_rows_free(api)


def _wait_rows_free(api: dict[str, Any]) -> None:
    deadline = time.monotonic() + 10
    while json.loads(api["redis"].hget(STATS_KEY, api["worker"].hostname))["running"] != 0:
        assert time.monotonic() < deadline, "the cancelled reply still holds its batch row"
        time.sleep(0.1)


def test_disconnect_cancels_a_non_streamed_generation(api: dict[str, Any]) -> None:
    import httpx

    before = set(api["redis"].scan_iter(match=stream_key("*")))
    body = {"model": "persona", "messages": ASK, "temperature": 0, "max_tokens": 450}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{api['url']}/chat/completions", json=body, headers={"Authorization": f"Bearer {api['key']}"},
                   timeout=httpx.Timeout(30, read=0.6))
    deadline = time.monotonic() + 30
    while True:
        new = set(api["redis"].scan_iter(match=stream_key("*"))) - before
        finals = [e.result for key in new for e in read_reply(api["redis"], key.decode().rsplit(":", 1)[1],
                                                              timeout_s=30) if e.kind == "final"]
        if finals:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert finals[0].finish_reason == "cancelled" and finals[0].completion_tokens < 450
    _wait_rows_free(api)


def test_swap_mid_stream_finishes_on_its_version(openai_client: Any, api: dict[str, Any]) -> None:
    expected = greedy(openai_client, model="persona:v1", max_tokens=120).choices[0].message.content
    stream = openai_client.chat.completions.create(model="persona", messages=ASK, temperature=0, max_tokens=120,
                                                   stream=True)
    registry = AdapterRegistry(api["store"], api["adapter_store"], api["redis"])
    chunks = [next(stream), next(stream)]
    since = time.time()
    registry.promote(api["v2"].id, actor="test")
    try:
        _wait_swapped(api, "v2", since)
        chunks += list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].system_fingerprint == "adapter:v1"
        assert greedy(openai_client).system_fingerprint == "adapter:v2"
    finally:
        since = time.time()
        registry.promote(api["v1"].id, actor="test")
        _wait_swapped(api, "v1", since)


def _wait_swapped(api: dict[str, Any], version: str, since: float) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(e.type == "adapter.swapped" and e.at >= since and e.data.get("version") == version
               for e in events.recent(api["redis"], 100)):
            return
        time.sleep(0.1)
    raise TimeoutError(f"no swap to {version}")


def test_readme_example_runs(api: dict[str, Any]) -> None:
    from tests.api.readme import readme_example

    namespace: dict[str, Any] = {}
    code = readme_example().replace("http://127.0.0.1:8000/v1", api["url"]).replace("pb-...", api["key"])
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["reply"].choices[0].message.content


def test_langchain_chat_openai_streams(api: dict[str, Any]) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=api["url"], api_key=api["key"], model="persona", temperature=0, max_tokens=20,
                     max_retries=0, stream_usage=True)
    pieces = list(llm.stream("Who are you?"))
    text = "".join(p.content for p in pieces)
    assert text and text == llm.invoke("Who are you?").content
    assert any(p.usage_metadata and p.usage_metadata["output_tokens"] > 0 for p in pieces)


def test_openai_errors_are_typed(openai_client: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        greedy(openai_client, model="persona:nope")
