"""Every refusal of the API: OpenAI's error format, the right status, the field named; keys and metrics."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from personabot.redis_server import RedisServer, free_port
from tests.api.conftest import CONTEXT_TOKENS, ApiProcess, api_env

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Who are you?"}]


def post(api: dict[str, Any], body: Any, key: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or api['key']}"}
    return httpx.post(f"{api['url']}/chat/completions", headers=headers, timeout=60,
                      **({"content": body} if isinstance(body, str) else {"json": body}), **kw)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(("patch", "param"), [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages[1]"),
    ({"model": ""}, "model"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"repetition_penalty": 0.5}, "repetition_penalty"),
])
def test_bad_fields_are_400_naming_the_field(api: dict[str, Any], patch: dict[str, Any], param: str) -> None:
    error = error_of(post(api, {"model": "persona", "messages": ASK, **patch}), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_openai_client_raises_bad_request_with_the_param(openai_client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="persona", messages=ASK, n=3)
    assert caught.value.param == "n" and "n=1" in caught.value.message


def test_invalid_json_is_400_and_a_huge_body_413(api: dict[str, Any]) -> None:
    assert error_of(post(api, "{not json"), 400)["code"] == "invalid_json"
    huge = {"model": "persona", "messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}
    assert error_of(post(api, huge), 413)["code"] == "request_too_large"


def test_unknown_model_is_404(openai_client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert caught.value.code == "model_not_found" and "/v1/models" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("persona:v999")


def test_context_too_long_names_the_budget(openai_client: OpenAI) -> None:
    long = [{"role": "user", "content": "word " * (CONTEXT_TOKENS * 2)}]
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="persona", messages=long, max_tokens=16)
    assert caught.value.code == "context_length_exceeded" and f"budget is {CONTEXT_TOKENS - 16}" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="persona", messages=ASK, max_tokens=CONTEXT_TOKENS)
    assert caught.value.param == "max_tokens" and str(CONTEXT_TOKENS) in caught.value.message


def test_keys_missing_wrong_and_revoked_are_401(api: dict[str, Any]) -> None:
    for route in ("/models", "/models/persona", "/chat/completions"):
        method = httpx.post if route.endswith("completions") else httpx.get
        response = method(f"{api['url']}{route}", timeout=30)
        assert error_of(response, 401)["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=api["url"], api_key="pb-wrong", max_retries=0).models.list()
    key, secret = api["store"].create_api_key("short-lived")
    assert OpenAI(base_url=api["url"], api_key=secret, max_retries=0).models.list().data
    api["store"].revoke_api_key(key.id)
    with pytest.raises(openai.AuthenticationError) as caught:
        OpenAI(base_url=api["url"], api_key=secret, max_retries=0).models.list()
    assert secret not in str(caught.value.body)


def test_rate_limit_is_429_with_retry_after(api: dict[str, Any]) -> None:
    _key, secret = api["store"].create_api_key("limited", rate_limit_per_minute=2)
    client = OpenAI(base_url=api["url"], api_key=secret, max_retries=0)
    client.models.list()
    client.models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        client.models.list()
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert caught.value.code == "rate_limit_exceeded"


def test_metrics_need_a_key_and_cover_api_workers_and_store(api: dict[str, Any], openai_client: OpenAI) -> None:
    openai_client.chat.completions.create(model="persona", messages=ASK, max_tokens=4, stream=True).close()
    list(openai_client.chat.completions.create(model="persona", messages=ASK, max_tokens=4, stream=True))
    root = api["url"].rsplit("/v1", 1)[0]
    assert httpx.get(f"{root}/metrics").status_code == 401
    text = httpx.get(f"{root}/metrics", headers={"Authorization": f"Bearer {api['key']}"}).text
    for line in ('personabot_api_requests_total{model="persona",route="chat.completions",status="200"}',
                 "personabot_api_time_to_first_token_seconds_count", "personabot_api_inter_token_seconds_bucket",
                 "personabot_api_completion_tokens_total", "personabot_chat_queue_depth 0.0",
                 "personabot_chat_workers_live 1.0", 'personabot_chat_running_rows{worker="apichat@pytest"}',
                 'personabot_chat_swaps_total{worker="apichat@pytest"}',
                 'personabot_chat_prefix_hit_tokens_total{worker="apichat@pytest"}',
                 'personabot_adapter_active{version="v1"} 1.0',
                 'personabot_training_runs{status="succeeded"} 0.0'):
        assert line in text, line


def test_admin_login_is_not_an_api_key_and_the_key_opens_no_admin_route(api: dict[str, Any],
                                                                         tmp_path: Any) -> None:
    from tests.ui.conftest import ADMIN_PASSWORD, ADMIN_USER, start_admin

    admin, thread = start_admin(tmp_path, api["redis_url"], database_url=api["db_url"])
    try:
        basic = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
        assert httpx.get(f"{admin.url}/api/v1/status", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        bearer = {"Authorization": f"Bearer {api['key']}"}
        for route in ("/api/v1/status", "/api/v1/adapters", "/api/v1/runs", "/config"):
            assert httpx.get(f"{admin.url}{route}", headers=bearer, timeout=30).status_code == 401, route
        page = httpx.get(f"{admin.url}/", headers=bearer, timeout=30)
        assert 'id="signin"' in page.text and "gradio" not in page.text.lower()
        response = httpx.get(f"{api['url']}/models", headers={"Authorization": f"Basic {basic}"})
        assert error_of(response, 401)["code"] == "missing_api_key"
        assert error_of(httpx.get(f"{api['url']}/models", headers={"Authorization": f"Bearer {ADMIN_PASSWORD}"}),
                        401)["code"] == "invalid_api_key"
    finally:
        thread.stop()
        admin.ctx.close()  # type: ignore[attr-defined]


@pytest.fixture()
def lonely_api(api: dict[str, Any], tmp_path: Any) -> Iterator[dict[str, Any]]:
    """A second API on a Redis no chat worker listens to, refusing system messages, metrics on their own port."""
    server = RedisServer(tmp_path / "redis", persist=False).start()
    metrics_port = free_port()
    env = api_env(server.url, api["db_url"], api["model"], api["data_dir"], PERSONABOT_API_SYSTEM_MESSAGES="refuse",
                  PERSONABOT_METRICS_HOST="127.0.0.1", PERSONABOT_METRICS_PORT=str(metrics_port))
    process = ApiProcess(env, tmp_path).start()
    try:
        yield {**api, "url": process.base_url, "metrics_port": metrics_port, "redis_server": server}
    finally:
        process.stop()
        server.stop()


def test_no_worker_is_503_and_refuse_policy_and_metrics_address(lonely_api: dict[str, Any]) -> None:
    client = OpenAI(base_url=lonely_api["url"], api_key=lonely_api["key"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="persona", messages=[{"role": "system", "content": "Be Bob."}, *ASK])
    assert caught.value.code == "system_message_refused" and "PERSONABOT_API_SYSTEM_MESSAGES" in caught.value.message
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="persona", messages=ASK)
    assert caught.value.status_code == 503 and caught.value.code == "worker_unavailable"
    assert caught.value.response.headers["Retry-After"]
    root = lonely_api["url"].rsplit("/v1", 1)[0]
    assert httpx.get(f"{root}/metrics", headers={"Authorization": f"Bearer {lonely_api['key']}"}).status_code == 404
    text = httpx.get(f"http://127.0.0.1:{lonely_api['metrics_port']}/metrics").text
    assert "personabot_chat_workers_live 0.0" in text and 'status="503"' in text
    lonely_api["redis_server"].stop()
    with pytest.raises(openai.InternalServerError) as caught:
        client.models.list()
    assert caught.value.status_code == 503 and caught.value.code == "redis_unavailable"


def test_client_system_message_is_appended_by_default(openai_client: OpenAI) -> None:
    plain = openai_client.chat.completions.create(model="persona", messages=ASK, temperature=0, max_tokens=12)
    with_system = openai_client.chat.completions.create(
        model="persona", messages=[{"role": "system", "content": "Answer briefly."}, *ASK], temperature=0,
        max_tokens=12)
    assert with_system.usage.prompt_tokens > plain.usage.prompt_tokens
