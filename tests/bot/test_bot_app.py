"""The real PTB Application against the strict fake Bot API, with no chat worker running."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from telegram import Bot

from personabot.bot.handlers import (
    EDITED_TEXT,
    ERROR_TEXT,
    HELP_TEXT,
    NOT_ALLOWED_TEXT,
    UNSUPPORTED_TEXT,
)
from personabot.bot.memory import ChatMemory
from personabot.bot.replies import BUSY_TEXT
from personabot.bot.streaming import send_text
from personabot.core.settings import Settings
from personabot.core.store import Store
from personabot.core.streams import cancel_key
from tests.bot.fake_bot_api import FakeBotApi
from tests.bot.harness import queued_chat_requests, running_bot, until
from tests.bot.telegram_flood import FloodRules


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    s.update_persona(name="Ada", author="Lovelace Labs")
    yield s
    s.close()


def texts(api: FakeBotApi, chat_id: int) -> list[str]:
    return [m.text for m in api.bot_messages(chat_id)]


async def test_commands(settings: Settings, store: Store, fake_api: FakeBotApi) -> None:
    chat = fake_api.private_chat(42)
    async with running_bot(settings, store):
        assert [c["command"] for c in fake_api.commands] == ["start", "help", "reset", "stop", "about"]
        fake_api.user_says(chat, "/start")
        await until(lambda: texts(fake_api, 42), what="/start answer")
        assert "I'm Ada" in texts(fake_api, 42)[0]
        fake_api.user_says(chat, "/help")
        await until(lambda: HELP_TEXT in texts(fake_api, 42), what="/help answer")
        fake_api.user_says(chat, "/about")
        await until(lambda: any("Active version: base model" in t for t in texts(fake_api, 42)))
        adapter = store.add_adapter(name="v7", path="/adapters/v7", base_model="m", data_hash="h",
                                    eval_scores={}, eval_passed=True)
        store.set_active(adapter.id)
        fake_api.user_says(chat, "/about")
        await until(lambda: any("Active version: v7" in t for t in texts(fake_api, 42)))
        fake_api.user_says(chat, "/stop")
        await until(lambda: any("no reply being written" in t for t in texts(fake_api, 42)))


async def test_reset_forgets_history(settings: Settings, store: Store, fake_api: FakeBotApi,
                                     redis_server) -> None:  # type: ignore[no-untyped-def]
    client = aioredis.Redis.from_url(redis_server.url)
    memory = ChatMemory(client, turns=5, tokens=1000, ttl_s=60)
    await memory.add_turn(42, "my name is Bob", "hello Bob")
    chat = fake_api.private_chat(42)
    async with running_bot(settings, store):
        fake_api.user_says(chat, "/reset")
        await until(lambda: any("forgotten" in t for t in texts(fake_api, 42)))
    assert await memory.load(42) == []
    await client.aclose()


async def test_unsupported_messages(settings: Settings, store: Store, fake_api: FakeBotApi) -> None:
    chat = fake_api.private_chat(42)
    group = fake_api.group_chat(-500)
    async with running_bot(settings, store):
        fake_api.user_sends(group, {"sticker": {"file_id": "s1", "file_unique_id": "u1", "width": 1,
                                                "height": 1, "is_animated": False,
                                                "is_video": False, "type": "regular"}})
        fake_api.user_sends(chat, {"sticker": {"file_id": "s1", "file_unique_id": "u1", "width": 1,
                                               "height": 1, "is_animated": False,
                                               "is_video": False, "type": "regular"}})
        fake_api.user_sends(chat, {"photo": [{"file_id": "p", "file_unique_id": "p", "width": 1,
                                              "height": 1}]})
        fake_api.user_sends(chat, {"voice": {"file_id": "v", "file_unique_id": "v", "duration": 1}})
        await until(lambda: len(texts(fake_api, 42)) == 3, what="three explanations")
        fake_api.user_says(group, "@persona_bot /help")  # sync point: the group sticker is handled
        await until(lambda: fake_api.requests("sendChatAction", chat_id=-500))
    assert texts(fake_api, 42) == [UNSUPPORTED_TEXT] * 3
    assert UNSUPPORTED_TEXT not in texts(fake_api, -500)


async def test_allow_list(settings_env, fake_api: FakeBotApi, redis_server, store: Store) -> None:  # type: ignore[no-untyped-def]
    settings = settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                            redis_url=redis_server.url, database_url=store.url,
                            allow_users="42", allow_chats="42,-500")
    allowed, stranger = fake_api.private_chat(42), fake_api.private_chat(43, "Eve")
    other_group = fake_api.group_chat(-600)
    async with running_bot(settings, store):
        fake_api.user_says(other_group, "/help", user=fake_api.user(42))
        fake_api.user_says(stranger, "/help")
        fake_api.user_says(allowed, "/help")
        await until(lambda: texts(fake_api, 43) and texts(fake_api, 42))
    assert texts(fake_api, 43) == [NOT_ALLOWED_TEXT]
    assert texts(fake_api, 42) == [HELP_TEXT]
    assert texts(fake_api, -600) == []


async def test_group_answers_only_when_addressed(settings: Settings, store: Store,
                                                fake_api: FakeBotApi) -> None:
    group = fake_api.group_chat(-500)
    async with running_bot(settings, store):
        fake_api.user_says(group, "just chatting among humans")
        fake_api.user_says(group, "@someone_else what do you think")
        fake_api.user_says(group, "@persona_bot what is your name?")
        await until(lambda: BUSY_TEXT in texts(fake_api, -500), what="busy reply to the mention")
        bot_message = fake_api.bot_messages(-500)[0]
        fake_api.user_says(group, "and your age?", reply_to=bot_message.message_id)
        await until(lambda: texts(fake_api, -500).count(BUSY_TEXT) == 2, what="reply to a reply")
    questions = [r["messages"][-1]["content"] for r in queued_chat_requests(settings.redis_url)]
    assert questions == ["what is your name?", "and your age?"]
    assert fake_api.bot_messages(-500)[0].reply_to is not None


async def test_worker_down_gives_busy_message(settings: Settings, store: Store,
                                              fake_api: FakeBotApi, redis_server) -> None:  # type: ignore[no-untyped-def]
    chat = fake_api.private_chat(42)
    async with running_bot(settings, store):
        fake_api.user_says(chat, "hello?")
        await until(lambda: texts(fake_api, 42), what="an answer despite no worker")
    assert texts(fake_api, 42) == [BUSY_TEXT]
    assert fake_api.requests("sendChatAction", chat_id=42), "typing while queued"
    [request] = queued_chat_requests(settings.redis_url)
    assert request["source"] == "telegram" and request["chat_id"] == "42"
    import redis

    client = redis.Redis.from_url(redis_server.url)
    assert client.get(cancel_key(request["request_id"])) == b"1", "the abandoned request is cancelled"
    assert client.hlen("personabot:bot:pending") == 0
    client.close()


async def test_rate_limit_answers_politely_once(settings_env, fake_api: FakeBotApi, redis_server,
                                                store: Store) -> None:  # type: ignore[no-untyped-def]
    settings = settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                            redis_url=redis_server.url, database_url=store.url,
                            reply_timeout_s=1, rate_limit_per_minute=2)
    chat = fake_api.private_chat(42)
    async with running_bot(settings, store):
        for i in range(4):
            fake_api.user_says(chat, f"message {i}")
        await until(lambda: texts(fake_api, 42).count(BUSY_TEXT) == 2, what="two busy replies")
    polite = [t for t in texts(fake_api, 42) if "a bit fast" in t]
    assert len(polite) == 1
    assert len(queued_chat_requests(settings.redis_url)) == 2


async def test_errors_are_logged_without_token_and_bot_survives(
        settings: Settings, store: Store, fake_api: FakeBotApi,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    chat = fake_api.private_chat(42)
    async with running_bot(settings, store):
        fake_api.fail_next("sendMessage", 400, "Bad Request: chat is deactivated")
        fake_api.user_says(chat, "/help")
        await until(lambda: ERROR_TEXT in texts(fake_api, 42), what="the error notice")
        fake_api.user_says(chat, "/help")
        await until(lambda: HELP_TEXT in texts(fake_api, 42), what="the bot still answering")
    assert "chat 42: BadRequest: Chat is deactivated" in caplog.text
    assert fake_api.token not in caplog.text
    assert fake_api.token.split(":")[1] not in caplog.text
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING


async def test_parse_error_resends_plain_text(fake_api: FakeBotApi) -> None:
    fake_api.private_chat(42)
    async with Bot(fake_api.token, base_url=fake_api.base_url) as bot:
        fake_api.fail_next("sendMessage", 400, "Bad Request: can't parse entities: odd")
        await send_text(bot, 42, "a **b** <c>")
    [first, second] = fake_api.requests("sendMessage")
    assert first.params["parse_mode"] == "HTML" and not first.ok
    assert "parse_mode" not in second.params and second.params["text"] == "a **b** <c>"
    assert texts(fake_api, 42) == ["a **b** <c>"]


async def test_flood_429_is_retried_after_retry_after(settings_env, redis_server, store: Store) -> None:  # type: ignore[no-untyped-def]
    strict = FakeBotApi(flood=FloodRules(private_per_s=0.5, private_burst=1)).start()
    try:
        settings = settings_env(telegram_token=strict.token, telegram_base_url=strict.base_url,
                                redis_url=redis_server.url, database_url=store.url)
        chat = strict.private_chat(42)
        async with running_bot(settings, store):
            strict.user_says(chat, "/help")
            strict.user_says(chat, "/help")
            await until(lambda: texts(strict, 42) == [HELP_TEXT, HELP_TEXT], what="both answers")
        flooded = [r for r in strict.requests("sendMessage") if r.error_code == 429]
        assert flooded, "this fake allows one message per 2 s: the second one was refused once"
        retried = [r for r in strict.requests("sendMessage") if r.ok][-1]
        assert retried.at - flooded[0].at >= 1.0, "retried after retry_after, not at once"
    finally:
        strict.stop()


async def test_bot_reports_itself_to_the_admin_status(settings: Settings, store: Store, fake_api: FakeBotApi,
                                                      redis_server) -> None:  # type: ignore[no-untyped-def]
    import redis as sync_redis

    from personabot.core.events import recent

    client = sync_redis.Redis.from_url(redis_server.url)
    async with running_bot(settings, store):
        await until(lambda: [e for e in recent(client) if e.type == "worker.online" and e.data.get("kind") == "bot"],
                    what="bot heartbeat event")
    beat = next(e for e in recent(client) if e.type == "worker.online")
    assert beat.data["worker"].startswith("bot@") and fake_api.token not in beat.model_dump_json()
    client.close()


async def test_edited_messages(settings_env, fake_api: FakeBotApi, redis_server, store: Store) -> None:  # type: ignore[no-untyped-def]
    settings = settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                            redis_url=redis_server.url, database_url=store.url, reply_timeout_s=3)
    chat = fake_api.private_chat(42)
    async with running_bot(settings, store):
        first = fake_api.user_says(chat, "first question")
        await until(lambda: queued_chat_requests(settings.redis_url), what="the first request")
        second = fake_api.user_says(chat, "second question")  # waits for the first reply
        fake_api.user_edits(second, "second question, edited")
        fake_api.user_edits(first, "first question, edited")  # already asked: a note
        await until(lambda: texts(fake_api, 42).count(BUSY_TEXT) == 2, what="both replies")
    questions = [r["messages"][-1]["content"] for r in queued_chat_requests(settings.redis_url)]
    assert questions == ["first question", "second question, edited"]
    [note] = [m for m in fake_api.bot_messages(42) if m.text == EDITED_TEXT]
    assert note.reply_to == first["message_id"]
