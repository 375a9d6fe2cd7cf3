"""PTB handlers: commands, text messages, unsupported messages, the allow-list and the error handler."""

from __future__ import annotations

import asyncio
import logging

from telegram import BotCommand, Chat, Message, MessageEntity, Update
from telegram.constants import ChatType
from telegram.ext import (
    ApplicationHandlerStop,
    CommandHandler,
    MessageHandler,
    TypeHandler,
    filters,
)

from personabot.bot.context import BotApplication, BotCallbackContext, BotContext
from personabot.bot.replies import PendingReply

log = logging.getLogger(__name__)

COMMANDS = [
    BotCommand("start", "Say hello"),
    BotCommand("help", "What I can do"),
    BotCommand("reset", "Forget this chat's history"),
    BotCommand("stop", "Stop the reply being written"),
    BotCommand("about", "Who I am and which version answers"),
]
HELP_TEXT = (
    "Write to me and I'll answer. In groups, mention me or reply to one of my messages.\n\n"
    "/reset – forget this chat's history\n/stop – stop the reply being written\n"
    "/about – who I am and which version answers\n/help – this message"
)
UNSUPPORTED_TEXT = "I can only read text messages. Please write your question as text."
NOT_ALLOWED_TEXT = "Sorry, this bot is private."
ERROR_TEXT = "Sorry, something went wrong on my side. Please try again."
EDITED_TEXT = ("I had already answered this message before you edited it. Send the new text as "
               "a new message if you'd like an answer to it.")


def _is_private(chat: Chat) -> bool:
    return chat.type == ChatType.PRIVATE


async def gate(update: Update, context: BotCallbackContext) -> None:
    """The allow-list: updates from other users or chats stop here."""
    ctx = context.personabot
    user, chat = update.effective_user, update.effective_chat
    user_ok = not ctx.allow_users or (user is not None and user.id in ctx.allow_users)
    chat_ok = not ctx.allow_chats or (chat is not None and chat.id in ctx.allow_chats)
    if user_ok and chat_ok:
        return
    if chat is not None and _is_private(chat) and update.message is not None:
        await update.message.reply_text(NOT_ALLOWED_TEXT)
    raise ApplicationHandlerStop


def addressed_text(message: Message, bot_username: str, bot_id: int) -> str | None:
    """The text meant for the bot; in groups only when it mentions the bot or replies to it."""
    text = message.text or message.caption or ""
    if _is_private(message.chat):
        return text
    replied = message.reply_to_message
    if replied is not None and replied.from_user is not None and replied.from_user.id == bot_id:
        return text
    mention = f"@{bot_username}".lower()
    parsed = message.parse_entities() if message.text else message.parse_caption_entities()
    for entity, value in parsed.items():
        if entity.type == MessageEntity.MENTION and value.lower() == mention:
            # Entity offsets count UTF-16 code units, not Python characters.
            units = text.encode("utf-16-le")
            start, end = 2 * entity.offset, 2 * (entity.offset + entity.length)
            return (units[:start] + units[end:]).decode("utf-16-le").strip()
        if (entity.type == MessageEntity.TEXT_MENTION and entity.user is not None
                and entity.user.id == bot_id):
            return text
    return None


async def on_text(update: Update, context: BotCallbackContext) -> None:
    message = update.message
    if message is None or message.from_user is None:
        return
    text = addressed_text(message, context.bot.username, context.bot.id)
    if text is None:
        return
    if not text.strip():
        await message.reply_text("Yes? Write your question after the mention.")
        return
    await _answer_text(update, context, message, text)


async def on_edited(update: Update, context: BotCallbackContext) -> None:
    """An edited message: its reply answers the new text if it was not asked for yet; once it
    was, a short note says so (the answer is not redone); an edit of a message the bot never
    took up (e.g. a mention added in a group) is answered like a new message."""
    message = update.edited_message
    if message is None or message.from_user is None:
        return
    text = addressed_text(message, context.bot.username, context.bot.id)
    if text is None or not text.strip():
        return
    ctx = context.personabot
    outcome = await ctx.service.edit(PendingReply.field_for(message.chat_id, message.message_id), text)
    if outcome == "answered":
        await message.reply_text(EDITED_TEXT, do_quote=True)
    elif outcome == "unknown":
        await _answer_text(update, context, message, text)


