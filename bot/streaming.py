"""Streaming a reply to Telegram: drafts in private chats, send-then-edit in groups, split pieces."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from telegram import Bot, Message, ReplyParameters
from telegram.constants import ParseMode
from telegram.error import BadRequest, RetryAfter, TelegramError

from personabot.bot.formatting import split_text, to_html
from personabot.bot.limits import ChatRateLimiter

log = logging.getLogger(__name__)


def _is_parse_error(error: BadRequest) -> bool:
    return "can't parse entities" in error.message.lower()


def _is_not_modified(error: BadRequest) -> bool:
    return "message is not modified" in error.message.lower()


def _is_gone(error: TelegramError) -> bool:
    return isinstance(error, BadRequest) and "message to edit not found" in error.message.lower()


async def send_text(bot: Bot, chat_id: int, text: str, *, reply_to: int | None = None) -> Message:
    """Send one piece as HTML; on a parse error resend it as plain text."""
    reply = ReplyParameters(reply_to, allow_sending_without_reply=True) if reply_to else None
    try:
        return await bot.send_message(chat_id, to_html(text), parse_mode=ParseMode.HTML,
                                      reply_parameters=reply)
    except BadRequest as error:
        if not _is_parse_error(error):
            raise
        log.warning("chat %s: Telegram rejected the HTML (%s); resending as plain text",
                    chat_id, error.message)
        return await bot.send_message(chat_id, text, reply_parameters=reply)


async def edit_text(bot: Bot, chat_id: int, message_id: int, text: str) -> None:
    """Edit one message as HTML; plain text on a parse error; 'not modified' is not an error."""
    try:
        try:
            await bot.edit_message_text(to_html(text), chat_id=chat_id, message_id=message_id,
                                        parse_mode=ParseMode.HTML)
        except BadRequest as error:
            if not _is_parse_error(error):
                raise
            await bot.edit_message_text(text, chat_id=chat_id, message_id=message_id)
    except BadRequest as error:
        if not _is_not_modified(error):
            raise


class FloodWaitExceeded(RuntimeError):
    """Telegram's flood control kept refusing a reply for longer than the configured bound."""


def _retry_after_s(error: RetryAfter) -> float:
    value = error.retry_after  # an int today, a timedelta in a later PTB
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


async def through_flood(send: Callable[[], Awaitable[None]], *, chat_id: int, max_wait_s: float) -> None:
    """Run `send` (a delivery that resumes where it stopped) until it gets through Telegram's
    flood control: after each 429 (PTB's own retries exhausted) wait retry_after and go on,
    for at most `max_wait_s` since the delivery began (PTB's retries count); then
    FloodWaitExceeded."""
    started = time.monotonic()
    while True:
        try:
            await send()
            return
        except RetryAfter as error:
            wait = _retry_after_s(error)
            if time.monotonic() + wait - started > max_wait_s:
                raise FloodWaitExceeded(
                    f"Telegram's flood control refused chat {chat_id} for over {max_wait_s:.0f}s "
                    "(PERSONABOT_FLOOD_WAIT_MAX_S)") from error
            log.warning("chat %s: flood control, retrying the reply in %.0fs", chat_id, wait)
            await asyncio.sleep(wait)


@dataclass
class Pacing:
    """The limiter every request goes through, and how often a growing reply is shown."""

    limiter: ChatRateLimiter
    draft_interval_s: float
    edit_interval_s: float
    drafts: bool = True  # False once the Bot API answered "Not Found": private chats then edit


@dataclass
class DeliveryState:
    """What has reached the chat so far; persisted so a restarted bot continues without repeats."""

    sent_ids: list[int] = field(default_factory=list)  # messages holding finished pieces
    live_id: int | None = None  # group: the message being edited with the growing piece


