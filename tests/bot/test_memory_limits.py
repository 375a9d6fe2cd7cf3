"""Chat memory and rate limits on a real Redis."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from personabot.bot.limits import ChatPacer, UserRateLimiter
from personabot.bot.memory import ChatMemory, history_key


async def test_memory_keeps_last_turns_and_expires(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = aioredis.Redis.from_url(redis_server.url)
    memory = ChatMemory(client, turns=3, tokens=10_000, ttl_s=120)
    for i in range(5):
        await memory.add_turn(7, f"question {i}", f"answer {i}")
    history = await memory.load(7)
    assert [m.content for m in history] == ["question 2", "answer 2", "question 3", "answer 3",
                                            "question 4", "answer 4"]
    assert [m.role for m in history] == ["user", "assistant"] * 3
    assert 0 < await client.ttl(history_key(7)) <= 120
    assert await memory.load(8) == []
    await memory.clear(7)
    assert await memory.load(7) == []
    await client.aclose()


async def test_memory_token_bound_drops_oldest_turns(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = aioredis.Redis.from_url(redis_server.url)
    memory = ChatMemory(client, turns=20, tokens=100, ttl_s=120)
    for i in range(6):
        await memory.add_turn(1, f"q{i} " + "x" * 120, f"a{i}")  # ~31 tokens per turn
    history = await memory.load(1)
    assert [m.content[:2] for m in history] == ["q3", "a3", "q4", "a4", "q5", "a5"]
    await memory.add_turn(1, "y" * 2000, "huge")  # larger than the budget alone: still kept
    assert [m.content for m in await memory.load(1)][-1] == "huge"
    assert len(await memory.load(1)) == 2
    await client.aclose()


async def test_memory_survives_a_new_client(redis_server) -> None:  # type: ignore[no-untyped-def]
    first = aioredis.Redis.from_url(redis_server.url)
    await ChatMemory(first, turns=5, tokens=1000, ttl_s=60).add_turn(3, "hello", "hi there")
    await first.aclose()
    second = aioredis.Redis.from_url(redis_server.url)
    history = await ChatMemory(second, turns=5, tokens=1000, ttl_s=60).load(3)
    assert [m.content for m in history] == ["hello", "hi there"]
    await second.aclose()


async def test_user_rate_limit_sliding_window(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = aioredis.Redis.from_url(redis_server.url)
    limiter = UserRateLimiter(client, per_minute=3)
    decisions = [await limiter.check(5) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert decisions[3].notify and not decisions[4].notify  # tell the user once per window
    assert 1 <= decisions[3].retry_after_s <= 60
    assert (await limiter.check(6)).allowed  # other users are not affected
    await client.aclose()


async def test_chat_pacer_spaces_requests_from_when_they_finish() -> None:
    finished: list[float] = []

    async def request(pacer: ChatPacer, chat_id: int, takes_s: float) -> None:
        async with pacer.slot(chat_id):
            await asyncio.sleep(takes_s)
            finished.append(time.monotonic())

    bursty = ChatPacer(rate_per_s=10.0, burst=2)
    assert bursty.ready(1)
    await asyncio.gather(request(bursty, 1, 0.0), request(bursty, 1, 0.0))
    assert not bursty.ready(1) and bursty.ready(2)
    single = ChatPacer(rate_per_s=10.0, burst=1)
    await asyncio.gather(request(single, 3, 0.3), request(single, 3, 0.0))
    assert finished[-1] - finished[-2] >= 0.1, "spaced from the end of the slow request"
    bursty.forget_idle()
