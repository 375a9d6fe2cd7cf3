"""Splitting at paragraph/code-fence boundaries and HTML that Telegram's parser accepts."""

from __future__ import annotations

import random

import pytest

from personabot.bot.formatting import MAX_MESSAGE_LENGTH, open_fence, split_text, to_html, utf16_len
from tests.bot.telegram_markup import parse_html


def test_short_text_is_one_piece() -> None:
    assert split_text("hello") == ["hello"]


def test_split_prefers_paragraph_boundaries() -> None:
    paragraphs = [("word " * 150).strip() for _ in range(12)]  # ~750 chars each
    text = "\n\n".join(paragraphs)
    pieces = split_text(text)
    assert len(pieces) > 1
    assert all(utf16_len(p) <= MAX_MESSAGE_LENGTH for p in pieces)
    assert "\n\n".join(pieces) == text  # cut exactly at paragraph breaks, nothing lost


def test_split_code_block_is_closed_and_reopened() -> None:
    code = "\n".join(f"print({i})  # line {i}" for i in range(600))
    text = f"Here:\n\n```python\n{code}\n```\n\nDone."
    pieces = split_text(text)
    assert len(pieces) >= 3
    for piece in pieces:
        assert utf16_len(piece) <= MAX_MESSAGE_LENGTH
        assert open_fence(piece) is None, "every piece closes its code blocks"
    assert pieces[1].startswith("```python\n")
    lines = [line for p in pieces for line in p.split("\n") if line.startswith("print(")]
    assert lines == code.split("\n")


def test_split_counts_utf16_units() -> None:
    text = "😀" * 3000  # 2 UTF-16 units each, no spaces or newlines
    pieces = split_text(text)
    assert "".join(pieces) == text
    assert all(utf16_len(p) <= MAX_MESSAGE_LENGTH for p in pieces)


def test_split_is_stable_when_text_grows() -> None:
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma\n", "delta\n\n", "```", "x<y&z", "**b**"]
    text = " ".join(rng.choice(words) for _ in range(4000))
    full = split_text(text)
    for cut in range(5000, len(text), 1500):
        partial = split_text(text[:cut])
        assert partial[:-1] == full[:len(partial) - 1]


@pytest.mark.parametrize("text", [
    "a < b && c > d",
    "use `x<y` and **bold & strong**",
    "```python\nif a < b:\n    print('&')\n```",
    "```\nunclosed fence while streaming <",
    "```weird lang!\ncode\n```",
    "stray ** and ` and </b> and <b>",
])
def test_html_is_accepted_and_not_longer(text: str) -> None:
    plain, _ = parse_html(to_html(text))
    assert utf16_len(plain) <= utf16_len(text)


def test_html_entities() -> None:
    plain, entities = parse_html(to_html("see `code` and **bold**\n```py\nx = 1\n```"))
    assert plain == "see code and bold\nx = 1"
    assert {e["type"] for e in entities} == {"code", "bold", "pre"}
    assert [e.get("language") for e in entities if e["type"] == "pre"] == ["py"]


def test_random_text_always_renders_within_limit() -> None:
    rng = random.Random(7)
    alphabet = list("ab <>&*`_[]()\n") + ["```", "**", "😀", "\n\n", "é"]
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9000)))
        for piece in split_text(text):
            plain, _ = parse_html(to_html(piece))
            assert utf16_len(plain) <= MAX_MESSAGE_LENGTH
