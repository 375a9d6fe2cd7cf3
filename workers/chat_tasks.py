"""Celery chat task and the chat worker's lifecycle (lazy engine load, swap listener)."""

# Start: celery -A workers.chat_tasks:app worker -Q chat --pool threads --concurrency N
#        --prefetch-multiplier 1   (N = PERSONABOT_MAX_BATCH: N task threads feed one engine,
# which batches them). The model loads in a background thread once the worker is ready.

from __future__ import annotations

import logging
import sys
import threading

import redis
from celery import signals

from core.schemas import ChatRequest, ChatResult
from core.settings import get_settings
from core.streams import ReplyStreamWriter
from workers.app import app
from workers.chat_service import ChatRuntime
from workers.client import CHAT_TASK

log = logging.getLogger(__name__)

_runtime: ChatRuntime | None = None
_runtime_lock = threading.Lock()
_worker_name = ""


def runtime() -> ChatRuntime:
    """The process's runtime, built on first use (tasks wait for the model while it loads)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = ChatRuntime(get_settings(), worker_name=_worker_name).start()
        return _runtime


@signals.worker_ready.connect
def _load_in_background(sender: object = None, **_: object) -> None:
    global _worker_name
    _worker_name = str(getattr(sender, "hostname", "") or "")
    # The decode loop thread needs the GIL briefly between GPU steps; task threads must not
    # hold it for the default 5 ms.
    sys.setswitchinterval(0.0005)
    threading.Thread(target=runtime, name="engine-load", daemon=True).start()


@signals.worker_shutdown.connect
def _close(**_: object) -> None:
    with _runtime_lock:
        if _runtime is not None:
            _runtime.close()


@app.task(name=CHAT_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def chat(request: dict) -> None:  # type: ignore[type-arg]
    """Generate one reply into its Redis stream (task id = request id)."""
    parsed = ChatRequest.model_validate(request)
    try:
        current = runtime()
    except Exception as error:
        log.exception("the chat worker cannot load its model")
        settings = get_settings()
        client = redis.Redis.from_url(settings.effective_redis_url)
        ReplyStreamWriter(client, parsed.request_id, settings.stream_ttl_s).final(ChatResult(
            request_id=parsed.request_id, text="", finish_reason="error", adapter_version=None,
            worker=_worker_name, error=f"the chat worker cannot load {settings.model}: {error}; "
            "check PERSONABOT_MODEL and the worker log"))
        client.close()
        return
    current.serve(parsed)
