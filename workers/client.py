"""Client side of the chat queue: submit a ChatRequest, cancel it. Used by the bot, UI and API."""

from __future__ import annotations

import redis
from celery import Celery

from personabot.core.schemas import ChatRequest
from personabot.core.streams import request_cancel

CHAT_TASK = "personabot.chat"
TRAIN_TASK = "personabot.train"
MAYBE_RETRAIN_TASK = "personabot.maybe_retrain"


def submit_chat(request: ChatRequest, *, app: Celery | None = None) -> str:
    """Enqueue on `chat`; the Celery task id is the request id, so duplicates are recognisable.

    Read the reply with `core.streams.read_reply(redis_client, request.request_id)`.
    """
    if app is None:
        from personabot.workers.app import app as default_app

        app = default_app
    app.send_task(CHAT_TASK, args=[request.model_dump(mode="json")], task_id=request.request_id)
    return request.request_id


def cancel_chat(client: redis.Redis, request_id: str) -> None:
    """Ask the chat worker to stop this reply; its batch slot is freed at the next step."""
    request_cancel(client, request_id)


def submit_training(run_id: int, *, app: Celery | None = None) -> str:
    """Enqueue a training run already created in the store (`status='queued'`)."""
    if app is None:
        from personabot.workers.app import app as default_app

        app = default_app
    result = app.send_task(TRAIN_TASK, kwargs={"run_id": run_id})
    return str(result.id)
