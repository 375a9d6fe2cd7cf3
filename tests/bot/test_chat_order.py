"""Per-chat order with a real chat worker: a rate-limited message in a burst neither blocks nor
reorders the others; rate decisions, replies and their histories follow arrival order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from personabot.bot.limits import RATE_PREFIX
from personabot.bot.memory import history_key
from personabot.bot.replies import PENDING_KEY, ReplyTimings
from personabot.core.schemas import Message
from personabot.core.settings import Settings
from personabot.core.store import Store
from tests.bot.fake_bot_api import FakeBotApi
from tests.bot.harness import running_bot, until
from tests.workers.conftest import ChatWorker

pytestmark = pytest.mark.slow

# Short replies and room for the whole history in the prompt.
WORKER_ENV = {"PERSONABOT_MAX_NEW_TOKENS": "24", "PERSONABOT_TEMPERATURE": "0",
              "PERSONABOT_CONTEXT_TOKENS": "4096"}
POLITE = "a bit fast"


@pytest.fixture()
def late_worker(redis_server, store: Store, tiny_model: Path, tmp_path: Path) -> Iterator[ChatWorker]:  # type: ignore[no-untyped-def]
    """A chat worker the test starts (`await asyncio.to_thread(worker.start)`) once the burst
    is in: until then every accepted request waits, as behind a slow reply."""
    worker = ChatWorker(redis_server.url, store.url, tiny_model, tmp_path / "worker",
                        name="orderchat", concurrency=4, env=WORKER_ENV)
    yield worker
    worker.stop()


def order_settings(settings_env, fake_api: FakeBotApi, redis_server, store: Store,  # type: ignore[no-untyped-def]
                   per_minute: int) -> Settings:
    return settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                        redis_url=redis_server.url, database_url=store.url, reply_timeout_s=120,
                        rate_limit_per_minute=per_minute, history_tokens=100_000)


def pending_count(client: redis.Redis) -> int:
    return int(client.hlen(PENDING_KEY))


def replied_to(api: FakeBotApi, chat_id: int) -> list[int]:
    """The user messages the bot's answers (not its rate notes) replied to, in delivery order."""
    messages = sorted(api.bot_messages(chat_id), key=lambda m: m.message_id)
    return [m.reply_to for m in messages if POLITE not in m.text and m.reply_to is not None]


def remembered(client: redis.Redis, chat_id: int) -> list[Message]:
    return [Message.model_validate_json(m) for m in client.lrange(history_key(chat_id), 0, -1)]


def assert_in_order(results: list[ReplyTimings], memory: list[Message], questions: list[str]) -> None:
    """Replies produced in arrival order, each with the turns before it in its prompt."""
    assert [m.content for m in memory if m.role == "user"] == questions
    generations = [r.generation for r in results]
    assert all(g is not None and g.finish_reason in ("stop", "length") for g in generations)
    replies = [m.content for m in memory if m.role == "assistant"]
    assert [g.text for g in generations] == replies  # type: ignore[union-attr]
    prompts = [g.prompt_tokens for g in generations]  # type: ignore[union-attr]
    assert prompts == sorted(set(prompts)), f"each prompt holds the turns before it: {prompts}"


async def test_private_burst_with_a_refused_message(settings_env, fake_api: FakeBotApi, redis_server,  # type: ignore[no-untyped-def]
                                                    store: Store, late_worker: ChatWorker) -> None:
    settings = order_settings(settings_env, fake_api, redis_server, store, per_minute=3)
    chat = fake_api.private_chat(42)
    client = redis.Redis.from_url(redis_server.url)
    results: list[ReplyTimings] = []
    try:
        # One earlier message still counts: two of the burst fit in the window, the third does not.
        client.zadd(f"{RATE_PREFIX}42", {"earlier": time.time()})
        async with running_bot(settings, store, on_timings=results.append):
            burst = [fake_api.user_says(chat, f"burst message {i}") for i in range(3)]
            await until(lambda: any(POLITE in m.text for m in fake_api.bot_messages(42)),
                        what="the rate note")
            await until(lambda: pending_count(client) == 2, what="two accepted messages")
            client.zrem(f"{RATE_PREFIX}42", "earlier")  # room again: the next message is allowed
            later = fake_api.user_says(chat, "a later message")
            await until(lambda: pending_count(client) == 3, what="the later message accepted")
            await asyncio.to_thread(late_worker.start)
            await until(lambda: len(results) == 3, timeout=120, what="three replies")
        [note] = [m for m in fake_api.bot_messages(42) if POLITE in m.text]
        assert note.reply_to == burst[2]["message_id"], "the third message of the burst was refused"
        assert replied_to(fake_api, 42) == [burst[0]["message_id"], burst[1]["message_id"],
                                           later["message_id"]]
        assert_in_order(results, remembered(client, 42),
                        ["burst message 0", "burst message 1", "a later message"])
    finally:
        client.close()


async def test_group_burst_with_a_refused_message(settings_env, fake_api: FakeBotApi, redis_server,  # type: ignore[no-untyped-def]
                                                  store: Store, late_worker: ChatWorker) -> None:
    settings = order_settings(settings_env, fake_api, redis_server, store, per_minute=2)
    group = fake_api.group_chat(-500)
    alice, bob = fake_api.user(1, "Alice"), fake_api.user(2, "Bob")
    client = redis.Redis.from_url(redis_server.url)
    results: list[ReplyTimings] = []
    try:
        async with running_bot(settings, store, on_timings=results.append):
            said: list[dict[str, Any]] = [
                fake_api.user_says(group, f"@persona_bot {text}", user=user)
                for text, user in [("A1", alice), ("A2", alice), ("A3", alice), ("B1", bob)]]
            await until(lambda: any(POLITE in m.text for m in fake_api.bot_messages(-500)),
                        what="the rate note")
            await until(lambda: pending_count(client) == 3, what="three accepted messages")
            await asyncio.to_thread(late_worker.start)
            await until(lambda: len(results) == 3, timeout=120, what="three replies")
        [note] = [m for m in fake_api.bot_messages(-500) if POLITE in m.text]
        assert note.reply_to == said[2]["message_id"], "Alice's third message was refused"
        assert replied_to(fake_api, -500) == [said[0]["message_id"], said[1]["message_id"],
                                             said[3]["message_id"]]
        assert_in_order(results, remembered(client, -500), ["A1", "A2", "B1"])
    finally:
        client.close()
