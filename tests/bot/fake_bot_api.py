"""A strict fake Telegram Bot API server on 127.0.0.1 for the bot's tests and load benchmark.

It runs aiohttp in its own thread, so sync tests, async tests and a bot subprocess can all use
it. It keeps Telegram's rules that the bot must respect: text <= 4096 UTF-16 units after entity
parsing, strict HTML/MarkdownV2 parsing, "message is not modified", drafts only in private
chats, flood control (429 with retry_after), and it records every request with its time.

Flood rules: see `tests.bot.telegram_flood`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.bot.telegram_flood import ApiError, FloodControl, FloodRules
from tests.bot.telegram_markup import MarkupError, parse_html, parse_markdown_v2, utf16_len

MAX_TEXT = 4096
CHAT_ACTIONS = {"typing", "upload_photo", "record_video", "upload_video", "record_voice",
                "upload_voice", "upload_document", "choose_sticker", "find_location",
                "record_video_note", "upload_video_note"}
INT_PARAMS = {"chat_id", "message_id", "draft_id", "offset", "limit", "timeout",
              "message_thread_id"}
JSON_PARAMS = {"reply_parameters", "commands", "entities", "reply_markup", "allowed_updates",
               "scope", "link_preview_options"}


@dataclass
class Recorded:
    """One request as the server saw it."""

    at: float  # time.monotonic() when it arrived
    method: str
    params: dict[str, Any]
    ok: bool = True
    error_code: int = 0
    description: str = ""
    wall: float = field(default_factory=time.time)  # time.time(), to compare with Redis stream ids

    @property
    def chat_id(self) -> int | None:
        value = self.params.get("chat_id")
        return int(value) if value is not None else None


@dataclass
class StoredMessage:
    message_id: int
    chat_id: int
    from_bot: bool
    text: str
    entities: list[dict[str, Any]] = field(default_factory=list)
    reply_to: int | None = None


class FakeBotApi:
    """Start with `start()`; point PTB at `base_url`; inject updates with `user_says()` & co."""

    def __init__(self, token: str = "123456:TEST-token-secret", *, bot_id: int = 123456,
                 username: str = "persona_bot", flood: FloodRules | None = None) -> None:
        self.token = token
        self.bot_user = {"id": bot_id, "is_bot": True, "first_name": "Persona",
                         "username": username, "can_join_groups": True,
                         "can_read_all_group_messages": False, "supports_inline_queries": False}
        self.flood = FloodControl(flood or FloodRules())
        self.recorded: list[Recorded] = []
        self.chats: dict[int, dict[str, Any]] = {}
        self.messages: dict[int, dict[int, StoredMessage]] = {}
        self.drafts: dict[int, list[str]] = {}
        self.drafts_supported = True  # False: answer sendMessageDraft 404 like an old self-hosted server
        self.commands: list[dict[str, str]] = []
        self.confirmed_offset = 0
        self._next_message_id: dict[int, int] = {}
        self._updates: list[dict[str, Any]] = []
        self._next_update_id = 1
        self._failures: list[tuple[str, ApiError]] = []
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._new_update: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    def start(self) -> FakeBotApi:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start_server())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-bot-api", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake Bot API server did not start")
        return self

    async def _start_server(self) -> None:
        self._new_update = asyncio.Condition()
        app = web.Application(client_max_size=1 << 22)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)  # type: ignore[union-attr]
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    # --- test API: chats and updates ------------------------------------------------------------
    def private_chat(self, user_id: int, first_name: str = "Alice") -> dict[str, Any]:
        return self._chat({"id": user_id, "type": "private", "first_name": first_name})

    def group_chat(self, chat_id: int, title: str = "Group") -> dict[str, Any]:
        assert chat_id < 0, "group chat ids are negative"
        return self._chat({"id": chat_id, "type": "supergroup", "title": title})

    def _chat(self, chat: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.chats[chat["id"]] = chat
            self.messages.setdefault(chat["id"], {})
        return chat

    @staticmethod
    def user(user_id: int, first_name: str = "Alice") -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": first_name}

    def _new_message_id(self, chat_id: int) -> int:
        with self._lock:
            value = self._next_message_id.get(chat_id, 1)
            self._next_message_id[chat_id] = value + 1
            return value

    def user_says(self, chat: dict[str, Any], text: str, *, user: dict[str, Any] | None = None,
                  reply_to: int | None = None, **extra: Any) -> dict[str, Any]:
        """Inject a text message (commands and @mentions get their entities)."""
        return self.user_sends(chat, {**self._text_content(text), **extra}, user=user,
                               reply_to=reply_to)

    @staticmethod
    def _text_content(text: str) -> dict[str, Any]:
        entities = []
        for index, word in enumerate(text.split(" ")):
            offset = utf16_len(" ".join(text.split(" ")[:index])) + (1 if index else 0)
            if word.startswith("/") and index == 0:
                entities.append({"type": "bot_command", "offset": 0, "length": utf16_len(word)})
            elif word.startswith("@") and len(word) > 1:
                entities.append({"type": "mention", "offset": offset, "length": utf16_len(word)})
        return {"text": text, **({"entities": entities} if entities else {})}

    def user_edits(self, message: dict[str, Any], text: str) -> dict[str, Any]:
        """Inject an edited_message update: `message` (from user_says) now reads `text`."""
        chat = message["chat"]
        edited = {**self._text_content(text), "message_id": message["message_id"],
                  "date": message["date"], "edit_date": int(time.time()), "chat": chat,
                  "from": message["from"]}
        with self._lock:
            self.messages[chat["id"]][message["message_id"]].text = text
        self.inject({"edited_message": edited})
        return edited

    def user_sends(self, chat: dict[str, Any], content: dict[str, Any], *,
                   user: dict[str, Any] | None = None, reply_to: int | None = None) -> dict[str, Any]:
        """Inject any message (content: {"sticker": {...}}, {"photo": [...]}, ...)."""
        sender = user or self.user(chat["id"] if chat["type"] == "private" else 1001)
        message_id = self._new_message_id(chat["id"])
        message = {"message_id": message_id, "date": int(time.time()), "chat": chat,
                   "from": sender, **content}
        if reply_to is not None:
            replied = self.messages[chat["id"]][reply_to]
            message["reply_to_message"] = self._message_json(replied)
        with self._lock:
            self.messages[chat["id"]][message_id] = StoredMessage(
                message_id, chat["id"], False, content.get("text", ""), reply_to=reply_to)
        self.inject({"message": message})
        return message

    def inject(self, update: dict[str, Any]) -> int:
        """Queue a raw update; returns its update_id."""
        assert self._loop is not None, "start() the server first"

        async def add() -> int:
            with self._lock:
                update_id = self._next_update_id
                self._next_update_id += 1
                self._updates.append({"update_id": update_id, **update})
            assert self._new_update is not None
            async with self._new_update:
                self._new_update.notify_all()
            return update_id

        return asyncio.run_coroutine_threadsafe(add(), self._loop).result(10)

    def fail_next(self, method: str, code: int, description: str, *,
                  retry_after: int | None = None) -> None:
        """Make the next call of `method` fail like Telegram would (e.g. a parse error, or 429
        with `retry_after`); call it again for more failures in a row."""
        with self._lock:
            self._failures.append((method, ApiError(code, description, retry_after)))

    # --- test API: what happened ----------------------------------------------------------------
    def requests(self, method: str | None = None, chat_id: int | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.recorded
                    if (method is None or r.method == method)
                    and (chat_id is None or r.chat_id == chat_id)]

    def bot_messages(self, chat_id: int) -> list[StoredMessage]:
        with self._lock:
            return [m for m in self.messages.get(chat_id, {}).values() if m.from_bot]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0,
                 what: str = "condition") -> Any:
        """Poll `predicate` until truthy; its value, or AssertionError naming `what`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def replies_to(self, chat_id: int, message_id: int) -> list[StoredMessage]:
        with self._lock:
            return [m for m in self.bot_messages(chat_id) if m.reply_to == message_id]

    # --- HTTP -----------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        try:
            params = await self._params(request)
        except ValueError:
            return self._json_error(400, "Bad Request: invalid parameters")
        except ConnectionResetError:  # the client died mid-request (a killed bot)
            return web.Response(status=499)
        record = Recorded(time.monotonic(), method, params)
        with self._lock:
            self.recorded.append(record)
        try:
            if request.match_info["token"] != self.token:
                raise ApiError(401, "Unauthorized")
            handler = getattr(self, f"_api_{method}", None)
            if handler is None or (method == "sendMessageDraft" and not self.drafts_supported):
                raise ApiError(404, "Not Found")
            self._injected_failure(method)
            result = await handler(params)
        except ApiError as error:
            record.ok, record.error_code, record.description = False, error.code, error.description
            return self._json_error(error.code, error.description, error.retry_after)
        return web.json_response({"ok": True, "result": result})

    def _injected_failure(self, method: str) -> None:
        with self._lock:
            for index, (name, error) in enumerate(self._failures):
                if name == method:
                    del self._failures[index]
                    raise error

    @staticmethod
    def _json_error(code: int, description: str, retry_after: int | None = None) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        return web.json_response(body, status=code)

    @staticmethod
    async def _params(request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            raw = await request.json()
        else:
            raw = dict(await request.post())
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, str) and key in JSON_PARAMS:
                value = json.loads(value)
            elif isinstance(value, str) and key in INT_PARAMS:
                value = int(value)
            params[key] = value
        return params

    # --- methods --------------------------------------------------------------------------------
    def _known_chat(self, params: dict[str, Any]) -> int:
        chat_id = params.get("chat_id")
        if chat_id is None:
            raise ApiError(400, "Bad Request: chat_id is empty")
        if int(chat_id) not in self.chats:
            raise ApiError(400, "Bad Request: chat not found")
        return int(chat_id)

    @staticmethod
    def _parse_text(params: dict[str, Any], *, allow_empty: bool = False) -> tuple[str, list[dict[str, Any]]]:
        text = params.get("text", "")
        mode = params.get("parse_mode")
        try:
            if mode in (None, ""):
                plain, entities = text, list(params.get("entities") or [])
            elif mode == "HTML":
                plain, entities = parse_html(text)
            elif mode == "MarkdownV2":
                plain, entities = parse_markdown_v2(text)
            else:
                raise ApiError(400, f"Bad Request: unsupported parse_mode {mode!r}")
        except MarkupError as error:
            raise ApiError(400, str(error)) from None
        if not plain.strip() and not allow_empty:
            raise ApiError(400, "Bad Request: message text is empty")
        if utf16_len(plain) > MAX_TEXT:
            raise ApiError(400, "Bad Request: message is too long")
        return plain, entities

    def _message_json(self, message: StoredMessage) -> dict[str, Any]:
        sender = self.bot_user if message.from_bot else self.user(message.chat_id)
        body = {"message_id": message.message_id, "date": int(time.time()),
                "chat": self.chats[message.chat_id], "from": sender, "text": message.text}
        if message.entities:
            body["entities"] = message.entities
        return body

    async def _api_getMe(self, _params: dict[str, Any]) -> dict[str, Any]:
        return self.bot_user

    async def _api_deleteWebhook(self, _params: dict[str, Any]) -> bool:
        return True

    async def _api_setMyCommands(self, params: dict[str, Any]) -> bool:
        commands = params.get("commands") or []
        for command in commands:
            name, description = command.get("command", ""), command.get("description", "")
            if not (1 <= len(name) <= 32 and all(c.islower() or c.isdigit() or c == "_" for c in name)):
                raise ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
            if not 1 <= len(description) <= 256:
                raise ApiError(400, "Bad Request: BOT_COMMAND_DESCRIPTION_INVALID")
        self.commands = commands
        return True

    async def _api_getUpdates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        deadline = time.monotonic() + float(params.get("timeout") or 0)
        assert self._new_update is not None
        with self._lock:
            if offset:
                self.confirmed_offset = max(self.confirmed_offset, offset)
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
        while True:
            with self._lock:
                ready = [u for u in self._updates if u["update_id"] >= offset][:limit]
            remaining = deadline - time.monotonic()
            if ready or remaining <= 0:
                return ready
            async with self._new_update:
                try:
                    await asyncio.wait_for(self._new_update.wait(), remaining)
                except TimeoutError:
                    pass

    async def _api_sendMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = self._known_chat(params)
        plain, entities = self._parse_text(params)
        reply = params.get("reply_parameters") or {}
        reply_to = reply.get("message_id") or params.get("reply_to_message_id")
        if reply_to and int(reply_to) not in self.messages[chat_id]:
            if not reply.get("allow_sending_without_reply"):
                raise ApiError(400, "Bad Request: message to be replied not found")
            reply_to = None
        self.flood.check(chat_id)
        message = StoredMessage(self._new_message_id(chat_id), chat_id, True, plain, entities,
                                int(reply_to) if reply_to else None)
        with self._lock:
            self.messages[chat_id][message.message_id] = message
        return self._message_json(message)

    async def _api_sendMessageDraft(self, params: dict[str, Any]) -> bool:
        chat_id = self._known_chat(params)
        if self.chats[chat_id]["type"] != "private":
            raise ApiError(400, "Bad Request: drafts can be sent only to private chats")
        if not params.get("draft_id"):
            raise ApiError(400, "Bad Request: draft_id must be non-zero")
        plain, _ = self._parse_text(params, allow_empty=True)
        self.flood.check(chat_id, draft=True)
        with self._lock:
            self.drafts.setdefault(chat_id, []).append(plain)
        return True

    async def _api_editMessageText(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = self._known_chat(params)
        message = self.messages[chat_id].get(int(params.get("message_id") or 0))
        if message is None:
            raise ApiError(400, "Bad Request: message to edit not found")
        if not message.from_bot:
            raise ApiError(400, "Bad Request: message can't be edited")
        plain, entities = self._parse_text(params)
        if plain == message.text and entities == message.entities:
            raise ApiError(400, "Bad Request: message is not modified: specified new message "
                                "content and reply markup are exactly the same as a current "
                                "content and reply markup of the message")
        self.flood.check(chat_id)
        with self._lock:
            message.text, message.entities = plain, entities
        return self._message_json(message)

    async def _api_sendChatAction(self, params: dict[str, Any]) -> bool:
        self._known_chat(params)
        if params.get("action") not in CHAT_ACTIONS:
            raise ApiError(400, "Bad Request: wrong parameter action in request")
        return True

    async def _api_deleteMessage(self, params: dict[str, Any]) -> bool:
        chat_id = self._known_chat(params)
        with self._lock:
            if self.messages[chat_id].pop(int(params.get("message_id") or 0), None) is None:
                raise ApiError(400, "Bad Request: message to delete not found")
        return True
