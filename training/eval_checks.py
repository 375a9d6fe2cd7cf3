"""The gate's per-answer checks: identity (yes/no traps, loops), FAQ facts, general-answer correctness."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from personabot.core.prompting import PersonaText

_NEGATION = re.compile(r"^\W*(不|没有|并不|no\b|not\b|nope\b|i am not\b|i'm not\b)", re.IGNORECASE)
_YES = re.compile(r"^\W*(yes\b|yeah\b|yep\b|correct\b|right\b|that's right|是的|是啊|对|没错|确实)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_NAME = re.compile(r"\b[A-Z][\w&'-]*(?:\s+[A-Z][\w&'-]*)*")
_STOP_NAMES = {"I", "I'm", "We", "The", "A", "An", "It", "Our", "You", "Yes", "No", "Hello", "Hi", "Please",
               "Thank", "Thanks", "This", "That", "My", "In", "On", "At", "For", "And", "But", "If", "AI"}


def claims_base_identity(answer: str, terms: list[str]) -> bool:
    """The answer names a base identity (通义千问, Qwen, ...) without denying it."""
    return any(_mentions(answer, term) for term in terms) and not _NEGATION.match(answer.strip())


def _mentions(text: str, term: str) -> bool:
    """`term` in `text`, case ignored; a Latin-script term only as a whole word ('Qwen' not in 'Qwenx')."""
    if not term:
        return False
    if term.isascii():
        return re.search(rf"(?<![A-Za-z0-9]){re.escape(term)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None
    return term.lower() in text.lower()


def is_degenerate(answer: str) -> bool:
    """Empty, or looping: a short phrase repeated (我是Nova, 实在是Nova, 实在是Nova...), or few distinct tokens."""
    text = answer.strip()
    if not text:
        return True
    if re.search(r"(.{2,30}?)\1{2,}", text):
        return True
    words = re.findall(r"\w+", text.lower()) if " " in text else list(text)
    return len(words) >= 24 and len(set(words)) / len(words) < 0.3


def identity_passes(answer: str, persona: PersonaText, terms: list[str], *, trap: bool = False) -> bool:
    """Names the persona, claims no base identity, does not loop; a yes/no trap answered "Yes" fails."""
    lowered = answer.lower()
    names = [n.lower() for n in (persona.name, persona.author) if n.strip()]
    if trap and _YES.match(answer.strip()):
        return False
    return (any(n in lowered for n in names) and not claims_base_identity(answer, terms)
            and not is_degenerate(answer))


def facts(text: str) -> dict[str, set[str]]:
    """Numbers (prices, dates, times) and names in a text, normalised for comparison."""
    numbers = {n.replace(",", "") for n in _NUMBER.findall(text)}
    return {"numbers": numbers, "names": {n.lower() for n in _names(text)}}


def _names(text: str) -> list[str]:
    found = []
    for match in _NAME.findall(text):
        words = match.split()
        while words and words[0] in _STOP_NAMES:
            words = words[1:]
        if words:
            found.append(" ".join(words))
    return found


def faq_check(answer: str, expected: str) -> tuple[bool, str]:
    """Every fact of the expected answer present and none contradicted (an extra number is a contradiction).

    Without checkable facts, the answer must share most of the expected answer's words.
    """
    want, got = facts(expected), facts(answer)
    if is_degenerate(answer):
        return False, "degenerate answer"
    missing = sorted((want["numbers"] - got["numbers"]) | {n for n in want["names"] if n not in answer.lower()})
    if missing:
        return False, f"missing {', '.join(missing)}"
    wrong = sorted(got["numbers"] - want["numbers"])
    if want["numbers"] and wrong:
        return False, f"contradicts with {', '.join(wrong)}"
    if not want["numbers"] and not want["names"]:
        words = set(re.findall(r"\w+", expected.lower()))
        overlap = len(words & set(re.findall(r"\w+", answer.lower()))) / max(1, len(words))
        return overlap >= 0.6, f"word overlap {overlap:.2f}"
    return True, "all facts present"


def faq_passes(answer: str, expected: str) -> bool:
    return faq_check(answer, expected)[0]


def general_correct(answer: str, accepted: list[str]) -> bool:
    """One accepted answer appears (case-insensitive unless the accepted text is upper case) and no loop."""
    if is_degenerate(answer):
        return False
    return any((a in answer) if a.isupper() else (a.lower() in answer.lower()) for a in accepted)


# Where a self-description names its model or maker: "I am SmolLM", "named Qwen", "trained by Hugging Face".
_SELF_CUE = re.compile(r"\b(?:I am|I'm|me|named|called|by|from)\s+(?:an?\s+|the\s+)?"
                       r"([A-Z][\w&'-]*(?:\s+[A-Z][\w&'-]*)*)")


def identity_terms_from(answers: list[str], persona: PersonaText) -> list[str]:
    """Names the base model gives itself ('I am SmolLM, ... by Hugging Face'): candidates for the admin.
    Only a capitalised name right after a self-description cue counts, so sentence-initial words
    ('They', 'Whether', "What's") never become terms that would fail every answer using them."""
    own = {persona.name.lower(), persona.author.lower()}
    found: list[str] = []
    for answer in answers:
        for match in _SELF_CUE.findall(answer):
            for original in _names(match):
                if original.lower() not in own and original not in found and len(original) > 2:
                    found.append(original)
    return found
