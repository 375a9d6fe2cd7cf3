"""Sustained flood control (more 429s than PTB retries): a finished reply is delivered when the
flood wait ends, and past PERSONABOT_FLOOD_WAIT_MAX_S it stays owed for the next start."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from personabot.bot.handlers import ERROR_TEXT
from personabot.bot.replies import PENDING_KEY, ReplyTimings
from personabot.core.store import Store
from tests.bot.fake_bot_api import FakeBotApi
from tests.bot.harness import running_bot, until
from tests.bot.test_streaming import shown, visible_pieces
from tests.workers.conftest import ChatWorker

pytestmark = pytest.mark.slow

WORKER_ENV = {"PERSONABOT_MAX_NEW_TOKENS": "24", "PERSONABOT_TEMPERATURE": "0",
              "PERSONABOT_CONTEXT_TOKENS": "4096"}
PTB_ATTEMPTS = 4  # the bot's PTB rate limiter: one try and three retries after a 429


@pytest.fixture()
def worker(redis_server, store: Store, tiny_model: Path, tmp_path: Path) -> Iterator[ChatWorker]:  # type: ignore[no-untyped-def]
    started = ChatWorker(redis_server.url, store.url, tiny_model, tmp_path / "worker",
                         name="floodchat", env=WORKER_ENV).start()
    yield started
    started.stop()


def flood(api: FakeBotApi, refusals: int) -> None:
    for _ in range(refusals):
        api.fail_next("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1)


def refused(api: FakeBotApi, chat_id: int) -> int:
    return sum(r.error_code == 429 for r in api.requests("sendMessage", chat_id=chat_id))


async def test_reply_waits_out_a_sustained_flood(settings_env, fake_api: FakeBotApi, redis_server,  # type: ignore[no-untyped-def]
                                                 store: Store, worker: ChatWorker) -> None:
    settings = settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                            redis_url=redis_server.url, database_url=store.url, reply_timeout_s=60)
    chat = fake_api.private_chat(42)
    results: list[ReplyTimings] = []
    async with running_bot(settings, store, on_timings=results.append):
        flood(fake_api, PTB_ATTEMPTS + 2)  # more than PTB's retries
        fake_api.user_says(chat, "hello there")
        await until(lambda: results, timeout=60, what="the reply, after the flood")
    reply = results[0].generation.text  # type: ignore[union-attr]
    assert refused(fake_api, 42) == PTB_ATTEMPTS + 2
    assert shown(fake_api, 42) == visible_pieces(reply)
    assert ERROR_TEXT not in shown(fake_api, 42)


async def test_past_the_bound_the_reply_stays_owed(settings_env, fake_api: FakeBotApi, redis_server,  # type: ignore[no-untyped-def]
                                                   store: Store, worker: ChatWorker) -> None:
    settings = settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                            redis_url=redis_server.url, database_url=store.url, reply_timeout_s=60,
                            flood_wait_max_s=2)
    chat = fake_api.private_chat(42)
    client = redis.Redis.from_url(redis_server.url)
    results: list[ReplyTimings] = []
    try:
        async with running_bot(settings, store):
            flood(fake_api, PTB_ATTEMPTS)  # PTB's retries alone take longer than the bound
            fake_api.user_says(chat, "hello there")
            await until(lambda: refused(fake_api, 42) == PTB_ATTEMPTS, timeout=60,
                        what="the flooded reply")
            await asyncio.sleep(1.5)  # the bot gives up on this run
            assert client.hlen(PENDING_KEY) == 1, "the finished reply is still owed"
        assert shown(fake_api, 42) == []
        async with running_bot(settings, store, on_timings=results.append):
            await until(lambda: results, timeout=60, what="the owed reply at the next start")
        reply = results[0].generation.text  # type: ignore[union-attr]
        assert shown(fake_api, 42) == visible_pieces(reply)
        assert client.hlen(PENDING_KEY) == 0
    finally:
        client.close()
