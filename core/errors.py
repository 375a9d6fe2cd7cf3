"""Errors as one short line for logs, events and stored reasons."""

from __future__ import annotations

MAX_CHARS = 500


def one_line(error: BaseException, *, with_type: bool = True) -> str:
    """`Type: first line of the message` (database errors carry their SQL on further lines), at most
    500 characters; `with_type=False`: the first line alone (the type's name where there is none)."""
    lines = str(error).strip().splitlines()
    if not with_type:
        return (lines[0] if lines else type(error).__name__)[:MAX_CHARS]
    return f"{type(error).__name__}: {lines[0] if lines else 'no detail'}"[:MAX_CHARS]
