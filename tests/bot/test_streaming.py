"""Streaming with a real chat worker (Celery subprocess, tiny model): drafts, edits, splitting,
/stop and a bot restart in the middle of a conversation."""

from __future__ import annotations

import asyncio
import contextlib
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

from personabot.bot import replies
from personabot.bot.formatting import MAX_MESSAGE_LENGTH, split_text, to_html, utf16_len
from personabot.bot.memory import history_key
from personabot.bot.replies import (
    PENDING_KEY,
    STOPPED_MARK,
    PendingReply,
    ReplyTimings,
    stopped_reply,
)
from personabot.core.schemas import ChatRequest, Message
from personabot.core.settings import Settings
from personabot.core.store import Store
from personabot.core.streams import read_reply, stream_key
from personabot.redis_server import RedisServer
from personabot.workers.app import make_celery
from personabot.workers.client import submit_chat
from tests.bot.fake_bot_api import FakeBotApi
from tests.bot.harness import running_bot, until
from tests.bot.telegram_markup import parse_html
from tests.workers.conftest import REPO, ChatWorker

pytestmark = pytest.mark.slow

# Greedy decoding on the random tiny model: many questions meet EOS early, others run to the
# most tokens the worker allows (half the context, 2,048): about 8,000 characters, two or
# three Telegram messages, a few seconds on CPU. The fixture finds such a question once.
WORKER_ENV = {"PERSONABOT_MAX_NEW_TOKENS": "2500", "PERSONABOT_TEMPERATURE": "0",
              "PERSONABOT_CONTEXT_TOKENS": "4096"}
CANDIDATES = ["hello there", "Write an essay", "Explain everything", "long", "Tell me a story",
              "Remember me: I am Bob", "Describe the sea", "What happened in 1999?", "Go on",
              "Talk for a long time", "Please continue", "Why?"]
MIN_LONG_CHARS = 5000  # more than one Telegram message


def find_long_prompt(redis_url: str) -> str:
    """A question the worker answers with more than one Telegram message of text."""
    client = redis.Redis.from_url(redis_url)
    app = make_celery(redis_url)
    try:
        for question in CANDIDATES:
            request = ChatRequest(messages=[Message(role="user", content=question)],
                                  chat_id="probe", source="telegram")
            submit_chat(request, app=app)
            final = [e.result for e in read_reply(client, request.request_id, timeout_s=120)
                     if e.result is not None]
            if final and len(final[0].text.strip()) > MIN_LONG_CHARS:
                return question
    finally:
        client.close()
        app.close()
    raise AssertionError(f"none of {CANDIDATES} gets a long reply from the tiny model")


