"""Build the PTB Application from settings and run it (polling, or webhook when configured)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from collections.abc import Callable
from typing import cast
from urllib.parse import urlparse

import redis
from celery import Celery
from telegram import Bot, Update
from telegram.error import TelegramError
from telegram.ext import ApplicationBuilder, ContextTypes

from personabot.bot.context import BOT_DATA_KEY, BotApplication, BotCallbackContext, BotContext, bot_context
from personabot.bot.handlers import COMMANDS, ERROR_TEXT, register
from personabot.bot.length import max_message_chars, too_long_for_budget
from personabot.bot.limits import ChatPacer, ChatRateLimiter, UserRateLimiter
from personabot.bot.memory import ChatMemory
from personabot.bot.replies import PendingReply, ReplyService, ReplyTimings, Turn
from personabot.bot.streaming import Pacing
from personabot.core import events
from personabot.core.redis_pool import async_client
from personabot.core.settings import Settings, get_settings
from personabot.core.store import Store
from personabot.workers.client import ChatClient

log = logging.getLogger(__name__)
HEARTBEAT_S = 60.0
BOT_NAME = f"bot@{socket.gethostname()}"

# Telegram's per-chat limit is about one message per second with short bursts.
PRIVATE_MESSAGES_PER_S, PRIVATE_BURST = 1.0, 2


class BotConfigError(RuntimeError):
    """The bot cannot start with these settings; the message says what to set."""


class RedactSecret(logging.Filter):
    """Replaces a secret in every record (message, arguments and traceback) passing a handler."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "<token>"), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and self.secret in record.exc_text:
            record.exc_text = record.exc_text.replace(self.secret, "<token>")
        return True


def protect_token(token: str) -> None:
    """Keep the token out of logs: httpx logs request URLs (which hold it) at INFO."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    redact = RedactSecret(token)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecret) and f.secret == token for f in handler.filters):
            handler.addFilter(redact)


def _token(settings: Settings) -> str:
    if settings.telegram_token is None or not settings.telegram_token.get_secret_value():
        raise BotConfigError("no bot token: set PERSONABOT_TELEGRAM_TOKEN to the token from @BotFather")
    return settings.telegram_token.get_secret_value()


async def send_heartbeat(shared: BotContext, username: str) -> None:
    """Tell the admin's Status tab that the bot is alive (at start, then every HEARTBEAT_S)."""
    try:
        await asyncio.to_thread(events.publish, shared.sync_redis, events.WorkerOnline(
            worker=BOT_NAME, kind="bot", username=username))
    except redis.RedisError as error:
        log.warning("bot heartbeat not sent: %s", type(error).__name__)


async def heartbeat(context: BotCallbackContext) -> None:
    """The repeating job around send_heartbeat."""
    await send_heartbeat(context.personabot, context.bot.username)


async def post_init(application: BotApplication) -> None:
    """Before polling: the command menu, the heartbeat, and the replies owed since a restart."""
    await application.bot.set_my_commands(COMMANDS)
    assert application.job_queue is not None, "install python-telegram-bot[job-queue]"
    shared = bot_context(application)
    await send_heartbeat(shared, application.bot.username)
    application.job_queue.run_repeating(heartbeat, interval=HEARTBEAT_S, first=HEARTBEAT_S)
    service = shared.service
    owed = await service.owed()
    if not owed:
        return
    log.info("resuming %d pending replies after a restart", len(owed))
    # Their turns are taken now, before polling starts, so they go before any new message;
    # the tasks start once the application runs (and so are awaited when it stops).
    turns = [(pending, service.take_turn(pending.chat_id, decided=True)) for pending in owed]
    application.job_queue.run_once(resume, 0, data=turns)


async def resume(context: BotCallbackContext) -> None:
    """The one-off job that starts the owed replies (its data: their (PendingReply, Turn)s)."""
    assert context.job is not None
    for pending, turn in cast("list[tuple[PendingReply, Turn]]", context.job.data):
        context.application.create_task(resume_one(context.bot, context.personabot.service, pending, turn))


