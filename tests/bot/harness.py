"""Run the real PTB Application against the fake Bot API inside a test's event loop."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis
from telegram.ext import Application

from personabot.bot.app import build_application
from personabot.core.settings import Settings
from personabot.core.store import Store
from tests.bot.fake_bot_api import FakeBotApi


@asynccontextmanager
async def running_bot(settings: Settings, store: Store, **kwargs: Any) -> AsyncIterator[Application]:  # type: ignore[type-arg]
    """Initialize, run post_init, poll (1 s long polls), and shut down cleanly afterwards."""
    application = build_application(settings, store=store, **kwargs)
    await application.initialize()
    assert application.post_init is not None
    await application.post_init(application)
    assert application.updater is not None
    await application.updater.start_polling(poll_interval=0, timeout=1)
    await application.start()
    try:
        yield application
    finally:
        await application.updater.stop()
        await application.stop()
        await application.shutdown()
        assert application.post_shutdown is not None
        await application.post_shutdown(application)


async def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Await `predicate()` becoming truthy (without blocking the bot in the same loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def queued_chat_requests(redis_url: str) -> list[dict[str, Any]]:
    """The ChatRequests waiting on Celery's `chat` queue (kombu's JSON envelope, decoded)."""
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange("chat", 0, -1)
    finally:
        client.close()
    requests = []
    for item in raw:
        envelope = json.loads(item)
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        requests.append(args[0])
    return sorted(requests, key=lambda r: r["created_at"])


def texts(api: FakeBotApi, chat_id: int) -> list[str]:
    """The bot's messages in a chat, oldest first."""
    return [m.text for m in sorted(api.bot_messages(chat_id), key=lambda m: m.message_id)]
