"""A group reply regenerated after its chat worker died (kill -9, Celery redelivery to a second
worker): the old pieces go, and the new answer is again a reply to the user's message."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def slowed(worker: ChatWorker, run_s: float = 0.01, pause_s: float = 0.09) -> Iterator[None]:
    """Run the worker's process group a tenth of the time (SIGSTOP/SIGCONT), so that however fast
    the machine, its reply is still being written when the test kills it."""
    assert worker.process is not None
    group = os.getpgid(worker.process.pid)
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            try:
                os.killpg(group, signal.SIGSTOP)
                done.wait(pause_s)
                os.killpg(group, signal.SIGCONT)
            except ProcessLookupError:
                return
            done.wait(run_s)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        try:
            os.killpg(group, signal.SIGCONT)
        except ProcessLookupError:
            pass


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
            with slowed(workers[0]):
                await until(lambda: len(fake_api.bot_messages(-700)) >= 2, timeout=240,
                            what="a continuation message")
                workers[0].kill()
            await asyncio.sleep(4)  # past the visibility timeout
            await asyncio.to_thread(workers[1].start)
            await until(lambda: results, timeout=120, what="the regenerated reply")
        assert results[0].generation.worker == workers[1].hostname, "the rescuer wrote the reply"  # type: ignore[union-attr]
        assert fake_api.requests("deleteMessage", chat_id=-700), "the old attempt was removed"
        reply = results[0].generation.text  # type: ignore[union-attr]
        assert shown(fake_api, -700) == visible_pieces(reply)
        first = min(fake_api.bot_messages(-700), key=lambda m: m.message_id)
        assert first.reply_to == question["message_id"], "the new answer replies to the user"
    finally:
        for worker in workers:
            worker.stop()
