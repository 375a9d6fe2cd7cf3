"""Token ids to reply text: deltas never hold a half character or a possible stop string's start."""

from __future__ import annotations

from personabot.workers.engine import ReplyText

# A byte-level stand-in for a tokenizer: token i is the byte i; a partial UTF-8 character decodes to U+FFFD.


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def tokens(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_the_text_is_cut_at_the_first_stop_string_and_never_sent_past_it() -> None:
    reply = ReplyText(decode, ["\nUser:", "", "END"])
    sent = "".join(reply.feed([t]) for t in tokens("Hello there\nUser: more"))
    assert reply.stopped and reply.text == "Hello there"
    assert sent + reply.finish() == "Hello there"
    assert reply.feed(tokens("ignored")) == "" and reply.text == "Hello there"


def test_a_partial_stop_string_is_held_back_until_it_cannot_be_one() -> None:
    reply = ReplyText(decode, ["STOP"])
    assert reply.feed(tokens("abcST")) == "ab"  # the last len("STOP") - 1 characters wait
    assert reply.feed(tokens("x")) == "c"
    assert reply.finish() == "STx" and reply.text == "abcSTx" and not reply.stopped


def test_half_a_character_is_never_sent() -> None:
    reply = ReplyText(decode, [])
    euro = tokens("€")
    assert reply.feed(tokens("a") + euro[:2]) == "a"
    assert reply.feed(euro[2:]) == "€"
    assert reply.finish() == "" and reply.ids == tokens("a€")
