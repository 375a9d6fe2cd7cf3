"""The one event bus and its events: typed dataclasses (run progress, adapter promoted, swap done, ...)
published and read as JSON over Redis pub/sub, with a short history in a capped stream.

On the wire an event is the envelope `Event` ({"type", "at", "data"}); `decode` turns one into its
dataclass, validated, so consumers match on classes instead of strings and dict keys.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast, get_args

import redis
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from personabot.core.keys import EVENT_LOG, EVENTS_CHANNEL

EventType = Literal[
    "run.progress", "run.finished", "adapter.promoted", "adapter.swapped", "adapter.refused", "worker.online",
    "gpu.release", "gpu.reclaim",
]
CHANNEL = EVENTS_CHANNEL
log = logging.getLogger(__name__)


class Event(BaseModel):
    """The wire envelope of every event on the channel `personabot:events`."""

    type: EventType
    at: float = Field(default_factory=time.time)
    data: dict[str, Any] = Field(default_factory=dict)


class EventDataError(ValueError):
    """An event's data does not fit its type; the message names the type and the bad fields."""


@dataclass(frozen=True)
class _Typed:
    TYPE: ClassVar[EventType]

    def envelope(self) -> Event:
        return Event(type=self.TYPE, data=dataclasses.asdict(self))

    def to_json(self) -> str:
        return self.envelope().model_dump_json()


@dataclass(frozen=True)
class RunProgress(_Typed):
    """A training run logged steps (training.service)."""

    TYPE: ClassVar[EventType] = "run.progress"
    run_id: int
    step: int | None = None
    max_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eta_s: float | None = None
    gpu_mem_gb: float | None = None


@dataclass(frozen=True)
class RunFinished(_Typed):
    """A training run ended: succeeded, failed, rejected or cancelled."""

    TYPE: ClassVar[EventType] = "run.finished"
    run_id: int
    status: str
    error: str = ""
    adapter_id: int | None = None


@dataclass(frozen=True)
class AdapterPromoted(_Typed):
    """An adapter version became the active one (training.registry); chat workers swap to it."""

    TYPE: ClassVar[EventType] = "adapter.promoted"
    version: str
    id: int
    path: str
    base_model: str = ""
    action: str = "promote"


@dataclass(frozen=True)
class AdapterSwapped(_Typed):
    """A chat worker now serves `version` (None: the base model); decode stalled `stall_ms`."""

    TYPE: ClassVar[EventType] = "adapter.swapped"
    worker: str
    version: str | None
    stall_ms: float = 0.0


@dataclass(frozen=True)
class AdapterRefused(_Typed):
    """A chat worker would not load `version` and goes on serving `serving`."""

    TYPE: ClassVar[EventType] = "adapter.refused"
    worker: str
    version: str | None
    reason: str
    serving: str | None = None


@dataclass(frozen=True)
class WorkerOnline(_Typed):
    """A chat worker started, or the bot's heartbeat (kind "bot")."""

    TYPE: ClassVar[EventType] = "worker.online"
    worker: str
    kind: Literal["chat", "bot"]
    model: str = ""
    adapter: str | None = None
    host: str = ""
    username: str | None = None
    gpu_memory_used_mb: int | None = None
    gpu_memory_total_mb: int | None = None
    kv_rows: int | None = None  # a chat worker's KV rows, and what its KV reuse pool keeps
    prefix_chats: int | None = None
    prefix_tokens: int | None = None


@dataclass(frozen=True)
class GpuRelease(_Typed):
    """Training asks the chat workers on `host` to free the GPU for about `eta_s` seconds."""

    TYPE: ClassVar[EventType] = "gpu.release"
    host: str = ""  # empty: every host
    eta_s: float | None = None
    run_id: int | None = None


@dataclass(frozen=True)
class GpuReclaim(_Typed):
    """Training on `host` is done; its chat workers load the model again."""

    TYPE: ClassVar[EventType] = "gpu.reclaim"
    host: str = ""
    run_id: int | None = None


AnyEvent = (RunProgress | RunFinished | AdapterPromoted | AdapterSwapped | AdapterRefused | WorkerOnline
            | GpuRelease | GpuReclaim)
TYPES: dict[str, type[_Typed]] = {cls.TYPE: cls for cls in get_args(AnyEvent)}


def decode(event: Event) -> AnyEvent:
    """The dataclass of an envelope, its data validated (extra keys ignored); EventDataError if it does not fit."""
    cls = TYPES[event.type]
    try:
        typed = cast(AnyEvent, TypeAdapter(cls).validate_python(event.data))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors())
        raise EventDataError(f"{event.type} event: {problems}") from None
    return typed


def from_json(text: str | bytes) -> AnyEvent:
    """The typed event of one JSON envelope (what `to_json` wrote)."""
    return decode(Event.model_validate_json(text))


def publish(client: redis.Redis, event: AnyEvent | EventType, **data: Any) -> Event:
    """Publish a typed event (or a type name with raw, unchecked data) and keep it in the short history."""
    envelope = event.envelope() if isinstance(event, _Typed) else Event(type=event, data=data)
    text = envelope.model_dump_json()
    client.publish(CHANNEL, text)
    # Keep a short history so the admin can show recent events and late readers can catch up.
    client.xadd(EVENT_LOG, {"event": text}, maxlen=1000, approximate=True)
    return envelope


def recent(client: redis.Redis, count: int = 50) -> list[Event]:
    """The latest `count` envelopes, newest first."""
    entries = client.xrevrange(EVENT_LOG, count=count)
    return [Event.model_validate_json(fields[b"event"]) for _id, fields in entries]


def subscribe(client: redis.Redis, *, timeout: float = 1.0) -> Iterator[Event | None]:
    """Yield envelopes as they come; yields None every `timeout` seconds so callers can stop."""
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
