"""Celery chat task and the chat worker's lifecycle (lazy engine load, swap listener)."""

# Start: celery -A workers.chat_tasks:app worker -Q chat --pool threads --concurrency N
#        --prefetch-multiplier 1   (N = PERSONABOT_MAX_BATCH: N task threads feed one engine,
# which batches them). The model loads in a background thread once the worker is ready.

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import redis
from celery import signals

from personabot.core.errors import one_line
from personabot.core.schemas import ChatRequest, ChatResult
from personabot.core.settings import get_settings
from personabot.core.streams import ReplyStreamWriter
from personabot.workers.app import app
from personabot.workers.chat_service import ChatRuntime
from personabot.workers.client import CHAT_TASK

log = logging.getLogger(__name__)

_runtime: ChatRuntime | None = None
_runtime_lock = threading.Lock()
_worker_name = ""
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 120.0
_failures = 0
_retry_at = 0.0
_last_failure = ""


class RuntimeUnavailableError(RuntimeError):
    """The chat worker could not start its engine; the message names the cause and when it retries."""


def runtime() -> ChatRuntime:
    """The process's runtime, built on first use (tasks wait for the model while it loads).

    A failed start frees whatever it loaded and is not retried before a growing backoff has passed;
    meanwhile every task is answered with the cause at once."""
    global _runtime, _failures, _retry_at, _last_failure
    with _runtime_lock:
        if _runtime is not None:
            return _runtime
        wait = _retry_at - time.monotonic()
        if wait > 0:
            raise RuntimeUnavailableError(f"{_last_failure} (next attempt in {wait:.0f}s)")
        candidate: ChatRuntime | None = None
        try:
            candidate = ChatRuntime(get_settings(), worker_name=_worker_name)
            _runtime = candidate.start()
        except Exception as error:
            if candidate is not None:
                candidate.close()
            _failures += 1
            backoff = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (_failures - 1))
            _retry_at = time.monotonic() + backoff
            _last_failure = one_line(error)
            raise RuntimeUnavailableError(f"{_last_failure} (next attempt in {backoff:.0f}s)") from error
        _failures = 0
        return _runtime


@signals.worker_ready.connect
def _load_in_background(sender: object = None, **_: object) -> None:
    global _worker_name
    _worker_name = str(getattr(sender, "hostname", "") or "")
    # The decode loop thread needs the GIL briefly between GPU steps; task threads must not
    # hold it for the default 5 ms.
    sys.setswitchinterval(0.0005)
    threading.Thread(target=_load, name="engine-load", daemon=True).start()


def _load() -> None:
    try:
        runtime()
    except RuntimeUnavailableError as error:
        log.error("the chat worker cannot start its engine: %s", error)


@signals.worker_shutdown.connect
def _close(**_: object) -> None:
    with _runtime_lock:
        if _runtime is not None:
            _runtime.close()


@app.task(name=CHAT_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def chat(request: dict[str, Any]) -> None:
    """Generate one reply into its Redis stream (task id = request id)."""
    parsed = ChatRequest.model_validate(request)
    try:
        current = runtime()
    except Exception as error:
        log.warning("the chat worker cannot start its engine: %s", error)
        settings = get_settings()
        client = redis.Redis.from_url(settings.effective_redis_url)
        try:
            ReplyStreamWriter(client, parsed.request_id, settings.stream_ttl_s).final(ChatResult(
                request_id=parsed.request_id, text="", finish_reason="error", adapter_version=None,
                worker=_worker_name, error=f"the chat worker cannot serve {settings.model}: {error}; "
                "fix the cause named here (see the worker log)"))
        finally:
            client.close()
        return
    current.serve(parsed)
