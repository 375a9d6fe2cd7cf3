"""Per-user rate limit (Redis, shared by bot instances) and per-chat pacing of outgoing messages."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from telegram.ext import AIORateLimiter

from personabot.core import keys

RATE_PREFIX = keys.BOT_RATE
WINDOW_S = 60.0
MAX_IDLE_BUCKETS = 1024
# Atomic check-and-count, so concurrent messages of one user cannot all slip through.
_SLIDING_WINDOW = """
local key, now, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, 0, now - window)
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('EXPIRE', key, math.ceil(window) + 1)
  return {1, '0'}
end
return {0, redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]}
"""


@dataclass
class RateDecision:
    """allowed; otherwise retry_after_s says when the oldest message leaves the window and
    notify says whether this is the first refusal in the window (answer politely only once)."""

    allowed: bool
    retry_after_s: float = 0.0
    notify: bool = False


class UserRateLimiter:
    """At most `per_minute` messages per user in any sliding 60-second window."""

    def __init__(self, client: aioredis.Redis, per_minute: int) -> None:
        self.client = client
        self.per_minute = per_minute
        self._script = client.register_script(_SLIDING_WINDOW)

    async def check(self, user_id: int) -> RateDecision:
        key = f"{RATE_PREFIX}{user_id}"
        now = time.time()
        allowed, oldest = await self._script(keys=[key], args=[now, WINDOW_S, self.per_minute,
                                                                uuid.uuid4().hex])
        if allowed:
            return RateDecision(True)
        retry_after = max(1.0, float(oldest) + WINDOW_S - now)
        first = await self.client.set(f"{key}:told", "1", nx=True, ex=max(1, int(retry_after)))
        return RateDecision(False, retry_after_s=retry_after, notify=bool(first))


class ChatPacer:
    """A token bucket per chat, spent when a request *finishes*, with one request at a time per
    chat: the next one starts at least 1/rate after the previous one was sent, whatever
    queueing happened in between (Telegram measures when requests arrive)."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self._buckets: dict[int, tuple[float, float]] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def _level(self, chat_id: int, now: float) -> float:
        tokens, at = self._buckets.get(chat_id, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def ready(self, chat_id: int) -> bool:
        """Would a request in this chat go out now, without waiting?"""
        lock = self._locks.get(chat_id)
        return (lock is None or not lock.locked()) and self._level(chat_id, time.monotonic()) >= 1

    @contextlib.asynccontextmanager
    async def slot(self, chat_id: int) -> AsyncIterator[None]:
        """Wait for this chat's turn and a token; the token is spent when the block ends."""
        if len(self._buckets) > MAX_IDLE_BUCKETS:
            self.forget_idle()
        lock = self._locks.setdefault(chat_id, asyncio.Lock())
        async with lock:
            while (level := self._level(chat_id, time.monotonic())) < 1.0:
                await asyncio.sleep((1.0 - level) / self.rate)
            try:
                yield
            finally:
                now = time.monotonic()
                self._buckets[chat_id] = (self._level(chat_id, now) - 1.0, now)

    def forget_idle(self) -> None:
        """Drop full buckets so memory stays bounded over many chats."""
        now = time.monotonic()
        for chat_id in [c for c in self._buckets if self._level(c, now) >= self.burst]:
            lock = self._locks.get(chat_id)
            if lock is None or not lock.locked():
                self._buckets.pop(chat_id, None)
                self._locks.pop(chat_id, None)


class ChatRateLimiter(AIORateLimiter):
    """AIORateLimiter (bot-wide 30/s and 20/min per group, retries after 429) plus the
    per-chat pacing it leaves out: about one message per second in each chat."""

    PACED = frozenset({"sendMessage", "editMessageText", "sendPhoto", "sendDocument",
                       "sendSticker", "sendVoice", "forwardMessage", "copyMessage"})
    # Bot-wide sends per second kept free for replies: best-effort traffic (typing, drafts,
    # intermediate edits) only goes out while this much room is left.
    RESERVED = 10

    def __init__(self, private: ChatPacer, group: ChatPacer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.private = private
        self.group = group

    def pacer(self, chat_id: int) -> ChatPacer:
        return self.private if chat_id > 0 else self.group

    def has_room(self) -> bool:
        """Is there bot-wide room for a best-effort request right now?"""
        limiter = self._base_limiter
        return limiter is None or limiter.has_capacity(self.RESERVED)

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        chat_id = None
        with contextlib.suppress(KeyError, TypeError, ValueError):
            chat_id = int(data["chat_id"])
        if endpoint not in self.PACED or chat_id is None:
            return await super().process_request(callback, args, kwargs, endpoint, data,
                                                 rate_limit_args)
        async with self.pacer(chat_id).slot(chat_id):
            return await super().process_request(callback, args, kwargs, endpoint, data,
                                                 rate_limit_args)
