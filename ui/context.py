"""What every admin tab shares: settings, the store, Redis, the Celery app, and who is acting."""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import redis
from celery import Celery
from kombu.exceptions import KombuError

from personabot.core.settings import Settings
from personabot.core.store import Store

# What talking to Redis or the workers may raise; handlers turn these into a message, not a crash.
LIVE_ERRORS = (TimeoutError, RuntimeError, OSError, KombuError, redis.RedisError)


@dataclass
class AdminContext:
    """Connections the handlers use; Redis and Celery are opened on first use."""

    settings: Settings
    store: Store
    _redis: redis.Redis | None = field(default=None, repr=False)
    _celery: Celery | None = field(default=None, repr=False)

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=3)
        return self._redis

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            from personabot.workers.app import make_celery

            self._celery = make_celery(self.redis_url)
        return self._celery

    @property
    def redis_url(self) -> str:
        if not self.settings.redis_url:
            raise RuntimeError(
                "no Redis is configured; start the UI with `personabot up` or set PERSONABOT_REDIS_URL"
            )
        return self.settings.redis_url

    @functools.cached_property
    def registry(self) -> Any:
        from personabot.training.registry import AdapterRegistry

        return AdapterRegistry(self.store, self.settings.adapters_path, self.redis)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        self.store.close()


def actor(request: gr.Request | None) -> str:
    """The logged-in admin who clicked, for the audit log."""
    user = getattr(request, "username", None) if request is not None else None
    return f"admin:{user}" if user else "admin"


def notice(text: str, *, ok: bool = True) -> str:
    """A one-line status message shown under a form (HTML-escaped)."""
    css = "pb-ok" if ok else "pb-error"
    return f'<div class="pb-note {css}">{html.escape(text)}</div>'
