"""Failures that must not cost a reply: Redis errors, failed best-effort updates, late notices,
broken pending records, and mentions after non-BMP characters."""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from telegram import Bot, Chat, Message, MessageEntity

from personabot.bot.formatting import split_text
from personabot.bot.handlers import ERROR_TEXT, addressed_text
from personabot.bot.limits import ChatPacer, ChatRateLimiter
from personabot.bot.replies import BUSY_TEXT, FAILED_TEXT, PENDING_KEY, PendingReply
from personabot.bot.streaming import Pacing, ReplyDelivery
from personabot.core.schemas import ChatResult
from personabot.core.settings import Settings
from personabot.core.store import Store
from personabot.core.streams import ReplyStreamWriter
from tests.bot.fake_bot_api import FakeBotApi
from tests.bot.harness import queued_chat_requests, running_bot, texts, until


def delivery(bot: Bot, chat_id: int, *, private: bool) -> ReplyDelivery:
    """A delivery that may show every update at once (no intervals, generous pacing)."""
    limiter = ChatRateLimiter(private=ChatPacer(100.0, 100), group=ChatPacer(100.0, 100))
    pacing = Pacing(limiter=limiter, draft_interval_s=0.0, edit_interval_s=0.0)
    return ReplyDelivery(bot, chat_id, private=private, reply_to=None, pacing=pacing)


async def test_redis_error_in_rate_check_does_not_block_the_chat(
        settings: Settings, store: Store, fake_api: FakeBotApi, redis_server) -> None:  # type: ignore[no-untyped-def]
    chat = fake_api.private_chat(42)
    async with running_bot(settings, store):
        redis_server.stop()
        try:
            fake_api.user_says(chat, "hello while Redis is down")
            await until(lambda: ERROR_TEXT in texts(fake_api, 42), what="the error notice")
        finally:
            redis_server.start()
        fake_api.user_says(chat, "hello again")
        await until(lambda: BUSY_TEXT in texts(fake_api, 42), what="an answer to the next message")
    assert texts(fake_api, 42) == [ERROR_TEXT, BUSY_TEXT]


async def test_failure_notice_follows_a_long_partial_reply(
        settings_env, fake_api: FakeBotApi, redis_server, store: Store) -> None:  # type: ignore[no-untyped-def]
    settings = settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                            redis_url=redis_server.url, database_url=store.url, reply_timeout_s=30)
    chat = fake_api.private_chat(42)
    partial = "word " * 1000  # more than one Telegram message
    client = redis.Redis.from_url(redis_server.url)
    try:
        async with running_bot(settings, store):
            fake_api.user_says(chat, "tell me everything")
            [request] = await until(lambda: queued_chat_requests(settings.redis_url),
                                    what="the queued request")
            writer = ReplyStreamWriter(client, request["request_id"], ttl_s=60)
            writer.reset()
            writer.token(partial)
            writer.final(ChatResult(request_id=request["request_id"], text="",
                                    finish_reason="error", adapter_version=None, error="boom"))
            await until(lambda: FAILED_TEXT in texts(fake_api, 42), what="the failure notice")
        first_piece = split_text(partial.strip())[0].strip()
        assert texts(fake_api, 42) == [first_piece, FAILED_TEXT]
        assert client.hlen(PENDING_KEY) == 0
    finally:
        client.close()


async def test_trailing_whitespace_does_not_lose_the_tail(fake_api: FakeBotApi) -> None:
    fake_api.private_chat(42)
    body = "a" * 3000 + "\n\n" + "b" * 1090  # fits one message; with the spaces it would not
    async with Bot(fake_api.token, base_url=fake_api.base_url) as bot:
        reply = delivery(bot, 42, private=True)
        await reply.update(body + " " * 10)
        await reply.finish(body + " " * 10)
    assert texts(fake_api, 42) == [body]


async def test_failed_group_updates_are_skipped(fake_api: FakeBotApi) -> None:
    fake_api.group_chat(-500)
    async with Bot(fake_api.token, base_url=fake_api.base_url) as bot:
        reply = delivery(bot, -500, private=False)
        fake_api.fail_next("sendMessage", 502, "Bad Gateway")
        await reply.update("one")  # the first group message fails: skipped
        await reply.update("one two")
        live = reply.state.live_id
        assert live is not None and texts(fake_api, -500) == ["one two"]
        fake_api.fail_next("editMessageText", 502, "Bad Gateway")
        await reply.update("one two three")  # a failed edit: skipped
        await bot.delete_message(-500, live)  # as if a user deleted it
        await reply.update("one two three four")  # message to edit not found: skipped
        await reply.update("one two three four five")  # sent anew
        await reply.finish("one two three four five six")
    assert texts(fake_api, -500) == ["one two three four five six"]
    failed = [r.description for r in fake_api.requests() if not r.ok]
    assert failed == ["Bad Gateway", "Bad Gateway", "Bad Request: message to edit not found"]


async def test_failed_drafts_and_deletes_are_skipped(fake_api: FakeBotApi) -> None:
    fake_api.private_chat(42)
    async with Bot(fake_api.token, base_url=fake_api.base_url) as bot:
        reply = delivery(bot, 42, private=True)
        fake_api.fail_next("sendMessageDraft", 502, "Bad Gateway")
        await reply.update("draft one")
        await reply.update("draft one two")
        await reply.update("x" * 5000)  # settles the first piece
        [first] = reply.state.sent_ids
        await bot.delete_message(42, first)  # as if a user deleted it
        await reply.restart()  # the worker starts over: deleting it again fails, skipped
        await reply.finish("the new answer")
    assert texts(fake_api, 42) == ["the new answer"]
    assert fake_api.drafts[42][0] == "draft one two"


async def test_resume_survives_bad_records_and_reports_failures(
        settings: Settings, store: Store, fake_api: FakeBotApi, redis_server) -> None:  # type: ignore[no-untyped-def]
    fake_api.private_chat(42)
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.hset(PENDING_KEY, "7:1", "{not json")
        client.hset(PENDING_KEY, "8:1", '{"chat_id": "eight"}')
        owed = PendingReply(chat_id=42, message_id=1, user_text="hello?", private=True)
        client.hset(PENDING_KEY, owed.field, owed.model_dump_json())
        fake_api.fail_next("sendMessage", 400, "Bad Request: chat is deactivated")
        async with running_bot(settings, store):
            await until(lambda: texts(fake_api, 42), what="a message for the owed reply")
        assert texts(fake_api, 42) == [ERROR_TEXT]
        assert [r.description for r in fake_api.requests("sendMessage") if not r.ok] == [
            "Bad Request: chat is deactivated"]
        assert client.hlen(PENDING_KEY) == 0
    finally:
        client.close()


def test_mention_after_an_emoji_is_cut_exactly() -> None:
    group = Chat(-500, Chat.SUPERGROUP)
    text = "😀 hey @persona_bot what is 2+2?"
    message = Message(1, datetime.now(UTC), group, text=text,
                      entities=[MessageEntity(MessageEntity.MENTION, 7, 12)])
    assert message.parse_entities() == {message.entities[0]: "@persona_bot"}
    assert addressed_text(message, "persona_bot", 123456) == "😀 hey  what is 2+2?"
