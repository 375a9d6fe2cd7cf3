"""The API's pure parts: worker outcomes mapped to OpenAI errors, system-message policies, field names."""

from __future__ import annotations

import pytest

from personabot.api.completions import raise_for_result
from personabot.api.errors import APIError, field_path
from personabot.api.schemas import parse_body, split_messages, system_override
from personabot.core.schemas import ChatResult


def _result(**kw: object) -> ChatResult:
    return ChatResult(**{"request_id": "r", "text": "", "finish_reason": "error", "adapter_version": None, **kw})


@pytest.mark.parametrize(("fields", "status", "code", "param"), [
    ({"finish_reason": "updating", "text": "back in about 3 minutes"}, 503, "updating", None),
    ({"error": "the prompt needs 900 tokens but the context budget is 496; shorten"}, 400,
     "context_length_exceeded", "messages"),
    ({"error": "max_new_tokens 600 leaves no room for the prompt in 512 context tokens"}, 400,
     "context_length_exceeded", "max_tokens"),
    ({"error": "adapter version 'v9' does not exist; pick one"}, 404, "model_not_found", "model"),
    ({"error": "the chat worker cannot serve tiny: OSError"}, 503, "worker_unavailable", None),
    ({"error": "the chat worker failed: RuntimeError: boom"}, 500, "generation_failed", None),
])
def test_worker_outcomes_become_openai_errors(fields: dict[str, object], status: int, code: str,
                                              param: str | None) -> None:
    with pytest.raises(APIError) as caught:
        raise_for_result(_result(**fields))
    assert (caught.value.status, caught.value.code, caught.value.param) == (status, code, param)
    if status == 503:
        assert int(caught.value.headers["Retry-After"]) > 0
    assert caught.value.body()["error"]["message"]


def test_a_normal_result_passes() -> None:
    raise_for_result(_result(finish_reason="length", text="hi"))


def test_system_message_policies() -> None:
    body = parse_body({"model": "persona", "messages": [{"role": "developer", "content": "Be brief."},
                                                         {"role": "user", "content": "Hi"}]})
    systems, turns = split_messages(body)
    assert systems == ["Be brief."] and [t.role for t in turns] == ["user"]
    assert system_override("append", "You are Nova.", systems) == "You are Nova.\n\nBe brief."
    assert system_override("replace", "You are Nova.", systems) == "Be brief."
    assert system_override("refuse", "You are Nova.", []) is None
    with pytest.raises(APIError) as caught:
        system_override("refuse", "You are Nova.", systems)
    assert caught.value.status == 400 and caught.value.code == "system_message_refused"


def test_field_paths_are_named_like_openai() -> None:
    assert field_path(("body", "messages", 0, "content")) == "messages[0].content"
    assert field_path(("temperature",)) == "temperature"
