"""The fake Bot API is only useful if it is as strict as Telegram: these tests hold it to that."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.bot.fake_bot_api import FakeBotApi
from tests.bot.telegram_markup import MarkupError, parse_html, parse_markdown_v2


def call(api: FakeBotApi, method: str, token: str | None = None, **params: object) -> httpx.Response:
    return httpx.post(f"{api.base_url}{token or api.token}/{method}", json=params, timeout=10)


@pytest.mark.parametrize("text, plain", [
    (r"Hello\!", "Hello!"),
    (r"*bold* _italic_ __under__ ~strike~ ||spoiler||", "bold italic under strike spoiler"),
    ("`code with . and *`", "code with . and *"),
    ("```python\nprint('x.y')\n```", "print('x.y')\n"),
    (r"[link](http://example.com/a\)b)", "link"),
    (r"1\+1\=2", "1+1=2"),
])
def test_markdown_v2_valid(text: str, plain: str) -> None:
    assert parse_markdown_v2(text)[0] == plain


@pytest.mark.parametrize("text", [
    "Hello!", "1+1=2", "*unclosed", "a_b", "`code", "```\npre", "*a _b* c_", r"`a\b`",
    "[text](url", "x.y",
])
def test_markdown_v2_rejected(text: str) -> None:
    with pytest.raises(MarkupError, match="can't parse entities"):
        parse_markdown_v2(text)


@pytest.mark.parametrize("text", ["<b>x", "<x>y</x>", "a & b", "a > b", "<b><i>x</b></i>",
                                  "<code><b>x</b></code>", "<span>x</span>"])
def test_html_rejected(text: str) -> None:
    with pytest.raises(MarkupError):
        parse_html(text)


def test_html_valid() -> None:
    plain, entities = parse_html('<b>a</b> &lt;&amp;&gt; <pre><code class="language-py">x</code></pre>')
    assert plain == "a <&> x"
    assert entities[-1] == {"type": "pre", "offset": 6, "length": 1, "language": "py"}


def test_rules_like_telegram(fake_api: FakeBotApi) -> None:
    chat = fake_api.private_chat(42)
    group = fake_api.group_chat(-100)
    assert call(fake_api, "getMe", token="1:wrong").status_code == 401
    assert call(fake_api, "noSuchMethod").status_code == 404
    assert call(fake_api, "sendMessage", chat_id=7, text="x").json()["description"] == \
        "Bad Request: chat not found"
    too_long = call(fake_api, "sendMessage", chat_id=42, text="x" * 4097)
    assert too_long.json()["description"] == "Bad Request: message is too long"
    # 4096 visible characters are fine even when the markup makes the text longer.
    assert call(fake_api, "sendMessage", chat_id=42, text="<b>" + "&lt;" * 4096 + "</b>",
                parse_mode="HTML").json()["ok"]
    bad = call(fake_api, "sendMessage", chat_id=42, text="Hi!", parse_mode="MarkdownV2")
    assert bad.status_code == 400 and "can't parse entities" in bad.json()["description"]
    sent = call(fake_api, "sendMessage", chat_id=-100, text="hello").json()["result"]
    same = call(fake_api, "editMessageText", chat_id=-100, message_id=sent["message_id"],
                text="hello")
    assert same.json()["description"].startswith("Bad Request: message is not modified")
    assert call(fake_api, "sendMessageDraft", chat_id=-100, draft_id=1, text="x").status_code == 400
    assert call(fake_api, "sendMessageDraft", chat_id=42, draft_id=1, text="").json()["ok"]
    assert call(fake_api, "sendChatAction", chat_id=42, action="dancing").status_code == 400
    assert call(fake_api, "deleteMessage", chat_id=-100, message_id=sent["message_id"]).json()["ok"]
    assert call(fake_api, "deleteMessage", chat_id=-100, message_id=sent["message_id"]).status_code == 400
    assert call(fake_api, "setMyCommands", commands=[{"command": "Bad", "description": "x"}]).status_code == 400
    assert chat["id"] == 42 and group["id"] == -100
    assert all(r.at > 0 for r in fake_api.requests())


def test_flood_answers_429_with_retry_after(fake_api: FakeBotApi) -> None:
    fake_api.private_chat(42)
    answers = [call(fake_api, "sendMessage", chat_id=42, text=f"m{i}") for i in range(5)]
    flooded = [a.json() for a in answers if a.status_code == 429]
    assert flooded, "a burst of 5 messages in one second floods a private chat"
    assert flooded[0]["parameters"]["retry_after"] >= 1


def test_long_polling_waits_for_an_update(fake_api: FakeBotApi) -> None:
    chat = fake_api.private_chat(42)
    threading.Timer(0.3, lambda: fake_api.user_says(chat, "hi")).start()
    started = time.monotonic()
    updates = call(fake_api, "getUpdates", timeout=5).json()["result"]
    assert [u["message"]["text"] for u in updates] == ["hi"]
    assert time.monotonic() - started < 5
    assert call(fake_api, "getUpdates", offset=updates[0]["update_id"] + 1).json()["result"] == []