async def resume_one(bot: Bot, service: ReplyService, pending: PendingReply, turn: Turn) -> None:
    """Answer one owed reply; with no update to hand to the error handler, tell the chat here."""
    try:
        await service.answer(pending, turn)
    except Exception as error:  # noqa: BLE001 - reported to the log and the chat
        log.error("chat %s: resumed reply failed: %s: %s", pending.chat_id,
                  type(error).__name__, error, exc_info=error)
        try:
            await bot.send_message(pending.chat_id, ERROR_TEXT)
        except TelegramError as second:
            log.error("chat %s: could not report the error: %s", pending.chat_id,
                      type(second).__name__)


async def post_shutdown(application: BotApplication) -> None:
    """Close the Redis clients and the store that build_application opened."""
    shared = bot_context(application)
    await shared.aredis.aclose()
    shared.sync_redis.close()
    if shared.store is not None:
        shared.store.close()


def build_application(
    settings: Settings | None = None, *, celery: Celery | None = None, store: Store | None = None,
    on_timings: Callable[[ReplyTimings], None] | None = None,
) -> BotApplication:
    """The bot wired to Redis (memory, limits, reply streams), Celery and the store (read-only).

    `on_timings(ReplyTimings)` is called after each reply (the load benchmark uses it).
    """
    settings = settings or get_settings()
    token = _token(settings)
    if not settings.redis_url:
        raise BotConfigError("no Redis: set PERSONABOT_REDIS_URL (or start the bot with `personabot up`)")
    protect_token(token)
    aredis = async_client(settings.redis_url, concurrency=512)  # waits for a connection past 512, never fails
    sync_redis = redis.Redis.from_url(settings.redis_url)
    if celery is None:
        from personabot.workers.app import make_celery

        celery = make_celery(settings.redis_url)
    if store is None:
        store = Store(settings.db_url, migrate=False)
    memory = ChatMemory(aredis, turns=settings.history_turns, tokens=settings.history_tokens,
                        ttl_s=settings.history_ttl_s)
    limiter = ChatRateLimiter(
        private=ChatPacer(PRIVATE_MESSAGES_PER_S, PRIVATE_BURST),
        group=ChatPacer(1.0 / settings.edit_interval_s, 1),
        max_retries=3,
    )
    pacing = Pacing(limiter=limiter, draft_interval_s=settings.draft_interval_s,
                    edit_interval_s=settings.edit_interval_s)
    application = (
        ApplicationBuilder()
        .token(token)
        .base_url(settings.telegram_base_url)
        .rate_limiter(limiter)
        .concurrent_updates(True)
        .context_types(ContextTypes(context=BotCallbackContext))
        .post_init(post_init)
        .post_shutdown(post_shutdown)
        .build()
    )
    service = ReplyService(
        bot=application.bot, aredis=aredis, client=ChatClient(sync_redis, celery, aredis=aredis),
        memory=memory,
        pacing=pacing, reply_timeout_s=settings.reply_timeout_s,
        flood_wait_max_s=settings.flood_wait_max_s,
        on_timings=on_timings,
    )
    application.bot_data[BOT_DATA_KEY] = BotContext(
        service=service, memory=memory,
        rate_limiter=UserRateLimiter(aredis, settings.rate_limit_per_minute), store=store,
        allow_users=frozenset(settings.allow_users), allow_chats=frozenset(settings.allow_chats),
        max_message_chars=max_message_chars(settings), too_long_text=too_long_for_budget(settings),
        aredis=aredis, sync_redis=sync_redis,
    )
    register(application)
    return application


def run_bot(settings: Settings | None = None) -> None:
    """Run until interrupted: long polling, or a webhook when PERSONABOT_WEBHOOK_URL is set."""
    settings = settings or get_settings()
    application = build_application(settings)
    if not settings.webhook_url:
        application.run_polling(allowed_updates=Update.ALL_TYPES)
        return
    try:
        import tornado  # noqa: F401 - PTB's webhook server
    except ImportError:
        raise BotConfigError(
            "webhook mode needs tornado: pip install 'python-telegram-bot[webhooks]', "
            "or leave PERSONABOT_WEBHOOK_URL empty for polling"
        ) from None
    secret = hashlib.sha256(_token(settings).encode()).hexdigest()[:32]
    application.run_webhook(
        listen=settings.webhook_listen, port=settings.webhook_port,
        url_path=urlparse(settings.webhook_url).path.lstrip("/"),
        webhook_url=settings.webhook_url, secret_token=secret,
        allowed_updates=Update.ALL_TYPES,
    )

