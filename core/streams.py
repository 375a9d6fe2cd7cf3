"""Reply streams: one Redis Stream per chat request, written by the chat worker, read by anyone."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from personabot.core import keys
from personabot.core.schemas import ChatResult


def stream_key(request_id: str) -> str:
    return keys.REPLY + request_id


def cancel_key(request_id: str) -> str:
    return keys.CANCEL + request_id


@dataclass
class StreamEntry:
    """One entry: kind is 'token' (text holds the new piece), 'final' (result set) or 'error'."""

    id: str
    kind: str
    text: str = ""
    result: ChatResult | None = None


class ReplyStreamWriter:
    """Used by the chat worker. Entries: {"k": "token", "t": text} ... then one "final"."""

    def __init__(self, client: redis.Redis, request_id: str, ttl_s: int) -> None:
        self.client = client
        self.key = stream_key(request_id)
        self.ttl_s = ttl_s

    def reset(self) -> None:
        """Start over (a redelivered request regenerates its reply from the beginning)."""
        pipe = self.client.pipeline()
        pipe.delete(self.key)
        pipe.xadd(self.key, {"k": "reset"})
        pipe.expire(self.key, self.ttl_s)
        pipe.execute()

    def token(self, text: str) -> None:
        if text:
            self.client.xadd(self.key, {"k": "token", "t": text})

    def final(self, result: ChatResult) -> None:
        pipe = self.client.pipeline()
        pipe.xadd(self.key, {"k": "final", "r": result.model_dump_json()})
        pipe.expire(self.key, self.ttl_s)
        pipe.execute()


def is_finished(client: redis.Redis, request_id: str) -> bool:
    last = client.xrevrange(stream_key(request_id), count=1)
    return bool(last) and last[0][1].get(b"k") == b"final"


def request_cancel(client: redis.Redis, request_id: str, ttl_s: int = 600) -> None:
    client.set(cancel_key(request_id), "1", ex=ttl_s)


class _Cursor:
    """Where a reader of one reply stream is: the last entry seen, and when silence becomes a timeout."""

    def __init__(self, request_id: str, last_id: str, timeout_s: float, block_ms: int) -> None:
        self.request_id, self.key, self.last_id = request_id, stream_key(request_id), last_id
        self.timeout_s, self.block_ms = timeout_s, block_ms
        self.deadline = time.monotonic() + timeout_s
        self.done = False

    def block(self) -> int:
        """Milliseconds the next XREAD may block; TimeoutError once the reply has been silent too long."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no reply for request {self.request_id} within {self.timeout_s:.0f}s")
        return max(1, int(min(self.block_ms, remaining * 1000)))

    def take(self, response: Any) -> Iterator[StreamEntry]:
        """The entries of one XREAD answer worth yielding; `done` after the final one."""
        if not response:
            return
        self.deadline = time.monotonic() + self.timeout_s
        for entry_id, fields in response[0][1]:
            entry = parse_entry(entry_id, fields)
            self.last_id = entry.id
            if entry.kind:
                yield entry
            if entry.kind == "final":
                self.done = True
                return


def read_reply(
    client: redis.Redis, request_id: str, *, last_id: str = "0-0", timeout_s: float = 120.0,
    block_ms: int = 1000,
) -> Iterator[StreamEntry]:
    """Yield entries from `last_id` on until the final one (or until timeout_s passes with none).

    A reader that reconnects passes the id of the last entry it saw and misses nothing. A
    'reset' entry (the request was redelivered) yields kind 'reset': drop the text so far.
    """
    cursor = _Cursor(request_id, last_id, timeout_s, block_ms)
    while not cursor.done:
        yield from cursor.take(client.xread({cursor.key: cursor.last_id}, count=256, block=cursor.block()))


async def aread_reply(
    client: aioredis.Redis, request_id: str, *, last_id: str = "0-0", timeout_s: float = 120.0,
    block_ms: int = 1000,
) -> AsyncIterator[StreamEntry]:
    """`read_reply` over redis.asyncio, for readers that live in an event loop (the bot)."""
    cursor = _Cursor(request_id, last_id, timeout_s, block_ms)
    while not cursor.done:
        for entry in cursor.take(await client.xread({cursor.key: cursor.last_id}, count=256, block=cursor.block())):
            yield entry


def parse_entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEntry:
    """One raw stream entry; kind "" for entries a reader should skip."""
    last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    kind = fields.get(b"k", b"").decode()
    if kind == "token":
        return StreamEntry(last_id, "token", text=fields[b"t"].decode("utf-8"))
    if kind == "final":
        return StreamEntry(last_id, "final", result=ChatResult.model_validate_json(fields[b"r"]))
    if kind == "reset":
        return StreamEntry(last_id, "reset")
    return StreamEntry(last_id, "")
