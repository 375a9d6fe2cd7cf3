"""Telegram's flood control for the fake Bot API: token buckets that answer 429 with retry_after.

Telegram publishes only approximations; these are the documented ones: private chats 1
message/s with short bursts (3), groups 20 messages/min, 30 messages/s bot-wide; drafts (not
documented) 3/s per chat with bursts of 5. Messages are sendMessage and editMessageText; drafts
count towards the bot-wide limit too.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


class ApiError(Exception):
    """A Bot API error answer: HTTP code, Telegram's description, retry_after for 429."""

    def __init__(self, code: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.retry_after = retry_after


@dataclass
class FloodRules:
    """Rates (per second unless named) and burst sizes of the buckets."""

    private_per_s: float = 1.0
    private_burst: float = 3.0
    group_per_min: float = 20.0
    global_per_s: float = 30.0
    draft_per_s: float = 3.0
    draft_burst: float = 5.0


class Bucket:
    """A token bucket: `capacity` tokens, refilled at `rate` per second."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens, self.at = capacity, time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class FloodControl:
    """Every bucket of one fake server; `check` takes a token from each or raises 429."""

    def __init__(self, rules: FloodRules) -> None:
        self.rules = rules
        self._buckets: dict[tuple[str, int], Bucket] = {}
        self._lock = threading.Lock()

    def check(self, chat_id: int, *, draft: bool = False) -> None:
        rules = self.rules
        checks = [("global", 0, rules.global_per_s, rules.global_per_s)]
        if draft:
            checks.append(("draft", chat_id, rules.draft_per_s, rules.draft_burst))
        elif chat_id > 0:
            checks.append(("chat", chat_id, rules.private_per_s, rules.private_burst))
        else:
            checks.append(("chat", chat_id, rules.group_per_min / 60.0, rules.group_per_min))
        with self._lock:
            buckets = [self._buckets.setdefault((kind, key), Bucket(rate, burst))
                       for kind, key, rate, burst in checks]
            waits = [bucket.take() for bucket in buckets]
            if any(waits):
                for bucket, wait in zip(buckets, waits, strict=True):
                    if not wait:
                        bucket.tokens += 1.0  # nothing was sent: give the token back
                retry = max(1, math.ceil(max(waits)))
                raise ApiError(429, f"Too Many Requests: retry after {retry}", retry)
