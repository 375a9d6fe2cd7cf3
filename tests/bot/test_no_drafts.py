"""A Bot API server without sendMessageDraft: private chats switch to send-then-edit, logged once."""

from __future__ import annotations

import asyncio
import logging

import pytest
from telegram.ext import ExtBot

from personabot.bot.limits import ChatPacer, ChatRateLimiter
from personabot.bot.streaming import Pacing, ReplyDelivery
from tests.bot.fake_bot_api import FakeBotApi


async def test_draft_not_found_switches_to_edits(fake_api: FakeBotApi, caplog: pytest.LogCaptureFixture) -> None:
    fake_api.drafts_supported = False
    fake_api.private_chat(42)
    limiter = ChatRateLimiter(private=ChatPacer(100.0, 100), group=ChatPacer(100.0, 100))
    pacing = Pacing(limiter=limiter, draft_interval_s=0.0, edit_interval_s=1.1)
    async with ExtBot(fake_api.token, base_url=fake_api.base_url, rate_limiter=limiter) as bot:
        caplog.set_level(logging.WARNING)
        delivery = ReplyDelivery(bot, 42, private=True, reply_to=None, pacing=pacing)
        for text in ["one", "one two", "one two three", "one two three four"]:
            await delivery.update(text)
            await asyncio.sleep(1.2 if text != "one" else 0)
        await delivery.finish("one two three four end 0")
        await asyncio.sleep(1.2)
        second = ReplyDelivery(bot, 42, private=True, reply_to=None, pacing=pacing)
        await second.update("one")
        await second.finish("one two three four end 1")
    assert len(fake_api.requests("sendMessageDraft")) == 1, "one failed draft, then no more"
    assert fake_api.requests("editMessageText"), "private chat progress shown by edits"
    assert [m.text for m in fake_api.bot_messages(42)] == ["one two three four end 0",
                                                          "one two three four end 1"]
    assert sum("sendMessageDraft" in r.getMessage() for r in caplog.records) == 1
    assert not any("InvalidToken" in r.getMessage() for r in caplog.records)