class ReplyDelivery:
    """Shows a growing reply in one chat and delivers the final text in <= 4096-char pieces.

    Private chats: the growing piece is a draft (sendMessageDraft) and each finished piece is a
    sendMessage. Groups: the first piece is sent once, then edited at most once per
    `edit_interval_s`; when it fills up it gets its final text and a new message continues.
    Intermediate updates (best effort) are skipped, never queued, when the limiter has no room.
    """

    def __init__(self, bot: Bot, chat_id: int, *, private: bool, reply_to: int | None,
                 pacing: Pacing, state: DeliveryState | None = None,
                 on_state: Callable[[DeliveryState], Awaitable[None]] | None = None) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.private = private
        self.reply_to = reply_to
        self.pacing = pacing
        self.state = state or DeliveryState()
        self.on_state = on_state
        self.draft_id = random.randint(1, 2**31 - 1)
        self._last_update = 0.0
        self._first_token_at: float | None = None
        self._live_text = ""
        self._drafted = False

    @property
    def visible(self) -> bool:
        """Has the chat seen any of this reply (a draft, the growing message, a piece)?"""
        return self._drafted or bool(self.state.sent_ids) or self.state.live_id is not None

    async def _changed(self) -> None:
        if self.on_state is not None:
            await self.on_state(self.state)

    async def _send(self, text: str) -> int:
        first = not self.state.sent_ids and self.state.live_id is None
        message = await send_text(self.bot, self.chat_id, text,
                                  reply_to=self.reply_to if first else None)
        return message.message_id

    async def _settle(self, piece: str) -> None:
        """Deliver one finished piece."""
        if self.state.live_id is not None:
            if to_html(piece) != self._live_text:
                await edit_text(self.bot, self.chat_id, self.state.live_id, piece)
            self.state.sent_ids.append(self.state.live_id)
            self.state.live_id = None
            self._live_text = ""
        else:
            self.state.sent_ids.append(await self._send(piece))
        await self._changed()

    async def _settle_pieces(self, pieces: list[str]) -> None:
        for piece in pieces[len(self.state.sent_ids):]:
            if piece.strip():
                await self._settle(piece)

    async def update(self, text: str) -> None:
        """The reply so far: settle finished pieces, maybe show the growing one."""
        pieces = split_text(text.strip())  # as `finish` will: the same pieces
        await self._settle_pieces(pieces[:-1])
        tail = pieces[-1]
        rendered = to_html(tail)
        if not tail.strip() or rendered == self._live_text:
            return
        drafting = self.private and self.pacing.drafts
        interval = self.pacing.draft_interval_s if drafting else self.pacing.edit_interval_s
        now = time.monotonic()
        if self._first_token_at is None:
            self._first_token_at = now
        if now - max(self._last_update, self._first_token_at) < interval:
            # Also waits one interval after the first token: a short reply is then sent once,
            # with no edit (groups) or draft, and no wait for the per-chat pacing.
            return
        limiter = self.pacing.limiter
        if drafting:
            if not limiter.has_room():
                return
            shown = await self._draft(tail)
        elif self.state.live_id is None:
            shown = await self._show_live(tail)
        else:
            if not (limiter.has_room() and limiter.pacer(self.chat_id).ready(self.chat_id)):
                return
            shown = await self._edit_live(tail)
        if shown:
            self._live_text = rendered
        self._last_update = time.monotonic()

    def _skipped(self, what: str, error: TelegramError) -> None:
        log.warning("chat %s: %s skipped: %s", self.chat_id, what, type(error).__name__)

    async def _show_live(self, tail: str) -> bool:
        """Group: send the message that will grow (best effort; False when skipped)."""
        try:
            self.state.live_id = await self._send(tail)
        except TelegramError as error:
            self._skipped("first group update", error)
            return False
        await self._changed()
        return True

    async def _edit_live(self, tail: str) -> bool:
        """Group: edit the growing message (best effort; a deleted one is sent anew next time)."""
        assert self.state.live_id is not None
        try:
            await edit_text(self.bot, self.chat_id, self.state.live_id, tail)
        except TelegramError as error:
            self._skipped("group edit", error)
            if _is_gone(error):
                self.state.live_id = None
                self._live_text = ""
                await self._changed()
            return False
        return True

    async def _draft(self, text: str) -> bool:
        """Private: show the growing piece as a draft (best effort; False when skipped)."""
        try:
            try:
                await self.bot.send_message_draft(self.chat_id, self.draft_id, to_html(text),
                                                  parse_mode=ParseMode.HTML)
            except BadRequest as error:
                if not _is_parse_error(error):
                    raise
                await self.bot.send_message_draft(self.chat_id, self.draft_id, text)
        except TelegramError as error:
            if "not found" in str(error).lower():
                # An older (self-hosted) Bot API without sendMessageDraft: edit instead, from now on.
                self.pacing.drafts = False
                log.warning("the Bot API has no sendMessageDraft; private chats now use send-then-edit")
                return False
            self._skipped("draft", error)
            return False
        self._drafted = True
        return True

    async def finish(self, text: str) -> None:
        """Deliver the whole final text: the pieces not yet delivered."""
        await self._settle_pieces(split_text(text.strip()))

    async def notice(self, text: str) -> None:
        """A message from the bot itself (e.g. 'busy'), after whatever was shown so far.

        A group's growing message keeps what it shows and is settled first, so the notice
        always reaches the chat, however much of the reply was delivered before it.
        """
        if self.state.live_id is not None:
            self.state.sent_ids.append(self.state.live_id)
            self.state.live_id = None
            self._live_text = ""
        self.state.sent_ids.append(await self._send(text))
        await self._changed()

    async def restart(self) -> None:
        """The worker restarted this reply: remove what was shown of the old attempt.

        A growing message that is the reply's first (it carries the link to the user's message)
        is kept and edited with the new text; a continuation is removed too, so that the new
        answer's first message is again sent as a reply.
        """
        doomed = list(self.state.sent_ids)
        if self.state.sent_ids and self.state.live_id is not None:
            doomed.append(self.state.live_id)
            self.state.live_id = None
        for message_id in doomed:
            try:
                await self.bot.delete_message(self.chat_id, message_id)
            except TelegramError as error:  # e.g. the user deleted it already
                self._skipped(f"deleting message {message_id}", error)
        self.state.sent_ids = []
        self._live_text = ""
        await self._changed()
