"""Client side of the chat and train queues: the one way to ask the chat worker and read its reply.

Every caller (the bot, the admin playground and API, the CLI, the benches) uses `ChatClient`:
`ask` waits for the final record, `stream`/`astream` yield `ReplyUpdate`s as tokens arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

import redis
import redis.asyncio as aioredis
from celery import Celery

from personabot.core.errors import one_line
from personabot.core.schemas import ChatRequest, ChatResult
from personabot.core.streams import StreamEntry, aread_reply, read_reply, request_cancel

if TYPE_CHECKING:
    from personabot.core.models import TrainingRun
    from personabot.core.store import Store

CHAT_TASK = "personabot.chat"
TRAIN_TASK = "personabot.train"
RETRAIN_IF_CHANGED_TASK = "personabot.retrain_if_changed"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplyUpdate:
    """One step of a reply as a reader sees it.

    `text` is the whole reply so far, `delta` what this entry added. `restarted` is set when the
    worker started the reply over after some text had been seen (a redelivered request): drop
    what was shown. The last update carries `result`; `entry_id` lets a reader resume after it.
    """

    text: str
    delta: str
    entry_id: str
    restarted: bool = False
    result: ChatResult | None = None


class _Assembler:
    """Turns raw stream entries into ReplyUpdates (shared by the sync and async readers)."""

    def __init__(self) -> None:
        self.text = ""

    def feed(self, entry: StreamEntry) -> ReplyUpdate | None:
        if entry.kind == "reset":
            # Every reply opens with a reset; only one after text means a restart.
            restarted = bool(self.text)
            self.text = ""
            return ReplyUpdate("", "", entry.id, restarted=True) if restarted else None
        if entry.kind == "token":
            self.text += entry.text
            return ReplyUpdate(self.text, entry.text, entry.id)
        if entry.kind == "final" and entry.result is not None:
            return ReplyUpdate(entry.result.text or self.text, "", entry.id, result=entry.result)
        return None


def _default_app() -> Celery:
    from personabot.workers.app import app

    return app


def submit_chat(request: ChatRequest, *, app: Celery | None = None) -> str:
    """Enqueue on `chat`; the Celery task id is the request id, so duplicates are recognisable."""
    (app or _default_app()).send_task(CHAT_TASK, args=[request.model_dump(mode="json")],
                                      task_id=request.request_id)
    return request.request_id


def cancel_chat(client: redis.Redis, request_id: str) -> None:
    """Ask the chat worker to stop this reply; its batch slot is freed at the next step."""
    request_cancel(client, request_id)


def submit_training(run_id: int, *, app: Celery | None = None) -> str:
    """Enqueue a training run already created in the store (`status='queued'`)."""
    result = (app or _default_app()).send_task(TRAIN_TASK, kwargs={"run_id": run_id})
    return str(result.id)


class TrainingNotQueuedError(RuntimeError):
    """A run was created but could not be put on the `train` queue; it was cancelled, so it blocks nothing."""

    def __init__(self, run_id: int, reason: str) -> None:
        super().__init__(f"run {run_id} {reason}")
        self.run_id = run_id
        self.reason = reason


@overload
def queue_training(store: Store, request: Callable[[], TrainingRun], *, app: Celery | None = None) -> TrainingRun: ...


@overload
def queue_training(store: Store, request: Callable[[], TrainingRun | None], *,
                   app: Celery | None = None) -> TrainingRun | None: ...


def queue_training(store: Store, request: Callable[[], TrainingRun | None], *,
                   app: Celery | None = None) -> TrainingRun | None:
    """Request a run (`request` creates it in the store, or returns None), enqueue it on `train`,
    and cancel it when it cannot be enqueued (a queued run without a task would block the next one).

    Returns the queued run, or None when `request` created none; raises `TrainingNotQueuedError`.
    """
    run = request()
    if run is None:
        return None
    try:
        task_id = submit_training(run.id, app=app)
    except Exception as error:  # kombu OperationalError, Redis errors: the run would never start
        reason = (f"could not be queued ({one_line(error)}) and was cancelled; "
                  "check that Redis is reachable, then start it again")[:500]
        store.finish_run(run.id, "cancelled", error=reason)
        log.warning("run %s %s", run.id, reason)
        raise TrainingNotQueuedError(run.id, reason) from error
    store.update_run(run.id, task_id=task_id)
    return run


class ChatClient:
    """Submit chat requests and read their replies, synchronously or from an event loop."""

    def __init__(self, redis_client: redis.Redis, celery: Celery | None = None, *,
                 aredis: aioredis.Redis | None = None) -> None:
        self.redis = redis_client
        self.celery = celery
        self.aredis = aredis

    def submit(self, request: ChatRequest) -> str:
        return submit_chat(request, app=self.celery)

    async def asubmit(self, request: ChatRequest) -> str:
        # Celery's send_task is blocking I/O; keep it off the event loop.
        return await asyncio.to_thread(self.submit, request)

    def cancel(self, request_id: str) -> None:
        cancel_chat(self.redis, request_id)

    def stream(self, request_id: str, *, last_id: str = "0-0", timeout_s: float = 120.0) -> Iterator[ReplyUpdate]:
        """Updates of an already submitted request until its final one (TimeoutError if none comes)."""
        assembler = _Assembler()
        for entry in read_reply(self.redis, request_id, last_id=last_id, timeout_s=timeout_s):
            update = assembler.feed(entry)
            if update is not None:
                yield update

    async def astream(self, request_id: str, *, last_id: str = "0-0",
                      timeout_s: float = 120.0) -> AsyncIterator[ReplyUpdate]:
        """`stream` over redis.asyncio (needs `aredis`)."""
        if self.aredis is None:
            raise RuntimeError("ChatClient.astream needs an asyncio Redis client (aredis=...)")
        assembler = _Assembler()
        async for entry in aread_reply(self.aredis, request_id, last_id=last_id, timeout_s=timeout_s):
            update = assembler.feed(entry)
            if update is not None:
                yield update

    def ask(self, request: ChatRequest, *, timeout_s: float = 120.0) -> ChatResult:
        """Submit and wait for the final record."""
        self.submit(request)
        return _final(self.stream(request.request_id, timeout_s=timeout_s), request.request_id)

    async def aask(self, request: ChatRequest, *, timeout_s: float = 120.0) -> ChatResult:
        await self.asubmit(request)
        async for update in self.astream(request.request_id, timeout_s=timeout_s):
            if update.result is not None:
                return update.result
        raise TimeoutError(f"no final reply for request {request.request_id}")


def _final(updates: Iterator[ReplyUpdate], request_id: str) -> ChatResult:
    for update in updates:
        if update.result is not None:
            return update.result
    raise TimeoutError(f"no final reply for request {request_id}")
