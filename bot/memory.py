"""Per-chat conversation memory in Redis: bounded by turns and tokens, expiring, cleared by /reset."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from personabot.core import keys
from personabot.core.schemas import Message

PREFIX = keys.BOT_HISTORY


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters per token) used to bound the memory."""
    return len(text) // 4 + 1


def history_key(chat_id: int) -> str:
    return f"{PREFIX}{chat_id}"


class ChatMemory:
    """The last turns of each chat as a Redis list of JSON messages, oldest first.

    A turn is one user message and the reply to it. The list keeps at most `turns` turns and
    about `tokens` tokens (the oldest turns go first) and expires `ttl_s` after the last turn;
    it lives in Redis, so it survives a bot restart.
    """

    def __init__(self, client: aioredis.Redis, *, turns: int, tokens: int, ttl_s: int) -> None:
        self.client = client
        self.turns = turns
        self.tokens = tokens
        self.ttl_s = ttl_s

    async def load(self, chat_id: int) -> list[Message]:
        raw = await self.client.lrange(history_key(chat_id), 0, -1)
        return [Message.model_validate_json(item) for item in raw]

    async def add_turn(self, chat_id: int, user_text: str, reply_text: str) -> None:
        """Append one turn, then drop the oldest turns beyond the turn and token bounds."""
        key = history_key(chat_id)
        if self.turns == 0:
            await self.client.delete(key)
            return
        items = [json.dumps({"role": "user", "content": user_text}),
                 json.dumps({"role": "assistant", "content": reply_text})]
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(key, *items)
        pipe.ltrim(key, -2 * self.turns, -1)
        pipe.expire(key, self.ttl_s)
        pipe.lrange(key, 0, -1)
        stored = (await pipe.execute())[-1]
        drop = self._turns_over_budget([Message.model_validate_json(item) for item in stored])
        if drop:
            await self.client.ltrim(key, 2 * drop, -1)

    def _turns_over_budget(self, messages: list[Message]) -> int:
        """How many oldest turns to drop so the rest fits `tokens` (the newest turn always stays)."""
        sizes = [estimate_tokens(m.content) for m in messages]
        total = sum(sizes)
        drop = 0
        while total > self.tokens and 2 * (drop + 1) < len(messages):
            total -= sizes[2 * drop] + sizes[2 * drop + 1]
            drop += 1
        return drop

    async def clear(self, chat_id: int) -> None:
        await self.client.delete(history_key(chat_id))