@pytest.fixture(scope="module")
def backend(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One Redis, store and chat worker for the whole module, and a question with a long answer."""
    tmp = tmp_path_factory.mktemp("bot-streaming")
    server = RedisServer(tmp / "redis", persist=False).start()
    store = Store(f"sqlite:///{tmp / 'store.db'}")
    store.update_persona(name="Ada", author="Lovelace Labs")
    worker = ChatWorker(server.url, store.url, tiny_model, tmp / "worker", name="botchat",
                        concurrency=8, env=WORKER_ENV).start()
    try:
        yield {"redis_url": server.url, "store": store, "worker": worker,
               "long_prompt": find_long_prompt(server.url)}
    finally:
        worker.stop()
        store.close()
        server.stop()


@pytest.fixture()
def settings(settings_env, fake_api: FakeBotApi, backend: dict[str, Any]) -> Settings:  # type: ignore[no-untyped-def]
    return settings_env(telegram_token=fake_api.token, telegram_base_url=fake_api.base_url,
                        redis_url=backend["redis_url"], database_url=backend["store"].url,
                        reply_timeout_s=60, history_tokens=100_000)


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


def pending_request(redis_url: str, chat_id: int) -> str:
    """The request id of the reply the bot owes this chat ('' when none)."""
    client = redis.Redis.from_url(redis_url)
    try:
        owed = [PendingReply.model_validate_json(v) for v in client.hvals(PENDING_KEY)]
    finally:
        client.close()
    return next((p.request_id for p in owed if p.chat_id == chat_id), "")


def keep_worker_busy(backend: dict[str, Any], requests: int = 7) -> None:
    """Give the worker other long requests too, so the one under test streams for seconds."""
    app = make_celery(backend["redis_url"])
    for _ in range(requests):
        submit_chat(ChatRequest(messages=[Message(role="user", content=backend["long_prompt"])]),
                    app=app)
    app.close()


def streaming_s(timings: ReplyTimings) -> float:
    """How long tokens kept coming for this reply."""
    assert timings.generation is not None
    return timings.generation.total_s - timings.generation.first_token_s


def assert_no_flood(api: FakeBotApi) -> None:
    flooded = [r for r in api.requests() if r.error_code == 429]
    assert not flooded, f"Telegram would have answered 429 to {flooded[:3]}"
    failed = [r for r in api.requests() if not r.ok]
    assert not failed, f"rejected requests: {[(r.method, r.description) for r in failed][:3]}"


async def test_private_chat_streams_drafts_then_final_pieces(settings: Settings, backend: dict[str, Any],
                                                             fake_api: FakeBotApi) -> None:
    chat = fake_api.private_chat(101)
    results: list[ReplyTimings] = []
    settings = settings.model_copy(update={"draft_interval_s": 0.4})
    async with running_bot(settings, backend["store"], on_timings=results.append):
        keep_worker_busy(backend)
        question = fake_api.user_says(chat, backend["long_prompt"])
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
    if streaming_s(timings) > 3 * settings.draft_interval_s:
        assert drafts, "a reply that took a while was shown while it was written"
    assert len({d.params["draft_id"] for d in drafts}) <= 1
    assert all(d.at < fake_api.requests("sendMessage", chat_id=101)[-1].at for d in drafts)
    gaps = [b.at - a.at for a, b in itertools.pairwise(drafts)]
    assert all(gap >= settings.draft_interval_s * 0.9 for gap in gaps)
    assert fake_api.requests("sendChatAction", chat_id=101), "typing while queued"
    assert not fake_api.requests("editMessageText")
    assert_no_flood(fake_api)
    assert [m.content for m in history(settings.redis_url, 101)] == [backend["long_prompt"], reply]


async def test_group_sends_once_then_edits_at_most_once_per_second(
        settings: Settings, backend: dict[str, Any], fake_api: FakeBotApi) -> None:
    group = fake_api.group_chat(-2001)
    results: list[ReplyTimings] = []
    async with running_bot(settings, backend["store"], on_timings=results.append):
        keep_worker_busy(backend)
        fake_api.user_says(group, f"@persona_bot {backend['long_prompt']}")
        await until(lambda: results, timeout=120, what="the reply")
    reply = results[0].generation.text  # type: ignore[union-attr]
    assert shown(fake_api, -2001) == visible_pieces(reply)
    writes = [r for r in fake_api.requests(chat_id=-2001)
              if r.method in ("sendMessage", "editMessageText")]
    assert writes[0].method == "sendMessage"
    if streaming_s(results[0]) > 1.5 * settings.edit_interval_s:  # live message at 1 s, then more
        assert "editMessageText" in [r.method for r in writes], "sent once, then edited"
    gaps = [b.at - a.at for a, b in itertools.pairwise(writes)]
    assert min(gaps) >= 0.95, f"edits closer than 1 s: {gaps}"
    assert not fake_api.requests("sendMessageDraft")
    assert_no_flood(fake_api)
    assert history(settings.redis_url, -2001)[0].content == backend["long_prompt"]


async def test_stop_cancels_the_reply_and_marks_it(settings: Settings, backend: dict[str, Any],
                                                   fake_api: FakeBotApi) -> None:
    chat = fake_api.private_chat(102)
    results: list[ReplyTimings] = []
    async with running_bot(settings, backend["store"], on_timings=results.append):
        keep_worker_busy(backend)
        fake_api.user_says(chat, backend["long_prompt"])
        await until(lambda: fake_api.requests("sendMessageDraft", chat_id=102), timeout=60,
                    what="the reply being shown")
        fake_api.user_says(chat, "/stop")
        await until(lambda: results, timeout=120, what="the stopped reply")
        fake_api.user_says(chat, "/stop")
        await until(lambda: "no reply being written" in shown(fake_api, 102)[-1],
                    what="/stop with nothing running")
    result = results[0].generation
    assert result is not None and result.finish_reason == "cancelled" and result.text.strip()
    assert result.completion_tokens < 2048  # the worker caps the default at half the context
    assert not fake_api.requests("sendMessageDraft", chat_id=102)[5:], "stopped early"
    assert shown(fake_api, 102)[:-1] == visible_pieces(stopped_reply(result.text))
    assert shown(fake_api, 102)[-2].endswith(STOPPED_MARK), "the user sees it was cut"
    assert [m.content for m in history(settings.redis_url, 102)] == [
        backend["long_prompt"], stopped_reply(result.text)], "memory keeps it marked as cut"
    assert_no_flood(fake_api)


async def test_typing_lasts_until_the_first_visible_text(settings: Settings, backend: dict[str, Any],
                                                         fake_api: FakeBotApi,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Typing renewed every second here (Telegram's action lasts 5 s; the bot renews it every 4.5 s).
    every = 1.0
    monkeypatch.setattr(replies, "TYPING_EVERY_S", every)
    settings = settings.model_copy(update={"draft_interval_s": every + 2})
    pause_s = every + 3
    chat = fake_api.private_chat(104)
    results: list[ReplyTimings] = []
    worker = backend["worker"].process
    client = redis.Redis.from_url(settings.redis_url)
    try:
        async with running_bot(settings, backend["store"], on_timings=results.append):
            fake_api.user_says(chat, backend["long_prompt"])
            request_id = await until(lambda: pending_request(settings.redis_url, 104), timeout=60,
                                     what="the reply being owed")
            [(first_id, _)] = await until(lambda: client.xrange(stream_key(request_id), count=1),
                                          timeout=60, what="the worker picking the request up")
            # Picked up: freeze the worker (a slow prefill, a long queue ahead on the GPU), so the
            # first text comes seconds after the opening entry on any machine, however fast.
            os.killpg(worker.pid, signal.SIGSTOP)
            try:
                early = [r for r in fake_api.requests(chat_id=104)
                         if r.method in ("sendMessageDraft", "sendMessage")]
                await asyncio.sleep(pause_s)
            finally:
                os.killpg(worker.pid, signal.SIGCONT)
            await until(lambda: results, timeout=180, what="the reply")
    finally:
        client.close()
    assert not early, "setup: nothing shown before the worker was frozen"
    assert results[0].generation is not None and results[0].generation.text.strip()
    picked_up = int(first_id.split(b"-")[0]) / 1000  # the worker's opening entry (Redis clock)
    shown_at = min(r.wall for r in fake_api.requests(chat_id=104)
                   if r.ok and r.method in ("sendMessageDraft", "sendMessage"))
    typing = [r.wall for r in fake_api.requests("sendChatAction", chat_id=104)]
    assert shown_at - picked_up > pause_s, "setup: the text shows after the pause"
    # Renewed every `every` seconds up to the first text (not stopped at the opening entry).
    assert len([at for at in typing if picked_up < at < shown_at]) >= pause_s / every - 1
    last = max(at for at in typing if at < shown_at)
    assert last > shown_at - every - 1, "typing renewed while the reply was being written"
    assert not [at for at in typing if at > shown_at + 1], "no typing once the text shows"


def _start_bot_process(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONABOT_")}
    env.update({
        "PERSONABOT_TELEGRAM_TOKEN": settings.telegram_token.get_secret_value(),  # type: ignore[union-attr]
        "PERSONABOT_TELEGRAM_BASE_URL": settings.telegram_base_url,
        "PERSONABOT_REDIS_URL": settings.redis_url,
        "PERSONABOT_DATABASE_URL": settings.database_url,
        "PERSONABOT_DATA_DIR": str(settings.data_dir),
        "PERSONABOT_HISTORY_TOKENS": str(settings.history_tokens),
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
        fake_api.user_says(chat, backend["long_prompt"])
        fake_api.wait_for(lambda: fake_api.requests("sendMessageDraft", chat_id=103), timeout=60,
                          what="the first draft")
        os.killpg(bot.pid, signal.SIGKILL)  # crash in the middle of the reply
        bot.wait(10)
        assert not history(settings.redis_url, 103), "killed before the reply was complete"
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bot.pid, signal.SIGTERM)
        bot.wait(20)
    remembered = [m.content for m in history(settings.redis_url, 103)]
    assert remembered[0] == backend["long_prompt"] and remembered[2] == "What is my name?"
    assert not fake_api.requests("deleteMessage"), "nothing shown before the crash was redone"
    assert_no_flood(fake_api)
    log_text = log_path.read_text()
    assert "resuming 1 pending replies" in log_text
    assert fake_api.token not in log_text
