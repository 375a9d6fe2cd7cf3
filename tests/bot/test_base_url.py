"""PERSONABOT_TELEGRAM_BASE_URL: a self-hosted server's plain address works; bad ones are refused clearly."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from personabot.core.settings import Settings
from personabot.core.store import Store
from tests.bot.fake_bot_api import FakeBotApi
from tests.bot.harness import running_bot, until


@pytest.mark.parametrize(("given", "expected"), [
    ("http://host:8081", "http://host:8081/bot"),
    ("http://host:8081/", "http://host:8081/bot"),
    ("https://api.telegram.org/bot", "https://api.telegram.org/bot"),
    ("https://api.telegram.org/bot/", "https://api.telegram.org/bot"),
])
def test_base_url_gets_bot_suffix(given: str, expected: str) -> None:
    assert Settings(telegram_base_url=given).telegram_base_url == expected


@pytest.mark.parametrize("given", ["host:8081", "ftp://host", "http://host:8081/bot?x=1"])
def test_bad_base_url_is_refused(given: str) -> None:
    with pytest.raises(ValidationError, match="telegram_base_url"):
        Settings(telegram_base_url=given)


async def test_bot_runs_on_plain_server_address(settings_env, fake_api: FakeBotApi, redis_server,  # type: ignore[no-untyped-def]
                                                store: Store) -> None:
    plain = fake_api.base_url.removesuffix("/bot")
    settings = settings_env(telegram_token=fake_api.token, telegram_base_url=plain,
                            redis_url=redis_server.url, database_url=store.url)
    chat = fake_api.private_chat(7)
    async with running_bot(settings, store):
        fake_api.user_says(chat, "/help")
        await until(lambda: fake_api.bot_messages(7), what="/help answer via the plain address")
