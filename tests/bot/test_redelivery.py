"""A group reply regenerated after its chat worker died (kill -9, Celery redelivery to a second
worker): the old pieces go, and the new answer is again a reply to the user's message."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from personabot.bot.replies import ReplyTimings
from personabot.core.store import Store
from tests.bot.fake_bot_api import FakeBotApi
from tests.bot.harness import running_bot, until
from tests.bot.test_streaming import (
    WORKER_ENV,
    find_long_prompt,
    keep_worker_busy,
    shown,
    visible_pieces,
)
from tests.workers.conftest import ChatWorker

pytestmark = pytest.mark.slow

# Past this many seconds an unacknowledged chat task is handed to the next worker.
ENV = {**WORKER_ENV, "PERSONABOT_CHAT_VISIBILITY_TIMEOUT": "3"}


async def test_group_redelivery_keeps_the_reply_link(settings_env, fake_api: FakeBotApi, redis_server,  # type: ignore[no-untyped-def]
                                                     store: Store, tiny_model: Path, tmp_path: Path) -> None:
    settings = settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                            redis_url=redis_server.url, database_url=store.url, reply_timeout_s=60,
                            history_tokens=100_000)
    workers = [ChatWorker(redis_server.url, store.url, tiny_model, tmp_path / "workers", name=name,
                          env=ENV) for name in ("doomed", "rescuer")]
    group = fake_api.group_chat(-700)
    results: list[ReplyTimings] = []
    try:
        await asyncio.to_thread(workers[0].start)
        prompt = await asyncio.to_thread(find_long_prompt, redis_server.url)
        async with running_bot(settings, store, on_timings=results.append):
            # Other long requests share the worker, so the reply is still being written when
            # the bot has shown two of its messages.
            keep_worker_busy({"redis_url": redis_server.url, "long_prompt": prompt}, requests=3)
            question = fake_api.user_says(group, f"@persona_bot {prompt}")
            # A first piece is complete and a second message continues it: then the worker dies.
            await until(lambda: len(fake_api.bot_messages(-700)) >= 2, timeout=120,
                        what="a continuation message")
            workers[0].kill()
            await asyncio.sleep(4)  # past the visibility timeout
            await asyncio.to_thread(workers[1].start)
            await until(lambda: results, timeout=120, what="the regenerated reply")
        if results[0].generation.worker != workers[1].hostname:  # type: ignore[union-attr]
            # Timing, not behaviour: on an idle machine the reply can end before the kill lands.
            pytest.skip("setup: the reply finished before its worker was killed (machine too fast)")
        assert fake_api.requests("deleteMessage", chat_id=-700), "the old attempt was removed"
        reply = results[0].generation.text  # type: ignore[union-attr]
        assert shown(fake_api, -700) == visible_pieces(reply)
        first = min(fake_api.bot_messages(-700), key=lambda m: m.message_id)
        assert first.reply_to == question["message_id"], "the new answer replies to the user"
    finally:
        for worker in workers:
            worker.stop()
