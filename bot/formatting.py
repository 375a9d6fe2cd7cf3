"""Telegram-safe text: splitting at paragraph/code-fence boundaries and HTML rendering."""

from __future__ import annotations

import html
import re

MAX_MESSAGE_LENGTH = 4096  # Telegram's limit, counted in UTF-16 code units after entity parsing
_FENCE = "```"
_LANGUAGE = re.compile(r"^[A-Za-z0-9_+#.-]{1,32}$")
_INLINE = re.compile(r"`([^`\n]+)`|\*\*([^*\n]+?)\*\*")


def utf16_len(text: str) -> int:
    """Length as Telegram counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le")) // 2


def _fence_language(line: str) -> str | None:
    """The language of a fence line ('' when none), or None when the line is not a fence."""
    stripped = line.strip()
    if not stripped.startswith(_FENCE):
        return None
    return stripped[len(_FENCE):].strip()


def open_fence(text: str) -> str | None:
    """The language of the code fence still open at the end of `text`, or None when closed."""
    language: str | None = None
    for line in text.split("\n"):
        fence = _fence_language(line)
        if fence is None:
            continue
        language = None if language is not None else fence
    return language


def _prefix_within(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-16 length is at most `limit`."""
    if utf16_len(text) <= limit:
        return text
    used = 0
    for index, char in enumerate(text):
        used += 2 if ord(char) > 0xFFFF else 1
        if used > limit:
            return text[:index]
    return text


def _cut_point(window: str) -> tuple[int, int]:
    """Where to cut `window`: (end of the piece, start of the rest), best boundary first."""
    floor = len(window) // 2
    paragraph = -1
    search = len(window)
    while True:
        found = window.rfind("\n\n", 0, search)
        if found <= floor:
            break
        if open_fence(window[:found]) is None:
            paragraph = found
            break
        search = found
    if paragraph > floor:
        return paragraph, paragraph + 2
    line = window.rfind("\n")
    if line > floor:
        return line, line + 1
    space = window.rfind(" ")
    if space > floor:
        return space, space + 1
    return len(window), len(window)


def split_text(text: str, limit: int = MAX_MESSAGE_LENGTH) -> list[str]:
    """Split into pieces of at most `limit` UTF-16 units, preferring paragraph, then line breaks.

    A code block cut in two is closed at the end of one piece and reopened (same language) at
    the start of the next. The split is greedy from the start, so the pieces before the last
    never change when more text is appended: streaming can send them as soon as they appear.
    """
    pieces: list[str] = []
    rest = text
    reserve = len(_FENCE) + 1
    while utf16_len(rest) > limit:
        window = _prefix_within(rest, limit - reserve)
        end, start = _cut_point(window)
        piece, rest = rest[:end].rstrip(), rest[start:]
        language = open_fence(piece)
        if language is not None:
            piece += "\n" + _FENCE
            rest = f"{_FENCE}{language}\n{rest}"
        if piece.strip():
            pieces.append(piece)
    pieces.append(rest)
    return pieces


def _inline_html(text: str) -> str:
    out: list[str] = []
    position = 0
    for match in _INLINE.finditer(text):
        out.append(html.escape(text[position:match.start()], quote=False))
        code, bold = match.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code, quote=False)}</code>")
        else:
            out.append(f"<b>{html.escape(bold, quote=False)}</b>")
        position = match.end()
    out.append(html.escape(text[position:], quote=False))
    return "".join(out)


def _pre_html(code_lines: list[str], language: str) -> str:
    code = html.escape("\n".join(code_lines), quote=False)
    if language and _LANGUAGE.match(language):
        return f'<pre><code class="language-{language}">{code}</code></pre>'
    return f"<pre>{code}</pre>"


def to_html(text: str) -> str:
    """Render model text (light Markdown) as Telegram HTML: code fences, `code`, **bold**.

    Everything else is escaped, so Telegram never rejects it; an unclosed fence (a reply still
    streaming) is closed. The visible text is never longer than the input.
    """
    blocks: list[str] = []
    prose: list[str] = []
    code: list[str] | None = None
    language = ""
    for line in text.split("\n"):
        fence = _fence_language(line)
        if code is None and fence is not None:
            if prose:
                blocks.append(_inline_html("\n".join(prose)))
                prose = []
            code, language = [], fence
        elif code is not None and fence is not None:
            blocks.append(_pre_html(code, language))
            code = None
        elif code is not None:
            code.append(line)
        else:
            prose.append(line)
    if code is not None:
        blocks.append(_pre_html(code, language))
    if prose:
        blocks.append(_inline_html("\n".join(prose)))
    return "\n".join(blocks)
