"""Login throttling and response hardening for the admin guard: failure limits, headers, cookies."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from typing import Any

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
     b"img-src 'self' data: blob:; media-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
     b"frame-ancestors 'none'; base-uri 'self'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


def harden_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """No CORS grants (same origin only), session cookies SameSite=Lax, security headers added."""
    out = []
    for name, value in headers:
        lower = name.lower()
        if lower.startswith(b"access-control-allow-") or lower in {h for h, _ in SECURITY_HEADERS}:
            continue
        if lower == b"set-cookie":
            value = value.replace(b"SameSite=none", b"SameSite=Lax").replace(b"SameSite=None", b"SameSite=Lax")
            value = value.replace(b"samesite=none", b"SameSite=Lax")
        out.append((name, value))
    return out + SECURITY_HEADERS


class LoginThrottle:
    """Failed-login limits per client and for all clients, with an exponential backoff."""

    def __init__(self, *, per_client: int = 5, global_limit: int = 50, window_s: float = 300.0,
                 max_backoff_s: float = 300.0) -> None:
        self.per_client, self.global_limit, self.window_s = per_client, global_limit, window_s
        self.max_backoff_s = max_backoff_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._all: deque[float] = deque()
        self._lock = threading.Lock()

    def _trim(self, times: deque[float], now: float) -> None:
        while times and now - times[0] > self.window_s:
            times.popleft()

    def retry_after(self, client: str) -> float:
        """Seconds this client must wait before its next attempt; 0 = it may try now."""
        now = time.monotonic()
        with self._lock:
            mine = self._failures[client]
            self._trim(mine, now)
            self._trim(self._all, now)
            waits = [0.0]
            if len(mine) >= self.per_client:
                backoff = min(self.max_backoff_s, 2.0 ** (len(mine) - self.per_client + 1))
                waits.append(mine[-1] + backoff - now)
            if len(self._all) >= self.global_limit:
                waits.append(self._all[-1] + 1.0 - now)
            return max(waits)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures[client].append(now)
            self._all.append(now)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


class SessionClock:
    """When each Gradio session token was first seen; tokens older than `ttl_s` are expired."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._seen: dict[str, float] = {}

    def valid(self, token: str, tokens: dict[str, Any]) -> bool:
        now = time.monotonic()
        first = self._seen.setdefault(token, now)
        if now - first <= self.ttl_s:
            return True
        tokens.pop(token, None)
        self._seen.pop(token, None)
        return False
