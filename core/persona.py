"""Persona rules: field limits, one pair's validation and the same-question clash, for UI, CLI and API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from personabot.core.pairs_io import PairError, question_key, validate_pair
from personabot.core.store_errors import StoreError

if TYPE_CHECKING:
    from personabot.core.settings import Settings
    from personabot.core.store import Store

MAX_NAME_CHARS = 200

__all__ = ["PairError", "PersonaFieldError", "check_persona", "refuse_clash", "validate_pair"]


class PersonaFieldError(StoreError, ValueError):
    """A persona field is too long; the message names the limit to raise."""


def check_persona(settings: Settings, name: str, author: str, system_prompt: str) -> None:
    """Raise PersonaFieldError when the system prompt, name or author is over its limit."""
    if len(system_prompt) > settings.max_system_prompt_chars:
        raise PersonaFieldError(
            f"system prompt has {len(system_prompt)} characters, over the limit of "
            f"{settings.max_system_prompt_chars} (PERSONABOT_MAX_SYSTEM_PROMPT_CHARS)"
        )
    for label, value in (("name", name), ("author", author)):
        if len(value) > MAX_NAME_CHARS:
            raise PersonaFieldError(f"{label} has {len(value)} characters; keep it under {MAX_NAME_CHARS}")


def refuse_clash(store: Store, pair_id: int, row: dict[str, Any]) -> None:
    """An edited question may not become the same question as another stored pair."""
    key = (row["kind"], question_key(row["instruction"], row["input"]))
    for other in store.list_pairs(row["kind"]):
        if other.id != pair_id and (other.kind, question_key(other.instruction, other.input)) == key:
            raise PairError(f"asks the same question as pair {other.id}; edit or delete that one")
