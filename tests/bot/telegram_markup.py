"""Strict parsers of Telegram's HTML and MarkdownV2 markup, for the fake Bot API server.

Each returns the visible text and its entities (offsets in UTF-16 units, as Telegram counts)
or raises MarkupError with a description worded like Telegram's "can't parse entities".
"""

from __future__ import annotations

import re
from typing import Any

HTML_TAGS = {
    "b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline",
    "ins": "underline", "s": "strikethrough", "strike": "strikethrough", "del": "strikethrough",
    "tg-spoiler": "spoiler", "span": "spoiler", "a": "text_link", "code": "code", "pre": "pre",
    "blockquote": "blockquote",
}
HTML_ENTITY = re.compile(r"&(lt|gt|amp|quot|#[0-9]{1,7}|#x[0-9a-fA-F]{1,6});")
HTML_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
MD_RESERVED = set("_*[]()~`>#+-=|{}.!")


class MarkupError(ValueError):
    """The text cannot be parsed; str() is Telegram's description."""


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _byte_offset(text: str, index: int) -> int:
    return len(text[:index].encode("utf-8"))


def _fail(text: str, index: int, why: str) -> MarkupError:
    return MarkupError(f"Bad Request: can't parse entities: {why} at byte offset "
                       f"{_byte_offset(text, index)}")


