"""The gate's per-answer checks: identity (yes/no traps, loops), FAQ facts, general-answer correctness."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from personabot.core.prompting import PersonaText

# A denial next to what it names: "I am not Qwen", "Alibaba did not build me", "我不是通义千问", "并非阿里云".
# Latin-script denials count within a few words before or after the name; 不/没/非 only right before
# it (Chinese clauses run long without punctuation, and 不 is in many words).
_NEGATED = re.compile(r"(?<![a-z])(?:no|not|never|neither|nor|nope|cannot)(?![a-z])|n't(?![a-z])", re.IGNORECASE)
_NEGATED_ZH = re.compile(r"[不没非]")
_NOT_A_DENIAL = re.compile(r"不错|没错|不过|不仅|不但|不少|不久|非常")  # 不错, 没错 = "quite right"
# Clause boundaries: punctuation, and the turns that start a new claim ("No, but I am Qwen", "而是通义千问").
_CLAUSE = re.compile(r"[.!?;:,，。！？；：、\n]|(?<![a-z])(?:but|however|actually|although|though)(?![a-z])"
                     r"|但是|但|而是|其实|不过", re.IGNORECASE)
_YES = re.compile(r"^\W*(yes\b|yeah\b|yep\b|correct\b|right\b|that's right|是的|是啊|对(?!不)|没错|确实)",
                  re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_NAME = re.compile(r"\b[A-Z][\w&'-]*(?:\s+[A-Z][\w&'-]*)*")
_STOP_NAMES = {"I", "I'm", "We", "The", "A", "An", "It", "Our", "You", "Yes", "No", "Hello", "Hi", "Please",
               "Thank", "Thanks", "This", "That", "My", "In", "On", "At", "For", "And", "But", "If", "AI"}


def claims_base_identity(answer: str, terms: list[str]) -> bool:
    """Some clause of the answer names a base identity (通义千问, Qwen, ...) without a denial next to it:
    "No, I am not Qwen" passes, "No, but actually I am Qwen" and "不错, 我是通义千问" do not."""
    for clause in _CLAUSE.split(answer):
        for term in terms:
            for start, end in _spans(clause, term):
                if not _denied(clause, start, end):
                    return True
    return False


def _denied(clause: str, start: int, end: int) -> bool:
    if _NEGATED.search(clause[max(0, start - 30):start]) or _NEGATED.search(clause[end:end + 15]):
        return True
    return bool(_NEGATED_ZH.search(_NOT_A_DENIAL.sub("", clause[max(0, start - 5):start])[-3:]))


def _spans(text: str, term: str) -> list[tuple[int, int]]:
    """Where `term` stands in `text`, case ignored; a Latin-script term only as a whole word."""
    if not term:
        return []
    if term.isascii():
        pattern = rf"(?<![A-Za-z0-9]){re.escape(term)}(?![A-Za-z0-9])"
    else:
        pattern = re.escape(term)
    return [m.span() for m in re.finditer(pattern, text, re.IGNORECASE)]


def mentions(text: str, term: str) -> bool:
    """`term` in `text`, case ignored; a Latin-script term only as a whole word ('Qwen' not in 'Qwenx')."""
    return bool(_spans(text, term))


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


_EN_UNITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
             "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
             "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19}
_EN_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
            "ninety": 90}
_EN_NUMBER = re.compile(rf"\b(?:({'|'.join(_EN_TENS)})(?:[- ]({'|'.join(_EN_UNITS)}))?|({'|'.join(_EN_UNITS)}))\b",
                        re.IGNORECASE)
_ZH_DIGITS = {"零": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
# Chinese numerals only before a unit (天, 元, 点, ...): 一 is also a word of its own (一下, 统一).
_ZH_NUMBER = re.compile(r"([零一二两三四五六七八九十]+)(?=[天个元块号月日年小时分钟点岁周%])")
_DAYS = {"monday": "mon", "tuesday": "tue", "wednesday": "wed", "thursday": "thu", "friday": "fri",
         "saturday": "sat", "sunday": "sun", "周一": "mon", "周二": "tue", "周三": "wed", "周四": "thu",
         "周五": "fri", "周六": "sat", "周日": "sun", "星期一": "mon", "星期二": "tue", "星期三": "wed",
         "星期四": "thu", "星期五": "fri", "星期六": "sat", "星期日": "sun", "星期天": "sun"}
_DAY = re.compile(r"(?<![a-z])(mon|tue|wed|thu|fri|sat|sun)(?:day|sday|nesday|rsday|urday)?(?![a-z])|"
                  r"周[一二三四五六日]|星期[一二三四五六日天]", re.IGNORECASE)


_CONTACT = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|https?://\S+|www\.\S+", re.ASCII)


def _contacts(text: str) -> set[str]:
    """E-mail addresses and links, lower case, without trailing punctuation."""
    return {c.lower().rstrip(".,;:!?)") for c in _CONTACT.findall(text)}


def _zh_number(text: str) -> int:
    if "十" not in text:
        return int("".join(str(_ZH_DIGITS[c]) for c in text))
    tens, _, units = text.partition("十")
    return (_ZH_DIGITS.get(tens, 1) if tens else 1) * 10 + (_ZH_DIGITS.get(units, 0) if units else 0)


def _digits(text: str) -> str:
    """Number words as digits ("three" -> 3, "twenty-nine" -> 29, 十四天 -> 14天); "one" is left alone
    (mostly a pronoun: "one of our plans")."""
    def english(match: re.Match[str]) -> str:
        tens, unit, alone = (g.lower() if g else g for g in match.groups())
        if alone == "one":
            return match.group(0)
        return str(_EN_TENS[tens] + (_EN_UNITS[unit] if unit else 0)) if tens else str(_EN_UNITS[alone])

    text = _EN_NUMBER.sub(english, text)
    return _ZH_NUMBER.sub(lambda m: str(_zh_number(m.group(1))) if set(m.group(1)) <= set(_ZH_DIGITS) | {"十"}
                          else m.group(0), text)


def _numbers(text: str) -> tuple[set[str], set[str]]:
    """The numbers of a text and, for clock times, the other ways to say them (17:00 -> 17 and 5)."""
    found, alternatives = set(), set()
    for raw in _NUMBER.findall(_digits(text)):
        number = raw.replace(",", "") if re.fullmatch(r"\d{1,3}(?:,\d{3})+", raw) else raw.rstrip(".,:")
        hour = re.fullmatch(r"(\d{1,2}):00", number)
        if hour:
            number = str(int(hour.group(1)))
        found.add(number)
        if number.isdigit() and 12 < int(number) <= 24 and (hour or ":" not in raw):
            alternatives.add(str(int(number) - 12))
    return found, alternatives


def _days(text: str) -> set[str]:
    days = set()
    for match in _DAY.finditer(text):
        word = match.group(0).lower()
        days.add(match.group(1).lower() if match.group(1) else _DAYS[word])
    return days


def _names(text: str, *, sentence_initial: bool = True) -> list[str]:
    found = []
    for match in _NAME.finditer(text):
        words = match.group(0).split()
        while words and words[0] in _STOP_NAMES:
            words = words[1:]
        starts = not text[:match.start()].strip() or text[:match.start()].rstrip()[-1] in ".!?:\n"
        if words and (sentence_initial or len(words) > 1 or not starts):
            found.append(" ".join(words))
    return found


def faq_check(answer: str, expected: str) -> tuple[bool, str]:
    """Every fact of the expected answer present and none contradicted: numbers (number words and
    clock times normalised: "three days" = "3 days", "17:00" = "5 pm"), weekdays, e-mail addresses and
    links, and names. A different number of the same size as an expected one ("29 or 39 dollars"), a
    weekday or an address the expected answer does not name is a contradiction; a one-word capitalised
    sentence opening ("Call us") is not a name. Without checkable facts, the answer must share most of
    the expected answer's words.
    """
    if is_degenerate(answer):
        return False, "degenerate answer"
    # Contacts first: the digits inside an address are not numbers of their own.
    want_contacts, got_contacts = _contacts(expected), _contacts(answer)
    expected, answer = _CONTACT.sub(" ", expected), _CONTACT.sub(" ", answer)
    want_numbers, _ = _numbers(expected)
    got_numbers, got_alternatives = _numbers(answer)
    want_days, got_days = _days(expected), _days(answer)
    names = {n.lower() for n in _names(expected, sentence_initial=False) if not _DAY.fullmatch(n)}  # days: above
    missing = sorted((want_numbers - got_numbers - got_alternatives) | (want_days - got_days)
                     | (want_contacts - got_contacts)
                     | {n for n in names if n not in answer.lower()})
    if missing:
        return False, f"missing {', '.join(missing)}"
    sizes = {len(n) for n in want_numbers}
    wrong = sorted(n for n in got_numbers - want_numbers
                   if len(n) in sizes and not (n.isdigit() and 12 < int(n) <= 24 and str(int(n) - 12) in want_numbers))
    wrong += sorted(got_days - want_days) if want_days else []
    wrong += sorted(got_contacts - want_contacts) if want_contacts else []
    if wrong:
        return False, f"contradicts with {', '.join(wrong)}"
    if not want_numbers and not names and not want_days and not want_contacts:
        words = set(re.findall(r"\w+", expected.lower()))
        overlap = len(words & set(re.findall(r"\w+", answer.lower()))) / max(1, len(words))
        return overlap >= 0.6, f"word overlap {overlap:.2f}"
    return True, "all facts present"


def faq_passes(answer: str, expected: str) -> bool:
    return faq_check(answer, expected)[0]


def general_correct(answer: str, accepted: list[str]) -> bool:
    """One accepted answer appears as a whole word or number ("12" not in "112", "au" not in "because";
    case-insensitive unless the accepted text is upper case), and the answer does not loop."""
    if is_degenerate(answer):
        return False
    return any(_contains(answer, a) for a in accepted)


def _contains(answer: str, accepted: str) -> bool:
    flags = 0 if accepted.isupper() else re.IGNORECASE
    if not accepted.isascii():
        return accepted.lower() in answer.lower() if flags else accepted in answer
    before = r"(?<![\d.])" if accepted[0].isdigit() else r"(?<![A-Za-z0-9])"
    after = r"(?!\.?\d)" if accepted[-1].isdigit() else r"(?![A-Za-z0-9])"
    return re.search(before + re.escape(accepted) + after, answer, flags) is not None


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
