"""The Celery app: Redis broker, JSON only, queues `chat` and `train`."""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

from personabot.core.settings import get_settings

CHAT_QUEUE = "chat"
TRAIN_QUEUE = "train"


def make_celery(redis_url: str | None = None) -> Celery:
    """Build the app; `redis_url` defaults to PERSONABOT_REDIS_URL."""
    # `personabot up` sets PERSONABOT_REDIS_URL for its children after starting Redis.
    url = redis_url or get_settings().effective_redis_url
    app = Celery("personabot", broker=url, backend=url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_queues=[Queue(CHAT_QUEUE), Queue(TRAIN_QUEUE)],
        task_default_queue=CHAT_QUEUE,
        task_routes={
            "personabot.chat*": {"queue": CHAT_QUEUE},
            "personabot.train*": {"queue": TRAIN_QUEUE},
            "personabot.retrain_if_changed": {"queue": TRAIN_QUEUE},
        },
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options={
            # Only chat tasks are acks_late; a reply never takes this long, so redelivery after
            # a worker death happens within this many seconds (training acks early).
            "visibility_timeout": int(os.environ.get("PERSONABOT_CHAT_VISIBILITY_TIMEOUT", "300")),
        },
        result_backend_transport_options={"visibility_timeout": 300},
        timezone="UTC",
    )
    return app


app = make_celery()