class _Builder:
    """Accumulates visible text and entities."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0  # UTF-16 units
        self.entities: list[dict[str, Any]] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.length += utf16_len(text)

    def entity(self, type_: str, start: int, **extra: Any) -> None:
        if self.length > start:
            self.entities.append({"type": type_, "offset": start, "length": self.length - start,
                                  **extra})

    def result(self) -> tuple[str, list[dict[str, Any]]]:
        return "".join(self.parts), sorted(self.entities, key=lambda e: (e["offset"], -e["length"]))


def _html_attrs(raw: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(3) for m in
            re.finditer(r'([a-zA-Z-]+)\s*=\s*(["\'])(.*?)\2', raw)}


def parse_html(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Telegram HTML: only the supported tags, balanced, and <, >, & escaped elsewhere."""
    out = _Builder()
    stack: list[tuple[str, int, int, dict[str, str]]] = []  # name, start, index, attrs
    i = 0
    while i < len(text):
        char = text[i]
        if char == "<":
            end = text.find(">", i)
            if end < 0:
                raise _fail(text, i, "unclosed start tag")
            tag = text[i + 1:end].strip()
            if tag.startswith("/"):
                name = tag[1:].strip().lower()
                if not stack or stack[-1][0] != name:
                    raise _fail(text, i, f'unmatched end tag "{name}"')
                name, start, _, attrs = stack.pop()
                kind = HTML_TAGS[name]
                if name == "a":
                    out.entity("text_link", start, url=attrs.get("href", ""))
                elif name == "pre" and attrs.get("language"):
                    out.entity("pre", start, language=attrs["language"])
                elif name == "code" and stack and stack[-1][0] == "pre":
                    language = attrs.get("class", "")
                    if language.startswith("language-"):
                        stack[-1][3]["language"] = language[len("language-"):]
                else:
                    out.entity(kind, start)
            else:
                name = tag.split(None, 1)[0].lower() if tag else ""
                attrs = _html_attrs(tag[len(name):])
                if name not in HTML_TAGS:
                    raise _fail(text, i, f'unsupported start tag "{name}"')
                if name == "span" and attrs.get("class") != "tg-spoiler":
                    raise _fail(text, i, 'tag "span" must have class "tg-spoiler"')
                if stack and stack[-1][0] in ("code", "pre") and not (
                        name == "code" and stack[-1][0] == "pre"):
                    raise _fail(text, i, f'tag "{name}" is not allowed inside "{stack[-1][0]}"')
                stack.append((name, out.length, i, attrs))
            i = end + 1
        elif char == "&":
            match = HTML_ENTITY.match(text, i)
            if not match:
                raise _fail(text, i, 'character "&" must be escaped as &amp;')
            name = match.group(1)
            if name in HTML_NAMED:
                out.add(HTML_NAMED[name])
            else:
                out.add(chr(int(name, 0) if name[1] == "x" else int(name[1:])))
            i = match.end()
        elif char == ">":
            raise _fail(text, i, 'character ">" must be escaped as &gt;')
        else:
            out.add(char)
            i += 1
    if stack:
        raise _fail(text, stack[-1][2], f'can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return out.result()


_MD_TOGGLES = [("||", "spoiler"), ("__", "underline"), ("*", "bold"), ("_", "italic"),
               ("~", "strikethrough")]


def parse_markdown_v2(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Telegram MarkdownV2: reserved characters escaped; code and pre escape only ` and \\."""
    out = _Builder()
    stack: list[tuple[str, int, int]] = []  # marker, start, index
    i = 0
    line_start = True
    while i < len(text):
        char = text[i]
        top = stack[-1][0] if stack else ""
        if top in ("`", "```"):
            if char == "\\":
                if i + 1 < len(text) and text[i + 1] in "`\\":
                    out.add(text[i + 1])
                    i += 2
                    continue
                raise _fail(text, i, "character '\\' must be escaped inside code")
            if text.startswith(top, i) and (top == "```" or not text.startswith("```", i)):
                _, start, _ = stack.pop()
                out.entity("pre" if top == "```" else "code", start)
                i += len(top)
            elif char == "`":
                raise _fail(text, i, "character '`' must be escaped inside code")
            else:
                out.add(char)
                i += 1
            continue
        if char == "\\":
            if i + 1 < len(text) and 0 < ord(text[i + 1]) <= 126:
                out.add(text[i + 1])
                i += 2
                line_start = False
                continue
            raise _fail(text, i, "character '\\' is reserved and must be escaped with the preceding '\\'")
        if text.startswith("```", i):
            newline = text.find("\n", i + 3)
            language = text[i + 3:newline] if newline >= 0 else ""
            if language and not re.fullmatch(r"[\w+#.-]+", language):
                raise _fail(text, i, "invalid pre language")
            stack.append(("```", out.length, i))
            i = newline + 1 if newline >= 0 else i + 3
            continue
        if char == "`":
            stack.append(("`", out.length, i))
            i += 1
            continue
        if char == ">" and line_start:
            i += 1
            line_start = False
            continue
        toggle = next(((m, k) for m, k in _MD_TOGGLES if text.startswith(m, i)), None)
        if toggle is not None:
            marker, kind = toggle
            if top == marker:
                _, start, _ = stack.pop()
                out.entity(kind, start)
            elif any(entry[0] == marker for entry in stack):
                raise _fail(text, i, f"can't close entity '{marker}' while '{top}' is open")
            else:
                stack.append((marker, out.length, i))
            i += len(marker)
            continue
        if char == "[":
            stack.append(("[", out.length, i))
            i += 1
            continue
        if char == "]" and top == "[":
            if not text.startswith("(", i + 1):
                raise _fail(text, i, "character ']' is reserved and must be escaped with the preceding '\\'")
            j, url = i + 2, []
            while j < len(text) and text[j] != ")":
                if text[j] == "\\" and j + 1 < len(text):
                    url.append(text[j + 1])
                    j += 2
                    continue
                url.append(text[j])
                j += 1
            if j >= len(text):
                raise _fail(text, i, "can't find end of a url")
            _, start, _ = stack.pop()
            out.entity("text_link", start, url="".join(url))
            i = j + 1
            continue
        if char in MD_RESERVED:
            raise _fail(text, i, f"character '{char}' is reserved and must be escaped with the "
                                 "preceding '\\'")
        out.add(char)
        line_start = char == "\n"
        i += 1
    if stack:
        marker, _, index = stack[-1]
        raise _fail(text, index, f"can't find end of the entity starting with '{marker}'")
    return out.result()
