"""One chat request from prompt to final record: prompt budget, adapter choice, token streaming."""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path
from typing import Protocol

import redis

from personabot.core import keys
from personabot.core.errors import one_line
from personabot.core.prompting import PromptError, conversation_messages, system_prompt_for
from personabot.core.schemas import ChatRequest, ChatResult
from personabot.core.settings import Settings
from personabot.core.store import Store
from personabot.core.streams import ReplyStreamWriter, cancel_key
from personabot.training.registry import AdapterPathError
from personabot.workers.engine import (
    ACTIVE,
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_STOP,
    FINISH_UPDATING,
    Engine,
    EngineError,
    GenerationDone,
    GenerationRequest,
    GenerationStream,
    ReplyText,
)

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.2
FLUSH_S = 0.03  # tokens produced within this long go out as one stream entry (fewer XADDs, less GIL)
CLAIM_TTL_S = 10  # a reply's owner refreshes its claim; a dead owner's claim lapses this fast


def claim_key(request_id: str) -> str:
    return keys.CLAIM + request_id


def updating_text(eta_s: float) -> str:
    minutes = max(1, round(eta_s / 60))
    return f"I'm being updated, back in about {minutes} minute{'s' if minutes != 1 else ''}."



class ReplyRuntime(Protocol):
    """What a reply needs from its worker (`workers.chat_service.ChatRuntime`)."""

    client: redis.Redis
    settings: Settings
    store: Store
    engine: Engine
    worker_name: str
    updating_eta_s: float | None

    def count_tokens(self, messages: list[dict[str, str]]) -> int: ...

    def encode(self, messages: list[dict[str, str]]) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def adapter_dir(self, version: str, stored: str = "") -> Path: ...

    def publish_stats(self) -> None: ...


class Reply:
    """One request from prompt to final record."""

    def __init__(self, runtime: ReplyRuntime, request: ChatRequest, *, claim: tuple[str, str]) -> None:
        self.rt = runtime
        self.claim = claim
        self.request = request
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.writer = ReplyStreamWriter(runtime.client, request.request_id, runtime.settings.stream_ttl_s)

    def final(self, text: str, finish_reason: str, adapter: str | None, *, error: str = "",
              prompt_tokens: int = 0, completion_tokens: int = 0, first_token_s: float = 0.0) -> ChatResult:
        result = ChatResult(
            request_id=self.request.request_id, text=text, finish_reason=finish_reason,
            adapter_version=adapter, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            queued_s=max(0.0, self.started - self.request.created_at), first_token_s=first_token_s,
            total_s=time.time() - self.started, worker=self.rt.worker_name, error=error)
        self.writer.final(result)
        return result

    def run(self) -> ChatResult:
        """Answer the request; any failure still ends the stream with a final record naming it."""
        try:
            return self._run()
        except Exception as error:
            log.exception("reply %s failed", self.request.request_id)
            self.rt.engine.cancel(self.request.request_id, FINISH_ERROR)
            return self.final("", FINISH_ERROR, None,
                              error=f"the chat worker failed: {one_line(error)}; see the worker log")

    def _run(self) -> ChatResult:
        rt, request, settings = self.rt, self.request, self.rt.settings
        self.writer.reset()
        if rt.updating_eta_s is not None or rt.engine.released:
            return self.final(updating_text(rt.updating_eta_s or 600), FINISH_UPDATING, None)
        if rt.client.exists(cancel_key(request.request_id)):
            return self.final("", FINISH_CANCELLED, None)
        sampling = request.sampling
        # An explicit max_new_tokens is honoured strictly; the default never takes more than half the context.
        max_new = sampling.max_new_tokens or min(settings.max_new_tokens, settings.context_tokens // 2)
        budget = settings.context_tokens - max_new
        try:
            if budget < 1:
                raise PromptError(f"max_new_tokens {max_new} leaves no room for the prompt in "
                                  f"{settings.context_tokens} context tokens; lower max_new_tokens")
            system = system_prompt_for(rt.store.get_persona(), request.system_prompt)
            messages = conversation_messages(system, request.messages, count_tokens=rt.count_tokens,
                                             budget=budget)
            prompt_ids = rt.encode(messages)
            adapter = self.resolve_adapter()
        except (PromptError, EngineError) as error:
            return self.final("", FINISH_ERROR, None, error=str(error))
        temperature = settings.temperature if sampling.temperature is None else sampling.temperature
        generation = GenerationRequest(
            request_id=request.request_id, prompt_ids=prompt_ids, max_new_tokens=max_new,
            temperature=temperature, top_p=sampling.top_p or settings.top_p,
            repetition_penalty=sampling.repetition_penalty or settings.repetition_penalty,
            seed=sampling.seed, adapter=adapter, min_new_tokens=sampling.min_new_tokens)
        try:
            stream = rt.engine.submit(generation)
        except EngineError as error:
            if rt.engine.released:
                return self.final(updating_text(rt.updating_eta_s or 600), FINISH_UPDATING, None)
            return self.final("", FINISH_ERROR, None, error=str(error), prompt_tokens=len(prompt_ids))
        return self.stream_tokens(stream, len(prompt_ids))

    def resolve_adapter(self) -> str | None:
        name = self.request.adapter
        if name == "active":
            return ACTIVE
        if name == "base":
            return None
        if not self.rt.engine.has_adapter(name):
            version = self.rt.store.find_adapter(name)
            if version is None:
                raise EngineError(f"adapter version {name!r} does not exist; pick one listed in the "
                                  "Adapters tab, 'active' or 'base'")
            try:
                folder = self.rt.adapter_dir(name, version.path)
            except AdapterPathError as error:
                raise EngineError(f"adapter version {name!r} cannot be used: {error}") from None
            self.rt.engine.load_adapter(name, str(folder), version.base_model)
        return name

    def stream_tokens(self, stream: GenerationStream, prompt_tokens: int) -> ChatResult:
        rt, request_id = self.rt, self.request.request_id
        reply = ReplyText(rt.decode, self.request.sampling.stop)
        next_cancel_check = time.monotonic() + CANCEL_POLL_S
        while True:
            try:
                item = stream.next_batch(timeout=CANCEL_POLL_S)
            except queue.Empty:
                item = []
            if isinstance(item, GenerationDone):
                done = item
                break
            if item and not reply.stopped:
                delta = reply.feed(item)
                if reply.stopped:
                    rt.engine.cancel(request_id, FINISH_STOP)
                if delta:
                    self.writer.token(delta)
                    time.sleep(FLUSH_S)
            if time.monotonic() >= next_cancel_check:
                next_cancel_check = time.monotonic() + CANCEL_POLL_S
                pipe = rt.client.pipeline()
                pipe.exists(cancel_key(request_id))
                pipe.expire(self.claim[0], CLAIM_TTL_S)
                if pipe.execute()[0]:
                    rt.engine.cancel(request_id, FINISH_CANCELLED)
        rest = reply.finish()
        if rest:
            self.writer.token(rest)
        first = (stream.first_token_at - self.started_mono) if stream.first_token_at else 0.0
        reason = FINISH_STOP if reply.stopped else done.finish_reason
        result = self.final(reply.text, reason, done.adapter, error=done.error, prompt_tokens=prompt_tokens,
                            completion_tokens=len(reply.ids), first_token_s=first)
        rt.publish_stats()
        return result
