"""Streaming with a real chat worker (Celery subprocess, tiny model): drafts, edits, splitting,
/stop and a bot restart in the middle of a conversation."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bot.formatting import MAX_MESSAGE_LENGTH, split_text, to_html, utf16_len
from bot.memory import history_key
from bot.replies import ReplyTimings
from core.redis_server import RedisServer
from core.schemas import Message
from core.settings import Settings
from core.store import Store
from tests.bot.fake_bot_api import FakeBotApi
from tests.bot.harness import running_bot, until
from tests.bot.telegram_markup import parse_html
from tests.workers.conftest import REPO, ChatWorker

pytestmark = pytest.mark.slow

# Greedy decoding on the (seeded) random tiny model is deterministic; the questions below are
# ones it answers with 2,500 tokens (7,000-10,000 characters: two or three Telegram messages,
# a few seconds on CPU) instead of meeting EOS early.
WORKER_ENV = {"PERSONABOT_MAX_NEW_TOKENS": "2500", "PERSONABOT_TEMPERATURE": "0",
              "PERSONABOT_CONTEXT_TOKENS": "4096"}


@pytest.fixture(scope="module")
def backend(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One Redis, store and chat worker for the whole module."""
    tmp = tmp_path_factory.mktemp("bot-streaming")
    server = RedisServer(tmp / "redis", persist=False).start()
    store = Store(f"sqlite:///{tmp / 'store.db'}")
    store.update_persona(name="Ada", author="Lovelace Labs")
    worker = ChatWorker(server.url, store.url, tiny_model, tmp / "worker", name="botchat",
                        concurrency=4, env=WORKER_ENV).start()
    yield {"redis_url": server.url, "store": store, "worker": worker, "tmp": tmp}
    worker.stop()
    store.close()
    server.stop()


@pytest.fixture()
def settings(settings_env, fake_api: FakeBotApi, backend: dict[str, Any]) -> Settings:  # type: ignore[no-untyped-def]
    return settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                        redis_url=backend["redis_url"], database_url=backend["store"].url,
                        reply_timeout_s=60)


def history(redis_url: str, chat_id: int) -> list[Message]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [Message.model_validate_json(m) for m in client.lrange(history_key(chat_id), 0, -1)]
    finally:
        client.close()


def visible_pieces(reply: str) -> list[str]:
    """What Telegram shows for a reply: each piece's text after HTML parsing."""
    return [parse_html(to_html(piece))[0] for piece in split_text(reply.strip())]


def shown(api: FakeBotApi, chat_id: int) -> list[str]:
    return [m.text for m in sorted(api.bot_messages(chat_id), key=lambda m: m.message_id)]


def assert_no_flood(api: FakeBotApi) -> None:
    flooded = [r for r in api.requests() if r.error_code == 429]
    assert not flooded, f"Telegram would have answered 429 to {flooded[:3]}"
    failed = [r for r in api.requests() if not r.ok]
    assert not failed, f"rejected requests: {[(r.method, r.description) for r in failed][:3]}"


async def test_private_chat_streams_drafts_then_final_pieces(settings: Settings, backend: dict[str, Any],
                                                             fake_api: FakeBotApi) -> None:
    chat = fake_api.private_chat(101)
    results: list[ReplyTimings] = []
    async with running_bot(settings, backend["store"], on_timings=results.append):
        question = fake_api.user_says(chat, "hello there")
        await until(lambda: results, timeout=120, what="the reply")
    [timings] = results
    assert timings.generation is not None
    reply = timings.generation.text
    assert utf16_len(reply) > MAX_MESSAGE_LENGTH, "the tiny model wrote a long reply"
    pieces = shown(fake_api, 101)
    assert pieces == visible_pieces(reply)
    assert len(pieces) >= 2 and all(utf16_len(p) <= MAX_MESSAGE_LENGTH for p in pieces)
    assert fake_api.bot_messages(101)[0].reply_to == question["message_id"]
    drafts = fake_api.requests("sendMessageDraft", chat_id=101)
    assert len(drafts) >= 2, "the reply was shown while it was written"
    assert len({d.params["draft_id"] for d in drafts}) == 1
    gaps = [b.at - a.at for a, b in itertools.pairwise(drafts)]
    assert min(gaps) >= settings.draft_interval_s * 0.9
    assert fake_api.requests("sendChatAction", chat_id=101)[0].at < drafts[0].at
    assert not fake_api.requests("editMessageText")
    assert_no_flood(fake_api)
    assert [m.content for m in history(settings.redis_url, 101)] == ["hello there", reply]


