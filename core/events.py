"""The one event bus: publish and subscribe `core.schemas.Event`s over Redis pub/sub."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis

from personabot.core.schemas import Event

CHANNEL = "personabot:events"
log = logging.getLogger(__name__)


def publish(client: redis.Redis, type_: str, **data: Any) -> Event:
    event = Event(type=type_, data=data)  # type: ignore[arg-type]
    client.publish(CHANNEL, event.model_dump_json())
    # Keep a short history so the admin can show recent events and late readers can catch up.
    client.xadd("personabot:event-log", {"event": event.model_dump_json()}, maxlen=1000, approximate=True)
    return event


def recent(client: redis.Redis, count: int = 50) -> list[Event]:
    entries = client.xrevrange("personabot:event-log", count=count)
    return [Event.model_validate_json(fields[b"event"]) for _id, fields in entries]


def subscribe(client: redis.Redis, *, timeout: float = 1.0) -> Iterator[Event | None]:
    """Yield events as they come; yields None every `timeout` seconds so callers can stop."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    try:
        while True:
            message = pubsub.get_message(timeout=timeout)
            if message is None:
                yield None
                continue
            try:
                yield Event.model_validate_json(message["data"])
            except ValueError:
                log.warning("ignoring a malformed event on %s", CHANNEL)
    finally:
        pubsub.close()
