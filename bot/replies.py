"""One user message -> one streamed reply: queueing per chat, the chat worker, pending records."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, Field, ValidationError
from telegram import Bot
from telegram.constants import ChatAction

from personabot.bot.length import too_long_from_error
from personabot.bot.memory import ChatMemory
from personabot.bot.streaming import (
    DeliveryState,
    FloodWaitExceeded,
    Pacing,
    ReplyDelivery,
    through_flood,
)
from personabot.core import keys
from personabot.core.schemas import ChatRequest, ChatResult, Message
from personabot.workers.client import ChatClient

log = logging.getLogger(__name__)

PENDING_KEY = keys.BOT_PENDING
BUSY_TEXT = "I'm busy right now, please try again in a moment."
FAILED_TEXT = "Sorry, I couldn't answer that. Please try again, or /reset to start over."
STOPPED_TEXT = "Stopped."
STOPPED_MARK = "(stopped)"
TYPING_EVERY_S = 4.5
MAX_REMEMBERED_MESSAGES = 4096  # answered messages whose edits get a note rather than an answer
EditOutcome = Literal["updated", "answered", "unknown"]


class PendingReply(BaseModel):
    """A message the bot owes a reply to, kept in Redis until the reply is delivered."""

    chat_id: int
    message_id: int
    user_text: str
    private: bool
    request_id: str = ""
    sent_ids: list[int] = Field(default_factory=list)
    live_id: int | None = None
    received_at: float = Field(default_factory=time.time)

    @property
    def field(self) -> str:
        return self.field_for(self.chat_id, self.message_id)

    @staticmethod
    def field_for(chat_id: int, message_id: int) -> str:
        """The record's key in PENDING_KEY."""
        return f"{chat_id}:{message_id}"


def stopped_reply(text: str) -> str:
    """A reply cut by /stop, as the user sees it and memory keeps it: marked as cut."""
    return f"{text.rstrip()} …\n\n{STOPPED_MARK}"


@dataclass
class ReplyTimings:
    """Where one reply's time went, for the load benchmark (seconds)."""

    private: bool = True
    before_submit: float = 0.0  # handler start -> request enqueued
    after_final: float = 0.0  # final entry read -> last piece delivered
    total: float = 0.0  # handler start -> last piece delivered
    generation: ChatResult | None = None

    @property
    def overhead(self) -> float:
        """The bot's share: total minus the worker's queue wait and generation."""
        worker = self.generation.queued_s + self.generation.total_s if self.generation else 0.0
        return max(0.0, self.total - worker)


@dataclass
class Turn:
    """A message's place in its chat's line.

    Two steps keep arrival order: the rate decision waits for the previous message's decision
    (`wait_to_decide`, then `decide`), the answer waits for the previous message's answer
    (`wait_for_previous`). A message that is not answered (refused, failed) `pass_on`s: the next
    one then waits for the message before this one, so it neither blocks nor skips ahead.
    """

    chat_id: int
    previous: Turn | None
    registry: dict[int, Turn]
    decided: asyncio.Future[None]
    done: asyncio.Future[None]

    async def wait_to_decide(self) -> None:
        if self.previous is not None:
            await asyncio.shield(self.previous.decided)

    def decide(self) -> None:
        if not self.decided.done():
            self.decided.set_result(None)

    async def wait_for_previous(self) -> None:
        if self.previous is not None:
            await asyncio.shield(self.previous.done)

    def pass_on(self) -> None:
        """This message gets no answer: decided now, done once the message before it is."""
        self.decide()
        if self.previous is None or self.previous.done.done():
            self.release()
        else:
            self.previous.done.add_done_callback(lambda _future: self.release())

    def release(self) -> None:
        self.decide()
        if not self.done.done():
            self.done.set_result(None)
        self.previous = None  # the line behind a finished turn needs nothing before it
        if self.registry.get(self.chat_id) is self:
            del self.registry[self.chat_id]


