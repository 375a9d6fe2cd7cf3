"""POST /v1/chat/completions: one request through the Celery chat path, answered whole or as SSE chunks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from personabot.api.errors import APIError
from personabot.api.metrics import ApiMetrics, live_chat_workers
from personabot.api.models import resolve_model
from personabot.api.schemas import ChatCompletionBody, split_messages, system_override
from personabot.core.schemas import ChatRequest, ChatResult, SamplingParams
from personabot.core.settings import Settings
from personabot.core.store import Store
from personabot.core.store_keys import ApiKey
from personabot.workers.client import ChatClient, ReplyUpdate

DISCONNECT_POLL_S = 0.25
RETRY_UPDATING_S = 60
LIVE_CACHE_S = 2.0  # a chat worker's heartbeat entry lasts 15 s; a SCAN per request would cost more


@dataclass
class Completions:
    """What a completion needs: settings, the store, the chat client (sync + asyncio Redis), metrics."""

    settings: Settings
    store: Store
    chat: ChatClient
    redis: redis.Redis
    metrics: ApiMetrics
    _live_until: float = field(default=0.0, init=False)

    async def handle(self, body: ChatCompletionBody, key: ApiKey, request: Request, received: float) -> Any:
        chat_request = await self.build(body, key)
        await self._check_workers()
        await self.chat.asubmit(chat_request)
        updates = self.chat.astream(chat_request.request_id, timeout_s=self.settings.api_timeout_s)
        try:
            first = await self._next(updates)
            if first.result is not None:
                raise_for_result(first.result)
        except BaseException:
            self.chat.cancel(chat_request.request_id)
            raise
        if body.stream:
            return StreamingResponse(self._sse(body, key, chat_request, first, updates, received),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(body, key, chat_request, first, updates, request, received)

    async def _check_workers(self) -> None:
        """503 when no chat worker has a live heartbeat (a positive answer is trusted for LIVE_CACHE_S)."""
        if time.monotonic() < self._live_until:
            return
        if not await anyio.to_thread.run_sync(live_chat_workers, self.redis):
            raise APIError(503, "no chat worker is running; start one (`personabot worker chat` or "
                           "`personabot up`) and retry", code="worker_unavailable", headers={"Retry-After": "10"})
        self._live_until = time.monotonic() + LIVE_CACHE_S

    async def build(self, body: ChatCompletionBody, key: ApiKey) -> ChatRequest:
        adapter = await anyio.to_thread.run_sync(resolve_model, self.store, body.model)
        systems, turns = split_messages(body)
        persona = await anyio.to_thread.run_sync(self.store.get_persona)
        override = system_override(self.settings.api_system_messages, persona.system_prompt, systems)
        sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, max_new_tokens=body.max_new_tokens,
                                  stop=body.stops, seed=body.seed, min_new_tokens=body.min_tokens,
                                  repetition_penalty=body.repetition_penalty)
        return ChatRequest(messages=turns, adapter=adapter, system_prompt=override, sampling=sampling,
                           chat_id=f"api-key-{key.id}:{body.user or ''}", source="openai-api")

    async def _next(self, updates: AsyncIterator[ReplyUpdate]) -> ReplyUpdate:
        try:
            return await anext(updates)
        except (TimeoutError, StopAsyncIteration):
            raise APIError(503, f"no chat worker answered within {self.settings.api_timeout_s:.0f}s "
                           "(PERSONABOT_API_TIMEOUT_S); the workers are busy or down, retry later",
                           code="worker_timeout", headers={"Retry-After": "10"}) from None

    async def _record(self, key: ApiKey, result: ChatResult, received: float) -> None:
        self.metrics.prompt_tokens.inc(result.prompt_tokens)
        self.metrics.completion_tokens.inc(result.completion_tokens)
        await anyio.to_thread.run_sync(lambda: self.store.add_api_key_usage(
            key.id, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens))

    async def _whole(self, body: ChatCompletionBody, key: ApiKey, chat_request: ChatRequest, first: ReplyUpdate,
                     updates: AsyncIterator[ReplyUpdate], request: Request, received: float) -> JSONResponse:
        async def collect() -> ChatResult:
            update = first
            while update.result is None:
                if update.delta and not seen_first[0]:
                    seen_first[0] = True
                    self.metrics.ttft.observe(time.time() - received)
                update = await self._next(updates)
            return update.result

        seen_first = [False]
        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    self.metrics.cancelled.inc()
                    raise APIError(499, "the client disconnected; the generation was cancelled")
            result = task.result()
        finally:
            if not task.done() or task.cancelled() or task.exception() is not None:
                task.cancel()
                self.chat.cancel(chat_request.request_id)
        raise_for_result(result)
        await self._record(key, result, received)
        return JSONResponse({
            "id": completion_id(chat_request), "object": "chat.completion", "created": int(chat_request.created_at),
            "model": body.model, "system_fingerprint": fingerprint(result),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                         "finish_reason": finish_reason(result), "logprobs": None}],
            "usage": usage(result)})

    async def _sse(self, body: ChatCompletionBody, key: ApiKey, chat_request: ChatRequest, first: ReplyUpdate,
                   updates: AsyncIterator[ReplyUpdate], received: float) -> AsyncIterator[str]:
        base = {"id": completion_id(chat_request), "object": "chat.completion.chunk",
                "created": int(chat_request.created_at), "model": body.model}
        usage_field = {"usage": None} if body.include_usage else {}

        def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> str:
            data = {**base, **extra, "choices": [{"index": 0, "delta": delta, "finish_reason": reason,
                                                  "logprobs": None}], **usage_field}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        finished, sent, last = False, "", 0.0
        try:
            yield chunk({"role": "assistant", "content": ""})
            update = first
            while True:
                if update.restarted and sent:
                    yield error_event("the chat worker restarted this reply after a failure; send the request again")
                    return
                if update.delta:
                    now = time.time()
                    if last:
                        self.metrics.inter_token.observe(now - last)
                    else:
                        self.metrics.ttft.observe(now - received)
                    last = now
                    sent += update.delta
                    yield chunk({"content": update.delta})
                if update.result is not None:
                    result = update.result
                    finished = True
                    if result.finish_reason == "updating":
                        yield error_event(f"the persona is being updated (training holds the GPU): {result.text}")
                        return
                    if result.finish_reason == "error":
                        yield error_event(result.error or "the generation failed; see the chat worker log")
                        return
                    await self._record(key, result, received)
                    yield chunk({}, finish_reason(result), system_fingerprint=fingerprint(result))
                    if body.include_usage:
                        data = {**base, "choices": [], "usage": usage(result),
                                "system_fingerprint": fingerprint(result)}
                        yield f"data: {json.dumps(data)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                try:
                    update = await self._next(updates)
                except APIError as error:
                    yield error_event(error.message)
                    return
        finally:
            if not finished:
                # The client left (or the reply failed): stop generating, free the batch row.
                self.metrics.cancelled.inc()
                self.chat.cancel(chat_request.request_id)


def completion_id(request: ChatRequest) -> str:
    return f"chatcmpl-{request.request_id}"


def fingerprint(result: ChatResult) -> str:
    """Which weights answered: `adapter:<version>` or `base`."""
    return f"adapter:{result.adapter_version}" if result.adapter_version else "base"


def finish_reason(result: ChatResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def usage(result: ChatResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def error_event(message: str) -> str:
    error = {"message": message, "type": "server_error", "param": None, "code": None}
    return f"data: {json.dumps({'error': error})}\n\n"


def raise_for_result(result: ChatResult) -> None:
    """A final record that is an error (or the "updating" answer) becomes the matching API error."""
    if result.finish_reason == "updating":
        raise APIError(503, f"the persona is being updated (training holds the GPU): {result.text}",
                       code="updating", headers={"Retry-After": str(RETRY_UPDATING_S)})
    if result.finish_reason != "error":
        return
    error = result.error or "the generation failed; see the chat worker log"
    if "context budget is" in error:
        raise APIError(400, f"{error} (context length exceeded)", param="messages", code="context_length_exceeded")
    if "leaves no room for the prompt" in error:
        raise APIError(400, error.replace("max_new_tokens", "max_tokens"), param="max_tokens",
                       code="context_length_exceeded")
    if "does not exist" in error and "adapter version" in error:
        raise APIError(404, error, param="model", code="model_not_found")
    if "cannot serve" in error:
        raise APIError(503, error, code="worker_unavailable", headers={"Retry-After": "30"})
    raise APIError(500, error, code="generation_failed")
