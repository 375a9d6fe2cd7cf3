"""Redis pools for hundreds of concurrent replies: past redis-py's 100 connections they wait, never fail."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis
import redis.asyncio as aioredis

from personabot.core.redis_pool import async_client, sync_client

READERS = 150  # more than redis-py 8's default pool of 100


def blocked_reads(client: redis.Redis) -> list[BaseException]:
    """READERS threads each hold a connection for a blocking read (as a reply-stream reader does)."""
    errors: list[BaseException] = []
    start = threading.Barrier(READERS)

    def read(index: int) -> None:
        start.wait()
        try:
            client.blpop([f"nothing-{index}"], timeout=1)
        except Exception as error:  # noqa: BLE001 - collected and asserted on
            errors.append(error)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(READERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_the_default_pool_fails_past_100_and_ours_does_not(redis_server) -> None:  # type: ignore[no-untyped-def]
    plain = redis.Redis.from_url(redis_server.url)
    assert any(isinstance(e, redis.exceptions.MaxConnectionsError) for e in blocked_reads(plain))
    plain.close()
    ours = sync_client(redis_server.url, concurrency=READERS)
    assert blocked_reads(ours) == []
    # Fewer connections than readers: the rest wait for one instead of failing.
    small = sync_client(redis_server.url, concurrency=8, wait_s=20)
    assert blocked_reads(small) == []
    assert small.connection_pool.max_connections < READERS


def test_the_async_pool_waits_too(redis_server) -> None:  # type: ignore[no-untyped-def]
    async def readers(client: aioredis.Redis) -> list[BaseException | None]:
        results = await asyncio.gather(*(client.blpop([f"nothing-{i}"], timeout=1) for i in range(READERS)),
                                       return_exceptions=True)
        await client.aclose()
        return [r for r in results if isinstance(r, BaseException)]

    with pytest.raises(redis.exceptions.MaxConnectionsError):
        failures = asyncio.run(readers(aioredis.Redis.from_url(redis_server.url)))
        raise failures[0]
    assert asyncio.run(readers(async_client(redis_server.url, concurrency=16, wait_s=20))) == []
