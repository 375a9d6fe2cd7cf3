"""Bot load benchmark: N chats x M messages through the strict fake Bot API, tiny model behind Celery.

    python bench/bot_load.py --chats 200 --messages 5 --out bench/bot_load.json

Half the chats are private (drafts), half are groups (the bot is mentioned; send-then-edit).
Each simulated user waits for the reply before sending the next message. Reports: 429s and
rejected requests (must be 0), lost or duplicated replies (must be 0), the bot's own overhead
per message (p50/p95: handler start to last piece delivered, minus the worker's queue wait and
generation), and edits/drafts per chat per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402 - after sys.path is set

from personabot.bot.memory import history_key  # noqa: E402 - after sys.path is set
from personabot.bot.replies import BUSY_TEXT, FAILED_TEXT, ReplyTimings  # noqa: E402 - after sys.path is set
from personabot.core.settings import load_settings  # noqa: E402 - after sys.path is set
from personabot.core.store import Store  # noqa: E402 - after sys.path is set
from personabot.redis_server import RedisServer  # noqa: E402 - after sys.path is set
from personabot.training.tiny_model import make_tiny_model  # noqa: E402 - after sys.path is set
from tests.bot.fake_bot_api import FakeBotApi  # noqa: E402 - after sys.path is set
from tests.bot.harness import running_bot  # noqa: E402 - after sys.path is set
from tests.workers.conftest import ChatWorker  # noqa: E402 - after sys.path is set


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def drive_users(api: FakeBotApi, redis_url: str, chats: list[dict[str, Any]], messages: int,
                done: threading.Event, sent: dict[int, list[int]], give_up_s: float) -> None:
    """Each user (one per chat) sends its next message once the bot has remembered the
    previous turn; a message with no complete reply after `give_up_s` counts as lost."""
    client = redis.Redis.from_url(redis_url)
    progress = {chat["id"]: 0 for chat in chats}
    waiting: dict[int, bool] = {}
    since: dict[int, float] = {}
    while not done.is_set():
        pipe = client.pipeline()
        for chat in chats:
            pipe.llen(history_key(chat["id"]))
        lengths = pipe.execute()
        finished = 0
        for chat, length in zip(chats, lengths, strict=True):
            cid = chat["id"]
            if waiting.get(cid) and (length >= 2 * progress[cid]
                                     or time.monotonic() - since[cid] > give_up_s):
                waiting[cid] = False
            if progress[cid] >= messages and not waiting.get(cid):
                finished += 1
                continue
            if not waiting.get(cid):
                progress[cid] += 1
                text = f"question {progress[cid]} from chat {cid}"
                if chat["type"] != "private":
                    text = f"@{api.bot_user['username']} {text}"
                user = api.user(abs(cid), f"user{abs(cid)}")
                sent.setdefault(cid, []).append(api.user_says(chat, text, user=user)["message_id"])
                waiting[cid], since[cid] = True, time.monotonic()
        if finished == len(chats):
            done.set()
        time.sleep(0.05)
    client.close()


def max_per_window(times: list[float], window: float = 1.0) -> int:
    best, start = 0, 0
    for end in range(len(times)):
        while times[end] - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bot-load-"))
    model = make_tiny_model(tmp / "tiny-qwen2")
    server = RedisServer(tmp / "redis", persist=False).start()
    store = Store(f"sqlite:///{tmp / 'store.db'}")
    store.update_persona(name="Ada", author="Lovelace Labs")
    worker = ChatWorker(server.url, store.url, model, tmp / "worker", name="loadchat",
                        concurrency=args.concurrency,
                        env={"PERSONABOT_MAX_NEW_TOKENS": str(args.max_new_tokens)}).start()
    api = FakeBotApi().start()
    chats = [api.private_chat(1000 + i) if i % 2 == 0 else api.group_chat(-(5000 + i))
             for i in range(args.chats)]
    settings = load_settings(telegram_token=api.token, telegram_base_url=api.base_url,
                             redis_url=server.url, database_url=store.url, data_dir=tmp / "data",
                             reply_timeout_s=args.reply_timeout)
    timings: list[ReplyTimings] = []
    sent: dict[int, list[int]] = {}
    done = threading.Event()
    try:
        async with running_bot(settings, store, on_timings=timings.append):
            started = time.monotonic()
            driver = threading.Thread(target=drive_users, args=(
                api, server.url, chats, args.messages, done, sent, args.reply_timeout + 30))
            driver.start()
            while not done.is_set() and time.monotonic() - started < args.max_seconds:
                await asyncio.sleep(0.5)
            done.set()
            driver.join(10)
            elapsed = time.monotonic() - started
    finally:
        worker.stop()
        api.stop()
        store.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return report(api, chats, sent, timings, elapsed, args)


def generating_s(timings: list[ReplyTimings], *, private: bool) -> float:
    """Seconds the worker spent generating replies for this kind of chat, all chats summed."""
    return max(1e-9, sum(t.generation.total_s for t in timings
                         if t.private == private and t.generation is not None))


def report(api: FakeBotApi, chats: list[dict[str, Any]], sent: dict[int, list[int]],
           timings: list[ReplyTimings], elapsed: float, args: argparse.Namespace) -> dict[str, Any]:
    requests = api.requests()
    lost, duplicated, notices = 0, 0, 0
    counts = {m: sum(r.method == m and r.ok for r in requests)
              for m in ("editMessageText", "sendMessageDraft")}
    max_per_second: dict[str, int] = {"editMessageText": 0, "sendMessageDraft": 0}
    for chat in chats:
        cid = chat["id"]
        for message_id in sent.get(cid, []):
            replies = api.replies_to(cid, message_id)
            lost += not replies
            duplicated += max(0, len(replies) - 1)
        notices += sum(m.text in (BUSY_TEXT, FAILED_TEXT) for m in api.bot_messages(cid))
        method = "sendMessageDraft" if chat["type"] == "private" else "editMessageText"
        times = [r.at for r in requests if r.chat_id == cid and r.method == method and r.ok]
        max_per_second[method] = max(max_per_second[method], max_per_window(times))
    overhead = [t.overhead for t in timings]
    return {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
                   f"{__import__('os').cpu_count()} cores)",
        "python": platform.python_version(),
        "versions": {name: __import__("importlib.metadata").metadata.version(name)
                     for name in ("python-telegram-bot", "celery", "redis", "torch", "transformers")},
        "chats": args.chats, "messages_per_chat": args.messages,
        "max_new_tokens": args.max_new_tokens, "worker_concurrency": args.concurrency,
        "messages_sent": sum(len(v) for v in sent.values()),
        "replies_completed": len(timings),
        "elapsed_s": round(elapsed, 1),
        "http_429": sum(r.error_code == 429 for r in requests),
        "rejected_requests": sum(not r.ok for r in requests),
        "lost_replies": lost, "duplicated_replies": duplicated, "busy_or_failed_notices": notices,
        "requests_by_method": {m: sum(r.method == m for r in requests)
                               for m in sorted({r.method for r in requests})},
        "overhead_ms": {"p50": round(1000 * percentile(overhead, 0.5), 1),
                        "p95": round(1000 * percentile(overhead, 0.95), 1)},
        "overhead_ms_by_chat": {
            kind: {"p50": round(1000 * percentile(values, 0.5), 1),
                   "p95": round(1000 * percentile(values, 0.95), 1)}
            for kind, values in (("private", [t.overhead for t in timings if t.private]),
                                 ("group", [t.overhead for t in timings if not t.private]))},
        "before_submit_ms_p50": round(1000 * percentile([t.before_submit for t in timings], 0.5), 1),
        "after_final_ms": {"p50": round(1000 * percentile([t.after_final for t in timings], 0.5), 1),
                           "p95": round(1000 * percentile([t.after_final for t in timings], 0.95), 1)},
        "generation_s_p50": round(percentile(
            [t.generation.total_s for t in timings if t.generation], 0.5), 2),
        "queued_s_p95": round(percentile(
            [t.generation.queued_s for t in timings if t.generation], 0.95), 2),
        "edits_per_group_chat_per_s_while_generating": round(
            counts["editMessageText"] / generating_s(timings, private=False), 2),
        "drafts_per_private_chat_per_s_while_generating": round(
            counts["sendMessageDraft"] / generating_s(timings, private=True), 2),
        "max_in_any_1s_window_per_chat": max_per_second,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=32, help="chat worker threads/batch")
    parser.add_argument("--reply-timeout", type=float, default=120.0)
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the worker and Redis too
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