@dataclass
class ReplyService:
    """Turns pending messages into replies, one at a time per chat, in arrival order."""

    bot: Bot
    aredis: aioredis.Redis
    client: ChatClient  # the chat worker: submit, stream the reply, cancel
    memory: ChatMemory
    pacing: Pacing
    reply_timeout_s: float
    flood_wait_max_s: float
    on_timings: Callable[[ReplyTimings], None] | None = None
    _last_turn: dict[int, Turn] = field(default_factory=dict)
    _waiting: dict[str, PendingReply] = field(default_factory=dict)  # accepted, not yet asked
    _taken: OrderedDict[str, None] = field(default_factory=OrderedDict)  # asked or answered (recent)
    _running: dict[int, str] = field(default_factory=dict)

    def take_turn(self, chat_id: int, *, decided: bool = False) -> Turn:
        """Reserve this chat's next place in line. Call it before the handler's first await,
        so messages are decided and answered in the order they arrived; `pass_on()` it if the
        message gets no answer. `decided`: no rate decision to make (a resumed reply)."""
        loop = asyncio.get_running_loop()
        turn = Turn(chat_id, self._last_turn.get(chat_id), self._last_turn,
                    loop.create_future(), loop.create_future())
        if decided:
            turn.decide()
        self._last_turn[chat_id] = turn
        return turn

    async def accept(self, pending: PendingReply, turn: Turn) -> None:
        """Record the message (so a restart still answers it), then answer it in its turn."""
        try:
            await self._save(pending)
            await self.answer(pending, turn)
        finally:
            self.forget(pending)
            turn.release()

    def expect(self, pending: PendingReply) -> None:
        """This message will be answered: until it is asked for, an `edit` changes its text."""
        self._waiting[pending.field] = pending

    def forget(self, pending: PendingReply) -> None:
        """This message will not be answered (refused) or was: edits no longer change it."""
        self._waiting.pop(pending.field, None)

    async def edit(self, pending_field: str, text: str) -> EditOutcome:
        """A user edited a message: "updated" when its reply was not asked for yet (it will
        answer `text`), "answered" when it was (or is being) answered, else "unknown"."""
        pending = self._waiting.get(pending_field)
        if pending is not None:
            pending.user_text = text
            await self._save(pending)
            return "updated"
        return "answered" if pending_field in self._taken else "unknown"

    def _take(self, pending: PendingReply) -> None:
        """From now on an edit of this message comes too late."""
        self._waiting.pop(pending.field, None)
        self._taken[pending.field] = None
        while len(self._taken) > MAX_REMEMBERED_MESSAGES:
            self._taken.popitem(last=False)

    async def _save(self, pending: PendingReply) -> None:
        await self.aredis.hset(PENDING_KEY, pending.field, pending.model_dump_json())

    async def answer(self, pending: PendingReply, turn: Turn) -> None:
        """Wait for the chat's previous reply, answer, then let the next one go."""
        try:
            await turn.wait_for_previous()
            keep = False
            try:
                await self._answer(pending)
            except asyncio.CancelledError:
                keep = True  # shutting down: keep the record, the next start answers it
                raise
            except FloodWaitExceeded as error:
                # Never dropped: the reply stays owed, and its stream holds the finished text.
                keep = True
                log.error("chat %s: %s; the reply stays pending until the bot next starts",
                          pending.chat_id, error)
            finally:
                self._running.pop(pending.chat_id, None)
                if not keep:
                    await self.aredis.hdel(PENDING_KEY, pending.field)
        finally:
            turn.release()

    async def _answer(self, pending: PendingReply) -> None:
        timings = ReplyTimings(private=pending.private)
        started = time.perf_counter()
        self._take(pending)
        if not pending.request_id:
            history = await self.memory.load(pending.chat_id)
            request = ChatRequest(
                messages=[*history, Message(role="user", content=pending.user_text)],
                chat_id=str(pending.chat_id), source="telegram",
            )
            pending.request_id = request.request_id
            await self._save(pending)
            await self.client.asubmit(request)
        self._running[pending.chat_id] = pending.request_id
        timings.before_submit = time.perf_counter() - started

        async def persist(state: DeliveryState) -> None:
            pending.sent_ids, pending.live_id = state.sent_ids, state.live_id
            await self._save(pending)

        delivery = ReplyDelivery(
            self.bot, pending.chat_id, private=pending.private, reply_to=pending.message_id,
            pacing=self.pacing, state=DeliveryState(list(pending.sent_ids), pending.live_id),
            on_state=persist,
        )
        result = await self._stream(pending, delivery)
        final_read = time.perf_counter()
        if result is None:
            await self._deliver(pending, lambda: delivery.notice(BUSY_TEXT))
            return
        await self._deliver(pending, lambda: self._final(pending, delivery, result))
        timings.after_final = time.perf_counter() - final_read
        timings.total = time.perf_counter() - started
        timings.generation = result
        await self._remember(pending, result)
        if self.on_timings is not None:
            self.on_timings(timings)

    async def _deliver(self, pending: PendingReply, send: Callable[[], Awaitable[None]]) -> None:
        """The final delivery waits out Telegram's flood control, up to `flood_wait_max_s`."""
        await through_flood(send, chat_id=pending.chat_id, max_wait_s=self.flood_wait_max_s)

    async def _final(self, pending: PendingReply, delivery: ReplyDelivery, result: ChatResult) -> None:
        # `finish` only completes the streamed text; the bot's own words go through `notice`,
        # which is delivered however many pieces of the reply were sent before it.
        if result.finish_reason == "error":
            too_long = too_long_from_error(result.error, pending.user_text)
            if too_long is None:  # retrying or /reset may help only with a real failure
                log.warning("chat %s: the worker failed request %s: %s", pending.chat_id,
                            result.request_id, result.error)
            await delivery.notice(too_long or FAILED_TEXT)
        elif result.finish_reason == "cancelled" and result.text.strip():
            await delivery.finish(stopped_reply(result.text))
        elif result.text.strip():
            await delivery.finish(result.text)
        else:
            await delivery.notice(STOPPED_TEXT if result.finish_reason == "cancelled" else "…")

    async def _remember(self, pending: PendingReply, result: ChatResult) -> None:
        if result.finish_reason == "cancelled":
            # /stop: memory keeps what the user saw, marked as cut, so that "go on" or a question
            # about it has its context and the model does not take it for a whole answer. A
            # reply stopped before any text showed nothing: no turn to remember.
            if result.text.strip():
                await self.memory.add_turn(pending.chat_id, pending.user_text,
                                           stopped_reply(result.text))
        elif result.finish_reason not in ("error", "updating"):  # an "updating" notice is no answer
            await self.memory.add_turn(pending.chat_id, pending.user_text, result.text)

    async def _stream(self, pending: PendingReply, delivery: ReplyDelivery) -> ChatResult | None:
        """Show the reply as it grows; the final result, or None when the worker is down/slow."""
        typing = asyncio.create_task(self._typing(pending.chat_id))
        try:
            async for update in self.client.astream(pending.request_id,
                                                    timeout_s=self.reply_timeout_s):
                if update.result is not None:
                    return update.result
                if update.restarted:
                    # The worker started this reply over (it was redelivered after a crash).
                    await delivery.restart()
                else:
                    await delivery.update(update.text)
                if delivery.visible:  # typing until the chat shows the first text
                    typing.cancel()
        except TimeoutError:
            log.warning("chat %s: no reply for request %s within %.0fs; told the user to retry",
                        pending.chat_id, pending.request_id, self.reply_timeout_s)
            await asyncio.to_thread(self.client.cancel, pending.request_id)
        finally:
            typing.cancel()
        return None

    async def _typing(self, chat_id: int) -> None:
        """'typing…' until the reply shows (queued, then written; Telegram shows it for 5 s)."""
        while True:
            if self.pacing.limiter.has_room():  # best effort, like drafts
                try:
                    await self.bot.send_chat_action(chat_id, ChatAction.TYPING)
                except Exception as error:  # noqa: BLE001 - cosmetic; the reply reports errors
                    log.info("chat %s: typing action failed: %s", chat_id, type(error).__name__)
                await asyncio.sleep(TYPING_EVERY_S)
            else:
                await asyncio.sleep(0.2)

    async def stop(self, chat_id: int) -> bool:
        """Cancel the reply being generated in this chat; False when there is none."""
        request_id = self._running.get(chat_id)
        if not request_id:
            return False
        await asyncio.to_thread(self.client.cancel, request_id)
        return True

    async def owed(self) -> list[PendingReply]:
        """After a restart: the messages still owed a reply, oldest first (answer them with
        `answer(pending, take_turn(chat_id))` in this order)."""
        raw = await self.aredis.hgetall(PENDING_KEY)
        owed = []
        for key, value in raw.items():
            try:
                owed.append(PendingReply.model_validate_json(value))
            except ValidationError as error:
                log.error("dropping unreadable pending reply %r: %d validation errors",
                          key, error.error_count())
                await self.aredis.hdel(PENDING_KEY, key)
        return sorted(owed, key=lambda p: (p.received_at, p.message_id))