async def test_group_sends_once_then_edits_at_most_once_per_second(
        settings: Settings, backend: dict[str, Any], fake_api: FakeBotApi) -> None:
    group = fake_api.group_chat(-2001)
    results: list[ReplyTimings] = []
    async with running_bot(settings, backend["store"], on_timings=results.append):
        fake_api.user_says(group, "@persona_bot Explain everything")
        await until(lambda: results, timeout=120, what="the reply")
    reply = results[0].generation.text  # type: ignore[union-attr]
    assert shown(fake_api, -2001) == visible_pieces(reply)
    writes = [r for r in fake_api.requests(chat_id=-2001)
              if r.method in ("sendMessage", "editMessageText")]
    assert [r.method for r in writes].count("editMessageText") >= 2
    assert writes[0].method == "sendMessage"
    gaps = [b.at - a.at for a, b in itertools.pairwise(writes)]
    assert min(gaps) >= 0.95, f"edits closer than 1 s: {gaps}"
    assert not fake_api.requests("sendMessageDraft")
    assert_no_flood(fake_api)
    assert history(settings.redis_url, -2001)[0].content == "Explain everything"


async def test_stop_cancels_the_reply(settings: Settings, backend: dict[str, Any],
                                      fake_api: FakeBotApi) -> None:
    chat = fake_api.private_chat(102)
    results: list[ReplyTimings] = []
    async with running_bot(settings, backend["store"], on_timings=results.append):
        fake_api.user_says(chat, "Write an essay")
        await until(lambda: fake_api.requests("sendMessageDraft", chat_id=102), timeout=60)
        fake_api.user_says(chat, "/stop")
        await until(lambda: results, timeout=120, what="the stopped reply")
    result = results[0].generation
    assert result is not None and result.finish_reason == "cancelled"
    assert result.completion_tokens < 2500
    assert shown(fake_api, 102) == visible_pieces(result.text)
    assert_no_flood(fake_api)


def _start_bot_process(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONABOT_")}
    env.update({
        "PERSONABOT_TELEGRAM_TOKEN": settings.telegram_token.get_secret_value(),  # type: ignore[union-attr]
        "PERSONABOT_TELEGRAM_BASE_URL": settings.telegram_base_url,
        "PERSONABOT_REDIS_URL": settings.redis_url,
        "PERSONABOT_DATABASE_URL": settings.database_url,
        "PERSONABOT_DATA_DIR": str(settings.data_dir),
        "PYTHONPATH": str(REPO),
    })
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "bot"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def test_bot_restart_mid_reply_delivers_once_and_remembers(
        settings: Settings, backend: dict[str, Any], fake_api: FakeBotApi, tmp_path: Path) -> None:
    chat = fake_api.private_chat(103)
    log_path = tmp_path / "bot.log"
    bot = _start_bot_process(settings, log_path)
    try:
        first = fake_api.user_says(chat, "Remember me: I am Bob")
        fake_api.wait_for(lambda: fake_api.requests("sendMessageDraft", chat_id=103), timeout=60,
                          what="the first draft")
        os.killpg(bot.pid, signal.SIGKILL)  # crash in the middle of the reply
        bot.wait(10)
        assert not fake_api.replies_to(103, first["message_id"]), "killed before the final message"
        bot = _start_bot_process(settings, log_path)
        fake_api.wait_for(lambda: len(history(settings.redis_url, 103)) == 2, timeout=60,
                          what="the interrupted reply delivered after the restart")
        reply = history(settings.redis_url, 103)[1].content
        fake_api.wait_for(lambda: shown(fake_api, 103) == visible_pieces(reply), timeout=30,
                          what="every piece of the interrupted reply, exactly once")
        fake_api.user_says(chat, "What is my name?")
        fake_api.wait_for(lambda: len(history(settings.redis_url, 103)) == 4, timeout=90,
                          what="the second reply")
        second = history(settings.redis_url, 103)[3].content
        fake_api.wait_for(lambda: shown(fake_api, 103) == visible_pieces(reply) + visible_pieces(second),
                          timeout=30, what="both replies, each piece once")
    finally:
        os.killpg(bot.pid, signal.SIGTERM)
        bot.wait(20)
    remembered = [m.content for m in history(settings.redis_url, 103)]
    assert remembered[0] == "Remember me: I am Bob" and remembered[2] == "What is my name?"
    assert_no_flood(fake_api)
    log_text = log_path.read_text()
    assert "resuming 1 pending replies" in log_text
    assert fake_api.token not in log_text
