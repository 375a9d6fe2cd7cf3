"""The one place prompts are built: persona rendering, training samples and served conversations.

Training (`training/dataset.py`) and serving (`workers/`) both call these functions, so the model
sees the same system prompt and message layout in both; the chat template itself comes from the
model's tokenizer (Qwen2.5 ChatML), which ms-swift's `qwen2_5` template reproduces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class PromptError(ValueError):
    """A conversation cannot be turned into a prompt; the message says why."""



class PersonaText(Protocol):
    """What rendering needs of a persona: the store's `Persona`, `training.dataset.PersonaData`, ..."""

    @property
    def name(self) -> str: ...

    @property
    def author(self) -> str: ...

    @property
    def system_prompt(self) -> str: ...

def render(text: str, *, name: str, author: str) -> str:
    """Fill {name} and {author} (and the seeds' {{NAME}}/{{AUTHOR}}) from the persona."""
    return (
        text.replace("{{NAME}}", name)
        .replace("{{AUTHOR}}", author)
        .replace("{name}", name)
        .replace("{author}", author)
    )


def system_prompt_for(persona: PersonaText, override: str | None = None) -> str:
    """The system prompt a conversation starts with: an override, else the persona's."""
    text = override if override is not None else (persona.system_prompt or DEFAULT_SYSTEM_PROMPT)
    return render(text, name=persona.name, author=persona.author)


def question_text(instruction: str, input_: str = "") -> str:
    """Alpaca instruction + input joined the way ms-swift joins them."""
    return f"{instruction}\n{input_}" if input_ else instruction


def pair_messages(pair: Any, persona: PersonaText) -> list[dict[str, str]]:
    """One training sample in messages form, rendered from the persona."""
    get: Callable[..., Any] = pair.get if isinstance(pair, dict) else lambda k, d="": getattr(pair, k, d)
    return [
        {"role": "system", "content": system_prompt_for(persona)},
        {"role": "user", "content": render(question_text(get("instruction"), get("input", "") or ""),
                                           name=persona.name, author=persona.author)},
        {"role": "assistant", "content": render(get("output"), name=persona.name,
                                                author=persona.author)},
    ]


def conversation_messages(
    system_prompt: str,
    history: Sequence[Any],
    *,
    count_tokens: Callable[[list[dict[str, str]]], int] | None = None,
    budget: int | None = None,
) -> list[dict[str, str]]:
    """System prompt + history (oldest first), dropping the oldest turns to fit `budget` tokens.

    The system prompt is never cut and the last user message is always kept; if even that does
    not fit, PromptError says by how much.
    """
    turns = [
        {"role": m["role"] if isinstance(m, dict) else m.role,
         "content": m["content"] if isinstance(m, dict) else m.content}
        for m in history
        if (m["role"] if isinstance(m, dict) else m.role) != "system"
    ]
    if not turns or turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise PromptError("the conversation must end with a non-empty user message")
    system = [{"role": "system", "content": system_prompt}]
    if count_tokens is None or budget is None:
        return system + turns
    start = 0
    while True:
        messages = system + turns[start:]
        used = count_tokens(messages)
        if used <= budget:
            return messages
        if start >= len(turns) - 1:
            raise PromptError(
                f"the prompt needs {used} tokens but the context budget is {budget}; "
                "shorten the message or raise PERSONABOT_CONTEXT_TOKENS"
            )
        start += 1
        # Keep turns starting with a user message.
        while start < len(turns) - 1 and turns[start]["role"] != "user":
            start += 1
