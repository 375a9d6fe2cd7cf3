"""Bot test fixtures: the strict fake Bot API server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.bot.fake_bot_api import FakeBotApi


@pytest.fixture()
def fake_api() -> Iterator[FakeBotApi]:
    """A fresh fake Telegram Bot API on 127.0.0.1 (its own thread); `.base_url` for PTB."""
    server = FakeBotApi().start()
    yield server
    server.stop()