async def _answer_text(update: Update, context: BotCallbackContext, message: Message,
                       text: str) -> None:
    assert message.from_user is not None
    ctx = context.personabot
    if len(text) > ctx.max_message_chars:  # cannot fit the prompt: say so before enqueueing
        await message.reply_text(ctx.too_long_text, do_quote=True)
        return
    pending = PendingReply(chat_id=message.chat_id, message_id=message.message_id,
                           user_text=text, private=_is_private(message.chat))
    turn = ctx.service.take_turn(message.chat_id)  # before any await: keeps arrival order
    ctx.service.expect(pending)  # from now on an edit changes what will be answered
    try:
        await turn.wait_to_decide()  # rate decisions in arrival order, too
        decision = await ctx.rate_limiter.check(message.from_user.id)
        turn.decide()
        if not decision.allowed:
            ctx.service.forget(pending)
            turn.pass_on()
            if decision.notify:
                await message.reply_text(  # quoted: in a burst, it says which one was refused
                    "You're sending messages a bit fast. Please wait about "
                    f"{int(decision.retry_after_s + 0.5)} s and try again.", do_quote=True,
                )
            return
        # A reply can take a while: answer in a task so that this update (and its slot among
        # PTB's concurrent updates) is done; /stop and other chats are never held up.
        context.application.create_task(ctx.service.accept(pending, turn), update=update)
    except BaseException:
        ctx.service.forget(pending)
        turn.pass_on()  # e.g. Redis down: the chat's next message must not wait for this one
        raise


async def on_unsupported(update: Update, context: BotCallbackContext) -> None:
    message = update.message
    if message is None:
        return
    if addressed_text(message, context.bot.username, context.bot.id) is None:
        return
    await message.reply_text(UNSUPPORTED_TEXT)


async def cmd_start(update: Update, context: BotCallbackContext) -> None:
    assert update.message is not None
    name = (await _persona_name(context.personabot)) or context.bot.first_name
    await update.message.reply_text(f"Hi! I'm {name}. Ask me anything.\n\n{HELP_TEXT}")


async def cmd_help(update: Update, _context: BotCallbackContext) -> None:
    assert update.message is not None
    await update.message.reply_text(HELP_TEXT)


async def cmd_reset(update: Update, context: BotCallbackContext) -> None:
    assert update.message is not None
    await context.personabot.memory.clear(update.message.chat_id)
    await update.message.reply_text("Done: I've forgotten our conversation.")


async def cmd_stop(update: Update, context: BotCallbackContext) -> None:
    assert update.message is not None
    stopped = await context.personabot.service.stop(update.message.chat_id)
    if not stopped:
        await update.message.reply_text("There is no reply being written right now.")


async def _persona_name(ctx: BotContext) -> str:
    if ctx.store is None:
        return ""
    try:
        return (await asyncio.to_thread(ctx.store.get_persona)).name
    except Exception as error:  # noqa: BLE001 - the store may be unreachable; answer anyway
        log.warning("persona unavailable: %s", type(error).__name__)
        return ""


async def cmd_about(update: Update, context: BotCallbackContext) -> None:
    assert update.message is not None
    ctx = context.personabot
    name = (await _persona_name(ctx)) or context.bot.first_name
    version = "unknown"
    if ctx.store is not None:
        try:
            active = await asyncio.to_thread(ctx.store.active_adapter)
            version = active.name if active is not None else "base model (no adapter yet)"
        except Exception as error:  # noqa: BLE001 - the store may be unreachable; answer anyway
            log.warning("active adapter unavailable: %s", type(error).__name__)
    await update.message.reply_text(f"I'm {name}.\nActive version: {version}")


async def on_error(update: object, context: BotCallbackContext) -> None:
    """The one error handler: log the chat id and the error (never the token), tell the user."""
    chat = update.effective_chat if isinstance(update, Update) else None
    error = context.error
    log.error("chat %s: %s: %s", chat.id if chat else "-", type(error).__name__, error,
              exc_info=error)
    if chat is None:
        return
    try:
        await context.bot.send_message(chat.id, ERROR_TEXT)
    except Exception as second:  # noqa: BLE001 - nothing more to do than log it
        log.error("chat %s: could not report the error: %s", chat.id, type(second).__name__)


def register(application: BotApplication) -> None:
    """Add every handler; the allow-list runs first (group -1)."""
    application.add_handler(TypeHandler(Update, gate), group=-1)
    application.add_handler(CommandHandler("start", cmd_start))
    application.add_handler(CommandHandler("help", cmd_help))
    application.add_handler(CommandHandler("reset", cmd_reset))
    application.add_handler(CommandHandler("stop", cmd_stop))
    application.add_handler(CommandHandler("about", cmd_about))
    application.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.TEXT
                                           & ~filters.COMMAND, on_text))
    application.add_handler(MessageHandler(filters.UpdateType.EDITED_MESSAGE & filters.TEXT
                                           & ~filters.COMMAND, on_edited))
    application.add_handler(MessageHandler(
        filters.UpdateType.MESSAGE & ~filters.TEXT & ~filters.StatusUpdate.ALL, on_unsupported))
    application.add_error_handler(on_error)
