"""The bot's shared state and the typed PTB callback context that hands it to handlers and jobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from telegram.ext import Application, CallbackContext, ExtBot, JobQueue

from personabot.bot.limits import UserRateLimiter
from personabot.bot.memory import ChatMemory
from personabot.bot.replies import ReplyService
from personabot.core.store import Store

BOT_DATA_KEY = "personabot"


@dataclass
class BotContext:
    """Everything the handlers and jobs share, kept in `application.bot_data['personabot']`."""

    service: ReplyService
    memory: ChatMemory
    rate_limiter: UserRateLimiter
    store: Store | None
    allow_users: frozenset[int]
    allow_chats: frozenset[int]
    max_message_chars: int  # longer messages cannot fit the worker's prompt
    too_long_text: str
    aredis: aioredis.Redis
    sync_redis: redis.Redis


class BotCallbackContext(CallbackContext[ExtBot[int], dict[Any, Any], dict[Any, Any], dict[Any, Any]]):
    """PTB's context for every handler and job of this bot (set via `ContextTypes(context=...)`)."""

    @property
    def personabot(self) -> BotContext:
        """The bot's shared state."""
        return bot_context(self.application)


# The bot is ExtBot[int] through its AIORateLimiter (retries); PTB's builder types the default job queue
# with the default context, hence JobQueue[Any] (its jobs get a BotCallbackContext all the same).
BotApplication = Application[ExtBot[int], BotCallbackContext, dict[Any, Any], dict[Any, Any], dict[Any, Any],
                             JobQueue[Any]]


def bot_context(application: Application[Any, Any, Any, Any, Any, Any]) -> BotContext:
    """The BotContext that build_application put into the application's bot_data."""
    shared: BotContext = application.bot_data[BOT_DATA_KEY]
    return shared
