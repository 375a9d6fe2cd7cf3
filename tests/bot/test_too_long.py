"""A message longer than the context budget: the user is told it is too long and about how long
it may be (by the bot before enqueueing when that is certain, else from the worker's count)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from personabot.bot.length import max_message_chars
from personabot.bot.memory import history_key
from personabot.bot.replies import FAILED_TEXT, PENDING_KEY
from personabot.core.store import Store
from tests.bot.fake_bot_api import FakeBotApi
from tests.bot.harness import queued_chat_requests, running_bot, texts, until
from tests.workers.conftest import ChatWorker

TOO_LONG = re.compile(r"too long for me.*shorten it to about (\d+) characters")


def suggested_chars(text: str) -> int:
    match = TOO_LONG.search(text)
    assert match is not None, f"not a too-long answer: {text!r}"
    return int(match.group(1))


async def test_bot_refuses_what_cannot_fit_before_enqueueing(settings_env, fake_api: FakeBotApi,  # type: ignore[no-untyped-def]
                                                              redis_server, store: Store) -> None:
    settings = settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                            redis_url=redis_server.url, database_url=store.url,
                            context_tokens=256, max_new_tokens=64, reply_timeout_s=1)
    chat = fake_api.private_chat(42)
    assert max_message_chars(settings) < 2000
    async with running_bot(settings, store):
        long = fake_api.user_says(chat, "x" * 2000)
        await until(lambda: texts(fake_api, 42), what="the answer to the long message")
        fake_api.user_says(chat, "a short one")
        await until(lambda: queued_chat_requests(settings.redis_url), what="the short one queued")
    answer = fake_api.bot_messages(42)[0]
    assert answer.reply_to == long["message_id"]
    assert 100 <= suggested_chars(answer.text) < 2000
    assert [r["messages"][-1]["content"] for r in queued_chat_requests(settings.redis_url)] == [
        "a short one"], "the long message never reached the queue"


@pytest.mark.slow
async def test_worker_count_answers_too_long_not_generic(settings_env, fake_api: FakeBotApi,  # type: ignore[no-untyped-def]
                                                         redis_server, store: Store,
                                                         tiny_model: Path, tmp_path: Path) -> None:
    # The bot and the worker share the budget: 512 context tokens, 256 of them for the prompt.
    settings = settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                            redis_url=redis_server.url, database_url=store.url,
                            context_tokens=512, reply_timeout_s=60)
    message = " ".join(f"word{i}" for i in range(200))  # ~1,200 characters, far over 256 tokens
    assert len(message) < max_message_chars(settings), "the bot's estimate lets it through"
    worker = ChatWorker(redis_server.url, store.url, tiny_model, tmp_path / "worker",
                        name="longchat", env={"PERSONABOT_CONTEXT_TOKENS": "512"}).start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        chat = fake_api.private_chat(42)
        async with running_bot(settings, store):
            fake_api.user_says(chat, message)
            await until(lambda: texts(fake_api, 42) and client.hlen(PENDING_KEY) == 0,
                        timeout=60, what="the answer")
        [answer] = texts(fake_api, 42)
        assert FAILED_TEXT not in answer
        assert 10 <= suggested_chars(answer) < len(message)
        assert client.llen(history_key(42)) == 0, "nothing to remember"
    finally:
        client.close()
        worker.stop()
