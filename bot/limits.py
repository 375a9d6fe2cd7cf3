"""Per-user rate limit (Redis, shared by bot instances) and per-chat pacing of outgoing messages."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from telegram.ext import AIORateLimiter

RATE_PREFIX = "personabot:bot:rate:"
WINDOW_S = 60.0
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
    """A token bucket per chat for what AIORateLimiter does not enforce: Telegram's per-chat limit.

    `acquire` waits for a token (final messages); `try_acquire` takes one only if available
    (intermediate stream updates are skipped rather than queued).
    """

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self._buckets: dict[int, tuple[float, float]] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def _level(self, chat_id: int, now: float) -> float:
        tokens, at = self._buckets.get(chat_id, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def try_acquire(self, chat_id: int) -> bool:
        now = time.monotonic()
        tokens = self._level(chat_id, now)
        if tokens < 1.0:
            return False
        self._buckets[chat_id] = (tokens - 1.0, now)
        return True

    async def acquire(self, chat_id: int) -> None:
        lock = self._locks.setdefault(chat_id, asyncio.Lock())
        async with lock:
            while not self.try_acquire(chat_id):
                now = time.monotonic()
                await asyncio.sleep((1.0 - self._level(chat_id, now)) / self.rate)

    def forget_idle(self) -> None:
        """Drop full buckets so memory stays bounded over many chats."""
        now = time.monotonic()
        for chat_id in [c for c in self._buckets if self._level(c, now) >= self.burst]:
            self._buckets.pop(chat_id, None)
            lock = self._locks.get(chat_id)
            if lock is not None and not lock.locked():
                self._locks.pop(chat_id, None)


class ChatRateLimiter(AIORateLimiter):
    """AIORateLimiter (bot-wide and group limits, retries after 429) plus Telegram's limit of
    about one message per second in each private chat, which AIORateLimiter leaves out."""

    PACED = frozenset({"sendMessage", "editMessageText", "sendPhoto", "sendDocument",
                       "sendSticker", "sendVoice", "forwardMessage", "copyMessage"})

    def __init__(self, private: ChatPacer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.private = private

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
        with contextlib.suppress(TypeError, ValueError):
            chat_id = int(data.get("chat_id"))  # type: ignore[arg-type]
        if endpoint in self.PACED and chat_id is not None and chat_id > 0:
            await self.private.acquire(chat_id)
        return await super().process_request(callback, args, kwargs, endpoint, data,
                                             rate_limit_args)
