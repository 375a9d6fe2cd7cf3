"""Bot test fixtures: the strict fake Bot API server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from personabot.core.store import Store
from tests.bot.fake_bot_api import FakeBotApi


@pytest.fixture()
def fake_api() -> Iterator[FakeBotApi]:
    """A fresh fake Telegram Bot API on 127.0.0.1 (its own thread); `.base_url` for PTB."""
    server = FakeBotApi().start()
    yield server
    server.stop()


@pytest.fixture()
def settings(settings_env, fake_api: FakeBotApi, redis_server, store):  # type: ignore[no-untyped-def]
    """Settings for a bot on the fake Bot API, a private Redis and the test module's `store`."""
    return settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                        redis_url=redis_server.url, database_url=store.url, reply_timeout_s=1.5)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh SQLite store per test."""
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()
