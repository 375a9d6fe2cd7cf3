"""How long a user message may be: the bot's cheap check before enqueueing, and the worker's
exact "prompt too long" error turned into words the user can act on."""

from __future__ import annotations

import re

from personabot.core.settings import Settings

# The bot has no tokenizer. It refuses at once only what no tokenization can fit (more than this
# many characters per token is rare even for long English words); the worker's exact count
# catches the rest, and `failure_text` words that answer the same way.
MAX_CHARS_PER_TOKEN = 6
# What to suggest when only the bot's estimate is known: a length that fits for most text.
SAFE_CHARS_PER_TOKEN = 3
# core/prompting.py's PromptError when even the newest message alone does not fit.
_TOO_LONG = re.compile(r"the prompt needs (\d+) tokens but the context budget is (\d+)")


def prompt_budget(settings: Settings) -> int:
    """Tokens left for the prompt, as the chat worker computes it (workers/chat_reply.py): the
    context minus the default reply cap, which never takes more than half the context."""
    return settings.context_tokens - min(settings.max_new_tokens, settings.context_tokens // 2)


def max_message_chars(settings: Settings) -> int:
    """Longer messages cannot fit the prompt under any tokenization: refuse them in the bot."""
    return max(1, prompt_budget(settings)) * MAX_CHARS_PER_TOKEN


def too_long_text(chars: int) -> str:
    """The answer to a message that does not fit, suggesting about `chars` characters."""
    rounded = chars // 100 * 100 if chars >= 200 else max(1, chars)
    return (f"Your message is too long for me to read at once. Please shorten it to about "
            f"{rounded} characters and send it again.")


def too_long_for_budget(settings: Settings) -> str:
    return too_long_text(max(1, prompt_budget(settings)) * SAFE_CHARS_PER_TOKEN)


def too_long_from_error(error: str, user_text: str) -> str | None:
    """The too-long answer when the worker's error says the prompt did not fit, else None.

    The worker counted the tokens exactly: scale the message's length by the share that fits.
    """
    match = _TOO_LONG.search(error)
    if match is None:
        return None
    needed, budget = int(match.group(1)), int(match.group(2))
    return too_long_text(len(user_text) * budget // max(1, needed))
